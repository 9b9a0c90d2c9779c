// Text in and out through the artifact's tokenizer.json, run by ONNX Runtime with onnxruntime-extensions' custom ops.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

namespace llama4rt {

class Tokenizer {
 public:
  // The directory's tokenizer, or null when it has no tokenizer.json or no custom-op library is available.
  static std::unique_ptr<Tokenizer> load(const std::string& directory, Ort::Env& env);
  std::vector<int64_t> encode(const std::string& text);
  std::string decode(const std::vector<int64_t>& ids);
};

}  // namespace llama4rt
