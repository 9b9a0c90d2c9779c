#include "sampler.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <utility>

#include "llama4rt.hpp"

namespace llama4rt {
namespace {

constexpr double kMaxLogitBias = 100.0;  // runtime/sampling.py MAX_LOGIT_BIAS (OpenAI's range)

// SeedSequence's hash constants (numpy/random/bit_generator.pyx).
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
constexpr int kXShift = 16, kPoolSize = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  return value ^ (value >> kXShift);
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t result = kMixMultL * x - kMixMultR * y;
  return result ^ (result >> kXShift);
}

// PCG's 128-bit LCG multiplier (PCG_DEFAULT_MULTIPLIER_128).
constexpr unsigned __int128 kPcgMultiplier =
    (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;

double softmax_into(const float* logits, int64_t n, std::vector<double>& out) {
  // sampling.softmax: x = float64(logits); x = exp(x - max); x / x.sum()
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) max = std::max(max, static_cast<double>(logits[i]));
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(static_cast<double>(logits[i]) - max);
  const double total = pairwise_sum(out.data(), n);
  for (int64_t i = 0; i < n; ++i) out[i] /= total;
  return total;
}

}  // namespace

std::vector<uint32_t> seed_sequence_state(uint64_t seed, int words) {
  // The entropy as 32-bit words, least significant first (one word 0 for seed 0).
  std::vector<uint32_t> entropy;
  do {
    entropy.push_back(static_cast<uint32_t>(seed));
    seed >>= 32;
  } while (seed != 0);
  uint32_t pool[kPoolSize];
  uint32_t hash_const = kInitA;
  for (int i = 0; i < kPoolSize; ++i)
    pool[i] = hashmix(i < static_cast<int>(entropy.size()) ? entropy[i] : 0, hash_const);
  for (int src = 0; src < kPoolSize; ++src)
    for (int dst = 0; dst < kPoolSize; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
  for (size_t src = kPoolSize; src < entropy.size(); ++src)
    for (int dst = 0; dst < kPoolSize; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
  std::vector<uint32_t> state(words);
  hash_const = kInitB;
  for (int i = 0; i < words; ++i) {
    uint32_t value = pool[i % kPoolSize] ^ hash_const;
    hash_const *= kMultB;
    value *= hash_const;
    state[i] = value ^ (value >> kXShift);
  }
  return state;
}

Pcg64::Pcg64(uint64_t seed) {
  // default_rng: generate_state(4, uint64) = 8 uint32 words read as little-endian uint64 pairs; the first two are the
  // initial state (high, low), the last two the stream (high, low); then pcg_setseq_128_srandom_r.
  const std::vector<uint32_t> words = seed_sequence_state(seed, 8);
  uint64_t v[4];
  for (int i = 0; i < 4; ++i) v[i] = static_cast<uint64_t>(words[2 * i]) | static_cast<uint64_t>(words[2 * i + 1]) << 32;
  const unsigned __int128 initial = static_cast<unsigned __int128>(v[0]) << 64 | v[1];
  const unsigned __int128 stream = static_cast<unsigned __int128>(v[2]) << 64 | v[3];
  state_ = 0;
  increment_ = stream << 1 | 1;
  step();
  state_ += initial;
  step();
}

void Pcg64::step() { state_ = state_ * kPcgMultiplier + increment_; }

uint64_t Pcg64::next_uint64() {
  step();
  const uint64_t folded = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
  const unsigned rotation = static_cast<unsigned>(state_ >> 122);
  return (folded >> rotation) | (folded << ((64 - rotation) & 63));
}

double Pcg64::random() { return static_cast<double>(next_uint64() >> 11) * (1.0 / 9007199254740992.0); }

double pairwise_sum(const double* a, int64_t n) {
  // numpy's DOUBLE_pairwise_sum: below 8 a plain loop, up to 128 eight interleaved accumulators, else halves.
  if (n < 8) {
    double sum = -0.0;
    for (int64_t i = 0; i < n; ++i) sum += a[i];
    return sum;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) sum += a[i];
    return sum;
  }
  int64_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

void check_sampling(const SamplingOptions& p) {
  auto number = [](double x) {  // as Python writes a float ("-1.0", "0.1", "1e-07"), so both runtimes' lines match
    char digits[32];
    std::string s(digits, std::to_chars(digits, digits + sizeof digits, x).ptr);  // the shortest that reads back
    return s.find_first_of(".en") == std::string::npos ? s + ".0" : s;  // e, inf, nan: nothing to add
  };
  // SamplingParams' order: every real option finite first (an infinite penalty or temperature ran, as noise or a ban)
  for (const auto& [name, value] : {std::pair{"temperature", p.temperature}, std::pair{"top_p", p.top_p},
                                    std::pair{"repetition_penalty", p.repetition_penalty},
                                    std::pair{"frequency_penalty", p.frequency_penalty},
                                    std::pair{"presence_penalty", p.presence_penalty}})
    if (!std::isfinite(value)) throw Error(std::string(name) + "=" + number(value) + ": must be a finite number");
  if (!(p.temperature >= 0)) throw Error("temperature=" + number(p.temperature) + ": must be >= 0 (0 = greedy)");
  if (p.top_k < 0) throw Error("top_k=" + std::to_string(p.top_k) + ": must be >= 0 (0 = off)");
  if (!(p.top_p > 0 && p.top_p <= 1)) throw Error("top_p=" + number(p.top_p) + ": must be in (0, 1] (1 = off)");
  if (!(p.repetition_penalty > 0))
    throw Error("repetition_penalty=" + number(p.repetition_penalty) + ": must be > 0 (1 = off)");
  for (const auto& [name, value] : {std::pair{"frequency_penalty", p.frequency_penalty},
                                    std::pair{"presence_penalty", p.presence_penalty}})
    if (!(value >= -2 && value <= 2))
      throw Error(std::string(name) + "=" + number(value) + ": must be in [-2, 2] (0 = off)");
  std::set<int64_t> biased;
  for (const auto& [token, bias] : p.logit_bias) {
    if (!biased.insert(token).second)
      throw Error("logit_bias: token " + std::to_string(token) + " is given more than once; give it once");
    if (token < 0)
      throw Error("logit_bias: token id " + std::to_string(token) + " is negative; give ids of the vocabulary");
    if (!(bias >= -kMaxLogitBias && bias <= kMaxLogitBias))
      throw Error("logit_bias: " + number(bias) + " for token " + std::to_string(token) + " is outside [-100, 100]");
  }
}

Sampler::Sampler(const SamplingOptions& params, int64_t vocab_size)
    : params_(params), rng_(params.seed), seen_(vocab_size, 0), counts_(vocab_size, 0), scores_(vocab_size),
      partition_(vocab_size), order_(vocab_size), probs_(vocab_size) {
  seen_ids_.reserve(vocab_size);
}

void Sampler::start(const SamplingOptions& params) {
  params_ = params;
  rng_ = Pcg64(params.seed);
  for (int64_t id : seen_ids_) seen_[id] = 0;
  seen_ids_.clear();
  for (int64_t id : output_ids_) counts_[id] = 0;
  output_ids_.clear();
}

void Sampler::generated(int64_t token) {
  saw(token);
  if (counts_[token]++ == 0) output_ids_.push_back(token);
}

void Sampler::saw(int64_t token) {
  if (!seen_[token]) {
    seen_[token] = 1;
    seen_ids_.push_back(token);
  }
}

int64_t Sampler::operator()(const float* logits) {
  const int64_t n = static_cast<int64_t>(scores_.size());
  std::copy(logits, logits + n, scores_.begin());
  // apply_repetition_penalty, in float32 (numpy casts the Python float to the array's dtype)
  if (params_.repetition_penalty != 1.0) {
    const float penalty = static_cast<float>(params_.repetition_penalty);
    for (int64_t id : seen_ids_) scores_[id] = scores_[id] > 0 ? scores_[id] / penalty : scores_[id] * penalty;
  }
  // apply_frequency_presence_penalties: the penalty in float64, cast to the logits' float32, then subtracted
  if (params_.frequency_penalty != 0 || params_.presence_penalty != 0)
    for (int64_t id : output_ids_)
      scores_[id] -= static_cast<float>(counts_[id] * params_.frequency_penalty + params_.presence_penalty);
  for (const auto& [token, bias] : params_.logit_bias) scores_[token] += static_cast<float>(bias);  // apply_logit_bias
  if (params_.temperature == 0) return std::max_element(scores_.begin(), scores_.end()) - scores_.begin();
  const float temperature = static_cast<float>(params_.temperature);
  if (temperature == 0) return std::max_element(scores_.begin(), scores_.end()) - scores_.begin();  // its limit
  // shifted first, as Sampler does: the top score stays 0 however small the temperature (s / 1e-38 overflowed to inf,
  // and the softmax's inf - inf made the probabilities NaN)
  const float top = *std::max_element(scores_.begin(), scores_.end());
  for (float& s : scores_) s = (s - top) / temperature;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  if (params_.top_k > 0 && params_.top_k < n) {  // filter_top_k: the k-th largest value and every tie survive
    std::copy(scores_.begin(), scores_.end(), partition_.begin());
    std::nth_element(partition_.begin(), partition_.begin() + (n - params_.top_k), partition_.end());
    const float kth = partition_[n - params_.top_k];
    for (float& s : scores_) s = s >= kth ? s : minus_inf;
  }
  if (params_.top_p < 1.0) {  // filter_top_p over the stable descending order
    std::iota(order_.begin(), order_.end(), 0);
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return -scores_[a] < -scores_[b]; });
    for (int64_t i = 0; i < n; ++i) partition_[i] = scores_[order_[i]];
    softmax_into(partition_.data(), n, probs_);
    double cumulative = 0;
    for (int64_t i = 0; i < n; ++i) {
      cumulative += probs_[i];
      // A token stays if the mass before it (cumsum - its own probability, as numpy computes it) is below p.
      if (!(cumulative - probs_[i] < params_.top_p)) partition_[i] = minus_inf;
    }
    for (int64_t i = 0; i < n; ++i) scores_[order_[i]] = partition_[i];
  }
  // rng.choice(n, p=softmax(scores)): cdf = cumsum(p); cdf /= cdf[-1]; searchsorted(cdf, random(), 'right')
  softmax_into(scores_.data(), n, probs_);
  for (int64_t i = 1; i < n; ++i) probs_[i] += probs_[i - 1];
  const double last = probs_[n - 1];
  for (double& c : probs_) c /= last;
  const double u = rng_.random();
  return std::upper_bound(probs_.begin(), probs_.end(), u) - probs_.begin();
}

}  // namespace llama4rt
