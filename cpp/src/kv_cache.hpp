// The sliding KV cache of one sequence, slot for slot what llama4_export/runtime/kv_cache.py keeps:
// - chunked (RoPE) layers: one chunk of slots, slot = position mod chunk, emptied when the sequence enters a new chunk;
// - global (NoPE) layers: W slots, the first S positions in slots 0..S-1 forever, position p >= S in ring slot
//   S + (p - S) mod (W - S).
// In the two layouts of model/io_spec.py:
// - positions (SlidingKVCache): the graphs return the new tokens' K/V and update() writes them where the policy says,
//   beside the position each slot holds;
// - in_place (InPlaceKVCache): the graphs append at slots filled(kind).. of the buffers themselves, and advance()
//   applies the policy: a chunked row starts over (filled = 0) when its chunk is complete, a full global window moves
//   the step's tokens into their ring slots. A step's tokens stay in one chunk (piece_limit()).
// Buffers of the full capacity are allocated once (zeroed pages the kernel maps on first write). The graphs see a
// "growing" view as Python's do — 64 slots per kind, doubled on demand up to the capacity — made by re-laying the rows
// out inside the same buffer, so they get exactly the slot counts Python hands them and no step allocates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "artifact.hpp"

namespace llama4rt {

enum class KVLayout { kPositions, kInPlace };

class SlidingKVCache {
 public:
  // itemsize: bytes per cached value (4 fp32, 2 fp16, 1 fp8). grow: start small and double (dynamic-slot graphs).
  // max_step_tokens: the most tokens one step takes (sizes the scratch space, and in place the room behind a full
  // window where a step's tokens land before they move into the ring).
  SlidingKVCache(const ModelConfig& config, KVLayout layout, int64_t window, int64_t sinks, size_t itemsize, bool grow,
                 int64_t max_step_tokens);

  KVLayout layout() const { return layout_; }
  int64_t window() const { return window_; }
  int64_t sinks() const { return kind_[index(AttentionKind::kGlobal)].sinks; }
  int64_t slots(AttentionKind kind) const { return kind_[index(kind)].slots; }  // the policy's size: chunk or W
  int64_t size(AttentionKind kind) const { return kind_[index(kind)].size; }    // slots the graphs see now
  int64_t length() const { return length_; }  // tokens cached so far = the next token's position
  uint64_t reallocations() const { return reallocations_; }  // bumped when a kind grows (tensor views go stale)

  int64_t* positions(AttentionKind kind) { return kind_[index(kind)].positions.data(); }  // positions layout
  int64_t* filled(AttentionKind kind) { return &kind_[index(kind)].filled; }              // in_place: past_lengths
  uint8_t* keys(int64_t layer) { return keys_[layer].get(); }
  uint8_t* values(int64_t layer) { return values_[layer].get(); }

  // Empty the sequence without reallocating (stale contents are masked); the size stays grown.
  void reset();

  // positions layout: write one step's new K/V (per layer [1, kv_heads, tokens, head_dim]) of the tokens at
  // `positions`, which continue the cached sequence (length(), length() + 1, ...).
  void update(const int64_t* positions, int64_t tokens, const std::vector<const uint8_t*>& new_keys,
              const std::vector<const uint8_t*>& new_values);

  // in_place: the most tokens the next step may have; room for a step of `tokens`; after the graphs appended a step
  // of `tokens` at positions length().. , apply the policy.
  int64_t piece_limit() const;
  void reserve(int64_t tokens);
  void advance(int64_t tokens);

 private:
  struct Kind {
    int64_t slots = 0;     // the policy's slots: the chunk, or W
    int64_t sinks = 0;     // ring policy only
    bool chunk_policy = false;
    int64_t capacity = 0;  // slots allocated
    int64_t size = 0;      // slots the graphs see
    std::vector<int64_t> positions;  // positions layout: capacity entries; the first `size` are the graph input
    int64_t filled = 0;              // in_place: valid slots at the front
    std::vector<int64_t> layers;
  };
  static size_t index(AttentionKind kind) { return kind == AttentionKind::kChunked ? 0 : 1; }
  void place_ring(const Kind& kind, const int64_t* positions, int64_t tokens);  // fills keep_ / slot_
  void grow(Kind& kind, int64_t needed);
  void copy_slots(const Kind& kind, int64_t from, int64_t to);  // every layer of `kind`, every head

  struct FreeDeleter {
    void operator()(uint8_t* p) const;
  };
  using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

  KVLayout layout_;
  int64_t window_, length_ = 0, max_step_;
  int64_t scratch_;  // in place: slots a decode step may write after its token, in every buffer (decode_scratch_slots)
  int64_t kv_heads_, head_dim_;
  size_t itemsize_;
  uint64_t reallocations_ = 0;
  Kind kind_[2];
  std::vector<Buffer> keys_, values_;
  std::vector<int64_t> keep_, slot_, step_;  // scratch of one step: kept token indices, their slots, positions
};

}  // namespace llama4rt
