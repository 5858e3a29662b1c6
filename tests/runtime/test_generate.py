"""`Engine.generate` / `Engine.stream` on KV-cache decoder artifacts: greedy tokens equal
transformers' greedy `generate` over 32 steps (random tiny weights), at batch 1 and for a
left-padded batch of 2, with the standard-ops attention and with GroupQueryAttention (caches
Concat-style or one shared buffer); sampling, EOS and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffnx.errors import InputError

pytest.importorskip("transformers")

from tests.models.test_hf_decoder import ARCHS, FAST, write_config  # noqa: E402

STEPS = 32
PARAMS = [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
GQA_FORMS = ("gqa", "gqa_shared")  # group_query_attention's forms (kv_buffer concat / shared)
GQA_PARAMS = [
    (a, f) if a in ("llama", "qwen3", "mistral") else pytest.param(a, f, marks=pytest.mark.slow)
    for a in ARCHS
    for f in GQA_FORMS
]


class _env:
    """Set one environment variable inside a `with` (module fixtures have no monkeypatch)."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def __enter__(self):
        import os

        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        import os

        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """model_type -> (Engine, transformers model), exported once per module (passes on)."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine

    made = {}

    def get(model_type: str):
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            src = write_config(root / "src", model_type)
            write_tokenizer(src / "tokenizer.json")
            spec = load_hf(str(src), cache=True)
            with _env("FFNX_ATTENTION", "standard"):  # the exported ops; GQA below
                export_artifact(spec, root / "art", source=f"hf:{src}")
            made[model_type] = (Engine.load(root / "art", backend="ort"), spec.module.model)
        return made[model_type]

    return get


@pytest.fixture(scope="module")
def gqa_engines(artifacts, tmp_path_factory):
    """(model_type, form) -> (Engine, transformers model, pass report): the artifact's
    model.opt.onnx through group_query_attention with that form forced, run by an Engine with
    the artifact's manifest."""
    import onnx

    from ffnx.models.hf_decoder import cache_geometry, decoder_inputs
    from ffnx.passes.optimize import manifest_options, optimize_model
    from ffnx.runtime import Engine
    from ffnx.runtime.backends.ort import OrtBackend

    made = {}

    def get(model_type: str, form: str, fuse_rotary: bool = True):
        """fuse_rotary: the pass gets the decoder's max_length (as export and optimize give
        it), so the rotary goes into GQA; without it the RotaryEmbedding nodes stay."""
        if (model_type, form, fuse_rotary) not in made:
            engine, model = artifacts(model_type)
            src = onnx.load(engine.path + "/model.opt.onnx")
            feeds = [{k: v.numpy() for k, v in decoder_inputs(cache_geometry(model), b, t, p, 256,
                                                              left_pad=1).items()}
                     for b, t, p in ((2, 3, 5), (1, 2, 3))]  # fmt: skip
            opts = manifest_options(engine.manifest) if fuse_rotary else {}
            with _env("FFNX_ATTENTION", form):
                new, (report,) = optimize_model(src, feeds, passes=["group_query_attention"],
                                                options=opts)  # fmt: skip
            path = tmp_path_factory.mktemp(f"{model_type}-{form}") / "model.gqa.onnx"
            onnx.save(new, str(path))
            gqa = Engine(OrtBackend.load(str(path)), engine.manifest, engine.path)
            made[model_type, form, fuse_rotary] = (gqa, model, report)
        return made[model_type, form, fuse_rotary]

    return get


def write_tokenizer(path) -> None:
    """A WordLevel tokenizer over the 256 ids: token i is the word `w{i}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def hf_greedy(model, rows: list[list[int]], steps: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)  # fmt: skip
    return out[:, width:].numpy()


@pytest.mark.parametrize("model_type", PARAMS)
def test_greedy_tokens_equal_transformers_generate(artifacts, model_type):
    engine, model = artifacts(model_type)
    rng = np.random.default_rng(1)
    one = [rng.integers(3, 256, 6).tolist()]
    got = engine.generate(one, STEPS, ignore_eos=True)
    assert got.shape == (1, STEPS) and got.dtype == np.int64
    np.testing.assert_array_equal(got, hf_greedy(model, one, STEPS))
    two = [rng.integers(3, 256, 7).tolist(), rng.integers(3, 256, 4).tolist()]  # left-padded
    got = engine.generate(two, STEPS, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(model, two, STEPS))
    alone = engine.generate([two[1]], STEPS, ignore_eos=True)  # padding changes nothing
    np.testing.assert_array_equal(got[1:], alone)


@pytest.mark.parametrize("model_type, form", GQA_PARAMS)
def test_gqa_greedy_tokens_equal_transformers_generate(gqa_engines, model_type, form):
    from ffnx.runtime.generate import kv_buffer

    engine, model, report = gqa_engines(model_type, form)
    layers = engine.manifest["decoder"]["layers"]
    assert report["status"] == "applied" and report["applied"] == layers, report
    assert report["notes"]["kv_buffer"] == ("shared" if form == "gqa_shared" else "concat")
    assert kv_buffer(engine.backend.session) == report["notes"]["kv_buffer"]
    assert report["notes"]["rotary"] == "fused (do_rotary)", report["notes"]
    assert not ops(engine, "RotaryEmbedding") and ops(engine, "GroupQueryAttention") == layers
    # the causal + padding mask becomes padding-only (GQA is causal itself); Mistral's sliding
    # window (6, shorter than prompt + decode) is not padding-only: its mask stays
    mask = report["notes"]["mask"]
    if model_type == "mistral":
        assert not mask.startswith("padding only") and "window" in mask, report["notes"]
    elif model_type in ("llama", "qwen3"):
        assert mask.startswith("padding only"), report["notes"]
    # a fused QKV projection feeds GQA whole (packed query); Qwen3's q/k norms sit in between
    packed = model_type not in ("qwen3", "qwen3_moe")
    assert report["notes"]["qkv"] == (f"packed, {layers} layer(s)" if packed else "separate")
    if model_type in ("llama", "mistral", "qwen3"):  # (MoE lowerings split tokens themselves)
        assert qkv_splits(engine) == (0 if packed else layers), report["notes"]
    _greedy_equal(engine, model)


def ops(engine, op: str) -> int:
    import onnx

    model = onnx.load(engine.backend.path, load_external_data=False)
    return sum(n.op_type == op for n in model.graph.node)


def qkv_splits(engine) -> int:
    """Split nodes whose parts GroupQueryAttention reads (its query, key and value)."""
    import onnx

    model = onnx.load(engine.backend.path, load_external_data=False)
    read = {i for n in model.graph.node if n.op_type == "GroupQueryAttention" for i in n.input}
    return sum(n.op_type == "Split" and bool(read & set(n.output)) for n in model.graph.node)


def _greedy_equal(engine, model) -> None:
    """Greedy tokens equal transformers' at batch 1 and for a left-padded batch of 2, and the
    padded row gives the tokens it gives alone."""
    rng = np.random.default_rng(1)
    one = [rng.integers(3, 256, 6).tolist()]
    np.testing.assert_array_equal(engine.generate(one, STEPS, ignore_eos=True),
                                  hf_greedy(model, one, STEPS))  # fmt: skip
    two = [rng.integers(3, 256, 7).tolist(), rng.integers(3, 256, 4).tolist()]  # left-padded
    got = engine.generate(two, STEPS, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(model, two, STEPS))
    np.testing.assert_array_equal(got[1:], engine.generate([two[1]], STEPS, ignore_eos=True))


def test_gqa_without_max_length_keeps_the_rotary_and_is_exact(gqa_engines):
    engine, model, report = gqa_engines("qwen3", "gqa_shared", fuse_rotary=False)
    assert "no maximum length" in report["notes"]["rotary"], report["notes"]
    assert ops(engine, "RotaryEmbedding") == 2 * engine.manifest["decoder"]["layers"]
    _greedy_equal(engine, model)


def test_gqa_shared_buffer_is_bound_once_and_written_in_place(gqa_engines):
    """A step binds the same OrtValue as past and present: the buffer allocated before
    generation holds the cache afterwards (rows past the last fed token stay zero)."""
    from ffnx.runtime import generate as gen

    engine, _, _ = gqa_engines("llama", "gqa_shared")
    seen = []
    real = gen._OrtStepper.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self)

    gen._OrtStepper.__init__ = spy
    try:
        engine.generate([[5, 17, 99]], 6, ignore_eos=True)
    finally:
        gen._OrtStepper.__init__ = real
    (stepper,) = seen
    assert stepper.cache is None and len(stepper.host) == 2 * 2 and stepper.io is not None
    host = stepper.host[0]  # [batch 1, kv 2, 3 + 6, dim 16]: 3 prompt + 5 fed tokens written
    assert host.shape == (1, 2, 9, 16)
    assert np.abs(host[:, :, :8]).min(axis=-1).max() > 0 and not host[:, :, 8:].any()


def test_export_runs_group_query_attention_by_default(tmp_path):
    """Through `export_artifact` with the default passes (FFNX_ATTENTION=rule: GQA, shared
    buffer, no timing): the manifest reports it, and greedy tokens still equal transformers'."""
    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine
    from ffnx.runtime.generate import kv_buffer

    spec = load_hf(str(write_config(tmp_path / "src", "qwen3", num_hidden_layers=1)), cache=True)
    with _env("FFNX_ATTENTION", "rule"):
        export_artifact(spec, tmp_path / "art", source=f"hf:{tmp_path / 'src'}")
    report = {r["name"]: r for r in artifact.read_manifest(tmp_path / "art")["passes"]}
    gqa = report["group_query_attention"]
    assert gqa["status"] == "applied" and gqa["notes"]["kv_buffer"] == "shared", gqa
    assert gqa["notes"]["rotary"] == "fused (do_rotary)", gqa
    assert gqa["notes"]["why"].startswith("rule")
    engine = Engine.load(tmp_path / "art", backend="ort")
    assert kv_buffer(engine.backend.session) == "shared"
    rows = [[9, 8, 7, 6, 5], [3, 4]]
    got = engine.generate(rows, STEPS, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(spec.module.model, rows, STEPS))


GPT_OSS = dict(model_type="gpt_oss", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
               max_position_embeddings=512, tie_word_embeddings=False, num_local_experts=4,
               num_experts_per_tok=2, sliding_window=6,
               layer_types=["sliding_attention", "full_attention"])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("form", GQA_FORMS)
def test_gpt_oss_sinks_and_sliding_window_through_gqa(tmp_path, form):
    """GPT-OSS: attention sinks become GQA's head_sink, the sliding-window layer keeps its
    window in the mask; greedy tokens equal transformers' over 32 steps (batch 1, left-padded
    batch 2)."""
    import json

    import onnx

    from ffnx.export.capture import captured
    from ffnx.export.torch_export import export_onnx
    from ffnx.lowering import runnable
    from ffnx.models.hf import load_hf
    from ffnx.models.hf_decoder import cache_geometry, decoder_inputs
    from ffnx.passes.optimize import manifest_options, optimize_model
    from ffnx.runtime import Engine
    from ffnx.runtime.backends.ort import OrtBackend

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(GPT_OSS))
    spec = load_hf(str(tmp_path / "src"), cache=True)
    with captured(spec.module, "ort"):
        export_onnx(spec, tmp_path / "model.onnx")
    model = spec.module.model
    feeds = [{k: v.numpy() for k, v in decoder_inputs(cache_geometry(model), b, t, p, 256,
                                                      left_pad=1).items()}
             for b, t, p in ((2, 3, 5), (1, 2, 3))]  # fmt: skip
    with _env("FFNX_ATTENTION", form):
        graph = runnable(onnx.load(str(tmp_path / "model.onnx")))
        passes = ["rotary_embedding", "group_query_attention"]
        opts = manifest_options(spec.manifest_extra)
        new, (_, report) = optimize_model(graph, feeds, passes=passes, options=opts)
    assert report["status"] == "applied" and report["applied"] == 2, report
    # GPT-OSS writes its rotary as chunk halves (x1*cos - x2*sin, x2*cos + x1*sin):
    # rotary_embedding matches that form, and GQA rotates q/k itself (yarn-scaled tables)
    assert report["notes"]["rotary"] == "fused (do_rotary)"
    gqa = [n for n in new.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[11] for n in gqa)  # head_sink on both layers
    onnx.save(new, str(tmp_path / "gqa.onnx"))
    engine = Engine(OrtBackend.load(str(tmp_path / "gqa.onnx")), spec.manifest_extra, "")
    rng = np.random.default_rng(1)
    for rows in ([rng.integers(3, 256, 6).tolist()],
                 [rng.integers(3, 256, 9).tolist(), rng.integers(3, 256, 4).tolist()]):  # fmt: skip
        got = engine.generate(rows, STEPS, ignore_eos=True)
        np.testing.assert_array_equal(got, hf_greedy(model, rows, STEPS))


def test_stream_sampling_and_eos(artifacts):
    engine, _ = artifacts("llama")
    prompt = np.array([[5, 17, 99, 3]], dtype=np.int64)
    greedy = engine.generate(prompt, 8, ignore_eos=True)
    np.testing.assert_array_equal(engine.generate([5, 17, 99, 3], 8, ignore_eos=True), greedy)
    streamed = np.stack(list(engine.stream(prompt, 8, ignore_eos=True)), axis=1)
    np.testing.assert_array_equal(streamed, greedy)
    top1 = engine.generate(prompt, 8, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy whatever the draw
    a = engine.generate(prompt, 8, temperature=1.5, top_p=0.9, seed=11, ignore_eos=True)
    b = engine.generate(prompt, 8, temperature=1.5, top_p=0.9, seed=11, ignore_eos=True)
    np.testing.assert_array_equal(a, b)
    hot = [engine.generate(prompt, 8, temperature=5.0, seed=s, ignore_eos=True) for s in range(4)]
    assert any(not np.array_equal(h, greedy) for h in hot)  # sampling really samples
    stop = int(greedy[0, 2])
    out = engine.generate(prompt, 8, eos_token_id=stop)
    first = int(np.argmax(greedy[0] == stop))
    assert out.shape == (1, first + 1) and int(out[0, -1]) == stop


def test_bad_inputs_are_input_errors(artifacts, tmp_path):
    from ffnx.runtime import Engine

    engine, _ = artifacts("llama")
    with pytest.raises(InputError, match=r"token ids must be in \[0, 256\)"):
        engine.generate([[1, 300]], 4)
    with pytest.raises(InputError, match="maximum length 512"):
        engine.generate([[1, 2]], 600)
    with pytest.raises(InputError, match="at least one token"):
        engine.generate([[]], 4)
    import shutil

    shutil.copy(engine.path + "/model.onnx", tmp_path / "bare.onnx")
    bare = Engine.load(tmp_path / "bare.onnx")  # no manifest beside it: not known as a decoder
    with pytest.raises(InputError, match="not a KV-cache decoder"):
        bare.generate([[1, 2]], 4)
    # the artifact's own model.onnx: the manifest beside it lists this content, so it is one
    inside = Engine.load(engine.path + "/model.onnx")
    assert inside.manifest["decoder"] == engine.manifest["decoder"]
    want = engine.generate([[1, 2, 3]], 8, ignore_eos=True)
    np.testing.assert_array_equal(inside.generate([[1, 2, 3]], 8, ignore_eos=True), want)
    (tmp_path / "stale").mkdir()  # a manifest that lists other content is not used
    shutil.copy(engine.path + "/manifest.json", tmp_path / "stale" / "manifest.json")
    shutil.copy(engine.path + "/model.opt.onnx", tmp_path / "stale" / "model.onnx")
    assert Engine.load(tmp_path / "stale" / "model.onnx").manifest == {}


def cli(*args):
    from click.testing import CliRunner

    from ffnx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_generate_text_and_ids(artifacts):
    import json

    from ffnx import artifact

    engine, _ = artifacts("llama")
    manifest = artifact.read_manifest(engine.path)
    assert manifest["decoder"]["tokenizer"] == "tokenizer.json"
    assert manifest["files"]["tokenizer.json"] == artifact.sha256(engine.path + "/tokenizer.json")
    want = engine.generate([[5, 17, 99]], 6, ignore_eos=True)[0].tolist()
    r = cli("generate", engine.path, "--prompt", "w5 w17 w99", "--max-new-tokens", 6,
            "--ignore-eos", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["prompt_ids"] == [5, 17, 99] and out["new_ids"] == want
    assert out["text"] == " ".join(f"w{i}" for i in want)
    r = cli("generate", engine.path, "--prompt-ids", "5,17,99", "--max-new-tokens", 6,
            "--ignore-eos", "--json")  # fmt: skip
    assert json.loads(r.output.strip().splitlines()[-1])["new_ids"] == want


def test_cli_generate_bad_inputs_one_error_line(artifacts):
    engine, _ = artifacts("llama")
    for args, msg in (
        (("--prompt-ids", "1,x"), "error: bad --prompt-ids '1,x'"),
        ((), "error: give exactly one of --prompt TEXT or --prompt-ids"),
        (("--prompt-ids", "1,999"), "error: token ids must be in [0, 256)"),
    ):
        r = cli("generate", engine.path, *args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(msg), r.output


def test_cli_on_a_decoder_graph_file(artifacts, tmp_path):
    """A decoder's .onnx inside its artifact runs with the manifest's related dims (mask length
    = past + seq); a bare copy, whose random inputs cannot agree, fails with one error line and
    writes nothing."""
    import shutil

    engine, _ = artifacts("llama")
    inside = engine.path + "/model.onnx"
    assert cli("run", inside, "--json").exit_code == 0
    r = cli("optimize", inside, "-o", tmp_path / "o.onnx", "--passes", "static_reshape")
    assert r.exit_code == 0 and (tmp_path / "o.onnx").exists(), r.output
    shutil.copy(inside, tmp_path / "bare.onnx")
    for args, msg, fix in (
        (("run", tmp_path / "bare.onnx"), "error: ONNX Runtime cannot run",
         "give --data FILE.npz with inputs it runs on, or run the artifact directory"),
        (("bench", tmp_path / "bare.onnx", "--iters", 2), "error: ONNX Runtime cannot run",
         "bench the artifact directory"),
        (("optimize", tmp_path / "bare.onnx", "-o", tmp_path / "b.onnx"),
         "error: the graph does not run on its sample inputs",
         "give --data FILE.npz with inputs it runs on, or optimize the artifact directory"),
    ):  # fmt: skip
        r = cli(*args)
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert r.exit_code == 1 and len(errors) == 1 and errors[0].startswith(msg), r.output
        assert fix in errors[0], errors[0]
        assert "Traceback" not in r.output and "internal error" not in r.output
    assert not (tmp_path / "b.onnx").exists()


def test_generate_module_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, ffnx.runtime.generate, ffnx.runtime.engine; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'onnx')))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_decode_stats_math():
    from ffnx.runtime.decode_bench import decode_stats

    s = decode_stats(0.5, [1.0, 1.1, 1.3, 1.6], batch=2, prompt_len=10)
    assert s["ttft_ms"] == 500 and s["prefill_tok_s"] == 40 and s["new_tokens"] == 4
    assert abs(s["decode_tok_s"] - 2 / 0.2) < 1e-9 and abs(s["itl_p50_ms"] - 200) < 1e-6


def test_cli_bench_decode_json(artifacts, tmp_path):
    import json

    engine, _ = artifacts("llama")
    out = tmp_path / "d.json"
    r = cli("bench", engine.path, "--decode", "--prompt-len", 4, "--new-tokens", 3, "--batch", 2,
            "--compare", "torch", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]
    assert [x["runtime"] for x in res] == ["ffnx (ort)", "transformers (torch eager)"]
    assert all(x["new_tokens"] == 3 and x["decode_tok_s"] > 0 for x in res)


def test_moe_decoder_exports_with_the_measured_attention_choice(tmp_path, monkeypatch):
    """The measured choice (no FFNX_ATTENTION) on an MoE decoder: the attention forms are timed
    on the graph ORT runs (MoE lowered), not on one with ffnx::FfnxMoE left in it."""
    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine

    monkeypatch.delenv("FFNX_ATTENTION", raising=False)
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    spec = load_hf(str(write_config(tmp_path / "src", "mixtral", num_hidden_layers=1)), cache=True)
    export_artifact(spec, tmp_path / "art", source=f"hf:{tmp_path / 'src'}")
    report = {r["name"]: r for r in artifact.read_manifest(tmp_path / "art")["passes"]}
    assert report["lower_moe"]["status"] == "applied"
    gqa = report["group_query_attention"]
    assert gqa["status"] in ("applied", "skipped"), gqa
    assert "timings_ms" in gqa["notes"], gqa  # measured (busy machine or not), not the rule
    rows = [[9, 8, 7, 6, 5]]
    got = Engine.load(tmp_path / "art", backend="ort").generate(rows, 8, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(spec.module.model, rows, 8))


def test_runtime_reads_the_lowering_records_key():
    """The runtime names the metadata key without importing ffnx.graph: they must agree."""
    from ffnx.graph import lowering_meta
    from ffnx.runtime import generate

    assert generate.LOWERINGS_KEY == lowering_meta.KEY
