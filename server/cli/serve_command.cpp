// `pmkv serve`: the online engine behind the HTTP (OpenAI-compatible) and gRPC frontends, until
// SIGTERM or SIGINT, then a graceful shutdown.
#include <semaphore.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include "engine/common/error.h"
#include "engine/serving/serving_engine.h"
#include "server/cli/args.h"
#include "server/cli/commands.h"
#include "server/config.h"
#include "server/grpc/grpc_server.h"
#include "server/http/http_server.h"

namespace pmkv::cli {

namespace {

constexpr const char* kHelp =
    R"(usage: pmkv serve [--model DIR] [--config FILE] [--set section.key=value ...]
                  [--host H] [--port P] [--grpc-port G]

  --model DIR           Hugging Face model directory (default: model.path, models/pmkv-ref)
  --config FILE         YAML configuration merged over the defaults (config/default.yaml lists
                        and documents every key)
  --set KEY=VALUE       one configuration value, e.g. --set scheduler.max_running=64 or
                        --set kv_cache.bit_ladder=[16,8,4] (repeatable; applied after --config)
  --host H              listen address (server.host)
  --port P              HTTP port (server.port); 0 picks a free one
  --grpc-port G         gRPC port (server.grpc_port); 0 picks a free one

Logs "pmkv: HTTP listening on HOST:PORT" and "pmkv: gRPC listening on HOST:PORT" once serving.
SIGTERM or SIGINT: stop taking requests, let running ones finish for server.shutdown_grace_s
seconds, end the rest, exit 0. A second SIGINT during that time exits at once.
)";

uint16_t port_flag(const Args& a, const std::string& name, uint16_t fallback) {
  const auto v = a.get_int(name);
  if (!v) return fallback;
  if (*v < 0 || *v > 65535) {
    throw InvalidArgument("--" + name + ": expected a port number (0-65535), got " +
                          std::to_string(*v));
  }
  return static_cast<uint16_t>(*v);
}

ServerConfig config_from(const Args& a) {
  std::optional<std::filesystem::path> file;
  if (auto f = a.get("config")) file = *f;
  ServerConfig c = load_server_config(file, a.all("set"));
  if (auto m = a.get("model")) c.model.path = *m;
  if (auto h = a.get("host")) c.server.host = *h;
  c.server.port = port_flag(a, "port", c.server.port);
  c.server.grpc_port = port_flag(a, "grpc-port", c.server.grpc_port);
  return c;
}

HttpServerOptions http_options(const ServerConfig& c, const std::string& served) {
  HttpServerOptions o;
  o.host = c.server.host;
  o.port = c.server.port;
  o.api_key = c.server.api_key;
  o.max_body_bytes = static_cast<size_t>(c.server.max_body_bytes);
  o.max_n = c.server.max_n;
  o.served_model_name = served;
  o.io_threads = c.server.io_threads;
  o.request_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(c.server.request_timeout_s * 1000.0));
  o.access_log = c.logging.access_log;
  return o;
}

// SIGTERM / SIGINT: the first one wakes the main thread for a graceful shutdown. During it, more
// SIGTERMs are ignored (process managers repeat them) and a second SIGINT (Ctrl-C again) exits at
// once. A handler, not sigwait(): threads started before main (the BLAS pool) do not block the
// signals, so any thread may take them.
sem_t g_stop;
std::atomic<int> g_signal{0};

void on_stop_signal(int sig) {
  int none = 0;
  if (g_signal.compare_exchange_strong(none, sig)) {
    sem_post(&g_stop);  // async-signal-safe
  } else if (sig == SIGINT) {
    _exit(128 + SIGINT);
  }
}

void install_stop_handlers() {
  sem_init(&g_stop, 0, 0);
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

int wait_for_stop_signal() {
  while (sem_wait(&g_stop) != 0) {
  }
  return g_signal.load();
}

}  // namespace

int run_serve(const std::vector<std::string>& argv) {
  const Args a(argv, {.flags = {"help"},
                      .values = {"model", "config", "host", "port", "grpc-port"},
                      .repeatable = {"set"}});
  if (a.flag("help")) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  const ServerConfig cfg = config_from(a);
  spdlog::set_level(spdlog::level::from_str(cfg.logging.level));
  install_stop_handlers();

  ServingEngine engine(cfg.model.path, cfg.engine_options());
  const std::string served =
      cfg.model.served_name.empty() ? engine.model_name() : cfg.model.served_name;
  engine.start();
  HttpServer http(engine, http_options(cfg, served));
  http.start();
  spdlog::info("pmkv: HTTP listening on {}:{}", cfg.server.host, http.port());
  GrpcServer grpc(engine, {.host = cfg.server.host,
                           .port = cfg.server.grpc_port,
                           .api_key = cfg.server.api_key,
                           .served_model_name = served});
  grpc.start();
  spdlog::info("pmkv: gRPC listening on {}:{}", cfg.server.host, grpc.port());
  spdlog::info("pmkv: serving {} as '{}'", cfg.model.path.string(), served);

  const int sig = wait_for_stop_signal();
  const auto grace =
      std::chrono::milliseconds(static_cast<int64_t>(cfg.server.shutdown_grace_s * 1000));
  spdlog::info("pmkv: {} received: no new requests; running ones get {} ms to finish",
               sig == SIGTERM ? "SIGTERM" : "SIGINT", grace.count());
  // The engine first: new requests are refused (503 / UNAVAILABLE) while the frontends keep
  // streaming the running ones until they finish or the grace ends; then the frontends close.
  engine.shutdown(grace);
  grpc.stop();
  http.stop();
  spdlog::info("pmkv: stopped");
  return 0;
}

}  // namespace pmkv::cli
