"""Safe, strict primitives shared by every checkpoint reader.

* :func:`resolve_local_path` refuses hub ids and missing paths before anything is read.
* :func:`load_torch_file` reads pickled torch files with ``weights_only=True``; anything that
  needs arbitrary unpickling is refused unless the caller consents with
  ``trust_checkpoint=True``.
* :func:`load_safetensors_file` reads ``.safetensors`` (never executes code).
* :func:`load_finite_torch_file` reads a torch file memory-mapped where it can and checks its
  weights for NaN / inf without making the mapped file resident.
* :func:`load_state_dict_strict` loads a renamed state dict into a module and reports every
  missing, unexpected and mis-shaped key at once.
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Release",
    "check_finite_state_dict",
    "check_finite_torch_file",
    "load_finite_torch_file",
    "load_pickle_dict",
    "load_safetensors_file",
    "load_state_dict_strict",
    "load_torch_file",
    "resolve_local_path",
]


def resolve_local_path(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """Return ``path`` as an existing local :class:`~pathlib.Path`.

    A hub id such as ``"ctheodoris/Geneformer"`` that is not a local path is refused with a
    message that says how to get the files (catalogue release names are resolved before, by
    :func:`scfm.hub.resolve`).

    Raises
    ------
    CheckpointNotFoundError
        If the path does not exist.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.exists():
        return p
    text = os.fspath(path)
    looks_like_hub_id = "://" in text or (text.count("/") == 1 and not text.startswith((".", "/")))
    hint = (
        " It is not a release name of scfm's catalogue either (scfm.hub.releases() lists "
        "them; `scfm fetch NAME` downloads one). Download the release files (e.g. with "
        "`hf download` or from the model's release page) and pass the local folder."
        if looks_like_hub_id
        else " Pass the directory (or file) holding the released checkpoint."
    )
    raise CheckpointNotFoundError(f"The {what} path {text!r} does not exist.{hint}")


def _check_nonempty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointFormatError(
            f"Checkpoint file {str(path)!r} is empty (0 bytes). The download was probably "
            "interrupted: download it again."
        )


def load_torch_file(
    path: str | os.PathLike, *, trust_checkpoint: bool = False, mmap: bool = False
) -> Any:
    """Read a file written by :func:`torch.save` safely, on CPU.

    Parameters
    ----------
    path
        The file.
    trust_checkpoint
        Only if ``True`` and the file cannot be read with ``weights_only=True`` (it contains
        pickled Python objects), fall back to full unpickling. Unpickling can execute
        arbitrary code: pass ``True`` only for files from a source you trust.

    Raises
    ------
    CheckpointFormatError
        If the file is empty, truncated or not a torch file.
    UnsafeCheckpointError
        If the file needs full unpickling and ``trust_checkpoint`` is ``False``.
    """
    p = resolve_local_path(path)
    _check_nonempty(p)
    try:
        # mmap: tensors stay views of the file until used, so a reader that keeps only part
        # of a release (scFoundation's weight sets) never holds the rest in memory.
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err) and not _names_python_objects(p):
            # neither a Python object torch refused (it names the GLOBAL) nor a plain pickle
            # of objects (whose newer protocol torch cannot parse): a damaged file
            raise _unreadable(p, err) from None
        # weights_only refused a global: the file holds Python objects beyond tensors.
        if not trust_checkpoint:
            raise UnsafeCheckpointError(
                f"{str(p)!r} contains pickled Python objects that torch refuses to load "
                f"safely ({str(err).splitlines()[0][:200]}). Loading it could execute code. "
                "If you trust its source, pass trust_checkpoint=True."
            ) from None
        logger.warning("Unpickling %s with weights_only=False (trust_checkpoint=True).", p)
        return torch.load(p, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        # Damaged bytes surface from torch's unpickler as almost any exception type
        # (IndexError, KeyError, UnicodeDecodeError, EOFError, zipfile.BadZipFile, ...).
        raise _unreadable(p, err) from None


def _names_python_objects(path: Path) -> bool:
    """Whether the file is a plain ``pickle.dump`` (protocol >= 3) naming Python objects.

    ``torch.save`` writes protocol 2, so a damaged torch file almost never passes as one.
    Only the opcodes are parsed (:func:`pickletools.genops` executes nothing).
    """
    try:
        with open(path, "rb") as fh:
            ops = [(op.name, arg) for op, arg, _ in pickletools.genops(fh)]
    except Exception:  # not a well-formed pickle
        return False
    plain = ops[0][0] == "PROTO" and int(ops[0][1]) >= 3
    return plain and any(name in {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ"} for name, _ in ops)


def _unreadable(path: Path, err: Exception) -> CheckpointFormatError:
    detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
    return CheckpointFormatError(
        f"{str(path)!r} is not a readable torch checkpoint ({type(err).__name__}: {detail}). "
        "The file is truncated, corrupted or of another format: download it again."
    )


def load_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a dict of CPU tensors.

    Raises
    ------
    CheckpointFormatError
        If the file is empty, truncated or not safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_local_path(path)
    _check_nonempty(p)
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointFormatError(
            f"{str(p)!r} is not a readable safetensors file ({err}). The file is truncated "
            "or corrupted: download it again."
        ) from None


def load_pickle_dict(path: str | os.PathLike, *, what: str = "dictionary") -> dict:
    """Read a pickled vocabulary dictionary (``.pkl``) with a restricted unpickler.

    Only builtin containers, strings, numbers and numpy scalars / arrays are allowed, so a
    malicious pickle cannot execute code.

    Raises
    ------
    CheckpointFormatError
        If the file is not a pickled dict of plain data.
    """
    p = resolve_local_path(path, what=what)
    _check_nonempty(p)
    try:
        with open(p, "rb") as fh:
            obj = _RestrictedUnpickler(fh).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        OverflowError,
    ) as err:
        # A text file or another format read as a pickle fails in any of these ways.
        raise CheckpointFormatError(
            f"The {what} {str(p)!r} cannot be read as a plain pickled dictionary ({err}). "
            "Pass the file shipped with the model release."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"The {what} {str(p)!r} holds a {type(obj).__name__}, not a dict. Pass the "
            "file shipped with the model release."
        )
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs plain data (dict/list/str/int/float, numpy scalars)."""

    _allowed = {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "tuple"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "bool"),
        ("collections", "OrderedDict"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


@dataclass
class Release:
    """What every reader of an original release returns: one shape for all five models.

    Attributes
    ----------
    config
        The release's hyper-parameters as read (the model's config dataclass parses them).
    state_dict
        Tensors already renamed to the scfm module's parameter / buffer names.
    vocabulary
        The release's gene vocabulary (a model-specific object: token dictionaries, gene list).
    files
        The files that were read, by role (``{"weights": ..., "config": ...}``).
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    vocabulary: Any = None
    files: dict[str, Path] = field(default_factory=dict)


#: Elements checked at a time by :func:`check_finite_state_dict`: ``isfinite`` allocates a
#: temporary of the tensor's size, ~117 MB for a 19,374 x 1,024 gene embedding at once.
_FINITE_CHECK_ELEMENTS = 1 << 20


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    step = _FINITE_CHECK_ELEMENTS
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def check_finite_state_dict(state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise :class:`CheckpointFormatError` naming every floating tensor holding NaN or inf."""
    bad = [
        name
        for name, tensor in state_dict.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not _all_finite(tensor)
    ]
    _raise_nonfinite(bad, what)


def _raise_nonfinite(bad: list[str], what: str) -> None:
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointFormatError(
            f"{what} holds NaN or infinite values in {shown}. The file is damaged or was saved "
            "from a diverged run; use another copy of the release."
        )


#: Bytes of a memory-mapped file that :func:`check_finite_torch_file` reads per mapping.
_FINITE_WINDOW_BYTES = 64 << 20


def check_finite_torch_file(
    path: str | os.PathLike,
    select: Callable[[Any], Mapping[str, torch.Tensor]],
    *,
    trust_checkpoint: bool = False,
) -> None:
    """:func:`check_finite_state_dict` of a zip-format torch file, a window at a time.

    A tensor of a memory-mapped file (``torch.load(mmap=True)``) costs no memory until it is
    read; reading it makes its pages resident for as long as the file stays mapped. Checking
    the tensors of the mapping a model then keeps would hold the whole file in memory, also
    the tensors the model never reads (heads, decoders, rows of genes absent from the data).
    So the file is mapped once per window of ~64 MB of tensors, checked and unmapped; the
    caller maps it once more for the model and loads with ``check_finite=False``.

    Parameters
    ----------
    path
        A zip-format torch file (:func:`zipfile.is_zipfile`).
    select
        Returns the state dict to check from the loaded object (e.g. its
        ``"model_state_dict"`` entry); it must not keep references to the tensors.
    trust_checkpoint
        As in :func:`load_torch_file`.

    Raises
    ------
    CheckpointFormatError
        Naming every floating tensor holding NaN or inf.
    """

    def mapped() -> Mapping[str, torch.Tensor]:
        return select(load_torch_file(path, trust_checkpoint=trust_checkpoint, mmap=True))

    # The first window's mapping also plans the windows: sizes and dtypes come from the
    # file's index, so planning reads no tensor pages and the index is unpickled once per
    # window, not once more.
    state: Mapping[str, torch.Tensor] | None = mapped()
    bad: list[str] = []
    for names in _finite_windows(state):
        if state is None:
            state = mapped()
        bad += [name for name in names if not _all_finite(state[name])]
        state = None  # unmapped before the next window: its read pages leave with it
    _raise_nonfinite(bad, str(path))


def _finite_windows(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The floating tensors of ``state`` by name, in windows of ``_FINITE_WINDOW_BYTES``.

    A tensor larger than a window is a window of its own; there is always one window. Only
    shapes and dtypes are read. A function of its own so that no loop variable outlives it:
    one would keep a tensor, and with it the mapping its window read, alive.
    """
    windows: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            if size and size + tensor.nbytes > _FINITE_WINDOW_BYTES:
                windows.append([])
                size = 0
            windows[-1].append(name)
            size += tensor.nbytes
    return windows


def load_finite_torch_file(
    path: str | os.PathLike,
    select: Callable[[Any], Mapping[str, torch.Tensor]],
    *,
    trust_checkpoint: bool = False,
) -> tuple[Any, Mapping[str, torch.Tensor]]:
    """:func:`load_torch_file`, memory-mapped where possible, with every weight checked finite.

    A zip-format torch file (:func:`zipfile.is_zipfile`; ``torch.save``'s format since torch
    1.6) is memory-mapped: its tensors stay views of the file, so a module that takes them
    (``assign=True``) holds them once and what it never reads never enters memory. It is
    checked by :func:`check_finite_torch_file`, a window at a time. A file in torch's legacy
    format cannot be mapped: it is read whole and checked by :func:`check_finite_state_dict`.
    Either way, load the tensors with ``load_state_dict_strict(..., check_finite=False)``.

    Parameters
    ----------
    path
        The file.
    select
        Returns the state dict to check from the loaded object, raising
        :class:`~scfm.errors.CheckpointFormatError` if the object is not laid out as expected
        (it runs before the check, which relies on that layout). It is called again on each
        window's mapping, so it must not keep references to the tensors.
    trust_checkpoint
        As in :func:`load_torch_file`.

    Returns
    -------
    The loaded object and ``select`` of it (views of the file when it is mapped).

    Raises
    ------
    CheckpointFormatError
        If the file is empty, truncated or not a torch file, if ``select`` refuses it, or
        naming every floating tensor holding NaN or inf.
    UnsafeCheckpointError
        If the file needs full unpickling and ``trust_checkpoint`` is ``False``.
    """
    mapped = zipfile.is_zipfile(path)
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint, mmap=mapped)
    state = select(obj)
    if mapped:  # not through the caller's mapping, whose read pages would stay resident
        check_finite_torch_file(path, select, trust_checkpoint=trust_checkpoint)
    else:
        check_finite_state_dict(state, what=str(path))
    return obj, state


def _declared(module: torch.nn.Module, attr: str, keys: Iterable[str]) -> list[str]:
    """Keys of ``keys`` matching any regex in the module class's ``attr`` load rule."""
    patterns = [re.compile(p) for p in getattr(type(module), attr, ())]
    return [k for k in keys if any(p.search(k) for p in patterns)]


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str = "checkpoint",
    ignore_unexpected: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    assign: bool = False,
    check_finite: bool = True,
) -> None:
    """Copy ``state_dict`` into ``module``, reporting every problem at once.

    Parameters
    ----------
    module
        The target module.
    state_dict
        Tensors already renamed to the module's parameter / buffer names.
    what
        Name of the source, used in the error message.
    ignore_unexpected
        Exact checkpoint keys that are known to be unused (e.g. ``position_ids`` buffers);
        they are dropped silently.
    allow_missing
        Exact module keys that may be absent (e.g. non-persistent or derived tensors).
    assign
        Use the given tensors as the module's parameters instead of copying them
        (:meth:`torch.nn.Module.load_state_dict`'s ``assign``; for modules built on the meta
        device, so weights are never held twice). Every tensor still on the meta device
        afterwards is an error, except the optional ones the file lacks, which the caller
        initialises.
    check_finite
        Check every floating tensor for NaN / inf first. ``False`` only where the reader
        checked the file already (:func:`check_finite_torch_file` for a memory-mapped file,
        whose pages a second check here would make resident).

    Notes
    -----
    The module class declares the rules of every release once, as regex lists
    ``_keys_to_ignore_on_load_unexpected`` and ``_keys_to_ignore_on_load_missing`` (HF
    transformers' names); they are applied in addition to the exact keys passed here.

    Raises
    ------
    CheckpointKeyError
        Listing every missing, unexpected and mis-shaped key.
    CheckpointFormatError
        If a tensor holds NaN or inf values, or (``assign``) a required tensor of a module
        built on the meta device got no value.
    """
    target = module.state_dict()
    ignore = set(ignore_unexpected) | set(
        _declared(module, "_keys_to_ignore_on_load_unexpected", state_dict)
    )
    optional = set(allow_missing) | set(
        _declared(module, "_keys_to_ignore_on_load_missing", target)
    )
    provided = {k: v for k, v in state_dict.items() if k not in ignore}
    if check_finite:
        check_finite_state_dict(provided, what=what)
    missing = sorted(k for k in target if k not in provided and k not in optional)
    unexpected = sorted(k for k in provided if k not in target)
    mismatched = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in provided.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(
            f"The weights in {what} do not fit {type(module).__name__}.",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    module.load_state_dict(
        {k: v for k, v in provided.items() if k in target}, strict=not optional, assign=assign
    )
    if assign:  # a module built on the meta device must now hold every required tensor
        unset = sorted(
            name
            for name, tensor in (*module.named_parameters(), *module.named_buffers())
            if tensor.is_meta and name not in optional
        )
        if unset:
            raise CheckpointFormatError(
                f"{what} provides no value for {', '.join(unset)} of {type(module).__name__}, "
                "which was built without values; this release layout is not supported."
            )
