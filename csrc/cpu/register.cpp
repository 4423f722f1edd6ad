// register.cpp — registers the CPU kernels for the ops that sam_fused/_registry.py defines (the schemas live there,
// in Python, as the single source of truth), and makes this library importable as the module sam_fused._C_cpu.
//
// Importing the module is what loads the library; the static TORCH_LIBRARY_IMPL initializer then registers the
// kernels for the CPU dispatch key of namespace sam_fused, where they take precedence over the
// CompositeExplicitAutograd reference. The build may enable the build machine's vector ISA (setup.py); if the
// library is then loaded on a CPU without it, nothing is registered and the import fails with a clear message, so
// sam_fused falls back to the torch backend instead of hitting an illegal instruction.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

namespace {

// True when this CPU can run the instructions this library was compiled for.
bool cpu_supports_build_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

#define SAM_FUSED_STR2(x) #x
#define SAM_FUSED_STR(x) SAM_FUSED_STR2(x)
#if defined(CPU_CAPABILITY)
constexpr const char* kIsa = SAM_FUSED_STR(CPU_CAPABILITY);
#else
constexpr const char* kIsa = "DEFAULT";
#endif

}  // namespace

TORCH_LIBRARY_IMPL(sam_fused, CPU, m) {
  if (!cpu_supports_build_isa()) return;
#define SAM_FUSED_IMPL(op) m.impl(#op, TORCH_FN(sam_fused::cpu::op));
  SAM_FUSED_FOR_EACH_OP(SAM_FUSED_IMPL)
  SAM_FUSED_IMPL(restore_sgd_)  // fused optimizer step (STEP_SCHEMAS), CPU only
#undef SAM_FUSED_IMPL
}

// A plain module with no functions: the ops are reached through torch.ops.sam_fused.*. Its `cpu_capability`
// attribute says which vector ISA the kernels were compiled for.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cpu",
                              "sam_fused CPU kernels (registered with torch.ops.sam_fused)", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cpu(void) {
  if (!cpu_supports_build_isa()) {
    PyErr_Format(PyExc_ImportError,
                 "sam_fused._C_cpu was compiled for %s, which this CPU does not support; reinstall sam_fused on "
                 "this machine (or set SAM_FUSED_CPU_CAPABILITY=default when building)",
                 kIsa);
    return nullptr;
  }
  PyObject* module = PyModule_Create(&kModule);
  if (module != nullptr && PyModule_AddStringConstant(module, "cpu_capability", kIsa) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
