"""Where fetched releases live, and how a complete one is recognised.

Layout of the cache (default: the platform cache folder, ``~/.cache/scfm`` on Linux; set
``SCFM_CACHE`` or pass ``cache_dir`` to move it)::

    <cache>/releases/<name>/               a complete release, in the layout from_pretrained reads
    <cache>/releases/<name>/.scfm-release.json   written last: what was fetched, sizes, sha256
    <cache>/downloads/<name>/              staging: finished files and resumable ``*.part`` files
    <cache>/licences/<name>.txt            the licence notice was shown for this release

A release folder appears only by renaming its finished staging folder, after every file was
verified and the marker written, so an interrupted fetch never leaves a folder that looks
complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scfm.hub._catalogue import Release

__all__ = ["cache_dir", "cached_release_dir", "is_offline"]

#: Name of the marker file written into a release folder when its fetch completed.
MARKER = ".scfm-release.json"
_TRUE = {"1", "true", "yes", "on"}


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The root of scfm's download cache.

    Parameters
    ----------
    cache_dir
        Explicit location; default: the environment variable ``SCFM_CACHE``, else the platform
        cache folder (``platformdirs.user_cache_dir("scfm")``, ``~/.cache/scfm`` on Linux).
    """
    if cache_dir is not None:
        return Path(os.fspath(cache_dir)).expanduser()
    env = os.environ.get("SCFM_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("scfm", appauthor=False))


def is_offline() -> bool:
    """Whether downloads are switched off, read from the environment at call time.

    Offline mode: ``SCFM_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to
    1 / true / yes / on.
    """
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("SCFM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def offline_variable() -> str | None:
    """The environment variable that switched downloads off, for messages."""
    for var in ("SCFM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    return None


def release_dir(release: Release, root: Path) -> Path:
    """Folder of a complete release in the cache ``root``."""
    return root / "releases" / release.name


def staging_dir(release: Release, root: Path) -> Path:
    """Staging folder of a release's downloads in the cache ``root``."""
    return root / "downloads" / release.name


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a release folder, ``None`` if absent or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(folder: Path, release: Release) -> bool:
    """Whether ``folder`` holds a complete fetch of ``release``.

    Complete means: the marker exists, names this release, covers every required file (and
    one of each group of alternatives), and every file it records is present with the
    recorded size.
    """
    marker = read_marker(folder)
    if marker is None or marker.get("release") != release.name:
        return False
    recorded: dict[str, Any] = marker.get("files", {})
    groups = {f.one_of for f in release.files if f.one_of is not None}
    have_groups = {f.one_of for f in release.files if f.one_of and f.target in recorded}
    required = [f for f in release.files if not f.optional and f.one_of is None]
    if any(f.target not in recorded for f in required) or groups - have_groups:
        return False
    for rel_path, info in {**recorded, **marker.get("extracted", {})}.items():
        path = folder / rel_path
        if info.get("extracted_archive"):
            continue
        if not path.is_file() or path.stat().st_size != info.get("size"):
            return False
    return True


def cached_release_dir(name: str, cache_dir_: str | os.PathLike | None = None) -> Path | None:
    """The folder of a completely fetched release, ``None`` if it is not in the cache."""
    from scfm.hub._catalogue import get_release

    release = get_release(name)
    folder = release_dir(release, cache_dir(cache_dir_))
    return folder if is_complete(folder, release) else None
