// Text in and out: the artifact's tokenizer graphs (llama4_export/export/tokenizer_files.py TOKENIZER_GRAPHS), made
// by onnxruntime-extensions from tokenizer.json and run here on ONNX Runtime with the extensions' custom-op library.
// The exporter writes them only after they tokenize its probe texts exactly as `tokenizers` does.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

namespace llama4rt {

class TextCodec {
 public:
  // Throws Error naming the graph or the library that cannot be loaded.
  // nul_byte_tokens: the bytes of the tokens holding a NUL byte, where the decode graph's output ends.
  TextCodec(const Ort::Env& env, const std::string& encode_graph, const std::string& decode_graph,
            std::map<int64_t, std::string> nul_byte_tokens, const std::string& extensions_library);
  // tokenizers' encode(text).ids: the tokenizer's own pre- and post-processing, <|begin_of_text|> included. Text
  // holding a NUL character is refused (the graph's string input ends there).
  std::vector<int64_t> encode(const std::string& text);
  // tokenizers' decode(ids): special tokens skipped, invalid UTF-8 replaced as it replaces it.
  std::string decode(const std::vector<int64_t>& ids);

 private:
  struct Graph {
    std::unique_ptr<Ort::Session> session;
    std::string input, output;
  };
  Graph load(const Ort::Env& env, const std::string& path, const Ort::SessionOptions& options);
  std::string decode_bytes(const int64_t* ids, size_t count);
  Ort::Value run(Graph& graph, Ort::Value& input, const char* what);  // the graph's one output
  Graph encode_, decode_;
  std::map<int64_t, std::string> nul_byte_tokens_;
  Ort::AllocatorWithDefaultOptions allocator_;
};

// `bytes` with each maximal ill-formed UTF-8 subsequence replaced by U+FFFD (Unicode's recommended practice, what
// Rust's String::from_utf8_lossy and so `tokenizers`' decode do).
std::string valid_utf8(const std::string& bytes);

}  // namespace llama4rt
