#include "engine/tokenizer/detokenizer.h"

#include <optional>
#include <stdexcept>

#include "engine/common/error.h"

namespace pmkv {
namespace {

// When ids[from:] ends with byte pieces that stop inside a UTF-8 character (a lead byte followed
// by fewer continuation bytes than it announces), the index of that lead byte. This is the only
// case in which a later id can change the text of ids (see the invariant in the header). The test
// is deliberately conservative for lead bytes sentencepiece would reject anyway (0xC0, 0xC1,
// 0xF5..0xF7): holding those back until the next id only delays them.
std::optional<size_t> incomplete_char_start(const Tokenizer& tok, std::span<const int32_t> ids,
                                            size_t from) {
  const size_t n = ids.size();
  size_t continuation = 0;
  // A UTF-8 character has at most 3 continuation bytes, so 3 trailing bytes decide.
  for (size_t i = n; i > from && n - i < 3; --i) {
    const std::optional<uint8_t> b = tok.byte_value(ids[i - 1]);
    if (!b) return std::nullopt;  // a piece that is not a byte ends the run: nothing pending
    if ((*b & 0xC0) == 0x80) {
      ++continuation;
      continue;
    }
    size_t need = 1;
    if (*b >= 0xC0 && *b < 0xE0) need = 2;
    if (*b >= 0xE0 && *b < 0xF0) need = 3;
    if (*b >= 0xF0 && *b < 0xF8) need = 4;
    if (continuation + 1 < need) return i - 1;
    return std::nullopt;
  }
  return std::nullopt;
}

void check_id(const Tokenizer& tok, int32_t id) {
  if (id < 0 || id >= tok.vocab_size()) {
    throw InvalidArgument("IncrementalDetokenizer: token id " + std::to_string(id) +
                          " is outside the vocabulary [0, " + std::to_string(tok.vocab_size()) +
                          ")");
  }
}

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               std::span<const int32_t> context)
    : tokenizer_(&tokenizer), lone_space_(tokenizer.piece_to_id("\u2581" /* "▁" */)) {
  for (int32_t id : context) {
    check_id(tokenizer, id);
  }
  const size_t n = context.size();
  const size_t r0 = incomplete_char_start(tokenizer, context, 0).value_or(n);
  // The largest stable window start a < r0 with D(context[a:r0]) non-empty, else 0. Stable
  // candidates: the start of any piece that is not a byte, and the first byte of a run of bytes
  // (a run always decodes to at least one character).
  size_t a = 0;
  for (size_t p = r0; p-- > 0;) {
    const bool is_byte = tokenizer.is_byte_piece(context[p]);
    const bool run_start = p == 0 || !tokenizer.is_byte_piece(context[p - 1]);
    if (is_byte && run_start) {
      a = p;
      break;
    }
    if (!is_byte && !tokenizer.decode(context.subspan(p, 1)).empty()) {
      a = p;
      break;
    }
  }
  window_.assign(context.begin() + static_cast<std::ptrdiff_t>(a), context.end());
  read_ = r0 - a;
  prefix_text_ = tokenizer.decode(std::span<const int32_t>(window_).first(read_));
}

std::string IncrementalDetokenizer::take_new_text(const std::string& window_text) const {
  if (!window_text.starts_with(prefix_text_)) {
    // Impossible for a sentencepiece model without a denormalizer (see the header); a model whose
    // decode rewrites earlier text would land here.
    throw std::logic_error(
        "IncrementalDetokenizer: decoding more tokens changed earlier text; the tokenizer's "
        "decode is not incremental");
  }
  return window_text.substr(prefix_text_.size());
}

std::string IncrementalDetokenizer::push(int32_t id) {
  if (flushed_) throw std::logic_error("IncrementalDetokenizer::push after flush()");
  check_id(*tokenizer_, id);
  ++pushed_;
  // A control piece (<s>, </s>) outside a byte run is transparent to sentencepiece's decode: no
  // text, and it settles the first-word-space flag exactly as the next piece would. Leaving it out
  // of the window keeps the window short when a model emits many of them (ignore_eos runs).
  // Inside a byte run it is not transparent (it cuts the run), so then it goes in.
  if (read_ == window_.size() && tokenizer_->is_control(id)) return {};
  window_.push_back(id);
  if (incomplete_char_start(*tokenizer_, window_, read_)) return {};

  std::string window_text = tokenizer_->decode(window_);
  std::string out = take_new_text(window_text);
  prefix_text_ = std::move(window_text);
  if (!out.empty()) {
    // Slide the window start to the old read offset when the window from there leaves the
    // first-word-space flag off: it has text of its own, or it consumed the space without any (a
    // lone "▁"; probing with one more "▁", which keeps its space exactly when the flag is off).
    // When out is empty there is nothing to slide past.
    const std::span<const int32_t> rest = std::span<const int32_t>(window_).subspan(read_);
    std::string rest_text = tokenizer_->decode(rest);
    bool slide = !rest_text.empty();
    if (!slide && lone_space_) {
      std::vector<int32_t> probe(rest.begin(), rest.end());
      probe.push_back(*lone_space_);
      slide = !tokenizer_->decode(probe).empty();
    }
    if (slide) {
      window_.erase(window_.begin(), window_.begin() + static_cast<std::ptrdiff_t>(read_));
      prefix_text_ = std::move(rest_text);
    }
  }
  read_ = window_.size();
  return out;
}

std::string IncrementalDetokenizer::flush() {
  if (flushed_) return {};
  flushed_ = true;
  if (read_ == window_.size()) return {};
  std::string out = take_new_text(tokenizer_->decode(window_));
  read_ = window_.size();
  return out;
}

}  // namespace pmkv
