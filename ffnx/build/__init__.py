"""TensorRT engines from ffnx artifacts.

- `trt_graph_check`: what TensorRT's ONNX parser would refuse, before it runs.
- `precision`: fp16 graph conversion (TensorRT 11 builds strongly typed networks only).
- `profiles`: optimization profiles from the manifest's dynamic dims and `--profile` overrides.
- `engine.build_engine`: artifact -> model.plan + the manifest's "tensorrt" section.

Nothing here imports tensorrt at module import time.
"""

from ffnx.build.engine import PRECISIONS, build_engine, precision_plan

__all__ = ["PRECISIONS", "build_engine", "precision_plan"]
