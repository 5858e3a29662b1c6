// Tiled grouped GEMMs (contract in gemm.cuh).
//
// gemm_tc_kernel: compute-bound design for many rows per group (MoE at large T, the dense
// sparse-FFN path). fp16/bf16 operands, fp32 accumulation on tensor cores (mma.sync m16n8k16 via
// ldmatrix), BM x BN x 32 tiles, 8 warps, a 4-stage cp.async pipeline so global loads of the next
// three K-slices overlap the MMAs of this one. Rows of A are gathered on the fly (cp.async per
// 16-byte chunk from the token's row), so the MoE never materialises permuted activations. The
// grid walks row tiles fastest: consecutive blocks share one weight tile (read from DRAM once,
// then L2), while the activations (T x D) stay L2-resident across column tiles.
// Shared-memory rows are padded to 80 bytes, which makes every ldmatrix phase conflict-free.
// The accumulator tile goes through shared memory to the epilogue, which fuses bias, the gated
// activation (gate and up rows of fc1 are loaded as the two halves of one B tile), sparse masks,
// and writes coalesced rows.
//
// gemm_simt_kernel: fp32 (and unaligned fp16/bf16) fallback, 64x64x16 tiles, 4x4 per thread.
// Correctness path with fp32 accumulation; not tuned (tensor cores would need tf32, which loses
// the fp32 contract's precision).
#include "gemm.cuh"

namespace ffnx {
namespace {

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
// Which group and rows a row tile covers; false when the tile is past the last one.
__device__ __forceinline__ bool locate_tile(const GemmArgs& p, int bm, int tile, int& g, int& row0,
                                            int& rows) {
  if (!p.group_offsets) {
    g = 0;
    row0 = tile * bm;
    rows = min(bm, p.M - row0);
    return row0 < p.M;
  }
  if (tile >= p.tile_offsets[p.G]) return false;
  int lo = 0, hi = p.G - 1;  // last group whose first tile is <= tile (skips empty groups)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.tile_offsets[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  g = lo;
  row0 = p.group_offsets[g] + (tile - p.tile_offsets[g]) * bm;
  rows = min(bm, p.group_offsets[g + 1] - row0);
  return true;
}

// B row of tile row i (gated tiles load BN/2 gate rows then the matching BN/2 up rows).
__device__ __forceinline__ int64_t b_row(const GemmArgs& p, int bn, int n_tile, int i, bool& ok) {
  if (p.epi.mode == EPI_GATED) {
    const int half = bn / 2, n = n_tile * half + (i < half ? i : i - half);
    ok = n < p.N;
    return i < half ? n : p.epi.up_offset + n;
  }
  const int n = n_tile * bn + i;
  ok = n < p.N;
  return n;
}

template <typename T, int BM, int BN>
__device__ __forceinline__ void epilogue_tile(const GemmArgs& p, const float* Cs, int ldc, int g,
                                              int row0, int rows, int n_tile) {
  const bool gated = p.epi.mode == EPI_GATED;
  const int cols = gated ? BN / 2 : BN, n0 = n_tile * cols;
  for (int idx = threadIdx.x; idx < BM * cols; idx += blockDim.x) {
    const int i = idx / cols, j = idx - i * cols, n = n0 + j;
    if (i < rows && n < p.N) {
      const float v = Cs[i * ldc + j], vu = gated ? Cs[i * ldc + j + BN / 2] : 0.f;
      epi_apply<T>(p.epi, g, row0 + i, n, v, vu);
    }
  }
}

template <int BM, int BN, int BK, int STAGES> constexpr int tc_smem_bytes() {
  constexpr int pipe = STAGES * (BM + BN) * (BK + 8) * 2, epi = BM * (BN + 4) * 4;
  return pipe > epi ? pipe : epi;
}

template <typename T, int BM, int BN, int TC_BK, int TC_STAGES>
__global__ void __launch_bounds__(256) gemm_tc_kernel(const GemmArgs p) {
  constexpr int TC_LDS = TC_BK + 8, CPR = TC_BK / 8;  // 16-byte chunks per tile row
  constexpr int WM = BM / 2, WN = BN / 4, MI = WM / 16, NI = WN / 8;
  constexpr int A_CH = BM * CPR / 256, B_CH = BN * CPR / 256;
  extern __shared__ __align__(16) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + TC_STAGES * BM * TC_LDS;

  int g, row0, rows;
  if (!locate_tile(p, BM, blockIdx.x, g, row0, rows)) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wm = warp >> 2, wn = warp & 3;
  const int K = p.K;
  const T* A = static_cast<const T*>(p.A);
  const T* Bg = static_cast<const T*>(p.B) + g * p.b_gstride;

  const T* a_src[A_CH];
  bool a_ok[A_CH];
#pragma unroll
  for (int i = 0; i < A_CH; ++i) {
    const int r = (tid + i * 256) / CPR;
    a_ok[i] = r < rows;
    const int64_t ar = !a_ok[i] ? 0 : p.a_rows ? p.a_rows[row0 + r] : row0 + r;
    a_src[i] = A + ar * p.lda + (tid % CPR) * 8;
  }
  const T* b_src[B_CH];
  bool b_ok[B_CH];
#pragma unroll
  for (int i = 0; i < B_CH; ++i) {
    const int64_t br = b_row(p, BN, blockIdx.y, (tid + i * 256) / CPR, b_ok[i]);
    b_src[i] = Bg + (b_ok[i] ? br : 0) * K + (tid % CPR) * 8;
  }
  const int kc = (tid % CPR) * 8;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * TC_BK;
    const bool k_ok = k0 + kc < K;
#pragma unroll
    for (int i = 0; i < A_CH; ++i) {
      const int c = tid + i * 256;
      const bool ok = a_ok[i] && k_ok;
      cp_async16(As + (stage * BM + c / CPR) * TC_LDS + kc, ok ? a_src[i] + k0 : A, ok);
    }
#pragma unroll
    for (int i = 0; i < B_CH; ++i) {
      const int c = tid + i * 256;
      const bool ok = b_ok[i] && k_ok;
      cp_async16(Bs + (stage * BN + c / CPR) * TC_LDS + kc, ok ? b_src[i] + k0 : Bg, ok);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  const int KT = (K + TC_BK - 1) / TC_BK;
#pragma unroll
  for (int s = 0; s < TC_STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<TC_STAGES - 2>();
    __syncthreads();  // stage kt landed for everyone; stage kt-1 is free to overwrite
    const int nk = kt + TC_STAGES - 1;
    if (nk < KT) load_stage(nk % TC_STAGES, nk);
    cp_async_commit();
    const T* as = As + (kt % TC_STAGES) * BM * TC_LDS;
    const T* bs = Bs + (kt % TC_STAGES) * BN * TC_LDS;
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      uint32_t af[MI][4], bf[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], as + (wm * WM + mi * 16 + (lane & 15)) * TC_LDS + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        const int n = wn * WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(r, bs + n * TC_LDS + kk + ((lane >> 3) & 1) * 8);
        bf[2 * nj][0] = r[0]; bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2]; bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* Cs = reinterpret_cast<float*>(smem);
  constexpr int LDC = BN + 4;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int r = wm * WM + mi * 16 + (lane >> 2), c = wn * WN + ni * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(&Cs[r * LDC + c]) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(&Cs[(r + 8) * LDC + c]) =
          make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
  __syncthreads();
  epilogue_tile<T, BM, BN>(p, Cs, LDC, g, row0, rows, blockIdx.y);
}

constexpr int SM_BM = 64, SM_BN = 64, SM_BK = 16;

template <typename T>
__global__ void __launch_bounds__(256) gemm_simt_kernel(const GemmArgs p) {
  __shared__ float As[SM_BK][SM_BM + 4], Bs[SM_BK][SM_BN + 4];
  __shared__ float Cs[SM_BM][SM_BN + 4];
  int g, row0, rows;
  if (!locate_tile(p, SM_BM, blockIdx.x, g, row0, rows)) return;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, K = p.K;
  const T* A = static_cast<const T*>(p.A);
  const T* Bg = static_cast<const T*>(p.B) + g * p.b_gstride;
  // this thread loads element k = tid & 15 of tile rows (tid >> 4) + 16 * i
  const T* a_src[4];
  const T* b_src[4];
  bool a_ok[4], b_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    a_ok[i] = r < rows;
    const int64_t ar = !a_ok[i] ? 0 : p.a_rows ? p.a_rows[row0 + r] : row0 + r;
    a_src[i] = A + ar * p.lda + tx;
    const int64_t br = b_row(p, SM_BN, blockIdx.y, r, b_ok[i]);
    b_src[i] = Bg + (b_ok[i] ? br : 0) * K + tx;
  }
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += SM_BK) {
    const bool k_ok = k0 + tx < K;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[tx][ty + 16 * i] = a_ok[i] && k_ok ? to_f(a_src[i][k0]) : 0.f;
      Bs[tx][ty + 16 * i] = b_ok[i] && k_ok ? to_f(b_src[i][k0]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SM_BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) { a[i] = As[k][ty * 4 + i]; b[i] = Bs[k][tx * 4 + i]; }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Cs[ty * 4 + i][tx * 4 + j] = acc[i][j];
  __syncthreads();
  epilogue_tile<T, SM_BM, SM_BN>(p, &Cs[0][0], SM_BN + 4, g, row0, rows, blockIdx.y);
}

// Tile shape knobs (build-time, for tuning runs). Default BK 64 x 3 stages: 110 KB of shared
// memory for 128x128, two blocks per SM (128 registers); on an H100 it beat BK 32 x 4 stages by
// 25 % at T=256 and 15 % at T=4096 (Mixtral shape), and BN=256 (64x64 warp tiles) by 3-10 %.
#ifndef FFNX_TC_BK
#define FFNX_TC_BK 64
#endif
#ifndef FFNX_TC_STAGES
#define FFNX_TC_STAGES 3
#endif
#ifndef FFNX_TC_BN128
#define FFNX_TC_BN128 128  // BN of the BM=128 tile; 256 gives 64x64 warp tiles
#endif
template <typename T, int BM, int BN, int BK = FFNX_TC_BK, int STAGES = FFNX_TC_STAGES>
int launch_tc(const GemmArgs& a, int max_tiles, cudaStream_t s) {
  constexpr int smem = tc_smem_bytes<BM, BN, BK, STAGES>();
  auto kern = gemm_tc_kernel<T, BM, BN, BK, STAGES>;
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return FFNX_ERR_CUDA;
  const int cols = a.epi.mode == EPI_GATED ? BN / 2 : BN;
  kern<<<dim3(max_tiles, ceil_div(a.N, cols)), 256, smem, s>>>(a);
  return launch_status();
}

template <typename T> int launch_simt(const GemmArgs& a, int max_tiles, cudaStream_t s) {
  const int cols = a.epi.mode == EPI_GATED ? SM_BN / 2 : SM_BN;
  gemm_simt_kernel<T><<<dim3(max_tiles, ceil_div(a.N, cols)), 256, 0, s>>>(a);
  return launch_status();
}

}  // namespace

bool gemm_tensor_core_ok(int dtype, const GemmArgs& a) {
  return dtype != FFNX_F32 && a.K % 8 == 0 && a.lda % 8 == 0 && a.b_gstride % 8 == 0 &&
         aligned16(a.A) && aligned16(a.B);
}

int launch_gemm(int dtype, const GemmArgs& a, int bm, int max_tiles, cudaStream_t s) {
  const bool tc = gemm_tensor_core_ok(dtype, a);
  if (!a.group_offsets) {  // one group: no tile_offsets to agree with, so pick BM here
    bm = tc ? bm : SM_BM;
    max_tiles = ceil_div(a.M, bm);
  }
  if (max_tiles <= 0 || a.N <= 0) return FFNX_OK;
  if (tc) {
    if (dtype == FFNX_F16)
      return bm == 128 ? launch_tc<__half, 128, FFNX_TC_BN128>(a, max_tiles, s)
                       : launch_tc<__half, 64, 128>(a, max_tiles, s);
    return bm == 128 ? launch_tc<__nv_bfloat16, 128, FFNX_TC_BN128>(a, max_tiles, s)
                     : launch_tc<__nv_bfloat16, 64, 128>(a, max_tiles, s);
  }
  if (bm != SM_BM) return FFNX_ERR_INVALID_ARGUMENT;  // tile_offsets were made for another BM
  switch (dtype) {
    case FFNX_F32: return launch_simt<float>(a, max_tiles, s);
    case FFNX_F16: return launch_simt<__half>(a, max_tiles, s);
    default: return launch_simt<__nv_bfloat16>(a, max_tiles, s);
  }
}

}  // namespace ffnx
