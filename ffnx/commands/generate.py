"""`ffnx generate`: tokens from a KV-cache decoder artifact (`ffnx export hf:DIR`)."""

from __future__ import annotations

import json
import sys
import time

import click

from ffnx.commands import grammar, ui
from ffnx.errors import ArtifactError, InputError


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as e:
        raise InputError(
            f"bad --prompt-ids {text!r}; expected comma-separated ints, e.g. 1,2,3"
        ) from e
    if not ids:
        raise InputError("--prompt-ids is empty; expected comma-separated ints, e.g. 1,2,3")
    return ids


def load_tokenizer(engine):
    """The artifact's tokenizer.json through `tokenizers`, or None when it has none."""
    name = engine.manifest.get("decoder", {}).get("tokenizer")
    if not name:
        return None
    from pathlib import Path

    from ffnx import artifact

    path = Path(engine.path) / name
    artifact.check_integrity(engine.path, engine.manifest, [name])
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ArtifactError("text prompts need `tokenizers`: pip install tokenizers") from e
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise ArtifactError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e}") from e


@click.command("generate", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path())
@click.option("--prompt", help="Text prompt (needs tokenizer.json in the artifact).")
@click.option("--prompt-ids", help="Prompt as token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens.")
@click.option("--threads", type=int, default=None, help="CPU threads.")
@grammar.json_option("Print one JSON object instead of text.")
@click.pass_context
def generate_cmd(ctx, path, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                 ignore_eos, threads, as_json) -> None:  # fmt: skip
    """Generate tokens from a KV-cache decoder artifact, streaming them as they come.

    \b
    Example:
      ffnx export hf:./qwen3-tiny -o artifacts/qwen3
      ffnx generate artifacts/qwen3 --prompt-ids 1,2,3 --max-new-tokens 16 --json
      ffnx generate artifacts/qwen3 --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0
    """
    from ffnx.runtime import Engine

    if (prompt is None) == (prompt_ids is None):
        raise InputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if temperature == 0:
        grammar.unused(ctx, "with --temperature > 0 (sampling)", "top_k", "top_p", "seed")
    engine = Engine.load(path, backend="ort", **({"threads": threads} if threads else {}))
    tok = load_tokenizer(engine)
    if prompt is not None:
        if tok is None:
            raise InputError(f"{path} has no tokenizer.json; use --prompt-ids")
        ids = tok.encode(prompt).ids
    else:
        ids = _parse_ids(prompt_ids)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  ignore_eos=ignore_eos)  # fmt: skip
    new: list[int] = []
    t0 = time.perf_counter()
    for step in engine.stream([ids], max_new_tokens, **kwargs):
        new.append(int(step[0]))
        if not as_json and tok is not None:
            sys.stdout.write(tok.decode([new[-1]]) + " ")
            sys.stdout.flush()
        elif not as_json:
            sys.stdout.write(f"{new[-1]} ")
            sys.stdout.flush()
    seconds = time.perf_counter() - t0
    if as_json:
        out = {"prompt_ids": ids, "new_ids": new, "seconds": round(seconds, 4)}
        if tok is not None:
            out["text"] = tok.decode(new)
        click.echo(json.dumps(out))
    else:
        sys.stdout.write("\n")
        ui.err.print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tok/s)")


COMMANDS = [generate_cmd]
