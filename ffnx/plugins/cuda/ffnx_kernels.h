/* ffnx CUDA kernels: C ABI shared by the TensorRT plugins (ffnx/plugins/trt) and the ctypes tests.
 *
 * Semantics of every op are those of ffnx/plugins/schema.py (FfnxMoE, FfnxSparseFFN); tensor
 * layouts are the schema's (row-major, contiguous). All pointers are device pointers. No CUDA or
 * TensorRT header is needed to include this file: streams are passed as `void*` (cudaStream_t).
 *
 * Protocol: query the workspace size for the params, allocate it (device memory, 256-byte
 * aligned), then launch on a stream. Launches are asynchronous, never synchronise the device and
 * never allocate. Return value: FFNX_OK or an ffnx_status; ffnx_status_string() names it.
 */
#ifndef FFNX_KERNELS_H
#define FFNX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* What ffnx_kernels_abi_version() returns for a library built from this header.
 * 1: initial ABI. 2: ffnx_sparse_ffn_tensors.w_down_t and ffnx_sparse_ffn_pack_down().
 * 3: ffnx_moe_params.n_group, topk_group, group_scoring (group-limited routing).
 * 4: FFNX_ACT_CLAMPED_SWIGLU, ffnx_moe_params.activation_alpha / activation_limit (GPT-OSS). */
#define FFNX_KERNELS_ABI_VERSION 4

#if defined(_WIN32)
#define FFNX_API __declspec(dllexport)
#else
#define FFNX_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { FFNX_F32 = 0, FFNX_F16 = 1, FFNX_BF16 = 2 } ffnx_dtype;

typedef enum {
  FFNX_OK = 0,
  FFNX_ERR_INVALID_ARGUMENT = 1,
  FFNX_ERR_UNSUPPORTED = 2,
  FFNX_ERR_WORKSPACE_TOO_SMALL = 3,
  FFNX_ERR_CUDA = 4
} ffnx_status;

/* schema attribute strings map to these codes */
typedef enum { FFNX_ROUTING_ROUTER = 0, FFNX_ROUTING_HASH = 1 } ffnx_routing_mode;
typedef enum { FFNX_SCORING_SOFTMAX = 0, FFNX_SCORING_TOPK_SOFTMAX = 1, FFNX_SCORING_SIGMOID = 2 } ffnx_scoring;
typedef enum {
  FFNX_ACT_SWIGLU = 0, FFNX_ACT_GEGLU = 1, FFNX_ACT_REGLU = 2,
  FFNX_ACT_GELU = 3, FFNX_ACT_RELU = 4, FFNX_ACT_SILU = 5,
  /* ABI 4, FfnxMoE only: GPT-OSS's g = min(gate, limit), u = clamp(up, -limit, limit),
   * g * sigmoid(alpha * g) * (u + 1); alpha, limit from ffnx_moe_params */
  FFNX_ACT_CLAMPED_SWIGLU = 6
} ffnx_activation;
typedef enum { FFNX_GROUP_TOP2_SUM = 0, FFNX_GROUP_MAX = 1 } ffnx_group_scoring;
typedef enum { FFNX_SPARSE_THRESHOLD = 0, FFNX_SPARSE_TOPK = 1 } ffnx_sparse_mode;

/* ---- FfnxMoE --------------------------------------------------------------------------- */
typedef struct {
  int64_t num_tokens;   /* T: product of hidden's leading dims */
  int64_t hidden;       /* D */
  int64_t inter;        /* H: expert width (fc1 has 2H rows when the activation is gated) */
  int64_t num_experts;  /* E */
  int64_t top_k;        /* k */
  int64_t shared_inter; /* Hs: shared FFN width, 0 = no shared experts */
  int32_t routing_mode; /* ffnx_routing_mode */
  int32_t scoring;      /* ffnx_scoring */
  int32_t normalize;    /* 0/1 */
  int32_t activation;   /* ffnx_activation */
  float routed_scaling_factor;
  int32_t dtype;        /* ffnx_dtype of hidden, router_logits, weights and output */
  int32_t has_fc1_bias, has_fc2_bias, has_score_bias, has_shared_gate;
  /* ABI 3: group-limited routing (router mode; schema n_group, topk_group, group_scoring).
   * n_group 0 or 1 = no groups (a zero-initialised struct routes as before); topk_group 0 = all
   * groups; n_group <= 32. */
  int32_t n_group;
  int32_t topk_group;
  int32_t group_scoring; /* ffnx_group_scoring */
  /* ABI 4: FFNX_ACT_CLAMPED_SWIGLU's alpha and limit (schema activation_alpha /
   * activation_limit: 1.702 and 7.0 for GPT-OSS); read for that activation only. */
  float activation_alpha;
  float activation_limit;
} ffnx_moe_params;

typedef struct {
  const void* hidden;             /* [T, D] */
  const void* router_logits;      /* [T, E] (router mode) */
  const void* fc1_weight;         /* [E, H1, D] */
  const void* fc1_bias;           /* [E, H1] or NULL */
  const void* fc2_weight;         /* [E, D, H] */
  const void* fc2_bias;           /* [E, D] or NULL */
  const float* score_bias;        /* [E] or NULL (fp32 always) */
  const int64_t* token_ids;       /* [T] (hash mode) */
  const int64_t* hash_table;      /* [V, k] (hash mode) */
  const void* shared_fc1_weight;  /* [Hs1, D] or NULL */
  const void* shared_fc2_weight;  /* [D, Hs] or NULL */
  const void* shared_gate_weight; /* [1, D] or NULL */
  void* output;                   /* [T, D] */
} ffnx_moe_tensors;

FFNX_API size_t ffnx_moe_workspace_size(const ffnx_moe_params* p);
FFNX_API int ffnx_moe_launch(const ffnx_moe_params* p, const ffnx_moe_tensors* t, void* workspace,
                             size_t workspace_size, void* stream);

/* ---- FfnxSparseFFN --------------------------------------------------------------------- */
typedef struct {
  int64_t num_tokens; /* T */
  int64_t hidden;     /* D */
  int64_t inter;      /* H */
  int64_t k;          /* kept channels per token (topk mode) */
  int32_t gated;      /* 1 when w_gate is given */
  int32_t mode;       /* ffnx_sparse_mode */
  int32_t activation; /* ffnx_activation of the gate (gated) or of the up projection */
  int32_t dtype;      /* ffnx_dtype */
  int32_t has_b_up, has_b_down;
} ffnx_sparse_ffn_params;

typedef struct {
  const void* hidden;       /* [T, D] */
  const void* w_gate;       /* [H, D] or NULL */
  const void* w_up;         /* [H, D] */
  const void* b_up;         /* [H] or NULL */
  const void* w_down;       /* [D, H] */
  const void* b_down;       /* [D] or NULL */
  const float* thresholds;  /* [H] (threshold mode) */
  void* output;             /* [T, D] */
  /* ABI 2: [H, D], w_down transposed once by ffnx_sparse_ffn_pack_down (at weight load), or
   * NULL. With it a kept channel's down weights are one contiguous row, so the small-batch path
   * reads only the kept channels' bytes; without it that path reads w_down's columns in place
   * (correct, but at moderate sparsity nearly every 32-byte sector is still touched). */
  const void* w_down_t;
} ffnx_sparse_ffn_tensors;

FFNX_API size_t ffnx_sparse_ffn_workspace_size(const ffnx_sparse_ffn_params* p);
FFNX_API int ffnx_sparse_ffn_launch(const ffnx_sparse_ffn_params* p, const ffnx_sparse_ffn_tensors* t,
                                    void* workspace, size_t workspace_size, void* stream);
/* ABI 2: w_down_t[h, d] = w_down[d, h] (dtype p->dtype; reads p->hidden, p->inter, p->dtype). */
FFNX_API int ffnx_sparse_ffn_pack_down(const ffnx_sparse_ffn_params* p, const void* w_down,
                                       void* w_down_t, void* stream);

FFNX_API const char* ffnx_status_string(int status);
FFNX_API int ffnx_kernels_abi_version(void); /* bumped on any change to this header */

#ifdef __cplusplus
}
#endif
#endif /* FFNX_KERNELS_H */
