"""onnxruntime-genai for `ffnx bench --decode --compare genai` and benchmarks/decode.py.

`python -m onnxruntime_genai.models.builder -m HF -o OUT -p fp32|int4|int8 -e cpu` on the
checkpoint as ffnx loaded it (saved with `save_pretrained`, so random-weight configs get the same
weights), cached in ~/.cache/ffnx/genai/<sha256 of the checkpoint files, precision, genai
version> ($FFNX_CACHE_DIR overrides ~/.cache/ffnx). Quantized artifacts compare with genai at the
same precision (its CPU defaults: MatMulNBits, block 32, symmetric, accuracy level 4). Where the
builder refuses the architecture (Qwen3-MoE, Mixtral) the answer is the line
"genai does not support <model_type>".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ffnx.errors import first_line


def _cache_root() -> Path:
    return Path(os.environ.get("FFNX_CACHE_DIR") or Path.home() / ".cache" / "ffnx")


def genai_model(source: str, model, precision: str) -> Path | str:
    """The genai model directory for this checkpoint (built once, cached), or the one-line
    reason the builder refused it ("genai does not support <model_type>", cached) or failed
    ("onnxruntime-genai's model builder failed: <its last line>": GPT-OSS without its MXFP4
    tensors, say), so that ffnx's own row is still reported."""
    import onnxruntime_genai as og

    h = hashlib.sha256(f"{precision} {og.__version__}".encode())
    src = Path(source).expanduser()
    for p in sorted(src.iterdir()) if src.is_dir() else [src]:
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"):
            h.update(p.name.encode() + p.read_bytes())
    root = _cache_root() / "genai" / h.hexdigest()[:20]
    out = root / "model"
    if (out / "genai_config.json").exists():
        return out
    refused = root / "refused.txt"
    if refused.exists():
        return refused.read_text().strip()
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # its shard-writing progress bar
            model.save_pretrained(Path(tmp) / "hf")
        _tokenizer(src, Path(tmp) / "hf", model.config.get_text_config())
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", f"{tmp}/hf", "-o",
               f"{tmp}/model", "-p", precision, "-e", "cpu", "-c", f"{tmp}/cache"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            if "not currently supported" in r.stderr + r.stdout:
                why = f"genai does not support {model.config.model_type}"
                refused.write_text(why + "\n")
                return why
            last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
            return f"onnxruntime-genai's model builder failed: {last}"  # (not cached)
        os.replace(f"{tmp}/model", out)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def _tokenizer(src: Path, dst: Path, config) -> None:
    """The builder needs a tokenizer: the checkpoint's, else a word-level one over the ids
    (token i is `w{i}`, EOS the config's or 0; timing and token ids do not depend on it)."""
    import shutil

    found = [src / f for f in TOKENIZER_FILES if (src / f).is_file()] if src.is_dir() else []
    for f in found:
        shutil.copy(f, dst / f.name)
    if found:
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = int(config.vocab_size)
    eos = config.eos_token_id
    eos = int((eos if isinstance(eos, int) else (eos or [0])[0]) or 0)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(dst / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0", "eos_token": f"w{eos}"}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


def genai_decode(model_dir: Path, prompt: np.ndarray, new_tokens: int, threads) -> dict | str:
    """onnxruntime-genai greedy generation (EOS ignored: min_length), timed like ffnx's; where
    genai fails at run time, the line "onnxruntime-genai failed: <its first line>"."""
    import onnxruntime_genai as og

    from ffnx.runtime.decode_bench import decode_stats, settle

    cfg = og.Config(str(model_dir))
    if threads:
        opts = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    model = og.Model(cfg)
    batch, plen = prompt.shape

    def run(n: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=plen + n, min_length=plen + n, do_sample=False,
                                  batch_size=batch)  # fmt: skip
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        times, toks = [], []
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter())
            toks.append(np.asarray(gen.get_next_tokens(), np.int64).reshape(batch))
        return times[0] - t0, times, toks

    # warm-up at the timed length: genai sizes its caches by max_length, and a sliding-window
    # layer refuses a cache below its window
    settle()
    try:
        run(new_tokens)
    except Exception as e:  # its runtime's checks (RuntimeError, OrtException): one line
        return f"onnxruntime-genai failed: {first_line(e)}"
    ttft, times, toks = run(new_tokens)
    return {**decode_stats(ttft, times, batch, plen), "tokens": np.stack(toks, axis=1)}
