#include "tokenizer.hpp"

#include <utility>

#include "llama4rt.hpp"

namespace llama4rt {
namespace {

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// The length of the well-formed UTF-8 prefix of s[i..] that one character starts (0: s[i] cannot start one), and
// whether it is complete. Second-byte ranges exclude overlong forms, surrogates and code points above U+10FFFF.
size_t utf8_prefix(const std::string& s, size_t i, bool& complete) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char lead = byte(i);
  complete = true;
  if (lead < 0x80) return 1;
  size_t need;
  unsigned char low = 0x80, high = 0xBF;  // the second byte's range
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    complete = false;
    return 0;
  }
  size_t n = 1;
  for (; n < need && i + n < s.size(); ++n) {
    const unsigned char b = byte(i + n);
    if (n == 1 ? (b < low || b > high) : (b < 0x80 || b > 0xBF)) break;
  }
  complete = n == need;
  return n;
}

}  // namespace

std::string valid_utf8(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    bool complete;
    const size_t n = utf8_prefix(bytes, i, complete);
    if (complete) {
      out.append(bytes, i, n);
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal subpart (or the one byte that cannot start a character)
    }
    i += n ? n : 1;
  }
  return out;
}

TextCodec::Graph TextCodec::load(const Ort::Env& env, const std::string& path, const Ort::SessionOptions& options) {
  Graph g;
  try {
    g.session = std::make_unique<Ort::Session>(env, path.c_str(), options);
    g.input = g.session->GetInputNameAllocated(0, allocator_).get();
    g.output = g.session->GetOutputNameAllocated(0, allocator_).get();
  } catch (const Ort::Exception& e) {
    throw Error(path + ": ONNX Runtime cannot load this tokenizer graph (" + first_line(e.what()) +
                "); re-run the export");
  }
  return g;
}

TextCodec::TextCodec(const Ort::Env& env, const std::string& encode_graph, const std::string& decode_graph,
                     std::map<int64_t, std::string> nul_byte_tokens, const std::string& extensions_library)
    : nul_byte_tokens_(std::move(nul_byte_tokens)) {
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(1);
  try {
    options.RegisterCustomOpsLibrary(extensions_library.c_str());
  } catch (const Ort::Exception& e) {
    throw Error(extensions_library + ": cannot load onnxruntime-extensions' custom-op library (" +
                first_line(e.what()) + "); run `make cpp` to provision it, or pass ids instead of text");
  }
  encode_ = load(env, encode_graph, options);
  decode_ = load(env, decode_graph, options);
}

std::vector<int64_t> TextCodec::encode(const std::string& text) {
  if (text.find('\0') != std::string::npos)
    throw Error("the text holds a NUL character, which the tokenizer graph cannot take; remove it or give token ids");
  for (size_t i = 0; i < text.size();) {  // Python's text is Unicode by construction; bytes from a host may not be
    bool complete;
    const size_t n = utf8_prefix(text, i, complete);
    if (!complete)
      throw Error("the text is not UTF-8 (byte " + std::to_string(i) + " starts no well-formed character); give "
                  "UTF-8 text");
    i += n;
  }
  const int64_t shape[] = {1};
  Ort::Value input = Ort::Value::CreateTensor(allocator_, shape, 1, ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING);
  input.FillStringTensorElement(text.c_str(), 0);
  const Ort::Value output = run(encode_, input, "encode the prompt");
  const int64_t* ids = output.GetTensorData<int64_t>();
  return std::vector<int64_t>(ids, ids + output.GetTensorTypeAndShapeInfo().GetElementCount());
}

std::string TextCodec::decode(const std::vector<int64_t>& ids) {
  // The graph decodes the runs between NUL-byte tokens; those tokens' bytes come from the manifest.
  std::string bytes;
  size_t start = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto nul = nul_byte_tokens_.find(ids[i]);
    if (nul == nul_byte_tokens_.end()) continue;
    bytes += decode_bytes(ids.data() + start, i - start) + nul->second;
    start = i + 1;
  }
  return valid_utf8(bytes + decode_bytes(ids.data() + start, ids.size() - start));
}

std::string TextCodec::decode_bytes(const int64_t* ids, size_t count) {
  if (count == 0) return "";
  const int64_t shape[] = {1, static_cast<int64_t>(count)};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value input = Ort::Value::CreateTensor<int64_t>(cpu, const_cast<int64_t*>(ids), count, shape, 2);
  return run(decode_, input, "decode the generated ids").GetStringTensorElement(0);
}

Ort::Value TextCodec::run(Graph& graph, Ort::Value& input, const char* what) {
  const char* in = graph.input.c_str();
  const char* out = graph.output.c_str();
  try {
    return std::move(graph.session->Run(Ort::RunOptions{nullptr}, &in, &input, 1, &out, 1)[0]);
  } catch (const Ort::Exception& e) {
    throw Error(std::string("the tokenizer cannot ") + what + " (" + first_line(e.what()) + ")");
  }
}

}  // namespace llama4rt
