// Shared device helpers of the ffnx kernels: dtype conversion, activations, 16-byte loads,
// warp reductions, workspace carving and launch checks. Internal: not part of the C ABI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "ffnx_kernels.h"

namespace ffnx {

constexpr int ACT_NONE = -1;  // EPI_STORE without an activation

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Gated activations apply their base function to the gate half (schema.GATED_ACTIVATIONS).
__device__ __forceinline__ float act_base(int act, float x) {
  switch (act) {
    case FFNX_ACT_SWIGLU:
    case FFNX_ACT_SILU: return x / (1.f + expf(-x));
    case FFNX_ACT_GEGLU:
    case FFNX_ACT_GELU: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    case FFNX_ACT_REGLU:
    case FFNX_ACT_RELU: return fmaxf(x, 0.f);
    default: return x;
  }
}

// A gated activation of gate g and up u (schema GATED_ACTIVATIONS): base(g) * u, or GPT-OSS's
// clamped SwiGLU min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, +-limit) + 1).
__device__ __forceinline__ float act_gated_pair(int act, float g, float u, float alpha,
                                                float limit) {
  if (act == FFNX_ACT_CLAMPED_SWIGLU) {
    g = fminf(g, limit);
    u = fminf(fmaxf(u, -limit), limit);
    return g / (1.f + expf(-alpha * g)) * (u + 1.f);
  }
  return act_base(act, g) * u;
}

// FFNX_ACT_CLAMPED_SWIGLU is an FfnxMoE activation only (the sparse FFN refuses it).
inline bool act_valid(int a) { return a >= FFNX_ACT_SWIGLU && a <= FFNX_ACT_CLAMPED_SWIGLU; }
inline bool act_gated(int a) {
  return a == FFNX_ACT_SWIGLU || a == FFNX_ACT_GEGLU || a == FFNX_ACT_REGLU ||
         a == FFNX_ACT_CLAMPED_SWIGLU;
}
inline size_t dtype_size(int dt) { return dt == FFNX_F32 ? 4 : 2; }
inline bool dtype_valid(int dt) { return dt == FFNX_F32 || dt == FFNX_F16 || dt == FFNX_BF16; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// 16 bytes = V elements of T, converted to float. Weights are streamed with L1::no_allocate: at
// small T they are read exactly once, and keeping them out of L1 leaves it to the activations.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 ld_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T> __device__ __forceinline__ void unpack(uint4 r, float* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(r.x); out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z); out[3] = __uint_as_float(r.w);
  } else {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __half>) {
        float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        out[2 * i] = f.x; out[2 * i + 1] = f.y;
      } else {
        float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
        out[2 * i] = f.x; out[2 * i + 1] = f.y;
      }
    }
  }
}

// D += A (16x16, row) * B (16x8, col), fp32 accumulators; T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Carves one workspace: the same code computes the size (base == nullptr) and the pointers, so
// ffnx_*_workspace_size and ffnx_*_launch can never disagree. 256-byte aligned pieces.
struct Carver {
  char* base;
  size_t off = 0;
  template <typename T> T* take(size_t n) {
    off = (off + 255) & ~size_t(255);
    T* p = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += n * sizeof(T);
    return p;
  }
  size_t size() const { return (off + 255) & ~size_t(255); }
};

inline int launch_status() { return cudaGetLastError() == cudaSuccess ? FFNX_OK : FFNX_ERR_CUDA; }

#define FFNX_TRY(expr)             \
  do {                             \
    int _s = (expr);               \
    if (_s != FFNX_OK) return _s;  \
  } while (0)

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace ffnx
