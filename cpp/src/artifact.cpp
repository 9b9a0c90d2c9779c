#include "artifact.hpp"

#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "llama4rt.hpp"

namespace llama4rt {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kFormat = "llama4-export";
constexpr const char* kGenerationConfig = "generation_config.json";

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

json read_json(const fs::path& path, const std::string& what_to_do) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read; " + what_to_do);
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::exception& e) {
    throw Error(path.string() + ": not valid JSON (" + first_line(e.what()) + "); " + what_to_do);
  }
}

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read; re-run the export");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!context || EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr) != 1)
    throw Error("OpenSSL could not start a SHA-256 digest");
  std::vector<char> block(1 << 20);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    EVP_DigestUpdate(context.get(), block.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) throw Error(path.string() + ": a read failed while hashing it; check the disk, re-run the export");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context.get(), digest, &length);
  static const char* const kHex = "0123456789abcdef";
  std::string text;
  for (unsigned int i = 0; i < length; ++i) {
    text += kHex[digest[i] >> 4];
    text += kHex[digest[i] & 15];
  }
  return text;
}

// artifact._VerifiedFiles, sharing its file ($XDG_CACHE_HOME/llama4-export/verified.json): files whose sha256 matched,
// keyed by real path and [device, inode, size, mtime ns, ctime ns, sha256], so a load of an unchanged artifact hashes
// nothing — whichever runtime, Python or C++, verified it first. Entries stay in insertion order (the oldest are
// dropped past kMaxEntries); a file changed within kRacySeconds is not stored; a cache that cannot be read or
// written only means hashing again.
class VerifiedFiles {
 public:
  VerifiedFiles() {
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    if (xdg && *xdg) path_ = fs::path(xdg) / kFormat / "verified.json";
    else if (home && *home) path_ = fs::path(home) / ".cache" / kFormat / "verified.json";
    std::ifstream in(path_);
    if (path_.empty() || !in) return;
    try {
      nlohmann::ordered_json entries = nlohmann::ordered_json::parse(in);
      if (entries.is_object()) entries_ = std::move(entries);
    } catch (const nlohmann::ordered_json::exception&) {
    }
  }

  bool holds(const fs::path& file, const struct stat& st, const std::string& sha256) const {
    const auto found = entries_.find(key_path(file));
    return found != entries_.end() && *found == key(st, sha256);
  }

  void add(const fs::path& file, const struct stat& st, const std::string& sha256) {
    const auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::system_clock::now().time_since_epoch()).count();
    if (now - std::max(mtime_ns(st), ctime_ns(st)) < static_cast<int64_t>(kRacySeconds * 1e9)) return;
    const std::string name = key_path(file);
    entries_.erase(name);  // re-inserted last: the oldest entries are dropped first
    entries_[name] = key(st, sha256);
    changed_ = true;
  }

  void save() const {
    if (!changed_ || path_.empty()) return;
    nlohmann::ordered_json kept = nlohmann::ordered_json::object();
    const size_t skip = entries_.size() > kMaxEntries ? entries_.size() - kMaxEntries : 0;
    size_t i = 0;
    for (const auto& [name, entry] : entries_.items())
      if (i++ >= skip) kept[name] = entry;
    std::error_code error;
    fs::create_directories(path_.parent_path(), error);
    std::string tmp = (path_.parent_path() / ".verified-XXXXXX.json").string();
    const int fd = mkstemps(tmp.data(), 5);
    if (fd < 0) return;
    const std::string text = kept.dump();
    const bool written = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    // concurrent loads: the last complete file wins; a full disk leaves no half-written temp file
    if (close(fd) != 0 || !written || std::rename(tmp.c_str(), path_.c_str()) != 0) std::remove(tmp.c_str());
  }

 private:
  static constexpr double kRacySeconds = 2.0;
  static constexpr size_t kMaxEntries = 4096;

  static int64_t mtime_ns(const struct stat& st) { return int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec; }
  static int64_t ctime_ns(const struct stat& st) { return int64_t{st.st_ctim.tv_sec} * 1000000000 + st.st_ctim.tv_nsec; }
  static std::string key_path(const fs::path& file) { return fs::canonical(file).string(); }
  static nlohmann::ordered_json key(const struct stat& st, const std::string& sha256) {
    return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
            mtime_ns(st), ctime_ns(st), sha256};
  }

  fs::path path_;
  nlohmann::ordered_json entries_ = nlohmann::ordered_json::object();
  bool changed_ = false;
};

// artifact.is_artifact_name: a name `files` may list is relative, with no "..", "." or empty part and no control
// character (a "../x" or absolute one was hashed, and a graph field naming it loaded, outside the artifact).
bool is_artifact_name(const std::string& name) {
  if (name.empty() || name.front() == '/' || name.back() == '/') return false;
  if (std::any_of(name.begin(), name.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; })) return false;
  std::stringstream parts(name);
  for (std::string part; std::getline(parts, part, '/');)
    if (part.empty() || part == "." || part == "..") return false;
  return true;
}

// artifact.listed_file: a file a manifest field names (a graph) must be one `files` lists, so inside the artifact and
// verified with it (an unlisted or absolute one was loaded unchecked; a FIFO hung ONNX Runtime).
std::string listed_file(const json& manifest, const fs::path& directory, const json& name, const std::string& field) {
  if (!name.is_string() || !manifest["files"].contains(name.get<std::string>()))
    throw Error((directory / kManifest).string() + ": " + field + "=" + name.dump() + ": not a file the artifact " +
                "lists in `files`; re-run the export");
  return (directory / name.get<std::string>()).string();
}

// A manifest and the checks every manifest passes (artifact.read_manifest); with verify, every listed file's sha256.
json read_manifest(const fs::path& directory, bool verify = false) {
  if (fs::exists(directory) && !fs::is_directory(directory))
    throw Error(directory.string() + ": a file, not an artifact directory; give the directory `llama4-export --out` "
                "wrote");
  if (!fs::is_directory(directory))
    throw Error(directory.string() + ": artifact directory not found; create one with `llama4-export --out " +
                directory.string() + "`");
  const fs::path path = directory / kManifest;
  if (!fs::is_regular_file(path))
    throw Error(path.string() + ": missing; this is not a complete llama4-export artifact (re-run the export)");
  json manifest = read_json(path, "re-run the export");
  if (!manifest.is_object() || !manifest.contains("format") || !manifest["format"].is_string() ||
      manifest["format"].get<std::string>().rfind(kFormat, 0) != 0 || !manifest.contains("files") ||
      !manifest["files"].is_object())
    throw Error(path.string() + ": not a " + std::string(kFormat) + " manifest; re-run the export");
  const json& version = manifest.contains("format_version") ? manifest["format_version"] : json();
  if (!(version.is_number_integer() && version.get<int64_t>() == kFormatVersion))
    throw Error(path.string() + ": artifact format version " +
                (version.is_null() ? std::string("0 (unversioned)") : version.dump()) +
                ", but this llama4rt reads version " + std::to_string(kFormatVersion) +
                "; re-export with a matching llama4-export (or use the llama4rt built for that version)");
  std::optional<VerifiedFiles> verified;
  if (verify) verified.emplace();
  for (const auto& [name, digest] : manifest["files"].items()) {
    if (!is_artifact_name(name))
      throw Error(path.string() + ": files[" + json(name).dump() + "]: not a path inside the artifact (relative, of " +
                  "plain names); re-run the export");
    const fs::path file = directory / name;
    if (!fs::is_regular_file(file))
      throw Error(file.string() + ": listed in " + kManifest + " but missing; the artifact is incomplete, re-run the export");
    if (!verify) continue;
    if (!digest.is_string()) throw Error(path.string() + ": files['" + name + "'] is not a sha256; re-run the export");
    struct stat st {};
    if (stat(file.c_str(), &st) != 0) throw Error(file.string() + ": cannot be read; re-run the export");
    // stat before hashing: a write during the hash changes it, and the next load hashes again
    if (verified->holds(file, st, digest.get<std::string>())) continue;
    if (sha256_file(file) != digest.get<std::string>())
      throw Error(file.string() + ": sha256 does not match " + kManifest +
                  "; the file was modified or damaged, re-run the export");
    verified->add(file, st, digest.get<std::string>());
  }
  if (verified) verified->save();
  return manifest;
}

// The config section Python reads with Llama4Config.from_hf_dict (a multimodal config nests it in text_config).
ModelConfig parse_config(const json& manifest, const std::string& source) {
  if (!manifest.contains("model") || !manifest["model"].is_object())
    throw Error(source + ": has no 'model' config object; re-run the export");
  const json& raw = manifest["model"];
  const json& cfg = raw.contains("text_config") && raw["text_config"].is_object() ? raw["text_config"] : raw;
  auto need = [&](const char* key) -> int64_t {
    if (!cfg.contains(key) || cfg[key].is_null())
      throw Error(source + ": required field '" + key + "' is missing; the config is not a complete Llama 4 text config");
    if (!cfg[key].is_number_integer()) throw Error(source + ": field '" + key + "' is not an integer; re-run the export");
    return cfg[key].get<int64_t>();
  };
  auto optional_int = [&](const char* key) -> std::optional<int64_t> {
    if (!cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
    if (!cfg[key].is_number_integer()) throw Error(source + ": field '" + key + "' is not an integer; re-run the export");
    return cfg[key].get<int64_t>();
  };
  // llama4_export.model.config.SIZE_FIELDS: a 0 divides by zero later (heads, a chunk's positions)
  for (const char* key : {"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                          "vocab_size", "attention_chunk_size", "max_position_embeddings", "no_rope_layer_interval"}) {
    const bool derived_when_0 = std::string(key) == "num_key_value_heads" || std::string(key) == "head_dim";
    const std::optional<int64_t> value = optional_int(key);
    if (value && *value < 1 && !(derived_when_0 && *value == 0))
      throw Error(source + ": " + key + "=" + std::to_string(*value) + ": must be >= 1; re-run the export");
  }
  ModelConfig c;
  c.vocab_size = need("vocab_size");
  c.hidden_size = need("hidden_size");
  c.num_hidden_layers = need("num_hidden_layers");
  const int64_t heads = need("num_attention_heads");
  c.num_attention_heads = heads;
  const std::optional<int64_t> kv_heads = optional_int("num_key_value_heads");
  c.num_key_value_heads = kv_heads && *kv_heads ? *kv_heads : heads;  // `num_key_value_heads or heads`
  c.head_dim = optional_int("head_dim").value_or(c.hidden_size / std::max<int64_t>(heads, 1));
  if (c.head_dim == 0) c.head_dim = c.hidden_size / std::max<int64_t>(heads, 1);  // `head_dim or hidden // heads`
  c.attention_chunk_size = optional_int("attention_chunk_size");
  c.max_position_embeddings = optional_int("max_position_embeddings").value_or(4096);
  c.pad_token_id = optional_int("pad_token_id");
  if (cfg.contains("eos_token_id") && !cfg["eos_token_id"].is_null()) {
    const json& eos = cfg["eos_token_id"];
    for (const json& e : eos.is_array() ? eos : json::array({eos})) {
      if (!e.is_number_integer()) throw Error(source + ": eos_token_id holds a non-integer; re-run the export");
      c.eos_token_ids.push_back(e.get<int64_t>());
    }
  }
  std::vector<int64_t> no_rope;
  if (cfg.contains("no_rope_layers") && cfg["no_rope_layers"].is_array() && !cfg["no_rope_layers"].empty()) {
    for (const json& x : cfg["no_rope_layers"]) no_rope.push_back(x.get<int64_t>());
  } else {
    const int64_t interval = optional_int("no_rope_layer_interval").value_or(4);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) no_rope.push_back((i + 1) % interval != 0);
  }
  if (static_cast<int64_t>(no_rope.size()) < c.num_hidden_layers)
    throw Error(source + ": no_rope_layers has " + std::to_string(no_rope.size()) + " entries for " +
                std::to_string(c.num_hidden_layers) + " layers; re-run the export");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    c.kinds.push_back(no_rope[i] ? AttentionKind::kChunked : AttentionKind::kGlobal);
  if (c.vocab_size < 1 || c.num_hidden_layers < 1 || c.num_key_value_heads < 1 || c.head_dim < 1)
    throw Error(source + ": the model config has a non-positive size; re-run the export");
  return c;
}

// ort_backend._one_graph_serves_both: with the MoE lowered to an ONNX Runtime op that routes each token to its expert
// in both graphs, the prefill graph computes a one-token step exactly as the decode graph does, so it serves both
// (and ONNX Runtime prepacks its weights once).
bool one_graph_serves_both(const json& graphs) {
  auto lowering = [&](const char* name) {
    const json& g = graphs[name];
    return g.contains("moe_lowering") && g["moe_lowering"].is_string() ? g["moe_lowering"].get<std::string>()
                                                                       : std::string();
  };
  const std::string decode = lowering("decode");
  return decode == lowering("prefill") &&
         (decode.find("MatMulNBits per expert") != std::string::npos ||
          decode.find("MatMul per expert") != std::string::npos || decode.find("QMoE") != std::string::npos ||
          decode.find("com.microsoft.MoE") != std::string::npos);
}

// runtime/ort_backend.py artifact_parts: each part's graphs, in layer order, and the prefill limit.
void read_parts(const json& manifest, const fs::path& directory, Artifact& artifact) {
  std::vector<std::pair<fs::path, std::pair<int64_t, int64_t>>> listed;
  // artifact.partition_entries: each entry checked before any part is opened (a "../other" or absolute directory
  // loaded another artifact's graphs; a string layer threw nlohmann's type_error)
  if (manifest.contains("partitions") && !manifest["partitions"].is_null() &&
      !(manifest["partitions"].is_array() && manifest["partitions"].empty())) {
    const std::string where = artifact.manifest_path + ": partitions";
    if (!manifest["partitions"].is_array())
      throw Error(where + " is " + manifest["partitions"].type_name() + ", not a list of parts; re-run the export");
    const int64_t layers_total = artifact.config.num_hidden_layers;
    int64_t start = 0;
    for (size_t k = 0; k < manifest["partitions"].size(); ++k) {
      const json& entry = manifest["partitions"][k];
      const std::string at = where + "[" + std::to_string(k) + "]";
      if (!entry.is_object())
        throw Error(at + "=" + entry.dump() + ": not an object with a directory and layers; re-run the export");
      const json name = entry.value("directory", json());
      const std::string text = name.is_string() ? name.get<std::string>() : std::string();
      if (text.empty() || text == "." || text == ".." || text.find('/') != std::string::npos ||
          !manifest["files"].contains(text + "/" + kManifest))
        throw Error(at + ".directory=" + name.dump() + ": not a part directory of this artifact (a child directory " +
                    "whose " + kManifest + " the artifact lists); re-run the export");
      for (const auto& seen : listed)
        if (seen.first == text) throw Error(at + ".directory=" + name.dump() + ": a second entry for that part; re-run the export");
      const json layers = entry.value("layers", json());
      if (!(layers.is_array() && layers.size() == 2 && layers[0].is_number_integer() &&
            layers[1].is_number_integer() && layers[0].get<int64_t>() == start && start < layers[1].get<int64_t>() &&
            layers[1].get<int64_t>() <= layers_total))
        throw Error(at + ".layers=" + layers.dump() + ": must be [" + std::to_string(start) + ", end] with " +
                    std::to_string(start) + " < end <= " + std::to_string(layers_total) + " (the parts cover layers 0.." +
                    std::to_string(layers_total - 1) + " in order); re-run the export");
      listed.push_back({text, {start, layers[1].get<int64_t>()}});
      start = layers[1].get<int64_t>();
    }
    if (start != layers_total)
      throw Error(where + ": the parts end at layer " + std::to_string(start - 1) + ", not " +
                  std::to_string(layers_total - 1) + " (the model's last); re-run the export");
  } else {
    listed.push_back({".", {0, artifact.config.num_hidden_layers}});
  }
  artifact.max_prefill_tokens = kDefaultMaxPrefill;
  int64_t expected_first = 0;
  for (const auto& [sub, layers] : listed) {
    const fs::path part_dir = sub == "." ? directory : directory / sub;
    const json part_manifest = sub == "." ? manifest : read_manifest(part_dir);
    const std::string part_manifest_path = (part_dir / kManifest).string();
    if (sub != "." && part_manifest.value("layers", json()) != json::array({layers.first, layers.second}))
      throw Error(part_manifest_path + ": layers=" + part_manifest.value("layers", json()).dump() + ", but the " +
                  "artifact's " + kManifest + " lists the part as layers [" + std::to_string(layers.first) + ", " +
                  std::to_string(layers.second) + "]; re-run the export");
    const json graphs = part_manifest.value("graphs", json::object());
    if (!graphs.is_object() || !graphs.contains("decode") || !graphs["decode"].is_object() ||
        !graphs["decode"].contains("file"))
      throw Error(part_manifest_path + ": lists no decode graph; re-run the export");
    PartGraphs part;
    part.first_layer = layers.first;
    part.end_layer = layers.second;
    part.decode = listed_file(part_manifest, part_dir, graphs["decode"]["file"], "graphs.decode.file");
    if (graphs.contains("prefill") && graphs["prefill"].is_object() && graphs["prefill"].contains("file")) {
      part.prefill = listed_file(part_manifest, part_dir, graphs["prefill"]["file"], "graphs.prefill.file");
      if (graphs["prefill"].contains("max_new_tokens")) {
        const json& limit = graphs["prefill"]["max_new_tokens"];
        if (!limit.is_number_integer() || limit.get<int64_t>() < 1)
          throw Error(part_manifest_path + ": graphs.prefill.max_new_tokens=" + limit.dump() +
                      ": must be an integer >= 1; re-run the export");
        artifact.max_prefill_tokens = limit.get<int64_t>();
      }
      if (one_graph_serves_both(graphs)) part.decode = part.prefill;
    }
    if (part.first_layer != expected_first || part.end_layer <= part.first_layer)
      throw Error(directory.string() + ": the partitions do not cover layers 0.." +
                  std::to_string(artifact.config.num_hidden_layers - 1) + " in order; re-run the export");
    expected_first = part.end_layer;
    artifact.parts.push_back(part);
  }
  if (expected_first != artifact.config.num_hidden_layers)
    throw Error(directory.string() + ": the partitions do not cover layers 0.." +
                std::to_string(artifact.config.num_hidden_layers - 1) + " in order; re-run the export");
}

std::vector<int64_t> generation_config_eos(const fs::path& directory) {
  const fs::path path = directory / kGenerationConfig;
  if (!fs::is_regular_file(path)) return {};
  const json config = read_json(path, "re-copy it from the checkpoint");
  const json eos = config.is_object() && config.contains("eos_token_id") ? config["eos_token_id"] : json();
  std::vector<int64_t> ids;
  if (eos.is_null()) return ids;
  for (const json& e : eos.is_array() ? eos : json::array({eos})) {
    if (!e.is_number_integer())
      throw Error(path.string() + ": not a valid generation config (eos_token_id is not an integer); re-copy it "
                  "from the checkpoint");
    ids.push_back(e.get<int64_t>());
  }
  return ids;
}

// export/tokenizer_files.py write_tokenizer_graphs' manifest entry: tokenizer.graphs {encode, decode,
// nul_byte_tokens}, or null with graphs_skipped saying why.
void read_tokenizer_graphs(const json& manifest, const fs::path& directory, Artifact& artifact) {
  const json tokenizer = manifest.value("tokenizer", json::object());
  const json graphs = tokenizer.is_object() ? tokenizer.value("graphs", json()) : json();
  if (graphs.is_object() && graphs.value("encode", json()).is_string() && graphs.value("decode", json()).is_string()) {
    artifact.tokenizer_encode = listed_file(manifest, directory, graphs["encode"], "tokenizer.graphs.encode");
    artifact.tokenizer_decode = listed_file(manifest, directory, graphs["decode"], "tokenizer.graphs.decode");
    const json nul_byte_tokens = graphs.value("nul_byte_tokens", json::object());
    for (const auto& [id, hex] : nul_byte_tokens.items()) {
      std::string bytes;
      const std::string digits = hex.get<std::string>();
      for (size_t i = 0; i + 1 < digits.size(); i += 2) bytes += static_cast<char>(std::stoi(digits.substr(i, 2), nullptr, 16));
      artifact.nul_byte_tokens[std::stoll(id)] = bytes;
    }
  } else if (tokenizer.is_object() && tokenizer.value("graphs_skipped", json()).is_string()) {
    artifact.no_tokenizer_graphs = "the export wrote no tokenizer graphs: " + tokenizer["graphs_skipped"].get<std::string>();
  } else {
    artifact.no_tokenizer_graphs = artifact.manifest_path + " lists no tokenizer graphs (no tokenizer.json, or an "
                                   "export older than them: re-export it)";
  }
}

// The manifest's vision entry (export: vision.file, vision.config, vision.processor = ImageProcessorConfig.to_dict).
void read_vision(const json& manifest, const fs::path& directory, Artifact& artifact) {
  if (!manifest.contains("vision") || manifest["vision"].is_null()) return;
  const json& entry = manifest["vision"];
  const json& processor = entry.at("processor");
  VisionEntry vision;
  vision.graph = listed_file(manifest, directory, entry.value("file", json()), "vision.file");
  vision.image_token_id = entry.at("config").at("image_token_id").get<int64_t>();
  ProcessorConfig& p = vision.processor;
  p.size = processor.at("size").get<int64_t>();
  p.max_patches = processor.at("max_patches").get<int64_t>();
  p.resize_to_max_canvas = processor.at("resize_to_max_canvas").get<bool>();
  p.do_rescale = processor.at("do_rescale").get<bool>();
  p.rescale_factor = processor.at("rescale_factor").get<double>();
  p.do_normalize = processor.at("do_normalize").get<bool>();
  for (int c = 0; c < 3; ++c) {
    p.image_mean[c] = processor.at("image_mean").at(c).get<double>();
    p.image_std[c] = processor.at("image_std").at(c).get<double>();
  }
  p.tokens_per_tile = processor.at("tokens_per_tile").get<int64_t>();
  p.placeholder = processor.at("placeholder").get<std::string>();
  if (p.size < 1 || p.max_patches < 1 || p.tokens_per_tile < 1 || p.placeholder.empty() ||
      p.image_std[0] == 0 || p.image_std[1] == 0 || p.image_std[2] == 0)
    throw Error(artifact.manifest_path + ": vision.processor has a size, max_patches or tokens_per_tile below 1, an "
                "empty placeholder or a zero image_std; re-run the export");
  artifact.vision = vision;
}

}  // namespace

Artifact read_artifact(const std::string& directory_name, bool verify) {
  const fs::path directory(directory_name);
  Artifact artifact;
  artifact.directory = directory_name;
  artifact.manifest_path = (directory / kManifest).string();
  const json manifest = read_manifest(directory, verify);
  const bool partitioned = manifest.contains("partitions") && manifest["partitions"].is_array() &&
                           !manifest["partitions"].empty();
  if (manifest.contains("layers") && manifest["layers"].is_array() && manifest["layers"].size() == 2 &&
      manifest["layers"][0].is_number_integer() && manifest["layers"][1].is_number_integer() && !partitioned) {
    // a part's graphs take hidden states, not token ids (Generator.load says the same)
    std::error_code ignored;
    fs::path part = fs::weakly_canonical(directory, ignored);
    if (part.filename().empty()) part = part.parent_path();  // "dir/part0/"
    throw Error(directory_name + ": one part (layers " + std::to_string(manifest["layers"][0].get<int64_t>()) + ".." +
                std::to_string(manifest["layers"][1].get<int64_t>() - 1) + ") of a partitioned artifact; run the " +
                "artifact directory holding it (" + part.parent_path().string() + ")");
  }
  try {
    artifact.config = parse_config(manifest, artifact.manifest_path);
    read_parts(manifest, directory, artifact);
    const json dtypes = manifest.value("dtypes", json::object());
    if (dtypes.is_object() && dtypes.contains("kv_cache") && dtypes["kv_cache"].is_string())
      artifact.kv_cache_dtype = dtypes["kv_cache"].get<std::string>();
    if (manifest.contains("kv_layout") && manifest["kv_layout"].is_string())
      artifact.kv_layout = manifest["kv_layout"].get<std::string>();
    read_tokenizer_graphs(manifest, directory, artifact);
    read_vision(manifest, directory, artifact);
  } catch (const json::exception& e) {  // a field of the wrong JSON type
    throw Error(artifact.manifest_path + ": malformed field (" + first_line(e.what()) + "); re-run the export");
  } catch (const std::logic_error& e) {  // std::stoi/stoll: a nul_byte_tokens entry that is not hex / an id
    throw Error(artifact.manifest_path + ": malformed tokenizer.graphs.nul_byte_tokens; re-run the export");
  }
  std::set<int64_t> stops(artifact.config.eos_token_ids.begin(), artifact.config.eos_token_ids.end());
  for (int64_t e : generation_config_eos(directory)) stops.insert(e);
  artifact.stop_tokens.assign(stops.begin(), stops.end());
  return artifact;
}

int64_t default_window(const ModelConfig& config, int64_t itemsize) {
  const int64_t global_layers = std::count(config.kinds.begin(), config.kinds.end(), AttentionKind::kGlobal);
  const int64_t per_token = 2 * global_layers * config.num_key_value_heads * config.head_dim * itemsize;
  const int64_t cap = per_token ? kDefaultGlobalCacheBytes / per_token : config.max_position_embeddings;
  return std::max(kDefaultSinks + 1, std::min(config.max_position_embeddings, cap));
}

}  // namespace llama4rt
