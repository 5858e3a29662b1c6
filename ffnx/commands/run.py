"""`ffnx run` and `ffnx bench`: execute an artifact."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import ui
from ffnx.commands.options import dims_option
from ffnx.errors import InputError

BACKEND = click.option(
    "--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True
)
DIMS = click.option(
    "--dims",
    callback=dims_option,
    default=None,
    help="Sizes of dynamic dims for random inputs, e.g. batch=1,seq=128.",
)
THREADS = click.option("--threads", type=int, default=None, help="CPU threads (ORT and torch).")


def _load_inputs(items: tuple[str, ...]) -> dict[str, np.ndarray]:
    feeds = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            raise InputError(f"bad --input {item!r}; expected name=file.npy")
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read --input {name}={file}: {e}") from e
    return feeds


def _engine(path, backend, threads):
    from ffnx.runtime import Engine

    opts = {"threads": threads} if threads and backend != "trt" else {}
    return Engine.load(path, backend=backend, **opts)


@click.command("run", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy",
    help="Input arrays (random within the declared dims when none given).",
)
@click.option(
    "--save",
    type=click.Path(file_okay=False),
    default="ffnx-outputs",
    show_default=True,
    help="Directory for <output>.npy files.",
)
@BACKEND
@DIMS
@THREADS
def run_cmd(path, inputs, save, backend, dims, threads) -> None:
    """Run an artifact (or .onnx/.plan) once and save its outputs as .npy.

    \b
    Example:
      ffnx run artifacts/gpt-swiglu --input input_ids=ids.npy --save out/
      ffnx run artifacts/vit-repa --dims batch=4
    """
    engine = _engine(path, backend, threads)
    feeds = _load_inputs(inputs) if inputs else engine.random_inputs(dims)
    if not inputs:
        ui.err.print("no --input given: using random inputs within the declared dims")
    outs = engine.run(feeds)
    Path(save).mkdir(parents=True, exist_ok=True)
    from ffnx.artifact import atomic_path

    rows = []
    for name, arr in outs.items():
        with atomic_path(Path(save) / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        rows.append(
            [name, str(list(arr.shape)), arr.dtype.name, float(arr.mean()), float(arr.std())]
        )
    ui.out.print(
        ui.table(
            f"outputs ({engine.backend_name}) -> {save}/",
            ["output", "shape", "dtype", "mean", "std"],
            rows,
        )
    )


@click.command("bench", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--compare",
    type=click.Choice(["torch"]),
    default=None,
    help="Also time the torch eager model in this invocation and print the ratio.",
)
@click.option("--iters", type=int, default=None, help="Timed iterations (default 100).")
@click.option("--seconds", type=float, default=None, help="Time budget instead of --iters.")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results as JSON.")
@click.option(
    "--graph",
    type=click.Choice(["opt", "plain"]),
    default="opt",
    show_default=True,
    help="ONNX graph to run: model.opt.onnx or the plain export.",
)
@click.option("--decode", is_flag=True, help="KV-cache decoders: time token-by-token generation.")
@click.option("--prompt-len", type=int, default=64, show_default=True, help="With --decode.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="With --decode.")
@click.option("--batch", type=int, default=1, show_default=True, help="With --decode.")
@BACKEND
@DIMS
@THREADS
def bench_cmd(path, compare, iters, seconds, warmup, json_out, graph, decode, prompt_len,
              new_tokens, batch, backend, dims, threads):  # fmt: skip
    """Benchmark an artifact: p50/p90/p99/mean latency, throughput, peak RSS.

    \b
    Example:
      ffnx bench artifacts/gpt-swiglu --compare torch --threads 2
      ffnx bench artifacts/gpt-moe --dims batch=1,seq=1 --seconds 5 --json moe.json
      ffnx bench artifacts/qwen3 --decode --prompt-len 64 --new-tokens 64 --compare torch
    """
    from ffnx.bench import measure, peak_rss_mib, throughput

    if iters is not None and seconds is not None:
        raise click.UsageError("give --iters or --seconds, not both")
    engine = _bench_engine(path, backend, threads, graph)
    if decode:  # ffnx bench DIR --decode [--prompt-len P] [--new-tokens N] [--batch B]
        from ffnx.commands.bench_decode import bench_decode

        results = bench_decode(engine, path, compare, prompt_len, new_tokens, batch, threads)
        if json_out:
            from ffnx.artifact import write_json_atomic

            write_json_atomic(json_out, {"path": str(path), "decode": True, "results": results})
        return
    feeds = engine.random_inputs(dims)
    items = int(np.prod([v.shape[0] for v in feeds.values()][:1]) or 1)
    results = []
    with ui.bar(f"ffnx {engine.backend_name}") as tick:
        s = measure(lambda: engine.run(feeds), iters, seconds, warmup, tick)
    s.update(
        runtime=f"ffnx ({engine.backend_name})",
        throughput_per_s=throughput(s, items),
        peak_rss_mib=peak_rss_mib(),
    )
    results.append(s)
    if hasattr(engine.backend, "time_gpu"):  # TensorRT: device time from CUDA events
        from ffnx.bench import stats_ms

        gpu_ms = engine.backend.time_gpu(engine.validate(feeds), iters=iters or 100, warmup=warmup)
        g = stats_ms([t / 1e3 for t in gpu_ms])
        g.update(
            runtime=f"ffnx ({engine.backend_name}, GPU events)",
            throughput_per_s=throughput(g, items),
            peak_rss_mib=peak_rss_mib(),
        )
        results.append(g)
    if compare == "torch":
        results.append(_bench_torch(engine, feeds, iters, seconds, warmup, threads, items))
        results[-1]["ratio_vs_ffnx"] = results[-1]["p50_ms"] / s["p50_ms"]
    shape = {k: list(v.shape) for k, v in feeds.items()}
    rows = [
        [
            r["runtime"],
            r["p50_ms"],
            r["p90_ms"],
            r["p99_ms"],
            r["mean_ms"],
            r["throughput_per_s"],
            r["peak_rss_mib"],
            r.get("ratio_vs_ffnx", 1.0),
        ]
        for r in results
    ]
    ui.out.print(
        ui.table(
            f"{engine.manifest.get('model', {}).get('name', path)}  inputs {shape}  "
            f"threads {threads or 'default'}",
            [
                "runtime",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "mean ms",
                "samples/s",
                "peak RSS MiB",
                "latency / ffnx",
            ],
            rows,
        )
    )
    if compare == "torch":
        ui.out.print(f"ffnx is {results[1]['ratio_vs_ffnx']:.2f}x the speed of torch eager (p50)")
    if json_out:
        from ffnx.artifact import write_json_atomic

        write_json_atomic(
            json_out, {"path": str(path), "inputs": shape, "threads": threads, "results": results}
        )


def _bench_engine(path, backend, threads, graph):
    from ffnx import artifact
    from ffnx.runtime import Engine

    p = Path(path)
    if graph == "plain" and p.is_dir():
        from ffnx.runtime.backends.ort import OrtBackend

        manifest = artifact.read_manifest(p)
        return Engine(OrtBackend.load(str(p / artifact.MODEL), threads=threads), manifest, str(p))
    return _engine(path, backend, threads)


def _bench_torch(engine, feeds, iters, seconds, warmup, threads, items) -> dict:
    from ffnx.bench import measure, peak_rss_mib, throughput
    from ffnx.errors import ModelSpecError

    model = engine.manifest.get("model", {})
    if not model.get("source"):
        raise ModelSpecError("--compare torch needs an artifact exported by ffnx (manifest source)")
    import torch

    from ffnx.models.user import resolve

    if threads:
        torch.set_num_threads(threads)
    spec = resolve(model["source"], model.get("size") or "tiny")
    args = [torch.from_numpy(feeds[n]) for n in spec.inputs]
    module = spec.module.eval()

    def call():
        with torch.inference_mode():
            module(*args)

    with ui.bar("torch eager") as tick:
        s = measure(call, iters, seconds, warmup, tick)
    s.update(
        runtime="torch eager", throughput_per_s=throughput(s, items), peak_rss_mib=peak_rss_mib()
    )
    return s


COMMANDS = [run_cmd, bench_cmd]
