"""`build_engine`: an exported artifact -> `model.plan` (a TensorRT engine) + the manifest's
"tensorrt" section.

Steps: load model.trt.onnx (else model.opt.onnx, model.onnx); fill empty plugin inputs and
check the graph (trt_graph_check); choose precision handling by TensorRT major; load the ffnx
plugin library when the graph has ffnx nodes (refused when it has no code for a build target);
parse (parser_check.parse_network) and record the network's plugin layers (plan_layers); the
optimization profiles over the dynamic dims (profiles.py: profile 0 plus --add-profile ones);
the timing cache (timing_cache.py); build; write model.plan atomically, then the manifest
(always last).

Precision by TensorRT major (`precision_plan`):
- 10.x (e.g. JetPack 6's 10.3) builds weakly typed networks: fp16/int8/fp8 are builder flags
  and TensorRT picks per-layer precision. int8 without Q/DQ nodes needs calibration batches
  (`calib`), fed through IInt8EntropyCalibrator2.
- 11.x builds strongly typed networks only (BuilderFlag.FP16/INT8 and the calibrators are
  gone): fp16 means converting the graph to fp16 first (precision.py, norms/softmax/reductions
  kept fp32); int8/fp8 need a graph with Q/DQ nodes.
TensorRT is imported inside the functions that need it; importing this module does not.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ffnx.build.flavour as flavour_mod
import ffnx.build.plan_layers as plan_layers
import ffnx.build.timing_cache as tc
from ffnx import artifact
from ffnx.build.profiles import DimRange, add_profiles, input_shapes, profile_sets
from ffnx.errors import BackendError, PassError

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
Progress = Callable[[str, int, int], None]  # (phase, step, steps)
_FATAL = ("ScatterND", "NonZero", "plugin_", "required input", "empty name", "ffnx op")


@dataclass(frozen=True)
class PrecisionPlan:
    flags: tuple[str, ...] = ()  # trt.BuilderFlag names to set (TensorRT 10.x)
    convert_fp16: bool = False  # rewrite the graph to fp16 before parsing (TensorRT 11.x)
    calibrate: bool = False  # attach an int8 entropy calibrator (10.x, no Q/DQ)


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def precision_plan(major: int, precision: str, has_qdq: bool, has_calib: bool) -> PrecisionPlan:
    """How `precision` is obtained on TensorRT `major` (see the module doc)."""
    if precision not in PRECISIONS:
        raise PassError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return PrecisionPlan()
    if precision == "fp16":
        return PrecisionPlan(flags=("FP16",)) if major < 11 else PrecisionPlan(convert_fp16=True)
    flag = "INT8" if precision == "int8" else "FP8"
    if has_qdq:
        return PrecisionPlan(flags=(flag, "FP16")) if major < 11 else PrecisionPlan()
    if precision == "int8" and major < 11 and has_calib:
        return PrecisionPlan(flags=("INT8", "FP16"), calibrate=True)
    if major >= 11:
        raise PassError(
            f"{precision} on TensorRT {major}.x needs a graph with Q/DQ nodes: TensorRT 11 "
            "builds strongly typed networks and has no calibrator; quantize the ONNX first "
            "(e.g. NVIDIA ModelOpt) or build int8 on TensorRT 10.x with --data"
        )
    if precision == "fp8":
        raise PassError("fp8 needs a graph with Q/DQ nodes (TensorRT has no fp8 calibrator)")
    raise PassError(
        "int8 needs calibration data: pass --data FILE.npz (input arrays by name, or name_0, "
        "name_1, ... one batch each) or a graph with Q/DQ nodes"
    )


def import_tensorrt(flavour: str = "auto"):
    """Enterprise `tensorrt` or `tensorrt_rtx` (see ffnx.build.flavour)."""
    return flavour_mod.import_tensorrt(flavour)


def load_calibration(calib) -> list[dict[str, np.ndarray]]:
    """Calibration batches: a list of feed dicts, an .npz (one batch) or a dir of .npz files."""
    if calib is None:
        return []
    if not isinstance(calib, (str, Path)):
        return [dict(b) for b in calib]
    p = Path(calib)
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise PassError(f"--calib {p}: no .npz calibration batches found")
    return [dict(np.load(f)) for f in files]


def _prepare_graph(onnx_path: Path, plan: PrecisionPlan, work: Path) -> tuple[Path, bool, list]:
    """The ONNX file to parse (plugin inputs filled, maybe fp16) + has-ffnx + warnings."""
    import onnx

    from ffnx.build.precision import convert_to_fp16
    from ffnx.build.trt_graph_check import (
        check_graph,
        has_ffnx_nodes,
        materialize_optional_inputs,
    )
    from ffnx.graph.model_io import save_model

    model = onnx.load(str(onnx_path))  # external data next to the file is loaded too
    materialize_optional_inputs(model)
    problems = check_graph(model)
    fatal = [p for p in problems if any(k in p for k in _FATAL)]
    if fatal:
        raise BackendError(
            f"{onnx_path.name} cannot be parsed by TensorRT: {'; '.join(fatal[:5])}"
            + (f" (+{len(fatal) - 5} more)" if len(fatal) > 5 else "")
        )
    if plan.convert_fp16:
        model = convert_to_fp16(model)
    out = work / "model.trt.onnx"
    save_model(model, out)  # past 2 GiB with model.trt.onnx.data beside it
    return out, has_ffnx_nodes(model), problems


def _parse(trt, network, logger, path: Path, warnings: list[str]) -> None:
    from ffnx.build.parser_check import parse_network

    hint = f"ffnx's check also found: {'; '.join(warnings[:3])}" if warnings else ""
    parse_network(trt, network, logger, path, hint)


def _monitor(trt, progress: Progress | None):
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            progress(phase_name, step + 1, self.steps.get(phase_name, 0))
            return True

        def phase_finish(self, phase_name):
            n = self.steps.pop(phase_name, 0)
            progress(phase_name, n, n)

    return Monitor()


def _logger(trt):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())

    return Logger()


def _calibrator(trt, batches: list[dict[str, np.ndarray]], cache: Path | None):
    from ffnx.runtime import cuda

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.buffers, self.stream = iter(batches), {}, cuda.Stream()

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            feeds = next(self.batches, None)
            if feeds is None:
                return None
            for n in names:
                self.buffers.setdefault(n, cuda.DeviceBuffer()).copy_from(feeds[n], self.stream)
            self.stream.synchronize()
            return [self.buffers[n].ptr for n in names]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache and cache.exists() else None

        def write_calibration_cache(self, data):
            if cache:
                artifact.write_bytes_atomic(cache, bytes(data))

    return Calibrator()


def _device() -> dict:
    from ffnx.runtime import cuda

    try:
        major, minor = cuda.compute_capability()
        return {"gpu": cuda.device_name(), "compute_capability": f"{major}.{minor}"}
    except cuda.CudaError:
        return {"gpu": "unknown", "compute_capability": "unknown"}


def _set_flags(trt, config, names: Iterable[str]) -> None:
    for name in names:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}")
        config.set_flag(flag)


def build_engine(
    artifact_dir: str | Path,
    precision: str = "fp32",
    sparse_weights: bool = False,
    version_compatible: bool = False,
    workspace_gib: float | None = None,
    timing_cache: str | Path | None = None,
    profiles: list[DimRange | str] | None = None,
    extra_profiles: list[list[DimRange | str] | str] | None = None,
    calib=None,
    progress: Progress | None = None,
    plugin_library: str | Path | None = None,
    flavour: str = "auto",
    compute_capability: str | None = None,
    optimization_level: int | None = None,
) -> dict:
    """Build `artifact_dir/model.plan`; return the manifest's new "tensorrt" section.

    profiles: "label:min,opt,max" overrides of the manifest's dims (profile 0); extra_profiles:
    one more optimization profile per entry (its overrides). timing_cache: default
    DIR/timing.cache, read before and written after the build. calib: int8 calibration
    batches (TensorRT 10.x only, see load_calibration). progress(phase, step, steps) is called
    from TensorRT's build threads. plugin_library: default plugin_library_path().
    """
    import onnx

    from ffnx.build.trt_graph_check import has_qdq

    d = Path(artifact_dir)
    manifest = artifact.read_manifest(d)
    onnx_path = artifact.model_path(d, manifest, target="trt")
    range_sets = profile_sets(manifest, profiles, extra_profiles)
    shape_sets = [input_shapes(manifest, r) for r in range_sets]
    batches = load_calibration(calib)
    trt = import_tensorrt(flavour)
    major = flavour_mod.strongly_typed_major(trt)
    caps = flavour_mod.compute_capabilities(trt, compute_capability)
    if flavour_mod.flavour_of(trt) == "rtx" and batches:
        raise PassError("--data: TensorRT-RTX has no int8 calibration; quantize to Q/DQ first")
    cache_path = tc.path_for(trt, d, timing_cache)
    qdq = has_qdq(onnx.load(str(onnx_path), load_external_data=False))
    plan = precision_plan(major, precision, qdq, bool(batches))
    flags = list(plan.flags) + ["SPARSE_WEIGHTS"] * sparse_weights
    flags += ["VERSION_COMPATIBLE"] * version_compatible
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".trt-build.", dir=d) as work:
        graph, needs_plugins, warnings = _prepare_graph(onnx_path, plan, Path(work))
        names = [c.name.removeprefix("SM") for c in caps]
        lib_info = _load_plugins(trt, plugin_library, names) if needs_plugins else {}
        logger = _logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        _parse(trt, network, logger, graph, warnings)
        nodes = onnx.load(str(graph), load_external_data=False)  # node names and op types
        layers = plan_layers.network_plugin_layers(trt, network, nodes)
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # for IEngineInspector
        used_sets, profile = add_profiles(builder, network, config, shape_sets)
        _set_flags(trt, config, flags)
        targets = flavour_mod.set_compute_capabilities(config, caps)
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        if version_compatible and lib_info:
            config.plugins_to_serialize = [lib_info["plugin_library"]]
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        keep_alive = _attach(trt, config, plan, batches, d, profile, progress)
        cache_read = tc.attach(config, cache_path) if cache_path else None
        serialized = builder.build_serialized_network(network, config)
        del keep_alive
        _save(d, serialized, logger)
        cache_written = tc.save(config, cache_path) if cache_path else None
    section = {
        "version": str(trt.__version__),
        "flavour": flavour_mod.flavour_of(trt),
        "compute_capabilities": targets,
        "precision": precision,
        "strongly_typed": major >= 11,
        "num_optimization_profiles": getattr(config, "num_optimization_profiles", len(used_sets)),
        "fp16_graph": plan.convert_fp16,
        "builder_flags": sorted(set(flags)),
        **_device(),
        "profiles": {k: r.to_json() for k, r in range_sets[0].items()},
        "input_shapes": used_sets[0] if used_sets else {},
        "optimization_profiles": [
            {"profiles": {k: r.to_json() for k, r in rs.items()}, "input_shapes": u}
            for rs, u in zip(range_sets, used_sets)
        ],
        "timing_cache": tc.record(d, cache_path, cache_read, cache_written),
        "plugin_layers": layers,
        "network_layers": network.num_layers,
        "sparse_weights": sparse_weights,
        "version_compatible": version_compatible,
        "workspace_gib": workspace_gib,
        "source": onnx_path.name,
        "graph_warnings": warnings,
        "build_seconds": round(time.perf_counter() - t0, 2),
        **lib_info,
    }
    return _record(d, section)


def _record(d: Path, section: dict) -> dict:
    """Add the "tensorrt" section; the manifest is written last (it hashes model.plan)."""
    manifest = artifact.read_manifest(d)
    manifest["tensorrt"] = section
    manifest.setdefault("versions", {})["tensorrt"] = section["version"]
    artifact.write_manifest(d, manifest, {artifact.PLAN: [section["source"]]})
    return section


def _save(d: Path, serialized, logger) -> None:
    """model.plan, atomically; the manifest comes after."""
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "no error was logged"
        raise BackendError(f"TensorRT failed to build the engine: {detail}")
    with artifact.atomic_path(d / artifact.PLAN) as tmp:
        tmp.write_bytes(memoryview(serialized))


def _attach(trt, config, plan: PrecisionPlan, batches, d: Path, profile, progress) -> list:
    """Calibrator and progress monitor; returns them so they outlive the build."""
    alive = []
    if plan.calibrate:
        alive.append(_calibrator(trt, batches, d / "calibration.cache"))
        config.int8_calibrator = alive[-1]
        if profile is not None:
            config.set_calibration_profile(profile)
    monitor = _monitor(trt, progress)
    if monitor is not None:
        alive.append(monitor)
        config.progress_monitor = monitor
    return alive


def _load_plugins(trt, path, targets: list[str]) -> dict:
    """Load the plugin library; refuse one whose kernels cannot run on a build target (the
    TensorRT-RTX --compute-capability list; Enterprise checks against this GPU on load)."""
    import json

    from ffnx.plugins.trt_build import load_plugin_library
    from ffnx.runtime.plugin_library import arch_runs

    lib = load_plugin_library(trt, path)
    sidecar = lib.with_name(lib.name + ".json")
    archs = json.loads(sidecar.read_text()).get("archs") if sidecar.is_file() else None
    bad = [t for t in targets if archs and not arch_runs(archs, *divmod(int(t), 10))]
    if bad:
        raise BackendError(
            f"{lib} holds code for sm_{', sm_'.join(archs)}, which cannot run on the build "
            f"target sm_{', sm_'.join(bad)}: rebuild it with `ffnx plugins build --arch "
            f"{','.join(sorted(set(archs) | set(bad)))}`"
        )
    return {"plugin_library": str(lib), "plugin_library_sha256": artifact.sha256(lib)}
