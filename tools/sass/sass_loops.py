#!/usr/bin/env python3
"""Static SASS of a kernel's hot loop, without a GPU.

Compiles one CUDA file to an sm_90 cubin with the project's flags (ptxas -v for registers and
spills), disassembles it with nvdisasm and, per kernel, reports the loops that contain a tensor-core
instruction (HMMA, IMMA, HGMMA), innermost first: their size and opcode mix. With --base REV the
same file is also built from git revision REV (a `git archive` of that tree) and both are printed,
so a kernel change can be judged by its instruction count before any device time is spent.

    python3 tools/sass/sass_loops.py kernels/attention/inst/decode_b2_d128.cu --kernel EfLi1E
    python3 tools/sass/sass_loops.py kernels/attention/inst/decode_b2_d128.cu --base HEAD~1 -D X=1

Static counts are not executed counts: a loop body includes its rarely taken branches (decode
attention's rescale of the accumulators is ~50 of them). nvdisasm is not part of CUDA's minimal
toolkit here; `pip install nvidia-cuda-nvdisasm` provides it (a development tool, never a build
dependency), or set NVDISASM.
"""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

NVCC_FLAGS = ["-O3", "-DNDEBUG", "-arch=sm_90", "-cubin", "--expt-relaxed-constexpr", "-std=c++20"]
MMA = ("HMMA", "IMMA", "HGMMA", "QGMMA", "IGMMA")


def find_nvdisasm():
    cands = [os.environ.get("NVDISASM"), shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm"]
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        cands += glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "nvdisasm"))
    cands += glob.glob(os.path.expanduser("~/.local/lib/python3*/site-packages/nvidia/cu*/bin/nvdisasm"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or set NVDISASM")


def compile_cubin(root, src, defines, out):
    nvcc = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
    cmd = [nvcc, *NVCC_FLAGS, "-Xptxas", "-v", f"-I{root}", *[f"-D{d}" for d in defines], "-o", out, src]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"nvcc failed:\n{r.stderr}")
    # ptxas -v: "Compiling entry function 'NAME'" then its stack/spill and register lines.
    info, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            info[name] = {}
        elif name and (m := re.search(r"(\d+) bytes spill stores", line)):
            info[name]["spill"] = int(m.group(1))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            info[name]["regs"] = int(m.group(1))
    return info


def parse(nvdisasm, cubin):
    out = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    funcs = {}
    for chunk in re.split(r"\n\s*\.text\.", out)[1:]:
        name = chunk.split(":", 1)[0].strip()
        ins, labels, pending = [], {}, []
        for line in chunk.splitlines():
            m = re.match(r"^\s*(\.L_x_\d+):", line)
            if m:
                pending.append(m.group(1))
                continue
            m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if not m:
                continue
            addr, text = int(m.group(1), 16), m.group(2).strip()
            for lab in pending:
                labels[lab] = addr
            pending = []
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            ins.append((addr, op, text))
        funcs[name] = (ins, labels)
    return funcs


def mma_loops(ins, labels):
    """Backward branches whose body holds a tensor-core instruction, smallest first."""
    loops = []
    for addr, op, text in ins:
        if not op.startswith("BRA"):
            continue
        m = re.search(r"(\.L_x_\d+)", text)
        if not m or labels.get(m.group(1), 1 << 62) > addr:
            continue
        lo = labels[m.group(1)]
        body = [x for x in ins if lo <= x[0] <= addr]
        if any(x[1].startswith(MMA) for x in body):
            loops.append((len(body), lo, addr, body))
    return sorted(set((n, lo, hi) for n, lo, hi, _ in loops)), {(lo, hi): b for _, lo, hi, b in loops}


def opcode(op):
    head = op.split(".")[0]
    return op if head in ("HMMA", "IMMA", "LDS", "SHF", "IMAD", "LDGSTS") else head


def report(tag, info, funcs, pattern, top):
    for name, (ins, labels) in funcs.items():
        if pattern not in name:
            continue
        i = info.get(name, {})
        print(f"[{tag}] {name}: {len(ins)} instructions, {i.get('regs', '?')} registers, "
              f"{i.get('spill', '?')} bytes spilled")
        sizes, bodies = mma_loops(ins, labels)
        for n, lo, hi in sizes[:top]:
            mix = collections.Counter(opcode(x[1]) for x in bodies[(lo, hi)])
            print(f"    loop {lo:#x}-{hi:#x}: {n} instructions; "
                  + ", ".join(f"{k} {v}" for k, v in mix.most_common(24)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a .cu file, relative to the repository root")
    ap.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--top", type=int, default=1, help="loops a kernel (innermost first)")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a -D for nvcc")
    ap.add_argument("--base", help="also build the file from this git revision")
    a = ap.parse_args()
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    nvdisasm = find_nvdisasm()
    with tempfile.TemporaryDirectory() as tmp:
        trees = []
        if a.base:
            base_root = os.path.join(tmp, "base")
            os.makedirs(base_root)
            archive = subprocess.run(["git", "archive", a.base], cwd=root, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", base_root], input=archive.stdout, check=True)
            trees.append((a.base, base_root))
        trees.append(("worktree", root))
        for tag, tree in trees:
            cubin = os.path.join(tmp, f"{len(tag)}_{os.getpid()}.cubin")
            info = compile_cubin(tree, a.source, a.defines, cubin)
            report(tag, info, parse(nvdisasm, cubin), a.kernel, a.top)


if __name__ == "__main__":
    main()
