"""TrtBackend keeps TensorRT-RTX's runtime cache (the kernels it compiles on the GPU) between
loads: read at load, attached through an IRuntimeConfig, written back at close. A stand-in
engine (running a TensorRT-RTX plan needs an RTX-class GPU); the cache file is real."""

from __future__ import annotations

import types

import pytest

from ffnx.runtime.backends import rtx_cache
from ffnx.runtime.backends import trt as trt_backend


class _Cache:
    def __init__(self, log):
        self.log, self.data = log, b""

    def deserialize(self, blob):
        ok = blob.startswith(b"RTX")  # a blob from another GPU/driver is refused
        if ok:
            self.data = bytes(blob)
        self.log.append(("deserialize", ok))
        return ok

    def serialize(self):
        return self.data + b"+kernel"


def _engine(log):
    cache = _Cache(log)
    config = types.SimpleNamespace(
        create_runtime_cache=lambda: cache, set_runtime_cache=lambda c: log.append("set") or True
    )

    def context(cfg=None):
        log.append(("context", cfg is config))
        return types.SimpleNamespace()

    return types.SimpleNamespace(num_io_tensors=0, num_optimization_profiles=1,
                                 create_runtime_config=lambda: config,
                                 create_execution_context=context)  # fmt: skip


@pytest.fixture
def backend(monkeypatch, tmp_path):
    monkeypatch.setenv("FFNX_RUNTIME_CACHE_DIR", str(tmp_path / "rc"))
    monkeypatch.setattr(trt_backend.cuda, "Stream", lambda: types.SimpleNamespace(close=lambda: 0))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan")
    manifest = {"files": {"model.plan": "ab" * 32}}

    def make(name="tensorrt_rtx"):
        log = []
        trt = types.SimpleNamespace(__name__=name, TensorIOMode=types.SimpleNamespace(INPUT=0))
        return trt_backend.TrtBackend(trt, _engine(log), manifest, False, str(plan)), log

    return make, tmp_path / "rc" / f"{'ab' * 16}.cache"


def test_rtx_runtime_cache_is_written_at_close_and_read_at_the_next_load(backend):
    make, path = backend
    first, log = make()
    assert ("context", True) in log and first.runtime_cache.loaded == 0  # none yet
    first.close()
    assert path.read_bytes() == b"+kernel"
    path.write_bytes(b"RTX" + path.read_bytes())  # as a compatible GPU would have written it
    second, log = make()
    assert ("deserialize", True) in log and second.runtime_cache.loaded == len(b"RTX+kernel")
    second.close()
    assert path.read_bytes() == b"RTX+kernel+kernel"


def test_incompatible_runtime_cache_starts_empty(backend):
    make, path = backend
    path.parent.mkdir(parents=True)
    path.write_bytes(b"from another GPU")
    b, log = make()
    assert ("deserialize", False) in log and b.runtime_cache.loaded == 0


def test_enterprise_engines_get_no_runtime_cache(backend):
    make, path = backend
    b, log = make("tensorrt")
    assert b.runtime_cache is None and log == [("context", False)]
    b.close()
    assert not path.exists()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FFNX_RUNTIME_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert rtx_cache.cache_dir() == tmp_path / "ffnx" / "runtime-cache"
