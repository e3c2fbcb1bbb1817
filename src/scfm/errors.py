"""Typed exceptions raised by scfm.

Every failure a user can cause has its own class, and each class also derives from the
builtin exception a Python user would expect (``ValueError``, ``KeyError``, ...), so both
``except scfm.errors.GeneVocabularyError`` and ``except ValueError`` work. Messages name the
problem *and* the fix; they are raised before any heavy work and before the user's AnnData
is modified.
"""

from __future__ import annotations

__all__ = [
    "AnnDataKeyError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointKeyError",
    "CheckpointNotFoundError",
    "CountDataError",
    "DuplicateNamesError",
    "EmptyDataError",
    "GeneVocabularyError",
    "InvalidInputError",
    "NonFiniteOutputError",
    "NotSetupError",
    "OntologyError",
    "ScfmError",
    "SpatialCoordinateError",
    "UnsafeCheckpointError",
]


class ScfmError(Exception):
    """Base class of every error raised deliberately by scfm."""


class InvalidInputError(ScfmError, ValueError):
    """An argument has a value scfm cannot work with (wrong option, wrong shape, ...)."""


class EmptyDataError(ScfmError, ValueError):
    """The AnnData (or the selected subset of it) has no cells or no genes."""


class CountDataError(ScfmError, ValueError):
    """The expression matrix is not raw counts (floats, negatives, NaN or inf values)."""


class DuplicateNamesError(ScfmError, ValueError):
    """``var_names`` or ``obs_names`` are not unique."""


class AnnDataKeyError(ScfmError, KeyError):
    """A key passed to ``setup_anndata`` (obs column, obsm key, layer) does not exist.

    ``KeyError`` quotes its message when printed; ``__str__`` is overridden so that the
    message reads like every other scfm error.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SpatialCoordinateError(ScfmError, ValueError):
    """Spatial coordinates are missing, non-numeric, non-finite or of the wrong shape."""


class GeneVocabularyError(ScfmError, ValueError):
    """Too few genes of the AnnData match the model's gene vocabulary."""


class NotSetupError(ScfmError, ValueError):
    """The AnnData was not registered with the model's ``setup_anndata``."""


class OntologyError(ScfmError, ValueError):
    """A cell-type ontology id is unknown or the ontology file cannot be read."""


class CheckpointError(ScfmError, ValueError):
    """A checkpoint cannot be used by the requested model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path (or a file expected inside it) does not exist."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint file is truncated, corrupted, empty or belongs to another model."""


class CheckpointKeyError(CheckpointError):
    """The weights of a checkpoint do not fit the model (missing, unexpected or mis-shaped keys).

    Parameters
    ----------
    message
        Short description of what was being loaded.
    missing
        Parameter names the model needs but the checkpoint lacks.
    unexpected
        Names present in the checkpoint that the model does not have.
    mismatched
        ``(name, checkpoint shape, model shape)`` triples.
    """

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        lines = [message]
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            shapes = ", ".join(
                f"{name} (checkpoint {tuple(a)} vs model {tuple(b)})"
                for name, a, b in self.mismatched
            )
            lines.append(f"mis-shaped keys ({len(self.mismatched)}): {shapes}")
        lines.append(
            "Check that the checkpoint belongs to this model and release, and that the "
            "architecture arguments match it."
        )
        super().__init__("\n".join(lines))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary unpickling (code execution) to be read.

    scfm reads weights with ``torch.load(weights_only=True)`` or safetensors. A file that
    cannot be read that way is refused unless the caller passes ``trust_checkpoint=True``.
    """


class NonFiniteOutputError(ScfmError, ArithmeticError):
    """A model produced NaN or infinite values; nothing was written.

    Raised instead of writing NaN into ``.obsm`` / ``.varm`` / ``.obs``. Usual causes are
    input values outside what the model was trained on, damaged weights, or float16 overflow
    under mixed precision.
    """
