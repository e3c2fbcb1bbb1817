"""scfm.hub: the release catalogue, fetch / resolve over real HTTP, and push / pull.

A small HTTP server runs in the test process on 127.0.0.1 (port 0). It speaks the parts of the
Hugging Face Hub protocol that huggingface_hub uses (``/{repo}/resolve/{revision}/{path}`` with
ETag / X-Repo-Commit / Content-Length / Range, the ``/api/models/...`` listing, repo creation,
pre-upload and commit endpoints) and serves plain files for the ``SCFM_URL_BASE`` mirror. The
fixture releases (tests/data/fixtures/<model>/checkpoint) are described in a test catalogue passed
through ``SCFM_EXTRA_RELEASES``. Nothing of scfm is mocked; only loopback is used.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest

import scfm.hub
from conftest import fixture_dir
from scfm.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsafeCheckpointError,
)
from scfm.hub import _catalogue, _cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------- the fake hosts
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHost(ThreadingHTTPServer):
    """Hugging Face Hub + plain file mirror on 127.0.0.1, with fault injection."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}  # repo_id -> {"commit", "files": {path: bytes}, ...}
        self.plain: dict[str, bytes] = {}  # url path -> bytes
        self.log: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}  # url path -> bytes sent before the connection drops (once)
        self.fail: dict[str, int] = {}  # url path -> number of 503 answers still to give
        self.lock = threading.Lock()
        self.connections: list = []  # open client connections, closed by stop()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], lfs: set[str] = frozenset()) -> None:
        self.repos[repo_id] = {
            "commit": COMMIT,
            "files": dict(files),
            "lfs": set(lfs),
            # what the Hub reports: sha256 for LFS files, git blob id for the others
            "etag": {p: _sha256(b) if p in lfs else _git_sha1(b) for p, b in files.items()},
        }

    def handle_error(self, request, client_address) -> None:
        """Dropped connections are part of the tests: do not print their tracebacks."""

    def requests_for(self, fragment: str) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [entry for entry in self.log if fragment in entry[1]]

    def stop(self) -> None:
        """Stop listening and drop every open (keep-alive) connection: the network is gone."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(2)
                except OSError:
                    pass
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHost

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.append(self.connection)

    # -- plumbing
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _body(self) -> bytes:
        return self._payload

    def _send_file(self, key: str, data: bytes, headers: dict) -> None:
        srv = self.server
        with srv.lock:  # a pending cut comes first, then the failures
            if self.command == "GET" and key not in srv.cut and srv.fail.get(key, 0) > 0:
                srv.fail[key] -= 1
                failing = True
            else:
                failing = False
        if failing:
            self._reply(503, b"temporarily unavailable")
            return
        start = 0
        status = 200
        rng = self.headers.get("Range")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if rng and rng.startswith("bytes=") and self.command == "GET":
            start = int(rng[len("bytes=") :].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        with srv.lock:
            cut = srv.cut.pop(key, None) if self.command == "GET" else None
        if cut is None:
            self._reply(status, body, headers)
            return
        # send the headers of the whole body, part of it, then drop the connection
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    # -- routes
    def _route(self) -> None:
        # read any request body first, so that an unknown route leaves the connection usable
        self._payload = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        split = urlsplit(self.path)
        path = unquote(split.path)
        with self.server.lock:
            self.server.log.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[0] == "api":
            self._api(parts[1:], parse_qs(split.query))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), path)
        elif path in self.server.plain:
            self._send_file(path, self.server.plain[path], {})
        else:
            self._reply(404, b"not found")

    def _resolve(self, repo_id: str, revision: str, file: str, key: str) -> None:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._reply(404, b"", {"X-Error-Code": "RepoNotFound"})
            return
        headers = {"X-Repo-Commit": repo["commit"]}
        if file not in repo["files"]:
            self._reply(404, b"", {**headers, "X-Error-Code": "EntryNotFound"})
            return
        headers["ETag"] = f'"{repo["etag"][file]}"'
        self._send_file(key, repo["files"][file], headers)

    def _api(self, parts: list[str], query: dict) -> None:
        srv = self.server
        if parts[:2] == ["repos", "create"] and self.command == "POST":
            payload = json.loads(self._body())
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id not in srv.repos:
                srv.add_repo(repo_id, {})
            self._json({"url": f"{srv.url}/{repo_id}", "name": repo_id, "id": repo_id})
            return
        if parts[0] == "validate-yaml" and self.command == "POST":
            import yaml

            content = json.loads(self._body())["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except (IndexError, yaml.YAMLError) as err:
                self._json({"errors": [{"message": str(err)}]}, status=400)
                return
            self._json({"warnings": []})
            return
        if parts[0] != "models" or len(parts) < 4:
            self._reply(404)
            return
        repo_id, action = "/".join(parts[1:3]), parts[3]
        repo = srv.repos.get(repo_id)
        if repo is None:
            self._reply(404, b"", {"X-Error-Code": "RepoNotFound"})
            return
        if action == "revision":
            siblings = [{"rfilename": p} for p in sorted(repo["files"])]
            self._json({"id": repo_id, "sha": repo["commit"], "siblings": siblings})
        elif action == "tree":
            entries = []
            for p, data in sorted(repo["files"].items()):
                entry = {"type": "file", "path": p, "size": len(data), "oid": _git_sha1(data)}
                if p in repo["lfs"]:
                    entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 130}
                entries.append(entry)
            self._json(entries)
        elif action == "preupload" and self.command == "POST":
            files = json.loads(self._body())["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in files
            ]
            self._json({"files": modes})
        elif action == "commit" and self.command == "POST":
            for line in self._body().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    repo["files"][value["path"]] = base64.b64decode(value["content"])
                    repo["etag"][value["path"]] = _git_sha1(repo["files"][value["path"]])
            digest = hashlib.sha1(repr(sorted(repo["files"])).encode()).hexdigest()
            repo["commit"] = digest
            self._json(
                {
                    "commitUrl": f"{srv.url}/{repo_id}/commit/{digest}",
                    "commitOid": digest,
                    "pullRequestUrl": None,
                }
            )
        else:
            self._reply(404)

    do_GET = _route
    do_HEAD = _route
    do_POST = _route


# ------------------------------------------------------------------------- test catalogue
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def _release_toml(fields: dict, files: list[dict]) -> str:
    out = ["[[release]]", *(f"{k} = {_toml_value(v)}" for k, v in fields.items())]
    for f in files:
        out += ["", "[[release.file]]", *(f"{k} = {_toml_value(v)}" for k, v in f.items())]
    return "\n".join(out) + "\n\n"


def _common(name: str, model: str, commercial: bool = True) -> dict:
    return {
        "name": name,
        "model": model,
        "title": f"test fixture {name}",
        "licence": "Apache-2.0" if commercial else "CC BY-NC-ND 4.0 (test)",
        "licence_url": "https://example.invalid/licence",
        "commercial_use": commercial,
        "paper": "fixture",
        "checksums": "computed by the test",
        "options": {},
    }


@pytest.fixture(scope="module")
def host():
    srv = FakeHost()
    yield srv
    if srv.thread.is_alive():
        srv.stop()


@pytest.fixture(scope="module")
def catalogue(host, tmp_path_factory) -> Path:
    """Serve the fixture releases and write the test catalogue describing them."""
    gf = fixture_dir("geneformer") / "checkpoint"
    gf_files = {
        "tiny/config.json": (gf / "config.json").read_bytes(),
        "tiny/model.safetensors": (gf / "model.safetensors").read_bytes(),
    }
    for name in (
        "token_dictionary",
        "gene_median_dictionary",
        "gene_name_id_dict",
        "ensembl_mapping_dict",
    ):
        gf_files[f"dicts/{name}_gc104M.pkl"] = (gf / f"{name}_gc104M.pkl").read_bytes()
    host.add_repo("scfm-test/geneformer-tiny", gf_files, lfs={"tiny/model.safetensors"})
    host.add_repo("scfm-test/geneformer-hubsum", gf_files, lfs={"tiny/model.safetensors"})

    def gf_entries(with_sha: bool) -> list[dict]:
        out = []
        for path, data in gf_files.items():
            entry = {
                "path": path,
                "target": path.split("/", 1)[1],
                "role": "weights" if path.endswith("safetensors") else "config",
            }
            if with_sha:
                entry |= {"size": len(data), "sha256": _sha256(data)}
            out.append(entry)
        return out

    text = "schema = 1\n\n"
    for name, repo, with_sha in (
        ("test-geneformer-tiny", "scfm-test/geneformer-tiny", True),
        ("test-geneformer-hubsum", "scfm-test/geneformer-hubsum", False),
    ):
        fields = _common(name, "Geneformer") | {
            "repo_id": repo,
            "revision": COMMIT,
            "subfolder": "tiny",
        }
        text += _release_toml(fields, gf_entries(with_sha))

    # plain-URL release (non-commercial), served by the SCFM_URL_BASE mirror
    cf = fixture_dir("cellfm") / "checkpoint"
    cf_entries = []
    for file in ("CellFM_80M_weight.ckpt", "expand_gene_info.csv"):
        data = (cf / file).read_bytes()
        host.plain[f"/mirror/test-cellfm-tiny/{file}"] = data
        cf_entries.append(
            {
                "url": f"https://example.invalid/cellfm/{file}",
                "target": file,
                "role": "weights",
                "size": len(data),
                "sha256": _sha256(data),
            }
        )
    fields = _common("test-cellfm-tiny", "CellFM", commercial=False) | {"options": {"n_heads": 4}}
    text += _release_toml(fields, cf_entries)

    # alternatives, an optional file that the host lacks, and a tar archive to unpack
    host.add_repo("scfm-test/bundle", {"bundle/pytorch_model.bin": b"weights" * 100})
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for member, payload in (("top/weights/.metadata", b"meta"), ("top/context/io.json", b"{}")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    host.plain["/mirror/test-bundle/ckpt.tar.gz"] = archive.getvalue()
    fields = _common("test-bundle", "Geneformer") | {
        "repo_id": "scfm-test/bundle",
        "revision": COMMIT,
    }
    text += _release_toml(
        fields,
        [
            {
                "path": "bundle/model.safetensors",
                "target": "model.safetensors",
                "role": "weights",
                "one_of": "weights",
            },
            {
                "path": "bundle/pytorch_model.bin",
                "target": "pytorch_model.bin",
                "role": "weights",
                "one_of": "weights",
            },
            {
                "url": "https://example.invalid/extra.owl",
                "target": "extra.owl",
                "role": "ontology",
                "optional": True,
            },
            {
                "url": "https://example.invalid/ckpt.tar.gz",
                "target": "ckpt.tar.gz",
                "role": "weights",
                "sha256": _sha256(archive.getvalue()),
                "extract": "tar",
            },
        ],
    )
    # a file larger than huggingface_hub's 10 MiB download chunks, to interrupt and resume
    large = np.random.default_rng(0).bytes(24 * 2**20)
    host.add_repo("scfm-test/large", {"blob.bin": large}, lfs={"blob.bin"})
    fields = _common("test-large", "Geneformer") | {
        "repo_id": "scfm-test/large",
        "revision": COMMIT,
    }
    text += _release_toml(
        fields,
        [
            {
                "path": "blob.bin",
                "target": "blob.bin",
                "role": "weights",
                "size": len(large),
                "sha256": _sha256(large),
            }
        ],
    )
    path = tmp_path_factory.mktemp("catalogue") / "releases.toml"
    path.write_text(text)
    return path


@pytest.fixture
def online(host, catalogue, tmp_path, monkeypatch) -> Path:
    """Point scfm at the fake hosts with an empty cache; returns the cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCFM_CACHE", str(cache))
    monkeypatch.setenv("SCFM_EXTRA_RELEASES", str(catalogue))
    monkeypatch.setenv("SCFM_HF_ENDPOINT", host.url)
    monkeypatch.setenv("SCFM_URL_BASE", f"{host.url}/mirror")
    for var in ("SCFM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return cache


# ---------------------------------------------------------------------------- catalogue
def test_catalogue_covers_the_supported_releases():
    table = scfm.hub.releases()
    names = set(table.index)
    for name in (
        "geneformer-v2-104m",
        "geneformer-v1-10m",
        "bionemo-geneformer-106m",
        "bionemo-geneformer-10m",
        "scfoundation-100m",
        "cellfm-80m",
        "cellfm-800m",
        "sccello",
        "cellplm-20231027-85m",
        "cellplm-20230926-85m",
        "geneformer-v2-316m",
        "geneformer-v2-104m-clcancer",
        "geneformer-12l-30m-i2048",
        "geneformer-12l-95m-i4096",
        "geneformer-20l-95m-i4096",
        "geneformer-v1-10m-cardiomyopathies",
    ):
        assert name in names
    assert set(table["model"]) == {"Geneformer", "ScFoundation", "CellFM", "ScCello", "CellPLM"}
    non_commercial = set(table.index[~table["commercial_use"].astype(bool)])
    assert non_commercial == {"scfoundation-100m", "cellfm-80m", "cellfm-800m"}
    assert table.loc["cellfm-800m", "options"] == {"n_heads": 48}
    assert table.loc["cellplm-20231027-85m", "options"] == {"prefix": "20231027_85M"}
    assert table.loc["geneformer-v2-104m", "size_bytes"] == 425128531
    for rel in _catalogue.list_releases():
        assert any(f.role == "weights" for f in rel.files), rel.name
        assert rel.paper and rel.licence and rel.licence_url.startswith("https://")
    assert set(scfm.hub.releases(model="cellfm").index) == {"cellfm-80m", "cellfm-800m"}


def test_release_names_and_aliases():
    assert scfm.hub.get_release("Geneformer-V2-104M").name == "geneformer-v2-104m"
    assert scfm.hub.get_release("gf-12L-95M-i4096").name == "geneformer-12l-95m-i4096"
    with pytest.raises(InvalidInputError, match="geneformer-v2-104m"):
        scfm.hub.get_release("geneformer-v2-104")


def test_import_is_light():
    code = (
        "import sys, scfm.hub, scfm.hub._cli; "
        "print(sorted(m for m in ('torch', 'scvi', 'huggingface_hub', 'scanpy', 'pandas') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------- fetch / resolve
def test_fetch_downloads_verifies_and_lays_out(online, host):
    folder = scfm.hub.fetch("test-geneformer-tiny", progress=False)
    assert folder == online / "releases" / "test-geneformer-tiny"
    gf = fixture_dir("geneformer") / "checkpoint"
    for name in ("config.json", "model.safetensors", "token_dictionary_gc104M.pkl"):
        assert (folder / name).read_bytes() == (gf / name).read_bytes()
    marker = json.loads((folder / ".scfm-release.json").read_text())
    assert marker["files"]["model.safetensors"]["checked"] == "sha256 (catalogue)"
    assert not (online / "downloads" / "test-geneformer-tiny").exists()
    assert host.requests_for("geneformer-tiny/resolve")
    # a second fetch is served from the cache: no request at all
    before = len(host.requests_for("geneformer-tiny"))
    assert scfm.hub.fetch("test-geneformer-tiny", progress=False) == folder
    assert len(host.requests_for("geneformer-tiny")) == before


def test_fetch_checks_the_hosts_checksums(online):
    folder = scfm.hub.fetch("test-geneformer-hubsum", progress=False)
    files = json.loads((folder / ".scfm-release.json").read_text())["files"]
    assert files["model.safetensors"]["checked"] == "sha256 (reported by the host)"
    assert files["config.json"]["checked"] == "git blob id (reported by the host)"


@pytest.mark.parametrize(
    ("name", "repo", "match"),
    [
        ("test-geneformer-tiny", "scfm-test/geneformer-tiny", "scfm's catalogue"),
        ("test-geneformer-hubsum", "scfm-test/geneformer-hubsum", "the host reports"),
    ],
)
def test_tampered_file_is_refused_and_removed(online, host, name, repo, match):
    files = host.repos[repo]["files"]
    original = files["tiny/model.safetensors"]
    files["tiny/model.safetensors"] = original[:-1] + bytes([original[-1] ^ 0xFF])
    try:
        with pytest.raises(CheckpointFormatError, match=match):
            scfm.hub.fetch(name, progress=False)
    finally:
        files["tiny/model.safetensors"] = original
    staging = online / "downloads" / name
    assert not (staging / "model.safetensors").exists()
    assert not (staging / "model.safetensors.part").exists()
    assert not (online / "releases" / name).exists()
    assert scfm.hub.cached_release_dir(name) is None
    # the host serves the right bytes again: the next fetch succeeds
    assert (scfm.hub.fetch(name, progress=False) / "model.safetensors").read_bytes() == original


def test_interrupted_transfer_resumes(online, host):
    key = f"/scfm-test/large/resolve/{COMMIT}/blob.bin"
    data = host.repos["scfm-test/large"]["files"]["blob.bin"]
    host.cut[key] = 15 * 2**20  # the connection drops after 15 of 24 MiB ...
    host.fail[key] = 6  # ... and huggingface_hub's immediate retry finds the host down
    start = len(host.requests_for(key))
    with pytest.raises(CheckpointNotFoundError, match="resumes"):
        scfm.hub.fetch("test-large", progress=False)
    host.fail.pop(key, None)
    part = online / "downloads" / "test-large" / "blob.bin.part"
    kept = part.stat().st_size  # what reached the disk (whole download chunks)
    assert 0 < kept <= 15 * 2**20
    assert part.read_bytes() == data[:kept]
    # an interrupted fetch never looks complete
    assert not (online / "releases" / "test-large").exists()
    assert scfm.hub.cached_release_dir("test-large") is None
    folder = scfm.hub.fetch("test-large", progress=False)
    gets = [r for m, _, r in host.requests_for(key)[start:] if m == "GET"]
    assert gets[-1] == f"bytes={kept}-"  # the last transfer started where the file stopped
    assert (folder / "blob.bin").read_bytes() == data


def test_plain_url_release_mirror_and_licence_notice(online, host, caplog):
    with caplog.at_level(logging.WARNING, logger="scfm.hub"):
        folder = scfm.hub.fetch("test-cellfm-tiny", progress=False)
    notices = [r for r in caplog.records if "non-commercial" in r.getMessage()]
    assert len(notices) == 1 and "https://example.invalid/licence" in notices[0].getMessage()
    assert (online / "licences" / "test-cellfm-tiny.txt").is_file()
    assert host.requests_for("/mirror/test-cellfm-tiny/CellFM_80M_weight.ckpt")
    cf = fixture_dir("cellfm") / "checkpoint"
    assert (folder / "CellFM_80M_weight.ckpt").read_bytes() == (
        cf / "CellFM_80M_weight.ckpt"
    ).read_bytes()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scfm.hub"):
        scfm.hub.fetch("test-cellfm-tiny", force=True, progress=False)
    assert not [r for r in caplog.records if "non-commercial" in r.getMessage()]
    resolved = scfm.hub.resolve("test-cellfm-tiny", "CellFM")
    assert resolved.path == folder and resolved.options == {"n_heads": 4}


def test_alternatives_optional_files_and_archives(online):
    folder = scfm.hub.fetch("test-bundle", progress=False)
    assert (folder / "pytorch_model.bin").read_bytes() == b"weights" * 100
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "extra.owl").exists()
    assert (folder / "weights" / ".metadata").read_bytes() == b"meta"
    assert (folder / "context" / "io.json").is_file()
    assert not (folder / "ckpt.tar.gz").exists()
    assert scfm.hub.cached_release_dir("test-bundle") == folder


def test_offline_errors_are_fast_and_say_what_to_do(online, host, monkeypatch):
    monkeypatch.setenv("SCFM_OFFLINE", "1")
    n = len(host.log)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError) as err:
        scfm.hub.resolve("test-geneformer-tiny", "Geneformer")
    assert time.perf_counter() - t0 < 2
    text = str(err.value)
    for part in (
        "test-geneformer-tiny",
        "model.safetensors",
        "config.json",
        f"{host.url}/scfm-test/geneformer-tiny/resolve/{COMMIT}/tiny/model.safetensors",
        "scfm fetch test-geneformer-tiny",
        "SCFM_OFFLINE=1",
    ):
        assert part in text
    with pytest.raises(CheckpointNotFoundError, match="SCFM_OFFLINE"):
        scfm.hub.fetch("test-geneformer-tiny")
    assert len(host.log) == n  # offline mode made no request
    monkeypatch.delenv("SCFM_OFFLINE")
    with pytest.raises(CheckpointNotFoundError, match="download=False"):
        scfm.hub.resolve("test-geneformer-tiny", "Geneformer", download=False)
    assert len(host.log) == n


def test_wrong_class_and_unknown_names(online, tmp_path):
    with pytest.raises(CheckpointError, match=r"CellFM release.*scfm\.model\.CellFM"):
        scfm.hub.resolve("cellfm-80m", "Geneformer")
    with pytest.raises(CheckpointNotFoundError, match="geneformer-v2-104m"):
        scfm.hub.resolve("geneformer-v2-104n", "Geneformer")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        scfm.hub.resolve(str(tmp_path / "nowhere"), "Geneformer")
    local = fixture_dir("geneformer") / "checkpoint"
    resolved = scfm.hub.resolve(local, "Geneformer")
    assert resolved.path == local and resolved.options == {} and resolved.release is None


def test_cache_is_used_without_network(online, host, tmp_path, monkeypatch, catalogue):
    # a separate host that is stopped after the fetch: the cache must not touch the network
    other = FakeHost()
    other.repos = host.repos
    monkeypatch.setenv("SCFM_HF_ENDPOINT", other.url)
    folder = scfm.hub.fetch("test-geneformer-tiny", progress=False)
    other.stop()
    t0 = time.perf_counter()
    resolved = scfm.hub.resolve("test-geneformer-tiny", "Geneformer")
    assert resolved.path == folder and time.perf_counter() - t0 < 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert scfm.hub.resolve("test-geneformer-tiny", "Geneformer").path == folder
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # not cached and the host is gone: a typed error within seconds
    t0 = time.perf_counter()
    with pytest.raises(CheckpointNotFoundError, match="download failed"):
        scfm.hub.resolve("test-geneformer-hubsum", "Geneformer")
    assert time.perf_counter() - t0 < 5
    # a release folder without the completion marker does not count as cached
    fake = online / "releases" / "test-geneformer-hubsum"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    monkeypatch.setenv("SCFM_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError):
        scfm.hub.resolve("test-geneformer-hubsum", "Geneformer")


def test_cli_releases_and_fetch(online, capsys):
    parser = argparse.ArgumentParser(prog="scfm")
    sub = parser.add_subparsers(dest="command", required=True)
    _cli.add_subparsers(sub)
    assert _cli.run(parser.parse_args(["releases", "--model", "CellPLM"])) == 0
    out = capsys.readouterr().out
    assert "cellplm-20231027-85m" in out and "geneformer" not in out
    cache = online.parent / "cli-cache"
    args = parser.parse_args(
        ["fetch", "test-geneformer-tiny", "--cache-dir", str(cache), "--no-progress"]
    )
    assert _cli.run(args) == 0
    assert capsys.readouterr().out.strip() == str(cache / "releases" / "test-geneformer-tiny")


# ------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def geneformer_input():
    import anndata as ad

    def read():
        adata = ad.read_h5ad(fixture_dir("geneformer") / "input.h5ad")
        scfm.model.Geneformer.setup_anndata(adata)
        return adata

    return read


def test_fetched_release_embeds_like_its_folder(online, geneformer_input, one_torch_thread):
    resolved = scfm.hub.resolve("test-geneformer-tiny", "Geneformer")
    adata = geneformer_input()
    fetched = scfm.model.Geneformer.from_pretrained(resolved.path, adata, **resolved.options)
    direct = scfm.model.Geneformer.from_pretrained(
        fixture_dir("geneformer") / "checkpoint", geneformer_input()
    )
    np.testing.assert_array_equal(
        fetched.get_latent_representation(), direct.get_latent_representation()
    )


def test_push_and_pull_in_scvi_hub_layout(online, host, geneformer_input, one_torch_thread):
    from huggingface_hub import HfApi
    from scvi.hub import HubModel

    resolved = scfm.hub.resolve("test-geneformer-tiny", "Geneformer")
    model = scfm.model.Geneformer.from_pretrained(resolved.path, geneformer_input())
    expected = model.get_latent_representation()
    scfm.hub.push(model, "scfm-test/finetuned", token="hf_test")
    files = host.repos["scfm-test/finetuned"]["files"]
    assert {"_scvi_required_metadata.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "license: apache-2.0" in card and "model_cls_name:Geneformer" in card
    assert "library_name: scvi-tools" in card and "test-geneformer-tiny" in card

    hf_cache = online.parent / "hf-cache"
    pulled = scfm.hub.pull("scfm-test/finetuned", geneformer_input(), cache_dir=hf_cache)
    assert type(pulled) is scfm.model.Geneformer
    np.testing.assert_allclose(pulled.get_latent_representation(), expected, atol=1e-6)
    folder = next(hf_cache.glob("models--scfm-test--finetuned/snapshots/*"))
    hub_model = HubModel(str(folder))
    assert hub_model.metadata.model_cls_name == "Geneformer"
    assert hub_model.metadata.model_parent_module == "scfm.model"

    # a repository that needs unpickling is refused unless trusted
    HfApi(endpoint=host.url, token="hf_test").upload_file(
        path_or_fileobj=b"not really a pickle",
        path_in_repo="extra.pt",
        repo_id="scfm-test/finetuned",
    )
    with pytest.raises(UnsafeCheckpointError, match=r"extra\.pt"):
        scfm.hub.pull("scfm-test/finetuned", geneformer_input(), cache_dir=hf_cache)


def test_weights_page_table_is_generated_from_the_catalogue():
    import re

    from conftest import REPO

    page = (REPO / "docs" / "weights.md").read_text()
    cells = re.findall(r"```\{code-cell\} ipython3\n(?::tags:[^\n]*\n)?(.*?)```", page, flags=re.S)
    assert len(cells) == 3
    namespace: dict = {}
    for code in cells[:-1]:
        exec(code, namespace)
    rendered = eval(cells[-1].strip(), namespace).data
    for name in scfm.hub.releases().index:
        assert f"`{name}`" in rendered


def test_release_layouts_are_what_the_readers_look_for(tmp_path):
    """Every catalogue release, laid out as fetch lays it out, is found by its model's reader."""
    from scfm.io._cellfm import find_cellfm_files
    from scfm.io._cellplm import find_cellplm_checkpoint
    from scfm.io._scfoundation import resolve_scfoundation_files

    for rel in _catalogue.list_releases():
        folder = tmp_path / rel.name
        for f in rel.needed_files():
            if f.extract is None:
                (folder / f.target).parent.mkdir(parents=True, exist_ok=True)
                (folder / f.target).write_bytes(b"x")
        targets = {f.target for f in rel.needed_files()}
        if rel.model == "Geneformer" and not rel.name.startswith("bionemo"):
            assert "config.json" in targets
            assert {"model.safetensors", "pytorch_model.bin"} & targets
            assert sum(t.startswith("token_dictionary_gc") for t in targets) == 1
            assert sum(t.startswith("gene_median_dictionary_gc") for t in targets) == 1
        elif rel.model == "Geneformer":
            assert [f.extract for f in rel.files] == ["tar"]
            assert rel.options["num_attention_heads"] in (4, 12)
        elif rel.model == "ScFoundation":
            ckpt, genes = resolve_scfoundation_files(folder)
            assert ckpt == folder / "models" / "models.ckpt" and genes is not None
        elif rel.model == "CellFM":
            ckpt, genes = find_cellfm_files(folder)
            assert ckpt.parent == folder and genes.parent == folder
        elif rel.model == "CellPLM":
            config, ckpt = find_cellplm_checkpoint(folder, prefix=rel.options["prefix"])
            assert config.parent == ckpt.parent == folder
        else:
            assert rel.model == "ScCello"
            assert (folder / "config.json").is_file()
            assert (folder / "data" / "token_vocabulary" / "token_dictionary.pkl").is_file()
            assert {f.target for f in rel.files if f.one_of == "weights"} == {
                "model.safetensors",
                "pytorch_model.bin",
            }
