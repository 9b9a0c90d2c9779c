// The artifact directory as the Python runtime reads it: manifest.json (format, version, config, graphs, partitions)
// and generation_config.json's stop tokens (llama4_export/artifact.py, runtime/generator.py, runtime/ort_backend.py).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "images.hpp"

namespace llama4rt {

enum class AttentionKind { kChunked, kGlobal };

// The fields of the manifest's "model" config the runtime needs (Llama4Config.from_hf_dict's reading of them).
struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  std::optional<int64_t> attention_chunk_size;
  int64_t max_position_embeddings = 4096;
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> pad_token_id;
  std::vector<AttentionKind> kinds;  // per layer: RoPE layers attend in chunks, NoPE layers globally
};

struct PartGraphs {
  int64_t first_layer = 0, end_layer = 0;  // [first, end)
  std::string decode, prefill;             // paths; prefill empty when the part has none
};

// The manifest's vision entry: the vision graph and the processor that tiles images for it.
struct VisionEntry {
  std::string graph;       // path of vision.onnx
  int64_t image_token_id;  // the placeholder token whose rows take image features
  ProcessorConfig processor;
};

struct Artifact {
  std::string directory;
  std::string manifest_path;
  ModelConfig config;
  std::vector<PartGraphs> parts;
  int64_t max_prefill_tokens = 512;
  std::optional<std::string> kv_cache_dtype;  // manifest dtypes.kv_cache, when it says
  std::optional<std::string> kv_layout;       // manifest kv_layout ("in_place" or "positions"), when it says
  std::vector<int64_t> stop_tokens;           // config eos ∪ generation_config.json eos, sorted
  // The manifest's tokenizer.graphs (paths), or why there are none (text in and out then needs them).
  std::string tokenizer_encode, tokenizer_decode;
  std::map<int64_t, std::string> nul_byte_tokens;  // id → bytes of the tokens holding a NUL byte (tokenizer.graphs)
  std::string no_tokenizer_graphs;
  std::optional<VisionEntry> vision;  // an artifact of a multimodal checkpoint
};

// Throws Error with one line naming the file and what to do. verify: check every file the manifest lists against its
// sha256 (a file verified unchanged before, by this runtime or the Python one, is not hashed again).
Artifact read_artifact(const std::string& directory, bool verify = true);

constexpr int64_t kDefaultMaxPrefill = 512;  // model/io_spec.py DEFAULT_MAX_PREFILL
constexpr int64_t kDefaultSinks = 4;         // model/io_spec.py DEFAULT_SINKS
constexpr int64_t kDefaultGlobalCacheBytes = int64_t{1} << 30;  // plan.py DEFAULT_GLOBAL_CACHE_BYTES

// plan.default_window: the context, capped so one sequence's global-layer K/V fit kDefaultGlobalCacheBytes.
int64_t default_window(const ModelConfig& config, int64_t itemsize);

}  // namespace llama4rt
