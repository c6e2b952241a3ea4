#pragma once
// The subcommands of the `pmkv` binary. Each parses its own options (InvalidArgument on bad ones)
// and returns the process exit code.
#include <string>
#include <vector>

namespace pmkv::cli {

int run_generate(const std::vector<std::string>& args);
int run_eval(const std::vector<std::string>& args);
int run_calibrate(const std::vector<std::string>& args);
int run_serve(const std::vector<std::string>& args);

}  // namespace pmkv::cli
