"""One exception family per user-facing failure; the CLI prints `str(err)` as one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, else its type's name: how a foreign error
    (ONNX Runtime, transformers, onnxruntime-genai) is quoted inside one of ours."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class FfnxError(Exception):
    """Base of every error ffnx reports to a user (one line, non-zero exit)."""


class ModelSpecError(FfnxError):
    """A model name or `module:factory` spec cannot be resolved or called."""


class ExportError(FfnxError):
    """torch -> ONNX export failed (names the module/op and a fix when known)."""


class VerificationError(FfnxError):
    """Numerical check of an export or a pass exceeded its tolerance."""


class ArtifactError(FfnxError):
    """An artifact directory or ONNX file is missing, incomplete or corrupted."""


class InputError(FfnxError):
    """Inputs given to an engine do not match its declared inputs."""


class PassError(FfnxError):
    """A graph pass cannot run (bad arguments, missing calibration data)."""


class LoweringError(FfnxError, ValueError):
    """An ffnx node cannot be lowered (the message names the node and the reason)."""


class RefusedError(FfnxError):
    """A block cannot be expressed as an ffnx op (the message says why)."""


class BackendError(FfnxError):
    """A runtime backend is unavailable or failed to load (missing package, plugin, GPU)."""
