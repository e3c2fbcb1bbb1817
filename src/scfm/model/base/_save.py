"""Saving and loading scfm models without unpickling anything.

``save`` writes the module's weights as safetensors and everything else (init parameters,
the AnnData setup, classifier labels, LoRA adapters, history) as JSON. ``load`` rebuilds the
model from those two files: a saved model can never run code when it is loaded. Folders
written by scvi-tools' own ``save`` (``model.pt``) are read with ``weights_only=True`` and a
numpy allow-list, and refused as unsafe when they need more, unless ``trust_checkpoint=True``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfm.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

__all__ = ["SafeSaveMixin"]

#: File names of a saved model (with the optional ``prefix``).
WEIGHTS_FILE = "model.safetensors"
ATTRS_FILE = "scfm_model.json"
ADATA_FILE = "adata.h5ad"
#: Version of the saved layout.
FORMAT_VERSION = 1


def _encode(value: Any) -> Any:
    """JSON-encodable form of an init parameter / registry value (no pickling)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": [_encode(v) for v in value.tolist()], "dtype": str(value.dtype)}
    if isinstance(value, pd.Index):
        return {"__index__": [_encode(v) for v in value.tolist()]}
    if isinstance(value, os.PathLike):
        return {"__path__": os.fspath(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    raise InvalidInputError(
        f"Cannot save a value of type {type(value).__name__} without pickling it; scfm saves "
        "plain data only."
    )


def _decode(value: Any) -> Any:
    """Inverse of :func:`_encode`; dataclasses are only rebuilt from scfm's own modules."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        dtype = np.dtype(value["dtype"]) if value["dtype"] != "object" else object
        return np.asarray(value["__ndarray__"], dtype=dtype)
    if "__index__" in value:
        return pd.Index(value["__index__"])
    if "__path__" in value:
        return Path(value["__path__"])
    if "__items__" in value:
        return {_decode_key(k): _decode(v) for k, v in value["__items__"]}
    if "__dataclass__" in value:
        module_name, _, qualname = str(value["__dataclass__"]).partition(":")
        if not (module_name == "scfm" or module_name.startswith("scfm.")):
            raise UnsafeCheckpointError(
                f"The saved model names the class {value['__dataclass__']!r}, outside scfm; "
                "it is not rebuilt."
            )
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise CheckpointFormatError(f"{value['__dataclass__']} is not a config dataclass.")
        return obj(**{k: _decode(v) for k, v in value["fields"].items()})
    return {k: _decode(v) for k, v in value.items()}


def _decode_key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


class SafeSaveMixin:
    """``save`` / ``load`` through safetensors + JSON (never pickle)."""

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs: Any,
    ) -> None:
        """Save the model: weights as safetensors, everything else as JSON.

        Parameters
        ----------
        dir_path
            Folder to write; created if needed.
        prefix
            Prefix of the file names (several models in one folder).
        overwrite
            Replace the files of a model already saved there.
        save_anndata
            Also write the model's AnnData as ``adata.h5ad``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        from safetensors.torch import save_model

        folder = Path(dir_path)
        prefix = prefix or ""
        if folder.exists() and not folder.is_dir():
            raise InvalidInputError(f"{folder} exists and is not a folder; pass a folder path.")
        targets = [folder / f"{prefix}{n}" for n in (WEIGHTS_FILE, ATTRS_FILE, ADATA_FILE)]
        if not overwrite and any(t.exists() for t in targets):
            raise InvalidInputError(
                f"{folder} already holds a saved model; pass overwrite=True to replace it, or "
                "another folder / prefix."
            )
        attrs = {
            "format": "scfm-model",
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "init_params": _encode(self.init_params_),
            "registry": _encode(self.adata_manager.registry),
            "var_names": [str(v) for v in self.adata.var_names],
            "classifier_labels": self.classifier_labels,
            "lora_config": self.lora_config,
            "checkpoint_path": self._checkpoint_path,
            "is_trained": bool(self.is_trained_),
            "history": {
                key: json.loads(frame.to_json(orient="split"))
                for key, frame in (self.history_ or {}).items()
                if isinstance(frame, pd.DataFrame)
            },
        }
        text = json.dumps(attrs)  # fails here, before any file is written, if not JSON
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(targets[0]))
        targets[1].write_text(text)
        if save_anndata:
            self.adata.write_h5ad(targets[2], **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: ad.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        *,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ):
        """Load a model written by :meth:`save` (any AnnData set up or not for the class).

        Parameters
        ----------
        dir_path
            Folder given to :meth:`save`.
        adata
            AnnData to attach (any gene set: genes are aligned to the model's vocabulary);
            ``None`` reads the AnnData saved with the model.
        accelerator, device
            Where to put the model: ``"cpu"``, ``"gpu"`` / ``"cuda"``, or ``"auto"``.
        prefix
            File-name prefix given to :meth:`save`.
        trust_checkpoint
            Allow folders written by scvi-tools' own ``save`` (``model.pt``) that need full
            unpickling. Only for files from a source you trust: unpickling runs code.
        **kwargs
            For scvi-tools-format folders: passed to scvi-tools' ``load``.

        Raises
        ------
        CheckpointNotFoundError
            If the folder holds no saved model.
        UnsafeCheckpointError
            For an scvi-tools-format folder that needs unpickling, without ``trust_checkpoint``.
        """
        folder = Path(dir_path)
        prefix = prefix or ""
        attrs_file = folder / f"{prefix}{ATTRS_FILE}"
        if not attrs_file.is_file():
            legacy = folder / f"{prefix}model.pt"
            if legacy.is_file():
                return cls._load_scvi_format(
                    folder, legacy, adata, accelerator, device, prefix, trust_checkpoint, kwargs
                )
            raise CheckpointNotFoundError(
                f"{folder} holds no saved scfm model ({attrs_file.name} + {WEIGHTS_FILE}). For "
                f"original release files use {cls.__name__}.from_pretrained(path, adata)."
            )
        try:
            attrs = json.loads(attrs_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointFormatError(
                f"{attrs_file} is not a readable scfm model: {err}"
            ) from None
        if not isinstance(attrs, dict) or attrs.get("format") != "scfm-model":
            raise CheckpointFormatError(f"{attrs_file} is not an scfm saved model.")
        if attrs.get("class") != cls.__name__:
            raise CheckpointError(
                f"{folder} holds a saved {attrs.get('class')} model; load it with "
                f"scfm.model.{attrs.get('class')}.load(...)."
            )
        if adata is None:
            saved = folder / f"{prefix}{ADATA_FILE}"
            if not saved.is_file():
                raise InvalidInputError(
                    f"{folder} holds no AnnData (saved without save_anndata=True); pass adata."
                )
            adata = ad.read_h5ad(saved)
        adata = cls._registered_modality(adata)
        registry = _decode(attrs["registry"])
        if cls._own_manager(adata) is None:
            cls._setup_like(adata, dict(registry.get("setup_args", {})))
        init = _decode(attrs["init_params"])
        non_kwargs = dict(init.get("non_kwargs", {}))
        extra = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
        model = cls(adata, **non_kwargs, **extra)
        if attrs.get("classifier_labels"):
            model.module.add_classifier(len(attrs["classifier_labels"]))
            model.classifier_labels = list(attrs["classifier_labels"])
        if attrs.get("lora_config"):
            lora = attrs["lora_config"]
            model._add_lora(int(lora["rank"]), float(lora["alpha"]))
        model._load_saved_weights(folder / f"{prefix}{WEIGHTS_FILE}")
        model._checkpoint_path = attrs.get("checkpoint_path")
        # scvi-tools has no public setter for the fitted flag it keeps on every model.
        model.is_trained_ = bool(attrs.get("is_trained", False))
        model.history_ = {
            key: pd.read_json(_json_io(value), orient="split")
            for key, value in (attrs.get("history") or {}).items()
        } or None
        model.to_device(_device(accelerator, device))
        model.module.eval()
        model._refresh_summary()
        return model

    def _load_saved_weights(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        if not path.is_file():
            raise CheckpointNotFoundError(f"{path} is missing: the saved model is incomplete.")
        try:
            missing, unexpected = load_model(self.module, str(path), strict=False)
        except (SafetensorError, OSError) as err:
            raise CheckpointFormatError(
                f"{path} is not a readable safetensors file: {err}"
            ) from None
        except RuntimeError as err:  # shape mismatch
            raise CheckpointKeyError(f"The weights in {path} do not fit: {err}") from None
        if missing or unexpected:
            raise CheckpointKeyError(
                f"The weights in {path} do not fit {type(self.module).__name__}.",
                missing=sorted(missing),
                unexpected=sorted(unexpected),
            )
        from scfm.io._common import check_finite_state_dict

        check_finite_state_dict(self.module.state_dict(), what=str(path))

    @classmethod
    def _load_scvi_format(
        cls,
        folder: Path,
        legacy: Path,
        adata: ad.AnnData | None,
        accelerator: str,
        device: int | str,
        prefix: str,
        trust_checkpoint: bool,
        kwargs: dict[str, Any],
    ):
        """Folders written by scvi-tools' ``save``: allowed only when safe or trusted."""
        if not trust_checkpoint:
            numpy_types = [np.ndarray, np.dtype, np.core.multiarray._reconstruct]
            numpy_types += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "O", "U1")]
            try:
                with torch.serialization.safe_globals(numpy_types):
                    torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as err:
                raise UnsafeCheckpointError(
                    f"{legacy} (scvi-tools' pickle format) needs full unpickling to be read "
                    f"({type(err).__name__}); unpickling can run code. Pass "
                    "trust_checkpoint=True only if you trust its source, then save it again "
                    "with model.save(...) to get scfm's safe format."
                ) from None
        from scvi.model.base import BaseModelClass

        # The scvi-tools path is the only reader of that layout; its pickle was checked above
        # (or the caller trusts it).
        return BaseModelClass.load.__func__(
            cls,
            str(folder),
            adata=adata,
            accelerator=accelerator,
            device=device,
            prefix=prefix or None,
            **kwargs,
        )


def _json_io(value: Any):
    from io import StringIO

    return StringIO(json.dumps(value))


def _device(accelerator: str, device: int | str) -> str:
    """Torch device for ``load``'s Lightning-style arguments."""
    if accelerator == "cpu" or device == "cpu":
        return "cpu"
    if isinstance(device, str) and device not in ("auto", "cuda", "gpu"):
        return device
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return f"cuda:{device}" if isinstance(device, int) else "cuda"
    return "cpu"
