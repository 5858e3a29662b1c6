"""`TrtBackend`: run a TensorRT engine (model.plan) through the full `tensorrt` runtime or the
lean `tensorrt_lean` one (engines built version-compatible).

One execution context, one CUDA stream (ffnx.runtime.cuda, no torch/cupy), device buffers that
grow on demand. `run` is serialized by a lock. Feeds may be numpy arrays (copied to the GPU) or
CUDA arrays exposing `__dlpack__` (torch, cupy, jax: bound zero-copy; the producer is asked to
order its work before our stream). Outputs come back as numpy, or are written into CUDA arrays
passed as `out`. With `cuda_graph=True` the enqueue is captured once per (shapes, addresses)
and replayed. tensorrt, torch and onnx are not imported by this module.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import threading
from pathlib import Path

import numpy as np

import ffnx.runtime.backends.rtx_cache as rtx_cache
import ffnx.runtime.cuda as cuda
from ffnx import artifact
from ffnx.errors import ArtifactError, BackendError, InputError
from ffnx.runtime.backends.base import TensorInfo
from ffnx.runtime.plugin_library import PLUGIN_OPS, load_plugin_library

RUNTIMES = ("tensorrt", "tensorrt_lean")
RTX_RUNTIME = "tensorrt_rtx"
_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
    "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
}  # fmt: skip
_DL_DTYPES = {
    (2, 32): "float32", (2, 16): "float16", (4, 16): "bfloat16", (2, 64): "float64",
    (0, 8): "int8", (0, 32): "int32", (0, 64): "int64", (1, 8): "uint8", (6, 8): "bool",
}  # fmt: skip
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype, _capsule_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def cuda_view(x, stream: int) -> tuple[int, tuple[int, ...], str, object] | None:
    """(device pointer, shape, dtype, capsule to keep alive) of a CUDA DLPack array, else None.

    DLPack: the producer makes its pending work visible to `stream` before handing the data.
    """
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        return None
    if int(x.__dlpack_device__()[0]) not in (_DL_CUDA, _DL_CUDA_MANAGED):
        return None
    capsule = x.__dlpack__(stream=stream)
    t = _DLManagedTensor.from_address(_capsule_ptr(capsule, b"dltensor")).dl_tensor
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    dtype = _DL_DTYPES.get((t.dtype.code, t.dtype.bits)) if t.dtype.lanes == 1 else None
    if dtype is None:
        raise InputError(f"unsupported DLPack dtype (code {t.dtype.code}, bits {t.dtype.bits})")
    if t.strides:
        expect, acc = [], 1
        for n in reversed(shape):
            expect.insert(0, acc)
            acc *= n
        got = [int(t.strides[i]) for i in range(t.ndim)]
        if any(g != e for g, e, n in zip(got, expect, shape) if n > 1):
            raise InputError("CUDA arrays must be contiguous (call .contiguous() first)")
    return (t.data or 0) + t.byte_offset, shape, dtype, capsule


def import_runtime(flavour: str | None = None):
    """The runtime for a plan built by `flavour` (the manifest's tensorrt.flavour): "rtx" ->
    tensorrt_rtx; otherwise the full TensorRT module if installed, else the lean runtime. An
    import that fails for any reason (the pip stub without its libraries) counts as absent."""
    names = (RTX_RUNTIME,) if flavour == "rtx" else RUNTIMES
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
    if flavour == "rtx":
        raise BackendError("this plan was built by TensorRT-RTX: pip install 'ffnx[trt-rtx]' "
                           "(running it needs an RTX-class GPU)")  # fmt: skip
    raise BackendError(
        "TensorRT is not installed: pip install tensorrt (or tensorrt-lean for engines built "
        "with `ffnx build --version-compatible`)"
    )


def _np_dtype(name: str) -> np.dtype:
    """numpy dtype of an engine tensor; bfloat16 via ml_dtypes when present, else raw uint16."""
    try:
        return np.dtype(name)
    except TypeError:
        try:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, name))
        except (ImportError, AttributeError):
            return np.dtype(np.uint16)


def _sibling_manifest(plan: Path) -> dict:
    path = plan.parent / artifact.MANIFEST
    if plan.name != artifact.PLAN or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


class TrtBackend:
    """A deserialized engine with one execution context; thread-safe `run`."""

    name = "trt"

    def __init__(self, trt, engine, manifest: dict, cuda_graph: bool, path: str):
        self.trt, self.engine, self.path = trt, engine, path
        # TensorRT-RTX: the kernels it compiles on the GPU are kept between loads (rtx_cache)
        self.runtime_cache = rtx_cache.open_for(trt, engine, Path(path), manifest)
        rc = self.runtime_cache
        self.context = (engine.create_execution_context(rc.config) if rc
                        else engine.create_execution_context())  # fmt: skip
        if self.context is None:
            raise BackendError(f"cannot create a TensorRT execution context for {path}")
        self.stream = cuda.Stream()
        self.cuda_graph = cuda_graph
        self._lock = threading.Lock()
        self._buffers: dict[str, cuda.DeviceBuffer] = {}
        self._graph: tuple[tuple, cuda.GraphExec] | None = None
        self._runtime = None  # set by load(): the engine must not outlive its runtime
        declared = {
            d["name"]: d["shape"] for k in ("inputs", "outputs") for d in manifest.get(k, [])
        }
        self.inputs, self.outputs = [], []
        n_profiles = max(int(getattr(engine, "num_optimization_profiles", 1) or 1), 1)
        self._profiles: list[dict] = [{} for _ in range(n_profiles)]  # name -> (lo, hi)
        self._profile = 0  # the context's current optimization profile
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            info = self._info(name, declared.get(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(info)
                if -1 in tuple(engine.get_tensor_shape(name)):
                    for k, bounds in enumerate(self._profiles):
                        lo, _, hi = engine.get_tensor_profile_shape(name, k)
                        bounds[name] = (tuple(lo), tuple(hi))
            else:
                self.outputs.append(info)
        self._bounds = self._profiles[0]

    def _info(self, name: str, declared: list | None) -> TensorInfo:
        dt = self.engine.get_tensor_dtype(name)
        dtype = _DTYPES.get(getattr(dt, "name", str(dt).split(".")[-1]), str(dt))
        shape = tuple(self.engine.get_tensor_shape(name))
        if declared is not None and len(declared) == len(shape):
            dims = tuple(lbl if d < 0 else d for d, lbl in zip(shape, declared))
        else:
            dims = tuple(f"{name}.{a}" if d < 0 else d for a, d in enumerate(shape))
        return TensorInfo(name, dtype, dims)

    @classmethod
    def load(
        cls, path: str, plugin_library: str | None = None, cuda_graph: bool = False
    ) -> TrtBackend:
        """Deserialize `path`. The ffnx plugin library is loaded first when given, or when the
        artifact's manifest lists plugins; its path is data: the argument, $FFNX_PLUGIN_LIBRARY,
        or the one the build recorded in the manifest."""
        p = Path(path)
        if not p.is_file():
            raise ArtifactError(f"{p} does not exist")
        manifest = _sibling_manifest(p)
        section = manifest.get("tensorrt", {})
        trt = import_runtime(section.get("flavour"))
        if plugin_library or manifest.get("plugins") or section.get("plugin_library"):
            library = (plugin_library or os.environ.get("FFNX_PLUGIN_LIBRARY")
                       or section.get("plugin_library"))  # fmt: skip
            if not library:
                raise BackendError(
                    f"{p} needs the ffnx TensorRT plugins and no library is named: pass "
                    "plugin_library=, set FFNX_PLUGIN_LIBRARY or rebuild with `ffnx build`"
                )
            ops = manifest.get("plugins") or list(PLUGIN_OPS)
            load_plugin_library(trt, library, ops)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if section.get("version_compatible"):
            runtime.engine_host_code_allowed = True  # the plan embeds its lean runtime
        engine = runtime.deserialize_cuda_engine(p.read_bytes())
        if engine is None:
            built = f" (built with TensorRT {section['version']} on {section.get('gpu')})"
            raise BackendError(
                f"TensorRT {trt.__version__} cannot deserialize {p}"
                + (built if section.get("version") else "")
                + ": rebuild it on this machine with `ffnx build`"
            )
        backend = cls(trt, engine, manifest, cuda_graph, str(p))
        backend._runtime = runtime
        return backend

    def _buffer(self, name: str, nbytes: int) -> int:
        return self._buffers.setdefault(name, cuda.DeviceBuffer()).ensure(max(nbytes, 1))

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Switch the context to the first optimization profile whose ranges hold `shapes`
        (the current one when it does); profile 0's bounds error when none does."""

        def fits(bounds: dict) -> bool:
            for name, shape in shapes.items():
                lo, hi = bounds.get(name, (shape, shape))
                if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                    return False
            return True

        order = [self._profile] + [k for k in range(len(self._profiles)) if k != self._profile]
        k = next((k for k in order if fits(self._profiles[k])), self._profile)
        if k != self._profile:
            if not self.context.set_optimization_profile_async(k, self.stream.handle):
                raise BackendError(f"TensorRT refused to switch to optimization profile {k}")
            self._profile = k
        self._bounds = self._profiles[k]

    def _bind_inputs(self, feeds: dict) -> list:
        keep, staged = [], []
        for info in self.inputs:
            if info.name not in feeds:
                raise InputError(f"missing input {info.name!r} ({info.describe()})")
            x = feeds[info.name]
            view = cuda_view(x, self.stream.handle)
            if view is None:
                host = np.ascontiguousarray(x)
                ptr, shape, dtype = 0, host.shape, host.dtype.name
            else:
                host = None
                ptr, shape, dtype, capsule = view
                keep.append(capsule)
            if dtype != info.dtype:
                raise InputError(f"input {info.name!r} is {dtype}, the engine takes {info.dtype}")
            staged.append((info, view, host, ptr, tuple(shape)))
        if len(self._profiles) > 1:
            self._select_profile({info.name: shape for info, _, _, _, shape in staged})
        for info, view, host, ptr, shape in staged:
            self._check_bounds(info.name, tuple(shape))
            if not self.context.set_input_shape(info.name, tuple(shape)):
                raise InputError(f"input {info.name!r}: TensorRT rejected shape {tuple(shape)}")
            if view is None:
                ptr = self._buffer(info.name, host.nbytes)
                cuda.memcpy_async(ptr, host.ctypes.data, host.nbytes, cuda.H2D, self.stream.handle)
                keep.append(host)
            self.context.set_tensor_address(info.name, ptr)
        return keep

    def _check_bounds(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self._bounds:
            return
        lo, hi = self._bounds[name]
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise InputError(
                f"input {name!r} shape {shape} is outside the engine's profile {lo}..{hi}"
                + (f" (and its other {len(self._profiles) - 1})" if len(self._profiles) > 1 else "")
                + "; rebuild with `ffnx build --profile LABEL:min,opt,max`"
            )

    def _bind_outputs(self, out: dict | None) -> dict[str, np.ndarray]:
        """Bind every output; returns the host arrays to fill (outputs not given in `out`)."""
        host = {}
        for info in self.outputs:
            shape = tuple(self.context.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output {info.name!r} has a data-dependent shape {shape}")
            view = (
                cuda_view(out[info.name], self.stream.handle) if out and info.name in out else None
            )
            if view is not None:
                ptr, got, dtype, _ = view
                if tuple(got) != shape or dtype != info.dtype:
                    raise InputError(f"out[{info.name!r}] must be {info.dtype}{list(shape)}")
            else:
                host[info.name] = np.empty(shape, dtype=_np_dtype(info.dtype))
                ptr = self._buffer(info.name, host[info.name].nbytes)
            self.context.set_tensor_address(info.name, ptr)
        return host

    def _enqueue(self) -> None:
        handle = self.stream.handle
        if not self.cuda_graph:
            if not self.context.execute_async_v3(handle):
                raise BackendError("TensorRT enqueue failed (see the TensorRT log)")
            return
        key = tuple(
            (tuple(self.context.get_tensor_shape(n)), self.context.get_tensor_address(n))
            for n in [i.name for i in self.inputs + self.outputs]
        )
        if self._graph is not None and self._graph[0] == key:
            self._graph[1].launch(self.stream)
            return
        if not self.context.execute_async_v3(handle):  # also lets TensorRT settle shapes
            raise BackendError("TensorRT enqueue failed (see the TensorRT log)")

        def capture():
            if not self.context.execute_async_v3(handle):
                raise cuda.CudaError("TensorRT enqueue failed during CUDA graph capture")

        try:
            graph = cuda.GraphExec(self.stream, capture)
        except cuda.CudaError:
            self.cuda_graph = False  # this engine cannot be captured; run it eagerly
            return
        if self._graph is not None:
            self._graph[1].close()
        self._graph = (key, graph)

    def run(self, feeds: dict, out: dict | None = None) -> dict:
        """Outputs by name: numpy arrays, or the CUDA arrays given in `out` (filled in place)."""
        with self._lock:
            keep = self._bind_inputs(feeds)
            host = self._bind_outputs(out)
            self._enqueue()
            for name, arr in host.items():
                cuda.memcpy_async(
                    arr.ctypes.data,
                    self._buffers[name].ptr,
                    arr.nbytes,
                    cuda.D2H,
                    self.stream.handle,
                )
            self.stream.synchronize()
            del keep
            return {o.name: host[o.name] if o.name in host else out[o.name] for o in self.outputs}

    def time_gpu(self, feeds: dict, iters: int = 100, warmup: int = 10) -> list[float]:
        """Per-iteration GPU time (ms, CUDA events around each enqueue) at the feeds' shapes."""
        with self._lock:
            keep = self._bind_inputs(feeds)
            self._bind_outputs(None)
            for _ in range(warmup):
                self._enqueue()
            events = [(cuda.Event(), cuda.Event()) for _ in range(iters)]
            for start, end in events:
                start.record(self.stream)
                self._enqueue()
                end.record(self.stream)
            self.stream.synchronize()
            del keep
            return [end.elapsed_ms(start) for start, end in events]

    def close(self) -> None:
        with self._lock:
            if self._graph is not None:
                self._graph[1].close()
                self._graph = None
            for buf in self._buffers.values():
                buf.close()
            self._buffers.clear()
            if self.runtime_cache is not None and self.context is not None:
                self.runtime_cache.save()
            self.context = None
            self.stream.close()
