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

void check_inputs(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList bufs,
                  bool has_momentum) {
  check_same_length(kOp, params, "params", backups, "backups");
  check_same_length(kOp, params, "params", grads, "grads");
  if (has_momentum) check_same_length(kOp, params, "params", bufs, "momentum_buffers");
  TORCH_CHECK_TYPE(params.empty() || params[0].scalar_type() == at::kFloat, "sam_fused.", kOp,
                   ": the CPU kernel takes float32 tensors only, got ", params[0].scalar_type(),
                   " (sam_fused.ops.restore_sgd_ sends other dtypes to the reference)");
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(kOp, params[i], "params", i, at::kFloat);
    check_no_overlap(kOp, params[i], "params", i);
    check_tensor(kOp, backups[i], "backups", i, at::kFloat);
    check_shape(kOp, backups[i], "backups", i, params[i].sizes());
    check_tensor(kOp, grads[i], "grads", i, at::kFloat);
    check_shape(kOp, grads[i], "grads", i, params[i].sizes());
    if (has_momentum) {
      check_tensor(kOp, bufs[i], "momentum_buffers", i, at::kFloat);
      check_shape(kOp, bufs[i], "momentum_buffers", i, params[i].sizes());
      check_no_overlap(kOp, bufs[i], "momentum_buffers", i);
    }
  }
}

}  // namespace

void restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                  at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
                  bool nesterov) {
  const bool has_momentum = momentum != 0.0;
  check_inputs(params, backups, grads, momentum_buffers, has_momentum);
  // torch passes the Python floats to its fp32 kernels as fp32 scalars; 1 - dampening is computed in double first.
  const SgdHyper h{static_cast<float>(lr), static_cast<float>(weight_decay), static_cast<float>(momentum),
                   static_cast<float>(1.0 - dampening), nesterov};
  LayoutScope scope;
  ChunkPlan<SgdSeg> plan;
  plan.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = scope.reference(params[i], /*mutated=*/true);
    const at::Tensor& b = scope.input(backups[i], w);
    const at::Tensor& g = scope.input(grads[i], w);
    float* buf = has_momentum ? scope.output(momentum_buffers[i], w, /*read=*/true).data_ptr<float>() : nullptr;
    plan.add({w.data_ptr<float>(), b.const_data_ptr<float>(), g.const_data_ptr<float>(), buf, w.numel()});
  }
  plan.run([&](int64_t, const SgdSeg& s, int64_t lo, int64_t hi) { sgd_piece(s, lo, hi, h); });
  scope.finish();
}

}  // namespace sam_fused::cpu
