"""Reader of the released CellFM files (MindSpore ``.ckpt`` + gene list ``.csv``).

Releases (HuggingFace ``ShangguanNingyuan/CellFM``, CC BY-NC-ND 4.0)::

    CellFM_80M_weight.ckpt + expand_gene_info.csv   (27,855 genes, d=1536, 2 layers, 48 heads)
    base_weight.ckpt       + gene_info.csv          (24,078 genes, d=1536, 40 layers, 48 heads)

No configuration is stored in the files: width, depth, vocabulary rows and optional parts
(read-depth "ST" tokens, zero-probability heads, decoders) are read from the tensor names and
shapes; only the head count must be known (48 for the released width). The gene lists are
licensed CC BY-NC-ND and therefore never shipped with scfm: they are read from beside the
checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidInputError
from scfm.io._common import resolve_local_path
from scfm.io._mindspore import MindSporeCheckpoint

logger = logging.getLogger(__name__)

__all__ = [
    "CELLFM_RELEASES",
    "CellFMConfig",
    "find_cellfm_files",
    "read_cellfm_checkpoint",
    "read_cellfm_genes",
]

#: Released checkpoint file -> its gene list (token id = 1 + row).
CELLFM_RELEASES: dict[str, str] = {
    "CellFM_80M_weight.ckpt": "expand_gene_info.csv",
    "base_weight.ckpt": "gene_info.csv",
}
#: Head count of the released models, by width (not recoverable from the weights).
RELEASED_NUM_HEADS: dict[int, int] = {1536: 48}
#: Bins of the soft-binning value encoder (``FFN(b=256)``).
VALUE_BINS = 256
#: Non-model entries MindSpore training writes into the checkpoint (optimizer state).
_OPTIMIZER_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.", "accum.")
_OPTIMIZER_SCALARS = {
    "global_step",
    "learning_rate",
    "beta1_power",
    "beta2_power",
    "current_iterator_step",
    "last_overflow_iterator_step",
    "loss_scale",
    "scale_sense",
}
#: MindSpore LayerNorm parameter names -> torch names.
_RENAMES = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


@dataclass
class CellFMConfig:
    """Architecture of a CellFM model (the reference's ``Config`` fields).

    Attributes
    ----------
    enc_dims
        Model width ``d`` (1536 in the releases).
    enc_nlayers
        Number of retention layers ``N`` (80M: 2; 800M: 40).
    enc_num_heads
        Retention heads ``H`` (48 in the releases; not stored in checkpoints).
    gene_rows
        Rows of the gene embedding table: ``n_genes + 1`` rounded up to a multiple of 8.
    value_bins
        Bins of the soft-binning value encoder (256).
    st_tokens
        Whether the model has the two read-depth tokens ``ST_emb`` / ``ST_enc`` (80M: yes).
    add_zero
        Whether the value and cell-wise decoders have zero-probability heads.
    lora
        LoRA rank on the retention / GLU projections (0: none).
    enc_dropout
        Dropout on the residual branches during training.
    """

    enc_dims: int
    enc_nlayers: int
    enc_num_heads: int
    gene_rows: int
    value_bins: int = VALUE_BINS
    st_tokens: bool = True
    add_zero: bool = False
    lora: int = 0
    enc_dropout: float = 0.0

    def to_dict(self) -> dict:
        """Plain-dict form (used as the model's ``init_params``)."""
        return asdict(self)

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None
    ) -> CellFMConfig:
        """Infer the architecture from checkpoint tensor shapes (names as in MindSpore).

        Parameters
        ----------
        shapes
            Parameter name -> dims, optimizer entries included or not.
        num_heads
            Head count; ``None`` uses the released value for the released width.

        Raises
        ------
        CheckpointFormatError
            If the file has no CellFM gene table / encoder.
        InvalidInputError
            If ``num_heads`` is needed but not given, or does not divide the width.
        """
        if "gene_emb" not in shapes or len(shapes["gene_emb"]) != 2:
            raise CheckpointFormatError(
                "The checkpoint has no 2-d 'gene_emb' tensor: it is not a CellFM checkpoint."
            )
        gene_rows, d = shapes["gene_emb"]
        layers = {
            int(m.group(1))
            for k in shapes
            if (m := re.match(r"^encoder\.(\d+)\.attn\.q_proj\.weight$", k))
        }
        if not layers or layers != set(range(len(layers))):
            raise CheckpointFormatError(
                f"The checkpoint's encoder layers are {sorted(layers)}: expected "
                "encoder.0 ... encoder.N-1 (a CellFM retention encoder)."
            )
        if num_heads is None:
            if d not in RELEASED_NUM_HEADS:
                raise InvalidInputError(
                    f"The checkpoint has width {d}, which no released CellFM has, and the head "
                    "count is not stored in CellFM checkpoints. Pass n_heads=<number of "
                    "retention heads> (the enc_num_heads of the config it was trained with)."
                )
            num_heads = RELEASED_NUM_HEADS[d]
        if num_heads < 1 or d % num_heads:
            raise InvalidInputError(
                f"n_heads={num_heads} does not divide the model width {d}; pass the "
                "enc_num_heads the checkpoint was trained with."
            )
        bins = shapes.get("value_enc.value_enc.w1.weight", (VALUE_BINS, 1))[0]
        lora_a = [v for k, v in shapes.items() if re.search(r"\.lora_q\.A\.weight$", k)]
        return cls(
            enc_dims=int(d),
            enc_nlayers=len(layers),
            enc_num_heads=int(num_heads),
            gene_rows=int(gene_rows),
            value_bins=int(bins),
            st_tokens="ST_emb" in shapes,
            add_zero=any(".zero_logit." in k for k in shapes),
            lora=int(lora_a[0][0]) if lora_a else 0,
        )


def is_optimizer_entry(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a checkpoint entry is training state rather than a model parameter."""
    return name.startswith(_OPTIMIZER_PREFIXES) or name in _OPTIMIZER_SCALARS or shape == ()


def rename_mindspore_key(name: str) -> str:
    """MindSpore parameter name -> scfm name (LayerNorm ``gamma/beta`` -> ``weight/bias``)."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def find_cellfm_files(
    path: str | os.PathLike, gene_file: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Locate the ``.ckpt`` and its gene list.

    Parameters
    ----------
    path
        A released ``.ckpt`` file or the directory holding it.
    gene_file
        Gene list to use instead of the one released with the checkpoint.

    Returns
    -------
    ``(checkpoint file, gene list file)``.

    Raises
    ------
    CheckpointNotFoundError
        If no checkpoint or no matching gene list is found.
    """
    path = resolve_local_path(path)
    if path.is_dir():
        known = [path / name for name in CELLFM_RELEASES if (path / name).is_file()]
        candidates = known or sorted(path.glob("*.ckpt"))
        if len(candidates) != 1:
            raise CheckpointNotFoundError(
                f"Found {len(candidates)} CellFM checkpoints in {str(path)!r} "
                f"({', '.join(p.name for p in candidates) or 'none'}). Pass the .ckpt file "
                f"itself (released names: {', '.join(CELLFM_RELEASES)})."
            )
        ckpt = candidates[0]
    else:
        ckpt = path
    if gene_file is not None:
        return ckpt, resolve_local_path(gene_file, what="CellFM gene list")
    expected = CELLFM_RELEASES.get(ckpt.name)
    names = [expected] if expected else list(dict.fromkeys(CELLFM_RELEASES.values()))
    for folder in (ckpt.parent, ckpt.parent / "csv"):
        for name in names:
            if (folder / name).is_file():
                return ckpt, folder / name
    raise CheckpointNotFoundError(
        f"No CellFM gene list ({' or '.join(names)}) next to {str(ckpt)!r}. The gene lists "
        "(CC BY-NC-ND) are not shipped with scfm: download the one released with the "
        "checkpoint from github.com/biomed-AI/CellFM (csv/) into the same folder, or pass "
        "gene_file='<path to the csv>'. The 80M model needs expand_gene_info.csv, the 800M "
        "model (base_weight.ckpt) gene_info.csv."
    )


def read_cellfm_genes(path: str | os.PathLike) -> list[str]:
    """Read a CellFM gene list (``HGNC_gene`` index column); token id = 1 + row.

    Raises
    ------
    CheckpointFormatError
        If the file is not a CellFM gene list.
    """
    path = resolve_local_path(path, what="CellFM gene list")
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CheckpointFormatError(
            f"{str(path)!r} is not a readable CellFM gene list ({err})."
        ) from None
    if table.index.name not in ("HGNC_gene", None) or len(table) == 0:
        raise CheckpointFormatError(
            f"{str(path)!r} does not look like a CellFM gene list (first column "
            f"{table.index.name!r}, expected 'HGNC_gene'). Pass gene_info.csv or "
            "expand_gene_info.csv from the CellFM release."
        )
    return [str(g) for g in table.index]


def read_cellfm_checkpoint(
    path: str | os.PathLike, num_heads: int | None = None
) -> tuple[CellFMConfig, dict[str, torch.Tensor]]:
    """Read the model parameters of a CellFM MindSpore checkpoint, renamed for scfm.

    Optimizer state (``moment1.*``, ``moment2.*``, step counters, learning rate) is never
    read. Tensors are views of the memory-mapped file until they are copied into the model.

    Parameters
    ----------
    path
        The ``.ckpt`` file.
    num_heads
        Head count (``None``: the released value for the released width).

    Returns
    -------
    ``(config inferred from the shapes, {scfm parameter name: tensor})``.
    """
    ckpt = MindSporeCheckpoint(path)
    model_keys = [k for k in ckpt if not is_optimizer_entry(k, ckpt.shape(k))]
    skipped = len(ckpt) - len(model_keys)
    if skipped:
        logger.info("Ignoring %d optimizer / training-state entries of %s.", skipped, ckpt.path)
    config = CellFMConfig.from_shapes({k: ckpt.shape(k) for k in model_keys}, num_heads)
    state = {rename_mindspore_key(k): ckpt[k] for k in model_keys}
    return config, state
