// Next-token choice as llama4_export/runtime/sampling.py makes it: repetition penalty → frequency / presence
// penalties → logit bias → greedy argmax at temperature 0
// → temperature → top-k → top-p → one draw from numpy's default_rng(seed) (PCG64 seeded through SeedSequence,
// Generator.choice with p: cumulative sum, one random() double, searchsorted right).
// The arithmetic is numpy's: float32 logits, float64 softmax with numpy's pairwise summation, sequential cumsum.
// One difference remains: exp is the C library's, while numpy may use its own SIMD exp (AVX-512 CPUs), which differs
// in the last bit for some inputs — so a draw can differ only when it lands within a few ulps (~1e-16) of a boundary
// of the cumulative distribution.
#pragma once

#include <cstdint>
#include <vector>

#include "llama4rt.hpp"

namespace llama4rt {

// numpy.random.PCG64 (XSL-RR 128/64) seeded as numpy.random.default_rng(seed) seeds it.
class Pcg64 {
 public:
  explicit Pcg64(uint64_t seed);
  uint64_t next_uint64();
  double random();  // Generator.random(): 53 random bits in [0, 1)

 private:
  unsigned __int128 state_ = 0, increment_ = 0;
  void step();
};

// numpy.random.SeedSequence(seed).generate_state(words, np.uint32).
std::vector<uint32_t> seed_sequence_state(uint64_t seed, int words);

// Checks the options as runtime/sampling.py SamplingParams.__post_init__ does (throws Error).
void check_sampling(const SamplingOptions& params);

class Sampler {
 public:
  Sampler(const SamplingOptions& params, int64_t vocab_size);
  // Forget the ids seen so far and re-seed (one Sampler serves every generation of a Model).
  void start(const SamplingOptions& params);
  void saw(int64_t token);  // a prompt id, for the repetition penalty
  void generated(int64_t token);  // a generated id: the repetition penalty's, and the frequency / presence penalties'
  int64_t operator()(const float* logits);

 private:
  SamplingOptions params_;
  Pcg64 rng_;
  std::vector<uint8_t> seen_;
  std::vector<int64_t> seen_ids_;
  std::vector<int64_t> counts_, output_ids_;  // occurrences of each generated id; the ids generated, each once
  std::vector<float> scores_, partition_;
  std::vector<int64_t> order_;
  std::vector<double> probs_;
};

// numpy's pairwise summation of a contiguous float64 array (what ndarray.sum computes).
double pairwise_sum(const double* values, int64_t n);

}  // namespace llama4rt
