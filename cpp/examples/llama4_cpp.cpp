// llama4-cpp: generate from a llama4-export artifact with the C++ runtime; `--json` prints the object
// `llama4-run --json` prints ("text": null where the artifact's tokenizer graphs or the extensions library are missing).
// Bad input: one line on stderr and exit status 2 (as llama4-run).
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "llama4rt.hpp"

namespace {

// The errno of the first write to stdout that failed (a full disk under a redirect); 0 while every write went out.
// Reported at the end as llama4-run reports it: the output was lost, so the exit is not 0.
int stdout_errno = 0;

void print(const std::string& text) {
  std::cout << text << std::flush;
  if (!std::cout && stdout_errno == 0) stdout_errno = errno != 0 ? errno : EIO;
}

int exit_status() {
  if (stdout_errno == 0) return 0;
  std::cerr << "error: stdout: " << std::strerror(stdout_errno) << "; nothing more can be written there" << std::endl;
  return 2;
}

constexpr const char* kUsage =
    "usage: llama4-cpp ARTIFACT (--prompt TEXT | --prompt-file FILE | --ids 1,2,3) [-n N] [--window W] [--sinks S]\n"
    "                  [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S]\n"
    "                  [--frequency-penalty F] [--presence-penalty P] [--logit-bias ID=BIAS ...] [--stop TEXT ...]\n"
    "                  [--threads N] [--max-prefill-tokens N] [--no-stop] [--stream] [--json] [--stats]\n"
    "                  [--rss-steps 200,2000] [--image PICTURE.ppm ...]\n"
    "Generates a continuation (greedy unless --temperature) with the sliding KV cache, as llama4-run does.\n"
    "  --prompt      the prompt as text (needs the artifact's tokenizer graphs and onnxruntime-extensions)\n"
    "  --prompt-file, -f  the prompt from a UTF-8 file (- = stdin), less one final newline, as llama4-run\n"
    "  --image       an image for the prompt's next <|image|> placeholder (repeat in order), as binary PPM (P6,\n"
    "                8-bit RGB, upright, transparency on white as the Python runtime takes it: e.g. `convert\n"
    "                photo.jpg -auto-orient -background white -alpha remove -alpha off -depth 8 photo.ppm`); an\n"
    "                artifact of a multimodal checkpoint\n"
    "  --json        print {\"prompt_ids\", \"token_ids\", \"text\", \"stop_reason\"} as llama4-run --json does\n"
    "  --stop        end where the text first holds TEXT, cut before it (repeat for several), as llama4-run\n"
    "  --max-prefill-tokens  the most prompt tokens fed per forward call (default: the artifact's prefill limit);\n"
    "                lower bounds the prefill's activation memory, as llama4-run\n"
    "  --no-stop     generate exactly N tokens: no stop tokens (as the benchmarks run)\n"
    "  --stream      print each token's text as it is chosen (its id without the tokenizer), as llama4-run\n"
    "  --stats       print prefill and decode tokens/s as one JSON line on stderr (decode: the tokens after the\n"
    "                first, over the time since it was chosen)\n"
    "  --rss-steps   after each listed step, print `rss step=N kb=K` (resident memory) on stderr\n";

struct Usage {
  std::string message;
};

int64_t parse_int(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    const long long value = std::stoll(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw Usage{flag + " " + text + ": expected an integer"};
}

// llama4-run's --seed: any integer, taken modulo 2^64 (a negative one as its two's complement); here -2^63..2^64-1.
uint64_t parse_seed(const std::string& text) {
  try {
    size_t used = 0;
    const uint64_t seed = !text.empty() && text[0] == '-' ? static_cast<uint64_t>(std::stoll(text, &used))
                                                           : std::stoull(text, &used);
    if (used == text.size()) return seed;
  } catch (const std::exception&) {
  }
  throw Usage{"--seed " + text + ": expected an integer in -2^63..2^64-1"};
}

double parse_float(const std::string& flag, const std::string& text) {
  // strtod, not stod: stod throws out_of_range on a subnormal (1e-320), which Python's float() reads
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (!text.empty() && !std::isspace(static_cast<unsigned char>(text[0])) && end == text.c_str() + text.size())
    return value;
  throw Usage{flag + " " + text + ": expected a number"};
}

// llama4-run's --ids: comma-separated integers, spaces ignored, empty items skipped.
std::vector<int64_t> parse_ids(const std::string& flag, const std::string& text) {
  std::string compact;
  for (char ch : text)
    if (ch != ' ') compact += ch;
  std::vector<int64_t> ids;
  std::stringstream items(compact);
  for (std::string item; std::getline(items, item, ',');) {
    if (item.empty()) continue;
    try {
      ids.push_back(parse_int(flag, item));
    } catch (const Usage&) {
      throw Usage{flag + " '" + text + "': expected comma-separated integers, e.g. \"1,2,3\""};
    }
  }
  return ids;
}

std::string join(const std::vector<int64_t>& ids, const char* separator) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? separator : "") + std::to_string(ids[i]);
  return out;
}

// A binary PPM (P6, maxval 255): the one image format simple enough to read without a library; a host application
// decodes its images with its own and hands llama4rt the RGB pixels.
llama4rt::Image read_ppm(const std::string& path) {
  std::error_code ignored;
  if (std::filesystem::is_directory(path, ignored))  // opens as an empty stream: it was "not a binary 8-bit PPM"
    throw Usage{"--image " + path + ": cannot read it (" + std::strerror(EISDIR) + ")"};
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Usage{"--image " + path + ": cannot be read"};
  auto field = [&]() {
    std::string token;
    while (in >> std::ws && in.peek() == '#') std::getline(in, token);  // comments
    in >> token;
    return token;
  };
  llama4rt::Image image;
  const std::string magic = field();
  try {
    image.width = std::stoll(field());
    image.height = std::stoll(field());
    if (magic != "P6" || std::stoll(field()) != 255 || image.width < 1 || image.height < 1) throw std::exception();
  } catch (const std::exception&) {
    throw Usage{"--image " + path + ": not a binary 8-bit PPM (P6, maxval 255); convert it, e.g. `convert " + path +
                " -auto-orient -background white -alpha remove -alpha off -depth 8 image.ppm`"};
  }
  in.get();  // the one whitespace byte before the pixels
  // the header's size is checked against the file before anything is allocated (a corrupt one may say 10^10 pixels)
  const std::streamoff start = in.tellg();
  in.seekg(0, std::ios::end);
  const int64_t available = static_cast<int64_t>(in.tellg() - start);
  in.seekg(start);
  if (image.width > available / 3 / image.height)
    throw Usage{"--image " + path + ": truncated (fewer pixels than its header's " + std::to_string(image.width) +
                " x " + std::to_string(image.height) + ")"};
  image.rgb.resize(static_cast<size_t>(image.width * image.height * 3));
  if (!in.read(reinterpret_cast<char*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size())))
    throw Usage{"--image " + path + ": cannot be read"};
  return image;
}

// A prompt file's text ("-": stdin) less one final newline, as llama4-run --prompt-file reads it.
std::string read_prompt(const std::string& flag, const std::string& path) {
  std::ostringstream text;
  if (path == "-") {
    text << std::cin.rdbuf();
  } else {
    std::error_code ignored;
    if (std::filesystem::is_directory(path, ignored))  // opens as an empty stream: it was "the prompt is empty"
      throw Usage{flag + " " + path + ": cannot read it (" + std::strerror(EISDIR) + ")"};
    std::ifstream file(path, std::ios::binary);
    // an empty file sets failbit on `<<` with errno 0: it is the empty prompt (refused as such), not a read error
    if (!file || (file.peek() != std::ifstream::traits_type::eof() && !(text << file.rdbuf())))
      throw Usage{flag + " " + path + ": cannot read it (" + std::strerror(errno) + ")"};
  }
  std::string prompt = text.str();
  if (prompt.size() >= 2 && prompt.compare(prompt.size() - 2, 2, "\r\n") == 0)
    prompt.resize(prompt.size() - 2);
  else if (!prompt.empty() && prompt.back() == '\n')
    prompt.pop_back();
  return prompt;
}

// n >= 0 with a comma every three digits, as Python's f"{n:,}".
std::string grouped(int64_t n) {
  std::string digits = std::to_string(n);
  for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) digits.insert(i, ",");
  return digits;
}

// llama4-run's note on a prompt longer than the window (cli/run.py _note_slid), word for word: what of it the global
// layers can still attend to once it slid.
std::string slid_note(int64_t tokens, int64_t window, int64_t sinks) {
  const std::string dropped = grouped(tokens - window);
  const std::string kept =
      sinks ? "its first " + grouped(sinks) + " (--sinks) and last " + grouped(window - sinks) + " tokens; the " +
                  dropped + " token(s) between were"
            : "its last " + grouped(window) + " tokens; the first " + dropped + " were";
  return "note: the prompt is " + grouped(tokens) + " tokens, more than the KV window of " + grouped(window) +
         " (--window): the reply attends to " + kept + " dropped from attention";
}

long resident_kb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string artifact;
  std::optional<std::vector<int64_t>> ids;
  std::optional<std::string> prompt;
  std::string prompt_file;  // "--prompt-file PATH" when the prompt came from one: a refusal of its text names it
  std::vector<int64_t> rss_steps;
  std::vector<std::string> image_paths;
  bool as_json = false, stream = false, stats = false;
  llama4rt::OpenOptions open_options;
  llama4rt::GenerateOptions options;
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& flag = args[i];
      auto value = [&]() -> const std::string& {
        if (i + 1 >= args.size()) throw Usage{flag + ": needs a value"};
        return args[++i];
      };
      if (flag == "-h" || flag == "--help") {
        print(kUsage);
        return exit_status();
      } else if (flag == "--prompt") {
        if (prompt) throw Usage{"give exactly one of --prompt TEXT, --prompt-file FILE or --ids 1,2,3"};
        prompt = value();
      } else if (flag == "--prompt-file" || flag == "-f") {
        if (prompt) throw Usage{"give exactly one of --prompt TEXT, --prompt-file FILE or --ids 1,2,3"};
        const std::string& path = value();
        prompt_file = flag + " " + path;
        prompt = read_prompt(flag, path);
      } else if (flag == "--ids") {
        ids = parse_ids(flag, value());
      } else if (flag == "-n" || flag == "--max-new-tokens") {
        options.max_new_tokens = parse_int(flag, value());
      } else if (flag == "--window") {
        open_options.window = parse_int(flag, value());
      } else if (flag == "--sinks") {
        open_options.sinks = parse_int(flag, value());
      } else if (flag == "--threads") {
        const int64_t threads = parse_int(flag, value());  // not narrowed to int unchecked (2^32 + 1 became 1)
        if (threads < 0 || threads > llama4rt::kMaxThreads)
          throw Usage{"threads=" + std::to_string(threads) + ": must be in 1.." + std::to_string(llama4rt::kMaxThreads) +
                      " (or 0 for ONNX Runtime's choice)"};
        open_options.threads = static_cast<int>(threads);
      } else if (flag == "--max-prefill-tokens") {
        open_options.max_prefill_tokens = parse_int(flag, value());
      } else if (flag == "--temperature") {
        options.sampling.temperature = parse_float(flag, value());
      } else if (flag == "--top-k") {
        options.sampling.top_k = parse_int(flag, value());
      } else if (flag == "--top-p") {
        options.sampling.top_p = parse_float(flag, value());
      } else if (flag == "--repetition-penalty") {
        options.sampling.repetition_penalty = parse_float(flag, value());
      } else if (flag == "--frequency-penalty") {
        options.sampling.frequency_penalty = parse_float(flag, value());
      } else if (flag == "--presence-penalty") {
        options.sampling.presence_penalty = parse_float(flag, value());
      } else if (flag == "--logit-bias") {
        const std::string& pair = value();
        const size_t equals = pair.find('=');
        try {  // llama4-run's line, naming the whole pair (it was "--logit-bias : expected an integer" for "=1")
          if (equals == std::string::npos) throw Usage{};
          options.sampling.logit_bias.emplace_back(parse_int(flag, pair.substr(0, equals)),
                                                   parse_float(flag, pair.substr(equals + 1)));
        } catch (const Usage&) {
          throw Usage{flag + " '" + pair + "': expected ID=BIAS, e.g. 42=-100"};
        }
      } else if (flag == "--seed") {
        options.sampling.seed = parse_seed(value());
      } else if (flag == "--stop") {
        options.stop_strings.push_back(value());
      } else if (flag == "--no-stop") {
        options.stop_tokens = std::vector<int64_t>{};
      } else if (flag == "--json") {
        as_json = true;
      } else if (flag == "--stats") {
        stats = true;
      } else if (flag == "--stream") {
        stream = true;
      } else if (flag == "--image") {
        image_paths.push_back(value());
      } else if (flag == "--rss-steps") {
        rss_steps = parse_ids(flag, value());
      } else if (!flag.empty() && flag[0] == '-') {
        throw Usage{"unknown option " + flag + " (see --help)"};
      } else if (artifact.empty()) {
        artifact = flag;
      } else {
        throw Usage{"unexpected argument " + flag + " (one ARTIFACT directory; see --help)"};
      }
    }
    if (artifact.empty()) throw Usage{"give the ARTIFACT directory (see --help)"};
    if (ids.has_value() == prompt.has_value())
      throw Usage{"give exactly one of --prompt TEXT, --prompt-file FILE or --ids 1,2,3"};
    if (as_json && stream) throw Usage{"--json prints one object at the end: drop --stream or --json"};

    if (!image_paths.empty() && !prompt) throw Usage{"--image needs --prompt TEXT with an <|image|> placeholder per image"};
    std::vector<llama4rt::Image> images;
    for (const std::string& path : image_paths) images.push_back(read_ppm(path));

    llama4rt::Model model = llama4rt::Model::open(artifact, open_options);
    const llama4rt::Prompt full_prompt = [&] {
      try {
        return ids ? llama4rt::Prompt{*ids, {}}
                   : images.empty() ? llama4rt::Prompt{model.encode(*prompt), {}} : model.encode(*prompt, images);
      } catch (const llama4rt::Error& error) {
        if (prompt_file.empty()) throw;
        throw llama4rt::Error(prompt_file + ": " + error.what());
      }
    }();
    const std::vector<int64_t>& prompt_ids = full_prompt.ids;
    std::optional<llama4rt::TextStream> pieces;
    if (stream && model.has_tokenizer()) pieces.emplace(model, options.stop_strings);
    int64_t step = 0;
    using Clock = std::chrono::steady_clock;
    Clock::time_point first_token, last_token;
    auto on_token = [&](int64_t token, bool stop) {
      last_token = Clock::now();
      if (++step == 1) first_token = last_token;
      for (int64_t s : rss_steps)
        if (s == step) std::cerr << "rss step=" << step << " kb=" << resident_kb() << std::endl;
      if (stream && !stop) {
        if (pieces)
          print(pieces->push(token));
        else
          print((step > 1 ? "," : "") + std::to_string(token));
      }
    };
    options.on_prefill = [&](int64_t done, int64_t total) {
      if (done >= total && total > model.window())  // the prompt is in (images expanded) and slid: as llama4-run
        std::cerr << slid_note(total, model.window(), model.sinks()) << std::endl;
    };
    const Clock::time_point start = Clock::now();
    const llama4rt::Result result = model.generate(full_prompt, options, on_token);
    if (stats && step > 0) {
      const double prefill_s = std::chrono::duration<double>(first_token - start).count();
      const double decode_s = std::chrono::duration<double>(last_token - first_token).count();
      std::cerr << "{\"prompt_tokens\": " << prompt_ids.size() << ", \"prefill_tok_s\": " << prompt_ids.size() / prefill_s
                << ", \"new_tokens\": " << step << ", \"decode_tok_s\": " << (step > 1 ? (step - 1) / decode_s : 0.0)
                << "}" << std::endl;
    }
    if (as_json) {
      print("{\"prompt_ids\": [" + join(result.prompt_ids, ", ") + "], \"token_ids\": [" + join(result.token_ids, ", ") +
            "], \"text\": " +
            (result.text ? nlohmann::json(*result.text).dump(-1, ' ', /*ensure_ascii=*/true) : std::string("null")) +
            ", \"stop_reason\": \"" + result.stop_reason + "\"}\n");
    } else if (stream) {
      print((pieces ? pieces->flush() : std::string()) + "\n");
    } else {
      print((result.text ? *result.text : join(result.token_ids, ",")) + "\n");
    }
    return exit_status();
  } catch (const Usage& usage) {
    std::cerr << "error: " << usage.message << std::endl;
  } catch (const llama4rt::Error& error) {
    std::cerr << "error: " << error.what() << std::endl;
  }
  return 2;
}
