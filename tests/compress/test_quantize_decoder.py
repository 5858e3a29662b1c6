"""`--quantize int4|int8` (ffnx.compress.quantize_weights): every linear -> MatMulNBits, exact
against the graph with the dequantized weights; a model without linears byte-identical; on a tiny
random decoder the int8 graph's greedy tokens agree with fp32's; bad values are one error line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx.compress.quantize_weights import quantize_linears
from ffnx.graph.ort import ort_session
from ffnx.lowering.quantize import unpack

K, N = 64, 48


def _linears_model(rng) -> onnx.ModelProto:
    """x [T, K] -> MatMul(W1) -> Gemm(W2^T, bias, transB) = y; x -> MatMul(Wr) -> Softmax -> TopK
    (a router: stays fp32)."""
    w1 = rng.standard_normal((K, N)).astype(np.float32)
    w2 = rng.standard_normal((K, N)).astype(np.float32)  # Gemm transB: h [T, N] @ w2^T -> [T, K]
    bias = rng.standard_normal(K).astype(np.float32)
    wr = rng.standard_normal((K, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Gemm", ["h", "w2", "bias"], ["y"], name="down", transB=1),
        helper.make_node("MatMul", ["x", "wr"], ["logits"], name="router"),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("TopK", ["p", "k"], ["topv", "topi"], axis=-1),
    ]
    named = {"w1": w1, "w2": w2, "bias": bias, "wr": wr, "k": np.array([2])}
    inits = [numpy_helper.from_array(a, n) for n, a in named.items()]
    g = helper.make_graph(
        nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", K])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "topv")],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _dequantized(q: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each quantized weight replaced by W~ read back from the MatMulNBits bytes."""
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {i.name: i for i in out.graph.initializer}
    for n in q.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        bits, blk = a["bits"], a["block_size"]
        codes = unpack(inits[n.input[1]].reshape(a["N"], -1), bits)[:, : a["K"]]
        scales = np.repeat(inits[n.input[2]].reshape(a["N"], -1), blk, axis=1)[:, : a["K"]]
        w = ((codes.astype(np.float32) - 2 ** (bits - 1)) * scales).T  # [K, N]
        orig = next(m for m in model.graph.node if m.name == n.name.rsplit("_Q", 1)[0])
        trans = any(x.name == "transB" and x.i for x in orig.attribute)
        by_name[orig.input[1]].CopyFrom(numpy_helper.from_array(w.T if trans else w, orig.input[1]))
    return out


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_rewrite_exact_against_dequantized_weights(scheme):
    rng = np.random.default_rng(0)
    model = _linears_model(rng)
    before = model.SerializeToString()
    q, report = quantize_linears(model, scheme, accuracy_level=0)
    assert model.SerializeToString() == before  # the input is left as it was
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 1  # the router stays fp32
    assert report["linears"] == 2 and report["kept_fp32"] == [
        {"node": "router", "reason": "router"}
    ]
    assert report["weight_bytes"]["after"] < report["weight_bytes"]["before"]
    x = {"x": rng.standard_normal((5, K)).astype(np.float32)}
    got = ort_session(q).run(None, x)
    ref = ort_session(_dequantized(q, model)).run(None, x)
    fp32 = ort_session(model).run(None, x)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)  # exact up to fp32 sums
    np.testing.assert_array_equal(got[1], fp32[1])  # routing untouched
    err = np.abs(got[0] - fp32[0]).max() / np.abs(fp32[0]).max()
    assert 1e-4 < err < (0.15 if scheme == "int4" else 0.01)  # really quantized, and not wrong


def test_model_without_linears_is_byte_identical():
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "act",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4, 4])],
    )  # fmt: skip
    model = helper.make_model(g)
    q, report = quantize_linears(model, "int4")
    assert q.SerializeToString() == model.SerializeToString() and report["linears"] == 0


V = 40  # the tied table's rows


def _tied_model(rng) -> onnx.ModelProto:
    """ids [T] -> Gather(E) -> MatMul(W1) -> MatMul(Transpose(E)) = logits [T, V]: a tied head."""
    e = rng.standard_normal((V, K)).astype(np.float32)
    w1 = rng.standard_normal((K, K)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w1"], ["h2"], name="mid"),
        helper.make_node("Transpose", ["E"], ["et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "et"], ["logits"], name="head"),
    ]
    g = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(e, "E"), numpy_helper.from_array(w1, "w1")],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _w_tilde(q: onnx.ModelProto, node_name: str) -> np.ndarray:
    """W~ [N, K] read back from the bytes of the MatMulNBits `node_name`_Q*."""
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    n = next(m for m in q.graph.node if m.name.rsplit("_Q", 1)[0] == node_name)
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    codes = unpack(inits[n.input[1]].reshape(a["N"], -1), a["bits"])[:, : a["K"]]
    scales = np.repeat(inits[n.input[2]].reshape(a["N"], -1), a["block_size"], axis=1)
    return (codes.astype(np.float32) - 2 ** (a["bits"] - 1)) * scales[:, : a["K"]]


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_tied_embedding_reads_the_quantized_head(scheme):
    rng = np.random.default_rng(1)
    model = _tied_model(rng)
    q, report = quantize_linears(model, scheme, accuracy_level=0)
    ops = [n.op_type for n in q.graph.node]
    assert "Gather" not in ops and ops.count("GatherBlockQuantized") == 1
    assert report["embedding_shared"] == ["E"]
    assert "E" not in {i.name for i in q.graph.initializer}  # the fp32 table is gone
    # exact against the fp32 graph whose table and weights are the heads' W~
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    for init in ref.graph.initializer:
        w = _w_tilde(q, "head") if init.name == "E" else _w_tilde(q, "mid").T
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    ids = {"ids": np.array([0, 7, V - 1, 7], np.int64)}
    got = ort_session(q).run(None, ids)[0]
    want = ort_session(ref).run(None, ids)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    kept, report = quantize_linears(model, scheme, share_embedding=False)
    assert report["embedding_shared"] == [] and "E" in {i.name for i in kept.graph.initializer}
    assert [n.op_type for n in kept.graph.node].count("Gather") == 1


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown scheme 'int2'"):
        quantize_linears(_linears_model(np.random.default_rng(0)), "int2")


pytest.importorskip("transformers")

from tests.models.test_hf_decoder import write_config  # noqa: E402


def cli(*args):
    from click.testing import CliRunner

    from ffnx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    """A tiny random Llama exported with `ffnx export hf:DIR --quantize int8`."""
    root = tmp_path_factory.mktemp("q")
    src = write_config(root / "src", "llama")
    r = cli("export", f"hf:{src}", "-o", root / "int8", "--quantize", "int8")
    assert r.exit_code == 0, r.output
    return root


def test_export_int8_matmulnbits_and_token_agreement(int8_artifact):
    from ffnx import artifact
    from ffnx.runtime import Engine

    art = int8_artifact / "int8"
    m = artifact.read_manifest(art)
    q = m["quantize"]
    model = onnx.load(str(art / artifact.MODEL_OPT))
    ops = [n.op_type for n in model.graph.node]
    # 2 layers x (fused QKV, o, fused gate+up, down) + lm_head; no fp32 linear left
    assert ops.count("MatMulNBits") == q["linears"] == q["ops"]["MatMulNBits"] == 9
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "MatMulNBits"}
    gate_up = [n for n in model.graph.node if n.op_type == "Split" and n.input[0] in quantized]
    assert len(gate_up) == 2  # fuse_gate_up's one product per layer, quantized as one
    consts = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    assert all(n.domain == "com.microsoft" for n in model.graph.node if n.op_type == "MatMulNBits")
    # int8 + one fp32 scale per 32: 1.125 of 4 bytes per parameter; the whole model shrinks less
    # (fp32 embedding Gather table, norms, the fused rotary's cos/sin tables)
    lin = q["linear_bytes"]
    assert 0.28 * lin["before"] <= lin["after"] < 0.29 * lin["before"]
    assert lin["before"] - lin["after"] <= q["weight_bytes"]["before"] - q["weight_bytes"]["after"]
    a = q["accuracy"]
    # measured: agreement 1.0 over 64 steps, cosine 0.99995 (tiny random Llama, seed 0 prompt)
    assert a["steps"] == 64 and a["fp32_prefill_agreement"] == 1.0
    assert a["token_agreement"] >= 0.95 and a["logits_cosine"] >= 0.9999
    assert a["greedy_identical_prefix"] >= 32
    tokens = Engine.load(art, backend="ort").generate([[5, 17, 99]], 8, ignore_eos=True)
    assert tokens.shape == (1, 8)


def test_optimize_int4_less_accurate_than_int8(int8_artifact):
    from ffnx import artifact

    art = int8_artifact / "int4"
    shutil.copytree(int8_artifact / "int8", art)
    r = cli("optimize", art, "--quantize", "int4", "--force")
    assert r.exit_code == 0, r.output
    assert "token agreement" in r.output
    q4 = artifact.read_manifest(art)["quantize"]
    q8 = artifact.read_manifest(int8_artifact / "int8")["quantize"]
    assert q4["scheme"] == "int4" and q4["linears"] == q8["linears"]
    assert q4["weight_bytes"]["after"] < q8["weight_bytes"]["after"]
    # int4 really is coarser than int8, and still close (measured cosine 0.993)
    assert 0.97 < q4["accuracy"]["logits_cosine"] < q8["accuracy"]["logits_cosine"]
    r = cli("optimize", art, "--force")  # back to fp32: the quantize section goes
    assert r.exit_code == 0 and "quantize" not in artifact.read_manifest(art)


def test_bad_quantize_values_one_error_line(int8_artifact, tmp_path):
    art = int8_artifact / "int8"
    for args in (("optimize", art, "--quantize", "int3", "--force"),
                 ("export", "hf:nowhere", "-o", tmp_path / "x", "--quantize", "fp4")):  # fmt: skip
        r = cli(*args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert lines[0].startswith("error: --quantize '") and "choose one of int4, int8" in lines[0]
    r = cli("optimize", art / "model.onnx", "-o", tmp_path / "q.onnx", "--quantize", "int4")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "needs a KV-cache decoder" in lines[0]
    assert not (tmp_path / "q.onnx").exists()
    src = int8_artifact / "src"
    r = cli("export", f"hf:{src}", "-o", tmp_path / "nc", "--quantize", "int4", "--no-cache")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "is not a KV-cache decoder" in lines[0]
    r = cli("export", f"hf:{src}", "-o", tmp_path / "trt", "--quantize", "int4", "--target", "trt")
    assert r.exit_code == 2 and "--quantize needs the ORT graph passes" in r.output
    assert not (tmp_path / "nc").exists() and not (tmp_path / "trt").exists()
    assert json.loads((art / "manifest.json").read_text())["quantize"]["scheme"] == "int8"


def test_tied_decoder_int4_drops_the_fp32_table(tmp_path):
    """A tiny random Qwen3 with tied embeddings: `--quantize int4` shares the head's bytes with
    the embedding; the artifact generates, and its accuracy against fp32 is reported."""
    from ffnx import artifact
    from ffnx.runtime import Engine

    src = write_config(tmp_path / "src", "qwen3", tie_word_embeddings=True)
    r = cli("export", f"hf:{src}", "-o", tmp_path / "q", "--quantize", "int4")
    assert r.exit_code == 0, r.output
    q = artifact.read_manifest(tmp_path / "q")["quantize"]
    assert len(q["embedding_shared"]) == 1
    model = onnx.load(str(tmp_path / "q" / artifact.MODEL_OPT))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    fp32 = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert not [i.name for i in fp32 if list(i.dims) == [256, 64]]  # no [vocab, hidden] table
    assert q["accuracy"]["logits_cosine"] > 0.97
    tokens = Engine.load(tmp_path / "q", backend="ort").generate([[5, 17, 99]], 8, ignore_eos=True)
    assert tokens.shape == (1, 8)


def test_moe_experts_qmoe_int4_routers_fp32(tmp_path):
    """Mixtral: `--quantize int4` lowers the experts through lower_moe's quantized forms (QMoE,
    or MatMulNBits experts in the If), keeps both routers fp32 (their TopK sits in the If)."""
    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf

    src = write_config(tmp_path / "src", "mixtral")
    art = tmp_path / "art"
    export_artifact(load_hf(str(src), cache=True), art, source=f"hf:{src}", optimize=False)
    # attention's lowering is another pass's business (and times itself): skipped here
    r = cli("optimize", art, "--quantize", "int4", "--skip", "group_query_attention")
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(art)
    q = m["quantize"]
    assert q["experts"] == {"layers": 2, "scheme": "int4", "kept_fp32": {}}
    # the lowering is measured: QMoE, MatMulNBits experts, or an If of both on the token count
    assert q["ops"].get("QMoE", 0) == 2 or q["ops"]["MatMulNBits"] >= q["linears"] + 2 * 4 * 2
    assert [k["reason"] for k in q["kept_fp32"]] == ["router", "router"]
    lowered = [v["lowering"] for p in m["passes"] if p["name"] == "lower_moe"
               for v in p["notes"]["layers"].values()]  # fmt: skip
    assert len(lowered) == 2 and all(x.startswith(("qmoe_int4", "sorted_int4")) for x in lowered)
    # measured: cosine 0.9943, agreement 0.66 (random tiny weights: near-tied logits)
    assert 0.985 < q["accuracy"]["logits_cosine"] < 0.99999


def test_moe_int4_export_is_speed_guarded_on_its_int4_graph(tmp_path, monkeypatch):
    """`ffnx export hf:DIR --quantize int4` on a MoE decoder reruns the passes with quantized
    experts under the speed guard, which times every candidate with its linears quantized
    (`timed_as: int4`), real ORT timing; the artifact still generates transformers'-shaped
    tokens and says what the guard decided."""
    from ffnx import artifact
    from ffnx.runtime import Engine

    monkeypatch.setenv("FFNX_SPEED_GUARD", "on")
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    src = write_config(tmp_path / "src", "mixtral")
    r = cli("export", f"hf:{src}", "-o", tmp_path / "q", "--quantize", "int4")
    assert r.exit_code == 0, r.output
    m = artifact.read_manifest(tmp_path / "q")
    guard = m["speed_guard"]
    assert guard["timed_as"] == "int4" and guard["trials"]
    assert {t["without"] for t in guard["trials"]} <= {p["name"] for p in m["passes"]} | {
        "+".join(guard["dropped"])}  # fmt: skip
    assert m["quantize"]["experts"]["scheme"] == "int4"
    tokens = Engine.load(tmp_path / "q", backend="ort").generate([[5, 17, 99]], 4, ignore_eos=True)
    assert tokens.shape == (1, 4)


def test_mla_int4_folds_the_per_head_products(tmp_path):
    """A dense DeepSeek-V2 (absorbed MLA) whose latent is wider than its heads (R = 32 > d = 16):
    fp32 keeps W_uk and W_uv as batched products (folding would store more bytes), `--quantize
    int4` folds them into q_proj and o_proj (fewer bytes at 0.625 per weight), quantizes all
    linears, and the artifact generates."""
    from ffnx import artifact
    from ffnx.runtime import Engine

    mla = dict(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
               v_head_dim=16, num_key_value_heads=4, first_k_dense_replace=2,
               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)  # fmt: skip
    src = write_config(tmp_path / "src", "deepseek_v2", **mla)
    r = cli("export", f"hf:{src}", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output

    def batched(path) -> int:
        model = onnx.load(str(path))
        inits = {i.name: list(i.dims) for i in model.graph.initializer}
        return sum(n.op_type == "MatMul" and len(inits.get(n.input[1], [])) == 3
                   for n in model.graph.node)  # fmt: skip

    assert batched(tmp_path / "a" / artifact.MODEL_OPT) == 4  # 2 layers x (W_uk, W_uv)
    fold = next(p for p in artifact.read_manifest(tmp_path / "a")["passes"]
                if p["name"] == "fold_head_products")  # fmt: skip
    assert fold["matches"] == 4 and "would store" in fold["skipped"][0]["reason"]
    r = cli("optimize", tmp_path / "a", "--quantize", "int4", "--force")
    assert r.exit_code == 0, r.output
    q = artifact.read_manifest(tmp_path / "a")["quantize"]
    assert q["head_products"] == {"folded": 4, "skipped": []}
    assert "4 per-head products folded into their linears" in " ".join(r.output.split())
    assert batched(tmp_path / "a" / artifact.MODEL_OPT) == 0
    assert q["accuracy"]["logits_cosine"] > 0.97
    tokens = Engine.load(tmp_path / "a", backend="ort").generate([[5, 17, 99]], 8, ignore_eos=True)
    assert tokens.shape == (1, 8)
    r = cli("optimize", tmp_path / "a", "--quantize", "int4", "--skip", "fold_head_products",
            "--force")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "head_products" not in artifact.read_manifest(tmp_path / "a")["quantize"]
    assert batched(tmp_path / "a" / artifact.MODEL_OPT) == 4  # kept fp32
