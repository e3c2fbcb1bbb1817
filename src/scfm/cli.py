"""The ``scfm`` command line: ``scfm embed``, ``scfm demo`` (and the release catalogue).

``scfm embed`` adds a model's embeddings to a copy of an ``.h5ad`` file and changes nothing
else in it; ``scfm demo`` runs a complete, offline first experience on data shipped with
scfm. Parsing imports nothing heavy (no torch, scvi-tools or scanpy), so ``--help`` is
instant; the work imports what it needs.

Exit status: 0 success, 2 a problem with the command line, the files or the data (the
message says which flag or file to change), 1 an unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from scfm.errors import InvalidInputError, ScfmError

logger = logging.getLogger("scfm")

__all__ = ["MODELS", "build_parser", "get_model_class", "main"]

#: CLI model name (lower case; any case is accepted) -> class name in :mod:`scfm.model`.
MODELS = {
    "geneformer": "Geneformer",
    "scfoundation": "ScFoundation",
    "cellfm": "CellFM",
    "sccello": "ScCello",
    "cellplm": "CellPLM",
}

#: The first bytes of every HDF5 file (an .h5ad is one).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class CommandLineError(InvalidInputError):
    """A problem the user fixes on the command line (a flag, a path); exit status 2."""


# --------------------------------------------------------------------------- model lookup
def get_model_class(name: str) -> type:
    """Return the :mod:`scfm.model` class for a CLI model name (case-insensitive)."""
    key = str(name).lower()
    if key not in MODELS:
        raise InvalidInputError(
            f"Unknown model {name!r}. Choose one of: {', '.join(MODELS)} (any case)."
        )
    import scfm.model

    cls = getattr(scfm.model, MODELS[key], None)
    if cls is None:  # pragma: no cover - every class ships with scfm
        raise InvalidInputError(f"Model {name!r} is not available in this scfm installation.")
    return cls


# --------------------------------------------------------------------------- messages
#: ``setup_anndata`` / method arguments that have a flag of their own.
_FLAGS = {
    "layer": "--layer",
    "batch_key": "--batch-key",
    "labels_key": "--labels-key",
    "gene_id_key": "--gene-id-key",
    "spatial_key": "--spatial-key",
    "key_added": "--key-added",
    "batch_size": "--batch-size",
}
#: Arguments whose flag takes no value: (argument, value that the flag sets) -> flag.
_SWITCHES = {
    ("trust_checkpoint", "True"): "--trust-checkpoint",
    ("allow_non_integer", "True"): "--allow-non-integer",
    ("check_gene_overlap", "False"): "--allow-small-gene-overlap",
}
#: Options of the embedding methods (``--embed-option``); all others are loading options.
_EMBED_OPTIONS = {
    "hidden_layer",
    "pooling",
    "seed",
    "use_st",
    "tgthighres",
    "key_max",
    "output",
    "sentence",
    "chunk_size",
    "tile_size",
}
_VALUE = r"('[^']*'|\"[^\"]*\"|<[^>]*>|[\w.+-]+)"
_KWARG = re.compile(r"\b([a-z][a-z0-9_]*)=" + _VALUE)


def _flag_for(match: re.Match) -> str:
    name, value = match.group(1), match.group(2).strip("'\"")
    switch = _SWITCHES.get((name, value))
    if switch is not None:
        return switch
    if name in _FLAGS:
        return f"no {_FLAGS[name]}" if value == "None" else f"{_FLAGS[name]} {value}"
    flag = "--embed-option" if name in _EMBED_OPTIONS else "--option"
    return f"{flag} {name}={value}"


def _setup_call(match: re.Match) -> str:
    """``setup_anndata(adata, layer='counts')`` -> ``--layer counts``."""
    flags = [_KWARG.sub(_flag_for, arg.strip()) for arg in match.group(1).split(",")]
    flags = [f for f in flags if f and f not in ("adata", "...")]
    return " ".join(flags) if flags else "the matching flag"


def shell_message(message: str) -> str:
    """Rephrase a library error for the shell: flags instead of Python keyword arguments.

    ``setup_anndata(adata, layer='counts')`` and ``layer='counts'`` become ``--layer counts``,
    ``n_heads=48`` becomes ``--option n_heads=48``, ``pooling='max'`` becomes
    ``--embed-option pooling=max``, ``adata.X`` becomes "X"; Python snippets are dropped.
    """
    text = str(message)
    # Python snippets a shell user cannot run.
    text = re.sub(r"\s*\((?:e\.g\. )?[^()]*\badata\[[^()]*(?:\([^()]*\)[^()]*)*\)\)?", "", text)
    text = re.sub(
        r",? or adata\.raw\.to_adata\(\)(?: if raw holds counts)?",
        "; if the file's .raw holds the counts, write them to an .h5ad of their own first",
        text,
    )
    text = re.sub(r";? ?keep a copy before sc\.pp\.[\w ./]*", "", text)
    text = re.sub(r"\bscfm\.data\.(\w+)\([^()]*\)", r"scfm.data.\1 (in Python)", text)
    text = re.sub(r"\b(?:scfm\.model\.\w+\.)?setup_anndata\(([^()]*)\)", _setup_call, text)
    text = re.sub(r"\bbefore setup_anndata\b", "before running scfm", text)
    text = re.sub(r" (?:to|in) setup_anndata\b", "", text)
    text = _KWARG.sub(_flag_for, text)
    text = re.sub(r"\badata\.layers\[('[^']*')\]", r"layer \1", text)
    text = re.sub(r"\badata\.var_names\b", "the var names", text)
    text = re.sub(r"\badata\.(X|obs|var|obsm|varm|uns|layers)\b", r"\1", text)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+([,.;])(?=\s|$)", r"\1", re.sub(r"\s{2,}", " ", text))
    return text.strip()


# --------------------------------------------------------------------------- input checks
def check_h5ad(path: Path, flag: str = "INPUT") -> None:
    """Check that ``path`` is an existing AnnData ``.h5ad`` file, before any work."""
    if not path.exists():
        raise CommandLineError(f"{flag} {str(path)!r} does not exist.")
    if path.is_dir():
        hint = " (a .zarr store? convert it with anndata.read_zarr(...).write_h5ad(...))"
        raise CommandLineError(
            f"{flag} {str(path)!r} is a directory, not an .h5ad file"
            + (hint if path.suffix == ".zarr" else "")
            + "."
        )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CommandLineError(f"{flag} {str(path)!r} cannot be read: {err.strerror}.") from None
    if head != _HDF5_SIGNATURE:
        import h5py

        if not h5py.is_hdf5(path):  # HDF5 files may start after a user block
            raise CommandLineError(
                f"{flag} {str(path)!r} is not an .h5ad (HDF5) file. scfm reads AnnData .h5ad "
                "files; convert other formats first (e.g. scanpy.read_10x_h5, "
                "anndata.read_loom, anndata.read_csv, then .write_h5ad)."
            )
    with _h5(path, flag) as f:
        missing = [k for k in ("obs", "var") if k not in f]
        if missing or ("X" not in f and "layers" not in f):
            raise CommandLineError(
                f"{flag} {str(path)!r} is an HDF5 file but not an AnnData .h5ad (it lacks "
                f"{', '.join(missing) or 'X'})."
            )


@contextlib.contextmanager
def _h5(path: Path, flag: str = "INPUT") -> Iterator[Any]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CommandLineError(f"{flag} {str(path)!r} cannot be opened as HDF5: {err}.") from None
    with f:
        yield f


def _keys(group: Any) -> list[str]:
    """Column / member names of an h5ad group (dataframe columns or mapping keys)."""
    if group is None:
        return []
    names = list(group.keys())
    index = group.attrs.get("_index")
    return [n for n in names if n not in ("__categories", index)]


def check_input_keys(path: Path, args: argparse.Namespace, key: str) -> None:
    """The flags that name parts of INPUT (``--layer``, ``--batch-key``, ...) must exist."""
    checks = [
        ("--layer", getattr(args, "layer", None), "layers", "layer"),
        ("--batch-key", getattr(args, "batch_key", None), "obs", "obs column"),
        ("--gene-id-key", getattr(args, "gene_id_key", None), "var", "var column"),
        ("--spatial-key", getattr(args, "spatial_key", None), "obsm", "obsm key"),
    ]
    with _h5(path) as f:
        for flag, value, group, what in checks:
            if value is None:
                continue
            present = _keys(f.get(group))
            if value not in present:
                raise CommandLineError(
                    f"{flag} {value}: INPUT has no {what} {value!r} (available: "
                    f"{', '.join(present) or 'none'})."
                )
        for group in ("obsm", "varm"):
            if key in _keys(f.get(group)) and not args.overwrite:
                raise CommandLineError(
                    f"INPUT already has .{group}[{key!r}]. Choose another name with --key-added, "
                    "or pass --overwrite to replace it in the output."
                )


def check_key_added(key: str) -> str:
    """An ``.obsm`` / ``.varm`` key that h5ad can store and read back."""
    if not key or key != key.strip() or "/" in key or key in (".", ".."):
        raise CommandLineError(
            f"--key-added {key!r} is not a valid key: use a non-empty name without '/' and "
            "without leading or trailing spaces, e.g. --key-added X_geneformer_v2."
        )
    return key


def check_output(out: Path, src: Path | None, overwrite: bool, flag: str = "--output") -> None:
    """Check an output path before any work: its folder exists and it may be written."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CommandLineError(f"{flag} {str(out)!r} is a directory; give a file name.")
    if not parent.exists():
        raise CommandLineError(
            f"{flag} {str(out)!r}: the directory {str(parent)!r} does not exist; create it first."
        )
    if not parent.is_dir():
        raise CommandLineError(f"{flag} {str(out)!r}: {str(parent)!r} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandLineError(
            f"{flag} {str(out)!r}: the directory {str(parent)!r} is not writable."
        )
    if src is not None and out.exists() and out.resolve() == src.resolve():
        raise CommandLineError(f"{flag} must differ from INPUT (the input file is never modified).")
    if out.exists() and not overwrite:
        raise CommandLineError(
            f"{flag} {str(out)!r} already exists. Pass --overwrite to replace it, or choose "
            "another file name."
        )


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a unique temporary file next to ``out``; move it onto ``out`` on success.

    The temporary file is removed on every failure (including Ctrl-C). Without
    ``overwrite`` a file that appeared at ``out`` in the meantime is not replaced.
    """
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # atomic, and fails if `out` exists
            except FileExistsError:
                raise CommandLineError(
                    f"--output {str(out)!r} appeared while scfm was running; nothing was "
                    "written. Pass --overwrite to replace it."
                ) from None
            except OSError:  # file systems without hard links
                if out.exists():
                    raise CommandLineError(
                        f"--output {str(out)!r} appeared while scfm was running; nothing was "
                        "written. Pass --overwrite to replace it."
                    ) from None
                os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- options
def _parse_options(pairs: Sequence[str] | None, flag: str = "--option") -> dict:
    """``["n_heads=4", "prefix=20231027_85M"]`` -> ``{"n_heads": 4, "prefix": "20231027_85M"}``."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise CommandLineError(f"{flag} {pair!r} must look like NAME=VALUE, e.g. n_heads=48.")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # plain strings need no quotes
    return options


def _setup_kwargs(cls: type, args: argparse.Namespace) -> dict:
    """The ``setup_anndata`` arguments of the command line, checked against ``cls``.

    Column arguments are passed as given (``None`` when not given), so that scfm never uses a
    column the user did not name.
    """
    import inspect

    given = {
        "layer": args.layer,
        "batch_key": args.batch_key,
        "labels_key": None,  # embedding never reads labels
        "spatial_key": args.spatial_key,
        "gene_id_key": args.gene_id_key,
    }
    accepted = inspect.signature(cls.setup_anndata).parameters
    switches = {
        "allow_non_integer": (args.allow_non_integer, True, "--allow-non-integer"),
        "check_gene_overlap": (args.allow_small_gene_overlap, False, "--allow-small-gene-overlap"),
    }
    kwargs = {}
    for key, (given_flag, value, flag) in switches.items():
        if given_flag:
            if key not in accepted:
                raise CommandLineError(f"{flag} is not supported by {cls.__name__}; remove it.")
            kwargs[key] = value
    for key, value in given.items():
        if key not in accepted:
            if value is not None:
                raise CommandLineError(
                    f"{_FLAGS[key]} is not supported by {cls.__name__}; remove it."
                )
            continue
        default = accepted[key].default
        if value is not None or default not in (None, inspect.Parameter.empty):
            kwargs[key] = value
    return kwargs


def _unused_columns(cls: type, path: Path, kwargs: dict) -> list[str]:
    """Notes on columns ``cls`` would use by default but that the user did not name."""
    # The columns the reference code would read without being told (CellPLM: "batch",
    # "spatial"); scfm reads only what the user names, so say when one is left unused.
    reference_keys = getattr(cls, "_reference_keys", {})
    notes = []
    with _h5(path) as f:
        for key, group in (("batch_key", "obs"), ("spatial_key", "obsm")):
            default = reference_keys.get(key)
            if isinstance(default, str) and kwargs.get(key) is None:
                if default in _keys(f.get(group)):
                    notes.append(
                        f"note: INPUT has .{group}[{default!r}] but {_FLAGS[key]} was not given, "
                        f"so it is not used. Pass {_FLAGS[key]} {default} to use it."
                    )
    return notes


# --------------------------------------------------------------------------- embed
def embed(args: argparse.Namespace) -> Path:
    """Run ``scfm embed``: write embeddings of INPUT to OUTPUT, leaving everything else as is.

    OUTPUT starts as a byte copy of INPUT in a temporary file next to OUTPUT; only the
    result elements (``obsm/<key>``, ``varm/<key>`` with ``--gene-embeddings``, ``uns/scfm``
    with the gene match and the call's parameters) are then written into it, and it is moved
    onto OUTPUT when complete. With ``--backed`` the counts are read from disk in chunks.
    """
    src, out = Path(args.input), Path(args.output)
    # ---- everything that can be checked without loading anything
    check_h5ad(src)
    check_output(out, src, args.overwrite)
    key = check_key_added(f"X_{args.model}" if args.key_added is None else args.key_added)
    check_input_keys(src, args, key)
    load_options = _parse_options(args.option)
    embed_options = _parse_options(args.embed_option, "--embed-option")
    if args.trust_checkpoint:
        load_options["trust_checkpoint"] = True
    if args.batch_size is not None and args.batch_size < 1:
        raise CommandLineError(f"--batch-size must be at least 1, got {args.batch_size}.")

    # ---- the work
    import anndata as ad

    cls = get_model_class(args.model)
    quiet_libraries(args)
    setup_kwargs = _setup_kwargs(cls, args)
    for note in _unused_columns(cls, src, setup_kwargs):
        print(note, file=sys.stderr)
    work = ad.read_h5ad(src, backed="r" if args.backed else None)
    try:
        cls.setup_anndata(work, **setup_kwargs)
        model = cls.from_pretrained(args.checkpoint, work, **load_options)
        common = {"batch_size": args.batch_size, **embed_options}
        if _accepts(model.get_latent_representation, "progress_bar"):
            common["progress_bar"] = not args.quiet
        model.embed(work, key_added=key, **common)
        varm = None
        if args.gene_embeddings:
            model.embed_genes(work, key_added=key, **common)
            varm = work.varm[key]
        record = _scfm_record(work, model)
        z = work.obsm[key]
    finally:
        if work.isbacked:
            work.file.close()

    with atomic_output(out, args.overwrite) as tmp:
        shutil.copyfile(src, tmp)
        _write_results(tmp, key, z, varm, record)
    print(
        f"wrote .obsm[{key!r}] ({z.shape[0]} x {z.shape[1]})"
        + (f" and .varm[{key!r}]" if varm is not None else "")
        + f" and the gene match (.uns['scfm']) to {out}"
    )
    return out


def _accepts(method: Callable, name: str) -> bool:
    import inspect

    return name in inspect.signature(method).parameters


def _scfm_record(adata: Any, model: Any) -> dict:
    """``adata.uns["scfm"]`` after the run, with the model's gene match in it."""
    record = dict(adata.uns.get("scfm", {}))
    alignments = dict(record.get("gene_alignment", {}))
    alignment = getattr(model, "gene_alignment", None)
    if model._model_name not in alignments and hasattr(alignment, "to_dict"):
        alignments[model._model_name] = {
            k: v for k, v in alignment.to_dict().items() if v is not None
        }
    if alignments:
        record["gene_alignment"] = alignments
    return record


def _write_results(path: Path, key: str, z: Any, varm: Any, record: dict) -> None:
    """Write the result elements into an existing .h5ad file, touching nothing else."""
    import h5py
    from anndata.io import write_elem

    with h5py.File(path, "r+") as f:
        targets = [("obsm", z)] + ([("varm", varm)] if varm is not None else [])
        for group, value in targets:
            if group not in f:
                write_elem(f, group, {})
            if key in f[group]:
                del f[group][key]
            write_elem(f[group], key, value)
        if "uns" not in f:
            write_elem(f, "uns", {})
        if "scfm" in f["uns"]:
            del f["uns"]["scfm"]
        write_elem(f["uns"], "scfm", record)


# --------------------------------------------------------------------------- demo
def demo(args: argparse.Namespace) -> dict:
    """Run ``scfm demo`` (see :func:`scfm.datasets.run_demo`)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CommandLineError(f"--output-dir {str(out)!r} is a file, not a directory.")
    if not out.parent.exists():
        raise CommandLineError(
            f"--output-dir {str(out)!r}: the directory {str(out.parent)!r} does not exist."
        )
    if args.seconds <= 0:
        raise CommandLineError(f"--seconds must be positive, got {args.seconds}.")
    if args.max_steps < 1:
        raise CommandLineError(f"--max-steps must be at least 1, got {args.max_steps}.")
    from scfm.datasets import run_demo
    from scfm.datasets._demo import format_report
    from scfm.model import Geneformer  # noqa: F401  (imports Lightning: then quiet it)

    quiet_libraries(args)

    result = run_demo(
        output_dir=out,
        seconds=args.seconds,
        max_steps=args.max_steps,
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    print(format_report(result))
    return result


# --------------------------------------------------------------------------- parser
def _describe(*paragraphs: str) -> str:
    """Wrap prose paragraphs for ``--help``; lines starting with two spaces stay as they are."""
    import textwrap

    out = []
    for text in paragraphs:
        if text.startswith("  ") or text.endswith(":"):
            out.append(text)
        else:
            out.append(textwrap.fill(" ".join(text.split()), width=79))
    return "\n\n".join(out).replace(":\n\n  ", ":\n  ")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description line breaks and shows each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and default not in (None, False, argparse.SUPPRESS, [])
            and action.option_strings
            and not isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            text += " (default: %(default)s)"
        return text


def _add_global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """``-v`` / ``-q``, accepted before and after the subcommand."""
    default = argparse.SUPPRESS if suppress else 0
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="more log messages (-v: INFO, -vv: DEBUG)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="only warnings and errors; no progress bars",
    )


def _model_name(value: str) -> str:
    return value.lower()


def _add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="add a model's cell embeddings to (a copy of) an .h5ad file",
        description=_describe(
            "Write .obsm[KEY] (cell embeddings; with --gene-embeddings also .varm[KEY]) and "
            "the gene match (.uns['scfm']) to OUTPUT; everything else of INPUT is copied "
            "unchanged and INPUT is never modified. OUTPUT is written to a temporary file "
            "next to it and moved into place when complete.",
            "example:",
            "  scfm embed counts.h5ad --model Geneformer --checkpoint Geneformer-V2-104M/ \\\n"
            "      --output embedded.h5ad",
        ),
        formatter_class=_HelpFormatter,
    )
    _add_global_flags(p, suppress=True)
    p.add_argument("input", metavar="INPUT", help="input .h5ad with raw counts")
    p.add_argument(
        "--model",
        required=True,
        type=_model_name,
        choices=list(MODELS),
        metavar="MODEL",
        help=f"model, any case: {', '.join(MODELS.values())}",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="local folder (or file) of the released checkpoint",
    )
    p.add_argument("--output", required=True, metavar="OUTPUT", help="output .h5ad path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT / key")
    p.add_argument("--layer", metavar="NAME", help="layer holding raw counts (default: X)")
    p.add_argument(
        "--batch-key",
        metavar="COLUMN",
        help="obs column with samples / fields of view: CellPLM embeds each as its own "
        "sentence (default: all cells in one)",
    )
    p.add_argument(
        "--spatial-key",
        metavar="KEY",
        help="obsm key with spatial coordinates (CellPLM; default: not used)",
    )
    p.add_argument(
        "--gene-id-key",
        metavar="COLUMN",
        help="var column with gene ids (default: the var names)",
    )
    p.add_argument(
        "--allow-non-integer",
        action="store_true",
        help="accept non-negative non-integer counts (alevin-fry, SoupX, TPM), with a warning",
    )
    p.add_argument(
        "--allow-small-gene-overlap",
        action="store_true",
        help="embed even if few genes match the model's vocabulary (small targeted panels)",
    )
    p.add_argument(
        "--key-added",
        metavar="KEY",
        help="obsm / varm key of the result (default: X_<model>)",
    )
    p.add_argument(
        "--gene-embeddings",
        action="store_true",
        help="also write gene embeddings to .varm[KEY] (one more pass over the cells)",
    )
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="cells per minibatch (default: per model)"
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="loading option, repeatable, e.g. n_heads=48 (CellFM), prefix=20231027_85M "
        "(CellPLM), weights=rde (scFoundation)",
    )
    p.add_argument(
        "--embed-option",
        action="append",
        metavar="NAME=VALUE",
        help="embedding option, repeatable, e.g. hidden_layer=-1, pooling=max, seed=1",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow checkpoint files that need full unpickling (runs code from the file: "
        "only for files you trust)",
    )
    p.add_argument(
        "--backed",
        action="store_true",
        help="read the counts from disk in chunks (files larger than memory)",
    )
    p.set_defaults(func=embed)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="offline end-to-end demo on PBMC counts shipped with scfm",
        description=_describe(
            "Pretrain a small Geneformer-architecture model from scratch on 700 PBMCs shipped "
            "with scfm (--max-steps steps or --seconds, whichever ends first), embed the cells, "
            "cluster them (Leiden) and score the clusters against the known cell types, next "
            "to scanpy's PCA baseline on the same cells; then transfer labels to held-out "
            "cells. Saves both UMAPs side by side. "
            "Nothing is downloaded."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_global_flags(d, suppress=True)
    d.add_argument("--output-dir", default="scfm_demo", metavar="DIR", help="where the figure goes")
    d.add_argument(
        "--seconds", type=float, default=60.0, metavar="S", help="pretraining time budget"
    )
    d.add_argument(
        "--max-steps", type=int, default=1000, metavar="N", help="pretraining steps at most"
    )
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.set_defaults(func=demo)


def _hub_cli() -> Any | None:
    """The release catalogue's subcommands (``scfm releases``, ``scfm fetch``), if present."""
    try:
        from scfm.hub import _cli
    except ModuleNotFoundError as err:
        if err.name not in ("scfm.hub", "scfm.hub._cli"):
            raise
        return None
    return _cli


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scfm`` command (imports nothing heavy)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("scfm")
    except PackageNotFoundError:  # pragma: no cover
        ver = "unknown"
    parser = argparse.ArgumentParser(
        prog="scfm",
        description=_describe(
            "Single-cell foundation models in the scverse ecosystem.",
            "Run `scfm demo` for an offline first experience, `scfm embed --help` to embed an "
            ".h5ad file. Global flags (-v, -q) go before or after the command.",
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"scfm {ver}")
    _add_global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_embed(sub)
    _add_demo(sub)
    hub = _hub_cli()
    if hub is not None:
        before = set(sub.choices)
        hub.add_subparsers(sub)
        for name in set(sub.choices) - before:
            p = sub.choices[name]
            p.formatter_class = _HelpFormatter
            if p.description and "\n" not in p.description:
                p.description = _describe(p.description)
            if not any("--verbose" in a.option_strings for a in p._actions):
                _add_global_flags(p, suppress=True)
            if p.get_default("func") is None:
                p.set_defaults(func=hub.run)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "quiet", False):
        return logging.WARNING
    return {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0), logging.DEBUG)


def _configure_logging(args: argparse.Namespace) -> None:
    level = _log_level(args)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scfm").setLevel(level)
    quiet_libraries(args)


def quiet_libraries(args: argparse.Namespace) -> None:
    """Apply the log level to Lightning and scvi-tools, which set their own on import.

    Called again by the commands once they have imported those libraries.
    """
    level = max(_log_level(args), logging.INFO)  # their DEBUG output is not for users
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(level)
    if "scvi" in sys.modules:
        sys.modules["scvi"].settings.verbosity = level


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scfm`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        args.func(args)
    except ScfmError as err:
        text = str(err) if isinstance(err, CommandLineError) else shell_message(str(err))
        print(f"scfm {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scfm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
