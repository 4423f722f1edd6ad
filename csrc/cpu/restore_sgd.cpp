// restore_sgd.cpp — restore_sgd_: SAM's restore and torch.optim.SGD's update in one pass over the data.
//
// Why: SAM's second step restores w from its backup and then the base optimizer reads w back to update it. Fused,
// each element reads backup, g and the momentum buffer once and writes w and the buffer once (20 bytes per fp32
// parameter instead of 8 + 20 + torch's temporaries). The result must be bit-for-bit torch's own step, so the
// arithmetic is torch's, op for op: its CPU add with alpha is one fused multiply-add, fma(other, alpha, self), in the
// vector body and the scalar tail alike (checked in tests/test_fused_sgd.py against torch.optim.SGD), and mul is a
// plain product:
//   d   = wd != 0 ? fma(w, wd, g) : g                      grad.add(param, alpha=weight_decay)
//   buf = fma(d, 1 - dampening, buf * momentum)            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
//   d   = nesterov ? fma(buf, momentum, d) : buf           grad.add(buf, alpha=momentum)
//   w   = fma(d, -lr, w)                                   param.add_(grad, alpha=-lr)
// with w the restored weight. fp32 only: for bf16/fp16 torch rounds to the storage type between ops, and the op layer
// sends those to the reference (restore_ then the same torch ops).
#include "common.h"
#include "ops.h"

#include <cmath>

namespace sam_fused::cpu {
namespace {

constexpr const char* kOp = "restore_sgd_";

struct SgdSeg {
  float* w;
  const float* backup;
  const float* g;
  float* buf;  // nullptr when momentum == 0
  int64_t n;
};

struct SgdHyper {
  float lr, wd, momentum, one_minus_dampening;
  bool nesterov;
};

// The formulas above for V = float (std::fma) or Vec (at::vec::fmadd).
template <class V, class Fma>
inline V sgd_update(V w, V g, V* buf, const SgdHyper& h, const Fma& fma) {
  V d = h.wd != 0.0f ? fma(w, V(h.wd), g) : g;
  if (buf != nullptr) {
    *buf = fma(d, V(h.one_minus_dampening), *buf * V(h.momentum));
    d = h.nesterov ? fma(*buf, V(h.momentum), d) : *buf;
  }
  return fma(d, V(-h.lr), w);
}

void sgd_piece(const SgdSeg& s, int64_t lo, int64_t hi, const SgdHyper& h) {
  const auto vfma = [](const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); };
  const auto sfma = [](float a, float b, float c) { return std::fma(a, b, c); };
  const int64_t vec_hi = vector_end(lo, hi, Vec::size());
  for (int64_t i = lo; i < vec_hi; i += Vec::size()) {
    Vec buf = s.buf != nullptr ? Vec::loadu(s.buf + i) : Vec(0.0f);
    const Vec w = sgd_update(Vec::loadu(s.backup + i), Vec::loadu(s.g + i), s.buf != nullptr ? &buf : nullptr, h, vfma);
    w.store(s.w + i);
    if (s.buf != nullptr) buf.store(s.buf + i);
  }
  for (int64_t i = vec_hi; i < hi; ++i) {
    float buf = s.buf != nullptr ? s.buf[i] : 0.0f;
    s.w[i] = sgd_update(s.backup[i], s.g[i], s.buf != nullptr ? &buf : nullptr, h, sfma);
    if (s.buf != nullptr) s.buf[i] = buf;
  }
}

}  // namespace

void restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                  at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
                  bool nesterov) {
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK_TYPE(params.empty() || params[0].scalar_type() == at::kFloat, "sam_fused.", kOp,
                   ": the CPU kernel takes float32 tensors only, got ", params[0].scalar_type(),
                   " (sam_fused.ops.restore_sgd_ sends other dtypes to the reference)");
  host::Lists lists = host::prepare(host::kCpu, kOp,
                                          {{"params", params, host::Access::kWrite},
                                           {"backups", backups},
                                           {"grads", grads},
                                           {"momentum_buffers", momentum_buffers, host::Access::kWrite,
                                            host::Shape::kBase, has_momentum}});
  // torch passes the Python floats to its fp32 kernels as fp32 scalars; 1 - dampening is computed in double first.
  const SgdHyper h{static_cast<float>(lr), static_cast<float>(weight_decay), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), nesterov};
  ChunkPlan<SgdSeg> plan;
  plan.reserve(lists.size());
  for (size_t i = 0; i < lists.size(); ++i) {
    plan.add({lists.data<float>(0, i), lists.data<const float>(1, i), lists.data<const float>(2, i),
              lists.data<float>(3, i), lists.numel(i)});
  }
  plan.run([&](int64_t, const SgdSeg& s, int64_t lo, int64_t hi) { sgd_piece(s, lo, hi, h); });
  lists.finish();
}

}  // namespace sam_fused::cpu
