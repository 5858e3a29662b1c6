// FfnxSparseFFN (schema.SPARSE_FFN): activation-sparse FFN.
//
// Small batches (T <= 32), where the FFN is weight streaming and skipping channels saves bytes:
//   1. gate   a = act(x @ w_gate.T) (gated) or act(x @ w_up.T + b_up): skinny product over all H
//             rows (dense: the mask is not known before it), fp32 [T, H].
//   2. top-k  per-token threshold tau_t = k-th largest |a_t| (4-pass 8-bit radix select, one
//             block per token); keep = |a| >= tau (ties at tau keep more than k channels, with
//             identical numerics unless equal magnitudes straddle the cut).
//   3. compaction of the active channels: channel c is active when any token keeps it with a
//             non-zero activation (an inactive channel contributes exactly 0). Per-1024-channel
//             ballot bitmaps and counts, then an ordered scatter: deterministic channel order.
//   4. up     gated: gather-GEMV/GEMM over the active rows of w_up only (skinny kernel with a
//             row list and a device-side count), fused with mask * a. Non-gated: step 3 writes
//             mask * a directly.
//   5. down   with w_down_t (packed [H, D], ffnx_sparse_ffn_pack_down): each active channel is one
//             contiguous row, streamed with 16-byte loads and accumulated over a split of the
//             channel list (fp32 partials, reduced in a second pass with b_down: deterministic,
//             no atomics). Without it, a warp per output row gathers the active columns of w_down
//             in place (correct; saves little bandwidth at moderate sparsity).
// Larger batches: the union of active channels approaches H, so the dense path runs the tiled
// GEMMs (tensor cores for fp16/bf16) with the mask fused into the up GEMM's epilogue.
#include <algorithm>

#include "gemm.cuh"

namespace ffnx {
namespace {

constexpr int SMALL_T = 32, CHUNK = 1024, TCH = 8;

__device__ __forceinline__ bool keep_of(float a, const float* thr, const float* tau, int t, int c) {
  return thr ? fabsf(a) > thr[c] : fabsf(a) >= tau[t];
}

__global__ void __launch_bounds__(256) topk_threshold_kernel(const float* a, int H, int k,
                                                             float* tau) {
  __shared__ int hist[256];
  __shared__ unsigned s_prefix;
  __shared__ int s_remaining;
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31;
  if (k <= 0 || k >= H) {
    if (tid == 0) tau[t] = k <= 0 ? INFINITY : 0.f;
    return;
  }
  const float* row = a + static_cast<int64_t>(t) * H;
  unsigned prefix = 0, mask = 0;
  int remaining = k;  // rank still to find inside the current bucket
  for (int shift = 24; shift >= 0; shift -= 8) {
    hist[tid] = 0;
    __syncthreads();
    for (int c = tid; c < H; c += 256) {
      const unsigned u = __float_as_uint(fabsf(row[c]));
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid < 32) {  // lane l owns bins 255-8l .. 248-8l, highest first
      int own = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) own += hist[255 - lane * 8 - q];
      int incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, incl >= remaining);
      if (lane == __ffs(hit) - 1) {
        int before = incl - own;
        for (int q = 0; q < 8; ++q) {
          const int b = 255 - lane * 8 - q, h = hist[b];
          if (before + h >= remaining) {
            s_prefix = prefix | (static_cast<unsigned>(b) << shift);
            s_remaining = remaining - before;
            break;
          }
          before += h;
        }
      }
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  if (tid == 0) tau[t] = __uint_as_float(prefix);
}

__global__ void __launch_bounds__(CHUNK) flags_kernel(const float* a, int T, int H, const float* thr,
                                                      const float* tau, unsigned* flags, int* cnt) {
  const int c = blockIdx.x * CHUNK + threadIdx.x;
  bool active = false;
  if (c < H)
    for (int t = 0; t < T; ++t) {
      const float v = a[static_cast<int64_t>(t) * H + c];
      active |= v != 0.f && keep_of(v, thr, tau, t, c);
    }
  const unsigned word = __ballot_sync(0xffffffffu, active);
  if ((threadIdx.x & 31) == 0 && c < H) flags[c >> 5] = word;
  const int n = __syncthreads_count(active);
  if (threadIdx.x == 0) cnt[blockIdx.x] = n;
}

template <typename T>
__global__ void __launch_bounds__(CHUNK) compact_kernel(const unsigned* flags, const int* cnt,
    int chunks, const float* a, const float* thr, const float* tau, int T_, int H, bool gated,
    int* cols, int* n_act, T* v) {
  __shared__ int warp_part[32], warp_off[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, b = blockIdx.x;
  int base = 0;  // active channels in earlier chunks
  for (int j = tid; j < b; j += CHUNK) base += cnt[j];
  base = __reduce_add_sync(0xffffffffu, base);
  const int c = b * CHUNK + tid;
  const unsigned word = c - lane < H ? flags[c >> 5] : 0u;
  if (lane == 0) { warp_part[warp] = base; warp_off[warp] = __popc(word); }
  __syncthreads();
  if (warp == 0) {
    int total = warp_part[lane], n = warp_off[lane], incl = n;
    total = __reduce_add_sync(0xffffffffu, total);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int x = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += x;
    }
    warp_off[lane] = total + incl - n;
  }
  __syncthreads();
  if ((word >> lane) & 1u) {
    const int pos = warp_off[warp] + __popc(word & ((1u << lane) - 1u));
    cols[pos] = c;
    if (!gated)
      for (int t = 0; t < T_; ++t) {
        const float x = a[static_cast<int64_t>(t) * H + c];
        v[static_cast<int64_t>(t) * H + pos] = from_f<T>(keep_of(x, thr, tau, t, c) ? x : 0.f);
      }
  }
  if (b == chunks - 1 && tid == 0) *n_act = warp_off[0] + cnt[b];  // warp_off[0] = base
}

// part[s, t, d] = sum over channels i of split s of v[t, i] * w_down_t[cols[i], d]. A warp
// covers 32 x 16 bytes of columns; the 8 warps of a block and the S blocks along y interleave
// over the channel list, 4 rows in flight per lane; warps reduce through shared memory.
// Designed for the memory bound (each active row of w_down_t read once per 8 tokens).
template <typename T, bool VEC>
__global__ void __launch_bounds__(256) down_packed_kernel(const T* wt, const int* cols,
    const int* n_act, const T* v, int64_t ldv, int T_, int D, float* part) {
  constexpr int V = VEC ? Vec<T>::N : 1, R = 32 / TCH;
  __shared__ float red[8][32 * V];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int d0 = (blockIdx.x * 32 + lane) * V, n = *n_act;
  const int stride = gridDim.y * 8;
  for (int tc = 0; tc < T_; tc += TCH) {
    float acc[TCH][V];
#pragma unroll
    for (int t = 0; t < TCH; ++t)
#pragma unroll
      for (int q = 0; q < V; ++q) acc[t][q] = 0.f;
    {  // no early exit for d0 >= D: the whole warp takes part in the shuffles
      for (int i0 = blockIdx.y * 8 + warp; i0 < n; i0 += R * stride) {
        // lane (j, t) = (lane / TCH, lane % TCH) fetches v[t, row j] once; broadcast by shuffle,
        // so the activations load in parallel with the weights instead of one by one
        float vl = 0.f;
        {
          const int i = i0 + (lane / TCH) * stride, t = tc + lane % TCH;
          if (i < n && t < T_) vl = to_f(v[t * ldv + i]);
        }
        float w[R][V];
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const int i = i0 + j * stride;
#pragma unroll
          for (int q = 0; q < V; ++q) w[j][q] = 0.f;
          if (i < n && d0 < D) {
            const T* row = wt + static_cast<int64_t>(cols[i]) * D + d0;
            if constexpr (VEC) unpack<T>(ld_stream(row), w[j]); else w[j][0] = to_f(*row);
          }
        }
#pragma unroll
        for (int j = 0; j < R; ++j)
#pragma unroll
          for (int t = 0; t < TCH; ++t) {
            const float a = __shfl_sync(0xffffffffu, vl, j * TCH + t);
#pragma unroll
            for (int q = 0; q < V; ++q) acc[t][q] = fmaf(a, w[j][q], acc[t][q]);
          }
      }
    }
    for (int t = 0; t < TCH && tc + t < T_; ++t) {
#pragma unroll
      for (int q = 0; q < V; ++q) red[warp][lane * V + q] = acc[t][q];
      __syncthreads();
      for (int col = threadIdx.x; col < 32 * V; col += 256) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) s += red[w][col];
        const int d = blockIdx.x * 32 * V + col;
        if (d < D) part[(static_cast<int64_t>(blockIdx.y) * T_ + tc + t) * D + d] = s;
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void reduce_kernel(const float* part, int S, int T_, int D, const T* b, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(T_) * D) return;
  float s = b ? to_f(b[i % D]) : 0.f;
  for (int j = 0; j < S; ++j) s += part[j * static_cast<int64_t>(T_) * D + i];
  out[i] = from_f<T>(s);
}

// No packed weights: a warp per output row gathers the active columns of w_down [D, H].
template <typename T>
__global__ void __launch_bounds__(256) down_cols_kernel(const T* wd, const int* cols,
    const int* n_act, const T* v, int64_t ldv, int T_, int D, int H, const T* b, T* out) {
  const int lane = threadIdx.x & 31, d = blockIdx.x * 8 + (threadIdx.x >> 5), n = *n_act;
  if (d >= D) return;
  const T* row = wd + static_cast<int64_t>(d) * H;
  for (int tc = 0; tc < T_; tc += TCH) {
    float acc[TCH] = {};
    for (int i = lane; i < n; i += 32) {
      const float w = to_f(row[cols[i]]);
#pragma unroll
      for (int t = 0; t < TCH; ++t)
        if (tc + t < T_) acc[t] = fmaf(w, to_f(v[(tc + t) * ldv + i]), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < TCH; ++t) {
      const float s = warp_sum(acc[t]);
      if (lane == 0 && tc + t < T_)
        out[static_cast<int64_t>(tc + t) * D + d] = from_f<T>(s + (b ? to_f(b[d]) : 0.f));
    }
  }
}

template <typename T>
__global__ void mask_kernel(const float* a, const float* thr, const float* tau, int T_, int H, T* v) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(T_) * H) return;
  const int t = static_cast<int>(i / H), c = static_cast<int>(i % H);
  v[i] = from_f<T>(keep_of(a[i], thr, tau, t, c) ? a[i] : 0.f);
}

template <typename T> __global__ void transpose_kernel(const T* in, int rows, int cols, T* out) {
  __shared__ T tile[32][33];
  const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int r = r0 + j, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[j][threadIdx.x] = in[static_cast<int64_t>(r) * cols + c];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += 8) {
    const int c = c0 + j, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out[static_cast<int64_t>(c) * rows + r] = tile[threadIdx.x][j];
  }
}

// Splits of the channel list in the packed down projection: ~512 blocks whatever D is.
int down_splits(const ffnx_sparse_ffn_params& p) {
  const int dblocks = ceil_div(p.hidden, 32 * (16 / dtype_size(p.dtype)));
  return std::max(1, std::min(64, 512 / dblocks));
}

struct SPlan {
  float* a; float* tau; unsigned* flags; int* cnt; int* cols; int* n_act; void* v; float* part;
};

size_t carve(const ffnx_sparse_ffn_params& p, char* base, SPlan& pl) {
  const size_t T = p.num_tokens, H = p.inter, D = p.hidden;
  Carver c{base};
  pl.a = c.take<float>(T * H);
  pl.tau = c.take<float>(T);
  pl.v = c.take<char>(T * H * dtype_size(p.dtype));
  if (p.num_tokens <= SMALL_T) {
    pl.flags = c.take<unsigned>((H + 31) / 32);
    pl.cnt = c.take<int>(ceil_div(H, CHUNK));
    pl.cols = c.take<int>(H);
    pl.n_act = c.take<int>(1);
    pl.part = c.take<float>(down_splits(p) * T * D);
  }
  return c.size();
}

int validate(const ffnx_sparse_ffn_params* p, const ffnx_sparse_ffn_tensors* t) {
  if (!p || p->num_tokens < 0 || p->hidden <= 0 || p->inter <= 0 || !dtype_valid(p->dtype) ||
      !act_valid(p->activation) || p->activation == FFNX_ACT_CLAMPED_SWIGLU || (p->mode != FFNX_SPARSE_THRESHOLD && p->mode != FFNX_SPARSE_TOPK) ||
      (!p->gated && act_gated(p->activation)) || (p->gated && p->has_b_up))
    return FFNX_ERR_INVALID_ARGUMENT;
  if (p->num_tokens * p->inter > INT32_MAX || p->hidden > INT32_MAX / 2 ||
      p->num_tokens * p->hidden > INT32_MAX)
    return FFNX_ERR_UNSUPPORTED;
  if (!t) return FFNX_OK;
  if (!t->hidden || !t->w_up || !t->w_down || !t->output || (p->gated && !t->w_gate) ||
      (p->has_b_up && !t->b_up) || (p->mode == FFNX_SPARSE_THRESHOLD && !t->thresholds))
    return FFNX_ERR_INVALID_ARGUMENT;
  return FFNX_OK;
}

template <typename T> int launch_typed(const ffnx_sparse_ffn_params& p,
                                       const ffnx_sparse_ffn_tensors& t, const SPlan& pl,
                                       cudaStream_t s) {
  const int T_ = static_cast<int>(p.num_tokens), H = static_cast<int>(p.inter);
  const int D = static_cast<int>(p.hidden);
  const bool small = T_ <= SMALL_T, topk = p.mode == FFNX_SPARSE_TOPK;
  const float* thr = topk ? nullptr : t.thresholds;
  const float* tau = topk ? pl.tau : nullptr;
  const int bm = T_ >= 128 ? 128 : 64;

  GemmArgs gate;  // a = act(x @ W.T (+ b_up)), fp32
  gate.A = t.hidden; gate.lda = D; gate.B = p.gated ? t.w_gate : t.w_up;
  gate.M = T_; gate.N = H; gate.K = D;
  gate.epi.act = p.activation;
  gate.epi.bias = p.has_b_up ? t.b_up : nullptr;
  gate.epi.out = pl.a; gate.epi.ldo = H; gate.epi.out_f32 = 1;
  FFNX_TRY(small ? launch_skinny(p.dtype, gate, T_, s) : launch_gemm(p.dtype, gate, bm, 0, s));
  if (topk) {
    topk_threshold_kernel<<<T_, 256, 0, s>>>(pl.a, H, static_cast<int>(std::min<int64_t>(p.k, H)), pl.tau);
    FFNX_TRY(launch_status());
  }
  GemmArgs up;  // gated: v = keep * a * (x @ w_up.T)
  up.A = t.hidden; up.lda = D; up.B = t.w_up; up.M = T_; up.N = H; up.K = D;
  up.epi.mode = EPI_SPARSE_MUL;
  up.epi.a_act = pl.a; up.epi.lda_act = H; up.epi.thr = thr; up.epi.tau = tau;
  up.epi.out = pl.v; up.epi.ldo = H;
  T* v = static_cast<T*>(pl.v);
  if (!small) {
    if (p.gated) {
      FFNX_TRY(launch_gemm(p.dtype, up, bm, 0, s));
    } else {
      mask_kernel<T><<<ceil_div(int64_t(T_) * H, 256), 256, 0, s>>>(pl.a, thr, tau, T_, H, v);
      FFNX_TRY(launch_status());
    }
    GemmArgs down;
    down.A = pl.v; down.lda = H; down.B = t.w_down; down.M = T_; down.N = D; down.K = H;
    down.epi.bias = p.has_b_down ? t.b_down : nullptr;
    down.epi.out = t.output; down.epi.ldo = D;
    return launch_gemm(p.dtype, down, bm, 0, s);
  }
  const int chunks = ceil_div(H, CHUNK);
  flags_kernel<<<chunks, CHUNK, 0, s>>>(pl.a, T_, H, thr, tau, pl.flags, pl.cnt);
  FFNX_TRY(launch_status());
  compact_kernel<T><<<chunks, CHUNK, 0, s>>>(pl.flags, pl.cnt, chunks, pl.a, thr, tau, T_, H,
                                             p.gated != 0, pl.cols, pl.n_act, v);
  FFNX_TRY(launch_status());
  if (p.gated) {
    up.b_rows = pl.cols; up.n_dev = pl.n_act; up.epi.cols = pl.cols;
    FFNX_TRY(launch_skinny(p.dtype, up, T_, s));
  }
  const T* b_down = p.has_b_down ? static_cast<const T*>(t.b_down) : nullptr;
  T* out = static_cast<T*>(t.output);
  if (t.w_down_t) {
    const T* wt = static_cast<const T*>(t.w_down_t);
    const int S = down_splits(p);
    constexpr int V = Vec<T>::N;
    if (D % V == 0 && aligned16(wt))
      down_packed_kernel<T, true><<<dim3(ceil_div(D, 32 * V), S), 256, 0, s>>>(
          wt, pl.cols, pl.n_act, v, H, T_, D, pl.part);
    else
      down_packed_kernel<T, false><<<dim3(ceil_div(D, 32), S), 256, 0, s>>>(
          wt, pl.cols, pl.n_act, v, H, T_, D, pl.part);
    FFNX_TRY(launch_status());
    reduce_kernel<T><<<ceil_div(int64_t(T_) * D, 256), 256, 0, s>>>(pl.part, S, T_, D, b_down, out);
  } else {
    down_cols_kernel<T><<<ceil_div(D, 8), 256, 0, s>>>(static_cast<const T*>(t.w_down), pl.cols,
                                                      pl.n_act, v, H, T_, D, H, b_down, out);
  }
  return launch_status();
}

}  // namespace
}  // namespace ffnx

using namespace ffnx;

extern "C" size_t ffnx_sparse_ffn_workspace_size(const ffnx_sparse_ffn_params* p) {
  if (validate(p, nullptr) != FFNX_OK) return 0;
  SPlan pl;
  return carve(*p, nullptr, pl);
}

extern "C" int ffnx_sparse_ffn_launch(const ffnx_sparse_ffn_params* p,
                                      const ffnx_sparse_ffn_tensors* t, void* workspace,
                                      size_t workspace_size, void* stream) {
  FFNX_TRY(validate(p, t));
  if (p->num_tokens == 0) return FFNX_OK;
  SPlan pl;
  if (!workspace || workspace_size < carve(*p, nullptr, pl)) return FFNX_ERR_WORKSPACE_TOO_SMALL;
  carve(*p, static_cast<char*>(workspace), pl);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case FFNX_F32: return launch_typed<float>(*p, *t, pl, s);
    case FFNX_F16: return launch_typed<__half>(*p, *t, pl, s);
    default: return launch_typed<__nv_bfloat16>(*p, *t, pl, s);
  }
}

extern "C" int ffnx_sparse_ffn_pack_down(const ffnx_sparse_ffn_params* p, const void* w_down,
                                         void* w_down_t, void* stream) {
  if (!p || !w_down || !w_down_t || p->hidden <= 0 || p->inter <= 0 || !dtype_valid(p->dtype))
    return FFNX_ERR_INVALID_ARGUMENT;
  const dim3 grid(ceil_div(p->inter, 32), ceil_div(p->hidden, 32)), block(32, 8);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int D = static_cast<int>(p->hidden), H = static_cast<int>(p->inter);
  if (p->dtype == FFNX_F32)
    transpose_kernel<float><<<grid, block, 0, s>>>(static_cast<const float*>(w_down), D, H,
                                                   static_cast<float*>(w_down_t));
  else
    transpose_kernel<unsigned short><<<grid, block, 0, s>>>(
        static_cast<const unsigned short*>(w_down), D, H, static_cast<unsigned short*>(w_down_t));
  return launch_status();
}
