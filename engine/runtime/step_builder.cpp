#include "engine/runtime/step_builder.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace pmkv {

namespace {

// Copies the attention tables of `chunks` into `b`.
void copy_page_tables(const kv::KvCacheManager& kv, std::span<const SeqChunk> chunks,
                      StepBatch& b) {
  const int32_t num_seqs = static_cast<int32_t>(chunks.size());
  const int32_t num_tables = kv.num_layers() * num_seqs;
  // The tables' places first (lookups, prefix sums), then the copies: ~10^6 page references at
  // long contexts and large batches, copied on several threads then (the lookups are const).
  // Kept across steps. The parallel copy below must see this thread's vector: bind a reference
  // (a thread_local named inside the OpenMP region would be each worker's own, empty one).
  thread_local std::vector<std::span<const kv::PageRef>> tables_storage;
  std::vector<std::span<const kv::PageRef>>& tables = tables_storage;
  tables.resize(static_cast<size_t>(num_tables));
  b.page_starts.resize(static_cast<size_t>(num_tables) + 1);
  b.page_starts[0] = 0;
  for (int32_t l = 0; l < kv.num_layers(); ++l) {
    for (int32_t s = 0; s < num_seqs; ++s) {
      const int32_t i = l * num_seqs + s;
      tables[i] = kv.attention_table(chunks[s].seq, l);
      b.page_starts[i + 1] = b.page_starts[i] + static_cast<int32_t>(tables[i].size());
    }
  }
  b.pages.resize(static_cast<size_t>(b.page_starts[num_tables]));
#pragma omp parallel for if (b.pages.size() > 65536) num_threads(8) schedule(static)
  for (int32_t i = 0; i < num_tables; ++i) {
    std::copy(tables[i].begin(), tables[i].end(), b.pages.begin() + b.page_starts[i]);
  }
}

}  // namespace

std::optional<StepBatch> build_step(kv::KvCacheManager& kv, std::span<const SeqChunk> chunks) {
  StepBatch b;
  if (!build_step(kv, chunks, b)) return std::nullopt;
  return b;
}

bool build_step(kv::KvCacheManager& kv, std::span<const SeqChunk> chunks, StepBatch& b) {
  const int32_t num_seqs = static_cast<int32_t>(chunks.size());
  // All or nothing: each sequence appears once per step, so the pages the chunks need simply add.
  int64_t needed = 0;
  for (const SeqChunk& c : chunks) {
    needed += kv.pages_needed(c.seq, static_cast<int32_t>(c.tokens.size()));
  }
  if (needed > kv.pool().num_free()) return false;
  std::vector<int32_t> cached(num_seqs);
  const int32_t num_layers = kv.num_layers();
  for (auto* v : {&b.token_ids, &b.positions, &b.seq_starts, &b.seq_cached, &b.page_starts,
                  &b.write_starts, &b.logit_rows, &b.over_budget})
    v->clear();
  b.writes.clear();
  b.token_src.clear();  // every row's token is in token_ids unless the caller says otherwise
  b.kv_ops.layers.resize(num_layers);
  for (kv::KvLayerOps& ops : b.kv_ops.layers) {
    ops.requant.clear();
    ops.demote_waves.clear();
  }
  // writes_by_seq[s][l]: where sequence s writes its new tokens in layer l. Kept across steps (per
  // thread; the engine thread builds every step) with its capacity: a decode step at batch 128
  // would otherwise allocate and free ~8,000 small vectors here.
  thread_local std::vector<std::vector<std::vector<kv::KvWrite>>> writes_by_seq;
  if (writes_by_seq.size() < static_cast<size_t>(num_seqs)) writes_by_seq.resize(num_seqs);
  for (int32_t s = 0; s < num_seqs; ++s) {
    writes_by_seq[s].resize(num_layers);
    for (std::vector<kv::KvWrite>& w : writes_by_seq[s])
      w.clear();
  }
  for (int32_t s = 0; s < num_seqs; ++s) {
    cached[s] = kv.num_tokens(chunks[s].seq);
    const kv::AppendStatus st = kv.append(
        chunks[s].seq, static_cast<int32_t>(chunks[s].tokens.size()), &b.kv_ops, &writes_by_seq[s],
        chunks[s].prompt_len);
    if (st == kv::AppendStatus::kPoolExhausted) {
      throw std::logic_error("build_step: pool exhausted after the page count said it fits");
    }
    if (st == kv::AppendStatus::kOverBudgetAtFloor) b.over_budget.push_back(s);
  }
  b.seq_starts.push_back(0);
  for (int32_t s = 0; s < num_seqs; ++s) {
    const SeqChunk& c = chunks[s];
    const int32_t row0 = b.num_tokens();
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      b.token_ids.push_back(c.tokens[i]);
      b.positions.push_back(cached[s] + static_cast<int32_t>(i));
    }
    const int32_t n = static_cast<int32_t>(c.tokens.size());
    if (c.logits == SeqChunk::Logits::kAll) {
      for (int32_t i = 0; i < n; ++i)
        b.logit_rows.push_back(row0 + i);
    } else if (c.logits == SeqChunk::Logits::kLast && n > 0) {
      b.logit_rows.push_back(row0 + n - 1);
    }
    b.seq_starts.push_back(b.num_tokens());
    b.seq_cached.push_back(cached[s]);
  }
  b.write_starts.push_back(0);
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t s = 0; s < num_seqs; ++s) {
      const auto& w = writes_by_seq[s][l];
      b.writes.insert(b.writes.end(), w.begin(), w.end());
      b.write_starts.push_back(static_cast<int32_t>(b.writes.size()));
    }
  }
  copy_page_tables(kv, chunks, b);
  return true;
}

}  // namespace pmkv
