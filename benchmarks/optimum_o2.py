"""Optimum's ONNX export of a feature-extraction checkpoint + ONNX Runtime optimization level
O2 (CPU): the pipeline users run for sentence-transformers encoders. Standalone, so it can run
under another environment's python (optimum pins its own transformers; see
`benchmarks/realworld.py --optimum-python`):

    /work/optimum-venv/bin/python benchmarks/optimum_o2.py MODEL_DIR OUT_DIR

Writes OUT_DIR/model_optimized.onnx (and prints its path on the last line).
"""

from __future__ import annotations

import sys
from pathlib import Path


def optimum_o2(model_dir: str, out: str) -> Path:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    m = ORTModelForFeatureExtraction.from_pretrained(model_dir, export=True)
    opt = ORTOptimizer.from_pretrained(m)
    opt.optimize(save_dir=out, optimization_config=AutoOptimizationConfig.O2())
    return next(Path(out).glob("*optimized*.onnx"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: optimum_o2.py MODEL_DIR OUT_DIR")
    print(optimum_o2(sys.argv[1], sys.argv[2]))
