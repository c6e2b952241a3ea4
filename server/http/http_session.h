#pragma once
// Internals of the HTTP frontend: the state every connection shares (ServerContext) and one
// connection (Session). A Session lives on its own strand; everything in it runs there.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/serving/serving_engine.h"
#include "server/chat/chat_prompt.h"
#include "server/http/api_error.h"
#include "server/http/completion_job.h"
#include "server/http/http_server.h"
#include "server/http/openai_request.h"

namespace pmkv::http {

namespace net = boost::asio;
namespace beast = boost::beast;
using tcp = net::ip::tcp;

class Session;

// How the engine thread wakes a session: a post to its strand, at most one pending at a time,
// never after the session (or the server) is gone.
struct Waker {
  std::mutex mu;
  bool alive = true;
  std::weak_ptr<Session> session;
  net::any_io_executor executor;
  std::atomic<bool> pending{false};
  void wake();
  void kill();
};

struct ServerContext {
  ServerContext(ServingEngine& e, HttpServerOptions o);
  ServingEngine& engine;
  HttpServerOptions options;
  chat::ChatPrompt chat;
  ModelInfo model;
  // Where request bodies are parsed and tokenized (HttpServer's; see Session::start_generation).
  net::thread_pool* parse_pool = nullptr;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> requests_total{0};
  std::atomic<uint64_t> errors_total{0};
  std::atomic<uint64_t> open_connections{0};
  std::atomic<uint64_t> next_request{0};
  uint64_t id_salt = 0;
  int64_t created = 0;  // server start (unix seconds), the models' "created"

  std::mutex sessions_mu;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
  std::vector<std::shared_ptr<Session>> live_sessions();
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, ServerContext& ctx);
  ~Session();
  void run();
  // Thread-safe: cancels the engine requests and closes the connection (server stop).
  void shutdown();
  void kill_waker() { waker_->kill(); }
  // On the strand: the engine pushed to one of this session's streams.
  void wake_up();

 private:
  struct Response {
    int status = 200;
    std::string content_type = "application/json";
    std::string body;
    std::string extra_headers;
  };
  void do_read();
  void on_header(beast::error_code ec);
  void read_body();
  void on_read(beast::error_code ec);
  void handle_request();
  void route(const std::string& target);
  // A generation request's body parsed (off the strand) into engine requests, or its error.
  struct Parsed {
    std::optional<ApiRequest> api;
    std::string id;
    std::vector<EngineRequest> requests;
    std::optional<ApiError> error;
  };
  void start_generation(Endpoint endpoint);
  void on_parsed(Parsed parsed);
  void submit_all(std::vector<EngineRequest> requests);
  void drain();
  void send_health();
  void send_metrics();
  void send_models(const std::string& target);
  bool shutting_down() const;
  void send_unavailable();
  void log_access(int status) const;
  void send_stream_bytes(std::string bytes, bool last);
  void send(Response r);
  void send_error(const ApiError& e, std::string extra_headers = {});
  void queue(std::string bytes, bool last);
  void do_write();
  void finish_response();
  void watch_disconnect();
  void client_gone();
  void cancel_streams();
  void linger_close();
  void discard_input();
  void close();
  bool authorized() const;

  ServerContext& ctx_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<beast::http::request_parser<beast::http::string_body>> parser_;
  beast::http::request<beast::http::string_body> request_;
  std::shared_ptr<Waker> waker_;

  // The request being answered.
  std::chrono::steady_clock::time_point started_;
  std::string method_;
  std::string path_;
  int status_ = 0;
  bool keep_alive_ = false;
  bool http11_ = true;
  std::optional<CompletionJob> job_;
  std::vector<std::shared_ptr<RequestStream>> streams_;
  bool headers_sent_ = false;

  // Writing: one async_write at a time; the response is complete once `last` bytes are written.
  std::deque<std::string> out_;
  bool writing_ = false;
  bool response_queued_ = false;
  // Reading while a request runs, to notice a client that goes away.
  bool watching_ = false;
  bool read_next_ = false;
  bool closed_ = false;
};

}  // namespace pmkv::http
