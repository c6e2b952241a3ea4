#pragma once
// Typed, strict access to the fields of a JSON request object. Every getter treats a missing field
// and an explicit null alike (nullopt) and throws ApiException (400, naming the field) when the
// value has the wrong type or is out of range.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "server/http/api_error.h"

namespace pmkv::http {

using Json = nlohmann::json;

// Arrays and objects nested deeper than this are refused. An OpenAI request needs about 4 levels
// (messages[i].content[j].text); JSON schemas (tools, response_format), which pmkv rejects anyway,
// rarely pass 20.
inline constexpr size_t kMaxJsonDepth = 64;

// The body as a JSON object: 400 when it is not valid UTF-8, nests deeper than kMaxJsonDepth, is
// not JSON, or not an object.
Json parse_body(std::string_view body);

// JSON type names as OpenAI's errors spell them ("string", "number", "array", ...).
std::string type_name(const Json& v);

// Rejects the keys of `obj` that are not in `known`, naming all of them. `what` prefixes the
// message for nested objects ("stream_options", "messages[0]").
void reject_unknown_fields(const Json& obj, std::initializer_list<std::string_view> known,
                           std::string_view what = {});

std::optional<bool> get_bool(const Json& obj, std::string_view name);
std::optional<std::string> get_string(const Json& obj, std::string_view name);
std::optional<double> get_number(const Json& obj, std::string_view name);
// An integer (2.0 counts; 2.5 does not) in [min, max].
std::optional<int64_t> get_int(const Json& obj, std::string_view name, int64_t min, int64_t max);
// A string or an array of strings.
std::optional<std::vector<std::string>> get_string_list(const Json& obj, std::string_view name);
std::optional<std::vector<int32_t>> get_int_list(const Json& obj, std::string_view name,
                                                 int64_t min, int64_t max);

// Checks an integer JSON value (used for array elements); `what` names it in the message.
int64_t as_int(const Json& v, std::string_view what, int64_t min, int64_t max);

// Well-formed UTF-8; on failure sets *bad_offset to the offset of the first bad byte.
bool valid_utf8(std::string_view s, size_t* bad_offset = nullptr);

// Serializes with invalid UTF-8 replaced (never throws).
std::string dump(const Json& v);

}  // namespace pmkv::http
