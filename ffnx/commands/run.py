"""`ffnx run` and `ffnx bench`: execute an artifact."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import grammar, ui
from ffnx.commands.feeds import explained_random_inputs

BACKEND = click.option(
    "--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True
)
THREADS = click.option("--threads", type=int, default=None, help="CPU threads (ORT and torch).")


def _engine(path, backend, threads):
    from ffnx.runtime import Engine

    opts = {"threads": threads} if threads and backend != "trt" else {}
    return Engine.load(path, backend=backend, **opts)


def _no_trt_threads(ctx: click.Context) -> None:
    if ctx.params.get("backend") == "trt":
        grammar.unused(ctx, "with ONNX Runtime (--backend auto|ort)", "threads")


@click.command("run", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@grammar.data_option()
@grammar.output_option("Directory for <output>.npy (<output>_<i>.npy per --data sample).", False)
@grammar.force_option("Replace existing .npy files in -o.")
@grammar.json_option("Print the outputs' shapes and statistics as JSON.")
@BACKEND
@grammar.dims_option()
@THREADS
@click.pass_context
def run_cmd(ctx, path, data, output, force, as_json, backend, dims, threads) -> None:
    """Run an artifact (or .onnx/.plan) on --data (else random inputs within the declared dims)
    and print each output's shape and statistics; -o saves them as .npy.

    \b
    Example:
      ffnx export gpt-swiglu -o artifacts/gpt-swiglu
      ffnx run artifacts/gpt-swiglu --data ids.npz -o out/
      ffnx run artifacts/gpt-swiglu --dims batch=4,seq=16 --json
    """
    from ffnx.commands.feeds import read_data

    if data:
        grammar.unused(ctx, "without --data (random inputs)", "dims")
    grammar.unused(ctx, "with -o/--output", *([] if output else ["force"]))
    _no_trt_threads(ctx)
    engine = _engine(path, backend, threads)
    if data:
        samples = read_data(data, [i.name for i in engine.inputs])
    else:
        ui.err.print("no --data given: using random inputs within the declared dims")
        samples = [engine.random_inputs(dims)]

    def name(out: str, i: int) -> str:
        return f"{out}.npy" if len(samples) == 1 else f"{out}_{i}.npy"

    if output:
        outs = [o.name for o in engine.outputs]
        files = [Path(output) / name(o, i) for i in range(len(samples)) for o in outs]
        grammar.refuse_existing(files, force)
    with explained_random_inputs("run", not data):
        results = [engine.run(f) for f in samples]
    rows = []
    for i, outs in enumerate(results):
        for out, arr in outs.items():
            rows.append(
                {"output": out, "sample": i, "shape": list(arr.shape), "dtype": arr.dtype.name,
                 "mean": float(arr.mean()), "std": float(arr.std())}
            )  # fmt: skip
            if output:
                _save(Path(output) / name(out, i), arr)
    if as_json:
        grammar.echo_json({"backend": engine.backend_name, "outputs": rows, "saved_to": output})
        return
    cols = ["output", "sample", "shape", "dtype", "mean", "std"]
    table = [[r["output"], r["sample"], str(r["shape"]), r["dtype"], r["mean"], r["std"]]
             for r in rows]  # fmt: skip
    where = f" -> {output}/" if output else ""
    ui.out.print(ui.table(f"outputs ({engine.backend_name}){where}", cols, table))


def _save(path: Path, arr: np.ndarray) -> None:
    from ffnx.artifact import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


@click.command("bench", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--compare",
    metavar="torch[,genai]",
    default=None,
    help="Also time torch eager in this invocation and print the ratio; with --decode also "
    "genai (onnxruntime-genai's model builder), comma-separated.",
)
@click.option("--iters", type=int, default=None, help="Timed iterations (default 100).")
@click.option("--seconds", type=float, default=None, help="Time budget instead of --iters.")
@click.option("--warmup", type=int, default=10, show_default=True)
@grammar.json_option("Print the results as JSON on stdout.")
@grammar.output_option("Write the results as JSON to this file.")
@grammar.force_option("Replace an existing -o file.")
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
@grammar.dims_option()
@THREADS
@click.pass_context
def bench_cmd(ctx, path, compare, iters, seconds, warmup, as_json, output, force, graph, decode,
              prompt_len, new_tokens, batch, backend, dims, threads):  # fmt: skip
    """Benchmark an artifact: p50/p90/p99/mean latency, throughput, peak RSS.

    \b
    Example:
      ffnx export gpt-moe -o artifacts/gpt-moe
      ffnx bench artifacts/gpt-moe --compare torch --threads 2 --iters 20
      ffnx bench artifacts/gpt-moe --dims batch=1,seq=1 --seconds 1 --json -o moe.json
      ffnx bench artifacts/qwen3 --decode --prompt-len 8 --new-tokens 8 --compare torch,genai
    """
    from ffnx.bench import measure, peak_rss_mib, throughput

    if iters is not None and seconds is not None:
        raise click.UsageError("give --iters or --seconds, not both")
    if not decode:
        grammar.unused(ctx, "with --decode", "prompt_len", "new_tokens", "batch")
    else:
        grammar.unused(ctx, "without --decode", "dims", "iters", "seconds", "graph")
    if graph == "plain" and backend == "trt":
        grammar.unused(ctx, "with --graph opt (the plain export runs on ONNX Runtime)", "backend")
    grammar.unused(ctx, "with -o/--output", *([] if output else ["force"]))
    _no_trt_threads(ctx)
    if output:
        grammar.refuse_existing([output], force)
    if not decode and compare not in (None, "torch"):
        raise click.UsageError(f"--compare {compare}: only torch without --decode")
    engine = _bench_engine(path, backend, threads, graph)
    if decode:  # ffnx bench DIR --decode [--prompt-len P] [--new-tokens N] [--batch B]
        from ffnx.commands.bench_decode import bench_decode

        results = bench_decode(engine, path, compare, prompt_len, new_tokens, batch, threads,
                               table=not as_json)  # fmt: skip
        _report({"path": str(path), "decode": True, "results": results}, as_json, output)
        return
    feeds = engine.random_inputs(dims)
    items = int(np.prod([v.shape[0] for v in feeds.values()][:1]) or 1)
    results = []
    explained = explained_random_inputs("bench", random=True, data_option=False)
    with ui.bar(f"ffnx {engine.backend_name}") as tick, explained:
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
    report = {"path": str(path), "inputs": shape, "threads": threads, "results": results}
    if as_json:
        _report(report, as_json, output)
        return
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
        ui.out.print(f"ffnx is {results[-1]['ratio_vs_ffnx']:.2f}x the speed of torch eager (p50)")
    _report(report, as_json, output)


def _report(report: dict, as_json: bool, output: str | None) -> None:
    """--json: the report on stdout; -o FILE: the report written (atomically) to FILE."""
    if as_json:
        grammar.echo_json(report)
    if output:
        from ffnx.artifact import write_json_atomic

        write_json_atomic(output, report)
        ui.err.print(f"wrote {output}")


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
