// The sliding KV cache of one sequence, slot for slot what llama4_export/runtime/kv_cache.py keeps:
// - chunked (RoPE) layers: one chunk of slots, slot = position mod chunk, emptied when the sequence enters a new chunk;
// - global (NoPE) layers: W slots, the first S positions in slots 0..S-1 forever, position p >= S in ring slot
//   S + (p - S) mod (W - S).
// Buffers of the full size are allocated once (zeroed pages the kernel maps on first write). When the graphs take
// dynamic slot counts, the cache "grows" as Python's does — 64 slots per kind, doubled on demand up to the chunk / W —
// by re-laying the rows out inside the same buffer, so the graphs see exactly the slot counts Python hands them
// (attention over a different number of masked slots could round differently) and no step allocates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "artifact.hpp"

namespace llama4rt {

class SlidingKVCache {
 public:
  // itemsize: bytes per cached value (4 fp32, 2 fp16, 1 fp8). grow: start small and double (dynamic-slot graphs).
  // max_step_tokens: the most tokens one update() takes (sizes the scratch space once).
  SlidingKVCache(const ModelConfig& config, int64_t window, int64_t sinks, size_t itemsize, bool grow,
                 int64_t max_step_tokens);

  int64_t window() const { return window_; }
  int64_t sinks() const { return kind_[index(AttentionKind::kGlobal)].sinks; }
  int64_t slots(AttentionKind kind) const { return kind_[index(kind)].capacity; }  // the policy's full size
  int64_t size(AttentionKind kind) const { return kind_[index(kind)].size; }       // slots the graphs see now
  int64_t length() const { return length_; }  // tokens cached so far = the next token's position
  uint64_t reallocations() const { return reallocations_; }  // bumped when a kind grows (tensor views go stale)

  int64_t* positions(AttentionKind kind) { return kind_[index(kind)].positions.data(); }
  uint8_t* keys(int64_t layer) { return keys_[layer].get(); }
  uint8_t* values(int64_t layer) { return values_[layer].get(); }

  // Empty the sequence without reallocating (stale contents are masked by position -1); the size stays grown.
  void reset();
  // Write one step's new K/V (per layer [1, kv_heads, tokens, head_dim]) of the tokens at `positions`, which continue
  // the cached sequence (length(), length() + 1, ...).
  void update(const int64_t* positions, int64_t tokens, const std::vector<const uint8_t*>& new_keys,
              const std::vector<const uint8_t*>& new_values);

 private:
  struct Kind {
    int64_t capacity = 0;  // the policy's slots: the chunk, or W
    int64_t sinks = 0;     // ring policy only
    bool chunk_policy = false;
    int64_t size = 0;
    std::vector<int64_t> positions;  // capacity entries; the first `size` are the graph input
    std::vector<int64_t> layers;
  };
  static size_t index(AttentionKind kind) { return kind == AttentionKind::kChunked ? 0 : 1; }
  void place(Kind& kind, const int64_t* positions, int64_t tokens);  // fills keep_ / slot_
  void reserve(Kind& kind, int64_t needed);

  struct FreeDeleter {
    void operator()(uint8_t* p) const;
  };
  using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

  int64_t window_, length_ = 0;
  int64_t kv_heads_, head_dim_;
  size_t itemsize_;
  uint64_t reallocations_ = 0;
  Kind kind_[2];
  std::vector<Buffer> keys_, values_;
  std::vector<int64_t> keep_, slot_;  // scratch of one update: kept token indices and their slots
};

}  // namespace llama4rt
