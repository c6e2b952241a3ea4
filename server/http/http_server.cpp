#include "server/http/http_server.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

#include "engine/common/error.h"
#include "server/http/http_session.h"

namespace pmkv {
namespace {

using http::net::ip::tcp;
namespace net = http::net;

// Many open streams need many descriptors: lift the soft limit to the hard one.
void raise_fd_limit() {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur >= lim.rlim_max) return;
  lim.rlim_cur = lim.rlim_max;
  setrlimit(RLIMIT_NOFILE, &lim);
}

tcp::endpoint resolve(net::io_context& ioc, const std::string& host, uint16_t port) {
  boost::system::error_code ec;
  const auto addr = net::ip::make_address(host, ec);
  if (!ec) return {addr, port};
  tcp::resolver resolver(ioc);
  const auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty()) {
    throw InvalidArgument("cannot resolve HTTP host '" + host + "': " + ec.message());
  }
  return results.begin()->endpoint();
}

}  // namespace

namespace http {

ServerContext::ServerContext(ServingEngine& e, HttpServerOptions o)
    : engine(e), options(std::move(o)), chat(e.tokenizer()) {
  model.tokenizer = e.tokenizer();
  model.chat = &chat;
  model.served_name =
      options.served_model_name.empty() ? e.model_name() : options.served_model_name;
  model.alt_name = e.model_name();
  model.vocab_size = static_cast<int32_t>(e.model_config().vocab_size);
  model.max_model_len = e.max_model_len();
  model.max_n = options.max_n;
  id_salt = std::random_device{}() * 0x100000001ull ^ std::random_device{}();
  created = std::chrono::duration_cast<std::chrono::seconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
}

std::vector<std::shared_ptr<Session>> ServerContext::live_sessions() {
  std::lock_guard lock(sessions_mu);
  std::vector<std::shared_ptr<Session>> out;
  for (auto& [ptr, weak] : sessions) {
    if (auto s = weak.lock()) out.push_back(std::move(s));
  }
  return out;
}

}  // namespace http

struct HttpServer::Impl {
  Impl(ServingEngine& engine, HttpServerOptions o)
      : ctx(engine, std::move(o)), parse_pool(std::max(1, ctx.options.io_threads)) {
    ctx.parse_pool = &parse_pool;
  }

  void accept() {
    acceptor.async_accept(net::make_strand(ioc),
                          [this](boost::system::error_code ec, tcp::socket socket) {
                            if (ctx.stopping) return;
                            if (ec) {
                              // Out of descriptors or similar: back off instead of spinning.
                              report_accept_failure(ec);
                              retry.expires_after(std::chrono::milliseconds(50));
                              retry.async_wait([this](boost::system::error_code) {
                                if (!ctx.stopping) accept();
                              });
                              return;
                            }
                            boost::system::error_code nodelay_ec;
                            socket.set_option(tcp::no_delay(true), nodelay_ec);
                            std::make_shared<http::Session>(std::move(socket), ctx)->run();
                            accept();
                          });
  }

  // The first failure, then at most one line every kAcceptReportInterval with the count since:
  // out of descriptors, accept fails at every 50 ms retry. One accept is outstanding at a time,
  // so its handlers never run concurrently.
  void report_accept_failure(const boost::system::error_code& ec) {
    const auto now = std::chrono::steady_clock::now();
    ++accept_failures;
    if (accept_reported && now - last_accept_report < kAcceptReportInterval) return;
    spdlog::warn("http: accept failed: {} ({} time(s) since the last report; retrying every 50 ms)",
                 ec.message(), accept_failures);
    accept_failures = 0;
    accept_reported = true;
    last_accept_report = now;
  }
  static constexpr auto kAcceptReportInterval = std::chrono::seconds(10);
  int64_t accept_failures = 0;
  bool accept_reported = false;
  std::chrono::steady_clock::time_point last_accept_report{};

  // ctx outlives ioc: handlers destroyed with ioc still reach ctx through their sessions.
  http::ServerContext ctx;
  net::io_context ioc;
  tcp::acceptor acceptor{ioc};
  net::steady_timer retry{ioc};
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  std::vector<std::thread> threads;
  // Parses and tokenizes request bodies (Session::start_generation). Declared after ioc, so it is
  // destroyed first: a parse job it never ran still holds its session, whose socket needs ioc.
  net::thread_pool parse_pool;
  uint16_t port = 0;
  bool started = false;
  bool stopped = false;
};

HttpServer::HttpServer(ServingEngine& engine, HttpServerOptions o)
    : impl_(std::make_unique<Impl>(engine, std::move(o))) {}

HttpServer::~HttpServer() {
  stop();
}

void HttpServer::start() {
  Impl& m = *impl_;
  if (m.started) return;
  raise_fd_limit();
  const HttpServerOptions& o = m.ctx.options;
  const tcp::endpoint ep = resolve(m.ioc, o.host, o.port);
  boost::system::error_code ec;
  m.acceptor.open(ep.protocol(), ec);
  if (!ec) m.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) m.acceptor.bind(ep, ec);
  if (!ec) m.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    throw InvalidArgument("cannot listen for HTTP on " + o.host + ":" + std::to_string(o.port) +
                          ": " + ec.message());
  }
  m.port = m.acceptor.local_endpoint().port();
  if (!m.ctx.chat.available())
    spdlog::info("http: chat disabled: {}", m.ctx.chat.unavailable_reason());
  m.started = true;
  m.work.emplace(m.ioc.get_executor());
  m.accept();
  const int n = std::max(1, o.io_threads);
  for (int i = 0; i < n; ++i)
    m.threads.emplace_back([&m] { m.ioc.run(); });
}

uint16_t HttpServer::port() const {
  return impl_->port;
}

void HttpServer::stop() {
  Impl& m = *impl_;
  if (!m.started || m.stopped) return;
  m.stopped = true;
  m.ctx.stopping = true;
  net::post(m.ioc, [&m] {
    boost::system::error_code ec;
    m.acceptor.close(ec);
    m.retry.cancel();
  });
  for (const auto& s : m.ctx.live_sessions())
    s->shutdown();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (m.ctx.open_connections > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (const auto& s : m.ctx.live_sessions())
    s->kill_waker();
  // Parse jobs still running post their results to the sessions' strands, which must run them.
  m.parse_pool.join();
  m.work.reset();
  m.ioc.stop();
  for (std::thread& t : m.threads)
    t.join();
  m.threads.clear();
}

}  // namespace pmkv
