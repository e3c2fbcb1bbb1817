"""Share fine-tuned scfm models on the Hugging Face Hub the scvi-tools way.

A pushed repository has the layout of :class:`scvi.hub.HubModel`: the files ``model.save``
writes, ``_scvi_required_metadata.json`` (:class:`scvi.hub.HubMetadata` with
``model_parent_module="scfm.model"``) and a ``README.md`` model card whose metadata carries
scvi-tools' hub tags (``model_cls_name:...``, ``scvi_version:...``, ``anndata_version:...``) and
the licence, inherited from the release the model was fine-tuned from (a model fine-tuned from a
non-commercial release stays non-commercial). :func:`pull` downloads it, checks it and loads it
with the model class's own safe ``load``; ``scvi.hub.HubModel(folder)`` opens the same folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from scfm.errors import CheckpointError, UnsafeCheckpointError
from scfm.hub import _cache

logger = logging.getLogger(__name__)

__all__ = ["pull", "push"]

#: scvi-tools' hub file names (scvi.hub._constants).
METADATA_FILE = "_scvi_required_metadata.json"
MODEL_CARD_FILE = "README.md"
#: scfm's model classes, the only ones :func:`pull` instantiates.
_MODEL_CLASSES = ("Geneformer", "ScFoundation", "CellFM", "ScCello", "CellPLM")
#: Suffixes of formats that need unpickling (arbitrary code) to be read.
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
#: Hub licence identifiers of the catalogue's licences (anything else is "other").
_HF_LICENCES = {
    "apache-2.0": "apache-2.0",
    "mit": "mit",
    "bsd-2-clause": "bsd-2-clause",
    "cc by-nc-nd 4.0": "cc-by-nc-nd-4.0",
}


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def _base_release(model: Any) -> Any | None:
    """The catalogue release a model was loaded from (via the cache marker), if any."""
    from scfm.hub._catalogue import find_release

    path = getattr(model, "_checkpoint_path", None)
    if not path:
        return None
    marker = _cache.read_marker(Path(path))
    return None if marker is None else find_release(str(marker.get("release", "")))


def _hf_licence(licence: str) -> str:
    lowered = licence.lower()
    return next((hf for key, hf in _HF_LICENCES.items() if lowered.startswith(key)), "other")


def _model_card(
    model: Any, repo_id: str, licence: str | None, description: str | None, release: Any | None
) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    cls = type(model).__name__
    tags = [
        "biology",
        "genomics",
        "single-cell",
        "scfm",
        f"model_cls_name:{cls}",
        f"scvi_version:{_version('scvi-tools')}",
        f"anndata_version:{_version('anndata')}",
    ]
    if licence is None:
        licence = release.licence if release is not None else "other"
    data: dict[str, Any] = {
        "license": _hf_licence(licence),
        "library_name": "scvi-tools",
        "tags": tags,
    }
    if data["license"] == "other":
        data["license_name"] = "see-model-card"
        if release is not None:
            data["license_link"] = release.licence_url
    try:
        setup_args = dict(model.adata_manager.registry.get("setup_args", {}))
    except Exception:  # a model without a registered AnnData
        setup_args = {}
    base = (
        f"fine-tuned from the scfm release `{release.name}` ({release.title}; {release.paper})"
        if release is not None
        else "an scfm model"
    )
    labels = getattr(model, "classifier_labels", None)
    body = "\n".join(
        [
            f"# {repo_id}",
            "",
            description or f"A {cls} model ({base}), shared with scfm.",
            "",
            "## Load it",
            "",
            "```python",
            "import scfm",
            f"scfm.model.{cls}.setup_anndata(adata)",
            f'model = scfm.hub.pull("{repo_id}", adata)',
            "```",
            "",
            "The folder also opens with `scvi.hub.HubModel` (scvi-tools' hub layout).",
            "",
            "## Details",
            "",
            f"- model class: `scfm.model.{cls}`",
            f"- base release: {base}",
            f"- licence: {licence}",
            f"- classifier labels: {labels if labels else 'none'}",
            f"- setup_anndata arguments: `{json.dumps(setup_args, default=str)}`",
        ]
    )
    card_data = ModelCardData(**data)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def push(
    model: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    licence: str | None = None,
    description: str | None = None,
    commit_message: str | None = None,
    create_repo: bool = True,
    endpoint: str | None = None,
) -> str:
    """Upload a (fine-tuned) scfm model to the Hugging Face Hub in scvi-tools' hub layout.

    Parameters
    ----------
    model
        A trained ``scfm.model`` instance; what its ``save`` writes is uploaded (not the AnnData).
    repo_id
        ``"user/name"`` of the model repository.
    token
        Hub token with write access (default: the logged-in one).
    private
        Create the repository as private.
    licence
        Licence for the model card; default: the licence of the release the model was loaded
        from (so fine-tuned non-commercial weights stay non-commercial), else ``"other"``.
    description
        First paragraph of the model card.
    commit_message
        Commit message (default ``"Upload <Class> with scfm"``).
    create_repo
        Create the repository if it does not exist.
    endpoint
        Hub endpoint; default ``SCFM_HF_ENDPOINT`` / ``HF_ENDPOINT`` / https://huggingface.co.

    Returns
    -------
    The URL of the commit.
    """
    from huggingface_hub import HfApi
    from scvi.hub import HubMetadata

    from scfm.hub._download import hf_endpoint

    cls = type(model).__name__
    if cls not in _MODEL_CLASSES:
        raise CheckpointError(f"push expects an scfm.model instance, got {cls}.")
    release = _base_release(model)
    if release is not None and not release.commercial_use:
        logger.warning(
            "%s was fine-tuned from %s, released under %s (%s). Check that the licence allows "
            "sharing a derived model before making the repository public.",
            cls,
            release.name,
            release.licence,
            release.licence_url,
        )
    api = HfApi(endpoint=endpoint or hf_endpoint(), token=token)
    with tempfile.TemporaryDirectory(prefix="scfm-push-") as tmp:
        folder = Path(tmp) / "model"
        model.save(str(folder), overwrite=True)
        HubMetadata(
            scvi_version=_version("scvi-tools"),
            anndata_version=_version("anndata"),
            model_cls_name=cls,
            model_parent_module="scfm.model",
        ).save(str(folder / METADATA_FILE), overwrite=True)
        card = _model_card(model, repo_id, licence, description, release)
        card.save(str(folder / MODEL_CARD_FILE))
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message or f"Upload {cls} with scfm",
        )
    return str(getattr(info, "commit_url", info))


def pull(
    repo_id: str,
    adata: Any,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    trust_checkpoint: bool = False,
    endpoint: str | None = None,
) -> Any:
    """Download a model pushed with :func:`push` and load it for ``adata``.

    Parameters
    ----------
    repo_id
        ``"user/name"`` of the model repository.
    adata
        AnnData to load the model with (registered with the model class's ``setup_anndata``,
        or registered by ``load`` from the saved setup).
    revision
        Branch, tag or commit (default: the main branch).
    cache_dir
        Hugging Face cache folder for the download (default: huggingface_hub's).
    token
        Hub token for private repositories.
    trust_checkpoint
        Allow files in formats that need unpickling (``.pt``, ``.pkl``, ...). Unpickling can run
        arbitrary code: only for repositories you trust.
    endpoint
        Hub endpoint; default ``SCFM_HF_ENDPOINT`` / ``HF_ENDPOINT`` / https://huggingface.co.

    Returns
    -------
    The loaded model (an ``scfm.model`` instance).

    Raises
    ------
    CheckpointError
        The repository is not an scfm model in scvi-tools' hub layout.
    UnsafeCheckpointError
        The repository holds pickled files and ``trust_checkpoint`` is ``False``.
    """
    from huggingface_hub import snapshot_download
    from scvi.hub import HubModel

    import scfm.model
    from scfm.hub._download import hf_endpoint

    folder = Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            endpoint=endpoint or hf_endpoint(),
            local_files_only=_cache.is_offline(),
        )
    )
    try:
        hub_model = HubModel(str(folder), repo_name=repo_id)
    except ValueError as err:
        raise CheckpointError(
            f"{repo_id} is not in scvi-tools' hub layout ({err}): it needs {METADATA_FILE} and "
            f"{MODEL_CARD_FILE}. Push models with scfm.hub.push."
        ) from None
    meta = hub_model.metadata
    if meta.model_parent_module != "scfm.model" or meta.model_cls_name not in _MODEL_CLASSES:
        raise CheckpointError(
            f"{repo_id} holds a {meta.model_parent_module}.{meta.model_cls_name} model, not an "
            "scfm one; use scvi.hub.HubModel for scvi-tools models."
        )
    pickled = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES
    )
    if pickled and not trust_checkpoint:
        raise UnsafeCheckpointError(
            f"{repo_id} holds files that need unpickling to be read ({', '.join(pickled)}); "
            "loading them could execute code. If you trust the repository, pass "
            "trust_checkpoint=True."
        )
    model_cls = getattr(scfm.model, meta.model_cls_name)
    return model_cls.load(str(folder), adata=adata)
