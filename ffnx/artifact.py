"""Artifact directories: atomic file writes, staging, and `manifest.json` (stdlib only).

An artifact is a directory holding `model.onnx`, optionally `model.opt.onnx` and `model.plan`,
and `manifest.json`. The manifest is written last, so a directory without one is incomplete.
New artifacts are built in a sibling staging directory and renamed into place only when every
step succeeded; a failure leaves any previous artifact untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ffnx.errors import ArtifactError

MANIFEST = "manifest.json"
MODEL = "model.onnx"
MODEL_OPT = "model.opt.onnx"
PLAN = "model.plan"
MODEL_TRT = "model.trt.onnx"  # --target trt: the graph for TensorRT (ffnx ops kept for plugins)
SCHEMA_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(final: str | Path, obj: object) -> None:
    write_bytes_atomic(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool) -> Iterator[Path]:
    """Build a new artifact in a staging dir; on success swap it onto `out` atomically.

    Refuses an existing `out` unless `force`. On failure the staging dir is removed and `out`
    (old artifact or nothing) is left as it was.
    """
    out = Path(out).resolve()
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())
    try:
        yield stage
        if not (stage / MANIFEST).exists():
            raise ArtifactError("internal: artifact staged without a manifest")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def file_hashes(directory: str | Path) -> dict[str, str]:
    """sha256 of every regular file in the artifact except the manifest."""
    d = Path(directory)
    return {
        p.name: sha256(p)
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


REBUILD = {PLAN: "ffnx build {d}", MODEL_OPT: "ffnx optimize {d}"}


def write_manifest(
    directory: str | Path, manifest: dict, made_from: dict[str, list[str]] | None = None
) -> dict:
    """Refresh `files` hashes and write the manifest last, atomically.

    made_from: {file: [files it was made from]}; their current sha256 is recorded under
    `made_from` so that `check_fresh` can refuse a file built from an older source (a source's
    ONNX external data, `<source>.data`, is recorded with it when present)."""
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_hashes(directory)
    prov = dict(manifest.get("made_from", {}))
    for target, sources in (made_from or {}).items():
        sources = [*sources, *(f"{s}.data" for s in sources)]  # ONNX external data, if any
        prov[target] = {s: manifest["files"][s] for s in sources if s in manifest["files"]}
    manifest["made_from"] = {t: v for t, v in prov.items() if t in manifest["files"]}
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not an artifact directory (run `ffnx export` first)")
    path = d / MANIFEST
    if not path.exists():
        raise ArtifactError(
            f"{d} has no {MANIFEST}: the artifact is incomplete (re-run `ffnx export --force`)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from e


def manifest_of_file(path: str | Path) -> dict:
    """The manifest of the artifact an ONNX file belongs to: the manifest.json beside it when it
    lists the file with this very content (sha256), else {} (a bare graph, or a stale copy)."""
    p = Path(path)
    beside = p.parent / MANIFEST
    if not (p.is_file() and beside.is_file()):
        return {}
    try:
        manifest = json.loads(beside.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    listed = manifest.get("files", {}).get(p.name) if isinstance(manifest, dict) else None
    return manifest if listed and listed == sha256(p) else {}


def model_path(
    directory: str | Path,
    manifest: dict | None = None,
    prefer_opt: bool = True,
    target: str = "ort",
) -> Path:
    """The ONNX file to load: the optimized one when present. target="trt" (TensorRT builds)
    prefers model.trt.onnx; ONNX Runtime never gets it (its ffnx ops need the plugins)."""
    d = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(d)
    files = manifest.get("files", {})
    names = (MODEL_OPT, MODEL) if prefer_opt else (MODEL,)
    if target == "trt" and prefer_opt:
        names = (MODEL_TRT, *names)
    for name in names:
        if name in files:
            if not (d / name).exists():
                raise ArtifactError(f"{d / name} is listed in the manifest but missing")
            return d / name
    raise ArtifactError(f"{d} has no ONNX model listed in its manifest")


def check_fresh(directory: str | Path, manifest: dict, name: str) -> None:
    """Refuse `name` when a file it was made from changed since (one line: the rebuild command)."""
    for src, digest in manifest.get("made_from", {}).get(name, {}).items():
        if manifest.get("files", {}).get(src) != digest:
            fix = REBUILD.get(name, "ffnx export ... --force").format(d=directory)
            raise ArtifactError(f"{name} was built from an older {src}: run `{fix}`")


def check_integrity(directory: str | Path, manifest: dict, names: list[str] | None = None) -> None:
    """Compare file hashes against the manifest; raise naming the first mismatch."""
    d = Path(directory)
    for name, digest in manifest.get("files", {}).items():
        if names is not None and name not in names:
            continue
        p = d / name
        if not p.exists():
            raise ArtifactError(f"{p} is listed in the manifest but missing")
        if sha256(p) != digest:
            raise ArtifactError(
                f"{p} does not match its sha256 in the manifest (modified or truncated)"
            )
