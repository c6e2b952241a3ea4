#include "server/http/http_session.h"

#include <spdlog/spdlog.h>

#include <cstdio>

#include "engine/common/error.h"

namespace pmkv::http {
namespace {

namespace bhttp = beast::http;

constexpr auto kIdleTimeout = std::chrono::seconds(300);
constexpr auto kLingerTimeout = std::chrono::seconds(2);
constexpr uint32_t kMaxHeaderBytes = 64u << 10;
constexpr size_t kMaxPipelinedBytes = 1u << 20;

std::string chunk(const std::string& data) {
  char size[20];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  return size + data + "\r\n";
}

std::string request_id(ServerContext& ctx, Endpoint endpoint) {
  const uint64_t n = ctx.next_request.fetch_add(1) + 1;
  char hex[24];
  std::snprintf(hex, sizeof hex, "%016llx",
                static_cast<unsigned long long>(ctx.id_salt ^ (n * 0x9E3779B97F4A7C15ull)));
  return (endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-") + std::string(hex);
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void Waker::wake() {
  if (pending.exchange(true)) return;
  std::lock_guard lock(mu);
  if (!alive) return;
  net::post(executor, [s = session] {
    if (auto p = s.lock()) p->wake_up();
  });
}

void Waker::kill() {
  std::lock_guard lock(mu);
  alive = false;
}

Session::Session(tcp::socket socket, ServerContext& ctx)
    : ctx_(ctx), stream_(std::move(socket)), waker_(std::make_shared<Waker>()) {
  ++ctx_.open_connections;
}

Session::~Session() {
  waker_->kill();
  cancel_streams();
  std::lock_guard lock(ctx_.sessions_mu);
  ctx_.sessions.erase(this);
  --ctx_.open_connections;
}

void Session::run() {
  waker_->session = weak_from_this();
  waker_->executor = stream_.get_executor();
  {
    std::lock_guard lock(ctx_.sessions_mu);
    ctx_.sessions[this] = weak_from_this();
  }
  net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->do_read(); });
}

void Session::shutdown() {
  net::post(stream_.get_executor(), [self = shared_from_this()] {
    self->cancel_streams();
    self->close();
  });
}

void Session::do_read() {
  if (closed_) return;
  parser_.emplace();
  parser_->body_limit(ctx_.options.max_body_bytes);
  parser_->header_limit(kMaxHeaderBytes);
  stream_.expires_after(kIdleTimeout);
  bhttp::async_read_header(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_header(ec); });
}

void Session::on_header(beast::error_code ec) {
  if (closed_) return;
  // Errors here include a Content-Length beyond max_body_bytes: the 413 goes out before any body.
  if (ec || parser_->is_done()) return on_read(ec);
  const auto& req = parser_->get();
  if (req.version() >= 11 && beast::iequals(req[bhttp::field::expect], "100-continue")) {
    // curl sends this with bodies over 1 MB and waits up to a second for the answer before it
    // sends the body anyway: a second on every large request without it.
    static const std::string kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    net::async_write(stream_, net::buffer(kContinue),
                     [self = shared_from_this()](beast::error_code wec, size_t) {
                       if (wec) return self->close();
                       self->read_body();
                     });
    return;
  }
  read_body();
}

void Session::read_body() {
  bhttp::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
}

void Session::on_read(beast::error_code ec) {
  if (closed_) return;
  if (ec == bhttp::error::end_of_stream || ec == net::error::eof || ec == beast::error::timeout ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset ||
      ec == bhttp::error::partial_message) {
    close();
    return;
  }
  started_ = std::chrono::steady_clock::now();
  stream_.expires_never();
  if (ec) {
    ++ctx_.requests_total;
    const bool header_done = parser_->is_header_done();
    method_ = header_done ? std::string(parser_->get().method_string()) : "-";
    path_ = header_done ? std::string(parser_->get().target()) : "-";
    keep_alive_ = false;
    http11_ = true;
    if (ec == bhttp::error::body_limit) {
      send_error({.status = 413,
                  .message = "request body is larger than this server's limit of " +
                             std::to_string(ctx_.options.max_body_bytes) + " bytes",
                  .code = "request_too_large"});
    } else {
      send_error({.message = "malformed HTTP request: " + ec.message()});
    }
    return;
  }
  request_ = parser_->release();
  handle_request();
}

void Session::handle_request() {
  ++ctx_.requests_total;
  method_ = std::string(request_.method_string());
  path_ = std::string(request_.target());
  keep_alive_ = request_.keep_alive();
  http11_ = request_.version() >= 11;
  headers_sent_ = false;
  status_ = 0;
  route(path_.substr(0, path_.find('?')));
}

bool Session::authorized() const {
  if (!ctx_.options.api_key) return true;
  const auto it = request_.find(bhttp::field::authorization);
  if (it == request_.end()) return false;
  const std::string expected = "Bearer " + *ctx_.options.api_key;
  const std::string_view got(it->value().data(), it->value().size());
  unsigned diff = got.size() != expected.size();
  for (size_t i = 0; i < expected.size(); ++i) {
    diff |= static_cast<unsigned>(expected[i] ^ (i < got.size() ? got[i] : 0));
  }
  return diff == 0;
}

void Session::route(const std::string& target) {
  const bool v1 = target.starts_with("/v1/");
  if (v1 && !authorized()) {
    send_error({.status = 401,
                .message = "Incorrect or missing API key: send \"Authorization: Bearer KEY\"",
                .code = "invalid_api_key"},
               "WWW-Authenticate: Bearer\r\n");
    return;
  }
  std::string allowed;
  if (target == "/health" || target == "/metrics" || target == "/v1/models" ||
      target.starts_with("/v1/models/")) {
    allowed = "GET";
  } else if (target == "/v1/completions" || target == "/v1/chat/completions") {
    allowed = "POST";
  } else {
    send_error({.status = 404,
                .message = "Invalid URL (" + method_ + " " + target + ")",
                .code = "not_found"});
    return;
  }
  if (method_ != allowed) {
    send_error(
        {.status = 405,
         .message = "Method " + method_ + " is not allowed on " + target + " (use " + allowed + ")",
         .code = "method_not_allowed"},
        "Allow: " + allowed + "\r\n");
    return;
  }
  if (target == "/health") return send_health();
  if (target == "/metrics") return send_metrics();
  if (target.starts_with("/v1/models")) return send_models(target);
  start_generation(target == "/v1/completions" ? Endpoint::kCompletions : Endpoint::kChat);
}

bool Session::shutting_down() const {
  return ctx_.stopping || !ctx_.engine.accepting();
}

void Session::send_unavailable() {
  send_error({.status = 503,
              .message = "the server is shutting down and accepts no new requests",
              .type = "server_error",
              .code = "shutting_down"});
}

void Session::start_generation(Endpoint endpoint) {
  if (shutting_down()) return send_unavailable();
  // Parsing and tokenizing run on the parse pool, not on this IO thread: 8 MB of prompt text
  // takes ~3 s to tokenize, and an IO thread busy with it stopped every stream it served (two
  // such requests stalled all streaming for 2-3 s). Until on_parsed runs, nothing else on this
  // session touches request_: no read is pending and no stream exists yet.
  net::post(*ctx_.parse_pool, [self = shared_from_this(), endpoint] {
    auto parsed = std::make_shared<Parsed>();
    try {
      parsed->api = endpoint == Endpoint::kChat
                        ? parse_chat_request(self->request_.body(), self->ctx_.model)
                        : parse_completion_request(self->request_.body(), self->ctx_.model);
      parsed->id = request_id(self->ctx_, endpoint);
      parsed->requests = to_engine_requests(*parsed->api, self->ctx_.model, parsed->id);
    } catch (const ApiException& e) {
      parsed->error = e.error();
    } catch (const std::exception& e) {
      // A parser bug (tests/fuzz hunts these): one 500, not an exception that ends the process.
      spdlog::error("http: parsing a request failed: {}", e.what());
      parsed->error = ApiError{.status = 500,
                               .message = std::string("internal error: ") + e.what(),
                               .type = "server_error",
                               .code = "internal_error"};
    }
    net::post(self->stream_.get_executor(),
              [self, parsed] { self->on_parsed(std::move(*parsed)); });
  });
}

void Session::on_parsed(Parsed parsed) {
  if (closed_) return;
  if (parsed.error) return send_error(*parsed.error);
  if (shutting_down()) return send_unavailable();
  job_.emplace(*parsed.api, parsed.id, ctx_.model.served_name, unix_now(), ctx_.model.tokenizer);
  submit_all(std::move(parsed.requests));
}

void Session::submit_all(std::vector<EngineRequest> requests) {
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (ctx_.options.request_timeout.count() > 0) {
    deadline = std::chrono::steady_clock::now() + ctx_.options.request_timeout;
  }
  for (EngineRequest& r : requests)
    r.deadline = deadline;
  try {
    streams_ = ctx_.engine.submit_all(std::move(requests));  // all choices in one step
  } catch (const std::exception& e) {
    streams_.clear();
    job_.reset();
    if (dynamic_cast<const Unavailable*>(&e) != nullptr) {
      return send_error(
          {.status = 503, .message = e.what(), .type = "server_error", .code = "unavailable"});
    }
    if (shutting_down()) return send_unavailable();
    const bool invalid = dynamic_cast<const InvalidArgument*>(&e) != nullptr;
    return send_error({.status = invalid ? 400 : 500,
                       .message = e.what(),
                       .type = invalid ? "invalid_request_error" : "server_error"});
  }
  for (const auto& s : streams_)
    s->set_notifier([w = waker_] { w->wake(); });
  watch_disconnect();
  drain();
}

void Session::wake_up() {
  waker_->pending = false;
  drain();
}

void Session::drain() {
  // A wake-up can arrive after the last bytes were queued (job_ lives until they are written).
  if (!job_ || closed_ || response_queued_) return;
  std::string bytes;
  for (size_t i = 0; i < streams_.size(); ++i) {
    while (auto u = streams_[i]->poll())
      bytes += job_->apply(static_cast<int32_t>(i), *u);
  }
  if (job_->error()) {
    cancel_streams();
    if (!job_->emitted()) {
      const ApiError e = *job_->error();
      job_.reset();
      streams_.clear();
      return send_error(e);
    }
  }
  if (!job_->stream()) {
    if (job_->done()) send({.body = job_->response_body()});
    return;
  }
  const bool done = job_->done();
  if (done) bytes += job_->stream_tail();
  if (!bytes.empty() || done) send_stream_bytes(std::move(bytes), done);
}

void Session::send_stream_bytes(std::string bytes, bool last) {
  std::string out;
  if (!headers_sent_) {
    headers_sent_ = true;
    status_ = 200;
    if (!http11_) keep_alive_ = false;
    out = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n";
    out += http11_ ? "Transfer-Encoding: chunked\r\n" : "";
    out += keep_alive_ ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n";
  }
  if (!bytes.empty()) out += http11_ ? chunk(bytes) : bytes;
  if (last && http11_) out += "0\r\n\r\n";
  queue(std::move(out), last);
}

void Session::send(Response r) {
  status_ = r.status;
  if (r.status >= 400) ++ctx_.errors_total;
  if (ctx_.stopping) keep_alive_ = false;
  const auto reason = bhttp::obsolete_reason(static_cast<bhttp::status>(r.status));
  std::string out = "HTTP/1.1 " + std::to_string(r.status) + " " + std::string(reason) + "\r\n";
  out += "Content-Type: " + r.content_type + "\r\n";
  out += "Content-Length: " + std::to_string(r.body.size()) + "\r\n";
  out += keep_alive_ ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  out += r.extra_headers + "\r\n";
  out += r.body;
  queue(std::move(out), true);
}

void Session::send_error(const ApiError& e, std::string extra_headers) {
  send({.status = e.status, .body = error_body(e), .extra_headers = std::move(extra_headers)});
}

void Session::queue(std::string bytes, bool last) {
  if (closed_) return;
  if (!bytes.empty()) out_.push_back(std::move(bytes));
  response_queued_ = response_queued_ || last;
  if (out_.empty() && response_queued_ && !writing_) return finish_response();
  do_write();
}

void Session::do_write() {
  if (writing_ || out_.empty() || closed_) return;
  writing_ = true;
  net::async_write(stream_, net::buffer(out_.front()),
                   [self = shared_from_this()](beast::error_code ec, size_t) {
                     self->writing_ = false;
                     self->out_.pop_front();
                     if (ec) return self->client_gone();
                     if (!self->out_.empty()) return self->do_write();
                     if (self->response_queued_) self->finish_response();
                   });
}

void Session::log_access(int status) const {
  if (!ctx_.options.access_log) return;
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_)
          .count();
  spdlog::info("http {} {} {} {:.1f}ms prompt_tokens={} completion_tokens={}", method_, path_,
               status, ms, job_ ? job_->prompt_tokens() : 0, job_ ? job_->completion_tokens() : 0);
}

void Session::finish_response() {
  response_queued_ = false;
  log_access(status_);
  job_.reset();
  streams_.clear();
  request_ = {};
  if (ctx_.stopping) return close();
  if (!keep_alive_) return linger_close();
  if (watching_) {
    read_next_ = true;
    beast::error_code ec;
    stream_.socket().cancel(ec);
  } else {
    do_read();
  }
}

void Session::watch_disconnect() {
  if (watching_ || closed_) return;
  watching_ = true;
  stream_.async_read_some(buffer_.prepare(4096),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            self->watching_ = false;
                            if (self->closed_) return;
                            if (!ec) self->buffer_.commit(n);
                            if (self->read_next_ && (!ec || ec == net::error::operation_aborted)) {
                              self->read_next_ = false;
                              return self->do_read();
                            }
                            if (ec) return self->client_gone();
                            if (self->job_ && self->buffer_.size() < kMaxPipelinedBytes)
                              self->watch_disconnect();
                          });
}

void Session::client_gone() {
  if (closed_) return;
  if (job_) {
    spdlog::info("http {} {}: client went away; cancelling {} engine request(s)", method_, path_,
                 streams_.size());
    log_access(499);
  }
  cancel_streams();
  close();
}

void Session::cancel_streams() {
  for (const auto& s : streams_) {
    if (!s->finished()) s->cancel();
  }
}

// Closes after the client has stopped sending: a client still sending a body we refused (413)
// would otherwise get a reset instead of our response.
void Session::linger_close() {
  if (closed_) return;
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  stream_.expires_after(kLingerTimeout);
  discard_input();
}

void Session::discard_input() {
  buffer_.consume(buffer_.size());
  stream_.async_read_some(buffer_.prepare(64u << 10),
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            if (ec) return self->close();
                            self->buffer_.commit(n);
                            self->discard_input();
                          });
}

void Session::close() {
  if (closed_) return;
  closed_ = true;
  waker_->kill();
  beast::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
  stream_.close();
}

}  // namespace pmkv::http
