"""CLI on a real artifact: run, bench, inspect, the grammar (-o, --force, --json, --data, usage
errors) and the errors each command reports (the --help examples: test_cli_examples.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from click.testing import CliRunner

from ffnx.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_saves_outputs_only_with_o_and_refuses_to_replace(tmp_path, mlp_artifact):
    np.savez(tmp_path / "x.npz", x=np.ones((3, 16), np.float32))
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz")
    assert r.exit_code == 0 and not list(tmp_path.glob("**/*.npy")), r.output
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    (out,) = list((tmp_path / "o").glob("*.npy"))
    assert np.load(out).shape == (3, 16)
    before = out.read_bytes()
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 16), np.float32))
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz", "-o", tmp_path / "o")
    assert r.exit_code == 1 and r.output.strip().endswith("exists; give --force to replace it")
    assert out.read_bytes() == before
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz", "-o", tmp_path / "o", "--force")
    assert r.exit_code == 0 and out.read_bytes() != before


def test_run_data_with_several_samples_and_json(tmp_path, mlp_artifact):
    xs = {f"x_{i}": np.full((i + 1, 16), i, np.float32) for i in range(3)}
    np.savez(tmp_path / "x.npz", **xs)
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz", "--json", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert [o["shape"] for o in info["outputs"]] == [[1, 16], [2, 16], [3, 16]]
    assert len(list((tmp_path / "o").glob("*_[0-2].npy"))) == 3


def test_run_bad_input_one_line(tmp_path, mlp_artifact):
    np.savez(tmp_path / "x.npz", x=np.ones((3, 16), np.float64))
    r = run("run", mlp_artifact, "--data", tmp_path / "x.npz")
    assert r.exit_code == 1
    assert r.output.strip() == "error: input 'x' has dtype float64, expected x: float32[batch, 16]"
    np.savez(tmp_path / "y.npz", y=np.ones((3, 16), np.float32))
    r = run("run", mlp_artifact, "--data", tmp_path / "y.npz")
    assert (
        r.exit_code == 1 and r.output.startswith("error: --data ") and "expected ['x']" in r.output
    )
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    r = run("run", mlp_artifact, "--data", tmp_path / "bad.npz")
    assert r.exit_code == 1 and r.output.startswith("error: cannot read --data")


def test_bench_compare_torch_json(tmp_path, mlp_artifact):
    out = tmp_path / "b.json"
    r = run(
        "bench",
        mlp_artifact,
        "--compare",
        "torch",
        "--iters",
        "20",
        "--warmup",
        "2",
        "--threads",
        "1",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    runtimes = [x["runtime"] for x in data["results"]]
    assert runtimes == ["ffnx (ort)", "torch eager"]
    assert data["results"][1]["ratio_vs_ffnx"] > 0
    assert "the speed of torch eager" in r.output
    r = run("bench", mlp_artifact, "--iters", "2", "--warmup", "0", "-o", out)
    assert r.exit_code == 1 and "exists; give --force" in r.output


def test_bench_json_flag_prints_json_only(mlp_artifact):
    r = run("bench", mlp_artifact, "--iters", "3", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["results"][0]["runtime"] == "ffnx (ort)" and data["results"][0]["p50_ms"] > 0


def test_inspect_json(mlp_artifact):
    r = run("inspect", mlp_artifact, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["params"] == 16 * 32 + 32 + 32 * 16 + 16
    assert info["flops"] == 2 * 4 * (16 * 32 + 32 * 16)  # example batch 4
    assert info["inputs"][0]["shape"] == ["batch", 16]


def test_inspect_says_which_lowering_each_moe_layer_got(tmp_path):
    out = tmp_path / "moe"
    r = run("export", "gpt-moe", "-o", out)  # conftest: FFNX_MOE_LOWERING=rule
    assert r.exit_code == 0, r.output
    r = run("inspect", out)
    assert r.exit_code == 0, r.output
    assert "lowerings (metadata ffnx.lowerings)" in r.output
    lines = [ln for ln in r.output.splitlines() if "lower_moe" in ln and "sorted" in ln]
    assert len(lines) == 2, r.output  # the zoo's tiny gpt-moe has two MoE layers
    info = json.loads(run("inspect", out, "--json").output)
    assert [(e["pass"], e["choice"]) for e in info["lowerings"]] == [("lower_moe", "sorted")] * 2
    model = onnx.load(str(out / "model.opt.onnx"))
    assert [p.key for p in model.metadata_props] == ["ffnx.lowerings"]
    assert "lower_moe" not in model.graph.doc_string


def test_inspect_corrupted_file(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x01\x02not onnx")
    r = run("inspect", p)
    assert r.exit_code == 1 and "is not a valid ONNX model" in r.output


def test_missing_manifest_is_one_line(tmp_path):
    r = run("bench", tmp_path)
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and "incomplete" in r.output


def _one_error_line(r, code: int, text: str) -> None:
    lines = r.output.strip().splitlines()
    assert r.exit_code == code and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]


USAGE_ERRORS = """
run {a} --data {d} --dims batch=2                  | --dims applies only without --data
run {a} --force                                    | --force applies only with -o/--output
run {a} --backend trt --threads 2                  | --threads applies only with ONNX Runtime
bench {a} --prompt-len 8                           | --prompt-len applies only with --decode
bench {a} --decode --dims batch=1                  | --dims applies only without --decode
optimize {a} -o {t}/m.onnx                         | --output applies only with an .onnx SRC
optimize {a} --sparsity 0.5                        | --sparsity applies only with --passes sparsify
optimize {a} --max-error 0.1                       | --max-error applies only with an approximate
optimize {a} --target trt --quantize-experts int4  | --quantize-experts applies only with --target
optimize {a} --no-guard --threads 2 --passes cleanup | --no-guard applies only with the speed guard
optimize {a} --passes cleanup --no-guard           | --no-guard applies only with the speed guard
optimize {a} --json --explain                      | --explain applies only without --json
optimize {a}/model.onnx                            | -o/--output is required
export {u}:build -o {t}/a --size base              | --size applies only with zoo models
export gpt-mlp -o {t}/a --no-cache                 | --no-cache applies only with hf:PATH
export gpt-mlp -o {t}/a --no-optimize --skip cleanup | --skip applies only without --no-optimize
export gpt-mlp -o {t}/a --no-optimize --threads 2  | --threads applies only without --no-optimize
export gpt-mlp -o {t}/a --precision fp16           | --precision applies only with --target trt
calibrate {a} --data {d} --samples 4               | --samples applies only without --data
build {a} --data {d}                               | --data applies only with --precision int8
build {a} --trt enterprise --compute-capability 86 | --compute-capability applies only with TensorRT
generate {a} --prompt-ids 1 --top-k 5              | --top-k applies only with --temperature > 0
plugins build --kernels-only --trt-include {t}     | --trt-include applies only without --kernels
plugins --json path                                | --json applies only without a subcommand
run {a} --dims batch                               | 'batch': expected label=N
run {a} --bogus                                    | No such option '--bogus'
"""


def test_options_that_do_nothing_are_usage_errors(tmp_path, mlp_artifact, user_model_file):
    """One `error:` line naming the option and where it applies, exit 2, nothing written."""
    import shlex

    np.savez(tmp_path / "x.npz", x=np.ones((2, 16), np.float32))
    where = {"a": mlp_artifact, "d": tmp_path / "x.npz", "t": tmp_path, "u": user_model_file}
    for case in USAGE_ERRORS.strip().splitlines():
        line, text = (part.strip() for part in case.rsplit(" | ", 1))
        r = run(*shlex.split(line.format(**where)))
        _one_error_line(r, 2, text)
        assert "(see `" in r.output and " --help`)" in r.output, r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "m.onnx").exists()


def test_force_guards_every_replaced_result(tmp_path, mlp_artifact):
    import shutil

    d = tmp_path / "a"
    shutil.copytree(mlp_artifact, d)
    r = run("calibrate", d, "--samples", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["file"] == "calibration.npz"
    calib = (d / "calibration.npz").read_bytes()
    _one_error_line(run("calibrate", d, "--samples", "1"), 1, "calibration.npz exists")
    assert (d / "calibration.npz").read_bytes() == calib
    assert run("calibrate", d, "--samples", "2", "--force").exit_code == 0
    out = tmp_path / "m.onnx"
    r = run("optimize", d / "model.onnx", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["output"] == str(out) and report["passes"][0]["name"] == "cleanup"
    before = out.read_bytes()
    _one_error_line(run("optimize", d / "model.onnx", "-o", out), 1, "m.onnx exists")
    assert out.read_bytes() == before
    assert run("optimize", d / "model.onnx", "-o", out, "--force").exit_code == 0
    (d / "model.plan").write_bytes(b"an earlier plan")
    _one_error_line(run("build", d), 1, "model.plan exists (from an earlier build)")
    assert (d / "model.plan").read_bytes() == b"an earlier plan"


def test_json_flags_print_json_on_stdout(mlp_artifact):
    for args, key in (
        (["models", "--json"], None),
        (["optimize", "--list-passes", "--json"], None),
        (["plugins", "--json"], "ops"),
        (["inspect", mlp_artifact, "--json"], "params"),
        (["run", mlp_artifact, "--json"], "outputs"),
    ):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)
        obj = json.loads(r.stdout)
        assert obj and (key is None or key in obj), args
