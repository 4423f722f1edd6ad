// sam_math_cpu.h — includes the shared per-element formulas (csrc/shared/sam_math.h) for the CPU kernels.
//
// sam_math.h calls isfinite / sqrt unqualified (the CUDA spelling). With only <cmath>, libstdc++ declares them in
// namespace std alone, so <math.h> comes first to put them in the global namespace for host code.
#pragma once

#include <math.h>

#include "shared/sam_math.h"
