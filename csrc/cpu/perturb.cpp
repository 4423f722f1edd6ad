// perturb.cpp — perturb_, perturb_batched and restore_: the elementwise parts of a SAM step.
//
// perturb_ is the memory-bound heart of the first step, so it does everything in one pass over the data: read w and
// g, write the bit-exact backup of w and the perturbed w (16 bytes per fp32 parameter, the minimum). The scale
// rho / (sqrt(sumsq) + eps) is computed in fp64 from the (fp64) CPU sumsq tensor inside the op and rounded once to
// fp32; non-finite sumsq (inf or NaN gradients) leaves w untouched and still writes the backup, as the reference
// does. perturb_batched writes k perturbed copies for parallel micro-batches; restore_ copies the backups back (bits
// copied: bit-exact). When an op's lists do not fit in the LLC together, the backups (perturb_) and the restored
// weights (restore_) go out with streaming stores (streaming.h): 4 bytes less DRAM traffic per written fp32 element.
// All three run over the chunked work list of common.h, per-element math from shared/sam_math.h.
#include "common.h"
#include "ops.h"
#include "sam_math_cpu.h"
#include "streaming.h"

#include <cmath>

namespace sam_fused::cpu {
namespace {

// The per-element formula with fp32 math: w + scale * g, or w + scale * ((t * t) * g) with t = |w| + eta.
template <bool kAdaptive, class V>
inline V perturb_value(V w, V g, V scale, V eta, V abs_w) {
  if constexpr (kAdaptive) {
    return perturbed_adaptive(w, adaptive_factor(abs_w, eta), g, scale);
  } else {
    return perturbed(w, g, scale);
  }
}

// ---- perturb_ -------------------------------------------------------------------------------------------------

template <class T>
struct PerturbSeg {
  T* w;
  const T* g;
  T* backup;
  int64_t n;
};

// kStream: the backup is written with streaming stores (streaming.h); needs s.backup + lo stream-aligned.
template <class T, bool kAdaptive, bool kStream>
void perturb_piece(const PerturbSeg<T>& s, int64_t lo, int64_t hi, float scale, float eta) {
  const int64_t vec_hi = vector_end(lo, hi, Pack<T>::kWidth);
  const Vec scale_v(scale), eta_v(eta);
  for (int64_t i = lo; i < vec_hi; i += Pack<T>::kWidth) {
    const auto raw = Pack<T>::load_raw(s.w + i);
    if constexpr (kStream) {  // the stored bits of w, not a float round trip
      stream_raw<T>(s.backup + i, raw);
    } else {
      Pack<T>::store_raw(s.backup + i, raw);
    }
    Vec w0, w1, g0, g1;
    Pack<T>::to_float(raw, w0, w1);
    load_pack(s.g + i, g0, g1);
    store_pack(s.w + i, perturb_value<kAdaptive>(w0, g0, scale_v, eta_v, w0.abs()),
               perturb_value<kAdaptive>(w1, g1, scale_v, eta_v, w1.abs()));
  }
  for (int64_t i = vec_hi; i < hi; ++i) {
    const T wi = s.w[i];
    s.backup[i] = wi;
    const float w = to_f32(wi);
    s.w[i] = from_f32<T>(perturb_value<kAdaptive>(w, to_f32(s.g[i]), scale, eta, std::fabs(w)));
  }
  if constexpr (kStream) stream_fence();
}

template <class T, bool kAdaptive>
void perturb_any(const PerturbSeg<T>& s, int64_t lo, int64_t hi, float scale, float eta, bool streaming) {
  if (streaming && stream_aligned(s.backup + lo)) {
    perturb_piece<T, kAdaptive, true>(s, lo, hi, scale, eta);
  } else {
    perturb_piece<T, kAdaptive, false>(s, lo, hi, scale, eta);
  }
}

template <class T>
void run_perturb(const host::Lists& lists, float scale, bool enabled, bool adaptive, float eta) {
  ChunkPlan<PerturbSeg<T>> plan;
  plan.reserve(lists.size());
  int64_t numel = 0;
  for (size_t i = 0; i < lists.size(); ++i) {
    plan.add({lists.data<T>(0, i), lists.data<const T>(1, i), lists.data<T>(2, i), lists.numel(i)});
    numel += lists.numel(i);
  }
  // w, g and the backups; the backups are read again only by restore_, after a forward and backward pass.
  const bool streaming = use_streaming(3 * numel * static_cast<int64_t>(sizeof(T)));
  // Reverse chunk order: grad_sumsq, which normally ran just before, read the gradients front to back, so their last
  // chunks are the ones still in cache.
  plan.run(
      [&](int64_t, const PerturbSeg<T>& s, int64_t lo, int64_t hi) {
        if (!enabled) {
          copy_elements(s.backup, s.w, lo, hi, streaming);  // non-finite gradients: backup only, w untouched
        } else if (adaptive) {
          perturb_any<T, true>(s, lo, hi, scale, eta, streaming);
        } else {
          perturb_any<T, false>(s, lo, hi, scale, eta, streaming);
        }
      },
      /*reverse=*/true);
}

// ---- perturb_batched ------------------------------------------------------------------------------------------

template <class T>
struct BatchedSeg {
  const T* w;  // the weights, shared by all slices
  const T* g;  // slice j of the gradient
  T* out;      // slice j of the output
  int64_t n;
  int64_t slice;
};

template <class T, bool kAdaptive>
void batched_piece(const BatchedSeg<T>& s, int64_t lo, int64_t hi, float scale, float eta) {
  const int64_t vec_hi = vector_end(lo, hi, Pack<T>::kWidth);
  const Vec scale_v(scale), eta_v(eta);
  for (int64_t i = lo; i < vec_hi; i += Pack<T>::kWidth) {
    Vec w0, w1, g0, g1;
    load_pack(s.w + i, w0, w1);
    load_pack(s.g + i, g0, g1);
    store_pack(s.out + i, perturb_value<kAdaptive>(w0, g0, scale_v, eta_v, w0.abs()),
               perturb_value<kAdaptive>(w1, g1, scale_v, eta_v, w1.abs()));
  }
  for (int64_t i = vec_hi; i < hi; ++i) {
    const float w = to_f32(s.w[i]);
    s.out[i] = from_f32<T>(perturb_value<kAdaptive>(w, to_f32(s.g[i]), scale, eta, std::fabs(w)));
  }
}

template <class T>
void run_batched(const host::Lists& lists, const std::vector<float>& scales, const std::vector<char>& enabled,
                 bool adaptive, float eta) {
  const auto k = static_cast<int64_t>(scales.size());
  ChunkPlan<BatchedSeg<T>> plan;
  plan.reserve(lists.size() * scales.size());
  for (size_t i = 0; i < lists.size(); ++i) {  // contiguous lists: slice j is the j-th block of n elements
    const T* w = lists.data<const T>(0, i);
    const T* g = lists.data<const T>(1, i);
    T* out = lists.data<T>(2, i);
    const int64_t n = lists.numel(i);
    for (int64_t j = 0; j < k; ++j) plan.add({w, g + j * n, out + j * n, n, j});
  }
  plan.run([&](int64_t, const BatchedSeg<T>& s, int64_t lo, int64_t hi) {
    const auto j = static_cast<size_t>(s.slice);
    if (!enabled[j]) {
      copy_elements(s.out, s.w, lo, hi, /*streaming=*/false);  // non-finite sumsq[j]: that copy is the unperturbed w
    } else if (adaptive) {
      batched_piece<T, true>(s, lo, hi, scales[j], eta);
    } else {
      batched_piece<T, false>(s, lo, hi, scales[j], eta);
    }
  });
}

// ---- restore_ -------------------------------------------------------------------------------------------------

template <class T>
struct CopySeg {
  T* dst;
  const T* src;
  int64_t n;
};

template <class T>
void run_restore(const host::Lists& lists) {
  ChunkPlan<CopySeg<T>> plan;
  plan.reserve(lists.size());
  int64_t numel = 0;
  for (size_t i = 0; i < lists.size(); ++i) {
    plan.add({lists.data<T>(0, i), lists.data<const T>(1, i), lists.numel(i)});
    numel += lists.numel(i);
  }
  // w and the backups, and the gradients the base optimizer's step reads right after the restore: what is written
  // here can stay cached for that step only when all three fit (measured: streaming 10% faster for 2000 x 2048 fp32).
  const bool streaming = use_streaming(3 * numel * static_cast<int64_t>(sizeof(T)));
  plan.run([&](int64_t, const CopySeg<T>& s, int64_t lo, int64_t hi) {
    copy_elements(s.dst, s.src, lo, hi, streaming);
  });
}

}  // namespace

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sumsq, double rho,
              double eps, bool adaptive, double eta, bool normalize) {
  const char* op = "perturb_";
  host::Lists lists = host::prepare(host::kCpu, op,
                                    {{"params", params, host::Access::kWrite},
                                     {"grads", grads},
                                     {"backups", backups, host::Access::kOverwrite}});
  if (lists.empty()) return;  // like the reference, which then never looks at sumsq
  const double s = *host::sumsq_arg(op, sumsq, 1, /*exact=*/false, lists.device()).const_data_ptr<double>();
  const float scale = static_cast<float>(perturb_scale(s, rho, eps, normalize));
  dispatch_storage(lists.dtype(), [&](auto tag) {
    run_perturb<decltype(tag)>(lists, scale, perturb_enabled(s), adaptive, static_cast<float>(eta));
  });
  lists.finish();
}

std::vector<at::Tensor> perturb_batched(at::TensorList params, at::TensorList grads, const at::Tensor& sumsq,
                                        double rho, double eps, bool adaptive, double eta, bool normalize) {
  const char* op = "perturb_batched";
  const int64_t k = sumsq.defined() ? sumsq.numel() : 0;  // one sum per micro-batch, as in the reference
  TORCH_CHECK_VALUE(params.empty() || k >= 1, "sam_fused.", op, ": sumsq must hold one sum per micro-batch (k >= 1)");
  host::Lists lists = host::prepare(host::kCpu, op,
                                    {{"params", params}, {"grads", grads, host::Access::kRead, host::Shape::kLeading}},
                                    k, host::Layout::kContiguous);
  if (lists.empty()) return {};
  std::vector<at::Tensor> outs = lists.outputs_like(grads);  // list 2
  const at::Tensor sums = host::sumsq_arg(op, sumsq, k, /*exact=*/true, lists.device());
  std::vector<float> scales;
  std::vector<char> enabled;
  for (int64_t j = 0; j < k; ++j) {
    const double s = sums.const_data_ptr<double>()[j];
    scales.push_back(static_cast<float>(perturb_scale(s, rho, eps, normalize)));
    enabled.push_back(perturb_enabled(s) ? 1 : 0);
  }
  dispatch_storage(lists.dtype(), [&](auto tag) {
    run_batched<decltype(tag)>(lists, scales, enabled, adaptive, static_cast<float>(eta));
  });
  lists.finish();
  return outs;
}

void restore_(at::TensorList params, at::TensorList backups) {
  host::Lists lists = host::prepare(host::kCpu, "restore_",
                                    {{"params", params, host::Access::kOverwrite}, {"backups", backups}});
  if (lists.empty()) return;
  dispatch_storage(lists.dtype(), [&](auto tag) { run_restore<decltype(tag)>(lists); });
  lists.finish();
}

}  // namespace sam_fused::cpu
