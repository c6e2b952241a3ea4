# bench_cuda_backend with no usable GPU (CUDA_VISIBLE_DEVICES empty, so on any machine): it must
# fail, say why, and write no results file; a benchmark that "ran" without a device once wrote a
# JSON of throughput points that "did not fit" and exited 0.
# cmake -DBIN=... -DMODEL=... -DOUT=... -P no_gpu_error.cmake
file(REMOVE "${OUT}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -E env CUDA_VISIBLE_DEVICES= "${BIN}" --model "${MODEL}"
          --load-format dummy --scenarios batch1,throughput --batches 1 --contexts 4096 --out "${OUT}"
  RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "exited 0 without a GPU; stderr: ${err}")
endif()
if(NOT err MATCHES "bench_cuda_backend: no usable CUDA device \\(.+\\)")
  message(FATAL_ERROR "no clear error on stderr: '${err}'")
endif()
if(EXISTS "${OUT}")
  message(FATAL_ERROR "wrote ${OUT} without a GPU")
endif()
if(NOT out STREQUAL "")
  message(FATAL_ERROR "printed results without a GPU: '${out}'")
endif()
