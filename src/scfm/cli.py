"""The ``scfm`` command line: ``scfm embed`` and ``scfm demo``.

``scfm embed`` adds a model's embeddings to an ``.h5ad`` file and changes nothing else in
it; ``scfm demo`` runs a complete, offline first experience on data shipped with scfm.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from scfm.errors import InvalidInputError, ScfmError

logger = logging.getLogger("scfm")

#: CLI model name -> class name in :mod:`scfm.model`.
MODELS = {
    "geneformer": "Geneformer",
    "scfoundation": "ScFoundation",
    "cellfm": "CellFM",
    "sccello": "ScCello",
    "cellplm": "CellPLM",
}


def get_model_class(name: str) -> type:
    """Return the :mod:`scfm.model` class for a CLI model name (case-insensitive)."""
    import scfm.model

    key = name.lower()
    if key not in MODELS:
        raise InvalidInputError(f"Unknown model {name!r}. Choose one of: {', '.join(MODELS)}.")
    cls = getattr(scfm.model, MODELS[key], None)
    if cls is None:
        raise InvalidInputError(f"Model {name!r} is not available in this scfm installation.")
    return cls


def _setup_kwargs(cls: type, args: argparse.Namespace) -> dict:
    """The setup_anndata keyword arguments given on the command line, checked against ``cls``."""
    given = {
        "layer": args.layer,
        "batch_key": args.batch_key,
        "spatial_key": args.spatial_key,
        "gene_id_key": args.gene_id_key,
    }
    accepted = inspect.signature(cls.setup_anndata).parameters
    kwargs = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in accepted:
            raise InvalidInputError(
                f"--{key.replace('_', '-')} is not supported by {cls.__name__}; remove it."
            )
        kwargs[key] = value
    return kwargs


def _parse_options(pairs: Sequence[str] | None) -> dict:
    """``["n_heads=4", "prefix=20231027_85M"]`` -> ``{"n_heads": 4, "prefix": "20231027_85M"}``."""
    import ast

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidInputError(f"--option {pair!r} must look like NAME=VALUE.")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # plain strings need no quotes
    return options


def embed(args: argparse.Namespace) -> Path:
    """Run ``scfm embed``: write embeddings of INPUT to OUTPUT, leaving everything else as is.

    OUTPUT starts as a byte copy of INPUT; only the result elements (``obsm/<key>``,
    ``varm/<key>``, ``uns/scfm``) are then written into it, so nothing else can change.
    With ``--backed`` the counts are read from disk in chunks (memory independent of the
    number of cells).
    """
    import anndata as ad

    src = Path(args.input)
    if not src.is_file():
        raise InvalidInputError(f"Input file {str(src)!r} does not exist.")
    out = Path(args.output)
    if out.exists() and out.resolve() == src.resolve():
        raise InvalidInputError("--output must differ from INPUT (the input is never modified).")
    cls = get_model_class(args.model)
    setup_kwargs = _setup_kwargs(cls, args)

    # setup_anndata registers scvi-tools keys in the AnnData it is given: that is the
    # model's in-memory (or backed, read-only) copy, never the file.
    work = ad.read_h5ad(src, backed="r" if args.backed else None)
    cls.setup_anndata(work, **setup_kwargs)
    model = cls.from_pretrained(args.checkpoint, work, **_parse_options(args.option))
    key = args.key_added or model.default_key
    z = model.get_latent_representation(batch_size=args.batch_size)
    varm = None
    if getattr(cls, "_has_gene_embeddings", False) and not args.no_gene_embeddings:
        genes = model.get_gene_embeddings(batch_size=args.batch_size)
        varm = model._align_gene_frame(work, genes)
    if work.isbacked:
        work.file.close()

    info = {"model": cls.__name__, "checkpoint": str(args.checkpoint)}
    tmp = out.with_name(out.name + ".partial")
    shutil.copyfile(src, tmp)
    _write_results(tmp, key, z, varm, info)
    tmp.replace(out)
    print(
        f"wrote .obsm[{key!r}] ({z.shape[0]} x {z.shape[1]})"
        + (f" and .varm[{key!r}]" if varm is not None else "")
        + f" to {out}"
    )
    return out


def _write_results(path: Path, key: str, z, varm, info: dict) -> None:
    """Write the result elements into an existing .h5ad file, touching nothing else."""
    import h5py
    from anndata.io import read_elem, write_elem

    with h5py.File(path, "r+") as f:
        targets = [("obsm", z)] + ([("varm", varm)] if varm is not None else [])
        for group, value in targets:
            if group not in f:
                write_elem(f, group, {})
            if key in f[group]:
                del f[group][key]
            write_elem(f[group], key, value)
        record = read_elem(f["uns"]["scfm"]) if "uns" in f and "scfm" in f["uns"] else {}
        for group, _ in targets:
            record.setdefault(group, {})[key] = dict(info)
        if "uns" not in f:
            write_elem(f, "uns", {})
        if "scfm" in f["uns"]:
            del f["uns"]["scfm"]
        write_elem(f["uns"], "scfm", record)


def demo(args: argparse.Namespace) -> dict:
    """Run ``scfm demo`` (see :func:`scfm.datasets.run_demo`)."""
    from scfm.datasets import run_demo

    result = run_demo(output_dir=args.output_dir, seconds=args.seconds, seed=args.seed)
    print(
        f"Leiden clusters of the scfm embedding vs bulk_labels: ARI {result['ari']:.3f}, "
        f"NMI {result['nmi']:.3f} (final MLM loss {result['final_loss']:.3f}, first "
        f"{result['first_loss']:.3f}). UMAP saved to {result['umap_png']}."
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scfm`` command."""
    parser = argparse.ArgumentParser(
        prog="scfm",
        description="Single-cell foundation models in the scverse ecosystem.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "embed",
        help="add a model's cell (and gene) embeddings to an .h5ad file",
        description="Write .obsm['X_<model>'] (and .varm['X_<model>'] for models with gene "
        "embeddings) to OUTPUT; everything else of INPUT is copied unchanged.",
    )
    p.add_argument("input", help="input .h5ad with raw counts")
    p.add_argument("--model", required=True, choices=sorted(MODELS), help="model name")
    p.add_argument("--checkpoint", required=True, help="local path of the released checkpoint")
    p.add_argument("--output", required=True, help="output .h5ad path")
    p.add_argument("--layer", help="layer holding raw counts (default: X)")
    p.add_argument("--batch-key", help="obs column with batches (CellPLM sentences)")
    p.add_argument("--spatial-key", help="obsm key with spatial coordinates (CellPLM)")
    p.add_argument("--gene-id-key", help="var column with the gene ids the model expects")
    p.add_argument("--batch-size", type=int, default=None, help="cells per minibatch")
    p.add_argument("--key-added", help="obsm/varm key (default X_<model>)")
    p.add_argument("--no-gene-embeddings", action="store_true", help="skip .varm output")
    p.add_argument(
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="model option passed to from_pretrained, e.g. n_heads=48 (CellFM) or "
        "prefix=20231027_85M (CellPLM); repeatable",
    )
    p.add_argument(
        "--backed",
        action="store_true",
        help="read the counts from disk in chunks (for files larger than memory)",
    )
    p.set_defaults(func=embed)

    d = sub.add_parser(
        "demo",
        help="offline end-to-end demo on PBMC counts shipped with scfm",
        description="Pretrain a small Geneformer-architecture model on 700 PBMCs shipped "
        "with scfm, embed them, cluster with scanpy and compare clusters with the known cell "
        "types. No downloads.",
    )
    d.add_argument("--output-dir", default="scfm_demo", help="where the UMAP PNG goes")
    d.add_argument("--seconds", type=float, default=60.0, help="pretraining time budget")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.set_defaults(func=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scfm`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except ScfmError as err:
        print(f"scfm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
