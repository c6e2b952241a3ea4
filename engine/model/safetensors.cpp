#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "engine/common/error.h"

namespace pmkv {

// dtype_name / dtype_size are declared in weight_store.h; they live here so that the parser
// library (pmkv_safetensors_parser, used by the fuzzer) is self-contained.
const char* dtype_name(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

bool parse_safetensors_dtype(std::string_view s, DType* out) {
  if (s == "F32") {
    *out = DType::kF32;
  } else if (s == "F16") {
    *out = DType::kF16;
  } else if (s == "BF16") {
    *out = DType::kBF16;
  } else {
    return false;
  }
  return true;
}

namespace {

using json = nlohmann::json;

// Limits on the JSON structure. A valid header is an object of objects whose members are at most
// arrays of numbers: three levels. Anything deeper or wider is rejected while parsing, so memory
// stays proportional to the header size and no pathological input builds a huge DOM.
constexpr size_t kMaxDepth = 3;
constexpr size_t kMaxArrayLength = 64;  // shape rank / data_offsets; real tensors have rank <= 8
constexpr size_t kMaxNameInMessage = 200;

// A name (tensor, key, dtype) quoted for an error message: truncated, control bytes escaped.
std::string q_name(std::string_view s) {
  std::string out = "'";
  size_t n = std::min(s.size(), kMaxNameInMessage);
  for (size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      static const char* kHex = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > n) out += "...";
  out += "'";
  return out;
}

[[noreturn]] void fail(const std::string& file, const std::string& what) {
  throw LoadError("invalid safetensors file " + file + ": " + what);
}

// Strict UTF-8 validation (no overlong forms, no surrogates, nothing above U+10FFFF).
// Returns the offset of the first invalid byte, or npos.
size_t first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (n - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      unsigned char cc = p[i + k];
      if ((cc & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// SAX handler that builds a nlohmann DOM while enforcing the limits above and rejecting
// duplicate keys (nlohmann's own DOM parser silently keeps one of them).
class HeaderSax {
 public:
  explicit HeaderSax(const std::string& file) : file_(file) {}

  json& root() { return root_; }

  bool null() { return add(json(nullptr)); }
  bool boolean(bool v) { return add(json(v)); }
  bool number_integer(json::number_integer_t v) { return add(json(v)); }
  bool number_unsigned(json::number_unsigned_t v) { return add(json(v)); }
  bool number_float(json::number_float_t v, const json::string_t&) { return add(json(v)); }
  bool string(json::string_t& v) { return add(json(std::move(v))); }
  bool binary(json::binary_t&) { fail(file_, "binary value in JSON header"); }

  bool start_object(std::size_t) { return open(json::object()); }
  bool start_array(std::size_t) { return open(json::array()); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& k) {
    json& obj = *stack_.back();
    if (obj.contains(k)) {
      std::string what = stack_.size() == 1 ? "tensor name " : "key ";
      fail(file_, "duplicate " + what + q_name(k) + " in JSON header" + where());
    }
    path_.resize(stack_.size());
    path_.back() = k;
    slot_ = &obj[k];
    return true;
  }

  template <class Exception>
  bool parse_error(std::size_t position, const std::string&, const Exception& ex) {
    fail(file_, "header is not valid JSON (near byte " + std::to_string(position) +
                    " of the header): " + ex.what());
  }

 private:
  // " (in 'tensor' / 'key')" for the containers open below the root, "" at the root.
  std::string where() const {
    std::string out;
    for (size_t i = 0; i + 1 < stack_.size() && i < path_.size(); ++i) {
      out += out.empty() ? " (in " : " / ";
      out += q_name(path_[i]);
    }
    return out.empty() ? out : out + ")";
  }

  bool add(json&& v) {
    place(std::move(v));
    return true;
  }

  json* place(json&& v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& top = *stack_.back();
    if (top.is_array()) {
      if (top.size() >= kMaxArrayLength) {
        fail(file_,
             "JSON array longer than " + std::to_string(kMaxArrayLength) + " elements" + where());
      }
      top.push_back(std::move(v));
      return &top.back();
    }
    *slot_ = std::move(v);
    return slot_;
  }

  bool open(json&& container) {
    if (stack_.size() >= kMaxDepth) {
      fail(file_,
           "JSON header nested deeper than " + std::to_string(kMaxDepth) + " levels" + where());
    }
    stack_.push_back(place(std::move(container)));
    return true;
  }

  bool close() {
    stack_.pop_back();
    return true;
  }

  const std::string& file_;
  json root_;
  std::vector<json*> stack_;
  std::vector<std::string> path_;  // path_[i]: the last key read in the object at depth i
  json* slot_ = nullptr;
};

// A non-negative JSON integer, or false.
bool as_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = static_cast<uint64_t>(i);
    return true;
  }
  return false;
}

SafetensorsTensor parse_entry(const std::string& name, const json& entry, const std::string& file,
                              uint64_t data_size) {
  const std::string tensor = "tensor " + q_name(name);
  if (!entry.is_object()) fail(file, tensor + ": entry is not a JSON object");
  auto get = [&](const char* key) -> const json& {
    auto it = entry.find(key);
    if (it == entry.end()) fail(file, tensor + ": missing \"" + key + "\"");
    return *it;
  };
  const json& jdtype = get("dtype");
  const json& jshape = get("shape");
  const json& joffsets = get("data_offsets");

  SafetensorsTensor t;
  t.name = name;
  if (!jdtype.is_string()) fail(file, tensor + ": \"dtype\" is not a string");
  const std::string& dtype = jdtype.get_ref<const std::string&>();
  if (!parse_safetensors_dtype(dtype, &t.dtype)) {
    throw LoadError("unsupported dtype " + q_name(dtype) + " for tensor " + q_name(name) + " in " +
                    file + " (supported: BF16, F16, F32)");
  }

  if (!jshape.is_array()) fail(file, tensor + ": \"shape\" is not an array");
  uint64_t numel = 1;
  bool overflow = false;
  for (const json& d : jshape) {
    uint64_t dim;
    if (!as_u64(d, &dim) || dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail(file,
           tensor + ": \"shape\" has a dimension that is not a non-negative integer: " + d.dump());
    }
    t.shape.push_back(static_cast<int64_t>(dim));
    if (__builtin_mul_overflow(numel, dim, &numel)) overflow = true;
  }
  uint64_t nbytes = 0;
  if (overflow ||
      __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes)) {
    // A zero dimension makes the tensor empty however large the others are.
    bool has_zero = std::any_of(t.shape.begin(), t.shape.end(), [](int64_t d) { return d == 0; });
    if (!has_zero) fail(file, tensor + ": byte size of shape " + jshape.dump() + " overflows");
    nbytes = 0;
  }

  if (!joffsets.is_array() || joffsets.size() != 2) {
    fail(file, tensor + ": \"data_offsets\" is not an array of two integers");
  }
  if (!as_u64(joffsets[0], &t.begin) || !as_u64(joffsets[1], &t.end)) {
    fail(file, tensor + ": \"data_offsets\" " + joffsets.dump() + " are not non-negative integers");
  }
  if (t.begin > t.end) {
    fail(file, tensor + ": data_offsets begin " + std::to_string(t.begin) + " > end " +
                   std::to_string(t.end));
  }
  if (t.end > data_size) {
    fail(file, tensor + ": data_offsets end " + std::to_string(t.end) +
                   " is past the end of the data buffer (" + std::to_string(data_size) + " bytes)");
  }
  if (t.end - t.begin != nbytes) {
    fail(file, tensor + ": data_offsets cover " + std::to_string(t.end - t.begin) +
                   " bytes but shape " + jshape.dump() + " of " + dtype_name(t.dtype) + " needs " +
                   std::to_string(nbytes));
  }
  return t;
}

}  // namespace

SafetensorsHeader parse_safetensors(std::span<const std::byte> file, const std::string& file_name) {
  if (file.size() < 8) {
    fail(file_name, "file is " + std::to_string(file.size()) +
                        " bytes, shorter than the 8-byte header length");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i)
    n = (n << 8) | static_cast<uint64_t>(file[i]);
  if (n > kSafetensorsMaxHeaderBytes) {
    fail(file_name, "header length " + std::to_string(n) + " exceeds the limit of " +
                        std::to_string(kSafetensorsMaxHeaderBytes) + " bytes");
  }
  if (n > file.size() - 8) {
    fail(file_name, "header length " + std::to_string(n) + " is past the end of the file (" +
                        std::to_string(file.size()) + " bytes)");
  }
  std::string_view text(reinterpret_cast<const char*>(file.data() + 8), n);
  if (size_t bad = first_invalid_utf8(text); bad != std::string_view::npos) {
    fail(file_name, "header is not valid UTF-8 (byte " + std::to_string(bad) + " of the header)");
  }
  // nlohmann's lexer takes a NUL byte for the end of input, which would let anything follow it.
  if (size_t nul = text.find('\0'); nul != std::string_view::npos) {
    fail(file_name,
         "header is not valid JSON (NUL byte at byte " + std::to_string(nul) + " of the header)");
  }
  HeaderSax sax(file_name);
  json::sax_parse(text.data(), text.data() + text.size(), &sax);
  const json& root = sax.root();
  if (!root.is_object()) fail(file_name, "header is not a JSON object");

  SafetensorsHeader h;
  h.data_start = 8 + n;
  const uint64_t data_size = file.size() - h.data_start;
  h.tensors.reserve(root.size());
  for (const auto& [name, value] : root.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(file_name, "\"__metadata__\" is not a JSON object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          fail(file_name, "\"__metadata__\" value of key " + q_name(k) + " is not a string");
        }
        h.metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(name, value, file_name, data_size));
  }
  // nlohmann objects iterate in key order, so h.tensors is sorted by name already.

  std::vector<const SafetensorsTensor*> by_offset;
  by_offset.reserve(h.tensors.size());
  for (const auto& t : h.tensors) {
    if (t.begin != t.end) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto* prev = by_offset[i - 1];
    const auto* cur = by_offset[i];
    if (cur->begin < prev->end) {
      fail(file_name, "tensor " + q_name(cur->name) + " bytes [" + std::to_string(cur->begin) +
                          ", " + std::to_string(cur->end) + ") overlap tensor " +
                          q_name(prev->name) + " bytes [" + std::to_string(prev->begin) + ", " +
                          std::to_string(prev->end) + ")");
    }
  }
  return h;
}

// ---- SafetensorsFile --------------------------------------------------------------------------

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  const std::string name = path.string();
  int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw LoadError("cannot open safetensors file " + name + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw LoadError("cannot stat safetensors file " + name + ": " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw LoadError("safetensors file " + name + " is not a regular file");
  }
  SafetensorsFile f;
  f.path_ = path;
  f.size_ = static_cast<size_t>(st.st_size);
  if (f.size_ > 0) {
    void* p = ::mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw LoadError("cannot mmap safetensors file " + name + ": " + std::strerror(e));
    }
    f.map_ = p;
  }
  ::close(fd);                                     // the mapping stays valid
  f.header_ = parse_safetensors(f.bytes(), name);  // on throw, ~SafetensorsFile unmaps
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(std::exchange(other.map_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      header_(std::move(other.header_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    size_ = std::exchange(other.size_, 0);
    header_ = std::move(other.header_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  release();
}

void SafetensorsFile::release() noexcept {
  if (map_ != nullptr) ::munmap(map_, size_);
  map_ = nullptr;
  size_ = 0;
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  const auto& ts = header_.tensors;
  auto it =
      std::lower_bound(ts.begin(), ts.end(), name,
                       [](const SafetensorsTensor& t, std::string_view n) { return t.name < n; });
  return it != ts.end() && it->name == name ? &*it : nullptr;
}

std::span<const std::byte> SafetensorsFile::data(const SafetensorsTensor& t) const {
  return bytes().subspan(header_.data_start + t.begin, t.end - t.begin);
}

}  // namespace pmkv
