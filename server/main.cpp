// pmkv: one binary, one subcommand per job.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "engine/common/error.h"
#include "server/cli/commands.h"

namespace {

struct Command {
  std::string_view name;
  std::string_view summary;
  int (*run)(const std::vector<std::string>& args);
};

constexpr Command kCommands[] = {
    {"generate", "generate text for one prompt on the CPU engine", pmkv::cli::run_generate},
    {"eval", "perplexity of a model on a text file", pmkv::cli::run_eval},
    {"calibrate", "offline KV calibration: sensitivity, allocate, max-keys, rep-scales",
     pmkv::cli::run_calibrate},
    {"serve", "the OpenAI-compatible HTTP and gRPC server", pmkv::cli::run_serve},
};

void usage(std::FILE* out) {
  std::fprintf(out, "usage: pmkv <command> [options]\n\ncommands:\n");
  for (const Command& c : kCommands) {
    std::fprintf(out, "  %-10.*s %.*s\n", int(c.name.size()), c.name.data(), int(c.summary.size()),
                 c.summary.data());
  }
  std::fprintf(out, "\n`pmkv <command> --help` lists a command's options.\n");
}

}  // namespace

// OpenMP threads that wait by spinning (libgomp's default) starve everything else on a busy
// machine: the HTTP threads, other processes, each other (measured on 2 cores under load: decode
// 4.7 tokens/s spinning vs 26 passive). libgomp reads OMP_WAIT_POLICY when it is loaded, before
// main, so when the user has not chosen, set PASSIVE and re-execute once.
static void ensure_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: then run as we are
}

int main(int argc, char** argv) {
  ensure_passive_openmp(argv);
  // Logs go to stderr: stdout carries the commands' output (generated text, JSON).
  spdlog::set_default_logger(spdlog::stderr_color_mt("pmkv"));
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string_view name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return 0;
  }
  if (name == "--version") {
    std::printf("pmkv %s\n", PMKV_VERSION);
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const Command& c : kCommands) {
    if (c.name != name) continue;
    try {
      return c.run(args);
    } catch (const pmkv::InvalidArgument& e) {
      std::fprintf(stderr, "pmkv %s: %s\n", argv[1], e.what());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "pmkv %s: error: %s\n", argv[1], e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "pmkv: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}
