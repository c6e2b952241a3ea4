#pragma once
// RequestStream: the channel between the engine thread (producer) and a frontend (consumer) for
// one request. Thread-safe. The engine appends updates; the consumer either blocks in next() (gRPC
// handler threads, tests) or registers a notifier that the engine calls (on the engine thread, so
// it must only schedule work, e.g. asio::post) whenever something new is pending, then drains
// with poll().
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>

#include "engine/serving/request.h"

namespace pmkv {

class RequestStream {
 public:
  // Consumer side -------------------------------------------------------------------------------
  // Blocks until an update is available or `timeout` passes; nullopt on timeout. After the last
  // update (end set) has been returned, returns nullopt immediately.
  std::optional<StreamUpdate> next(std::chrono::milliseconds timeout);
  // Everything pending, merged into one update (tokens concatenated, end copied); nullopt when
  // nothing is pending.
  std::optional<StreamUpdate> poll();
  // Called (on the engine thread) after each push; set it before the first update can arrive or
  // right after submit (a push that happened before is signalled at once).
  void set_notifier(std::function<void()> notify);
  // Asks the engine to stop this request; its pages are freed at the next step, and a final
  // update with end = kCancelled follows.
  void cancel();
  bool cancelled() const;
  bool finished() const;  // the last update has been pushed

  // Engine side ---------------------------------------------------------------------------------
  void push(StreamUpdate update);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<StreamUpdate> pending_;
  std::function<void()> notify_;
  bool cancelled_ = false;
  bool finished_ = false;  // an update with `end` was pushed
  bool drained_ = false;   // ... and returned to the consumer
};

}  // namespace pmkv
