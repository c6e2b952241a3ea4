// The small GET endpoints of a Session: /health, /metrics, /v1/models.
#include "server/http/http_session.h"
#include "server/http/json_fields.h"
#include "server/http/metrics_text.h"

namespace pmkv::http {

void Session::send_health() {
  if (shutting_down()) return send_unavailable();
  send({.body = R"({"status":"ok"})"});
}

void Session::send_metrics() {
  const HttpCounters counters{.requests_total = ctx_.requests_total,
                              .errors_total = ctx_.errors_total,
                              .open_connections = ctx_.open_connections};
  send({.content_type = "text/plain; version=0.0.4; charset=utf-8",
        .body = format_metrics(ctx_.engine.stats(), counters)});
}

void Session::send_models(const std::string& target) {
  const Json model = {
      {"id", ctx_.model.served_name},     {"object", "model"},
      {"created", ctx_.created},          {"owned_by", "pmkv"},
      {"root", ctx_.engine.model_name()}, {"max_model_len", ctx_.model.max_model_len}};
  if (target == "/v1/models") {
    return send({.body = dump({{"object", "list"}, {"data", Json::array({model})}})});
  }
  const std::string id = target.substr(std::string_view("/v1/models/").size());
  if (id != ctx_.model.served_name) {
    return send_error({.status = 404,
                       .message = "The model `" + id + "` does not exist",
                       .param = "model",
                       .code = "model_not_found"});
  }
  send({.body = dump(model)});
}

}  // namespace pmkv::http
