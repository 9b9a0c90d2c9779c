#include "kv_cache.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "llama4rt.hpp"

namespace llama4rt {
namespace {
constexpr int64_t kInitialSlots = 64;  // runtime/kv_cache.py INITIAL_SLOTS
constexpr int64_t kMaxWindow = int64_t{1} << 62;  // runtime/kv_cache.py MAX_WINDOW: sums of slots stay in int64
}

void SlidingKVCache::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

SlidingKVCache::SlidingKVCache(const ModelConfig& config, KVLayout layout, int64_t window, int64_t sinks,
                               size_t itemsize, bool grow, int64_t max_step_tokens)
    : layout_(layout), window_(window), max_step_(std::max<int64_t>(max_step_tokens, 1)),
      scratch_(layout == KVLayout::kInPlace ? config.num_attention_heads / config.num_key_value_heads - 1 : 0),
      kv_heads_(config.num_key_value_heads), head_dim_(config.head_dim), itemsize_(itemsize) {
  if (sinks < 0)
    throw Error("sinks=" + std::to_string(sinks) + ": the number of sink tokens cannot be negative");
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"window", window}, {"sinks", sinks}})
    if (value > kMaxWindow)
      throw Error(std::string(name) + "=" + std::to_string(value) + ": at most " + std::to_string(kMaxWindow) +
                  " (2^62) tokens");
  if (window < sinks + 1)
    throw Error("window=" + std::to_string(window) + " with sinks=" + std::to_string(sinks) +
                ": the global window needs at least sinks + 1 = " + std::to_string(sinks + 1) +
                " slots (S sinks plus a ring of at least one recent token); raise --window or lower --sinks");
  // Without a chunk size RoPE layers attend globally too, so they slide like the global layers.
  Kind& chunked = kind_[index(AttentionKind::kChunked)];
  chunked.chunk_policy = config.attention_chunk_size.has_value();
  chunked.slots = chunked.chunk_policy ? *config.attention_chunk_size : window;
  chunked.sinks = chunked.chunk_policy ? 0 : sinks;
  Kind& global = kind_[index(AttentionKind::kGlobal)];
  global.slots = window;
  global.sinks = sinks;
  for (Kind& kind : kind_) {
    // In place, a step's tokens land behind a full window before they move into the ring (SinkRingSlots.capacity).
    kind.capacity = kind.slots + (layout == KVLayout::kInPlace && !kind.chunk_policy ? max_step_ : 0) + scratch_;
    kind.size = grow ? std::min(kind.capacity, kInitialSlots) : kind.capacity;
    if (layout == KVLayout::kPositions) {
      if (static_cast<uint64_t>(kind.capacity) > kind.positions.max_size()) throw std::bad_alloc();
      kind.positions.assign(kind.capacity, -1);
    }
  }
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    Kind& kind = kind_[index(config.kinds[layer])];
    kind.layers.push_back(layer);
    // calloc: zeroed like Python's np.zeros, and large blocks come straight from mmap, so pages the sequence has not
    // reached yet cost no resident memory.
    // A window past the address space is out of memory, not a product that wraps around to a small buffer.
    size_t bytes = 0;
    if (__builtin_mul_overflow(static_cast<size_t>(kv_heads_) * static_cast<size_t>(head_dim_) * itemsize_,
                               static_cast<size_t>(kind.capacity), &bytes))
      throw std::bad_alloc();
    for (auto* buffers : {&keys_, &values_}) {
      auto* memory = static_cast<uint8_t*>(std::calloc(bytes, 1));
      if (memory == nullptr) throw std::bad_alloc();
      buffers->emplace_back(memory);
    }
  }
  keep_.reserve(max_step_);
  slot_.reserve(max_step_);
  step_.reserve(max_step_);
}

void SlidingKVCache::reset() {
  for (Kind& kind : kind_) {
    std::fill(kind.positions.begin(), kind.positions.end(), -1);
    kind.filled = 0;
  }
  length_ = 0;
}

// SinkRingSlots.place: sink positions keep their own slot; of the rest only the last W - S survive a long step.
void SlidingKVCache::place_ring(const Kind& kind, const int64_t* positions, int64_t tokens) {
  keep_.clear();
  slot_.clear();
  const int64_t ring = kind.slots - kind.sinks;
  int64_t ring_tokens = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < kind.sinks) {
      keep_.push_back(t);
      slot_.push_back(positions[t]);
    } else {
      ++ring_tokens;
    }
  }
  int64_t skip = std::max<int64_t>(ring_tokens - ring, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] < kind.sinks || skip-- > 0) continue;
    keep_.push_back(t);
    slot_.push_back(kind.sinks + (positions[t] - kind.sinks) % ring);
  }
}

// _Buffers._new_size + _grow_buffers: double (at least to `needed`), capped at the capacity.
void SlidingKVCache::grow(Kind& kind, int64_t needed) {
  if (needed <= kind.size) return;
  if (needed > kind.capacity)
    throw Error("internal: " + std::to_string(needed) + " cache slots needed, " + std::to_string(kind.capacity) +
                " allocated at most");
  const int64_t old_size = kind.size;
  const int64_t new_size = std::min(kind.capacity, std::max(needed, 2 * old_size));
  // Re-lay [kv_heads, old_size, head_dim] out as [kv_heads, new_size, head_dim] in place: the last head moves first,
  // so no head's destination overwrites a head not yet moved; the new slots are zeroed as Python's new buffers are.
  const size_t row = static_cast<size_t>(head_dim_) * itemsize_;
  for (int64_t layer : kind.layers) {
    for (uint8_t* base : {keys(layer), values(layer)}) {
      for (int64_t h = kv_heads_ - 1; h >= 0; --h) {
        uint8_t* to = base + static_cast<size_t>(h * new_size) * row;
        std::memmove(to, base + static_cast<size_t>(h * old_size) * row, static_cast<size_t>(old_size) * row);
        std::memset(to + static_cast<size_t>(old_size) * row, 0, static_cast<size_t>(new_size - old_size) * row);
      }
    }
  }
  kind.size = new_size;  // positions beyond old_size are already -1
  ++reallocations_;
}

void SlidingKVCache::copy_slots(const Kind& kind, int64_t from, int64_t to) {
  const size_t row = static_cast<size_t>(head_dim_) * itemsize_;
  for (int64_t layer : kind.layers) {
    for (uint8_t* base : {keys(layer), values(layer)}) {
      for (int64_t h = 0; h < kv_heads_; ++h) {
        uint8_t* head = base + static_cast<size_t>(h * kind.size) * row;
        std::memcpy(head + static_cast<size_t>(to) * row, head + static_cast<size_t>(from) * row, row);
      }
    }
  }
}

void SlidingKVCache::update(const int64_t* positions, int64_t tokens, const std::vector<const uint8_t*>& new_keys,
                            const std::vector<const uint8_t*>& new_values) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (positions[t] != length_ + t)
      throw Error("internal: step positions do not continue the cached " + std::to_string(length_) + " tokens");
  }
  if (tokens == 0) return;
  const size_t row = static_cast<size_t>(head_dim_) * itemsize_;
  for (Kind& kind : kind_) {
    int64_t* held = kind.positions.data();
    if (kind.chunk_policy) {  // ChunkSlots.place: keep the tokens in the chunk of the step's last token
      keep_.clear();
      slot_.clear();
      const int64_t chunk = positions[tokens - 1] / kind.slots;
      for (int64_t s = 0; s < kind.size; ++s)
        if (held[s] >= 0 && held[s] / kind.slots != chunk) held[s] = -1;
      for (int64_t t = 0; t < tokens; ++t) {
        if (positions[t] / kind.slots != chunk) continue;
        keep_.push_back(t);
        slot_.push_back(positions[t] % kind.slots);
      }
    } else {
      place_ring(kind, positions, tokens);
    }
    if (!slot_.empty()) grow(kind, *std::max_element(slot_.begin(), slot_.end()) + 1);
    for (size_t k = 0; k < keep_.size(); ++k) held[slot_[k]] = positions[keep_[k]];
    for (int64_t layer : kind.layers) {
      for (int which = 0; which < 2; ++which) {
        uint8_t* cache = which == 0 ? keys(layer) : values(layer);
        const uint8_t* step = which == 0 ? new_keys[layer] : new_values[layer];
        for (int64_t h = 0; h < kv_heads_; ++h) {
          for (size_t k = 0; k < keep_.size(); ++k) {
            std::memcpy(cache + static_cast<size_t>(h * kind.size + slot_[k]) * row,
                        step + static_cast<size_t>(h * tokens + keep_[k]) * row, row);
          }
        }
      }
    }
  }
  length_ += tokens;
}

// InPlaceKVCache.piece_limit: at most max_step tokens, and up to the end of the current chunk.
int64_t SlidingKVCache::piece_limit() const {
  int64_t limit = max_step_;
  for (const Kind& kind : kind_)
    if (kind.chunk_policy) limit = std::min(limit, kind.slots - length_ % kind.slots);
  return limit;
}

void SlidingKVCache::reserve(int64_t tokens) {
  for (Kind& kind : kind_) grow(kind, kind.filled + tokens + scratch_);
}

// InPlaceKVCache.advance, ChunkSlots.appended and SinkRingSlots.appended for one row.
void SlidingKVCache::advance(int64_t tokens) {
  if (tokens == 0) return;
  const int64_t first = length_;
  for (Kind& kind : kind_) {
    if (kind.chunk_policy) {
      if (kind.filled != first % kind.slots || (first + tokens - 1) / kind.slots != first / kind.slots)
        throw Error("internal: positions " + std::to_string(first) + ".." + std::to_string(first + tokens - 1) +
                    " do not continue a chunk holding " + std::to_string(kind.filled) + " slots");
      kind.filled = (first + tokens) % kind.slots;
      continue;
    }
    if (kind.filled != std::min(first, kind.slots))
      throw Error("internal: positions from " + std::to_string(first) + " do not continue a window holding " +
                  std::to_string(kind.filled) + " slots");
    step_.clear();
    for (int64_t t = 0; t < tokens; ++t) step_.push_back(first + t);
    place_ring(kind, step_.data(), tokens);
    // The graphs wrote token t at slot filled + t; the ones whose ring slot differs move there. Sources past the
    // window are never a destination (those are below W), so moving in order reads every source intact.
    for (size_t k = 0; k < keep_.size(); ++k) {
      const int64_t source = kind.filled + keep_[k];
      if (source != slot_[k]) copy_slots(kind, source, slot_[k]);
    }
    kind.filled = std::min(kind.filled + tokens, kind.slots);
  }
  length_ += tokens;
}

}  // namespace llama4rt
