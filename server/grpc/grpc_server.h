#pragma once
// The gRPC frontend of `pmkv serve`: the pmkv.v1.Pmkv service (proto/pmkv/v1/pmkv.proto) on gRPC's
// synchronous server, plus the standard grpc.health.v1 service. Generate handlers block in
// RequestStream::next() on gRPC's own threads and notice a cancelled call within 50 ms.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace pmkv {

class ServingEngine;

struct GrpcServerOptions {
  std::string host = "0.0.0.0";
  uint16_t port = 50051;               // 0 binds a free port (see port())
  std::optional<std::string> api_key;  // when set, calls need "authorization: Bearer KEY"
  std::string served_model_name;       // for logs; empty: the model directory's name
};

class GrpcServer {
 public:
  // Does not listen yet. The engine must outlive the server.
  GrpcServer(ServingEngine& engine, GrpcServerOptions o);
  ~GrpcServer();  // stop()
  GrpcServer(const GrpcServer&) = delete;
  GrpcServer& operator=(const GrpcServer&) = delete;

  // Binds and starts serving. Throws InvalidArgument when the address cannot be bound.
  void start();
  // The bound port (the real one when the options asked for 0); 0 before start().
  uint16_t port() const;
  // Health turns NOT_SERVING, running calls get up to 2 s and are then cancelled. Idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmkv
