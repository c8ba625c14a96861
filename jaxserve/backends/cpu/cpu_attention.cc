// Paged decode attention for XLA:CPU, as an XLA FFI custom call (see cpu_attention.py).
//
// Operands (all row-major):
//   q            [B, Hq, D]            float32
//   k_pool       [L, Hkv, N, S, D]     float32, or uint16/bfloat16 (bfloat16 bit patterns)
//   v_pool       [L, Hkv, N, S, D]     same dtype and shape as k_pool
//   layer        []                    int32, which of the L layers to read
//   window       []                    int32, the sliding window (an operand, so one compiled
//                                      program serves layers with different windows; no
//                                      window is any value >= the context, e.g. INT32_MAX)
//   block_tables [B, P]                int32, page of the sequence's j-th token is [b, j / S]
//   kv_lens      [B]                   int32
//   positions    [B]                   int32, position of the query token, -1 = padding row
// Attributes: scale (f32), softcap (f32, 0 = none: else each score s = scale * q.k becomes
// softcap * tanh(s / softcap) before the softmax, Gemma 2's attention logit soft-capping).
// Result: out [B, Hq, D] float32.
//
// Query of row b at position p sees key j iff j <= p, j < kv_lens[b], j < P * S and
// p - j < window (a window <= 0 sees nothing). A row with no visible key writes exact zeros.
// GQA: query head h reads kv head h / (Hq / Hkv).
//
// Work item = (row b, kv head): its G = Hq / Hkv query heads are processed together, so each K
// and V row of the visible pages is read from memory once (later uses hit L1/L2). Keys go in
// blocks of whole pages (kBlockKeys): scores of the block for all G heads (soft-capped when
// asked), one online-softmax step (running max, rescale), then the probability-weighted V rows. All float32. Only pages
// holding visible keys are visited; the next page is prefetched while one is computed.
//
// Block table entries: every entry that would be read (the pages holding visible keys) is
// checked before any work starts; one outside [0, N) makes the call return InvalidArgument
// (nothing is read out of bounds). Entries past the visible pages are never read and may hold
// anything.
//
// Threads: items are claimed from a shared atomic counter by the caller thread and by up to
// num_threads() - 1 tasks on XLA's intra-op pool (num_threads() workers in all, as many as
// the pool has threads: one more oversubscribed the cores). The caller never waits for a task to start: it
// works until no item is left, then waits only for items already claimed by running tasks. A task
// that starts after everything is done finds no item and exits; the state it touches (counter,
// totals) lives in a shared_ptr the task holds.
//
// Vectorization: the element-wise loops (exp, widening bf16, rescaling, max/sum) are plain loops
// that g++ -O3 vectorizes. The two matrix products use GCC/Clang vector types (`VF`, the
// target's widest float vector; the compiler picks the instructions) for head_dim 64 and 128:
// g++ does not keep accumulators in registers across key rows by itself, and reducing each
// q.k dot product across lanes separately costs more than the products. Other head_dims take a
// scalar-loop path that g++ vectorizes per row.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ----------------------------------------------------------------------------- vector types

using namespace jaxserve_simd;  // kW, VF, VI, LoadF, StoreF, PairSum (cpu_simd.h)
typedef uint32_t VU32 __attribute__((vector_size(kW * sizeof(float))));
typedef uint16_t VU16 __attribute__((vector_size(kW * sizeof(uint16_t))));

// Lane groups of the result hold partial sums of q . rows[i] for i < N, in row order, kW / N
// lanes per row; with N = kW, lane i is the dot product of q with rows[i]. The lanes of each
// row's products are folded by PairSum, in a tree shared with the other rows: ~3 operations per
// dot product instead of a full lane reduction each.
template <int N, int kD>
inline VF Dots(const float* __restrict q, const float* const* rows) {
  if constexpr (N == 1) {
    const float* r = rows[0];
    VF a0 = LoadF(q) * LoadF(r), a1 = LoadF(q + kW) * LoadF(r + kW);  // two chains
    for (int c = 2; c < kD / kW; c += 2) {
      a0 += LoadF(q + c * kW) * LoadF(r + c * kW);
      a1 += LoadF(q + (c + 1) * kW) * LoadF(r + (c + 1) * kW);
    }
    return a0 + a1;
  } else {
    return PairSum(Dots<N / 2, kD>(q, rows), Dots<N / 2, kD>(q, rows + N / 2));
  }
}

// Whether head_dim kD takes the vector-type path: a multiple of 4 vectors (64 and 128 do on
// every target: kW <= 16).
template <int kD>
constexpr bool kVectorPath = kD > 0 && kD % (4 * kW) == 0;

// ----------------------------------------------------------------------------- plain loops

// Independent partial sums per dot product (a multiple of the widest vector, 16 floats), so the
// main loop is vertical multiply-adds, which g++ vectorizes without -ffast-math.
constexpr int kLanes = 16;

inline float DotScalar(const float* __restrict a, const float* __restrict b, int64_t D) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int w = 0; w < kLanes; ++w) acc[w] += a[d + w] * b[d + w];
  }
  float tail = 0.0f;
  for (; d < D; ++d) tail += a[d] * b[d];
  for (int w = 0; w < 8; ++w) acc[w] += acc[w + 8];  // tree reduction: vector adds of halves
  for (int w = 0; w < 4; ++w) acc[w] += acc[w + 4];
  for (int w = 0; w < 2; ++w) acc[w] += acc[w + 2];
  return (acc[0] + acc[1]) + tail;
}

inline void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

inline void Scale(float a, float* __restrict y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] *= a;
}

// max(init, x[0..n)) with kLanes independent running maxima (no serial chain through n).
inline float MaxOf(const float* __restrict x, int64_t n, float init) {
  float m[kLanes];
  for (int w = 0; w < kLanes; ++w) m[w] = init;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int w = 0; w < kLanes; ++w) m[w] = x[i + w] > m[w] ? x[i + w] : m[w];
  }
  for (int w = 0; i < n; ++i, ++w) m[w] = x[i] > m[w] ? x[i] : m[w];  // w < kLanes
  for (int w = 0; w < 8; ++w) m[w] = m[w + 8] > m[w] ? m[w + 8] : m[w];
  for (int w = 0; w < 4; ++w) m[w] = m[w + 4] > m[w] ? m[w + 4] : m[w];
  for (int w = 0; w < 2; ++w) m[w] = m[w + 2] > m[w] ? m[w + 2] : m[w];
  return m[1] > m[0] ? m[1] : m[0];
}

// sum of x[0..n) with kLanes independent partial sums.
inline float SumOf(const float* __restrict x, int64_t n) {
  float a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int w = 0; w < kLanes; ++w) a[w] += x[i + w];
  }
  for (int w = 0; i < n; ++i, ++w) a[w] += x[i];
  for (int w = 0; w < 8; ++w) a[w] += a[w + 8];
  for (int w = 0; w < 4; ++w) a[w] += a[w + 4];
  for (int w = 0; w < 2; ++w) a[w] += a[w + 2];
  return a[0] + a[1];
}

// n pool values as float32: float pools are used in place, bf16 bit patterns are widened into
// buf (a page at a time: one long loop that vectorizes well).
template <typename T>
inline const float* Widen(const T* __restrict src, float* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {  // in vector types: the widest vectors, not g++'s default 256 bit
      VU16 h;
      std::memcpy(&h, src + i, sizeof h);
      const VU32 w = __builtin_convertvector(h, VU32) << 16;
      std::memcpy(buf + i, &w, sizeof w);
    }
    for (; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof f);
      buf[i] = f;
    }
    return buf;
  }
}

// Prefetch n bytes at p (the next page's rows, while this page is computed).
inline void Prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// Prefetch n bytes at p into L2 (a whole item's K and V pages, when the item starts).
inline void PrefetchL2(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 2);
}

// x[i] <- cap * tanh(x[i] / cap), in a loop that vectorizes: tanh from the rational
// approximation Eigen (and XLA:CPU) use for float32 (odd degree-13 / even degree-6 polynomials
// on the argument clamped to +-7.9053, where tanh is 1 in float32; within a few ulp), and t
// itself below 4e-4, where tanh(t) = t in float32. A NaN stays NaN.
inline void SoftCap(float* __restrict x, int64_t n, float cap) {
  constexpr float kClamp = 7.90531110763549805f;
  const float inv = 1.0f / cap;
  for (int64_t i = 0; i < n; ++i) {
    const float a = x[i] * inv;
    const float t = std::max(std::min(a, kClamp), -kClamp);  // NaN passes through
    const float t2 = t * t;
    float p = -2.76076847742355e-16f;
    p = p * t2 + 2.00018790482477e-13f;
    p = p * t2 + -8.60467152213735e-11f;
    p = p * t2 + 5.12229709037114e-08f;
    p = p * t2 + 1.48572235717979e-05f;
    p = p * t2 + 6.37261928875436e-04f;
    p = p * t2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * t2 + 1.18534705686654e-04f;
    q = q * t2 + 2.26843463243900e-03f;
    q = q * t2 + 4.89352518554385e-03f;
    const float th = (a < 4e-4f && a > -4e-4f) ? a : t * p / q;
    x[i] = cap * th;
  }
}

// ----------------------------------------------------------------------------- the problem

struct Problem {
  const float* q;
  const void* k;  // pool base of the selected layer
  const void* v;
  const int32_t* block_tables;
  const int32_t* kv_lens;
  const int32_t* positions;
  float* out;
  int64_t B, Hq, Hkv, G, D, N, S, P;
  float scale;
  float softcap;   // 0: none
  int64_t window;  // from the window operand
};

// Visible key interval [lo, hi) of row b; empty (lo >= hi) for padding rows.
inline void Bounds(const Problem& pr, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t p = pr.positions[b];
  *lo = 0;
  *hi = 0;
  if (p < 0) return;
  int64_t h = std::min<int64_t>(p + 1, pr.kv_lens[b]);
  h = std::min<int64_t>(h, pr.P * pr.S);
  *hi = std::max<int64_t>(h, 0);
  *lo = std::max<int64_t>(p - pr.window + 1, 0);  // window <= 0: lo > p >= hi - 1, empty
}

// Keys per softmax block (whole pages): the scores of a block are computed before one max /
// exp / rescale step, so that bookkeeping is paid per block, not per page; the block's K and V
// (widened, for bf16) stay in L1/L2 between the score and the weighted-sum pass.
constexpr int64_t kBlockKeys = 64;

inline int64_t PagesPerBlock(int64_t S) { return std::max<int64_t>(1, kBlockKeys / S); }

// Scores per head are kept at a stride padded to whole vectors (Dots writes kW lanes at a time).
inline int64_t ScoreStride(int64_t S) {
  const int64_t n = PagesPerBlock(S) * S;
  return (n + kW - 1) / kW * kW;
}

// Per-thread scratch: scaled queries, accumulators, a block of scores, the block's K/V rows
// (pointers; widened copies for bf16), a zero row that pads the last group of Dots.
struct Scratch {
  std::vector<float> qs, acc, s, kf, vf, zero, m, l;
  std::vector<const float*> krows, vrows;
  Scratch(const Problem& pr, bool widen)
      : qs(pr.G * pr.D), acc(pr.G * pr.D), s(pr.G * ScoreStride(pr.S)),
        kf(widen ? PagesPerBlock(pr.S) * pr.S * pr.D : 0),
        vf(widen ? PagesPerBlock(pr.S) * pr.S * pr.D : 0), zero(pr.D, 0.0f), m(pr.G), l(pr.G),
        krows(ScoreStride(pr.S)), vrows(ScoreStride(pr.S)) {}
};

// s[g * SS + j] = qs_g . krows[j] for the block's nb keys.
template <int kD>
void BlockScores(const Problem& pr, Scratch& sc, int64_t nb, int64_t SS) {
  const int64_t G = pr.G, D = pr.D;
  if constexpr (kVectorPath<kD>) {
    for (int64_t j = nb; j < (nb + kW - 1) / kW * kW; ++j) sc.krows[j] = sc.zero.data();
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < nb; j += kW) {
        StoreF(&sc.s[g * SS + j], Dots<kW, kD>(&sc.qs[g * kD], &sc.krows[j]));
      }
    }
  } else {
    for (int64_t j = 0; j < nb; ++j) {  // each row once, all heads
      for (int64_t g = 0; g < G; ++g) sc.s[g * SS + j] = DotScalar(&sc.qs[g * D], sc.krows[j], D);
    }
  }
}

// acc_g += sum_j s[g * SS + j] * vrows[j] for each head g.
template <int kD>
void BlockWeightedSum(const Problem& pr, Scratch& sc, int64_t nb, int64_t SS) {
  const int64_t G = pr.G, D = pr.D;
  const float* s = sc.s.data();
  float* acc = sc.acc.data();
  if constexpr (kVectorPath<kD>) {
    // Accumulators in registers across the block's rows: 4 vectors of head_dim for two heads
    // at a time (8 independent multiply-add chains).
    for (int64_t c = 0; c < kD; c += 4 * kW) {
      int64_t g = 0;
      for (; g + 1 < G; g += 2) {
        float* a_ptr = acc + g * kD + c;
        float* b_ptr = acc + (g + 1) * kD + c;
        VF a0 = LoadF(a_ptr), a1 = LoadF(a_ptr + kW), a2 = LoadF(a_ptr + 2 * kW),
           a3 = LoadF(a_ptr + 3 * kW);
        VF b0 = LoadF(b_ptr), b1 = LoadF(b_ptr + kW), b2 = LoadF(b_ptr + 2 * kW),
           b3 = LoadF(b_ptr + 3 * kW);
        const float* pa = s + g * SS;
        const float* pb = s + (g + 1) * SS;
        for (int64_t j = 0; j < nb; ++j) {
          const float* v = sc.vrows[j] + c;
          const VF v0 = LoadF(v), v1 = LoadF(v + kW), v2 = LoadF(v + 2 * kW), v3 = LoadF(v + 3 * kW);
          const float x = pa[j], y = pb[j];
          a0 += x * v0, a1 += x * v1, a2 += x * v2, a3 += x * v3;
          b0 += y * v0, b1 += y * v1, b2 += y * v2, b3 += y * v3;
        }
        StoreF(a_ptr, a0), StoreF(a_ptr + kW, a1), StoreF(a_ptr + 2 * kW, a2);
        StoreF(a_ptr + 3 * kW, a3);
        StoreF(b_ptr, b0), StoreF(b_ptr + kW, b1), StoreF(b_ptr + 2 * kW, b2);
        StoreF(b_ptr + 3 * kW, b3);
      }
      if (g < G) {
        float* a_ptr = acc + g * kD + c;
        VF a0 = LoadF(a_ptr), a1 = LoadF(a_ptr + kW), a2 = LoadF(a_ptr + 2 * kW),
           a3 = LoadF(a_ptr + 3 * kW);
        const float* pa = s + g * SS;
        for (int64_t j = 0; j < nb; ++j) {
          const float* v = sc.vrows[j] + c;
          const float x = pa[j];
          a0 += x * LoadF(v), a1 += x * LoadF(v + kW), a2 += x * LoadF(v + 2 * kW);
          a3 += x * LoadF(v + 3 * kW);
        }
        StoreF(a_ptr, a0), StoreF(a_ptr + kW, a1), StoreF(a_ptr + 2 * kW, a2);
        StoreF(a_ptr + 3 * kW, a3);
      }
    }
  } else {
    for (int64_t j = 0; j < nb; ++j) {  // each row once, all heads
      for (int64_t g = 0; g < G; ++g) Axpy(s[g * SS + j], sc.vrows[j], acc + g * D, D);
    }
  }
}

template <typename T, int kD>
void Item(const Problem& pr, int64_t item, Scratch& sc) {
  const int64_t b = item / pr.Hkv, kvh = item % pr.Hkv;
  const int64_t G = pr.G, S = pr.S, D = pr.D;
  float* out = pr.out + (b * pr.Hq + kvh * G) * D;
  int64_t lo, hi;
  Bounds(pr, b, &lo, &hi);
  if (lo >= hi) {
    std::fill(out, out + G * D, 0.0f);
    return;
  }
  float* __restrict acc = sc.acc.data();
  float* __restrict m = sc.m.data();
  float* __restrict l = sc.l.data();
  const float* q = pr.q + (b * pr.Hq + kvh * G) * D;
  for (int64_t i = 0; i < G * D; ++i) sc.qs[i] = q[i] * pr.scale;
  std::fill(acc, acc + G * D, 0.0f);
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.0f);

  const T* kbase = static_cast<const T*>(pr.k) + kvh * pr.N * S * D;
  const T* vbase = static_cast<const T*>(pr.v) + kvh * pr.N * S * D;
  const int32_t* bt = pr.block_tables + b * pr.P;  // entries validated before any item runs
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t first = lo / S, last = (hi - 1) / S, ppb = PagesPerBlock(S);
  const int64_t SS = ScoreStride(S);
  // Visible rows [t0, t1) of page pi (never empty for first <= pi <= last).
  auto rows = [&](int64_t pi, int64_t* t0, int64_t* t1) {
    *t0 = std::max(lo, pi * S) - pi * S;
    *t1 = std::min(hi, (pi + 1) * S) - pi * S;
  };
  // All of the item's K, then V rows, requested at once (the pages are scattered, so the
  // hardware prefetchers cannot run ahead; ~5-10% faster at batch 32-64, measured).
  for (const T* base : {kbase, vbase}) {
    for (int64_t pi = first; pi <= last; ++pi) {
      int64_t t0, t1;
      rows(pi, &t0, &t1);
      PrefetchL2(base + (bt[pi] * S + t0) * D, (t1 - t0) * row_bytes);
    }
  }
  for (int64_t pb = first; pb <= last; pb += ppb) {
    const int64_t pe = std::min(last, pb + ppb - 1);
    // The block's K rows (and V rows, fetched now, used after the softmax step).
    int64_t nb = 0;
    for (int64_t pi = pb; pi <= pe; ++pi) {
      int64_t t0, t1;
      rows(pi, &t0, &t1);
      const int64_t off = (bt[pi] * S + t0) * D, n = t1 - t0;
      if (pi < last) {  // the next page's K while this block is computed
        int64_t n0, n1;
        rows(pi + 1, &n0, &n1);
        Prefetch(kbase + (bt[pi + 1] * S + n0) * D, (n1 - n0) * row_bytes);
      }
      Prefetch(vbase + off, n * row_bytes);
      const float* kr = Widen<T>(kbase + off, sc.kf.data() + nb * D, n * D);
      for (int64_t t = 0; t < n; ++t) sc.krows[nb + t] = kr + t * D;
      nb += n;
    }
    BlockScores<kD>(pr, sc, nb, SS);
    if (pr.softcap != 0.0f) {
      for (int64_t g = 0; g < G; ++g) SoftCap(sc.s.data() + g * SS, nb, pr.softcap);
    }
    // Online softmax: new running max, rescale what was accumulated, exponentiate the block.
    for (int64_t g = 0; g < G; ++g) {
      float* sg = sc.s.data() + g * SS;
      const float mx = MaxOf(sg, nb, m[g]);
      const float alpha = std::exp(m[g] - mx);  // exp(-inf) = 0 on the first block
      m[g] = mx;
      for (int64_t j = 0; j < nb; ++j) sg[j] -= mx;
      ExpNonPositive(sg, nb);
      l[g] = l[g] * alpha + SumOf(sg, nb);
      if (alpha != 1.0f) Scale(alpha, acc + g * D, D);
    }
    nb = 0;
    for (int64_t pi = pb; pi <= pe; ++pi) {
      int64_t t0, t1;
      rows(pi, &t0, &t1);
      const int64_t n = t1 - t0;
      const float* vr = Widen<T>(vbase + (bt[pi] * S + t0) * D, sc.vf.data() + nb * D, n * D);
      for (int64_t t = 0; t < n; ++t) sc.vrows[nb + t] = vr + t * D;
      nb += n;
    }
    BlockWeightedSum<kD>(pr, sc, nb, SS);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / l[g];  // l >= 1: the max key contributes exp(0)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}

using ItemFn = void (*)(const Problem&, int64_t, Scratch&);

template <typename T>
ItemFn PickItem(int64_t D) {
  if (D == 64) return &Item<T, 64>;
  if (D == 128) return &Item<T, 128>;
  return &Item<T, 0>;
}

// Shared between the caller and pool tasks; tasks hold it by shared_ptr so it outlives them.
struct Shared {
  Problem pr;
  ItemFn fn;
  bool widen;  // bf16 pool: scratch for widened K/V blocks
  int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Claim and run items until none is left. Only items this thread ran are counted as done; a
// thread that claimed nothing never touches the problem (whose buffers may be gone by then).
void Work(Shared& sh) {
  int64_t i = sh.next.fetch_add(1, std::memory_order_relaxed);
  if (i >= sh.total) return;
  Scratch sc(sh.pr, sh.widen);
  int64_t ran = 0;
  for (; i < sh.total; i = sh.next.fetch_add(1, std::memory_order_relaxed)) {
    sh.fn(sh.pr, i, sc);
    ++ran;
  }
  if (sh.done.fetch_add(ran, std::memory_order_acq_rel) + ran == sh.total) {
    { std::lock_guard<std::mutex> lock(sh.mu); }  // the waiter is in wait() or sees done
    sh.cv.notify_all();
  }
}

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Fail(const std::string& msg) {
  return ffi::Error::InvalidArgument("jaxserve paged_decode_attention: " + msg);
}

bool IsBf16Bits(ffi::DataType t) { return t == ffi::DataType::U16 || t == ffi::DataType::BF16; }

ffi::Error PagedDecodeAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                    ffi::AnyBuffer v, ffi::AnyBuffer layer, ffi::AnyBuffer window,
                                    ffi::AnyBuffer bt, ffi::AnyBuffer lens, ffi::AnyBuffer pos,
                                    ffi::Result<ffi::AnyBuffer> out, float scale,
                                    float softcap) {
  using DT = ffi::DataType;
  // ---- validation
  if (q.element_type() != DT::F32 || q.dimensions().size() != 3)
    return Fail("q must be float32 [B, Hq, D], got rank " + std::to_string(q.dimensions().size()));
  const int64_t B = q.dimensions()[0], Hq = q.dimensions()[1], D = q.dimensions()[2];
  const DT pt = k.element_type();
  if (pt != DT::F32 && !IsBf16Bits(pt))
    return Fail("k_pool must be float32, or uint16/bfloat16 holding bfloat16 bits");
  if (v.element_type() != pt) return Fail("v_pool must have k_pool's dtype");
  if (k.dimensions().size() != 5)
    return Fail("k_pool must be [L, Hkv, N, S, D], got " + Dims(k.dimensions()));
  if (Dims(v.dimensions()) != Dims(k.dimensions()))
    return Fail("v_pool shape " + Dims(v.dimensions()) + " != k_pool shape " +
                Dims(k.dimensions()));
  const auto kd = k.dimensions();
  const int64_t L = kd[0], Hkv = kd[1], N = kd[2], S = kd[3];
  if (kd[4] != D)
    return Fail("head_dim mismatch: q " + Dims(q.dimensions()) + ", pool " + Dims(kd));
  if (Hkv <= 0 || Hq % Hkv != 0)
    return Fail("num_q_heads " + std::to_string(Hq) + " is not a multiple of num_kv_heads " +
                std::to_string(Hkv));
  if (S <= 0 || D <= 0) return Fail("page_size and head_dim must be positive");
  if (layer.element_type() != DT::S32 || layer.element_count() != 1)
    return Fail("layer must be an int32 scalar");
  if (window.element_type() != DT::S32 || window.element_count() != 1)
    return Fail("window must be an int32 scalar");
  if (!(softcap >= 0.0f)) return Fail("softcap must be >= 0 (0: none)");
  if (bt.element_type() != DT::S32 || bt.dimensions().size() != 2 || bt.dimensions()[0] != B)
    return Fail("block_tables must be int32 [B=" + std::to_string(B) + ", P], got " +
                Dims(bt.dimensions()));
  const int64_t P = bt.dimensions()[1];
  if (lens.element_type() != DT::S32 || lens.dimensions().size() != 1 ||
      lens.dimensions()[0] != B)
    return Fail("kv_lens must be int32 [B=" + std::to_string(B) + "], got " +
                Dims(lens.dimensions()));
  if (pos.element_type() != DT::S32 || pos.dimensions().size() != 1 || pos.dimensions()[0] != B)
    return Fail("positions must be int32 [B=" + std::to_string(B) + "], got " +
                Dims(pos.dimensions()));
  if (out->element_type() != DT::F32 || Dims(out->dimensions()) != Dims(q.dimensions()))
    return Fail("result must be float32 with q's shape " + Dims(q.dimensions()));
  const int64_t li = *static_cast<const int32_t*>(layer.untyped_data());
  if (li < 0 || li >= L)
    return Fail("layer " + std::to_string(li) + " out of range [0, " + std::to_string(L) + ")");

  auto sh = std::make_shared<Shared>();
  Problem& pr = sh->pr;
  const size_t esize = pt == DT::F32 ? sizeof(float) : sizeof(uint16_t);
  const size_t layer_bytes = static_cast<size_t>(Hkv * N * S * D) * esize;
  pr.q = static_cast<const float*>(q.untyped_data());
  pr.k = static_cast<const char*>(k.untyped_data()) + li * layer_bytes;
  pr.v = static_cast<const char*>(v.untyped_data()) + li * layer_bytes;
  pr.block_tables = static_cast<const int32_t*>(bt.untyped_data());
  pr.kv_lens = static_cast<const int32_t*>(lens.untyped_data());
  pr.positions = static_cast<const int32_t*>(pos.untyped_data());
  pr.out = static_cast<float*>(out->untyped_data());
  pr.B = B, pr.Hq = Hq, pr.Hkv = Hkv, pr.G = Hq / Hkv, pr.D = D, pr.N = N, pr.S = S, pr.P = P;
  pr.scale = scale;
  pr.softcap = softcap;
  pr.window = *static_cast<const int32_t*>(window.untyped_data());

  // Every block-table entry that will be read must name a page of the pool.
  int64_t key_rows = 0;  // visible keys over all rows (per kv head)
  for (int64_t b = 0; b < B; ++b) {
    int64_t lo, hi;
    Bounds(pr, b, &lo, &hi);
    key_rows += std::max<int64_t>(hi - lo, 0);
    for (int64_t pi = lo / S; lo < hi && pi * S < hi; ++pi) {
      const int32_t page = pr.block_tables[b * P + pi];
      if (page < 0 || page >= N)
        return Fail("block_tables[" + std::to_string(b) + ", " + std::to_string(pi) + "] = " +
                    std::to_string(page) + " is outside [0, num_pages=" + std::to_string(N) +
                    ") and holds visible keys");
    }
  }

  sh->fn = pt == DT::F32 ? PickItem<float>(D) : PickItem<uint16_t>(D);
  sh->widen = pt != DT::F32;
  sh->total = B * Hkv;
  if (sh->total == 0) return ffi::Error::Success();

  // Helpers only where there is enough work to be worth waking them (kMinRowsPerThread K/V
  // rows each, ~30 us): a batch-1 step stays on the caller.
  constexpr int64_t kMinRowsPerThread = 512;
  const int64_t helpers = std::min<int64_t>(
      {pool.num_threads() - 1, sh->total - 1, key_rows * Hkv / kMinRowsPerThread - 1});
  for (int64_t t = 0; t < helpers; ++t) {
    // On a scheduling failure the FFI runs the task inline: that just does the work here.
    pool.Schedule([sh]() { Work(*sh); });
  }
  Work(*sh);
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load(std::memory_order_acquire) == sh->total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecodeAttention, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_pool
                                  .Arg<ffi::AnyBuffer>()  // v_pool
                                  .Arg<ffi::AnyBuffer>()  // layer
                                  .Arg<ffi::AnyBuffer>()  // window
                                  .Arg<ffi::AnyBuffer>()  // block_tables
                                  .Arg<ffi::AnyBuffer>()  // kv_lens
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
