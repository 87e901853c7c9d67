// Float vectors as wide as this build's registers, shared by the native kernels.
//
// 16 lanes with AVX-512, else 8 (AVX2; two registers of SSE or NEON). Each kernel sizes its
// register blocks from kLanes. Loops over those blocks are unrolled with PIXELGEN_UNROLL:
// left to its own heuristics, GCC kept the 2 × 4 accumulator block of the AVX2 build rolled and
// on the stack, and the kernels ran 4 to 15 times slower than XLA (`benchmarks/README.md`,
// twelfth session).
#ifndef PIXELGEN_NATIVE_VECTORS_H_
#define PIXELGEN_NATIVE_VECTORS_H_

#include <cstdint>

namespace pixelgen {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif

#if defined(__clang__)
#define PIXELGEN_UNROLL _Pragma("unroll")
#else
#define PIXELGEN_UNROLL _Pragma("GCC unroll 16")
#endif

// In registers; and as read from or written to memory at any float boundary (the may_alias,
// 4-aligned twin: how the compilers' own intrinsics headers load unaligned vectors).
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec
    __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
inline Vec Splat(float x) { return Vec{} + x; }

}  // namespace pixelgen

#endif  // PIXELGEN_NATIVE_VECTORS_H_
