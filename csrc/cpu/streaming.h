// streaming.h — non-temporal ("streaming") stores for outputs that no one reads soon.
//
// Why: a plain store first reads the destination cache line from memory (read-for-ownership), so copying 8 bytes
// costs 12 bytes of DRAM traffic. When an op's output is larger than the last-level cache it cannot stay cached for
// its next reader anyway (SAM's backups are read back only after a forward and backward pass; restored weights are
// read by the next step), and a non-temporal store writes the line without reading it and without evicting the inputs
// still to be read. Used by perturb_ (backup writes) and restore_ (weight writes) when the op's lists do not fit in
// the LLC together; smaller lists keep plain stores, so that small models stay cache-resident. Bits are copied, never
// converted: restore_ stays bit-exact. Streaming stores are weakly ordered: every piece that issues them ends with
// stream_fence().
#pragma once

#include "common.h"

#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace sam_fused::cpu {

// Destination alignment the streaming vector stores need (the vector register size; 64 covers both ISAs).
constexpr uintptr_t kStreamAlign = 64;

// Size of the last-level cache in bytes (streaming.cpp).
int64_t llc_bytes();

// True when an op that touches `footprint` bytes (all its lists together) should write its outputs with streaming
// stores: when they do not fit in the LLC together. Measured on the 2-core EPYC VM (32 MB LLC), first_step + restore
// on N x 2048 fp32 tensors: plain stores faster up to N = 1000 (perturb_ footprint 23 MB), streaming from N = 1500
// (35 MB) on, and on ResNet-50 (17 vs 21 ms).
// SAM_FUSED_CPU_STREAMING=0 / 1 forces plain / streaming stores (read at every call: benchmarks and tests of both).
inline bool use_streaming(int64_t footprint) {
  const char* forced = std::getenv("SAM_FUSED_CPU_STREAMING");
  if (forced != nullptr && forced[0] != '\0') return forced[0] != '0';
  return footprint > llc_bytes();
}

inline bool stream_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0; }

// One vector register's bits to an aligned address, bypassing the cache where the ISA allows.
inline void stream_vec(float* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}

template <class T>
inline void stream_vec(T* p, const at::vec::Vectorized<T>& v) {  // bf16 / fp16 vectors hold integer registers
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#else
  v.store(p);
#endif
}

// A pack's raw bits (Pack<T>::Raw) to a kStreamAlign-aligned p.
template <class T>
inline void stream_raw(T* p, const typename Pack<T>::Raw& r) {
  if constexpr (std::is_same_v<T, float>) {
    stream_vec(p, r.lo);
    stream_vec(p + Vec::size(), r.hi);
  } else {
    stream_vec(p, r);
  }
}

// Makes this thread's streaming stores visible before anything it does next (a barrier, the op's return).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// dst[lo, hi) <- src[lo, hi), bit for bit: plain memcpy, or streaming stores for the part of the range where dst is
// aligned (a memcpy'd head until it is, and a memcpy'd tail of less than one pack).
template <class T>
void copy_elements(T* dst, const T* src, int64_t lo, int64_t hi, bool streaming) {
  int64_t i = lo;
  if (streaming) {
    while (i < hi && !stream_aligned(dst + i)) ++i;  // at most kStreamAlign / sizeof(T) elements
    std::memcpy(dst + lo, src + lo, static_cast<size_t>(i - lo) * sizeof(T));
    const int64_t vec_hi = vector_end(i, hi, Pack<T>::kWidth);
    for (; i < vec_hi; i += Pack<T>::kWidth) stream_raw<T>(dst + i, Pack<T>::load_raw(src + i));
    stream_fence();
  }
  std::memcpy(dst + i, src + i, static_cast<size_t>(hi - i) * sizeof(T));
}

}  // namespace sam_fused::cpu
