// Model: the artifact's graphs on ONNX Runtime + the sliding KV cache + the sampler, generating exactly as
// llama4_export/runtime/generator.py (Generator) over ort_backend.py (OrtBackend) does for one sequence.
#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "artifact.hpp"
#include "images.hpp"
#include "kv_cache.hpp"
#include "llama4rt.hpp"
#include "sampler.hpp"
#include "tokenizer.hpp"

namespace llama4rt {
namespace {

#ifndef LLAMA4RT_EXTENSIONS_LIBRARY
#define LLAMA4RT_EXTENSIONS_LIBRARY ""
#endif
const std::string kExtensionsLibrary = LLAMA4RT_EXTENSIONS_LIBRARY;

// model/io_spec.py names.
constexpr const char* kInputIds = "input_ids";
constexpr const char* kPositions = "positions";
constexpr const char* kHiddenIn = "hidden_states";
constexpr const char* kLogits = "logits";
constexpr const char* kHiddenOut = "hidden_states_out";
constexpr const char* kLogitsIndex = "logits_index";
// A multimodal artifact's prefill takes the rows of its step's image placeholder tokens; a step without them binds
// zero rows (io_spec.py: placeholders without rows keep their token embeddings, as in OrtBackend).
constexpr const char* kImageFeatures = "image_features";
constexpr AttentionKind kKinds[] = {AttentionKind::kChunked, AttentionKind::kGlobal};
// The per-kind cache index: slot positions [batch, slots] (positions layout) or valid lengths [batch] (in_place).
const char* cache_index_name(KVLayout layout, AttentionKind kind) {
  const bool chunked = kind == AttentionKind::kChunked;
  if (layout == KVLayout::kInPlace) return chunked ? "past_lengths_chunked" : "past_lengths_global";
  return chunked ? "past_positions_chunked" : "past_positions_global";
}
std::string layer_name(const char* prefix, int64_t layer) { return prefix + std::to_string(layer); }
// The K/V outputs: the new tokens' (positions) or the past buffers with them appended (in_place).
const char* out_key_prefix(KVLayout layout) { return layout == KVLayout::kInPlace ? "present_key." : "new_key."; }
const char* out_value_prefix(KVLayout layout) { return layout == KVLayout::kInPlace ? "present_value." : "new_value."; }

bool is_last(const ModelConfig& c, const PartGraphs& part) { return part.end_layer == c.num_hidden_layers; }

std::vector<std::string> input_names(const ModelConfig& c, const PartGraphs& part, KVLayout layout,
                                     bool logits_index) {
  std::vector<std::string> names = {part.first_layer == 0 ? kInputIds : kHiddenIn, kPositions};
  for (AttentionKind kind : kKinds) names.push_back(cache_index_name(layout, kind));
  for (int64_t i = part.first_layer; i < part.end_layer; ++i) {
    names.push_back(layer_name("past_key.", i));
    names.push_back(layer_name("past_value.", i));
  }
  if (logits_index && is_last(c, part)) names.push_back(kLogitsIndex);
  return names;
}

std::vector<std::string> output_names(const ModelConfig& c, const PartGraphs& part, KVLayout layout) {
  std::vector<std::string> names = {is_last(c, part) ? kLogits : kHiddenOut};
  for (int64_t i = part.first_layer; i < part.end_layer; ++i) {
    names.push_back(layer_name(out_key_prefix(layout), i));
    names.push_back(layer_name(out_value_prefix(layout), i));
  }
  return names;
}

// The cache types the runtime supports, as ONNX names them and as the manifest's dtypes.kv_cache does.
const std::map<ONNXTensorElementDataType, std::pair<const char*, size_t>> kCacheTypes = {
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {"float32", 4}},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {"float16", 2}},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN, {"float8_e4m3fn", 1}},
};

size_t element_size(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN: return 1;
    default: return 0;
  }
}

// A tensor over memory the caller owns (no copy): ONNX Runtime reads inputs from it and writes outputs into it.
Ort::Value make_tensor(const Ort::MemoryInfo& cpu, void* data, const std::vector<int64_t>& shape,
                       ONNXTensorElementDataType type) {
  size_t count = 1;
  for (int64_t d : shape) count *= static_cast<size_t>(d);
  return Ort::Value::CreateTensor(cpu, data, count * element_size(type), shape.data(), shape.size(), type);
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// A graph's session; Error naming the file and what to do when ONNX Runtime cannot load it.
std::unique_ptr<Ort::Session> open_session(Ort::Env& env, const std::string& path, const Ort::SessionOptions& options) {
  try {
    return std::make_unique<Ort::Session>(env, path.c_str(), options);
  } catch (const Ort::Exception& e) {
    const std::string reason = first_line(e.what());
    // ONNX Runtime names an op it lacks by domain: TensorRT plugin nodes (an export for --target tensorrt)
    const std::string fix = reason.find("trt.plugins:") != std::string::npos
                                ? "it holds TensorRT plugin nodes (exported with --target tensorrt); export with "
                                  "--target onnxruntime for llama4rt"
                                : "re-run the export";
    throw Error(path + ": ONNX Runtime cannot load it (" + reason + "); " + fix);
  }
}

// An exception thrown by the host's token callback, carried unchanged past the Error conversion of `guarded`.
struct FromCallback {
  std::exception_ptr error;
};

template <typename F>
void host_call(F&& callback) {
  try {
    callback();
  } catch (...) {
    throw FromCallback{std::current_exception()};
  }
}

struct TensorSpec {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;  // -1 = dynamic
};

std::map<std::string, TensorSpec> tensor_specs(const Ort::Session& session, bool inputs) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::map<std::string, TensorSpec> specs;
  const size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
  for (size_t i = 0; i < count; ++i) {
    auto name = inputs ? session.GetInputNameAllocated(i, allocator) : session.GetOutputNameAllocated(i, allocator);
    Ort::TypeInfo info = inputs ? session.GetInputTypeInfo(i) : session.GetOutputTypeInfo(i);
    if (info.GetONNXType() != ONNX_TYPE_TENSOR) {
      specs[name.get()] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}};
      continue;
    }
    auto tensor = info.GetTensorTypeAndShapeInfo();
    specs[name.get()] = {tensor.GetElementType(), tensor.GetShape()};
  }
  return specs;
}

// One ONNX Runtime session of a graph, its inputs/outputs checked against the manifest's config (model/io_spec.py).
struct Graph {
  std::string path;
  std::unique_ptr<Ort::Session> session;
  std::map<std::string, TensorSpec> inputs, outputs;
  bool takes_logits_index = false;  // a prefill graph ending with the lm_head
};

void check_graph(const Graph& g, const ModelConfig& c, const PartGraphs& part, KVLayout layout,
                 const std::string& manifest) {
  const std::string fix = "; the graph does not match " + manifest + " — re-run the export";
  const std::vector<std::string> expected_in = input_names(c, part, layout, g.takes_logits_index);
  const std::vector<std::string> expected_out = output_names(c, part, layout);
  for (const std::string& name : expected_in)
    if (!g.inputs.count(name)) throw Error(g.path + ": has no input '" + name + "'" + fix);
  for (const auto& [name, spec] : g.inputs)
    if (name != kImageFeatures && std::find(expected_in.begin(), expected_in.end(), name) == expected_in.end())
      throw Error(g.path + ": input '" + name + "' is not part of the graph contract for " +
                  std::to_string(part.end_layer - part.first_layer) + " layers" + fix);
  for (const std::string& name : expected_out)
    if (!g.outputs.count(name)) throw Error(g.path + ": has no output '" + name + "'" + fix);
  auto expect = [&](const std::string& name, const TensorSpec& spec, ONNXTensorElementDataType type, size_t rank,
                    const char* what) {
    if (spec.type != type || spec.shape.size() != rank)
      throw Error(g.path + ": '" + name + "' is not " + what + fix);
  };
  for (const char* name : {kInputIds, kPositions, kLogitsIndex})
    if (g.inputs.count(name)) expect(name, g.inputs.at(name), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 2, "int64 [batch, tokens]");
  if (g.inputs.count(kImageFeatures)) {
    const TensorSpec& spec = g.inputs.at(kImageFeatures);
    const bool is_float = spec.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
                          spec.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
                          spec.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    if (!is_float || spec.shape.size() != 2 ||
        (spec.shape[1] >= 0 && spec.shape[1] != c.hidden_size))
      throw Error(g.path + ": '" + kImageFeatures + "' is not a float [image tokens, " + std::to_string(c.hidden_size) +
                  "] input" + fix);
  }
  for (AttentionKind kind : kKinds) {
    const char* name = cache_index_name(layout, kind);
    if (layout == KVLayout::kInPlace)
      expect(name, g.inputs.at(name), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1, "int64 [batch]");
    else
      expect(name, g.inputs.at(name), ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 2, "int64 [batch, slots]");
  }
  if (is_last(c, part)) {
    const TensorSpec& spec = g.outputs.at(kLogits);
    expect(kLogits, spec, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 3, "float32 [batch, tokens, vocab]");
    if (spec.shape[2] >= 0 && spec.shape[2] != c.vocab_size)
      throw Error(g.path + ": logits have " + std::to_string(spec.shape[2]) + " entries per token, the config's "
                  "vocab_size is " + std::to_string(c.vocab_size) + fix);
  }
  auto check_kv = [&](const std::string& name, const TensorSpec& spec) {
    if (spec.shape.size() != 4 || (spec.shape[1] >= 0 && spec.shape[1] != c.num_key_value_heads) ||
        (spec.shape[3] >= 0 && spec.shape[3] != c.head_dim))
      throw Error(g.path + ": '" + name + "' is not [batch, " + std::to_string(c.num_key_value_heads) + " kv heads, " +
                  "slots, " + std::to_string(c.head_dim) + "] as the config says" + fix);
  };
  for (int64_t i = part.first_layer; i < part.end_layer; ++i) {
    for (const std::string& name : {layer_name("past_key.", i), layer_name("past_value.", i)})
      check_kv(name, g.inputs.at(name));
    for (const std::string& name : {layer_name(out_key_prefix(layout), i), layer_name(out_value_prefix(layout), i)})
      check_kv(name, g.outputs.at(name));
  }
}

}  // namespace

struct Model::Impl {
  struct Part {
    PartGraphs graphs;
    Graph decode;
    std::unique_ptr<Graph> prefill_own;  // null when the part has no prefill graph or it is the decode file
    Graph* prefill = nullptr;
    ONNXTensorElementDataType out_type;  // logits (fp32) or the hidden states handed to the next part
    std::vector<uint8_t> out;            // the step's logits [1, vocab] or hidden states [tokens, hidden]
  };

  Artifact artifact;
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "llama4rt"};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::RunOptions run_options;
  std::vector<Part> parts;
  KVLayout layout = KVLayout::kInPlace;
  ONNXTensorElementDataType cache_type;
  size_t cache_itemsize = 0;
  int64_t max_prefill_tokens = 1;
  std::unique_ptr<SlidingKVCache> cache;
  std::unique_ptr<Sampler> sampler;
  std::mutex generating;                         // the cache, sampler and step buffers: one generation at a time
  std::atomic<std::thread::id> generating_thread;  // whose generation holds it (a callback re-entering would deadlock)
  std::unique_ptr<TextCodec> text;  // the tokenizer graphs, when the artifact and this build have them
  std::string no_text;              // otherwise: why not

  // Step buffers, sized once for the largest step: ids, positions, the logits column wanted, and (positions layout)
  // every layer's new K/V [1, kv_heads, T, head_dim].
  int64_t step_capacity = 0;
  std::vector<int64_t> ids, positions;
  int64_t logits_index = 0;
  float no_image_features[1] = {};  // the memory behind a zero-row image_features tensor
  // Images: the vision graph, or why this artifact's images cannot run here; during a prefill step, the feature rows
  // of its placeholder tokens (Generator.prefill: the rows before the step's first token are the earlier steps').
  std::unique_ptr<Ort::Session> vision;
  std::string no_vision;
  const float* prompt_features = nullptr;
  std::vector<int64_t> image_rows_before;  // per prompt position: the placeholder tokens before it
  const float* step_features = nullptr;
  int64_t step_feature_rows = 0;
  std::vector<std::vector<uint8_t>> new_keys, new_values;
  std::vector<const uint8_t*> new_key_ptrs, new_value_ptrs;
  // The decode step's bindings over those buffers and the cache, rebuilt only when the cache grows (OrtBackend's
  // IOBinding reuse): a step then copies nothing but the ids and positions it writes into the bound buffers.
  std::vector<Ort::IoBinding> decode_bindings;
  uint64_t decode_bound_at = ~uint64_t{0};

  void open(const std::string& directory, const OpenOptions& options);
  void reserve_steps(int64_t tokens);
  std::vector<Ort::IoBinding> bind(bool prefill, int64_t tokens);
  void run(std::vector<Ort::IoBinding>& bindings, bool prefill);
  void decode(int64_t token);
  void prefill(const int64_t* tokens, int64_t start, int64_t width);
  Graph& graph(Part& p, bool prefill) { return prefill && p.prefill ? *p.prefill : p.decode; }
  void open_vision(const Ort::SessionOptions& session_options);
  Prompt encode(const std::string& text, const std::vector<Image>& images);
  Result generate(const Prompt& prompt, const GenerateOptions& options, const TokenCallback& on_token, Model& model);
};

void Model::Impl::open(const std::string& directory, const OpenOptions& options) {
  if (options.threads < 0 || options.threads > kMaxThreads)
    throw Error("threads=" + std::to_string(options.threads) + ": must be in 1.." + std::to_string(kMaxThreads) +
                " (or 0 for ONNX Runtime's choice)");
  artifact = read_artifact(directory, options.verify);
  const ModelConfig& c = artifact.config;
  // OrtBackend's session options.
  Ort::SessionOptions session_options;
  session_options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  session_options.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
  session_options.SetInterOpNumThreads(1);
  if (options.threads > 0) session_options.SetIntraOpNumThreads(options.threads);
  session_options.SetLogSeverityLevel(3);
  auto load = [&](const std::string& path, const PartGraphs& part) {
    Graph g;
    g.path = path;
    g.session = open_session(env, path, session_options);
    g.inputs = tensor_specs(*g.session, true);
    g.outputs = tensor_specs(*g.session, false);
    g.takes_logits_index = is_last(c, part) && path == part.prefill;
    return g;
  };
  parts.resize(artifact.parts.size());
  bool all_prefill = true;
  for (size_t k = 0; k < artifact.parts.size(); ++k) {
    Part& p = parts[k];
    p.graphs = artifact.parts[k];
    p.decode = load(p.graphs.decode, p.graphs);
    if (p.graphs.prefill.empty()) {
      all_prefill = false;
    } else if (p.graphs.prefill == p.graphs.decode) {
      p.prefill = &p.decode;
    } else {
      p.prefill_own = std::make_unique<Graph>(load(p.graphs.prefill, p.graphs));
      p.prefill = p.prefill_own.get();
    }
  }
  // io_spec.kv_layout_of: the graphs' inputs say the layout; every graph and the manifest must agree.
  layout = parts[0].decode.inputs.count(cache_index_name(KVLayout::kInPlace, AttentionKind::kGlobal))
               ? KVLayout::kInPlace : KVLayout::kPositions;
  const char* layout_name = layout == KVLayout::kInPlace ? "in_place" : "positions";
  if (artifact.kv_layout && *artifact.kv_layout != layout_name)
    throw Error(parts[0].graphs.decode + ": its KV cache inputs are of the " + layout_name + " layout but " +
                artifact.manifest_path + " says kv_layout is " + *artifact.kv_layout + "; re-run the export");
  for (Part& p : parts) {
    for (const Graph* g : {static_cast<const Graph*>(&p.decode), static_cast<const Graph*>(p.prefill)})
      if (g != nullptr) check_graph(*g, c, p.graphs, layout, artifact.manifest_path);
    p.out_type = p.decode.outputs.at(output_names(c, p.graphs, layout)[0]).type;
    if (element_size(p.out_type) == 0)
      throw Error(p.graphs.decode + ": its first output has an unsupported element type; re-run the export");
  }
  if (parts.size() > 1 && parts.back().decode.inputs.at(kHiddenIn).type != parts.front().out_type)
    throw Error(parts.back().graphs.decode + ": its hidden_states input type differs from the previous part's output; "
                "re-run the export");

  // The cache type is the first layer's past key type; every graph must agree, and the manifest too when it says.
  cache_type = parts[0].decode.inputs.at(layer_name("past_key.", 0)).type;
  auto known = kCacheTypes.find(cache_type);
  if (known == kCacheTypes.end())
    throw Error(parts[0].graphs.decode + ": cache type " + std::to_string(cache_type) +
                " is not supported (float32, float16, float8e4m3fn)");
  cache_itemsize = known->second.second;
  for (const Part& p : parts) {
    for (const Graph* g : {static_cast<const Graph*>(&p.decode), static_cast<const Graph*>(p.prefill)}) {
      if (g == nullptr) continue;
      for (int64_t i = p.graphs.first_layer; i < p.graphs.end_layer; ++i)
        for (const std::string& name : {layer_name("past_key.", i), layer_name("past_value.", i)})
          if (g->inputs.at(name).type != cache_type)
            throw Error(g->path + ": '" + name + "' is not " + known->second.first + " like past_key.0; re-run the export");
    }
  }
  if (artifact.kv_cache_dtype && *artifact.kv_cache_dtype != known->second.first)
    throw Error(parts[0].graphs.decode + ": the cache inputs are " + known->second.first + " but " +
                artifact.manifest_path + " says dtypes.kv_cache is " + *artifact.kv_cache_dtype + "; re-run the export");

  max_prefill_tokens = all_prefill ? artifact.max_prefill_tokens : 1;
  if (options.max_prefill_tokens) {
    if (*options.max_prefill_tokens < 1)
      throw Error("max_prefill_tokens=" + std::to_string(*options.max_prefill_tokens) + ": must be >= 1");
    max_prefill_tokens = std::min(max_prefill_tokens, *options.max_prefill_tokens);
  }

  // Static slot dimensions (positions layout) fix the cache (Generator._window_for / required_slots); otherwise it
  // grows.
  std::map<AttentionKind, int64_t> required;
  if (layout == KVLayout::kPositions) {
    for (AttentionKind kind : kKinds) {
      const int64_t dim = parts[0].decode.inputs.at(cache_index_name(layout, kind)).shape[1];
      if (dim >= 0) required[kind] = dim;
    }
  }
  std::optional<int64_t> window = options.window;
  if (required.count(AttentionKind::kGlobal)) {
    const int64_t fixed = required[AttentionKind::kGlobal];
    if (window && *window != fixed)
      throw Error("window=" + std::to_string(*window) + ": this artifact's graphs were exported with a fixed global "
                  "window of " + std::to_string(fixed) + " slots; use --window " + std::to_string(fixed) +
                  " or re-export with dynamic cache shapes");
    window = fixed;
  }
  cache = std::make_unique<SlidingKVCache>(c, layout, window ? *window : default_window(c, cache_itemsize),
                                           options.sinks, cache_itemsize, required.empty(), max_prefill_tokens);
  for (const auto& [kind, slots] : required)
    if (cache->slots(kind) != slots)
      throw Error("the graphs expect " + std::to_string(slots) + " " +
                  (kind == AttentionKind::kChunked ? "chunked" : "global") + " cache slots but this config needs " +
                  std::to_string(cache->slots(kind)) + "; re-run the export");
  sampler = std::make_unique<Sampler>(SamplingOptions{}, c.vocab_size);
  if (layout == KVLayout::kPositions) {
    new_keys.resize(c.num_hidden_layers);
    new_values.resize(c.num_hidden_layers);
    new_key_ptrs.resize(c.num_hidden_layers);
    new_value_ptrs.resize(c.num_hidden_layers);
  }
  reserve_steps(1);

  const std::string& library = options.extensions_library.empty() ? kExtensionsLibrary : options.extensions_library;
  if (!artifact.no_tokenizer_graphs.empty())
    no_text = artifact.no_tokenizer_graphs;
  else if (library.empty())
    no_text = "this llama4rt was built without onnxruntime-extensions (CMake ORTX_LIBRARY), which runs the tokenizer "
              "graphs";
  else if (options.extensions_library.empty() && !std::filesystem::exists(library))  // moved, or its cache cleared: ids still run
    no_text = "onnxruntime-extensions, which runs the tokenizer graphs, is no longer at " + library +
              ", where this llama4rt was built to find it; run `make cpp` again or set "
              "OpenOptions::extensions_library";
  else
    text = std::make_unique<TextCodec>(env, artifact.tokenizer_encode, artifact.tokenizer_decode,
                                       artifact.nul_byte_tokens, library);
  open_vision(session_options);
}

// ImageEncoder: vision.onnx in its own session. llama4rt feeds float32 pixels and features; an artifact whose graphs
// take another type runs text only here (no_vision says why).
void Model::Impl::open_vision(const Ort::SessionOptions& session_options) {
  if (!artifact.vision) {
    no_vision = "this artifact has no vision graph (a text-only checkpoint, or exported --text-only)";
    return;
  }
  const std::string& path = artifact.vision->graph;
  vision = open_session(env, path, session_options);
  const auto in = tensor_specs(*vision, true), out = tensor_specs(*vision, false);
  const Graph& first = graph(parts[0], true);
  const bool float_pixels = in.count("pixel_values") && in.at("pixel_values").type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const bool float_features = out.count(kImageFeatures) &&
                              out.at(kImageFeatures).type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
                              first.inputs.count(kImageFeatures) &&
                              first.inputs.at(kImageFeatures).type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (!float_pixels || !float_features) {
    vision.reset();
    no_vision = path + " or the prefill graph takes image tensors other than float32 (an fp16 or bf16 export); "
                "llama4rt runs images through float32 ones (fp32, int4 and fp8 exports): run this artifact's images "
                "with llama4-run --image";
  }
}

// Generator._expanded: every image tiled, its placeholder expanded, the text encoded, the length checked; then the
// vision graph over all tiles.
Prompt Model::Impl::encode(const std::string& text_prompt, const std::vector<Image>& images) {
  if (!vision) throw Error("images need the vision graph: " + no_vision);
  if (!text) throw Error("images need a text prompt (its placeholders say where each image goes), and text needs the "
                         "tokenizer: " + no_text);
  const VisionEntry& entry = *artifact.vision;
  std::vector<Tiles> tiled;
  std::vector<std::pair<int64_t, int64_t>> grids;
  int64_t tiles = 0;
  for (const Image& image : images) {
    tiled.push_back(preprocess(image, entry.processor));
    grids.push_back(tiled.back().grid);
    tiles += tiled.back().count;
  }
  Prompt prompt;
  prompt.ids = text->encode(expand_prompt(text_prompt, grids, entry.processor));
  const int64_t context = artifact.config.max_position_embeddings;
  if (static_cast<int64_t>(prompt.ids.size()) > context)
    throw Error("the prompt is " + std::to_string(prompt.ids.size()) + " tokens with its images (" +
                std::to_string(tiles) + " tiles x " + std::to_string(entry.processor.tokens_per_tile) +
                " tokens) but the model's context is " + std::to_string(context) + "; give fewer or smaller images");
  if (images.empty()) return prompt;
  const int64_t size = entry.processor.size;
  std::vector<float> pixels;
  pixels.reserve(tiles * 3 * size * size);
  for (const Tiles& t : tiled) pixels.insert(pixels.end(), t.pixels.begin(), t.pixels.end());
  const std::vector<int64_t> shape = {tiles, 3, size, size};
  Ort::Value input = make_tensor(cpu, pixels.data(), shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  const char* input_name = "pixel_values";
  std::vector<Ort::Value> outputs;
  try {
    outputs = vision->Run(run_options, &input_name, &input, 1, &kImageFeatures, 1);
  } catch (const Ort::Exception& e) {
    throw Error(entry.graph + ": ONNX Runtime failed to run it (" + first_line(e.what()) + ")");
  }
  const auto info = outputs[0].GetTensorTypeAndShapeInfo();
  const float* features = outputs[0].GetTensorData<float>();
  prompt.image_features.assign(features, features + info.GetElementCount());
  return prompt;
}

void Model::Impl::reserve_steps(int64_t tokens) {
  if (tokens <= step_capacity) return;
  const ModelConfig& c = artifact.config;
  step_capacity = tokens;
  ids.resize(tokens);
  positions.resize(tokens);
  const size_t kv_bytes = static_cast<size_t>(c.num_key_value_heads * tokens * c.head_dim) * cache_itemsize;
  for (size_t i = 0; i < new_keys.size(); ++i) {
    new_keys[i].resize(kv_bytes);
    new_values[i].resize(kv_bytes);
    new_key_ptrs[i] = new_keys[i].data();
    new_value_ptrs[i] = new_values[i].data();
  }
  for (Part& p : parts)  // one column of logits per step (logits_index), or every token's hidden states
    p.out.resize(static_cast<size_t>(is_last(c, p.graphs) ? c.vocab_size : tokens * c.hidden_size) *
                 element_size(p.out_type));
  decode_bound_at = ~uint64_t{0};  // the buffers moved
}

// OrtBackend._bind: every part's IOBinding for a step of `tokens` new tokens over the step buffers and the cache;
// part k's hidden-state output is part k+1's input. In place, each layer's past and present are the same memory.
std::vector<Ort::IoBinding> Model::Impl::bind(bool prefill, int64_t tokens) {
  const ModelConfig& c = artifact.config;
  const int64_t kvh = c.num_key_value_heads, d = c.head_dim;
  std::vector<Ort::IoBinding> bindings;
  for (size_t k = 0; k < parts.size(); ++k) {
    Part& p = parts[k];
    Graph& g = graph(p, prefill);
    Ort::IoBinding binding(*g.session);
    if (k == 0)
      binding.BindInput(kInputIds, make_tensor(cpu, ids.data(), {1, tokens}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    else
      binding.BindInput(kHiddenIn, make_tensor(cpu, parts[k - 1].out.data(), {1, tokens, c.hidden_size},
                                               parts[k - 1].out_type));
    binding.BindInput(kPositions, make_tensor(cpu, positions.data(), {1, tokens}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    for (AttentionKind kind : kKinds) {
      const char* name = cache_index_name(layout, kind);
      if (layout == KVLayout::kInPlace)
        binding.BindInput(name, make_tensor(cpu, cache->filled(kind), {1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
      else
        binding.BindInput(name, make_tensor(cpu, cache->positions(kind), {1, cache->size(kind)},
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    }
    for (int64_t i = p.graphs.first_layer; i < p.graphs.end_layer; ++i) {
      const std::vector<int64_t> shape = {1, kvh, cache->size(c.kinds[i]), d};
      Ort::Value key = make_tensor(cpu, cache->keys(i), shape, cache_type);
      Ort::Value value = make_tensor(cpu, cache->values(i), shape, cache_type);
      binding.BindInput(layer_name("past_key.", i).c_str(), key);
      binding.BindInput(layer_name("past_value.", i).c_str(), value);
      if (layout == KVLayout::kInPlace) {
        binding.BindOutput(layer_name(out_key_prefix(layout), i).c_str(), key);
        binding.BindOutput(layer_name(out_value_prefix(layout), i).c_str(), value);
      } else {
        binding.BindOutput(layer_name(out_key_prefix(layout), i).c_str(),
                           make_tensor(cpu, new_keys[i].data(), {1, kvh, tokens, d}, cache_type));
        binding.BindOutput(layer_name(out_value_prefix(layout), i).c_str(),
                           make_tensor(cpu, new_values[i].data(), {1, kvh, tokens, d}, cache_type));
      }
    }
    if (is_last(c, p.graphs)) {
      binding.BindOutput(kLogits, make_tensor(cpu, p.out.data(), {1, 1, c.vocab_size}, p.out_type));
    } else {
      binding.BindOutput(kHiddenOut, make_tensor(cpu, p.out.data(), {1, tokens, c.hidden_size}, p.out_type));
    }
    if (g.takes_logits_index)
      binding.BindInput(kLogitsIndex, make_tensor(cpu, &logits_index, {1, 1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    if (g.inputs.count(kImageFeatures)) {
      float* rows = step_feature_rows ? const_cast<float*>(step_features) : no_image_features;
      binding.BindInput(kImageFeatures, make_tensor(cpu, rows, {step_feature_rows, c.hidden_size},
                                                    g.inputs.at(kImageFeatures).type));
    }
    bindings.push_back(std::move(binding));
  }
  return bindings;
}

void Model::Impl::run(std::vector<Ort::IoBinding>& bindings, bool prefill) {
  for (size_t k = 0; k < parts.size(); ++k) {
    Graph& g = graph(parts[k], prefill);
    try {
      g.session->Run(run_options, bindings[k]);
    } catch (const Ort::Exception& e) {
      throw Error(g.path + ": ONNX Runtime failed to run it (" + first_line(e.what()) + ")");
    }
  }
}

// OrtBackend._decode: one new token through the decode graphs, bound once per cache layout.
void Model::Impl::decode(int64_t token) {
  ids[0] = token;
  positions[0] = cache->length();
  logits_index = 0;
  if (layout == KVLayout::kInPlace) cache->reserve(1);
  if (decode_bound_at != cache->reallocations()) {
    decode_bindings = bind(false, 1);
    decode_bound_at = cache->reallocations();
  }
  run(decode_bindings, false);
  if (layout == KVLayout::kInPlace)
    cache->advance(1);
  else
    cache->update(positions.data(), 1, new_key_ptrs, new_value_ptrs);
}

// One piece of Generator._prefill (`width` prompt tokens from position `start`) through the prefill graphs, asking
// for the logits of its last token. In place (OrtBackend._prefill_in_place) it runs as one step when the cache is
// empty and the piece fits; otherwise in steps cut at chunk boundaries, the last of which holds the wanted token.
void Model::Impl::prefill(const int64_t* tokens, int64_t start, int64_t width) {
  auto step = [&](int64_t from, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      ids[t] = tokens[from + t];
      positions[t] = start + from + t;
    }
    logits_index = from + count == width ? count - 1 : 0;
    if (layout == KVLayout::kInPlace) cache->reserve(count);
    if (prompt_features) {  // the rows of this step's image placeholder tokens
      const int64_t before = image_rows_before[start + from];
      step_feature_rows = image_rows_before[start + from + count] - before;
      step_features = prompt_features + before * artifact.config.hidden_size;
    }
    std::vector<Ort::IoBinding> bindings = bind(true, count);
    step_feature_rows = 0;
    run(bindings, true);
    if (layout == KVLayout::kInPlace)
      cache->advance(count);
    else
      cache->update(positions.data(), count, new_key_ptrs, new_value_ptrs);
  };
  if (layout == KVLayout::kPositions || (cache->length() == 0 && width <= cache->piece_limit())) {
    step(0, width);
    return;
  }
  for (int64_t done = 0; done < width;) {
    const int64_t count = std::min(cache->piece_limit(), width - done);
    step(done, count);
    done += count;
  }
}

Result Model::Impl::generate(const Prompt& with_images, const GenerateOptions& options,
                             const TokenCallback& on_token, Model& model) {
  if (generating_thread.load() == std::this_thread::get_id())
    throw Error("Model::generate was called from its own token callback; a Model runs one generation at a time");
  std::lock_guard<std::mutex> lock(generating);
  generating_thread = std::this_thread::get_id();
  struct Release {
    std::atomic<std::thread::id>& thread;
    ~Release() { thread = std::thread::id(); }
  } release{generating_thread};
  const ModelConfig& c = artifact.config;
  const std::vector<int64_t>& prompt = with_images.ids;
  if (prompt.empty()) throw Error("the prompt is empty; give at least one token");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size)
      throw Error("prompt token " + std::to_string(i) + " is id " + std::to_string(prompt[i]) +
                  ", outside the vocabulary 0.." + std::to_string(c.vocab_size - 1) + "; check the ids");
  if (options.max_new_tokens < 0)
    throw Error("max_new_tokens=" + std::to_string(options.max_new_tokens) + ": must be >= 0");
  check_sampling(options.sampling);
  for (const std::string& stop : options.stop_strings) {
    if (stop.empty()) throw Error("stop_strings: a stop string is empty; give non-empty strings");
    // a lone byte of a character matched inside one of the text's and cut the text there, leaving it invalid UTF-8
    if (valid_utf8(stop) != stop) throw Error("stop_strings: a stop string is not UTF-8; give UTF-8 text");
  }
  if (!options.stop_strings.empty() && !text)
    throw Error("stop strings need the tokenizer: " + no_text + "; give stop token ids instead");
  for (const auto& [token, bias] : options.sampling.logit_bias)
    if (token >= c.vocab_size)
      throw Error("logit_bias: token " + std::to_string(token) + " is outside the vocabulary of " +
                  std::to_string(c.vocab_size) + " tokens");
  prompt_features = nullptr;
  if (!with_images.image_features.empty()) {
    if (!artifact.vision) throw Error("image features given but this artifact has no vision graph; export a "
                                      "multimodal checkpoint for images");
    image_rows_before.assign(1, 0);
    for (int64_t id : prompt)
      image_rows_before.push_back(image_rows_before.back() + (id == artifact.vision->image_token_id ? 1 : 0));
    const int64_t rows = image_rows_before.back();
    if (static_cast<int64_t>(with_images.image_features.size()) != rows * c.hidden_size)
      throw Error("the prompt has " + std::to_string(rows) + " image placeholder token(s) but " +
                  std::to_string(with_images.image_features.size() / c.hidden_size) + " image feature row(s) of " +
                  std::to_string(c.hidden_size) + "; make the prompt with Model::encode(text, images)");
    prompt_features = with_images.image_features.data();
  }
  const std::vector<int64_t>& stop_list = options.stop_tokens ? *options.stop_tokens : artifact.stop_tokens;
  // generator.check_stop_tokens: an id outside the vocabulary never stops anything; only the caller's are checked (as
  // Generator: the config's eos ids are no option the caller gave, and one outside the vocabulary is harmless)
  if (options.stop_tokens)
    for (int64_t token : stop_list)
      if (token < 0 || token >= c.vocab_size) {
        std::string listed;
        for (int64_t t : stop_list) listed += (listed.empty() ? "" : ", ") + std::to_string(t);
        throw Error("stop_tokens=[" + listed + "]: give a list of token ids in 0.." + std::to_string(c.vocab_size - 1));
      }
  const std::set<int64_t> stops(stop_list.begin(), stop_list.end());

  Result result;
  result.prompt_ids = prompt;
  result.stop_reason = "length";
  if (options.max_new_tokens == 0) {
    if (text) result.text = "";
    return result;
  }
  // max_new_tokens may mean "until a stop token" (10^11): the ids grow as they come past a first few thousand
  result.token_ids.reserve(static_cast<size_t>(std::min<int64_t>(options.max_new_tokens, 4096)));
  std::optional<TextStream> cut_text;  // with stop strings, the text as it arrives, cut before the first
  std::string kept;
  if (!options.stop_strings.empty()) cut_text.emplace(model, options.stop_strings);
  cache->reset();
  sampler->start(options.sampling);
  for (int64_t id : prompt) sampler->saw(id);

  // Generator._prefill: pieces of at most max_prefill_tokens; the last one leaves the prompt's last logits.
  const int64_t length = static_cast<int64_t>(prompt.size());
  reserve_steps(std::min(max_prefill_tokens, length));
  for (int64_t start = 0; start < length; start += max_prefill_tokens) {
    const int64_t count = std::min(max_prefill_tokens, length - start);
    prefill(prompt.data() + start, start, count);
    if (options.on_prefill) host_call([&] { options.on_prefill(start + count, length); });
  }
  prompt_features = nullptr;
  // Generator._events: sample, stop at a stop token or max_new_tokens, otherwise decode the token.
  const float* logits = reinterpret_cast<const float*>(parts.back().out.data());
  while (true) {
    const int64_t token = (*sampler)(logits);
    sampler->generated(token);
    result.token_ids.push_back(token);
    const bool stop = stops.count(token) > 0;
    if (cut_text && !stop) kept += cut_text->push(token);
    if (on_token) host_call([&] { on_token(token, stop); });
    if (stop || (cut_text && cut_text->stopped())) {
      result.stop_reason = "stop";
      break;
    }
    if (static_cast<int64_t>(result.token_ids.size()) == options.max_new_tokens) break;
    decode(token);
  }
  if (cut_text) {
    result.text = kept + cut_text->flush();
  } else if (text) {
    const bool stopped = result.stop_reason == "stop";
    result.text = text->decode({result.token_ids.begin(), result.token_ids.end() - (stopped ? 1 : 0)});
  }
  return result;
}

// --- the public class: every failure leaves as llama4rt::Error ----------------------------------------------------

namespace {
template <typename F>
auto guarded(F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const FromCallback& thrown) {
    std::rethrow_exception(thrown.error);  // the host's own exception (how it cancels), not turned into an Error
  } catch (const Error&) {
    throw;
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime: ") + first_line(e.what()));
  } catch (const std::bad_alloc&) {
    throw Error("out of memory; lower --window or use a smaller artifact");
  } catch (const std::exception& e) {
    throw Error(first_line(e.what()));
  }
}
}  // namespace

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Model::Impl& Model::impl() const {
  if (!impl_) throw Error("this Model was moved from; use the Model it was moved to");
  return *impl_;
}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

Model Model::open(const std::string& artifact_dir, const OpenOptions& options) {
  return guarded([&] {
    auto impl = std::make_unique<Impl>();
    impl->open(artifact_dir, options);
    return Model(std::move(impl));
  });
}

Result Model::generate(const std::vector<int64_t>& prompt_ids, const GenerateOptions& options,
                       const TokenCallback& on_token) {
  return guarded([&] { return impl().generate(Prompt{prompt_ids, {}}, options, on_token, *this); });
}

Result Model::generate(const Prompt& prompt, const GenerateOptions& options, const TokenCallback& on_token) {
  return guarded([&] { return impl().generate(prompt, options, on_token, *this); });
}

bool Model::has_vision() const { return impl().vision != nullptr; }

Prompt Model::encode(const std::string& text, const std::vector<Image>& images) const {
  if (images.empty()) {  // text alone, as Generator.generate(text, images=[]): an <|image|> in it is just text
    Prompt prompt;
    prompt.ids = encode(text);
    return prompt;
  }
  return guarded([&] { return impl().encode(text, images); });
}

bool Model::has_tokenizer() const { return impl().text != nullptr; }

std::string TextStream::push(int64_t token) {
  ids_.push_back(token);
  return cut(piece(/*final=*/false));
}

std::string TextStream::flush() {
  std::string text = cut(piece(/*final=*/true));
  if (!stopped_) text += held_;
  held_.clear();
  return text;
}

std::string TextStream::cut(const std::string& piece) {
  if (stopped_) return "";
  if (stop_strings_.empty()) return piece;
  const std::string text = held_ + piece;
  size_t first = std::string::npos;
  for (const std::string& stop : stop_strings_) first = std::min(first, text.find(stop));
  if (first != std::string::npos) {
    stopped_ = true;
    held_.clear();
    return text.substr(0, first);
  }
  // Hold back the longest tail that begins a stop string. Byte-wise is character-wise here: the pieces end on whole
  // characters and a stop string starts with one.
  size_t keep = 0;
  for (const std::string& stop : stop_strings_)
    for (size_t k = 1; k < stop.size() && k <= text.size(); ++k)
      if (text.compare(text.size() - k, k, stop, 0, k) == 0) keep = std::max(keep, k);
  held_ = text.substr(text.size() - keep);
  return text.substr(0, text.size() - keep);
}

std::string TextStream::piece(bool final) {
  auto decoded = [&](size_t end) {
    return end == context_ ? std::string() : model_.decode(std::vector<int64_t>(ids_.begin() + context_, ids_.begin() + end));
  };
  const std::string given = decoded(emitted_);
  const std::string text = decoded(ids_.size());
  static const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD: an incomplete character so far
  const bool incomplete = text.size() >= kReplacement.size() &&
                          text.compare(text.size() - kReplacement.size(), kReplacement.size(), kReplacement) == 0;
  if (!final && (text.size() <= given.size() || incomplete)) return "";
  context_ = emitted_;
  emitted_ = ids_.size();
  return text.substr(std::min(given.size(), text.size()));
}

std::vector<int64_t> Model::encode(const std::string& text) const {
  if (!impl().text) throw Error("text prompts need the tokenizer: " + impl().no_text + "; give token ids instead");
  if (text.empty()) throw Error("the prompt is empty; give at least one token");  // as Generator.encode: no lone BOS
  return guarded([&] { return impl().text->encode(text); });
}

std::string Model::decode(const std::vector<int64_t>& ids) const {
  if (!impl().text) throw Error("decoding needs the tokenizer: " + impl().no_text);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab_size())
      throw Error("token " + std::to_string(i) + " is id " + std::to_string(ids[i]) + ", outside the vocabulary 0.." +
                  std::to_string(vocab_size() - 1));
  return guarded([&] { return impl().text->decode(ids); });
}

int64_t Model::vocab_size() const { return impl().artifact.config.vocab_size; }
int64_t Model::window() const { return impl().cache->window(); }
int64_t Model::sinks() const { return impl().cache->sinks(); }
std::vector<int64_t> Model::stop_tokens() const { return impl().artifact.stop_tokens; }

}  // namespace llama4rt
