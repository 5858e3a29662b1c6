"""Every `Example:` line of every command's --help runs, as written, and exits 0.

Each command's examples run in order in a fresh directory (a shell session: an example may use
what the one before it wrote) holding the inputs examples name: tiny Hugging Face configs
(`qwen3-tiny`, `mixtral-tiny`, `bert-tiny`), `my_model.py` and sample inputs (`ids.npz`,
`calib.npz`). `SETUP` lists the commands a command's examples need first (e.g. `bench --decode`
needs a decoder export). Identical `ffnx export` lines run once per session; later ones get a
copy of that result (same command, same output).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from ffnx.cli import main
from tests.conftest import USER_MODEL

QWEN3 = dict(model_type="qwen3", head_dim=16)
MIXTRAL = dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=256, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2)  # fmt: skip
BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, vocab_size=128, max_position_embeddings=64, type_vocab_size=2,
            architectures=["BertForMaskedLM"])  # fmt: skip

# commands run before a command's examples (that its examples use but do not make)
SETUP = {
    "bench": ["export hf:./qwen3-tiny -o artifacts/qwen3"],
    "build": ["export gpt-moe -o artifacts/gpt-moe --target trt --trt rtx --no-build",
              "export gpt-swiglu -o artifacts/gpt-swiglu"],
}  # fmt: skip


def examples(cmd: click.Command, path: str = "") -> dict[str, list[str]]:
    """{command path: its `Example:`/`Examples:` lines} for `cmd` and its subcommands."""
    out: dict[str, list[str]] = {}
    lines, take = [], False
    for ln in (cmd.help or "").splitlines():
        s = ln.strip()
        if s in ("Example:", "Examples:"):
            take = True
        elif take and not s:
            take = False
        elif take:
            lines.append(s)
    out[path] = lines
    for name, sub in getattr(cmd, "commands", {}).items():
        out.update(examples(sub, f"{path} {name}".strip()))
    return out


def _needs_nvcc(args: list[str]) -> bool:
    return args[:2] == ["plugins", "build"]


def _write_inputs(d: Path) -> None:
    configs = {"qwen3-tiny": {**DECODER, **QWEN3}, "mixtral-tiny": {**DECODER, **MIXTRAL},
               "bert-tiny": BERT}  # fmt: skip
    for name, cfg in configs.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(cfg))
    (d / "my_model.py").write_text(USER_MODEL)
    rng = np.random.default_rng(0)
    ids = {f"input_ids_{i}": rng.integers(0, 256, (2, 16)).astype(np.int64) for i in range(2)}
    np.savez(d / "ids.npz", input_ids=ids["input_ids_0"])
    np.savez(d / "calib.npz", **ids)


@pytest.fixture(scope="module")
def plugin_library() -> str | None:
    """The TensorRT plugin library the build tests compile (cached by source hash), or None."""
    from ffnx.plugins import trt_build
    from tests.build.conftest import HEADERS, _sources_hash

    lib = (
        Path.home() / ".cache" / "ffnx" / "test-plugins" / _sources_hash() / trt_build.LIBRARY_NAME
    )
    if not lib.is_file():
        try:
            trt_build.build_plugin_library(["86"], HEADERS, out_dir=lib.parent)
        except Exception:  # noqa: BLE001 - no nvcc / headers: examples needing it fail loudly
            return None
    return str(lib)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Memo of `ffnx export` runs: args -> (the directory it wrote, its output)."""
    return {"root": tmp_path_factory.mktemp("exports")}


def _key(args: list[str]) -> tuple:
    """An export's identity: its arguments with -o spelled one way and without --force."""
    return tuple("-o" if a in ("--out", "--output") else a for a in args if a != "--force")


def _invoke(args: list[str], cwd: Path, exported: dict):
    if args[0] == "export" and _key(args) in exported:
        done = exported[_key(args)]
        out = _out_dir(args)
        if not (cwd / out).exists() or "--force" in args:
            shutil.rmtree(cwd / out, ignore_errors=True)
            shutil.copytree(done, cwd / out)
        return 0, "(same export as before: copied)"
    r = CliRunner().invoke(main, args)
    if r.exit_code == 0 and args[0] == "export":
        keep = exported["root"] / str(len(exported))
        shutil.copytree(cwd / _out_dir(args), keep)
        exported[_key(args)] = keep
    return r.exit_code, r.output + (f"\n{r.exception!r}" if r.exception else "")


def _out_dir(args: list[str]) -> str:
    i = next(i for i, a in enumerate(args) if a in ("-o", "--out", "--output"))
    return args[i + 1]


COMMANDS = {path: lines for path, lines in examples(main).items() if lines}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: p or "ffnx")
def test_help_examples_run(path, tmp_path, monkeypatch, exported, plugin_library):
    lines = COMMANDS[path]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FFNX_PLUGIN_DIR", str(tmp_path / "plugins"))
    if plugin_library:
        monkeypatch.setenv("FFNX_PLUGIN_LIBRARY", plugin_library)
    _write_inputs(tmp_path)
    skipped = []
    for line in SETUP.get(path, []) + [None] + lines:
        if line is None:
            continue
        args = shlex.split(line, comments=True)
        if args[0] == "ffnx":
            args = args[1:]
        if _needs_nvcc(args) and not os.environ.get("FFNX_TEST_NVCC"):
            skipped.append(line)
            continue
        code, output = _invoke(args, tmp_path, exported)
        assert code == 0, f"`{line}` exited {code}:\n{output}"
    if skipped:
        pytest.skip(f"compiles CUDA with nvcc (minutes; FFNX_TEST_NVCC=1 runs them): {skipped}")


def test_every_command_has_examples():
    names = {"models", "export", "optimize", "build", "run", "bench", "generate", "inspect",
             "plugins", "calibrate", "moefy"}  # fmt: skip
    assert names <= set(COMMANDS)
    assert all(COMMANDS[n] for n in names), {n: COMMANDS[n] for n in names}
