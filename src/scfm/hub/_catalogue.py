"""The release catalogue: ``releases.toml`` read into small typed records.

The catalogue is data: every released checkpoint that scfm reads, where it is hosted, which of
its files ``from_pretrained`` needs, their sizes and checksums where known, the licence, the
paper and the ``from_pretrained`` options the release needs. This module only parses and
validates it (no network, no torch, no pandas at import).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from scfm.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Release", "ReleaseFile", "get_release", "list_releases", "releases"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_MODELS = ("Geneformer", "ScFoundation", "CellFM", "ScCello", "CellPLM")
_ROLES = ("weights", "config", "vocabulary", "labels", "ontology")


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release.

    Attributes
    ----------
    target
        Path of the file inside the release folder (the layout ``from_pretrained`` reads).
    role
        ``"weights"``, ``"config"``, ``"vocabulary"``, ``"labels"`` or ``"ontology"``.
    path
        Path inside the release's Hugging Face repository (``None`` for plain URLs).
    url
        Plain https URL (``None`` for Hugging Face files).
    size
        Exact size in bytes, where established.
    sha256
        Expected sha256, where the host publishes one (or it was read from the host's git
        history); ``None`` where none is known.
    approx_size
        Rounded size in bytes from a listing, where the exact size is not known.
    one_of
        Files sharing this group name are alternatives (the first one the host has is used).
    optional
        The release is complete without this file.
    extract
        ``"tar"``: the archive is unpacked into the release folder after verification.
    """

    target: str
    role: str
    path: str | None = None
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    approx_size: int | None = None
    one_of: str | None = None
    optional: bool = False
    extract: Literal["tar"] | None = None

    @property
    def host(self) -> Literal["huggingface", "url"]:
        """Where the file comes from."""
        return "huggingface" if self.path is not None else "url"


@dataclass(frozen=True)
class Release:
    """One catalogue entry (see ``releases.toml`` for the meaning of each field)."""

    name: str
    model: str
    title: str
    licence: str
    licence_url: str
    commercial_use: bool
    paper: str
    checksums: str
    files: tuple[ReleaseFile, ...]
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None

    @property
    def size(self) -> int | None:
        """Exact download size in bytes, or ``None`` if any needed file's size is unknown."""
        sizes = [f.size for f in self.needed_files()]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    @property
    def approx_size(self) -> int | None:
        """Download size in bytes using rounded listing sizes where exact ones are missing."""
        sizes = [f.size if f.size is not None else f.approx_size for f in self.needed_files()]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def needed_files(self) -> list[ReleaseFile]:
        """Files counted in sizes: required files plus the first alternative of each group."""
        seen: set[str] = set()
        out = []
        for f in self.files:
            if f.optional or (f.one_of is not None and f.one_of in seen):
                continue
            if f.one_of is not None:
                seen.add(f.one_of)
            out.append(f)
        return out

    def sources(self) -> list[str]:
        """Where the files come from, for messages: Hub URLs and plain URLs."""
        out = []
        for f in self.files:
            if f.path is not None:
                out.append(f"https://huggingface.co/{self.repo_id}/blob/{self.revision}/{f.path}")
            elif f.url is not None:
                out.append(f.url)
        return out


def normalize_name(name: str) -> str:
    """Case- and separator-insensitive form of a release name or alias."""
    return name.strip().lower().replace("_", "-")


def _parse_file(release: str, raw: dict[str, Any]) -> ReleaseFile:
    known = {f for f in ReleaseFile.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{release}: unknown file keys {sorted(unknown)}")
    f = ReleaseFile(**raw)
    if (f.path is None) == (f.url is None):
        raise ValueError(f"{release}/{f.target}: give exactly one of 'path' and 'url'")
    if f.url is not None and not f.url.startswith("https://"):
        raise ValueError(f"{release}/{f.target}: urls must be https")
    if f.sha256 is not None and not _SHA256.match(f.sha256):
        raise ValueError(f"{release}/{f.target}: sha256 must be 64 lower-case hex digits")
    if f.role not in _ROLES:
        raise ValueError(f"{release}/{f.target}: role must be one of {_ROLES}")
    if f.target.startswith(("/", "..")) or ".." in f.target.split("/"):
        raise ValueError(f"{release}/{f.target}: target must stay inside the release folder")
    if f.extract not in (None, "tar"):
        raise ValueError(f"{release}/{f.target}: extract must be 'tar'")
    return f


def _parse_release(raw: dict[str, Any]) -> Release:
    raw = dict(raw)
    files = tuple(_parse_file(raw.get("name", "?"), f) for f in raw.pop("file", []))
    known = {f for f in Release.__dataclass_fields__} - {"files"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{raw.get('name')}: unknown release keys {sorted(unknown)}")
    rel = Release(files=files, **{**raw, "aliases": tuple(raw.get("aliases", ()))})
    if not _NAME.match(rel.name):
        raise ValueError(f"release name {rel.name!r} must be lower case (a-z, 0-9, '.', '-')")
    if rel.model not in _MODELS:
        raise ValueError(f"{rel.name}: model must be one of {_MODELS}")
    if not files:
        raise ValueError(f"{rel.name}: no files")
    if any(f.path is not None for f in files) and not (rel.repo_id and rel.revision):
        raise ValueError(f"{rel.name}: Hugging Face files need repo_id and revision")
    targets = [f.target for f in files]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{rel.name}: duplicate targets")
    return rel


def _parse_document(text: str, where: str) -> list[Release]:
    data = tomllib.loads(text)
    if data.get("schema") != 1:
        raise ValueError(f"{where}: unsupported schema (expected schema = 1)")
    return [_parse_release(raw) for raw in data.get("release", [])]


@cache
def _load(extra: str | None = None) -> dict[str, Release]:
    text = resources.files("scfm.hub").joinpath("releases.toml").read_text(encoding="utf-8")
    found = _parse_document(text, "releases.toml")
    if extra:
        found += _parse_document(Path(extra).read_text(encoding="utf-8"), extra)
    out: dict[str, Release] = {}
    for rel in found:
        if rel.name in out:
            raise ValueError(f"release {rel.name!r} is defined twice (releases.toml, {extra})")
        out[rel.name] = rel
    return out


@cache
def _lookup(extra: str | None = None) -> dict[str, str]:
    """Normalised names and aliases -> release name."""
    table: dict[str, str] = {}
    for rel in _load(extra).values():
        for key in (rel.name, *rel.aliases):
            norm = normalize_name(key)
            if table.get(norm, rel.name) != rel.name:
                raise ValueError(f"{key!r} names two releases")
            table[norm] = rel.name
    return table


def _extra() -> str | None:
    """``SCFM_EXTRA_RELEASES``: a TOML file of further releases (same schema), read at call time."""
    return os.environ.get("SCFM_EXTRA_RELEASES") or None


def list_releases() -> list[Release]:
    """All catalogue entries, in catalogue order (plus those of ``SCFM_EXTRA_RELEASES``)."""
    return list(_load(_extra()).values())


def find_release(name: str) -> Release | None:
    """The release called ``name`` (or one of its aliases), ``None`` if there is none."""
    if not isinstance(name, str) or "/" in name or "\\" in name:
        return None
    extra = _extra()
    key = _lookup(extra).get(normalize_name(name))
    return None if key is None else _load(extra)[key]


def close_names(name: str, n: int = 3) -> list[str]:
    """Release names that look like ``name`` (for "did you mean" hints)."""
    names = [r.name for r in list_releases()]
    return difflib.get_close_matches(normalize_name(str(name)), names, n=n, cutoff=0.6)


def get_release(name: str) -> Release:
    """The catalogue entry of ``name``.

    Parameters
    ----------
    name
        A release name such as ``"geneformer-v2-104m"`` (case and ``_``/``-`` do not matter;
        the Hub folder names, e.g. ``"Geneformer-V2-104M"``, are accepted as aliases).

    Raises
    ------
    InvalidInputError
        If no release has that name; the message lists close names.
    """
    rel = find_release(name)
    if rel is None:
        hint = close_names(name)
        suggestion = f" Did you mean {', '.join(map(repr, hint))}?" if hint else ""
        raise InvalidInputError(
            f"{name!r} is not a release in scfm's catalogue.{suggestion} "
            "List them with scfm.hub.releases() or `scfm releases`."
        )
    return rel


def _human(n: int | None, approx: bool = False) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{'~' if approx else ''}{n / scale:.2f} {unit}"
    return f"{n} B"


def _checksum_state(rel: Release) -> str:
    files = rel.needed_files()
    known = sum(f.sha256 is not None for f in files)
    hub = sum(f.sha256 is None and f.host == "huggingface" for f in files)
    if known == len(files):
        return "all (catalogue)"
    if known + hub == len(files):
        return "all (catalogue + Hub at download)"
    return f"{known + hub} of {len(files)}"


def releases(model: str | None = None) -> pd.DataFrame:
    """The release catalogue as a table, one row per release.

    Parameters
    ----------
    model
        Only the releases of this ``scfm.model`` class (e.g. ``"CellFM"``).

    Returns
    -------
    DataFrame indexed by release name with columns ``model``, ``title``, ``host`` (Hub
    ``repo@revision`` and / or URL hosts), ``files`` (targets in the release folder),
    ``size_bytes`` (exact, ``<NA>`` where a size is unknown), ``size`` (human readable, ``~``
    where it is rounded from a listing), ``checksums``, ``licence``, ``commercial_use``,
    ``paper`` and ``options`` (the ``from_pretrained`` keyword arguments the release needs).
    """
    from urllib.parse import urlsplit

    import pandas as pd

    rows = []
    for rel in list_releases():
        if model is not None and rel.model.lower() != model.lower():
            continue
        hosts = []
        if rel.repo_id is not None:
            hosts.append(f"hf:{rel.repo_id}@{(rel.revision or '')[:7]}")
        hosts += sorted({urlsplit(f.url).netloc for f in rel.files if f.url is not None})
        exact = rel.size
        rows.append(
            {
                "name": rel.name,
                "model": rel.model,
                "title": rel.title,
                "host": ", ".join(hosts),
                "files": ", ".join(f.target for f in rel.needed_files()),
                "size_bytes": exact,
                "size": _human(exact) if exact is not None else _human(rel.approx_size, True),
                "checksums": _checksum_state(rel),
                "licence": rel.licence,
                "commercial_use": rel.commercial_use,
                "paper": rel.paper,
                "options": dict(rel.options),
            }
        )
    frame = pd.DataFrame(rows).set_index("name") if rows else pd.DataFrame()
    if "size_bytes" in frame:
        frame["size_bytes"] = frame["size_bytes"].astype("Int64")
    return frame
