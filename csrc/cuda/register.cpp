// register.cpp — registers the CUDA kernels for the ops that sam_fused/_registry.py defines (the schemas live there,
// in Python, as the single source of truth), and makes this library importable as the module sam_fused._C_cuda.
//
// Importing the module loads the library; its static TORCH_LIBRARY_IMPL initializer registers the kernels for the
// CUDA dispatch key of namespace sam_fused, where they take precedence over the CompositeExplicitAutograd
// reference. Registering an implementation before Python defines the schema is fine: the dispatcher matches them
// when the definition arrives (and checks the C++ signature against it). Nothing here needs a GPU: the library
// loads, and the registrations exist, on a machine without one (that is what CI checks, .ci/cuda_check.sh).
#include <Python.h>

#include <torch/library.h>

#include "cuda/ops.h"

TORCH_LIBRARY_IMPL(sam_fused, CUDA, m) {
#define SAM_FUSED_IMPL(op) m.impl(#op, TORCH_FN(sam_fused::cuda::op));
  SAM_FUSED_FOR_EACH_OP(SAM_FUSED_IMPL)
#undef SAM_FUSED_IMPL
}

// A plain module with no functions: the ops are reached through torch.ops.sam_fused.*.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cuda",
                              "sam_fused CUDA kernels (registered with torch.ops.sam_fused for the CUDA key)", -1,
                              nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kModule); }
