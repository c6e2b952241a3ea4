#pragma once
// Streaming detokenization of one sequence: token ids in, UTF-8 text out, never an incomplete
// character, and exactly the text Tokenizer::decode gives for the whole sequence.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "engine/tokenizer/tokenizer.h"

namespace pmkv {

// The "prefix_offset / read_offset" algorithm of vLLM and Hugging Face's TextStreamer, made exact.
//
// Notation: D = Tokenizer::decode; S = context ++ pushed ids; S[i:j] its slice. A position b of S
// is *stable* when no extension of S[0:b] can change D(S[0:b]): the only way it can change is a run
// of byte pieces at the end of S[0:b] that stops inside a UTF-8 character (<0xE2><0x82> waiting for
// <0xAC>); sentencepiece renders those bytes as U+FFFD now but as "€" once completed.
// At a stable b, D(S) = D(S[0:b]) ++ (the text of S[b:] decoded after S[0:b]), and that text
// depends on S[0:b] only through one flag: whether sentencepiece still means to drop the
// dummy-prefix space of the first word (it stops meaning to once a word has consumed it or any text
// has been produced, and never starts again). Hence for a window start a <= b that is itself stable
// and either is 0 or leaves the flag off when S[a:b] is decoded alone (D(S[a:b]) non-empty, or a
// lone "▁" consumed; the flag is then off for S[0:b] too, as it has text):
//     D(S[a:n]) = D(S[a:b]) ++ X   and   D(S[0:n]) = D(S[0:b]) ++ X   for the same X,
// so X, the new text, is found by decoding only the window S[a:n]. read_offset (b) only moves to
// stable positions; prefix_offset (a) moves to the old read_offset when S[b:n] alone leaves the
// flag off, which keeps the window a few tokens long. Control pieces pushed at a stable position
// are left out of the window: there they change neither the text nor the flag.
//
// Invariant: let r0 be the size of the context, or, when the context ends inside a character
// spelled in byte pieces, the position of that character's first byte (r0 = 0 without context).
// At every moment, the concatenation E of all push() results is
//     E = D(S[0:b]).substr(D(S[0:r0]).size())
// for the current read offset b (so E is never retracted: it is a prefix of the final text), and
// after flush()
//     E = D(S).substr(D(S[0:r0]).size()),
// which without context is simply D(pushed ids). Every push()/flush() result is valid UTF-8 (a cut
// at a stable position is a character boundary of sentencepiece's output).
class IncrementalDetokenizer {
 public:
  // `tokenizer` must outlive this object. `context` (usually the prompt ids) only decides how the
  // first generated tokens are spaced, as in D(prompt ++ generated): with the prompt as context a
  // first token "▁time" yields " time"; without context it yields "time", as D(generated) does.
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer,
                                  std::span<const int32_t> context = {});

  // Adds one generated id and returns the text it completes (possibly empty). Throws
  // InvalidArgument when id is outside the vocabulary (nothing is added then), std::logic_error
  // after flush().
  std::string push(int32_t id);

  // Ends the stream: returns the text still held back (an unfinished byte run becomes one U+FFFD
  // per byte, as in D(S)). Later calls return "" and push() throws.
  std::string flush();

  // Number of ids pushed so far.
  size_t size() const { return pushed_; }
  // Ids kept for decoding: a few (at most the ids since the last emitted text, plus up to 3 bytes
  // of an unfinished character), whatever the length of the sequence.
  size_t window_size() const { return window_.size(); }

 private:
  bool tail_incomplete() const;
  std::string take_new_text(const std::string& window_text) const;

  const Tokenizer* tokenizer_;
  std::optional<int32_t> lone_space_;  // the piece "▁", if the vocabulary has it
  std::vector<int32_t> window_;        // S[prefix_offset:], the ids before it are dropped
  size_t read_ = 0;                    // read_offset - prefix_offset
  std::string prefix_text_;            // D(S[prefix_offset:read_offset])
  size_t pushed_ = 0;
  bool flushed_ = false;
};

}  // namespace pmkv
