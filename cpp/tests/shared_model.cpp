// shared-model: threads sharing one llama4rt::Model, for tests/test_cpp.py.
//   shared-model ARTIFACT N_NEW IDS [IDS ...]  (IDS: comma-separated prompt ids)
// Generates every prompt once on its own, then all at once from one thread each on the same Model, then calls
// generate from inside a token callback, then cancels a generation by throwing from its callback and generates the
// first prompt again, then cancels the last prompt's prefill from its progress callback; prints one line per prompt,
// "alone | shared" token ids, the error line, what the cancelling caller caught and the ids generated after it, the
// prefill's progress and whether the next generation is the uncancelled one.
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "llama4rt.hpp"

static std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) ids.push_back(std::stoll(item));
  return ids;
}

static std::string joined(const std::vector<int64_t>& ids) {
  std::string out;
  for (int64_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

struct Cancelled : std::exception {
  const char* what() const noexcept override { return "cancelled by the host"; }
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: shared-model ARTIFACT N_NEW IDS [IDS ...]" << std::endl;
    return 2;
  }
  try {
    llama4rt::Model model = llama4rt::Model::open(argv[1]);
    llama4rt::GenerateOptions options;
    options.max_new_tokens = std::stoll(argv[2]);
    options.stop_tokens = std::vector<int64_t>{};
    std::vector<std::vector<int64_t>> prompts;
    for (int i = 3; i < argc; ++i) prompts.push_back(parse_ids(argv[i]));
    std::vector<std::vector<int64_t>> alone, shared(prompts.size());
    for (const auto& prompt : prompts) alone.push_back(model.generate(prompt, options).token_ids);
    std::vector<std::string> errors(prompts.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < prompts.size(); ++i)
      threads.emplace_back([&, i] {
        try {
          shared[i] = model.generate(prompts[i], options).token_ids;
        } catch (const llama4rt::Error& e) {
          errors[i] = e.what();
        }
      });
    for (std::thread& thread : threads) thread.join();
    for (size_t i = 0; i < prompts.size(); ++i)
      std::cout << joined(alone[i]) << " | " << (errors[i].empty() ? joined(shared[i]) : "error: " + errors[i]) << "\n";
    try {
      model.generate(prompts[0], options, [&](int64_t, bool) { model.generate(prompts[0], options); });
      std::cout << "re-entered: no error" << std::endl;
    } catch (const llama4rt::Error& e) {
      std::cout << "re-entered: " << e.what() << std::endl;
    }
    int64_t seen = 0;
    try {
      model.generate(prompts[0], options, [&](int64_t, bool) {
        if (++seen == 3) throw Cancelled();
      });
      std::cout << "cancelled: generate returned" << std::endl;
    } catch (const Cancelled&) {
      std::cout << "cancelled: caught the host's exception after " << seen << " tokens" << std::endl;
    } catch (const llama4rt::Error& e) {
      std::cout << "cancelled: became llama4rt::Error: " << e.what() << std::endl;
    }
    std::cout << joined(model.generate(prompts[0], options).token_ids) << std::endl;
    // the longest prompt in pieces of 8 tokens: its prefill reports each piece, and a throw from it cancels
    llama4rt::OpenOptions small_pieces;
    small_pieces.max_prefill_tokens = 8;
    llama4rt::Model pieced = llama4rt::Model::open(argv[1], small_pieces);
    const std::vector<int64_t>& longest = prompts.back();
    const std::vector<int64_t> uncancelled = pieced.generate(longest, options).token_ids;
    std::string progress = "prefill:";
    llama4rt::GenerateOptions cancelling = options;
    cancelling.on_prefill = [&](int64_t done, int64_t total) {
      progress += " " + std::to_string(done) + "/" + std::to_string(total);
      if (done == 16) throw Cancelled();
    };
    try {
      pieced.generate(longest, cancelling, [&](int64_t, bool) { progress += " token"; });
      progress += " not cancelled";
    } catch (const Cancelled&) {
      progress += " cancelled";
    }
    std::cout << progress << std::endl;
    std::cout << (pieced.generate(longest, options).token_ids == uncancelled ? "after it: the same ids" : "after it: other ids")
              << std::endl;
    // a stop token outside the vocabulary never stops anything: refused, as Generator refuses it
    llama4rt::GenerateOptions bad_stops = options;
    bad_stops.stop_tokens = std::vector<int64_t>{-1, 1000000};
    try {
      model.generate(prompts[0], bad_stops);
      std::cout << "bad stop tokens: accepted" << std::endl;
    } catch (const llama4rt::Error& e) {
      std::cout << "bad stop tokens: " << e.what() << std::endl;
    }
    return 0;
  } catch (const llama4rt::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
}
