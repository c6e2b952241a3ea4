#pragma once
// OpenAI-style errors: every failed HTTP request answers with a status and
// {"error": {"message", "type", "param", "code"}}.
#include <optional>
#include <stdexcept>
#include <string>

namespace pmkv::http {

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::optional<std::string> param;
  std::optional<std::string> code;
};

// Thrown by request parsing; the session turns it into an error response.
class ApiException : public std::runtime_error {
 public:
  explicit ApiException(ApiError e) : std::runtime_error(e.message), error_(std::move(e)) {}
  const ApiError& error() const { return error_; }

 private:
  ApiError error_;
};

inline ApiException bad_request(std::string message, std::optional<std::string> param = {}) {
  return ApiException(ApiError{.status = 400, .message = std::move(message), .param = param});
}

// The JSON body of an error response.
std::string error_body(const ApiError& e);

}  // namespace pmkv::http
