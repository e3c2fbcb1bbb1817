"""``scfm.hub.fetch``: download a catalogue release into the cache, verified and atomically.

Transfers go through :mod:`huggingface_hub`: file metadata (size, sha256 / git blob id, commit)
with :func:`huggingface_hub.get_hf_file_metadata` on ``{endpoint}/{repo}/resolve/{revision}/
{path}``, and the bytes with huggingface_hub's streaming GET (``file_download.http_get``), which
resumes from an offset with an HTTP ``Range`` request, retries transient network errors and
restarts cleanly when a server ignores ``Range``. ``hf_hub_download`` itself is not used because
it deletes partial files when a transfer fails, so a broken 10 GB download would start over;
plain-URL releases use the same streaming GET (pooch cannot resume either).

Endpoints are read at call time: ``SCFM_HF_ENDPOINT`` or ``HF_ENDPOINT`` for the Hub (default
https://huggingface.co), and ``SCFM_URL_BASE`` replaces every plain URL by
``{SCFM_URL_BASE}/{release}/{target}`` (a mirror that holds release folders as the cache does).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError, ScfmError
from scfm.hub import _cache
from scfm.hub._catalogue import Release, ReleaseFile, get_release

logger = logging.getLogger(__name__)

__all__ = ["fetch"]

_DEFAULT_ENDPOINT = "https://huggingface.co"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Seconds to wait for a server to answer a metadata request.
_METADATA_TIMEOUT = 10.0
_CHUNK = 1 << 20


def hf_endpoint() -> str:
    """The Hugging Face endpoint, read at call time (``SCFM_HF_ENDPOINT``, ``HF_ENDPOINT``)."""
    value = os.environ.get("SCFM_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT")
    return (value or _DEFAULT_ENDPOINT).rstrip("/")


def file_url(release: Release, f: ReleaseFile) -> str:
    """Where ``f`` is downloaded from, after the endpoint / mirror overrides."""
    if f.path is not None:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(
            release.repo_id, f.path, revision=release.revision, endpoint=hf_endpoint()
        )
    base = os.environ.get("SCFM_URL_BASE")
    if base:
        return f"{base.rstrip('/')}/{release.name}/{f.target}"
    return f.url  # type: ignore[return-value]


def not_available_message(release: Release, reason: str) -> str:
    """The message of the error raised when a release is neither cached nor downloadable."""
    files = ", ".join(f.target for f in release.needed_files())
    urls = "\n  ".join(file_url(release, f) for f in release.needed_files())
    return (
        f"The {release.model} release {release.name!r} is not in the scfm cache and {reason}. "
        f"Files: {files}. From:\n  {urls}\n"
        f"Download it once with `scfm fetch {release.name}` (or scfm.hub.fetch({release.name!r}))"
        " while online, then load it offline; or download the files yourself and pass their "
        "folder to from_pretrained."
    )


def _tqdm_class(progress: bool) -> type:
    from tqdm.auto import tqdm

    class _Bar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = not progress
            super().__init__(*args, **kwargs)

    return _Bar


def _http_get(
    url: str, fh: Any, resume: int, headers: dict, expected: int | None, label: str, progress: bool
) -> None:
    from huggingface_hub.file_download import http_get

    kwargs: dict[str, Any] = {
        "resume_size": resume,
        "headers": headers,
        "expected_size": expected,
        "displayed_filename": label,
    }
    if "tqdm_class" in inspect.signature(http_get).parameters:
        kwargs["tqdm_class"] = _tqdm_class(progress)
    http_get(url, fh, **kwargs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Missing(Exception):
    """The host answered 404 for a file (tries the next alternative of a group)."""


def _locate(release: Release, f: ReleaseFile, token: str | bool | None) -> dict[str, Any]:
    """URL to GET, headers, expected size and the host's checksum of one file."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    from scfm import __version__

    url = file_url(release, f)
    if f.path is None:
        return {"url": url, "get": url, "headers": {}, "size": f.size, "etag": None}
    endpoint = hf_endpoint()
    kwargs: dict[str, Any] = {
        "token": token,
        "timeout": _METADATA_TIMEOUT,
        "library_name": "scfm",
        "library_version": __version__,
    }
    if "endpoint" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["endpoint"] = endpoint
    try:
        meta = get_hf_file_metadata(url, **kwargs)
    except EntryNotFoundError as err:
        raise _Missing(url) from err
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) == 404:
            raise _Missing(url) from err
        raise
    headers = build_hf_headers(token=token, library_name="scfm", library_version=__version__)
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(endpoint).netloc:
        headers.pop("authorization", None)  # signed CDN URL: never forward the token
    return {"url": url, "get": location, "headers": headers, "size": meta.size, "etag": meta.etag}


def _verify(path: Path, f: ReleaseFile, where: dict[str, Any]) -> tuple[str, str]:
    """sha256 of the downloaded file and what it was checked against; raises on mismatch."""
    got = _sha256(path)
    size = path.stat().st_size
    want_size = f.size if f.size is not None else where["size"]
    problem = None
    if want_size is not None and size != want_size:
        problem = f"has {size:,} bytes, expected {want_size:,}"
    if f.sha256 is not None:
        checked = "sha256 (catalogue)"
        if problem is None and got != f.sha256:
            problem = f"has sha256 {got}, expected {f.sha256} (scfm's catalogue)"
    elif where["etag"] and _HEX64.match(where["etag"]):
        checked = "sha256 (reported by the host)"
        if problem is None and got != where["etag"]:
            problem = f"has sha256 {got}, the host reports {where['etag']}"
    elif where["etag"] and _HEX40.match(where["etag"]):
        checked = "git blob id (reported by the host)"
        blob = _git_blob_sha1(path)
        if problem is None and blob != where["etag"]:
            problem = f"has git blob id {blob}, the host reports {where['etag']}"
    else:
        checked = "none: no checksum published"
    if problem is not None:
        path.unlink(missing_ok=True)
        raise CheckpointFormatError(
            f"{f.target} downloaded from {where['url']} {problem}. The file was refused and "
            "removed. Run the fetch again; if it keeps failing the host or mirror serves "
            "different bytes than the release."
        )
    return got, checked


def _download(
    release: Release, f: ReleaseFile, staging: Path, progress: bool, token: str | bool | None
) -> dict[str, Any]:
    """Download (or resume) one file into ``staging``, verify it and return its record."""
    dest = staging / f.target
    where = _locate(release, f, token)
    if dest.is_file():  # finished in an earlier, interrupted fetch: verified then, check again
        try:
            got, checked = _verify(dest, f, where)
            return {
                "size": dest.stat().st_size,
                "sha256": got,
                "checked": checked,
                "url": where["url"],
            }
        except CheckpointFormatError:
            logger.info("Re-downloading %s: the staged copy no longer verifies.", f.target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    expected = f.size if f.size is not None else where["size"]
    resume = part.stat().st_size if part.is_file() else 0
    if expected is not None and resume > expected:
        part.unlink()
        resume = 0
    if resume:
        logger.info("Resuming %s at byte %d.", f.target, resume)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        with open(part, "r+b" if part.exists() else "wb") as fh:
            fh.seek(0, os.SEEK_END)
            _http_get(
                where["get"],
                fh,
                resume,
                where["headers"],
                expected,
                f"{release.name}/{f.target}",
                progress,
            )
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) == 404:
            part.unlink(missing_ok=True)
            raise _Missing(where["url"]) from err
        raise
    got, checked = _verify(part, f, where)
    os.replace(part, dest)
    return {"size": dest.stat().st_size, "sha256": got, "checked": checked, "url": where["url"]}


def _extract(archive: Path, staging: Path) -> dict[str, Any]:
    """Unpack a verified tar archive into ``staging`` (dropping a single top-level folder)."""
    tmp = staging / ".extract"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuses unsafe members itself
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - older 3.11 patch releases
            for member in tar.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or member.issym() or member.islnk():
                    raise CheckpointFormatError(
                        f"{archive.name} holds an unsafe member {member.name!r}; not unpacked."
                    )
            tar.extractall(tmp)
    entries = list(tmp.iterdir())
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
    extracted = {}
    for item in root.iterdir():
        target = staging / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()
    for path in staging.rglob("*"):
        if path.is_file() and not path.name.endswith(".part") and path.name != _cache.MARKER:
            extracted[path.relative_to(staging).as_posix()] = {"size": path.stat().st_size}
    return extracted


def _licence_notice(release: Release, root: Path) -> None:
    """Warn once per cache before the first download of a non-commercial release."""
    if release.commercial_use:
        return
    marker = root / "licences" / f"{release.name}.txt"
    if marker.is_file():
        return
    text = (
        f"{release.name} ({release.model}) is released under {release.licence}: "
        f"non-commercial use only. By downloading it you accept its terms: {release.licence_url}"
    )
    logger.warning(text)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{text}\nshown {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n", encoding="utf-8")


def _fetch_files(
    release: Release, staging: Path, progress: bool, token: str | bool | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    records: dict[str, Any] = {}
    extracted: dict[str, Any] = {}
    done_groups: set[str] = set()
    for f in release.files:
        if f.one_of is not None and f.one_of in done_groups:
            continue
        try:
            records[f.target] = _download(release, f, staging, progress, token)
        except _Missing as err:
            if f.optional or f.one_of is not None:
                logger.info("%s: %s is not on the host; skipped.", release.name, f.target)
                continue
            raise CheckpointNotFoundError(
                f"{release.name}: {f.target} is not at {err.args[0]} (HTTP 404). The host "
                "moved or removed it; download the release by hand and pass its folder."
            ) from None
        if f.one_of is not None:
            done_groups.add(f.one_of)
        if f.extract == "tar":
            extracted.update(_extract(staging / f.target, staging))
            records[f.target]["extracted_archive"] = True
    missing = {f.one_of for f in release.files if f.one_of} - done_groups
    if missing:
        raise CheckpointNotFoundError(
            f"{release.name}: the host has none of the alternatives for {sorted(missing)} "
            f"({', '.join(f.target for f in release.files if f.one_of in missing)})."
        )
    return records, extracted


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    token: str | bool | None = None,
) -> Path:
    """Download a catalogue release into the scfm cache and return its folder.

    Files are verified (size, and sha256 where the catalogue or the Hub publishes one; a file
    that does not match is removed and the fetch fails), partial downloads are resumed on the
    next call, and the release folder appears only once everything is verified. Before the
    first download of a non-commercial release a licence notice is logged (once per cache).

    Parameters
    ----------
    name
        Release name, e.g. ``"geneformer-v2-104m"`` (see :func:`scfm.hub.releases`).
    cache_dir
        Cache root; default ``SCFM_CACHE`` or the platform cache folder (``~/.cache/scfm``).
    force
        Download again even if the release is cached (partial downloads are discarded).
    progress
        Show a progress bar per file.
    token
        Hugging Face token for private or gated repositories (default: the logged-in one).

    Returns
    -------
    The release folder, ready for ``from_pretrained``.

    Raises
    ------
    CheckpointNotFoundError
        Offline mode is set (``SCFM_OFFLINE`` / ``HF_HUB_OFFLINE``) and the release is not
        cached, the host cannot be reached, or a file is not on the host.
    CheckpointFormatError
        A downloaded file does not match its size or checksum (it is removed).
    InvalidInputError
        ``name`` is not in the catalogue.
    """
    release = get_release(name)
    root = _cache.cache_dir(cache_dir)
    final = _cache.release_dir(release, root)
    if not force and _cache.is_complete(final, release):
        return final
    if _cache.is_offline():
        raise CheckpointNotFoundError(
            not_available_message(release, f"downloads are off ({_cache.offline_variable()})")
        )
    from filelock import FileLock

    staging = _cache.staging_dir(release, root)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(staging) + ".lock"):
        if not force and _cache.is_complete(final, release):
            return final  # another process finished it meanwhile
        if force:
            shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / _cache.MARKER).unlink(missing_ok=True)
        _licence_notice(release, root)
        try:
            records, extracted = _fetch_files(release, staging, progress, token)
        except ScfmError:
            raise
        except Exception as err:  # network / HTTP failures of huggingface_hub and httpx
            detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise CheckpointNotFoundError(
                not_available_message(
                    release,
                    f"the download failed ({type(err).__name__}: {detail}); what was already "
                    "downloaded is kept and the next fetch resumes it",
                )
            ) from err
        marker = {
            "release": release.name,
            "model": release.model,
            "options": release.options,
            "files": records,
            "extracted": extracted,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / _cache.MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
    logger.info("Fetched %s into %s.", release.name, final)
    return final
