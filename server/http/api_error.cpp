#include "server/http/api_error.h"

#include "server/http/json_fields.h"

namespace pmkv::http {

std::string error_body(const ApiError& e) {
  return dump({{"error",
                {{"message", e.message},
                 {"type", e.type},
                 {"param", e.param ? Json(*e.param) : Json(nullptr)},
                 {"code", e.code ? Json(*e.code) : Json(nullptr)}}}});
}

}  // namespace pmkv::http
