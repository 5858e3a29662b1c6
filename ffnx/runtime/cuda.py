"""A minimal ctypes binding to the CUDA runtime (libcudart): memory, copies, streams, events,
graph capture. Enough for TrtBackend and the builder's device queries, with no torch, cupy or
cuda-python import (in the spirit of Polygraphy's `polygraphy/cuda/cuda.py`).

libcudart is looked up in: $FFNX_CUDART, the loader path, the `nvidia-cuda-runtime` wheels
(`nvidia/cuda_runtime/lib`, `nvidia/cu13/lib`), then /usr/local/cuda/lib64. Every call checks
its status and raises CudaError (a BackendError) naming the call and CUDA's message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading

import numpy as np

from ffnx.errors import BackendError

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
STREAM_NON_BLOCKING = 1
CAPTURE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor
_P, _S, _I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int

_SIGNATURES = {
    "cudaGetErrorString": ([_I], ctypes.c_char_p),
    "cudaGetDeviceCount": ([ctypes.POINTER(_I)], _I),
    "cudaGetDevice": ([ctypes.POINTER(_I)], _I),
    "cudaSetDevice": ([_I], _I),
    "cudaDeviceGetAttribute": ([ctypes.POINTER(_I), _I, _I], _I),
    "cudaRuntimeGetVersion": ([ctypes.POINTER(_I)], _I),
    "cudaMalloc": ([ctypes.POINTER(_P), _S], _I),
    "cudaFree": ([_P], _I),
    "cudaMemcpy": ([_P, _P, _S, _I], _I),
    "cudaMemcpyAsync": ([_P, _P, _S, _I, _P], _I),
    "cudaMemsetAsync": ([_P, _I, _S, _P], _I),
    "cudaStreamCreateWithFlags": ([ctypes.POINTER(_P), ctypes.c_uint], _I),
    "cudaStreamDestroy": ([_P], _I),
    "cudaStreamSynchronize": ([_P], _I),
    "cudaEventCreate": ([ctypes.POINTER(_P)], _I),
    "cudaEventDestroy": ([_P], _I),
    "cudaEventRecord": ([_P, _P], _I),
    "cudaEventSynchronize": ([_P], _I),
    "cudaEventElapsedTime": ([ctypes.POINTER(ctypes.c_float), _P, _P], _I),
    "cudaStreamBeginCapture": ([_P, _I], _I),
    "cudaStreamEndCapture": ([_P, ctypes.POINTER(_P)], _I),
    "cudaGraphInstantiateWithFlags": ([ctypes.POINTER(_P), _P, ctypes.c_ulonglong], _I),
    "cudaGraphLaunch": ([_P, _P], _I),
    "cudaGraphDestroy": ([_P], _I),
    "cudaGraphExecDestroy": ([_P], _I),
}


class CudaError(BackendError):
    """A CUDA runtime call failed or libcudart is missing."""


_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def _candidates() -> list[str]:
    names = [os.environ.get("FFNX_CUDART", "")]
    found = ctypes.util.find_library("cudart")
    names += [found or "", "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for base in sys.path:
        for sub in ("nvidia/cuda_runtime/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            names += sorted(glob.glob(os.path.join(base, sub, "libcudart.so*")), reverse=True)
    names += sorted(glob.glob("/usr/local/cuda/lib64/libcudart.so*"), reverse=True)
    return [n for n in names if n]


def lib() -> ctypes.CDLL:
    """The loaded libcudart, with argument types set (loaded once)."""
    global _lib
    with _lock:
        if _lib is None:
            errors = []
            for name in _candidates():
                try:
                    cand = ctypes.CDLL(name)
                except OSError as e:
                    errors.append(str(e))
                    continue
                for fn, (args, res) in _SIGNATURES.items():
                    getattr(cand, fn).argtypes, getattr(cand, fn).restype = args, res
                _lib = cand
                break
            else:
                raise CudaError(
                    "the CUDA runtime (libcudart) was not found: install the CUDA toolkit or "
                    "`pip install nvidia-cuda-runtime`, or set FFNX_CUDART=/path/libcudart.so"
                )
        return _lib


def check(status: int, what: str) -> None:
    if status != 0:
        msg = lib().cudaGetErrorString(status)
        raise CudaError(f"{what} failed: {msg.decode() if msg else f'CUDA error {status}'}")


def device_count() -> int:
    """Visible GPUs; 0 when libcudart, the driver or a device is missing."""
    try:
        n = _I()
        return n.value if lib().cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0
    except CudaError:
        return 0


def current_device() -> int:
    d = _I()
    check(lib().cudaGetDevice(ctypes.byref(d)), "cudaGetDevice")
    return d.value


def compute_capability(device: int | None = None) -> tuple[int, int]:
    device = current_device() if device is None else device
    major, minor = _I(), _I()
    check(lib().cudaDeviceGetAttribute(ctypes.byref(major), ATTR_CC_MAJOR, device), "attr")
    check(lib().cudaDeviceGetAttribute(ctypes.byref(minor), ATTR_CC_MINOR, device), "attr")
    return major.value, minor.value


def device_name(device: int | None = None) -> str:
    """cudaDeviceProp.name: the struct's first field (char[256]) in every CUDA version."""
    device = current_device() if device is None else device
    buf = ctypes.create_string_buffer(16384)  # larger than any cudaDeviceProp
    cudart = lib()
    fn = getattr(cudart, "cudaGetDeviceProperties_v2", None) or cudart.cudaGetDeviceProperties
    fn.argtypes, fn.restype = [_P, _I], _I
    check(fn(buf, device), "cudaGetDeviceProperties")
    return buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace")


def malloc(nbytes: int) -> int:
    p = _P()
    check(lib().cudaMalloc(ctypes.byref(p), max(int(nbytes), 1)), f"cudaMalloc({nbytes})")
    return p.value


def free(ptr: int) -> None:
    if ptr:
        check(lib().cudaFree(_P(ptr)), "cudaFree")


def memcpy_async(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
    status = lib().cudaMemcpyAsync(_P(dst), _P(src), int(nbytes), kind, _P(stream))
    check(status, "cudaMemcpyAsync")


class Stream:
    """A non-blocking CUDA stream (never the legacy default stream)."""

    def __init__(self):
        s = _P()
        check(lib().cudaStreamCreateWithFlags(ctypes.byref(s), STREAM_NON_BLOCKING), "stream")
        self.handle: int = s.value

    def synchronize(self) -> None:
        check(lib().cudaStreamSynchronize(_P(self.handle)), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle:
            lib().cudaStreamDestroy(_P(self.handle))
            self.handle = 0

    def __del__(self):
        if _lib is not None and getattr(self, "handle", 0):
            self.close()


class Event:
    def __init__(self):
        e = _P()
        check(lib().cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        self.handle: int = e.value

    def record(self, stream: Stream) -> None:
        check(lib().cudaEventRecord(_P(self.handle), _P(stream.handle)), "cudaEventRecord")

    def synchronize(self) -> None:
        check(lib().cudaEventSynchronize(_P(self.handle)), "cudaEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded and complete)."""
        ms = ctypes.c_float()
        check(
            lib().cudaEventElapsedTime(ctypes.byref(ms), _P(start.handle), _P(self.handle)),
            "cudaEventElapsedTime",
        )
        return ms.value

    def close(self) -> None:
        if self.handle:
            lib().cudaEventDestroy(_P(self.handle))
            self.handle = 0

    def __del__(self):
        if _lib is not None and getattr(self, "handle", 0):
            self.close()


class DeviceBuffer:
    """Device memory that grows on demand (never shrinks), with host copies on a stream."""

    def __init__(self, nbytes: int = 0):
        self.ptr, self.nbytes = 0, 0
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.close()
            self.ptr, self.nbytes = malloc(nbytes), int(nbytes)
        return self.ptr

    def copy_from(self, host: np.ndarray, stream: Stream) -> None:
        host = np.ascontiguousarray(host)
        self.ensure(host.nbytes)
        memcpy_async(self.ptr, host.ctypes.data, host.nbytes, H2D, stream.handle)

    def copy_to(self, host: np.ndarray, stream: Stream) -> np.ndarray:
        if not host.flags.c_contiguous or host.nbytes > self.nbytes:
            raise CudaError(f"copy_to: host array of {host.nbytes} bytes does not fit")
        memcpy_async(host.ctypes.data, self.ptr, host.nbytes, D2H, stream.handle)
        return host

    def close(self) -> None:
        if self.ptr:
            free(self.ptr)
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        if _lib is not None and getattr(self, "ptr", 0):
            try:
                self.close()
            except CudaError:
                pass  # interpreter teardown: the context may already be gone


class GraphExec:
    """A CUDA graph captured from the work `fn` enqueues on `stream`, ready to relaunch."""

    def __init__(self, stream: Stream, fn):
        cudart = lib()
        check(cudart.cudaStreamBeginCapture(_P(stream.handle), CAPTURE_THREAD_LOCAL), "capture")
        graph = _P()
        try:
            fn()
        finally:
            status = cudart.cudaStreamEndCapture(_P(stream.handle), ctypes.byref(graph))
        check(status, "cudaStreamEndCapture")
        exe = _P()
        try:
            check(cudart.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, 0), "instantiate")
        finally:
            cudart.cudaGraphDestroy(graph)
        self.handle: int = exe.value

    def launch(self, stream: Stream) -> None:
        check(lib().cudaGraphLaunch(_P(self.handle), _P(stream.handle)), "cudaGraphLaunch")

    def close(self) -> None:
        if self.handle:
            lib().cudaGraphExecDestroy(_P(self.handle))
            self.handle = 0

    def __del__(self):
        if _lib is not None and getattr(self, "handle", 0):
            self.close()
