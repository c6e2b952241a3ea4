#include "engine/serving/request_stream.h"

#include <utility>

namespace pmkv {

namespace {

// Appends `from` to `into`: tokens concatenated, the later counters and end win.
void merge(StreamUpdate& into, StreamUpdate&& from) {
  into.tokens.insert(into.tokens.end(), std::make_move_iterator(from.tokens.begin()),
                     std::make_move_iterator(from.tokens.end()));
  into.prompt_tokens = from.prompt_tokens;
  into.completion_tokens = from.completion_tokens;
  if (from.end) {
    into.end = from.end;
    into.finish_reason = from.finish_reason;
    into.error = std::move(from.error);
  }
}

}  // namespace

std::optional<StreamUpdate> RequestStream::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (drained_) return std::nullopt;
  if (!cv_.wait_for(lock, timeout, [&] { return !pending_.empty(); })) return std::nullopt;
  StreamUpdate u = std::move(pending_.front());
  pending_.pop_front();
  if (u.end) drained_ = true;
  return u;
}

std::optional<StreamUpdate> RequestStream::poll() {
  std::lock_guard lock(mu_);
  if (pending_.empty()) return std::nullopt;
  StreamUpdate u = std::move(pending_.front());
  pending_.pop_front();
  while (!pending_.empty()) {
    merge(u, std::move(pending_.front()));
    pending_.pop_front();
  }
  if (u.end) drained_ = true;
  return u;
}

void RequestStream::set_notifier(std::function<void()> notify) {
  std::function<void()> now;
  {
    std::lock_guard lock(mu_);
    notify_ = std::move(notify);
    if (!pending_.empty()) now = notify_;
  }
  // An update pushed before the notifier was set is signalled at once.
  if (now) now();
}

void RequestStream::cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
}

bool RequestStream::cancelled() const {
  std::lock_guard lock(mu_);
  return cancelled_;
}

bool RequestStream::finished() const {
  std::lock_guard lock(mu_);
  return finished_;
}

void RequestStream::push(StreamUpdate update) {
  std::function<void()> notify;
  {
    std::lock_guard lock(mu_);
    if (finished_) return;  // nothing follows the last update
    finished_ = update.end.has_value();
    pending_.push_back(std::move(update));
    notify = notify_;
  }
  cv_.notify_all();
  // Outside the lock: the notifier may call back into this stream (poll(), cancel()).
  if (notify) notify();
}

}  // namespace pmkv
