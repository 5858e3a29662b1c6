"""Shared helpers for pass tests: build graphs, run one pass through the driver, compare."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ffnx.graph.ort import ort_session, run_session
from ffnx.lowering import runnable
from ffnx.passes import optimize

RTOL, ATOL = 1e-5, 1e-5  # fp32, relative to the output scale (see `assert_close`)
FP16_TOL = 1e-3


def model(text: str, inits: dict[str, np.ndarray] | None = None, opset: int = 18,
          infer: bool = True) -> onnx.ModelProto:  # fmt: skip
    """An onnx model from onnx text plus initializers; checked, shapes inferred (value_info)."""
    header = f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
    m = onnx.parser.parse_model(header + text)
    for name, v in (inits or {}).items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    onnx.checker.check_model(m)
    return onnx.shape_inference.infer_shapes(m) if infer else m


def rand(*shape, seed: int = 0, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed + len(shape)).uniform(lo, hi, shape).astype(np.float32)


def bn_params(c: int, seed: int = 0, prefix: str = "bn") -> dict[str, np.ndarray]:
    """Non-trivial BN parameters (var well away from 0)."""
    g = np.random.default_rng(seed)
    f = lambda lo, hi: g.uniform(lo, hi, c).astype(np.float32)
    return {
        f"{prefix}_g": f(0.5, 1.5),
        f"{prefix}_b": f(-0.5, 0.5),
        f"{prefix}_m": f(-1.0, 1.0),
        f"{prefix}_v": f(0.5, 2.0),
    }


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_session(ort_session(runnable(m)), feeds)


def feeds_of(*arrays) -> list[dict]:
    """One feed dict per array, for graphs whose single input is `x`."""
    return [{"x": a} for a in arrays]


def op_counts(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def apply(name: str, m: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **kw):
    """Run the driver with only pass `name`: (new model, its report)."""
    new, reports = optimize.optimize_model(m, feeds, passes=[name], **kw)
    return new, reports[0]


def assert_close(ref: dict, got: dict, rtol: float = RTOL, atol: float = ATOL) -> None:
    """|got - ref| <= atol·scale + rtol·|ref| per output, scale = max |ref| (at least 1);
    float16 outputs at least 1e-3 (one fp16 rounding of a folded weight)."""
    assert set(ref) == set(got)
    for k, r in ref.items():
        if r.dtype.kind not in "fc":
            np.testing.assert_array_equal(got[k], r, err_msg=k)
            continue
        scale = max(1.0, float(np.abs(r.astype(np.float64)).max())) if r.size else 1.0
        lo = FP16_TOL if r.dtype == np.float16 else 0.0
        rt, at = max(rtol, lo), max(atol, lo) * scale
        np.testing.assert_allclose(got[k], r, rtol=rt, atol=at, err_msg=k)


def check_applied(name, m, feeds, n_applied=None, rtol=RTOL, atol=ATOL, **kw):
    """Apply `name`, assert it applied (n_applied times), checker passes, outputs match."""
    new, rep = apply(name, m, feeds, **kw)
    assert rep["status"] == "applied", rep
    if n_applied is not None:
        assert rep["applied"] == n_applied, rep
    onnx.checker.check_model(new, full_check=True)
    for f in feeds:
        assert_close(run(m, f), run(new, f), rtol, atol)
    return new, rep


def check_unchanged(name, m, feeds, **kw) -> dict:
    """Apply `name`; assert nothing applied and the model is byte-identical."""
    before = m.SerializeToString()
    new, rep = apply(name, m, feeds, **kw)
    assert rep["applied"] == 0, rep
    assert new.SerializeToString() == before
    return rep


def skip_reasons(rep: dict) -> str:
    return " | ".join(s["reason"] for s in rep["skipped"])


def export(module, *args, dynamic: dict | None = None, names=("x",)) -> onnx.ModelProto:
    """torch -> onnx through ffnx's exporter (dynamo, opset 18), loaded back."""
    import torch

    from ffnx.export.torch_export import export_onnx
    from ffnx.models.spec import ModelSpec

    spec = ModelSpec("test", module.eval(), dict(zip(names, args)), dynamic or {})
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        path = export_onnx(spec, Path(d) / "m.onnx")
        return onnx.load(str(path))


def value_info(name: str, shape, elem=onnx.TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


# Small torch modules, exported once per test session ---------------------------------------


def randomize_norms(module, seed: int = 0) -> None:
    """Non-trivial BN running statistics and norm affines (the defaults fold to nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif type(m).__name__ not in ("LayerNorm", "RMSNorm"):
                continue
            w.copy_(torch.rand(w.shape, generator=g) + 0.5)
            if b is not None:
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)


def _catalogue() -> dict:
    """name -> (module factory, example input shape, dynamic axes of x)."""
    import torch
    from torch import nn

    from ffnx.models.attention import SelfAttention
    from ffnx.models.ffn import GatedFFN, Mlp, RePaFFN, StructuredFFN
    from ffnx.models.norms import RMSNorm, TokenBatchNorm

    class Seq(nn.Module):
        """x -> sum of `paths`, each a list of modules applied in order (x itself for [])."""

        def __init__(self, *paths, residual: bool = False):
            super().__init__()
            self.paths = nn.ModuleList(nn.Sequential(*p) for p in paths)
            self.residual = residual

        def forward(self, x):
            out = sum(p(x) for p in self.paths)
            return x + out if self.residual else out

    class LSTMHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 4)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.b2, self.c2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = self.c2(self.b2(h))
            return self.fc(h.mean((2, 3)))

    class Fan(nn.Module):
        """relu(a(h)) + b(h): two linears read h."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)

        def forward(self, h):
            return torch.relu(self.a(h)) + self.b(h)

    class QKV(nn.Module):
        """softmax(q(h) ⊙ k(h)) ⊙ v(h): three linears read h (attention's projections)."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))

        def forward(self, h):
            return (self.q(h) * self.k(h)).softmax(-1) * self.v(h)

    out = {
        "tbn_linear": (lambda: Seq([TokenBatchNorm(8), nn.Linear(8, 16)]), (2, 5, 8)),
        "tbn_fanout": (lambda: Seq([TokenBatchNorm(8), QKV()]), (2, 5, 8)),
        "tbn_shared_transpose": (
            lambda: Seq(*[[TokenBatchNorm(8), nn.Linear(8, 8)] for _ in "ab"]),
            (2, 5, 8),
        ),  # fmt: skip
        "repa_residual": (lambda: Seq([RePaFFN(8, 32)], residual=True), (2, 5, 8)),
        "repa_ln": (
            lambda: Seq([nn.LayerNorm(8), RePaFFN(8, 32, 0.5, "relu")], residual=True),
            (2, 5, 8),
        ),  # fmt: skip
        "ln_fanout": (lambda: Seq([nn.LayerNorm(8), Fan()]), (2, 5, 8)),
        "linear_sum": (
            lambda: Seq([nn.Linear(8, 8)], [nn.Linear(8, 8)], residual=True),
            (2, 5, 8),
        ),  # fmt: skip
        "rms_linear": (
            lambda: Seq([RMSNorm(8), nn.Linear(8, 8, bias=False)], residual=True),
            (2, 5, 8),
        ),  # fmt: skip
        "mlp": (lambda: Seq([nn.LayerNorm(8), Mlp(8, 32)], residual=True), (2, 5, 8)),
        "swiglu": (lambda: Seq([RMSNorm(8), GatedFFN(8, 24)], residual=True), (2, 5, 8)),
        "lowrank": (lambda: Seq([StructuredFFN(8, 32, "lowrank", 4)]), (2, 5, 8)),
        "attention": (
            lambda: Seq([nn.LayerNorm(8), SelfAttention(8, 2)], residual=True),
            (2, 5, 8),
        ),  # fmt: skip
        "lstm": (LSTMHead, (2, 5, 8)),
        "convnet": (ConvNet, (2, 3, 8, 8)),
    }
    assert tuple(out) == TORCH_MODELS
    return out


_EXPORTS: dict = {}
ROOT = Path(__file__).resolve().parents[2]


def _cache_dir() -> Path:
    """.pytest_cache/d/ffnx-exports/<key>: exports survive test runs until a source they
    depend on (these helpers, ffnx/models, the exporter) or torch/onnxscript changes."""
    import hashlib
    import importlib.metadata

    h = hashlib.sha1()
    for dist in ("torch", "onnxscript", "onnx"):
        h.update(importlib.metadata.version(dist).encode())
    files = [Path(__file__), ROOT / "ffnx/export/torch_export.py"]
    files += sorted((ROOT / "ffnx/models").glob("*.py"))
    for f in files:
        h.update(f.read_bytes())
    return ROOT / ".pytest_cache" / "d" / "ffnx-exports" / h.hexdigest()[:16]


def torch_model(name: str):
    """(onnx model, feeds at two batch sizes) for catalogue entry `name`, exported once."""
    if name in _EXPORTS:
        return _EXPORTS[name]
    path = _cache_dir() / f"{name}.onnx"
    feeds_path = path.with_suffix(".npz")
    if not (path.exists() and feeds_path.exists()):
        import torch

        factory, shape = _catalogue()[name]
        torch.manual_seed(0)
        module = factory()
        randomize_norms(module)
        x = torch.randn(*shape)
        m = export(module, x, dynamic={"x": {0: "batch"}})
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(feeds_path, x0=x.numpy(), x1=rand(3, *shape[1:], seed=9))
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(m.SerializeToString())
        tmp.replace(path)
    data = np.load(feeds_path)
    _EXPORTS[name] = (onnx.load(str(path)), [{"x": data["x0"]}, {"x": data["x1"]}])
    return _EXPORTS[name]


def zoo_model(name: str, size: str = "tiny"):
    """(plain export, the pipeline's sample feeds) of zoo model `name`, cached like
    `torch_model`."""
    key = f"zoo-{name}-{size}"
    if key in _EXPORTS:
        return _EXPORTS[key]
    path = _cache_dir() / f"{key}.onnx"
    feeds_path = path.with_suffix(".npz")
    if not (path.exists() and feeds_path.exists()):
        from ffnx.export.pipeline import sample_feeds
        from ffnx.export.torch_export import export_onnx
        from ffnx.models import zoo

        spec = zoo.build(name, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(spec, path.with_suffix(".tmp.onnx"))
        feeds = sample_feeds(spec)
        np.savez(feeds_path, **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
        path.with_suffix(".tmp.onnx").replace(path)
    data = np.load(feeds_path)
    feeds: list[dict] = []
    for key_ in data.files:
        i, k = key_.split("/", 1)
        while len(feeds) <= int(i):
            feeds.append({})
        feeds[int(i)][k] = data[key_]
    _EXPORTS[key] = (onnx.load(str(path)), feeds)
    return _EXPORTS[key]


TORCH_MODELS = ("tbn_linear", "tbn_fanout", "tbn_shared_transpose", "repa_residual", "repa_ln",
                "ln_fanout", "linear_sum", "rms_linear", "mlp", "swiglu", "lowrank", "attention",
                "lstm", "convnet")  # fmt: skip


def torch_models() -> list[str]:
    """Catalogue names (without importing torch: collection stays fast)."""
    return list(TORCH_MODELS)


def ort_kernels(m: onnx.ModelProto, tmp_path) -> Counter:
    """Op types of the graph ONNX Runtime runs after its own optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node)
