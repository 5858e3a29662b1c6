"""Torch reference modules and the model zoo.

- `ffn`: Mlp, GatedFFN (SwiGLU/GEGLU/ReGLU/bilinear), StructuredFFN, RePaFFN
- `norms`: RMSNorm, TokenBatchNorm, make_norm
- `attention`: SelfAttention (plain q/k/v/o MatMul + Softmax)
- `moe`: TopKMoE, DuoMoE, HashMoE (routing semantics in attributes, per `plugins.schema.MOE`)
- `blocks`: Block (pre/post/peri/parallel), GPT, BERT, ViT
- `zoo`: build(name, size) -> ModelSpec, names(), describe()
- `spec`: ModelSpec; `user`: resolve zoo names, user factories and `hf:` models

Nothing is imported here, so `import ffnx.models.spec` stays cheap.
"""
