// What a decode-attention kernel that reads each KV head's cache once would cost, against ONNX Runtime's CPU
// GroupQueryAttention (benchmarks/gqa_depth.py), on rand200m's global layers (12 query heads over 4 KV heads of 64).
// A prototype for BENCHMARKS.md "Why decode falls with depth", not part of the runtime: the query heads of a group
// share one read of K and V, positions are split over threads (flash-decoding: per-thread max, sum and output, then
// combined), the cache fp32, fp16 or int8 with a scale per position. Needs AVX-512; checked against a double reference.
//
//   g++ -O3 -march=native -fopenmp -std=c++17 benchmarks/decode_attention.cpp -o /tmp/decode_attention
//   /tmp/decode_attention 2          # threads
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <type_traits>

constexpr int H = 12, KVH = 4, D = 64, G = H / KVH;

static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 load(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }

// e^x for x <= 0 (scores minus their max): 2^(x log2 e) = 2^k * 2^f, k = round, f in [-0.5, 0.5], 2^f by a degree-6
// polynomial (relative error ~1e-7); below -87 the result is flushed to 0.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.6931471805599453f));  // f ln 2, |.| <= 0.347
    __m512 y = _mm512_set1_ps(1.f / 720);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 120));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 24));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 6));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.5f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(y, k);
}

// Partial over positions [begin, end) of one kv head: m[g], l[g], o[g][D].
template <typename T>
void partial(const float* q, const T* K, const T* V, const float* ks, const float* vs, int begin, int end, float* scores,
             float* m, float* l, float* o) {
    __m512 qv[G][4];
    for (int g = 0; g < G; ++g) for (int c = 0; c < 4; ++c) qv[g][c] = load(q + g * D + c * 16);
    for (int g = 0; g < G; ++g) m[g] = -INFINITY;
    for (int p = begin; p < end; ++p) {
        const T* k = K + (size_t)p * D;
        __m512 k0 = load(k), k1 = load(k + 16), k2 = load(k + 32), k3 = load(k + 48);
        float s = ks ? ks[p] : 1.f;
        for (int g = 0; g < G; ++g) {
            __m512 acc = _mm512_mul_ps(qv[g][0], k0);
            acc = _mm512_fmadd_ps(qv[g][1], k1, acc);
            acc = _mm512_fmadd_ps(qv[g][2], k2, acc);
            acc = _mm512_fmadd_ps(qv[g][3], k3, acc);
            float v = _mm512_reduce_add_ps(acc) * s;
            scores[g * (end - begin) + (p - begin)] = v;
            m[g] = std::max(m[g], v);
        }
    }
    int n = end - begin;
    for (int g = 0; g < G; ++g) {
        float* sc = scores + g * n;
        __m512 mx = _mm512_set1_ps(m[g]), sum = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), mx));
            _mm512_storeu_ps(sc + i, e);
            sum = _mm512_add_ps(sum, e);
        }
        float tail = 0.f;
        for (; i < n; ++i) { sc[i] = std::exp(sc[i] - m[g]); tail += sc[i]; }
        l[g] = _mm512_reduce_add_ps(sum) + tail;
    }
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g) for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int p = begin; p < end; ++p) {
        const T* v = V + (size_t)p * D;
        float s = vs ? vs[p] : 1.f;
        __m512 v0 = load(v), v1 = load(v + 16), v2 = load(v + 32), v3 = load(v + 48);
        for (int g = 0; g < G; ++g) {
            __m512 w = _mm512_set1_ps(scores[g * n + (p - begin)] * s);
            acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
            acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);
            acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);
        }
    }
    for (int g = 0; g < G; ++g) for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + g * D + c * 16, acc[g][c]);
}

// K and V [KVH, cap, D] uniform in (-1, 1), q [H, D] pre-scaled by 1/sqrt(D); the same on every call.
void random_inputs(int cap, std::vector<float>& K, std::vector<float>& V, std::vector<float>& q) {
    srand(1);
    K.resize((size_t)KVH * cap * D); V.resize(K.size()); q.resize(H * D);
    for (size_t i = 0; i < K.size(); ++i) { K[i] = (rand() / (float)RAND_MAX - .5f) * 2; V[i] = (rand() / (float)RAND_MAX - .5f) * 2; }
    for (auto& x : q) x = (rand() / (float)RAND_MAX - .5f) * 2 * 0.125f;
}

template <typename T>
double run(int depth, int cap, int threads, int reps, float* out_check) {
    std::vector<float> Kf, Vf, q;
    random_inputs(cap, Kf, Vf, q);
    std::vector<T> K(Kf.size()), V(Vf.size());
    std::vector<float> ks, vs;
    for (size_t i = 0; i < K.size(); ++i) {
        if constexpr (std::is_same<T, float>::value) { K[i] = Kf[i]; V[i] = Vf[i]; }
        else if constexpr (std::is_same<T, uint16_t>::value) { K[i] = _cvtss_sh(Kf[i], 0); V[i] = _cvtss_sh(Vf[i], 0); }
        else { K[i] = (int8_t)(Kf[i] * 127); V[i] = (int8_t)(Vf[i] * 127); }
    }
    if constexpr (std::is_same<T, int8_t>::value) { ks.assign((size_t)KVH * cap, 1 / 127.f); vs.assign((size_t)KVH * cap, 1 / 127.f); }
    int total = depth + 1;
    int pieces = threads * KVH;  // (kv head, position range) work items
    std::vector<float> m(pieces * G), l(pieces * G), o(pieces * G * D), out(H * D);
    std::vector<std::vector<float>> scratch(pieces, std::vector<float>(G * (total / threads + 2)));
    auto once = [&]() {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int w = 0; w < pieces; ++w) {
            int h = w / threads, t = w % threads;
            int begin = (int)((long)total * t / threads), end = (int)((long)total * (t + 1) / threads);
            const T* Kh = K.data() + (size_t)h * cap * D;
            const T* Vh = V.data() + (size_t)h * cap * D;
            const float* ksh = ks.empty() ? nullptr : ks.data() + (size_t)h * cap;
            const float* vsh = vs.empty() ? nullptr : vs.data() + (size_t)h * cap;
            partial<T>(q.data() + h * G * D, Kh, Vh, ksh, vsh, begin, end, scratch[w].data(), &m[w * G], &l[w * G], &o[w * G * D]);
        }
        for (int h = 0; h < KVH; ++h) for (int g = 0; g < G; ++g) {
            float mx = -INFINITY;
            for (int t = 0; t < threads; ++t) mx = std::max(mx, m[(h * threads + t) * G + g]);
            float den = 0; float* dst = out.data() + (h * G + g) * D;
            for (int d = 0; d < D; ++d) dst[d] = 0;
            for (int t = 0; t < threads; ++t) {
                int w = h * threads + t; float f = std::exp(m[w * G + g] - mx);
                den += f * l[w * G + g];
                for (int d = 0; d < D; ++d) dst[d] += f * o[(w * G + g) * D + d];
            }
            for (int d = 0; d < D; ++d) dst[d] /= den;
        }
    };
    for (int i = 0; i < 5; ++i) once();
    std::vector<double> ts;
    for (int i = 0; i < reps; ++i) {
        auto a = std::chrono::steady_clock::now(); once(); auto b = std::chrono::steady_clock::now();
        ts.push_back(std::chrono::duration<double, std::micro>(b - a).count());
    }
    std::sort(ts.begin(), ts.end());
    if (out_check) std::memcpy(out_check, out.data(), sizeof(float) * H * D);
    return ts[ts.size() / 2];
}

// Largest absolute error of the fp32 kernel against attention computed in double.
double check(int depth, int cap) {
    std::vector<float> got(H * D);
    run<float>(depth, cap, 2, 3, got.data());
    std::vector<float> K, V, q;
    random_inputs(cap, K, V, q);
    double worst = 0;
    for (int hq = 0; hq < H; ++hq) {
        int h = hq / G; std::vector<double> s(depth + 1); double mx = -1e300;
        for (int p = 0; p <= depth; ++p) { double a = 0; for (int d = 0; d < D; ++d) a += (double)q[hq * D + d] * K[((size_t)h * cap + p) * D + d]; s[p] = a; mx = std::max(mx, a); }
        double den = 0; for (auto& x : s) { x = std::exp(x - mx); den += x; }
        for (int d = 0; d < D; ++d) { double a = 0; for (int p = 0; p <= depth; ++p) a += s[p] * V[((size_t)h * cap + p) * D + d]; worst = std::max(worst, std::fabs(a / den - got[hq * D + d])); }
    }
    return worst;
}

int main(int argc, char** argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    printf("max abs error vs double reference at depth 4096: %.2e\n", check(4096, 4097));
    for (int depth : {512, 4096, 16384}) {
        int cap = 16513;
        double f32 = run<float>(depth, cap, threads, 50, nullptr);
        double f16 = run<uint16_t>(depth, cap, threads, 50, nullptr);
        double i8 = run<int8_t>(depth, cap, threads, 50, nullptr);
        double mb = 2.0 * KVH * (depth + 1) * D * 4 / 1e6;
        printf("depth %5d: fp32 %7.1f us (%5.1f GB/s)  fp16 %7.1f us  int8 %7.1f us   [fp32 K/V %.1f MB]\n", depth, f32,
               mb * 1e3 / f32, f16, i8, mb);
    }
}
