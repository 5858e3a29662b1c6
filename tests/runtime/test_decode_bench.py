"""`ffnx bench DIR --decode`: the roofline (GEMV bandwidth, weight bytes read per decode step,
achieved bandwidth), `--compare genai` (onnxruntime-genai's builder on the same checkpoint: the
same greedy tokens; one line where it refuses the architecture) and `--compare` errors."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx import artifact
from ffnx.runtime.decode_bench import gemv_bandwidth, roofline


def test_roofline_math():
    r = roofline(2e9, 0.010, 400.0)  # 2 GB per step every 10 ms -> 200 GB/s of 400
    assert r["achieved_gbs"] == pytest.approx(200.0) and r["roofline_fraction"] == pytest.approx(
        0.5
    )
    assert r["weight_bytes_per_step"] == 2_000_000_000 and r["roofline_gbs"] == 400.0


@pytest.mark.parametrize("bits", [None, 4])
def test_gemv_models_and_bandwidth(bits):
    from ffnx.commands.bench_decode import gemv_models

    model, nbytes, k = gemv_models(bits, target_bytes=4 * 2**20)
    m = onnx.load_from_string(model)
    w = sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)
    assert w == nbytes and 3.5 * 2**20 < nbytes <= 4 * 2**20 and k == 4096
    assert m.graph.node[0].op_type == ("MatMul" if bits is None else "MatMulNBits")
    g = gemv_bandwidth(model, nbytes, k, threads=1, seconds=0.05)
    assert g["gemv_runs"] >= 5 and g["gemv_gbs"] == pytest.approx(nbytes / g["gemv_ms"] / 1e6)


def _moe_artifact(d) -> dict:
    """An artifact holding an embedding table [100, 16] and one FfnxMoE (E 4, top-2, D 16,
    H 16): model.onnx with the node; model.opt.onnx a lowering as an If whose then-branch reads
    both expert weights and whose else-branch only fc1 (only read, never run)."""
    rng = np.random.default_rng(0)
    arrays = {"embed": (100, 16), "fc1": (4, 32, 16), "fc2": (4, 16, 16), "norm": (16,)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in arrays.items()]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h"]),
        helper.make_node("Mul", ["h", "norm"], ["x"]),
        helper.make_node(
            "FfnxMoE",
            ["x", "logits", "fc1", "", "fc2"],
            ["y"],
            domain="ffnx",
            num_experts=4,
            top_k=2,
        ),  # fmt: skip
    ]
    g = helper.make_graph(
        nodes, "moe",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    (d / artifact.MODEL).write_bytes(helper.make_model(g).SerializeToString())
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]

    def branch(reads, own):
        node = helper.make_node("Sum", reads, ["y"])
        return helper.make_graph([node], "b", [], out, [i for i in inits if i.name in own])

    # fc1, which both branches read, is stored once in the enclosing graph (ffnx.graph.export)
    lowered = helper.make_graph(
        [nodes[0], nodes[1], helper.make_node("If", ["c"], ["y"],
                                              then_branch=branch(["fc1", "fc2"], ["fc2"]),
                                              else_branch=branch(["fc1"], []))],
        "opt", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1]),
                helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        out, [i for i in inits if i.name in ("embed", "norm", "fc1")],
    )  # fmt: skip
    (d / artifact.MODEL_OPT).write_bytes(helper.make_model(lowered).SerializeToString())
    return artifact.write_manifest(d, {})


def test_weight_bytes_per_step_embedding_and_routed_experts(tmp_path):
    from ffnx.commands.bench_decode import weight_bytes_per_step

    manifest = _moe_artifact(tmp_path)
    total = 4 * (100 * 16 + 4 * 32 * 16 + 4 * 16 * 16 + 16)
    experts = 4 * (4 * 32 * 16 + 4 * 16 * 16)
    for batch in (1, 2):
        w = weight_bytes_per_step(str(tmp_path), manifest, batch)
        assert w["weight_bytes_total"] == total
        assert w["embedding_bytes_unread"] == 4 * (100 - batch) * 16  # `batch` rows read
        assert w["expert_bytes_unread"] == pytest.approx(0.5**batch * experts)  # (1 - k/E)^B
        assert w["weight_bytes_per_step"] == pytest.approx(
            total - 4 * (100 - batch) * 16 - 0.5**batch * experts
        )
    # int4 experts (--quantize): 0.5 byte + one fp32 scale per 32 weights each
    manifest["quantize"] = {"scheme": "int4", "bits": 4, "experts": {"scheme": "int4"}}
    w = weight_bytes_per_step(str(tmp_path), manifest, 1)
    assert w["expert_bytes_unread"] == pytest.approx(0.5 * experts / 4 * (0.5 + 4 / 32))


needs_genai = pytest.mark.skipif(
    not (find_spec("transformers") and find_spec("onnxruntime_genai")),
    reason="needs transformers and onnxruntime-genai (pip install -e '.[dev]')",
)


def cli(*args):
    from click.testing import CliRunner

    from ffnx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@needs_genai
def test_bench_decode_compare_genai_same_tokens_and_roofline(tmp_path, monkeypatch):
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf

    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    from tests.models.test_hf_decoder import write_config

    src = write_config(tmp_path / "src", "llama")
    export_artifact(load_hf(str(src), cache=True), tmp_path / "art", source=f"hf:{src}")
    out = tmp_path / "d.json"
    r = cli("bench", tmp_path / "art", "--decode", "--prompt-len", 6, "--new-tokens", 8,
            "--batch", 2, "--compare", "genai", "--threads", 1, "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "of the fp32 GEMV roofline" in r.output
    ours, genai = json.loads(out.read_text())["results"]
    assert genai["runtime"] == "onnxruntime-genai" and genai["precision"] == "fp32"
    assert genai["new_tokens"] == 8 and genai["decode_tok_s"] > 0
    assert genai["tokens_equal_ffnx"] == 1.0  # same checkpoint, same greedy tokens
    model = onnx.load(genai["genai_model"] + "/model.onnx", load_external_data=False)
    assert "GroupQueryAttention" in {n.op_type for n in model.graph.node}  # genai's own graph
    for key in ("achieved_gbs", "roofline_gbs", "roofline_fraction", "weight_bytes_per_step"):
        assert ours[key] > 0
    assert ours["gemv"]["fp32"]["gemv_weight_bytes"] >= 64 * 2**20  # larger than the caches
    # cached: a second run reuses the built model
    r = cli("bench", tmp_path / "art", "--decode", "--prompt-len", 6, "--new-tokens", 4,
            "--compare", "genai", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{") :])["results"]
    assert res[1]["genai_model"] == genai["genai_model"]


@needs_genai
def test_genai_refuses_mixtral_in_one_line(tmp_path, monkeypatch):
    from ffnx.commands.bench_genai import genai_model
    from ffnx.models.hf import load_hf

    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    from tests.models.test_hf_decoder import write_config

    src = write_config(tmp_path / "mixtral", "mixtral")
    why = genai_model(str(src), load_hf(str(src)).module.model, "fp32")
    assert why == "genai does not support mixtral"
    assert genai_model(str(src), None, "fp32") == why  # remembered: no second build


@needs_genai  # its first assertion accepts genai, which needs the package
def test_bad_compare_is_one_error_line(tmp_path):
    from ffnx.commands.bench_decode import parse_compare
    from ffnx.errors import InputError

    assert parse_compare("torch, genai") == ["torch", "genai"]
    with pytest.raises(InputError, match="--compare 'torch,vllm': choose from torch, genai"):
        parse_compare("torch,vllm")


def test_compare_without_its_package_is_one_line_before_any_timing(monkeypatch):
    """CI once ran `--compare genai` without onnxruntime-genai: "internal error", exit 3."""
    import ffnx.commands.bench_decode as bench_decode
    from ffnx.errors import InputError

    real = bench_decode.find_spec
    monkeypatch.setattr(bench_decode, "find_spec",
                        lambda m: None if m == "onnxruntime_genai" else real(m))  # fmt: skip
    assert bench_decode.parse_compare("torch") == ["torch"]
    with pytest.raises(InputError, match=r"--compare genai needs onnxruntime-genai: "
                                         r"pip install 'ffnx\[bench\]'"):  # fmt: skip
        bench_decode.parse_compare("torch,genai")


def test_weight_bytes_per_step_reads_one_row_of_the_fused_rotary_tables(tmp_path):
    """A GQA with fused rotary reads `batch` rows of its cos/sin tables (shared by every layer:
    counted once), not the whole tables."""
    from ffnx import artifact
    from ffnx.commands.bench_decode import weight_bytes_per_step

    tables = [numpy_helper.from_array(np.zeros((50, 4), np.float32), n) for n in ("cos", "sin")]
    w = numpy_helper.from_array(np.zeros((16, 16), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"])] + [
        helper.make_node("GroupQueryAttention", ["q", "q", "q", "pk", "pv", "sl", "tot", "cos",
                                                 "sin"], [f"o{i}", f"k{i}", f"v{i}"],
                         domain="com.microsoft", num_heads=1, kv_num_heads=1, do_rotary=1)
        for i in range(2)
    ]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 16])],
                          [helper.make_tensor_value_info("o1", TensorProto.FLOAT, None)],
                          [w, *tables])  # fmt: skip
    (tmp_path / artifact.MODEL_OPT).write_bytes(helper.make_model(g).SerializeToString())
    manifest = artifact.write_manifest(tmp_path, {})
    for batch in (1, 3):
        got = weight_bytes_per_step(str(tmp_path), manifest, batch)
        assert got["rotary_table_bytes_unread"] == 2 * 4 * (50 - batch) * 4
        assert got["weight_bytes_per_step"] == 4 * 16 * 16 + 2 * 4 * batch * 4


def test_tied_table_is_read_whole_and_the_gemv_spans_the_working_set(tmp_path):
    """A table the lm_head also reads (tied: Transpose -> MatMul) counts whole; the roofline
    GEMV is sized by the working set (a step plus the experts other tokens route to), between
    4x the last-level cache and GEMV_CAP."""
    from ffnx import artifact
    from ffnx.commands import bench_decode as bd

    table = numpy_helper.from_array(np.zeros((100, 16), np.float32), "embed")
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"]),
             helper.make_node("Transpose", ["embed"], ["et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "et"], ["logits"])]  # fmt: skip
    g = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                        [1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          [table])  # fmt: skip
    (tmp_path / artifact.MODEL_OPT).write_bytes(helper.make_model(g).SerializeToString())
    got = bd.weight_bytes_per_step(str(tmp_path), artifact.write_manifest(tmp_path, {}), 1)
    assert got["embedding_bytes_unread"] == 0 and got["weight_bytes_per_step"] == 4 * 100 * 16
    moe = tmp_path / "moe"
    moe.mkdir()
    w = bd.weight_bytes_per_step(str(moe), _moe_artifact(moe), 1)
    assert bd.working_set(w) == w["weight_bytes_total"] - w["embedding_bytes_unread"]
    floor = max(4 * bd._llc_bytes(), 64 * 2**20)
    assert bd.roofline_bytes(1) == bd.roofline_bytes() == floor
    assert bd.roofline_bytes(10 * bd.GEMV_CAP) == max(floor, bd.GEMV_CAP)
