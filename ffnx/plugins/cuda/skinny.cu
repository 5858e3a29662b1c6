// Skinny grouped product for a few rows per group (contract in gemm.cuh).
//
// Designed for the memory bound: at T <= 32 an FFN is pure weight streaming (T * 2 FLOP per
// weight element, far below any GPU's FLOP:byte ratio), so both kernels aim at keeping many
// 16-byte weight loads in flight and at reading each weight byte once. A group (expert) with no
// rows returns before touching its weights, so at T = 1 only the k routed experts' bytes move.
//
// skinny_mma_kernel (fp16/bf16, K % 8 == 0): a block owns 16 output columns (a gated block also
// the 16 matching up rows, so the activation is fused) and its 8 warps split K. Each lane loads
// 16 contiguous bytes of weight rows g and g+8 and of activation row g straight into mma.sync
// m16n8k16 fragments: the dot product does not care about the order of k, so k is permuted the
// same way for both operands (lane quad c holds physical k 8c..8c+7 of a 32-wide slice) and no
// shared-memory staging or conversion is needed; up to 16 rows per pass ride along for free on
// the tensor cores. Warps reduce their partial tiles through shared memory.
// skinny_kernel (fp32, unaligned): one warp per output column, fp32 FMA, up to MR rows per pass.
// Rows beyond a pass's capacity are done in further passes over the same weights (L2 hits).
#include "gemm.cuh"

namespace ffnx {
namespace {

constexpr int WARPS = 8, UNROLL = 4;

template <typename T, bool VEC> struct Loader {
  static constexpr int N = VEC ? Vec<T>::N : 1;
  __device__ static void weight(const T* p, float* out) {
    if constexpr (VEC) unpack<T>(ld_stream(p), out);
    else out[0] = to_f(p[0]);
  }
  __device__ static void act(const T* p, float* out) {
    if constexpr (VEC) unpack<T>(ld_cached(p), out);
    else out[0] = to_f(p[0]);
  }
};

template <typename T, int MR, bool VEC>
__global__ void __launch_bounds__(WARPS * 32) skinny_kernel(const GemmArgs p) {
  using L = Loader<T, VEC>;
  constexpr int V = L::N, STEP = 32 * V;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = blockIdx.y;
  const int r0 = p.group_offsets ? p.group_offsets[g] : 0;
  const int r1 = p.group_offsets ? p.group_offsets[g + 1] : p.M;
  if (r0 >= r1) return;
  const int N = p.n_dev ? *p.n_dev : p.N, n = blockIdx.x * WARPS + warp;
  if (n >= N) return;
  const bool gated = p.epi.mode == EPI_GATED;
  const int64_t K = p.K, brow = p.b_rows ? p.b_rows[n] : n;
  const T* Bg = static_cast<const T*>(p.B) + g * p.b_gstride;
  const T* wg = Bg + brow * K;
  const T* wu = gated ? Bg + (p.epi.up_offset + brow) * K : wg;
  const T* A = static_cast<const T*>(p.A);

  for (int rc = r0; rc < r1; rc += MR) {
    const int nr = min(MR, r1 - rc);
    const T* x[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const int r = rc + (m < nr ? m : 0);
      x[m] = A + (p.a_rows ? p.a_rows[r] : r) * p.lda;
    }
    float acc[MR], accu[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[m] = accu[m] = 0.f;
    for (int k0 = lane * V; k0 < K; k0 += UNROLL * STEP) {
      float w[UNROLL][V], u[UNROLL][V];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {  // all weight loads first: UNROLL x 16 B in flight
        const int64_t k = k0 + j * STEP;
        if (k < K) {
          L::weight(wg + k, w[j]);
          if (gated) L::weight(wu + k, u[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {
        const int64_t k = k0 + j * STEP;
        if (k >= K) break;
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m >= nr) break;
          float xv[V];
          L::act(x[m] + k, xv);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            acc[m] = fmaf(w[j][v], xv[v], acc[m]);
            if (gated) accu[m] = fmaf(u[j][v], xv[v], accu[m]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m >= nr) break;
      const float a = warp_sum(acc[m]), au = gated ? warp_sum(accu[m]) : 0.f;
      if (lane == m % 32) epi_apply<T>(p.epi, g, rc + m, n, a, au);
    }
  }
}


constexpr int MMA_U = 4;  // 32-wide k slices per warp per step: 4 x 16 B per weight row in flight

__device__ __forceinline__ uint4 zero4() { return make_uint4(0u, 0u, 0u, 0u); }

template <typename T, int NT>  // NT tiles of 8 activation rows per pass
__global__ void __launch_bounds__(WARPS * 32) skinny_mma_kernel(const GemmArgs p) {
  __shared__ float red[WARPS][2][NT][4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, c = lane & 3;
  const int g = blockIdx.y;
  const int r0 = p.group_offsets ? p.group_offsets[g] : 0;
  const int r1 = p.group_offsets ? p.group_offsets[g + 1] : p.M;
  if (r0 >= r1) return;
  const int N = p.n_dev ? *p.n_dev : p.N, n0 = blockIdx.x * 16;
  if (n0 >= N) return;
  const bool gated = p.epi.mode == EPI_GATED;
  const int64_t K = p.K;
  const T* Bg = static_cast<const T*>(p.B) + g * p.b_gstride;
  const T* w[2][2];  // [gate/up][row g / g + 8]; rows past N re-read row n0 (results dropped)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + gq + 8 * h < N ? n0 + gq + 8 * h : n0;
    const int64_t brow = p.b_rows ? p.b_rows[n] : n;
    w[0][h] = Bg + brow * K + c * 8;
    w[1][h] = gated ? Bg + (p.epi.up_offset + brow) * K + c * 8 : w[0][h];
  }
  const T* A = static_cast<const T*>(p.A);
  for (int rc = r0; rc < r1; rc += 8 * NT) {
    const T* x[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int r = rc + t * 8 + gq < r1 ? rc + t * 8 + gq : rc;
      x[t] = A + (p.a_rows ? p.a_rows[r] : r) * p.lda + c * 8;
    }
    float acc[2][NT][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[h][t][q] = 0.f;
    for (int64_t k0 = warp * 32 * MMA_U; k0 < K; k0 += WARPS * 32 * MMA_U) {
      uint4 wv[2][MMA_U][2], xv[MMA_U][NT];
#pragma unroll
      for (int u = 0; u < MMA_U; ++u) {  // all loads first
        const int64_t k = k0 + u * 32;
        const bool ok = k + c * 8 < K;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wv[0][u][h] = ok ? ld_stream(w[0][h] + k) : zero4();
          if (gated) wv[1][u][h] = ok ? ld_stream(w[1][h] + k) : zero4();
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) xv[u][t] = ok ? ld_cached(x[t] + k) : zero4();
      }
#pragma unroll
      for (int u = 0; u < MMA_U; ++u)
#pragma unroll
        for (int h = 0; h < (gated ? 2 : 1); ++h)
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            const uint4 a0 = wv[h][u][0], a1 = wv[h][u][1], b = xv[u][t];
            const uint32_t fa[4] = {a0.x, a1.x, a0.y, a1.y}, fb[2] = {b.x, b.y};
            const uint32_t ga[4] = {a0.z, a1.z, a0.w, a1.w}, gb[2] = {b.z, b.w};
            mma16816<T>(acc[h][t], fa, fb);
            mma16816<T>(acc[h][t], ga, gb);
          }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int q = 0; q < 4; ++q) red[warp][h][t][q][lane] = acc[h][t][q];
    __syncthreads();
    // thread -> (t, q, lane) of the tile; sums the 8 warps' partials
    for (int i = threadIdx.x; i < NT * 4 * 32; i += WARPS * 32) {
      const int t = i / 128, q = (i / 32) & 3, l = i & 31;
      float v = 0.f, vu = 0.f;
#pragma unroll
      for (int wp = 0; wp < WARPS; ++wp) {
        v += red[wp][0][t][q][l];
        if (gated) vu += red[wp][1][t][q][l];
      }
      // accumulator layout: q0,q1 -> (weight row l/4, rows 2(l%4)+{0,1}); q2,q3 -> weight row +8
      const int n = n0 + (l >> 2) + (q >= 2 ? 8 : 0), r = rc + t * 8 + 2 * (l & 3) + (q & 1);
      if (n < N && r < r1) epi_apply<T>(p.epi, g, r, n, v, vu);
    }
    __syncthreads();
  }
}

template <typename T, int NT> int launch_mma(const GemmArgs& a, cudaStream_t s) {
  skinny_mma_kernel<T, NT><<<dim3(ceil_div(a.N, 16), a.G), WARPS * 32, 0, s>>>(a);
  return launch_status();
}

template <typename T, int MR, bool VEC> int launch_mr(const GemmArgs& a, cudaStream_t s) {
  skinny_kernel<T, MR, VEC><<<dim3(ceil_div(a.N, WARPS), a.G), WARPS * 32, 0, s>>>(a);
  return launch_status();
}

template <typename T> int launch_t(const GemmArgs& a, int64_t max_rows, cudaStream_t s) {
  constexpr int V = Vec<T>::N;
  const bool vec = a.K % V == 0 && a.lda % V == 0 && a.b_gstride % V == 0 && aligned16(a.A) &&
                   aligned16(a.B);
  if (!vec) return launch_mr<T, 4, false>(a, s);  // unaligned fallback: correct, not tuned
  if constexpr (std::is_same_v<T, float>) {
    if (max_rows <= 1) return launch_mr<T, 1, true>(a, s);
    if (max_rows <= 2) return launch_mr<T, 2, true>(a, s);
    if (max_rows <= 4) return launch_mr<T, 4, true>(a, s);
    return launch_mr<T, 8, true>(a, s);
  } else {  // on an H100 (Mixtral shape) 1.35x faster than fp32-FMA at T=1, 3.7x at T=16
    return max_rows <= 8 ? launch_mma<T, 1>(a, s) : launch_mma<T, 2>(a, s);
  }
}

}  // namespace

int launch_skinny(int dtype, const GemmArgs& a, int64_t max_rows, cudaStream_t s) {
  if (a.N <= 0 || a.G <= 0 || max_rows <= 0) return FFNX_OK;
  switch (dtype) {
    case FFNX_F32: return launch_t<float>(a, max_rows, s);
    case FFNX_F16: return launch_t<__half>(a, max_rows, s);
    default: return launch_t<__nv_bfloat16>(a, max_rows, s);
  }
}

}  // namespace ffnx
