// Small-M matrix products against bfloat16 (or float32) weights for XLA:CPU, as XLA FFI custom
// calls (see cpu_matmul.py). For decode steps with a few rows, where the time is reading the
// weights once.
//
// Two handlers, same operands and result:
//   JaxserveMatmulBf16    y = x @ W     x [M, K] float32 or bfloat16, W [K, N] bfloat16 or
//                                       float32 (row-major [in, out], the projection layout)
//   JaxserveMatmulTBf16   y = x @ E^T   x [M, K] float32 or bfloat16, E [N, K] bfloat16 or
//                                       float32 (the tied-embedding LM head layout)
//   result y [M, N] float32.
// Everything is float32 after the exact widening of bfloat16 (bits << 16): products and sums in
// float32 (fused multiply-adds where the target has them); x is never rounded to bfloat16.
// Any M is correct; the kernels are built for small M (each weight is read from memory once and
// used for all M rows; at large M a blocked GEMM that reuses x and W from cache is faster).
// Float32 weights take the same code without the widening (a chunk's two vectors are then its
// first and second halves).
//
// Widening two bfloat16 at once: a 32-bit word holding the pair (e0 at the lower address, e1;
// little-endian) gives e0 = word << 16 and e1 = word & 0xffff0000 as float bits. So one vector
// load of 2 * kW weights becomes an "even" and an "odd" vector of kW floats with one integer
// op each (no lane shuffles); the kernels keep even and odd positions apart until the end.
//
// x @ W: the columns of W, in chunks of kChunk = 2 * kW, are split into `parts` contiguous
// ranges (the work items; kPartsPerThread per thread, at least kMinPartChunks chunks each).
// A part walks down K in panels of kPanelRows rows; per panel and group of up to kMaxMB rows of
// x, register blocks of V chunks (MB x V x 2 accumulator vectors, loaded from and stored to a
// per-thread scratch between panels) take per row k: V loads of W, MB broadcasts of x[m, k],
// 2 x MB x V multiply-adds. Within a panel the part's rows are read left to right, so each row is
// a short forward stream the hardware prefetchers follow; software prefetches ask for the same
// columns kPrefetchL1 rows ahead into L1 and kPrefetchL2 rows (the next panel) ahead into L2 (the
// rows are N weights apart, too far for the stride prefetchers, and a core waiting on L1 misses
// alone cannot keep enough reads in flight). Columns past the last whole chunk are copied,
// zero-padded, into a [K, kChunk] scratch. Summation order per output: k = 0, 1, ..., K - 1, one
// chain (independent of the thread count and of which thread runs which part).
//
// x @ E^T: work item = kItemRows consecutive rows of E (contiguous). Rows go in blocks of kR = 4,
// x rows in groups of up to 4; per (row block, x group) MB x kR accumulator vectors run over K in
// chunks of kChunk against x put once per call into the chunks' order (for bf16 weights: each
// chunk's even, then odd positions), then
// each accumulator is summed across lanes (the four of an x row in one shuffle tree). K past the
// last whole chunk is a scalar tail. Prefetches: kPrefetchL1NT rows ahead into L1, kPrefetchL2NT
// rows ahead into L2. Summation order per output: kW lane-wise partial sums over the chunks
// (each adding its even, then its odd product), a lane tree, then the tail.
//
// Threads: as cpu_attention.cc, items are claimed from an atomic counter by the caller and by
// tasks on XLA's intra-op pool (num_threads() threads in all, counting the caller, and only with
// at least kMinBytesPerThread bytes of weights per thread: waking a pool thread takes a few us,
// sometimes tens). The caller never waits for a task to start; at the end it waits only for
// items already claimed by running tasks, spinning (see WaitDone). State shared with the tasks
// lives in a shared_ptr they hold.
//
// Vectorization: GCC/Clang vector types of the target's widest float vector (kW lanes), with
// plain-C++ fallbacks for 8 and 4 lanes (AVX2, SSE/NEON). No AVX512_BF16 dot products
// (vdpbf16ps): they take bf16 x, i.e. would round a float32 x, and on the Sapphire Rapids this
// was tuned on they ran at half the products per second of float32 multiply-adds.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <thread>
#include <vector>

#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define JXS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "cpu_matmul.cc assumes a little-endian target (bf16 pairs widened from 32-bit words)"
#endif

namespace {

// ----------------------------------------------------------------------------- vector types

using namespace jaxserve_simd;  // kW, VF, LoadF, StoreF, PairSum (cpu_simd.h)
constexpr int kChunk = 2 * kW;  // bf16 weights per vector load: kW even + kW odd positions
typedef uint32_t VU __attribute__((vector_size(kW * sizeof(float))));

// 2 * kW bf16 at p -> (even positions, odd positions) as float32, exactly.
inline void Widen2(const uint16_t* p, VF* even, VF* odd) {
  VU u;
  std::memcpy(&u, p, sizeof u);
  const VU e = u << 16, o = u & 0xffff0000u;
  std::memcpy(even, &e, sizeof e);
  std::memcpy(odd, &o, sizeof o);
}

// Float32 weights: the 2 * kW at p as their first and second kW (no conversion).
inline void Widen2(const float* p, VF* first, VF* second) {
  *first = LoadF(p);
  *second = LoadF(p + kW);
}

inline float Bf16ToF32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float ToF32(uint16_t h) { return Bf16ToF32(h); }
inline float ToF32(float f) { return f; }

// Weights T: uint16_t (bf16 bits) or float. A chunk's two vectors hold its even and odd
// positions for bf16 (Interleaved<T>), its first and second halves for float.
template <typename T>
constexpr bool Interleaved = std::is_same_v<T, uint16_t>;

// The result / x order of a chunk's 2 * kW values from its two vectors a (lanes 0..kW) and b.
template <typename T>
inline void ChunkOrder(const float* a, const float* b, float* out) {
  for (int i = 0; i < kW; ++i) {
    if constexpr (Interleaved<T>) {
      out[2 * i] = a[i], out[2 * i + 1] = b[i];
    } else {
      out[i] = a[i], out[kW + i] = b[i];
    }
  }
}

// Prefetch the n bytes at p (whole cache lines).
template <int kHint>
inline void PrefetchBytes(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < n; b += 64) __builtin_prefetch(c + b, 0, kHint);
}

inline float LaneSum(VF v) {  // tree over lanes
  float a[kW];
  std::memcpy(a, &v, sizeof a);
  for (int w = kW / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  }
  return a[0];
}

constexpr int kCacheLine = 64;

// ----------------------------------------------------------------------------- x @ W

// Tuned with scripts/bench_cpu_matmul.py on a 2-core Sapphire Rapids (see the header).
constexpr int64_t kPanelRows = 16;   // rows of W per panel
constexpr int64_t kPrefetchL1 = 2;   // rows ahead, into L1
constexpr int64_t kPrefetchL2 = 16;  // rows ahead (one panel), into L2

// acc[m][0 .. V * kChunk) (+)= x[m, 0..kn) @ W[0..kn, block] for m < MB: x rows ldx apart, W rows
// ldw elements apart, accumulators (even/odd layout per chunk) rows lda apart; `init`: start
// from zero instead of loading acc. Rows k < npf1 (npf2) prefetch the block's columns of row
// k + kPrefetchL1 (k + kPrefetchL2).
template <typename T, int MB, int V>
void NNBlock(const float* __restrict x, int64_t ldx, const T* __restrict w, int64_t ldw,
             int64_t kn, float* __restrict acc, int64_t lda, bool init, int64_t npf1,
             int64_t npf2) {
  VF ae[MB][V], ao[MB][V];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      ae[m][v] = init ? VF{} : LoadF(acc + m * lda + v * kChunk);
      ao[m][v] = init ? VF{} : LoadF(acc + m * lda + v * kChunk + kW);
    }
  }
  for (int64_t k = 0; k < kn; ++k) {
    const T* wr = w + k * ldw;
    if (k < npf1) PrefetchBytes<3>(wr + kPrefetchL1 * ldw, V * kChunk * sizeof(T));
    if (k < npf2) PrefetchBytes<1>(wr + kPrefetchL2 * ldw, V * kChunk * sizeof(T));
    float xs[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xs[m] = x[m * ldx + k];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      VF e, o;
      Widen2(wr + v * kChunk, &e, &o);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        ae[m][v] += xs[m] * e;
        ao[m][v] += xs[m] * o;
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      StoreF(acc + m * lda + v * kChunk, ae[m][v]);
      StoreF(acc + m * lda + v * kChunk + kW, ao[m][v]);
    }
  }
}

template <typename T>
using NNFn = void (*)(const float*, int64_t, const T*, int64_t, int64_t, float*, int64_t, bool,
                      int64_t, int64_t);

constexpr int kMaxMB = 8;  // rows of x per register block

// [MB - 1][0: V = 1, 1: V = 2, 2: V = 4]
#define JXS_NN_ROW(mb) {&NNBlock<T, mb, 1>, &NNBlock<T, mb, 2>, &NNBlock<T, mb, 4>}
template <typename T>
constexpr NNFn<T> kNN[kMaxMB][3] = {JXS_NN_ROW(1), JXS_NN_ROW(2), JXS_NN_ROW(3), JXS_NN_ROW(4),
                                    JXS_NN_ROW(5), JXS_NN_ROW(6), JXS_NN_ROW(7), JXS_NN_ROW(8)};
#undef JXS_NN_ROW

// Chunks per register block for a group of MB rows: MB * V * 2 accumulators <= 16 vectors,
// leaving registers for the widened weights and the broadcasts (AVX-512 has 32).
inline int MaxV(int MB) { return MB <= 2 ? 4 : MB <= 4 ? 2 : 1; }

inline int VIndex(int v) { return v == 4 ? 2 : v - 1; }

// ----------------------------------------------------------------------------- x @ E^T

constexpr int64_t kItemRows = 64;      // rows of E per work item
constexpr int kR = 4;                   // rows of E per register block
constexpr int64_t kPrefetchL1NT = 4;   // rows ahead, into L1
constexpr int64_t kPrefetchL2NT = 16;  // rows ahead, into L2

// s[r] = the lane sum of a[r], r < 4: two levels of PairSum leave kW / 4 lanes per row.
inline void LaneSums4(const VF* a, float* s) {
  const VF f = PairSum(PairSum(a[0], a[1]), PairSum(a[2], a[3]));
  float l[kW];
  std::memcpy(l, &f, sizeof l);
  for (int r = 0; r < 4; ++r) {
    float t = l[r * (kW / 4)];
    for (int i = 1; i < kW / 4; ++i) t += l[r * (kW / 4) + i];
    s[r] = t;
  }
}

// y[m, r] (m < MB, r < R) = x[m, :] . E[r, :]. xd: x de-interleaved, per x row Kc chunks of
// (kW even, kW odd) floats, rows ldxd apart; xf: x as float32 (for the K tail), rows ldx apart.
// pf1 / pf2 (null: none): R rows of E to prefetch into L1 / L2 alongside.
template <typename T, int MB, int R>
void NTBlock(const float* __restrict xd, int64_t ldxd, const float* __restrict xf, int64_t ldx,
             const T* __restrict e, int64_t lde, int64_t K, float* __restrict y, int64_t ldy,
             const T* pf1, const T* pf2) {
  const int64_t Kc = K / kChunk;
  VF acc[MB][R];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = VF{};
  }
  for (int64_t c = 0; c < Kc; ++c) {
    if (pf1 != nullptr) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) PrefetchBytes<3>(pf1 + r * lde + c * kChunk, kChunk * sizeof(T));
    }
    if (pf2 != nullptr) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) PrefetchBytes<1>(pf2 + r * lde + c * kChunk, kChunk * sizeof(T));
    }
    VF we[R], wo[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) Widen2(e + r * lde + c * kChunk, &we[r], &wo[r]);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float* xc = xd + m * ldxd + c * kChunk;
      const VF xe = LoadF(xc), xo = LoadF(xc + kW);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[m][r] += xe * we[r];
        acc[m][r] += xo * wo[r];
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    float s[R];
    if constexpr (R == 4) {
      LaneSums4(acc[m], s);
    } else {
      for (int r = 0; r < R; ++r) s[r] = LaneSum(acc[m][r]);
    }
    for (int r = 0; r < R; ++r) {
      for (int64_t k = Kc * kChunk; k < K; ++k) s[r] += xf[m * ldx + k] * ToF32(e[r * lde + k]);
      y[m * ldy + r] = s[r];
    }
  }
}

template <typename T>
using NTFn = void (*)(const float*, int64_t, const float*, int64_t, const T*, int64_t, int64_t,
                      float*, int64_t, const T*, const T*);

template <typename T>
constexpr NTFn<T> kNT[4][2] = {  // [MB - 1][R == kR]
    {&NTBlock<T, 1, 1>, &NTBlock<T, 1, kR>},
    {&NTBlock<T, 2, 1>, &NTBlock<T, 2, kR>},
    {&NTBlock<T, 3, 1>, &NTBlock<T, 3, kR>},
    {&NTBlock<T, 4, 1>, &NTBlock<T, 4, kR>},
};

// ----------------------------------------------------------------------------- the problem

template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};

// ----------------------------------------------------------------------------- AMX, packed W
//
// JaxserveMatmulAmx: y = x @ W for bfloat16 x [M, K] and a bfloat16 W [K, N] stored pre-packed
// for Intel AMX (cpu_matmul.pack_amx, done once when the weights are loaded):
//   Wp [Ns, Kb, 2, 16, 32] with Kb = ceil(K / 32), Ns = ceil(N / 32):
//   Wp[s, kb, t, p, 2 * n + e] = W[32 kb + 2 p + e, 32 s + 16 t + n]   (zero past K and N)
// i.e. per strip of 32 columns s and 32-row slice kb, two 1 KB B tiles in the "VNNI" layout
// that TDPBF16PS takes: 16 rows of 16 (k, k + 1) pairs. A strip is one contiguous run of
// Kb * 2 KB, read front to back (the hardware prefetchers follow it; no repacking per call).
// TDPBF16PS multiplies a 16 x 32 bf16 tile A by such a B tile into a 16 x 16 float32 tile C,
// the products exact (bf16 x bf16 fits in float32) and summed in float32: the arithmetic of
// XLA's bf16 dot with float32 accumulation, in another summation order (per 32-wide slice of K
// one tile product, in the hardware's order inside it; the slices in order). Float32 x never
// takes this path (it would have to be rounded to bf16).
// x is packed once per call, by the caller, into A tiles: xa[Mt][Kb][16][32] (Mt = ceil(M / 16),
// zero-padded), so each A tile is 1 KB contiguous (tile loads with a 64-byte row stride ran
// ~1.5x faster than with x's own row stride, measured). Tiles: C0..C3 = tmm0..3, A0, A1 =
// tmm4, 5, B0, B1 = tmm6, 7, all 16 rows x 64 bytes. Work item = a contiguous run of strips
// (kAmxItemsPerThread per thread: each thread reads long forward streams; items of two strips
// claimed in turn by the threads read ~10% slower in the engine, measured); per strip
// and 32 rows of x, a 32 x 32 block of y (2 x 2 C tiles) over all Kb slices, stored into a
// float scratch of kAmxGroup such blocks side by side, copied out to y (rows past M and columns
// past N dropped). With M > 32 the strip is read again for each further 32 rows, from L2.
//
// Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process):
// JaxserveAmxAvailable() says whether this build has the path and the request succeeded. Each
// thread loads the tile configuration before its items and releases the tiles after them.

// Prefetch distance and level, tuned in the engine on the 2-core VM (bf16 batch-32 decode step,
// median of 60: 4 / 8 / 16 / 32 slices ahead into L2 and 16 into L1 or "L3" within ~2 ms of each
// other, 8 into L2 best; the step was 35.8 ms before, with one strip ahead at interleaved items).
constexpr int64_t kAmxPrefetchSlices = 8;  // 2 KB slices ahead (16 KB)
constexpr int kAmxPrefetchHint = 2;        // __builtin_prefetch locality: into L2

// Software prefetch of the weight stream: for the slice at b, the one kAmxPrefetchSlices
// slices further on, unless that is past `end` (the end of this item's run of strips).
struct Prefetch {
  const uint16_t* end = nullptr;   // null: no prefetching (passes reading from cache)
  inline void Slice(const uint16_t* b) const {
    const uint16_t* p = b + kAmxPrefetchSlices * 1024;
    if (p < end) PrefetchBytes<kAmxPrefetchHint>(p, 2048);
  }
};

#ifdef JXS_AMX
bool AmxEnabled() {
  static const bool ok = [] {
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023;  // ARCH_{GET,REQ}_XCOMP_PERM
    constexpr int kXtileData = 18;                         // XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0) return false;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, kGetPerm, &mask) != 0) return false;
    return ((mask >> kXtileData) & 1) != 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void AmxConfigure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}

// c[32][32] = (A0; A1) @ (B0 B1) over Kb slices: A tiles at a0 / a1 + kb * 512, B tiles at
// b + kb * 1024 (B0) and + 512 (B1). Without kTwoA only A0 (rows 0..16 of c).
template <bool kTwoA>
inline void AmxBlock(const uint16_t* a0, const uint16_t* a1, const uint16_t* b, int64_t Kb,
                     float* c, int64_t ldc, const Prefetch& pf) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwoA) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < Kb; ++kb) {
    pf.Slice(b + kb * 1024);
    _tile_loadd(6, b + kb * 1024, 64);
    _tile_loadd(7, b + kb * 1024 + 512, 64);
    _tile_loadd(4, a0 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoA) {
      _tile_loadd(5, a1 + kb * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  if constexpr (kTwoA) {
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
  }
}
#else
bool AmxEnabled() { return false; }
#endif  // JXS_AMX

constexpr int64_t kAmxItemsPerThread = 2;  // work items: contiguous runs of strips
constexpr int64_t kAmxGroup = 4;            // strips per block of y made in scratch (x @ W)

struct AmxProblem {
  const uint16_t* wp;  // [Ns, Kb, 2, 16, 32]
  float* y;            // [M, N] (x @ W)
  uint16_t* act;       // [M, N / 2] bf16 (SwiGLU: silu(gate) * up), or null
  int64_t M, K, N, Kb, Ns, Mt;
  int64_t strips_per_item;
  std::vector<uint16_t, AlignedAlloc<uint16_t>> xa;  // [Mt][Kb][16][32]
};

// float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN). A select, not a branch,
// so loops over it vectorize.
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40 : rounded);
}

// Row m of x (K bf16 values) into its A tiles: xa[m / 16][kb][m % 16][0..32) = x[32 kb ..].
inline void RowIntoTiles(const uint16_t* src, uint16_t* xa, int64_t m, int64_t K) {
  const int64_t Kb = (K + 31) / 32;
  uint16_t* dst = xa + (m / 16) * Kb * 512 + (m % 16) * 32;
  for (int64_t kb = 0; kb < Kb; ++kb)
    std::memcpy(dst + kb * 512, src + kb * 32, std::min<int64_t>(32, K - kb * 32) * sizeof(uint16_t));
}

// act[m, 0..nc) = bf16(silu(g) * u) for the rows of two 32 x 32 float blocks (g: gate, u: up),
// in float32: silu(g) = g * sigmoid(g), sigmoid from e = exp(-|g|) (a non-positive argument:
// 1 / (1 + e) for g >= 0, e / (1 + e) below).
inline void SwigluRows(const float* g, const float* u, uint16_t* act, int64_t ld, int64_t mr,
                       int64_t nc) {
  for (int64_t m = 0; m < mr; ++m) {
    float e[32], v[32];
    for (int j = 0; j < 32; ++j) e[j] = -std::fabs(g[m * 32 + j]);
    ExpNonPositive(e, 32);
    for (int j = 0; j < 32; ++j) {
      const float gj = g[m * 32 + j];
      const float sig = (gj >= 0.0f ? 1.0f : e[j]) / (1.0f + e[j]);
      v[j] = gj * sig * u[m * 32 + j];
    }
    for (int64_t j = 0; j < nc; ++j) act[m * ld + j] = ToBf16(v[j]);
  }
}

#ifdef JXS_AMX
// c = 32 rows of x from its tile row mt (16 when mt is the last, odd one) @ the strip at b,
// rows ldc floats apart.
inline void AmxRows(const AmxProblem& pr, int64_t mt, const uint16_t* b, float* c,
                    const Prefetch& pf, int64_t ldc = 32) {
  const uint16_t* a0 = pr.xa.data() + mt * pr.Kb * 512;
  if (mt + 1 < pr.Mt) {
    AmxBlock<true>(a0, a0 + pr.Kb * 512, b, pr.Kb, c, ldc, pf);
  } else {
    AmxBlock<false>(a0, nullptr, b, pr.Kb, c, ldc, pf);
  }
}

// SwiGLU: strips [s0, s1) of the gate half and the matching up strips (Ns / 2 further),
// combined per 32 x 32 block; two weight streams, each prefetched within its run.
void AmxSwigluItem(const AmxProblem& pr, int64_t s0, int64_t s1, float* c) {
  const int64_t half = pr.Ns / 2, I = pr.N / 2, strip = pr.Kb * 1024;
  float* cu = c + 32 * 32;
  const Prefetch none, pf_g{pr.wp + s1 * strip}, pf_u{pr.wp + (s1 + half) * strip};
  for (int64_t s = s0; s < s1; ++s) {
    const uint16_t* bg = pr.wp + s * strip;
    const uint16_t* bu = pr.wp + (s + half) * strip;
    for (int64_t mt = 0; mt < pr.Mt; mt += 2) {
      AmxRows(pr, mt, bg, c, mt == 0 ? pf_g : none);
      AmxRows(pr, mt, bu, cu, mt == 0 ? pf_u : none);
      SwigluRows(c, cu, pr.act + mt * 16 * I + s * 32, I, std::min<int64_t>(32, pr.M - mt * 16),
                 32);
    }
  }
}

// Plain x @ W: per group of up to kAmxGroup strips and 32 rows of x, the 32 x (32 * group)
// block of y is made in the scratch c (rows 32 * group floats apart), then copied out row by
// row in runs of group * 128 bytes. The stores into y are what limits large M: the tied head
// (49152 columns) at 64 rows took 3.8 ms with 32 x 32 blocks copied out (128-byte pieces 196 KB
// apart), 1.9 ms with no copy at all, ~2.4 ms in groups of 4 (16 and non-temporal stores were
// no better).
void AmxItem(const AmxProblem& pr, int64_t item, float* c) {
  const int64_t strips = pr.act != nullptr ? pr.Ns / 2 : pr.Ns;  // SwiGLU: the gate half
  const int64_t s0 = item * pr.strips_per_item;
  const int64_t s1 = std::min(strips, s0 + pr.strips_per_item);
  if (pr.act != nullptr) return AmxSwigluItem(pr, s0, s1, c);
  // The first pass over a strip streams it from memory (later ones, for rows past 32, read it
  // from L2): prefetched kAmxPrefetchSlices slices ahead within the item's run of strips.
  const Prefetch none, pf{pr.wp + s1 * pr.Kb * 1024};
  for (int64_t g0 = s0; g0 < s1; g0 += kAmxGroup) {
    const int64_t g1 = std::min(s1, g0 + kAmxGroup), ldc = (g1 - g0) * 32;
    const int64_t n0 = g0 * 32, nc = std::min(pr.N, g1 * 32) - n0;
    for (int64_t mt = 0; mt < pr.Mt; mt += 2) {
      for (int64_t s = g0; s < g1; ++s)
        AmxRows(pr, mt, pr.wp + s * pr.Kb * 1024, c + (s - g0) * 32, mt == 0 ? pf : none, ldc);
      const int64_t mr = std::min<int64_t>(32, pr.M - mt * 16);
      float* y = pr.y + mt * 16 * pr.N + n0;
      for (int64_t m = 0; m < mr; ++m) std::memcpy(y + m * pr.N, c + m * ldc, nc * sizeof(float));
    }
  }
}
#endif  // JXS_AMX

// ----------------------------------------------------------------------------- x @ W, x @ E^T

struct Problem {
  bool transposed;      // x @ E^T
  const float* x;       // [M, K] float32 (the operand, or xbuf)
  bool f32_weights;     // else bf16
  const void* w;        // W [K, N] or E [N, K]: bf16 bits or float32
  float* y;             // [M, N]
  int64_t M, K, N;
  std::vector<float, AlignedAlloc<float>> xbuf;  // x widened from bf16
  // x @ W: the Nt = ceil(N / kChunk) chunks of columns split into `parts` column ranges.
  int64_t parts = 1, Nt = 0;
  // x @ E^T: x in the weights' chunk order, per row Kc chunks of 2 * kW floats (for bf16
  // weights de-interleaved: kW even then kW odd positions; cache-line aligned: a vector load
  // across two lines costs two).
  std::vector<float, AlignedAlloc<float>> xd;
  int64_t ldxd = 0;
};

// Per-thread scratch of x @ W: accumulators and the zero-padded tail columns.
struct NNScratch {
  std::vector<float, AlignedAlloc<float>> acc;
  std::vector<float, AlignedAlloc<float>> tail;  // used as T[K * kChunk]
};

template <typename T>
void NNPart(const Problem& pr, int64_t part, NNScratch& sc) {
  const T* w = static_cast<const T*>(pr.w);
  const int64_t K = pr.K, N = pr.N, M = pr.M;
  const int64_t j0 = pr.Nt * part / pr.parts, j1 = pr.Nt * (part + 1) / pr.parts;  // chunks
  const int64_t full = std::min(j1, N / kChunk);  // whole chunks [j0, full); chunk `full` = tail
  const int64_t rem = N - full * kChunk;           // tail columns if j1 > full
  const bool has_tail = j1 > full;
  const int64_t lda = (j1 - j0) * kChunk;
  sc.acc.resize(M * lda);
  float* acc = sc.acc.data();
  T* tail = nullptr;
  if (has_tail) {  // the last < kChunk columns, zero-padded into a [K, kChunk] copy
    sc.tail.assign((K * kChunk * sizeof(T) + sizeof(float) - 1) / sizeof(float), 0.0f);
    tail = reinterpret_cast<T*>(sc.tail.data());
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(tail + k * kChunk, w + k * N + full * kChunk, rem * sizeof(T));
  }
  for (int64_t k0 = 0; k0 < K; k0 += kPanelRows) {
    const int64_t kn = std::min<int64_t>(kPanelRows, K - k0);
    // Prefetch only rows that exist.
    const int64_t npf1 = std::clamp<int64_t>(K - kPrefetchL1 - k0, 0, kn);
    const int64_t npf2 = std::clamp<int64_t>(K - kPrefetchL2 - k0, 0, kn);
    const bool init = k0 == 0;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, M - m0));
      const int maxv = MaxV(mb);
      const float* x = pr.x + m0 * K + k0;
      float* a = acc + m0 * lda;
      for (int64_t j = j0; j < full;) {
        const int64_t left = full - j;
        const int v = left >= maxv ? maxv : (left >= 2 && maxv >= 2 ? 2 : 1);
        kNN<T>[mb - 1][VIndex(v)](x, K, w + k0 * N + j * kChunk, N, kn, a + (j - j0) * kChunk,
                                  lda, init, npf1, npf2);
        j += v;
      }
      if (has_tail)
        kNN<T>[mb - 1][0](x, K, tail + k0 * kChunk, kChunk, kn, a + (full - j0) * kChunk, lda,
                          init, 0, 0);
    }
  }
  // Back to column order (bf16: even/odd lanes interleaved).
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* a = acc + m * lda + (j - j0) * kChunk;
      float row[kChunk];
      ChunkOrder<T>(a, a + kW, row);
      std::memcpy(pr.y + m * N + j * kChunk, row,
                  std::min<int64_t>(kChunk, N - j * kChunk) * sizeof(float));
    }
  }
}

template <typename T>
void NTItem(const Problem& pr, int64_t item) {
  const int64_t K = pr.K, N = pr.N;
  const T* w = static_cast<const T*>(pr.w);
  const int64_t n0 = item * kItemRows, n1 = std::min(N, n0 + kItemRows);
  for (int64_t n = n0; n < n1;) {
    const bool full = n + kR <= n1;  // a block of kR rows, else the last rows one at a time
    const int64_t r = full ? kR : 1;
    // Prefetch rows that exist, once per row block (not again for each x group).
    const T* pf1 = n + kPrefetchL1NT + r <= N ? w + (n + kPrefetchL1NT) * K : nullptr;
    const T* pf2 = n + kPrefetchL2NT + r <= N ? w + (n + kPrefetchL2NT) * K : nullptr;
    for (int64_t m0 = 0; m0 < pr.M; m0 += 4) {
      const int mb = static_cast<int>(std::min<int64_t>(4, pr.M - m0));
      kNT<T>[mb - 1][full ? 1 : 0](pr.xd.data() + m0 * pr.ldxd, pr.ldxd, pr.x + m0 * K, K,
                                   w + n * K, K, K, pr.y + m0 * N + n, N,
                                   m0 == 0 ? pf1 : nullptr, m0 == 0 ? pf2 : nullptr);
    }
    n += r;
  }
}

// Shared between the caller and pool tasks; tasks hold it by shared_ptr so it outlives them.
struct Shared {
  Problem pr;
  int64_t total = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Claim and run items until none is left. Only items this thread ran are counted as done; a
// thread that claimed nothing never touches the operands (whose buffers may be gone by then).
void Work(Shared& sh) {
  int64_t i = sh.next.fetch_add(1, std::memory_order_relaxed);
  if (i >= sh.total) return;
  NNScratch sc;
  int64_t ran = 0;
  for (; i < sh.total; i = sh.next.fetch_add(1, std::memory_order_relaxed)) {
    if (sh.pr.transposed) {
      sh.pr.f32_weights ? NTItem<float>(sh.pr, i) : NTItem<uint16_t>(sh.pr, i);
    } else {
      sh.pr.f32_weights ? NNPart<float>(sh.pr, i, sc) : NNPart<uint16_t>(sh.pr, i, sc);
    }
    ++ran;
  }
  sh.done.fetch_add(ran, std::memory_order_release);
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Until every item is done. Only items already claimed by running tasks are left, so this is
// short: spin rather than sleep on a futex (a sleeping caller can take tens of microseconds to
// get its core back, e.g. from a spinning pool thread), yielding the core after a while.
template <typename S>
void WaitDone(const S& sh) {
  for (int spins = 0; sh.done.load(std::memory_order_acquire) != sh.total; ++spins) {
    if (spins < 4096) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

// Threads for a call reading `bytes` of weights: num_threads() (the caller included), fewer
// where a thread would get less than kMinBytesPerThread (~15-20 us of reading at one core's
// bandwidth; waking a pool thread takes a few us, sometimes tens).
constexpr int64_t kMinBytesPerThread = 256 << 10;
int64_t ThreadsFor(ffi::ThreadPool& pool, int64_t bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), bytes / kMinBytesPerThread));
}

// Run work(*sh) on the caller and on up to threads - 1 pool tasks (no more than sh->total - 1),
// then wait for every item.
template <typename S, typename F>
void RunOnPool(ffi::ThreadPool& pool, const std::shared_ptr<S>& sh, int64_t threads, F work) {
  const int64_t helpers = std::min<int64_t>(threads - 1, sh->total - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    // On a scheduling failure the FFI runs the task inline: that just does the work here.
    pool.Schedule([sh, work]() { work(*sh); });
  }
  work(*sh);
  WaitDone(*sh);
}

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

const char* TypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::U16: return "uint16";
    default: return "another dtype";
  }
}

constexpr int64_t kPartsPerThread = 2;  // x @ W: column ranges per thread
constexpr int64_t kMinPartChunks = 4;   // x @ W: chunks (of kChunk columns) per range at least

ffi::Error MatmulImpl(bool transposed, ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> out) {
  using DT = ffi::DataType;
  const std::string op = transposed ? "jaxserve matmul_t (x @ E^T): " : "jaxserve matmul (x @ W): ";
  auto fail = [&](const std::string& msg) { return ffi::Error::InvalidArgument(op + msg); };
  // ---- validation
  if (x.element_type() != DT::F32 && x.element_type() != DT::BF16)
    return fail(std::string("x must be float32 or bfloat16, got ") + TypeName(x.element_type()));
  if (x.dimensions().size() != 2) return fail("x must be [M, K], got " + Dims(x.dimensions()));
  if (w.element_type() != DT::BF16 && w.element_type() != DT::F32)
    return fail(std::string(transposed ? "E" : "W") + " must be bfloat16 or float32, got " +
                TypeName(w.element_type()));
  if (w.dimensions().size() != 2)
    return fail(std::string(transposed ? "E must be [N, K], got " : "W must be [K, N], got ") +
                Dims(w.dimensions()));
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t wK = transposed ? w.dimensions()[1] : w.dimensions()[0];
  const int64_t N = transposed ? w.dimensions()[0] : w.dimensions()[1];
  if (wK != K)
    return fail("contracting dims differ: x " + Dims(x.dimensions()) +
                (transposed ? ", E [N, K] = " : ", W [K, N] = ") + Dims(w.dimensions()));
  if (out->element_type() != DT::F32 || out->dimensions().size() != 2 ||
      out->dimensions()[0] != M || out->dimensions()[1] != N)
    return fail("result must be float32 [M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                "], got " + TypeName(out->element_type()) + " " + Dims(out->dimensions()));
  float* y = static_cast<float*>(out->untyped_data());
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(y, y + M * N, 0.0f);
    return ffi::Error::Success();
  }

  auto sh = std::make_shared<Shared>();
  Problem& pr = sh->pr;
  pr.transposed = transposed;
  pr.f32_weights = w.element_type() == DT::F32;
  pr.w = w.untyped_data();
  pr.y = y;
  pr.M = M, pr.K = K, pr.N = N;
  if (x.element_type() == DT::F32) {
    pr.x = static_cast<const float*>(x.untyped_data());
  } else {
    const uint16_t* xb = static_cast<const uint16_t*>(x.untyped_data());
    pr.xbuf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) pr.xbuf[i] = Bf16ToF32(xb[i]);
    pr.x = pr.xbuf.data();
  }
  const int64_t bytes = K * N * static_cast<int64_t>(pr.f32_weights ? 4 : 2);
  int64_t threads = ThreadsFor(pool, bytes);
  if (transposed) {  // x in chunk order (bf16 weights: kW even positions, then kW odd)
    const int64_t Kc = K / kChunk;
    pr.ldxd = Kc * kChunk;
    pr.xd.resize(M * pr.ldxd + 1);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < Kc; ++c) {
        const float* src = pr.x + m * K + c * kChunk;
        float* dst = pr.xd.data() + m * pr.ldxd + c * kChunk;
        for (int i = 0; i < kW; ++i) {
          if (pr.f32_weights) {
            dst[i] = src[i], dst[kW + i] = src[kW + i];
          } else {
            dst[i] = src[2 * i], dst[kW + i] = src[2 * i + 1];
          }
        }
      }
    }
    sh->total = (N + kItemRows - 1) / kItemRows;
  } else {
    // Column ranges of at least kMinPartChunks chunks, kPartsPerThread per thread (so that the
    // caller takes up the slack of a helper that starts late).
    pr.Nt = (N + kChunk - 1) / kChunk;
    pr.parts = std::max<int64_t>(
        1, std::min<int64_t>(threads * kPartsPerThread, pr.Nt / kMinPartChunks));
    threads = std::min(threads, pr.parts);
    sh->total = pr.parts;
  }
  RunOnPool(pool, sh, threads, Work);
  return ffi::Error::Success();
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> out) {
  return MatmulImpl(false, pool, x, w, out);
}

ffi::Error MatmulTBf16(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer e,
                       ffi::Result<ffi::AnyBuffer> out) {
  return MatmulImpl(true, pool, x, e, out);
}


// ----------------------------------------------------------------------------- AMX handler

struct AmxShared {
  AmxProblem pr;
  int64_t total = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void AmxWork(AmxShared& sh) {
#ifdef JXS_AMX
  int64_t i = sh.next.fetch_add(1, std::memory_order_relaxed);
  if (i >= sh.total) return;
  // Scratch: 32 rows of kAmxGroup strips (x @ W) or two 32 x 32 blocks (SwiGLU).
  std::vector<float, AlignedAlloc<float>> c(32 * 32 * std::max<int64_t>(2, kAmxGroup));
  int64_t ran = 0;
  AmxConfigure();
  for (; i < sh.total; i = sh.next.fetch_add(1, std::memory_order_relaxed)) {
    AmxItem(sh.pr, i, c.data());
    ++ran;
  }
  _tile_release();
  sh.done.fetch_add(ran, std::memory_order_release);
#else
  (void)sh;
#endif
}

// A tiles of h = bf16(x * r * w), r = 1 / sqrt(mean(x^2) + eps) per row of x [M, K] (bf16
// bits), in float32 (kLanes partial sums of squares): written as separate loops over restrict
// pointers so that they vectorize (inline in the handler they did not: ~45 us instead of ~6 for
// 32 x 576).
__attribute__((noinline)) void RmsNormIntoTiles(const uint16_t* __restrict xb, const float* __restrict wf,
                      uint16_t* __restrict xa, int64_t M, int64_t K, float eps) {
  constexpr int kLanes = 16;
  std::vector<float> row_buf(K);
  std::vector<uint16_t> h_buf(K);
  float* __restrict row = row_buf.data();
  uint16_t* __restrict h = h_buf.data();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) row[k] = Bf16ToF32(xb[m * K + k]);
    float part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int j = 0; j < kLanes; ++j) part[j] += row[k + j] * row[k + j];
    for (; k < K; ++k) part[0] += row[k] * row[k];
    float ss = 0.0f;
    for (int j = 0; j < kLanes; ++j) ss += part[j];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
    for (k = 0; k < K; ++k) h[k] = ToBf16(row[k] * r * wf[k]);
    RowIntoTiles(h, xa, m, K);
  }
}

// With `nw` (the RMSNorm variants): the product is of h = bf16(x * r * w) per row, r =
// 1 / sqrt(mean(x^2) + eps), all in float32 (llama.rms_norm's arithmetic; the sum of squares in
// another order than XLA's reduction, so r may differ in the last ulp), computed as x is packed.
ffi::Error MatmulAmxImpl(bool swiglu, ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::AnyBuffer wp, ffi::Result<ffi::AnyBuffer> out,
                         const ffi::AnyBuffer* nw = nullptr, float eps = 0.0f) {
  using DT = ffi::DataType;
  const std::string op = std::string(swiglu ? "jaxserve swiglu_amx (silu(h @ Wg) * (h @ Wu), packed [Wg Wu]"
                                            : "jaxserve matmul_amx (h @ packed W") +
                         (nw != nullptr ? ", h = rms_norm(x)): " : ", h = x): ");
  auto fail = [&](const std::string& msg) { return ffi::Error::InvalidArgument(op + msg); };
  if (!AmxEnabled()) return fail("AMX is not available in this process");
  if (x.element_type() != DT::BF16 || x.dimensions().size() != 2)
    return fail(std::string("x must be bfloat16 [M, K], got ") + TypeName(x.element_type()) +
                " " + Dims(x.dimensions()));
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  const int64_t Kb = (K + 31) / 32;
  if (nw != nullptr && ((nw->element_type() != DT::BF16 && nw->element_type() != DT::F32) ||
                        nw->dimensions().size() != 1 || nw->dimensions()[0] != K))
    return fail("norm weight must be bfloat16 or float32 [K=" + std::to_string(K) + "], got " +
                TypeName(nw->element_type()) + " " + Dims(nw->dimensions()));
  const auto wd = wp.dimensions();
  if (wp.element_type() != DT::BF16 || wd.size() != 5 || wd[1] != Kb || wd[2] != 2 ||
      wd[3] != 16 || wd[4] != 32)
    return fail("packed W must be bfloat16 [Ns, " + std::to_string(Kb) +
                ", 2, 16, 32] for K = " + std::to_string(K) + ", got " +
                TypeName(wp.element_type()) + " " + Dims(wd));
  const int64_t Ns = wd[0];
  const auto od = out->dimensions();
  int64_t N;
  if (swiglu) {  // gate and up halves of whole strips: Ns even, I = 16 * Ns
    if (Ns % 2 != 0 || out->element_type() != DT::BF16 || od.size() != 2 || od[0] != M ||
        od[1] != Ns * 16)
      return fail("packed [Wg Wu] needs an even number of 32-column strips and the result "
                  "bfloat16 [M=" + std::to_string(M) + ", I=" + std::to_string(Ns * 16) +
                  "], got Ns = " + std::to_string(Ns) + ", " + TypeName(out->element_type()) +
                  " " + Dims(od));
    N = Ns * 32;
  } else {
    if (out->element_type() != DT::F32 || od.size() != 2 || od[0] != M || od[1] > Ns * 32 ||
        od[1] <= (Ns - 1) * 32)
      return fail("result must be float32 [M=" + std::to_string(M) + ", N] with N in (" +
                  std::to_string((Ns - 1) * 32) + ", " + std::to_string(Ns * 32) + "], got " +
                  TypeName(out->element_type()) + " " + Dims(od));
    N = od[1];
  }
  if (M == 0) return ffi::Error::Success();
  auto sh = std::make_shared<AmxShared>();
  AmxProblem& pr = sh->pr;
  pr.wp = static_cast<const uint16_t*>(wp.untyped_data());
  pr.y = swiglu ? nullptr : static_cast<float*>(out->untyped_data());
  pr.act = swiglu ? static_cast<uint16_t*>(out->untyped_data()) : nullptr;
  pr.M = M, pr.K = K, pr.N = N, pr.Kb = Kb, pr.Ns = Ns, pr.Mt = (M + 15) / 16;
  // x into A tiles: xa[mt][kb][r][j] = x[16 mt + r, 32 kb + j], zero-padded.
  pr.xa.assign(pr.Mt * Kb * 512, 0);
  const uint16_t* xb = static_cast<const uint16_t*>(x.untyped_data());
  if (nw != nullptr) {
    std::vector<float> wf(K);
    for (int64_t k = 0; k < K; ++k)
      wf[k] = nw->element_type() == DT::F32 ? static_cast<const float*>(nw->untyped_data())[k]
                                           : Bf16ToF32(static_cast<const uint16_t*>(nw->untyped_data())[k]);
    RmsNormIntoTiles(xb, wf.data(), pr.xa.data(), M, K, eps);
  } else {
    for (int64_t m = 0; m < M; ++m) RowIntoTiles(xb + m * K, pr.xa.data(), m, K);
  }
  // Items: kAmxItemsPerThread contiguous runs of strips per thread, so that each thread reads
  // long forward streams (short items interleaved between threads read slower, measured).
  const int64_t strips = swiglu ? Ns / 2 : Ns;  // SwiGLU: items over the gate half
  const int64_t threads = ThreadsFor(pool, Ns * Kb * 2048);
  pr.strips_per_item = std::max<int64_t>(1, (strips + threads * kAmxItemsPerThread - 1) /
                                                (threads * kAmxItemsPerThread));
  sh->total = (strips + pr.strips_per_item - 1) / pr.strips_per_item;
  RunOnPool(pool, sh, threads, AmxWork);
  return ffi::Error::Success();
}

// The handlers: x @ W (kSwiglu false) or SwiGLU, without and with the RMSNorm prologue.
template <bool kSwiglu>
ffi::Error AmxHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer wp,
                      ffi::Result<ffi::AnyBuffer> out) {
  return MatmulAmxImpl(kSwiglu, pool, x, wp, out);
}

template <bool kSwiglu>
ffi::Error AmxNormHandler(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer nw,
                          ffi::AnyBuffer wp, ffi::Result<ffi::AnyBuffer> out, float eps) {
  return MatmulAmxImpl(kSwiglu, pool, x, wp, out, &nw, eps);
}

}  // namespace

// 1 when JaxserveMatmulAmx can run in this process (built with AMX and granted the tile state).
extern "C" int JaxserveAmxAvailable() { return AmxEnabled() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // W [K, N]
                                  .Ret<ffi::AnyBuffer>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulTBf16, MatmulTBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()  // E [N, K]
                                  .Ret<ffi::AnyBuffer>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulAmx, AmxHandler<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K] bf16
                                  .Arg<ffi::AnyBuffer>()  // Wp [Ns, Kb, 2, 16, 32] bf16
                                  .Ret<ffi::AnyBuffer>());  // y [M, N] f32

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSwigluAmx, AmxHandler<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K] bf16
                                  .Arg<ffi::AnyBuffer>()  // [Wg Wu] packed, Ns even
                                  .Ret<ffi::AnyBuffer>());  // act [M, I] bf16

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulAmxNorm, AmxNormHandler<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K] bf16 (before the norm)
                                  .Arg<ffi::AnyBuffer>()  // norm weight [K] bf16 or f32
                                  .Arg<ffi::AnyBuffer>()  // Wp [Ns, Kb, 2, 16, 32] bf16
                                  .Ret<ffi::AnyBuffer>()  // y [M, N] f32
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSwigluAmxNorm, AmxNormHandler<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K] bf16 (before the norm)
                                  .Arg<ffi::AnyBuffer>()  // norm weight [K] bf16 or f32
                                  .Arg<ffi::AnyBuffer>()  // [Wg Wu] packed, Ns even
                                  .Ret<ffi::AnyBuffer>()  // act [M, I] bf16
                                  .Attr<float>("eps"));
