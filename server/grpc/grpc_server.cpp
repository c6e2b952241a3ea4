#include "server/grpc/grpc_server.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>

#include "engine/common/error.h"
#include "engine/serving/serving_engine.h"
#include "pmkv/v1/pmkv.grpc.pb.h"
#include "server/grpc/grpc_convert.h"

namespace pmkv {
namespace {

using ::grpc::ServerContext;
using ::grpc::Status;
using ::grpc::StatusCode;

constexpr auto kPollInterval = std::chrono::milliseconds(50);
constexpr const char* kServiceName = "pmkv.v1.Pmkv";

class PmkvService final : public v1::Pmkv::Service {
 public:
  PmkvService(ServingEngine& engine, GrpcServerOptions options)
      : engine_(engine), options_(std::move(options)), chat_(engine.tokenizer()) {
    model_.tokenizer = engine.tokenizer();
    model_.chat = &chat_;
    model_.vocab_size = static_cast<int32_t>(engine.model_config().vocab_size);
    model_.max_model_len = engine.max_model_len();
    model_.num_layers = static_cast<int32_t>(engine.model_config().num_layers);
  }

  Status Generate(ServerContext* ctx, const v1::GenerateRequest* req,
                  ::grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (Status s = check_auth(ctx); !s.ok()) return s;
    if (!engine_.accepting()) return unavailable();
    std::shared_ptr<RequestStream> stream;
    try {
      EngineRequest e = rpc::to_engine_request(*req, model_);
      if (e.request_id.empty()) e.request_id = "grpc-" + std::to_string(++next_id_);
      if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
        e.deadline =
            std::chrono::steady_clock::now() + (ctx->deadline() - std::chrono::system_clock::now());
      }
      stream = engine_.submit(std::move(e));
    } catch (const Unavailable& e) {
      return Status(StatusCode::UNAVAILABLE, e.what());
    } catch (const InvalidArgument& e) {
      if (!engine_.accepting()) return unavailable();
      return Status(StatusCode::INVALID_ARGUMENT, e.what());
    }
    return pump(ctx, *stream, writer);
  }

  Status Tokenize(ServerContext* ctx, const v1::TokenizeRequest* req,
                  v1::TokenizeResponse* out) override {
    if (Status s = check_auth(ctx); !s.ok()) return s;
    try {
      for (int32_t id : rpc::tokenize(*req, model_)) {
        out->add_ids(id);
        out->add_pieces(model_.tokenizer->piece(id));
      }
    } catch (const InvalidArgument& e) {
      return Status(StatusCode::INVALID_ARGUMENT, e.what());
    }
    out->set_max_model_len(model_.max_model_len);
    return Status::OK;
  }

  Status GetKvStats(ServerContext* ctx, const v1::GetKvStatsRequest*, v1::KvStats* out) override {
    if (Status s = check_auth(ctx); !s.ok()) return s;
    rpc::fill_kv_stats(engine_.stats(), out);
    return Status::OK;
  }

  Status UpdateBudgets(ServerContext* ctx, const v1::UpdateBudgetsRequest* req,
                       v1::UpdateBudgetsResponse* out) override {
    if (Status s = check_auth(ctx); !s.ok()) return s;
    try {
      std::vector<int64_t> budgets = rpc::budgets_of(*req, model_);
      for (int64_t b : budgets)
        out->add_per_layer_bytes(b);
      out->set_budget_chain_tokens(engine_.update_budgets(std::move(budgets)));
    } catch (const InvalidArgument& e) {
      return Status(StatusCode::INVALID_ARGUMENT, e.what());
    }
    spdlog::info("grpc: KV budgets updated ({} layers)", out->per_layer_bytes_size());
    return Status::OK;
  }

 private:
  Status check_auth(ServerContext* ctx) const {
    if (!options_.api_key) return Status::OK;
    const auto& md = ctx->client_metadata();
    const auto it = md.find("authorization");
    const std::string expected = "Bearer " + *options_.api_key;
    if (it != md.end() && std::string_view(it->second.data(), it->second.size()) == expected) {
      return Status::OK;
    }
    return Status(StatusCode::UNAUTHENTICATED,
                  "missing or incorrect API key: send metadata \"authorization: Bearer KEY\"");
  }

  static Status unavailable() {
    return Status(StatusCode::UNAVAILABLE, "the server is shutting down");
  }

  // Forwards the stream's updates until it ends or the call is cancelled.
  static Status pump(ServerContext* ctx, RequestStream& stream,
                     ::grpc::ServerWriter<v1::GenerateResponse>* writer) {
    for (;;) {
      if (ctx->IsCancelled()) {
        stream.cancel();
        return Status(StatusCode::CANCELLED, "the client cancelled the call");
      }
      const std::optional<StreamUpdate> u = stream.next(kPollInterval);
      if (!u) continue;
      const bool finished = u->end == StreamEnd::kFinished;
      if ((!u->tokens.empty() || finished) && !writer->Write(rpc::to_response(*u))) {
        stream.cancel();
        return Status(StatusCode::CANCELLED, "the client went away");
      }
      if (!u->end) continue;
      switch (*u->end) {
        case StreamEnd::kFinished:
          return Status::OK;
        case StreamEnd::kCancelled:
          return ctx->IsCancelled()
                     ? Status(StatusCode::CANCELLED, "the client cancelled the call")
                     : Status(StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
        case StreamEnd::kRejected:
          return Status(StatusCode::RESOURCE_EXHAUSTED, u->error);
        case StreamEnd::kShutdown:
          return Status(StatusCode::UNAVAILABLE, u->error.empty() ? "shutting down" : u->error);
        case StreamEnd::kError:
          return Status(StatusCode::INTERNAL, u->error);
      }
    }
  }

  ServingEngine& engine_;
  GrpcServerOptions options_;
  chat::ChatPrompt chat_;
  rpc::ModelFacts model_;
  std::atomic<uint64_t> next_id_{0};
};

}  // namespace

struct GrpcServer::Impl {
  Impl(ServingEngine& engine, GrpcServerOptions o) : options(o), service(engine, std::move(o)) {}
  GrpcServerOptions options;
  PmkvService service;
  std::unique_ptr<::grpc::Server> server;
  int port = 0;
  bool stopped = false;
};

GrpcServer::GrpcServer(ServingEngine& engine, GrpcServerOptions o)
    : impl_(std::make_unique<Impl>(engine, std::move(o))) {}

GrpcServer::~GrpcServer() {
  stop();
}

void GrpcServer::start() {
  Impl& m = *impl_;
  if (m.server) return;
  ::grpc::EnableDefaultHealthCheckService(true);
  ::grpc::ServerBuilder builder;
  const std::string address = m.options.host + ":" + std::to_string(m.options.port);
  builder.AddListeningPort(address, ::grpc::InsecureServerCredentials(), &m.port);
  builder.RegisterService(&m.service);
  m.server = builder.BuildAndStart();
  if (!m.server || m.port == 0) {
    m.server.reset();
    throw InvalidArgument("cannot listen for gRPC on " + address);
  }
  auto* health = m.server->GetHealthCheckService();
  health->SetServingStatus(true);
  health->SetServingStatus(kServiceName, true);
}

uint16_t GrpcServer::port() const {
  return static_cast<uint16_t>(impl_->port);
}

void GrpcServer::stop() {
  Impl& m = *impl_;
  if (!m.server || m.stopped) return;
  m.stopped = true;
  m.server->GetHealthCheckService()->SetServingStatus(false);
  m.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  m.server->Wait();
}

}  // namespace pmkv
