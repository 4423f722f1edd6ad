// common.h — the machinery every CPU kernel of sam_fused shares:
//   * ChunkPlan: one parallel work list per op call. Every (tensor[, micro-batch slice]) becomes a segment of one
//     virtual, concatenated element space; that space is cut into fixed-size chunks and at::parallel_for runs over
//     the chunks. Chunks have equal sizes whatever the tensor sizes, so 2000 small tensors and one huge tensor balance
//     the same way across threads, and one call has one parallel region instead of one per tensor. Chunk boundaries
//     depend only on the tensor sizes (never on the thread count), which makes per-chunk partial sums combined in
//     chunk order bit-identical for any number of threads.
//   * Pack<T>: load/store of 2 * Vectorized<float>::size() elements of storage type T (fp32, bf16, fp16) as two fp32
//     vectors, so the elementwise math runs in fp32 whatever the storage dtype (docs/DESIGN.md section 5).
//   * blocked_sum: sums of squares in fp32 blocks added in fp64, redone in fp64 where fp32 overflows, so any
//     finite gradient has a finite norm (an fp32 square overflows once |g| > ~1.8e19).
// List validation and layout staging are shared with the CUDA backend: csrc/shared/host.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "sam_math_cpu.h"
#include "shared/host.h"

namespace sam_fused::cpu {

using Vec = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;
static_assert(Vec::size() == 2 * VecD::size(), "an fp32 vector must widen to two fp64 vectors");

// Elements per chunk of the work list. 32K elements (128 KB of fp32) amortize the per-chunk bookkeeping, keep a
// chunk's working set in L2 and still give a 2-thread machine ~800 chunks for a ResNet-50 (16K to 128K measured the
// same within noise on the 2-core development VM). Changing it changes the summation order of the reductions (not
// their determinism).
constexpr int64_t kChunk = 32768;
// Segments start at multiples of this in the virtual element space, so chunk boundaries inside a tensor fall on
// 64-element (cache-line multiple) offsets and vector loops start aligned when the tensor data is.
constexpr int64_t kSegmentAlign = 64;
// Reductions accumulate blocks of this many elements in fresh vector accumulators before adding them to the running
// ones: a cheap two-level (pairwise-like) sum that keeps the rounding error small on long chunks.
constexpr int64_t kSumBlock = 1024;

// ---------------------------------------------------------------------------------------------------------------
// Vector load/store of one "pack" = 2 * Vec::size() elements of storage type T, as two fp32 vectors.
// Raw is the pack in storage format: copying it moves the exact bits (backups must be bit-exact, NaN payloads too).

template <class T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int64_t kWidth = 2 * Vec::size();
  struct Raw {
    Vec lo, hi;
  };
  static Raw load_raw(const float* p) { return {Vec::loadu(p), Vec::loadu(p + Vec::size())}; }
  static void store_raw(float* p, const Raw& r) {
    r.lo.store(p);
    r.hi.store(p + Vec::size());
  }
  static void to_float(const Raw& r, Vec& a, Vec& b) {
    a = r.lo;
    b = r.hi;
  }
  static Raw from_float(const Vec& a, const Vec& b) { return {a, b}; }
};

template <class T>
struct ReducedPack {
  using RVec = at::vec::Vectorized<T>;
  static_assert(RVec::size() == 2 * Vec::size(), "a reduced-precision vector must hold two fp32 vectors");
  static constexpr int64_t kWidth = RVec::size();
  using Raw = RVec;
  static Raw load_raw(const T* p) { return RVec::loadu(p); }
  static void store_raw(T* p, const Raw& r) { r.store(p); }
  static void to_float(const Raw& r, Vec& a, Vec& b) { std::tie(a, b) = at::vec::convert_to_float<T>(r); }
  // Round-to-nearest-even, the same conversion torch's .to(dtype) uses.
  static Raw from_float(const Vec& a, const Vec& b) { return at::vec::convert_from_float<T>(a, b); }
};

template <>
struct Pack<c10::BFloat16> : ReducedPack<c10::BFloat16> {};
template <>
struct Pack<c10::Half> : ReducedPack<c10::Half> {};

template <class T>
inline void load_pack(const T* p, Vec& a, Vec& b) {
  Pack<T>::to_float(Pack<T>::load_raw(p), a, b);
}

template <class T>
inline void store_pack(T* p, const Vec& a, const Vec& b) {
  Pack<T>::store_raw(p, Pack<T>::from_float(a, b));
}

// Stores a, b rounded to T and replaces them by the stored (rounded) values, for sums of what was actually stored.
template <class T>
inline void store_pack_rounded(T* p, Vec& a, Vec& b) {
  const auto raw = Pack<T>::from_float(a, b);
  Pack<T>::store_raw(p, raw);
  Pack<T>::to_float(raw, a, b);
}

// Scalar-tail conversions (c10's float -> bf16/fp16 conversions round to nearest even, like the vector ones).
template <class T>
inline float to_f32(T x) {
  return static_cast<float>(x);
}
template <class T>
inline T from_f32(float x) {
  return static_cast<T>(x);
}

// fp32 lanes to fp64 (exact): lo gets the first half of v's lanes, hi the second.
inline void widen(const Vec& v, VecD& lo, VecD& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
#else
  __at_align__ float f[Vec::size()];
  __at_align__ double d[Vec::size()];
  v.store(f);
  for (int64_t i = 0; i < Vec::size(); ++i) d[i] = f[i];
  lo = VecD::loadu(d);
  hi = VecD::loadu(d + VecD::size());
#endif
}

// Sums of squares run in fp32 first and in fp64 only where fp32 overflows. The fp32 pass is the fast one (widening
// every element to fp64 cost 1.3-1.6x the time per element on one core); a piece whose fp32 block sums are not all
// finite holds an inf/NaN value or a square above the fp32 range (|x| > ~1.8e19), and is summed again with every
// term squared in fp64 (exact for fp32 values), so any finite gradient has a finite sum. Block sums are added in fp64.

// fp32 accumulators: two independent add chains per pack.
struct FastSums {
  Vec s0{0.0f}, s1{0.0f};

  void add(const Vec& x0, const Vec& x1) {
    s0 = s0 + square(x0);
    s1 = s1 + square(x1);
  }
  // (x * t)^2 for ASAM, t = |w| + eta.
  void add_scaled(const Vec& x0, const Vec& x1, const Vec& t0, const Vec& t1) {
    s0 = s0 + square_scaled(x0, t0);
    s1 = s1 + square_scaled(x1, t1);
  }
};

// fp64 accumulators, same interface: a pack widens to four fp64 vectors, one per accumulator.
struct WideSums {
  VecD acc[4] = {VecD(0.0), VecD(0.0), VecD(0.0), VecD(0.0)};

  void add(const Vec& x0, const Vec& x1) {
    VecD x[4];
    widen(x0, x[0], x[1]);
    widen(x1, x[2], x[3]);
    for (int j = 0; j < 4; ++j) acc[j] = acc[j] + square(x[j]);
  }
  // t = |w| + eta comes in fp32, as the perturbation uses it; the product x * t is taken in fp64.
  void add_scaled(const Vec& x0, const Vec& x1, const Vec& t0, const Vec& t1) {
    VecD x[4], t[4];
    widen(x0, x[0], x[1]);
    widen(x1, x[2], x[3]);
    widen(t0, t[0], t[1]);
    widen(t1, t[2], t[3]);
    for (int j = 0; j < 4; ++j) acc[j] = acc[j] + square_scaled(x[j], t[j]);
  }
  // Adds the lanes of an fp32 partial sum (exact widening).
  void add_sum(const Vec& v) {
    VecD lo, hi;
    widen(v, lo, hi);
    acc[0] = acc[0] + lo;
    acc[1] = acc[1] + hi;
  }
  // Horizontal sum in a fixed lane order (deterministic).
  double total() const {
    __at_align__ double lanes[VecD::size()];
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes);
    double s = 0.0;
    for (int64_t i = 0; i < VecD::size(); ++i) s += lanes[i];
    return s;
  }
};

// End of the vector part of [lo, hi): the largest lo + m * W <= hi.
inline int64_t vector_end(int64_t lo, int64_t hi, int64_t width) {
  return lo + (hi - lo) / width * width;
}

// Sum over the packs of [lo, vec_hi) (vec_hi from vector_end) of what step(i, sums) adds for the pack at i: fp32
// (FastSums) within each kSumBlock-element block, the blocks' vector sums widened and added in fp64. If the result is
// not finite, redo(lo, vec_hi) gives it instead, in fp64 terms (WideSums). step may write (F-SAM), so redo must read
// what step left behind.
template <class T, class Step, class Redo>
inline double blocked_sum(int64_t lo, int64_t vec_hi, const Step& step, const Redo& redo) {
  static_assert(kSumBlock % Pack<T>::kWidth == 0, "blocks must hold whole packs");
  WideSums total;
  for (int64_t block = lo; block < vec_hi; block += kSumBlock) {
    const int64_t end = std::min(block + kSumBlock, vec_hi);
    FastSums sums;
    for (int64_t i = block; i < end; i += Pack<T>::kWidth) step(i, sums);
    total.add_sum(sums.s0 + sums.s1);
  }
  const double sum = total.total();
  return std::isfinite(sum) ? sum : redo(lo, vec_hi);
}

// Adds the pack's terms to `sums` (FastSums or WideSums): x^2, or (x * t)^2 with t = |w| + eta from the pack of
// weights at w (ASAM).
template <class T, class Sums>
inline void add_terms(Sums& sums, const Vec& x0, const Vec& x1, const T* w, const Vec& eta) {
  if (w == nullptr) {
    sums.add(x0, x1);
    return;
  }
  Vec w0, w1;
  load_pack(w, w0, w1);
  sums.add_scaled(x0, x1, adaptive_factor(w0.abs(), eta), adaptive_factor(w1.abs(), eta));
}

// One scalar term of a squared norm (vector-loop tails), in fp64: x^2, or (t * x)^2 with t = |w| + eta in fp32.
template <class T>
inline double scalar_term(float x, const T* w, float eta) {
  if (w == nullptr) return square(static_cast<double>(x));
  const float t = adaptive_factor(std::fabs(to_f32(*w)), eta);
  return square_scaled(static_cast<double>(x), static_cast<double>(t));
}

// fp64 sum of (t * x)^2 over the packs of [lo, hi) of x, t = |w| + eta (t = 1 when w is null): blocked_sum's redo.
template <class T>
inline double wide_sumsq(const T* x, const T* w, int64_t lo, int64_t hi, float eta) {
  WideSums sums;
  const Vec eta_v(eta);
  for (int64_t i = lo; i < hi; i += Pack<T>::kWidth) {
    Vec x0, x1;
    load_pack(x + i, x0, x1);
    add_terms(sums, x0, x1, w == nullptr ? nullptr : w + i, eta_v);
  }
  return sums.total();
}

// Calls body(T{}) with T the C++ storage type of `dtype` (fp32, bf16 or fp16; callers checked the dtype).
template <class F>
inline void dispatch_storage(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kFloat:
      body(float{});
      break;
    case at::kBFloat16:
      body(c10::BFloat16{});
      break;
    case at::kHalf:
      body(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "sam_fused CPU kernels support float32, bfloat16 and float16, got ", dtype);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The work list. Seg is an op-specific struct with at least `int64_t n` (its element count).

template <class Seg>
class ChunkPlan {
 public:
  // Adds a segment of seg.n elements; empty segments are dropped (they have no work and no partial sum).
  void add(const Seg& seg) {
    if (seg.n == 0) return;
    const int64_t start = (end_ + kSegmentAlign - 1) / kSegmentAlign * kSegmentAlign;
    segs_.push_back(seg);
    starts_.push_back(start);
    end_ = start + seg.n;
    numel_ += seg.n;
  }

  void reserve(size_t n) {
    segs_.reserve(n);
    starts_.reserve(n);
  }

  int64_t num_chunks() const { return (end_ + kChunk - 1) / kChunk; }

  // Runs piece(chunk, seg, lo, hi) for every part [lo, hi) (segment-relative element indices) of every segment,
  // chunk by chunk, chunks spread over threads by at::parallel_for. Within a chunk pieces come in segment order;
  // `reverse` visits the chunks last to first (each thread walks its range downwards), which changes no result.
  template <class F>
  void run(const F& piece, bool reverse = false) const {
    const int64_t chunks = num_chunks();
    if (chunks == 0) return;
    // Less than one chunk of real work stays on the calling thread: the alignment padding spreads 2000 one-element
    // tensors over 4 chunks, and waking a second thread for them costs more than the work (a time slice of the
    // scheduler on a loaded machine: 24 ms per op measured). Results do not depend on it (partials per chunk).
    const int64_t grain = numel_ < kChunk ? chunks : 1;
    at::parallel_for(0, chunks, grain, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) run_chunk(reverse ? chunks - 1 - c : c, piece);
    });
  }

 private:
  template <class F>
  void run_chunk(int64_t c, const F& piece) const {
    const int64_t lo = c * kChunk;
    const int64_t hi = std::min(lo + kChunk, end_);
    // The last segment starting at or before lo (the chunk may begin inside it or in the padding after it).
    auto it = std::upper_bound(starts_.begin(), starts_.end(), lo);
    size_t s = it == starts_.begin() ? 0 : static_cast<size_t>(it - starts_.begin()) - 1;
    for (; s < segs_.size() && starts_[s] < hi; ++s) {
      const int64_t a = std::max(lo, starts_[s]);
      const int64_t b = std::min(hi, starts_[s] + segs_[s].n);
      if (a < b) piece(c, segs_[s], a - starts_[s], b - starts_[s]);
    }
  }

  std::vector<Seg> segs_;
  std::vector<int64_t> starts_;
  int64_t end_ = 0;
  int64_t numel_ = 0;  // elements of all segments, without the padding
};

// Per-chunk partial sums (fp64) for k micro-batch slices, combined in chunk order (so independent of the thread that
// produced each one).
class Partials {
 public:
  Partials(int64_t chunks, int64_t k) : k_(k), v_(static_cast<size_t>(chunks * k), 0.0) {}
  void add(int64_t chunk, int64_t slice, double x) { v_[static_cast<size_t>(chunk * k_ + slice)] += x; }
  // fp64 tensor [k] on the CPU with the sums.
  at::Tensor combine() const {
    at::Tensor out = at::zeros({k_}, at::TensorOptions().dtype(at::kDouble));
    double* total = out.data_ptr<double>();
    for (size_t i = 0; i < v_.size(); ++i) total[i % static_cast<size_t>(k_)] += v_[i];
    return out;
  }

 private:
  int64_t k_;
  std::vector<double> v_;
};

}  // namespace sam_fused::cpu
