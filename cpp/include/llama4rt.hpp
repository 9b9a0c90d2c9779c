// llama4rt: run a llama4-export artifact (manifest.json + decode/prefill ONNX graphs) from C++ through ONNX Runtime,
// with the same sliding KV cache, prompt feeding and sampler as the Python runtime (llama4_export/runtime/), token
// for token.
//
//   llama4rt::OpenOptions open_options;
//   open_options.window = 4096;
//   llama4rt::Model model = llama4rt::Model::open("out/scout-int4", open_options);
//   llama4rt::GenerateOptions options;
//   options.max_new_tokens = 32;
//   llama4rt::Result result = model.generate(model.encode("The history of"), options,
//                                            [](int64_t token, bool stop) { /* each new token as it is chosen */ });
//   // result.text: the new tokens as text (with the artifact's tokenizer graphs, see Model::has_tokenizer)
//   llama4rt::Result described = model.generate(model.encode("<|image|>Describe it.", {image}), options);
//
// Every failure (bad artifact, a graph that does not match its manifest, bad ids or options, an ONNX Runtime error)
// throws llama4rt::Error with one line naming the file or value and what to do; nothing aborts the host process.
// A Model runs one generation at a time: its KV cache is allocated once and reused by every call. Its other methods
// (encode, decode, the getters) may be called from any thread, also while another thread generates; a TextStream
// refers to its Model, which must outlive it. A moved-from Model throws Error from every method.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace llama4rt {

// The artifact format version (manifest.json "format_version") this library reads; others are refused.
constexpr int kFormatVersion = 3;

// The most ONNX Runtime intra-op threads OpenOptions::threads may ask for (each holds a stack; beyond the cores they
// only contend).
constexpr int kMaxThreads = 1024;

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OpenOptions {
  // Global-layer KV window W in tokens; empty = the model's context, capped so those layers' cache stays under 1 GiB.
  std::optional<int64_t> window;
  int64_t sinks = 4;            // tokens S kept forever once a sequence outgrows W
  int threads = 0;              // ONNX Runtime intra-op threads, 1..kMaxThreads; 0 = its default
  std::optional<int64_t> max_prefill_tokens;  // lower the prefill piece size below the graph's limit
  // onnxruntime-extensions' custom-op library, which runs the artifact's tokenizer graphs; empty = the one this
  // llama4rt was built with (CMake ORTX_LIBRARY; `make cpp` provisions it), if any and if it is still there. Without
  // one, ids in and out (has_tokenizer() false, encode/decode say why); one named here that cannot load is an Error.
  std::string extensions_library;
  // Check every file manifest.json lists against its sha256 before loading (Generator.load's verify): a damaged or
  // modified file is refused in one line. A file verified unchanged before, by llama4rt or the Python runtime, is not
  // hashed again (its path and stat are kept in $XDG_CACHE_HOME/llama4-export/verified.json).
  bool verify = true;
};

// runtime/sampling.py SamplingParams.
struct SamplingOptions {
  double temperature = 0.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  double repetition_penalty = 1.0;  // 1 = off
  uint64_t seed = 0;  // Python's seed % 2**64: a negative one (OpenAI's are signed) as its two's complement
  // OpenAI's penalties over the generated tokens:
  // logit − count × frequency_penalty − (count > 0) × presence_penalty
  double frequency_penalty = 0.0;  // [-2, 2]; 0 = off
  double presence_penalty = 0.0;   // [-2, 2]; 0 = off
  std::vector<std::pair<int64_t, double>> logit_bias;  // (token id, bias in [-100, 100]) added to its logit
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  std::optional<std::vector<int64_t>> stop_tokens;  // empty = the config's and generation_config.json's eos ids
  // The generation ends where its text first holds one of these (Result::text cut before it, stop_reason "stop"; the
  // last token is the one completing it), as llama4-run --stop; needs has_tokenizer().
  std::vector<std::string> stop_strings;
  // Called after each prefill piece (OpenOptions::max_prefill_tokens tokens at most) with the prompt tokens run so far
  // and the prompt's length: a long prompt's progress. Throwing from it cancels, as from the token callback.
  std::function<void(int64_t done, int64_t total)> on_prefill;
};

struct Result {
  std::vector<int64_t> prompt_ids;
  std::vector<int64_t> token_ids;  // the new tokens; a stop token that ended generation is the last one
  std::string stop_reason;         // "stop" or "length"
  std::optional<std::string> text;  // the new tokens decoded (stop token excluded) when has_tokenizer()
};

// An image as 8-bit RGB pixels, row-major [height][width][3]: decoded by the host's image library, turned upright
// by its EXIF orientation and any transparency composited onto white (what the Python runtime's load_image and
// to_rgb do before tiling).
struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

// A prompt with its images: the ids with each image's placeholder expanded to its tile grid's tokens, and the vision
// graph's features of every tile, [rows of the image placeholder tokens, hidden] row-major, in prompt order.
struct Prompt {
  std::vector<int64_t> ids;
  std::vector<float> image_features;
};

// Called with every new token as it is chosen; `stop` = it is a stop token (it ends the generation). To end a
// generation early (the user cancelled, the client went away), throw from it (or from GenerateOptions::on_prefill,
// during the prompt): generate stops there and rethrows that exception unchanged (not as Error), and the Model is
// ready for the next call.
using TokenCallback = std::function<void(int64_t token, bool stop)>;

class Model {
 public:
  // Reads and checks manifest.json (format version, config, the graphs' inputs/outputs) and loads the graphs.
  static Model open(const std::string& artifact_dir, const OpenOptions& options = {});

  // One generation at a time (the KV cache is the Model's): threads calling generate on one Model take turns; a call
  // from inside its own token callback throws.
  Result generate(const std::vector<int64_t>& prompt_ids, const GenerateOptions& options = {},
                  const TokenCallback& on_token = {});
  Result generate(const Prompt& prompt, const GenerateOptions& options = {}, const TokenCallback& on_token = {});

  // Images (an artifact of a multimodal checkpoint, see has_vision): `text`'s k-th `<|image|>` placeholder marks
  // images[k]; each image is tiled as the Python runtime tiles it, its placeholder expanded, the text encoded (needs
  // has_tokenizer) and the tiles run through the vision graph.
  bool has_vision() const;
  Prompt encode(const std::string& text, const std::vector<Image>& images) const;

  // Text in and out through the artifact's tokenizer graphs, as llama4-run's tokenizer.json: has_tokenizer() says
  // whether they and the extensions library are there; encode/decode throw Error saying why not otherwise.
  bool has_tokenizer() const;
  std::vector<int64_t> encode(const std::string& text) const;  // <|begin_of_text|> included
  std::string decode(const std::vector<int64_t>& ids) const;   // special tokens skipped

  int64_t vocab_size() const;
  int64_t window() const;  // the resolved global window W
  int64_t sinks() const;
  std::vector<int64_t> stop_tokens() const;

  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  Impl& impl() const;  // throws Error once moved from
  std::unique_ptr<Impl> impl_;
};

// The new tokens as text pieces while they arrive (llama4-run --stream; runtime/tokenizer.py StreamDecoder): push()
// returns what the tokens so far add to the text, "" while they end inside a UTF-8 character; flush() at the end
// returns what is still held back (an incomplete character as U+FFFD, as Result::text has it). Each push decodes the
// tokens since the last piece plus that piece's, not the whole text: the same cost per token at any length.
// With stop strings (GenerateOptions::stop_strings): text that may begin one is held back until it cannot, and the
// text ends before the first one (stopped() tells; nothing follows). Needs has_tokenizer().
class TextStream {
 public:
  explicit TextStream(Model& model, std::vector<std::string> stop_strings = {})
      : model_(model), stop_strings_(std::move(stop_strings)) {}
  std::string push(int64_t token);
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::string piece(bool final);
  std::string cut(const std::string& piece);  // runtime/sampling.py StopStrings.push
  Model& model_;
  std::vector<std::string> stop_strings_;
  std::vector<int64_t> ids_;
  size_t context_ = 0;  // ids_[context_, emitted_): the last piece's tokens, decoded again as left context
  size_t emitted_ = 0;  // ids_[0, emitted_) have been returned as text
  std::string held_;    // text that may begin a stop string
  bool stopped_ = false;
};

}  // namespace llama4rt
