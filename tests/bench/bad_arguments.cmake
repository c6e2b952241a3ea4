# bench_cuda_backend with bad arguments: each must exit 2 before touching the GPU, with one line
# naming the flag and the value (a bad number used to end in std::terminate, a misspelt load
# format or scenario silently meant safetensors or nothing).
# cmake -DBIN=... -P bad_arguments.cmake
set(cases
    "--decode-steps|x|--decode-steps 'x': not an integer"
    "--throughput-steps|0|--throughput-steps '0': less than 1"
    "--batches|16,x|--batches '16,x': 'x' is not an integer"
    "--bits|,|--bits ',': an empty list"
    "--bits|16,3|--bits '16,3': 3 is not 16, 8, 4 or 2"
    "--load-format|dumy|--load-format 'dumy': dummy or safetensors"
    "--scenarios|batch1,thruput|'thruput' is not one of batch1, gemm, prefill, throughput"
    "--cuda-graphs|yes|--cuda-graphs 'yes': 0 or 1"
    "--top-p|0.9x|--top-p '0.9x': not a number")
foreach(c IN LISTS cases)
  string(REPLACE "|" ";" parts "${c}")
  list(GET parts 0 flag)
  list(GET parts 1 value)
  list(GET parts 2 expect)
  execute_process(COMMAND "${BIN}" --model unused ${flag} ${value}
                  RESULT_VARIABLE rc ERROR_VARIABLE err OUTPUT_VARIABLE out)
  if(NOT rc EQUAL 2)
    message(FATAL_ERROR "${flag} ${value}: exit ${rc}, expected 2; stderr: ${err}")
  endif()
  string(FIND "${err}" "bench_cuda_backend: ${expect}" at)
  if(at EQUAL -1)
    string(FIND "${err}" "${expect}" at)
  endif()
  if(at EQUAL -1)
    message(FATAL_ERROR "${flag} ${value}: stderr lacks '${expect}': '${err}'")
  endif()
endforeach()
