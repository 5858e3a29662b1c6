// FfnxMoE (schema.MOE): route -> permute -> fc1 (+activation) -> fc2 -> weighted un-permute.
//
//   1. route_kernel     one warp per token: scores, top-k (warp argmax, ties to the lower expert
//                       id), weights; claims a slot per (token, j) in its expert with an atomic
//                       counter. Latency-bound, tiny. Group-limited routing (n_group > 1) first
//                       masks the experts outside the best groups (limit_groups).
//   2. permute_kernel   every block scans the E counts (E <= 512, in shared memory) into row and
//                       row-tile offsets, then scatters its (token, j) pairs to their permuted rows.
//                       All on the device: nothing is copied back to the host.
//   3. fc1, fc2         grouped products over experts (gemm.cuh): skinny weight streaming at
//                       T <= 32, tiled tensor-core GEMM above; fc1 fuses bias and the activation
//                       (gated: gate and up rows in one pass), fc2 writes fp32 rows.
//   4. shared experts   the same products over all tokens, one group.
//   5. combine_kernel   y[t] = sum_j w_j * rows[pos(t, j)] + gate(t) * shared[t], in fp32, cast
//                       once; memory-bound, coalesced.
// Row order inside an expert depends on atomics, but every row is computed independently, so the
// output is deterministic.
#include "gemm.cuh"

namespace ffnx {
namespace {

constexpr int MAX_EXPERTS = 512, EPL = MAX_EXPERTS / 32, MAX_TOP_K = 32, SMALL_T = 32;
constexpr int MAX_GROUPS = 32;  // one lane per group

struct Route {
  const void* logits;
  const float* score_bias;
  const int64_t* token_ids;
  const int64_t* hash_table;
  int T, E, k, mode, scoring, normalize;
  float scale;
  int* idx;     // [T*k] expert id, -1 = none
  float* w;     // [T*k]
  int* rank;    // [T*k] slot within the expert
  int* counts;  // [E], zeroed before the launch
  int n_group, topk_group, group_scoring;  // n_group 1: no group limit
};

__device__ __forceinline__ void argmax_merge(float& v, int& e, float& w, float ov, int oe, float ow) {
  if (ov > v || (ov == v && oe < e)) { v = ov; e = oe; w = ow; }
}

// Group-limited routing (schema: n_group > 1 and topk_group < n_group). Lane g < n_group scores
// group g, the G = E / n_group contiguous experts [g*G, (g+1)*G): the sum of their two largest
// sel (top2_sum) or the largest (max). The topk_group best groups are kept (ties to the lower
// group id) and every other expert's sel becomes -inf.
__device__ __forceinline__ void limit_groups(float (&sel)[EPL], const Route& r, int lane) {
  const int G = r.E / r.n_group;
  float my_score = -INFINITY;
  for (int g = 0; g < r.n_group; ++g) {
    float a = -INFINITY, b = -INFINITY;  // the two largest sel of group g
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = i * 32 + lane;
      if (e >= g * G && e < (g + 1) * G) {
        if (sel[i] > a) { b = a; a = sel[i]; } else b = fmaxf(b, sel[i]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float oa = __shfl_xor_sync(0xffffffffu, a, o), ob = __shfl_xor_sync(0xffffffffu, b, o);
      if (oa > a) { b = fmaxf(a, ob); a = oa; } else b = fmaxf(b, oa);
    }
    if (lane == g) my_score = r.group_scoring == FFNX_GROUP_MAX ? a : a + b;
  }
  unsigned keep = 0;
  for (int j = 0; j < r.topk_group; ++j) {
    float bv = -INFINITY, unused = 0.f;
    int bg = 0x7fffffff;
    if (lane < r.n_group && !((keep >> lane) & 1u)) argmax_merge(bv, bg, unused, my_score, lane, 0.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int og = __shfl_xor_sync(0xffffffffu, bg, o);
      argmax_merge(bv, bg, unused, ov, og, 0.f);
    }
    if (bg < r.n_group) keep |= 1u << bg;
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    const int e = i * 32 + lane;
    if (e < r.E && !((keep >> (e / G)) & 1u)) sel[i] = -INFINITY;
  }
}

template <typename T> __global__ void route_kernel(const Route r) {
  const int lane = threadIdx.x & 31, t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= r.T) return;
  int my_e = -1;
  float my_w = 0.f;
  if (r.mode == FFNX_ROUTING_HASH) {
    if (lane < r.k) {
      const int64_t e = r.hash_table[r.token_ids[t] * r.k + lane];
      my_e = e >= 0 && e < r.E ? static_cast<int>(e) : -1;
      my_w = r.scale / r.k;
    }
  } else {
    const T* s_row = static_cast<const T*>(r.logits) + static_cast<int64_t>(t) * r.E;
    float s[EPL], sel[EPL], w[EPL];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = i * 32 + lane;
      s[i] = e < r.E ? to_f(s_row[e]) : -INFINITY;
      mx = fmaxf(mx, s[i]);
    }
    float sum = 0.f;
    if (r.scoring == FFNX_SCORING_SOFTMAX) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#pragma unroll
      for (int i = 0; i < EPL; ++i) sum += i * 32 + lane < r.E ? expf(s[i] - mx) : 0.f;
      sum = warp_sum(sum);
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = i * 32 + lane;
      if (r.scoring == FFNX_SCORING_SOFTMAX) w[i] = expf(s[i] - mx) / sum;
      else if (r.scoring == FFNX_SCORING_SIGMOID) w[i] = 1.f / (1.f + expf(-s[i]));
      else w[i] = s[i];  // topk_softmax: softmax over the selected logits below
      sel[i] = r.scoring == FFNX_SCORING_TOPK_SOFTMAX ? s[i] : w[i];
      if (r.scoring != FFNX_SCORING_TOPK_SOFTMAX && r.score_bias && e < r.E) sel[i] += r.score_bias[e];
      if (e >= r.E) sel[i] = -INFINITY;
    }
    if (r.n_group > 1) limit_groups(sel, r, lane);
    float first = 0.f, total = 0.f;
    for (int j = 0; j < r.k; ++j) {
      float bv = -INFINITY, bw = 0.f;
      int be = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < EPL; ++i) argmax_merge(bv, be, bw, sel[i], i * 32 + lane, w[i]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o), ow = __shfl_xor_sync(0xffffffffu, bw, o);
        const int oe = __shfl_xor_sync(0xffffffffu, be, o);
        argmax_merge(bv, be, bw, ov, oe, ow);
      }
#pragma unroll
      for (int i = 0; i < EPL; ++i)
        if (i * 32 + lane == be) sel[i] = -INFINITY;
      if (r.scoring == FFNX_SCORING_TOPK_SOFTMAX) {
        if (j == 0) first = bw;  // selected in descending order: the first is the max
        bw = expf(bw - first);
      }
      total += bw;
      if (lane == j) { my_e = be < r.E ? be : -1; my_w = bw; }
    }
    if (r.scoring == FFNX_SCORING_TOPK_SOFTMAX || r.normalize) my_w /= total;
    my_w *= r.scale;
  }
  if (lane < r.k) {
    const int slot = t * r.k + lane;
    r.idx[slot] = my_e;
    r.w[slot] = my_w;
    r.rank[slot] = my_e >= 0 ? atomicAdd(&r.counts[my_e], 1) : 0;
  }
}

struct Permute {
  const int* idx;
  const int* rank;
  const int* counts;
  int TK, E, k, bm;
  int* offsets;       // [E + 1]
  int* tile_offsets;  // [E + 1] prefix of ceil(count / bm)
  int* row_token;     // [T*k] permuted row -> token
  int* slot_row;      // [T*k] (token, j) -> permuted row, -1 = none
};

// Exclusive scans of counts and of their row tiles; every block redoes them (E is small), so the
// scatter needs no second launch.
__global__ void __launch_bounds__(256) permute_kernel(const Permute p) {
  __shared__ int off[MAX_EXPERTS + 1], toff[MAX_EXPERTS + 1];
  __shared__ int warp_sums[2][8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // 256 threads x 2 experts each
  int c[2], tc[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int e = tid * 2 + i;
    c[i] = e < p.E ? p.counts[e] : 0;
    tc[i] = (c[i] + p.bm - 1) / p.bm;
  }
  int s = c[0] + c[1], ts = tc[0] + tc[1];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {  // inclusive warp scans
    const int a = __shfl_up_sync(0xffffffffu, s, o), b = __shfl_up_sync(0xffffffffu, ts, o);
    if (lane >= o) { s += a; ts += b; }
  }
  if (lane == 31) { warp_sums[0][warp] = s; warp_sums[1][warp] = ts; }
  __syncthreads();
  int base = 0, tbase = 0;
  for (int w = 0; w < warp; ++w) { base += warp_sums[0][w]; tbase += warp_sums[1][w]; }
  const int ex = base + s - c[0] - c[1], tex = tbase + ts - tc[0] - tc[1];
  off[tid * 2] = ex;
  off[tid * 2 + 1] = ex + c[0];
  toff[tid * 2] = tex;
  toff[tid * 2 + 1] = tex + tc[0];
  if (tid == 255) { off[512] = ex + c[0] + c[1]; toff[512] = tex + tc[0] + tc[1]; }
  __syncthreads();
  if (blockIdx.x == 0)
    for (int e = tid; e <= p.E; e += blockDim.x) {
      p.offsets[e] = off[e];
      p.tile_offsets[e] = toff[e];
    }
  for (int i = blockIdx.x * blockDim.x + tid; i < p.TK; i += gridDim.x * blockDim.x) {
    const int e = p.idx[i];
    int row = -1;
    if (e >= 0) {
      row = off[e] + p.rank[i];
      p.row_token[row] = i / p.k;
    }
    p.slot_row[i] = row;
  }
}

struct Combine {
  const float* rows;  // [T*k, D] expert outputs in permuted order
  const int* slot_row;
  const float* w;
  const float* shared;  // [T, D] or null
  const void* hidden;
  const void* gate_w;   // [D] or null
  void* out;
  int T, D, k;
};

template <typename T> __global__ void __launch_bounds__(256) combine_kernel(const Combine c) {
  const int t = blockIdx.x;
  __shared__ float red[8];
  __shared__ int s_row[MAX_TOP_K];
  __shared__ float s_w[MAX_TOP_K];
  if (threadIdx.x < c.k) {
    s_row[threadIdx.x] = c.slot_row[t * c.k + threadIdx.x];
    s_w[threadIdx.x] = c.w[t * c.k + threadIdx.x];
  }
  float gate = 1.f;
  if (c.shared && c.gate_w) {
    const T* x = static_cast<const T*>(c.hidden) + static_cast<int64_t>(t) * c.D;
    const T* gw = static_cast<const T*>(c.gate_w);
    float d = 0.f;
    for (int i = threadIdx.x; i < c.D; i += blockDim.x) d += to_f(x[i]) * to_f(gw[i]);
    d = warp_sum(d);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = d;
    __syncthreads();
    d = 0.f;
    for (int i = 0; i < (blockDim.x >> 5); ++i) d += red[i];
    gate = 1.f / (1.f + expf(-d));
  }
  __syncthreads();
  T* out = static_cast<T*>(c.out) + static_cast<int64_t>(t) * c.D;
  for (int d = threadIdx.x; d < c.D; d += blockDim.x) {
    float acc = c.shared ? gate * c.shared[static_cast<int64_t>(t) * c.D + d] : 0.f;
    for (int j = 0; j < c.k; ++j)
      if (s_row[j] >= 0) acc += s_w[j] * c.rows[static_cast<int64_t>(s_row[j]) * c.D + d];
    out[d] = from_f<T>(acc);
  }
}

struct Plan {
  int* counts; int* offsets; int* tile_offsets; int* idx; int* rank; float* w;
  int* row_token; int* slot_row; void* h; float* rows; void* hs; float* ys;
};

size_t carve(const ffnx_moe_params& p, char* base, Plan& pl) {
  const size_t T = p.num_tokens, TK = T * p.top_k, es = dtype_size(p.dtype);
  Carver c{base};
  pl.counts = c.take<int>(p.num_experts);
  pl.offsets = c.take<int>(p.num_experts + 1);
  pl.tile_offsets = c.take<int>(p.num_experts + 1);
  pl.idx = c.take<int>(TK);
  pl.rank = c.take<int>(TK);
  pl.w = c.take<float>(TK);
  pl.row_token = c.take<int>(TK);
  pl.slot_row = c.take<int>(TK);
  pl.h = c.take<char>(TK * p.inter * es);
  pl.rows = c.take<float>(TK * p.hidden);
  pl.hs = p.shared_inter > 0 ? c.take<char>(T * p.shared_inter * es) : nullptr;
  pl.ys = p.shared_inter > 0 ? c.take<float>(T * p.hidden) : nullptr;
  return c.size();
}

int validate(const ffnx_moe_params* p, const ffnx_moe_tensors* t) {
  if (!p || p->num_tokens < 0 || p->hidden <= 0 || p->inter <= 0 || p->num_experts <= 0 ||
      p->top_k <= 0 || p->top_k > p->num_experts || p->shared_inter < 0 || !dtype_valid(p->dtype) ||
      !act_valid(p->activation) || p->routing_mode < 0 || p->routing_mode > 1 || p->scoring < 0 ||
      p->scoring > 2)
    return FFNX_ERR_INVALID_ARGUMENT;
  if (p->num_experts > MAX_EXPERTS || p->top_k > MAX_TOP_K) return FFNX_ERR_UNSUPPORTED;
  const int64_t rows = p->num_tokens * p->top_k;
  if (rows > INT32_MAX / 2 || p->inter > INT32_MAX / 2 || p->hidden > INT32_MAX / 2)
    return FFNX_ERR_UNSUPPORTED;  // row/column indices are int32
  if (p->n_group < 0) return FFNX_ERR_INVALID_ARGUMENT;
  if (p->n_group > 1) {  // group-limited routing (schema group_error)
    const int64_t G = p->num_experts / p->n_group, tg = p->topk_group ? p->topk_group : p->n_group;
    if (p->routing_mode != FFNX_ROUTING_ROUTER || p->num_experts % p->n_group != 0 ||
        p->topk_group < 0 || tg > p->n_group || p->top_k > tg * G || p->group_scoring < 0 ||
        p->group_scoring > 1 || (p->group_scoring == FFNX_GROUP_TOP2_SUM && G < 2))
      return FFNX_ERR_INVALID_ARGUMENT;
    if (p->n_group > MAX_GROUPS) return FFNX_ERR_UNSUPPORTED;
  }
  if (!t) return FFNX_OK;
  const bool hash = p->routing_mode == FFNX_ROUTING_HASH;
  if (!t->hidden || !t->fc1_weight || !t->fc2_weight || !t->output ||
      (hash ? !t->token_ids || !t->hash_table : !t->router_logits) ||
      (p->has_fc1_bias && !t->fc1_bias) || (p->has_fc2_bias && !t->fc2_bias) ||
      (p->has_score_bias && !t->score_bias) ||
      (p->shared_inter > 0 && (!t->shared_fc1_weight || !t->shared_fc2_weight)) ||
      (p->has_shared_gate && !t->shared_gate_weight))
    return FFNX_ERR_INVALID_ARGUMENT;
  return FFNX_OK;
}

// fc1 then fc2 of one FFN family (routed experts: G = E groups; shared: one group of T rows).
int run_ffn(const ffnx_moe_params& p, int G, const int* a_rows, const int* offsets,
            const int* tile_offsets, int64_t rows, const void* x, const void* w1, const void* b1,
            const void* w2, const void* b2, int64_t inter, void* h, float* y, bool small, int bm,
            cudaStream_t s) {
  const bool gated = act_gated(p.activation);
  const int64_t D = p.hidden, H1 = gated ? 2 * inter : inter;
  GemmArgs f1;
  f1.A = x; f1.lda = D; f1.a_rows = a_rows;
  f1.B = w1; f1.b_gstride = H1 * D;
  f1.group_offsets = offsets; f1.tile_offsets = tile_offsets;
  f1.M = static_cast<int>(rows); f1.G = G; f1.N = static_cast<int>(inter); f1.K = static_cast<int>(D);
  f1.epi.mode = gated ? EPI_GATED : EPI_STORE;
  f1.epi.act = p.activation;
  f1.epi.alpha = p.activation_alpha; f1.epi.limit = p.activation_limit;
  f1.epi.bias = b1; f1.epi.bias_gstride = H1; f1.epi.up_offset = inter;
  f1.epi.out = h; f1.epi.ldo = inter;
  GemmArgs f2;
  f2.A = h; f2.lda = inter;
  f2.B = w2; f2.b_gstride = D * inter;
  f2.group_offsets = offsets; f2.tile_offsets = tile_offsets;
  f2.M = static_cast<int>(rows); f2.G = G; f2.N = static_cast<int>(D); f2.K = static_cast<int>(inter);
  f2.epi.bias = b2; f2.epi.bias_gstride = D;
  f2.epi.out = y; f2.epi.ldo = D; f2.epi.out_f32 = 1;
  if (small) {
    const int64_t max_rows = offsets ? p.num_tokens : rows;  // an expert gets each token once at most
    FFNX_TRY(launch_skinny(p.dtype, f1, max_rows, s));
    return launch_skinny(p.dtype, f2, max_rows, s);
  }
  const int tiles = ceil_div(rows, bm) + (offsets ? G : 0);
  FFNX_TRY(launch_gemm(p.dtype, f1, bm, tiles, s));
  return launch_gemm(p.dtype, f2, bm, tiles, s);
}

template <typename T> int launch_typed(const ffnx_moe_params& p, const ffnx_moe_tensors& t,
                                       const Plan& pl, cudaStream_t s) {
  const int T_ = static_cast<int>(p.num_tokens), E = static_cast<int>(p.num_experts);
  const int k = static_cast<int>(p.top_k), TK = T_ * k;
  const bool small = p.num_tokens <= SMALL_T;
  // Row tile: the tensor-core GEMM takes 128 rows when experts average that many, else 64.
  GemmArgs probe1, probe2;
  probe1.A = t.hidden; probe1.lda = p.hidden; probe1.B = t.fc1_weight; probe1.K = p.hidden;
  probe1.b_gstride = p.hidden;
  probe2.A = pl.h; probe2.lda = p.inter; probe2.B = t.fc2_weight; probe2.K = p.inter;
  probe2.b_gstride = p.inter;
  const bool tc = gemm_tensor_core_ok(p.dtype, probe1) && gemm_tensor_core_ok(p.dtype, probe2);
  const int bm = tc && TK / E >= 128 ? 128 : 64;

  if (cudaMemsetAsync(pl.counts, 0, sizeof(int) * E, s) != cudaSuccess) return FFNX_ERR_CUDA;
  // groups only where they restrict the choice (0 < topk_group < n_group)
  const bool grouped = p.n_group > 1 && p.topk_group > 0 && p.topk_group < p.n_group;
  const Route r{t.router_logits, p.has_score_bias ? t.score_bias : nullptr, t.token_ids,
                t.hash_table, T_, E, k, p.routing_mode, p.scoring, p.normalize,
                p.routed_scaling_factor, pl.idx, pl.w, pl.rank, pl.counts,
                grouped ? static_cast<int>(p.n_group) : 1, static_cast<int>(p.topk_group),
                static_cast<int>(p.group_scoring)};
  route_kernel<T><<<ceil_div(T_, 8), 256, 0, s>>>(r);
  FFNX_TRY(launch_status());
  const Permute pm{pl.idx, pl.rank, pl.counts, TK, E, k, bm, pl.offsets, pl.tile_offsets,
                   pl.row_token, pl.slot_row};
  permute_kernel<<<min(ceil_div(TK, 256), 1024), 256, 0, s>>>(pm);
  FFNX_TRY(launch_status());
  FFNX_TRY(run_ffn(p, E, pl.row_token, pl.offsets, pl.tile_offsets, TK, t.hidden, t.fc1_weight,
                   p.has_fc1_bias ? t.fc1_bias : nullptr, t.fc2_weight,
                   p.has_fc2_bias ? t.fc2_bias : nullptr, p.inter, pl.h, pl.rows, small, bm, s));
  if (p.shared_inter > 0) {
    const int sbm = tc && T_ >= 128 ? 128 : 64;
    FFNX_TRY(run_ffn(p, 1, nullptr, nullptr, nullptr, T_, t.hidden, t.shared_fc1_weight, nullptr,
                     t.shared_fc2_weight, nullptr, p.shared_inter, pl.hs, pl.ys, small, sbm, s));
  }
  const Combine c{pl.rows, pl.slot_row, pl.w, pl.ys, t.hidden,
                  p.has_shared_gate ? t.shared_gate_weight : nullptr, t.output, T_,
                  static_cast<int>(p.hidden), k};
  combine_kernel<T><<<T_, 256, 0, s>>>(c);
  return launch_status();
}

}  // namespace
}  // namespace ffnx

using namespace ffnx;

extern "C" size_t ffnx_moe_workspace_size(const ffnx_moe_params* p) {
  if (validate(p, nullptr) != FFNX_OK) return 0;
  Plan pl;
  return carve(*p, nullptr, pl);
}

extern "C" int ffnx_moe_launch(const ffnx_moe_params* p, const ffnx_moe_tensors* t, void* workspace,
                               size_t workspace_size, void* stream) {
  FFNX_TRY(validate(p, t));
  if (p->num_tokens == 0) return FFNX_OK;
  Plan pl;
  if (!workspace || workspace_size < carve(*p, nullptr, pl)) return FFNX_ERR_WORKSPACE_TOO_SMALL;
  carve(*p, static_cast<char*>(workspace), pl);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case FFNX_F32: return launch_typed<float>(*p, *t, pl, s);
    case FFNX_F16: return launch_typed<__half>(*p, *t, pl, s);
    default: return launch_typed<__nv_bfloat16>(*p, *t, pl, s);
  }
}
