"""ffnx runtime: load an artifact and run it. Imports numpy only; onnxruntime/tensorrt lazily.

from ffnx.runtime import Engine
engine = Engine.load("artifacts/gpt-swiglu")
outputs = engine.run({"input_ids": ids})
"""

from ffnx.runtime.backends.base import Backend, TensorInfo
from ffnx.runtime.engine import Engine, random_inputs

__all__ = ["Backend", "Engine", "TensorInfo", "random_inputs"]
