#pragma once
// The OpenAI-compatible HTTP frontend of `pmkv serve` (Boost.Beast over Asio): a few io threads
// serve every connection asynchronously (no thread per connection), each connection on its own
// strand. Engine streams wake their connection through RequestStream::set_notifier (a post to the
// strand) and are drained with poll(), so the engine thread never waits for a socket.
//
// Endpoints: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
// GET /v1/models/{id}, GET /health, GET /metrics (Prometheus). See server/README.md.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace pmkv {

class ServingEngine;

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  uint16_t port = 8000;                // 0 binds a free port (see port())
  std::optional<std::string> api_key;  // when set, /v1/* needs "Authorization: Bearer KEY"
  size_t max_body_bytes = 8u << 20;    // larger bodies get 413
  int32_t max_n = 16;                  // choices per request at most
  std::string served_model_name;       // empty: the model directory's name
  int32_t io_threads = 2;
  std::chrono::milliseconds request_timeout{0};  // per generation request; 0 = none
  bool access_log = true;                        // one spdlog line per request
};

class HttpServer {
 public:
  // Does not listen yet. The engine must outlive the server.
  HttpServer(ServingEngine& engine, HttpServerOptions o);
  ~HttpServer();  // stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds, listens and starts the io threads. Throws InvalidArgument when the address cannot be
  // bound (naming host and port).
  void start();
  // The bound port (the real one when the options asked for 0); 0 before start().
  uint16_t port() const;
  // Stops accepting, cancels the engine requests of open connections, closes them and joins the
  // io threads. /health answers 503 from the moment stop() begins. Idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmkv
