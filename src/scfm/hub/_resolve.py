"""``scfm.hub.resolve``: turn what a user passed to ``from_pretrained`` into a local folder.

Order: an existing local path wins; otherwise a catalogue release name (or alias) is looked up
in the cache and, where allowed, downloaded; anything else gets the usual
:class:`~scfm.errors.CheckpointNotFoundError` of a missing path.

Default (like HF transformers' ``from_pretrained`` and scvi-tools' hub): a release that is not
cached is downloaded, unless ``download=False`` is passed or offline mode is set with
``SCFM_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``); offline mode wins
over ``download=True``. Then a missing release fails at once, without any network access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scfm.errors import CheckpointError, CheckpointNotFoundError
from scfm.hub import _cache
from scfm.hub._catalogue import Release, close_names, find_release

__all__ = ["ResolvedRelease", "resolve"]


@dataclass(frozen=True)
class ResolvedRelease:
    """A checkpoint location ready for a model's ``_from_pretrained``.

    Attributes
    ----------
    path
        Local folder (or file) holding the release files.
    options
        ``from_pretrained`` keyword arguments the release needs (e.g. CellFM ``n_heads``,
        CellPLM ``prefix``); empty for a local path. Options the user passes take precedence.
    release
        The catalogue entry, ``None`` for a local path.
    """

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    release: Release | None = None

    @property
    def name(self) -> str | None:
        """The release name, ``None`` for a local path."""
        return None if self.release is None else self.release.name


def resolve(
    path_or_name: str | os.PathLike,
    model_cls_name: str,
    *,
    download: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ResolvedRelease:
    """Resolve ``from_pretrained``'s first argument to a local release folder.

    Parameters
    ----------
    path_or_name
        A local directory / file of an original release, or a catalogue release name such as
        ``"geneformer-v2-104m"`` (see :func:`scfm.hub.releases`).
    model_cls_name
        Name of the calling ``scfm.model`` class (``"Geneformer"``, ``"CellFM"``, ...); a
        release of another model is refused.
    download
        Whether a release missing from the cache may be downloaded. ``None`` (default): yes,
        unless offline mode is set (``SCFM_OFFLINE=1``, ``HF_HUB_OFFLINE=1``). Offline mode
        always wins.
    cache_dir
        Cache root (default ``SCFM_CACHE`` or the platform cache folder).
    progress
        Show download progress bars.

    Returns
    -------
    The local path and the release's ``from_pretrained`` options.

    Raises
    ------
    CheckpointNotFoundError
        The path does not exist and is no release name; or the release is not cached and may
        not (or cannot) be downloaded. The message names the release, its files, their URLs and
        the ``scfm fetch NAME`` command.
    CheckpointError
        The release belongs to another model class (the message names the right class).
    """
    text = os.fspath(path_or_name)
    local = Path(text).expanduser()
    if local.exists():
        return ResolvedRelease(local)
    release = find_release(text)
    if release is None:
        _raise_missing_path(text)
    assert release is not None
    if release.model != model_cls_name:
        raise CheckpointError(
            f"{release.name!r} is a {release.model} release, not a {model_cls_name} one. Load it "
            f"with scfm.model.{release.model}.from_pretrained({release.name!r}, adata)."
        )
    root = _cache.cache_dir(cache_dir)
    folder = _cache.release_dir(release, root)
    if _cache.is_complete(folder, release):
        return ResolvedRelease(folder, dict(release.options), release)
    from scfm.hub._download import fetch, not_available_message

    if _cache.is_offline():
        reason = f"downloads are off ({_cache.offline_variable()})"
        raise CheckpointNotFoundError(not_available_message(release, reason))
    if download is False:
        raise CheckpointNotFoundError(
            not_available_message(release, "download=False was passed")
            + f" Or pass download=True to let from_pretrained download {release.name}."
        )
    folder = fetch(release.name, root, progress=progress)
    return ResolvedRelease(folder, dict(release.options), release)


def _raise_missing_path(text: str) -> None:
    """The usual missing-path error, with release names that look like ``text``."""
    from scfm.io._common import resolve_local_path

    try:
        resolve_local_path(text)
    except CheckpointNotFoundError as err:
        hint = close_names(text) if "/" not in text and os.sep not in text else []
        if not hint:
            raise
        names = ", ".join(repr(n) for n in hint)
        raise CheckpointNotFoundError(
            f"{err} Release names in scfm's catalogue that look alike: {names} "
            "(all of them: scfm.hub.releases())."
        ) from None
    raise CheckpointNotFoundError(f"The checkpoint path {text!r} does not exist.")  # unreachable
