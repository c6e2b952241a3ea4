// Which mma.sync forms sm_90 runs natively: one kernel a form, each a single mma on loaded
// registers. Built to SASS (tools/sass/README.md: `mma_forms`), a native form is one IMMA/HMMA;
// an emulated one is unpacking instructions and a wider native mma. Asked before spending device
// time on 4-bit K codes (u4 x s4) or fp8 V codes (e4m3) in decode attention: on sm_90 both are
// emulated (bench/RESULTS.md, thirty-second session).
#include <cstdint>

#define PMKV_MMA_FORM(NAME, SHAPE, TYPES, CT, CONSTR)                                    \
  __global__ void NAME(const uint32_t* a, const uint32_t* b, CT* c) {                    \
    const int t = threadIdx.x;                                                           \
    CT d0 = 0, d1 = 0, d2 = 0, d3 = 0;                                                   \
    asm volatile("mma.sync.aligned." SHAPE ".row.col." TYPES                             \
                 " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                \
                 : CONSTR(d0), CONSTR(d1), CONSTR(d2), CONSTR(d3)                        \
                 : "r"(a[t]), "r"(a[t + 32]), "r"(a[t + 64]), "r"(a[t + 96]), "r"(b[t]), \
                   "r"(b[t + 32]));                                                      \
    c[t] = d0 + d1 + d2 + d3;                                                            \
  }
#define PMKV_INT_OUT(x) "+r"(x)
#define PMKV_F32_OUT(x) "+f"(x)

// The decode kernel's K phase today: int8 codes, one IMMA.16832.
PMKV_MMA_FORM(mma_u8_s8, "m16n8k32", "s32.u8.s8.s32", int, PMKV_INT_OUT)
// 4-bit codes, 8 a register: would halve the K phase's masks if native.
PMKV_MMA_FORM(mma_u4_s4, "m16n8k64", "s32.u4.s4.s32", int, PMKV_INT_OUT)
// fp8 V codes, 4 a register: would halve the V phase's masks if native.
PMKV_MMA_FORM(mma_e4m3, "m16n8k32", "f32.e4m3.e4m3.f32", float, PMKV_F32_OUT)
// The V phase today: bf16, one HMMA.16816.
PMKV_MMA_FORM(mma_bf16, "m16n8k16", "f32.bf16.bf16.f32", float, PMKV_F32_OUT)
