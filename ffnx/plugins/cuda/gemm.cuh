// Grouped "x @ W.T" products shared by the MoE and the sparse FFN, and their fused epilogues.
//
//   C[r, n] = epilogue( sum_k A[arow(r), k] * B[g][brow(n), k] )   for rows r of group g
//
// A [*, K] row-major (optionally gathered: arow(r) = a_rows[r]); B [G, *, K] row-major (the
// schema's weight layouts: fc1 [E, H1, D], fc2 [E, D, H], w_up [H, D], ...), i.e. both operands
// are K-contiguous ("NT"), which is what mma.sync wants with no transposes. Groups are contiguous
// row ranges given by device-side offsets (MoE: expert e owns permuted rows
// [offsets[e], offsets[e+1])), so no host round-trip is needed to know the sizes.
//
// Three implementations, one contract:
//   launch_gemm     tiled GEMM for many rows per group. fp16/bf16 with K % 8 == 0: tensor cores
//                   (mma.sync m16n8k16, cp.async 4-stage pipeline; compute-bound design);
//                   otherwise (fp32, odd K) a SIMT smem-tiled GEMM with fp32 FMA.
//   launch_skinny   a few rows per group (T <= 32): weight streaming with 16-byte loads straight
//                   into mma.sync fragments (fp16/bf16) or fp32 FMA; designed for the memory
//                   bound (weights read once per 16 rows; groups without rows read nothing).
#pragma once

#include "common.cuh"

namespace ffnx {

enum EpiMode {
  EPI_STORE = 0,       // out = act(acc + bias)          (act may be ACT_NONE)
  EPI_GATED = 1,       // out = act_gated_pair(acc_g + b_g, acc_u + b_u): gate row n, up row up_offset + n
  EPI_SPARSE_MUL = 2,  // out = keep(a) ? a * acc : 0 with a = a_act[r, c], c = cols ? cols[n] : n
};

struct Epi {
  int mode = EPI_STORE;
  int act = ACT_NONE;
  const void* bias = nullptr;  // dtype of the GEMM; [G, bias_gstride]
  int64_t bias_gstride = 0;
  int64_t up_offset = 0;       // EPI_GATED: first up row in B (and in the bias)
  float alpha = 1.f, limit = 0.f;  // EPI_GATED with FFNX_ACT_CLAMPED_SWIGLU
  void* out = nullptr;         // [rows, ldo], float when out_f32 else the GEMM's dtype
  int64_t ldo = 0;
  int out_f32 = 0;
  // EPI_SPARSE_MUL: keep = |a| > thr[c] (thr given) or |a| >= tau[r] (top-k threshold per row)
  const float* a_act = nullptr;
  int64_t lda_act = 0;
  const int* cols = nullptr;
  const float* thr = nullptr;
  const float* tau = nullptr;
};

struct GemmArgs {
  const void* A = nullptr;
  int64_t lda = 0;
  const int* a_rows = nullptr;         // gather: A row of output row r (nullptr: r)
  const void* B = nullptr;
  int64_t b_gstride = 0;               // elements between groups' weights
  const int* b_rows = nullptr;         // skinny only: B row of output column n (nullptr: n)
  const int* n_dev = nullptr;          // skinny only: device-side column count (nullptr: N)
  const int* group_offsets = nullptr;  // [G + 1] row offsets (nullptr: one group of M rows)
  const int* tile_offsets = nullptr;   // [G + 1] prefix of ceil(rows_g / BM) (launch_gemm)
  int M = 0, G = 1, N = 0, K = 0;      // M: rows (one group) or an upper bound of all rows
  Epi epi;
};

template <typename T>
__device__ __forceinline__ void epi_apply(const Epi& e, int g, int64_t r, int n, float v, float vu) {
  if (e.bias) {
    const T* b = static_cast<const T*>(e.bias) + g * e.bias_gstride;
    v += to_f(b[n]);
    if (e.mode == EPI_GATED) vu += to_f(b[e.up_offset + n]);
  }
  float o;
  if (e.mode == EPI_GATED) {
    o = act_gated_pair(e.act, v, vu, e.alpha, e.limit);
  } else if (e.mode == EPI_SPARSE_MUL) {
    const int c = e.cols ? e.cols[n] : n;
    const float a = e.a_act[r * e.lda_act + c];
    const bool keep = e.thr ? fabsf(a) > e.thr[c] : fabsf(a) >= e.tau[r];
    o = keep ? a * v : 0.f;
  } else {
    o = e.act == ACT_NONE ? v : act_base(e.act, v);
  }
  if (e.out_f32) static_cast<float*>(e.out)[r * e.ldo + n] = o;
  else static_cast<T*>(e.out)[r * e.ldo + n] = from_f<T>(o);
}

// fp16/bf16 with K % 8 == 0 and 16-byte aligned operands run on tensor cores, with a row tile
// BM of 64 or 128; everything else on the SIMT kernel, whose BM is 64. tile_offsets must be
// computed with the BM of the launch.
bool gemm_tensor_core_ok(int dtype, const GemmArgs& a);
// max_tiles: grid bound on row tiles of a grouped launch (ceil(rows / BM) + G); a one-group
// launch computes its own and may take another BM.
int launch_gemm(int dtype, const GemmArgs& a, int bm, int max_tiles, cudaStream_t s);
// max_rows: the most rows any group can have (picks rows per pass).
int launch_skinny(int dtype, const GemmArgs& a, int64_t max_rows, cudaStream_t s);

}  // namespace ffnx
