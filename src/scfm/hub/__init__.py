"""Getting the weights: the release catalogue, a verified download cache, and model sharing.

* :func:`releases` — every released checkpoint scfm reads, as a table (hosts, files, sizes,
  checksums, licences, papers, ``from_pretrained`` options).
* :func:`fetch` — download a release into the cache (resumable, verified, atomic).
* :func:`resolve` — what ``Model.from_pretrained(path_or_release_name, adata)`` calls.
* :func:`push` / :func:`pull` — share fine-tuned models in scvi-tools' hub layout.

Importing this package loads neither torch nor huggingface_hub.
"""

from __future__ import annotations

from scfm.hub._cache import cache_dir, cached_release_dir, is_offline
from scfm.hub._catalogue import Release, ReleaseFile, get_release, list_releases, releases
from scfm.hub._download import fetch
from scfm.hub._resolve import ResolvedRelease, resolve
from scfm.hub._share import pull, push

__all__ = [
    "Release",
    "ReleaseFile",
    "ResolvedRelease",
    "cache_dir",
    "cached_release_dir",
    "fetch",
    "get_release",
    "is_offline",
    "list_releases",
    "pull",
    "push",
    "releases",
    "resolve",
]
