"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, in-memory, 127.0.0.1).

It implements the part of the Hub's HTTP API that the real `huggingface_hub` client uses to create a repo, upload a
folder in one commit (regular files inline, large files through the git-LFS "basic" transfer) and download it again
(`hf_hub_download`, `snapshot_download`, `transformers`' `from_pretrained`):

    GET  /api/whoami-v2
    POST /api/repos/create                                  (409 when the repo exists)
    POST /api/validate-yaml
    POST /api/{models,datasets}/{ns}/{name}/preupload/{rev}
    POST /{ns}/{name}.git/info/lfs/objects/batch            (basic transfer → PUT /_lfs/… → POST verify)
    POST /api/{models,datasets}/{ns}/{name}/commit/{rev}    (ndjson)
    GET  /api/{models,datasets}/{ns}/{name}[/revision/{rev}]
    GET  /api/{models,datasets}/{ns}/{name}/tree/{rev}[/{path}]
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}              (X-Repo-Commit, ETag, X-Linked-Etag/-Size, Range)

Importing this module starts one server in a daemon thread and points `HF_ENDPOINT` at it (with
`HF_HUB_DISABLE_XET=1`, so uploads take the LFS path this server speaks). `huggingface_hub` reads both at import
time, so `tests/conftest.py` imports this module before any test module imports `huggingface_hub`; the `hub_server`
fixture also patches the client's constants if it was imported earlier.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "test-user"
ORGS = ("test-org",)
TOKEN = "hf_testserver_secret_token_0123456789"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MiB with LFS …
LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.onnx",
    "*.npz",
    "*.msgpack",
)  # … and these
REPO_TYPES = {"models": "model", "datasets": "dataset"}
URL_PREFIX = {"model": "", "dataset": "datasets/"}
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def git_blob_oid(content: bytes) -> str:
    """Git's object id of a blob (sha1 over `blob <size>\\0<content>`)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    size: int
    blob_oid: str  # git oid (of the pointer file for LFS files)
    content: bytes | None = None  # regular files
    lfs_sha256: str | None = None  # LFS files (content in HubServer.lfs_objects)


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HttpError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubServer:
    """In-memory Hub. `url` is the endpoint; `requests` logs `(method, path)` of every request served."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = TOKEN, lfs_threshold: int = LFS_THRESHOLD):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.responses: list[tuple[str, str, int]] = []  # (method, path, status) of every response
        self.lock = threading.RLock()
        self._counter = 0
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    # -- helpers for tests ----------------------------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Contents of every file at `revision` (LFS files resolved)."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: self._content(f) for path, f in commit.files.items()}

    def _content(self, stored: StoredFile) -> bytes:
        return stored.content if stored.lfs_sha256 is None else self.lfs_objects[stored.lfs_sha256]

    # -- state changes ---------------------------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: Commit | None, title: str, files: dict[str, StoredFile]) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}|{parent.oid if parent else ''}|{title}|{self._counter}|{time.time_ns()}"
        commit = Commit(oid=hashlib.sha1(seed.encode()).hexdigest(), title=title, files=files, date=_now())
        repo.commits[commit.oid] = commit
        return commit

    def _store_regular(self, content: bytes) -> StoredFile:
        return StoredFile(size=len(content), blob_oid=git_blob_oid(content), content=content)

    def _store_lfs(self, sha256: str, size: int) -> StoredFile:
        return StoredFile(size=size, blob_oid=git_blob_oid(lfs_pointer(sha256, size)), lfs_sha256=sha256)

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        first = self._new_commit(repo, None, "initial commit", {".gitattributes": self._store_regular(GITATTRIBUTES)})
        repo.branches["main"] = first.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def is_lfs(self, path: str, size: int) -> bool:
        return size > self.lfs_threshold or any(fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as err:
            raise HttpError(400, f"Request body is not valid JSON: {err}") from err

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head_only: bool = False):
        with self.hub.lock:
            self.hub.responses.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)

    def _send_json(self, status: int, payload, headers: dict[str, str] | None = None):
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send(status, json.dumps(payload).encode(), headers)

    def _authenticated_user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return USER if auth == f"Bearer {self.hub.token}" else None

    def _require_write(self, namespace: str | None) -> None:
        if self._authenticated_user() is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        if namespace not in (USER, *ORGS):
            raise HttpError(403, f"You don't have the rights to create or write to repos in namespace {namespace!r}.")

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or self._authenticated_user() is not None)
        if not visible:
            raise HttpError(404 if self._authenticated_user() else 401, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(repo_id.split("/")[0])
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.hub.lock:
            self.hub.requests.append((method, path))
        try:
            for pattern, handler_method, name in ROUTES:
                if handler_method != method:
                    continue
                match = re.fullmatch(pattern, path)
                if match:
                    with self.hub.lock if method not in ("GET", "HEAD") else nullcontext():
                        getattr(self, name)(query=query, **match.groupdict())
                    return
            raise HttpError(404, f"No route for {method} {path}")
        except HttpError as err:
            headers = {"X-Error-Message": err.message}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            body = json.dumps({"error": err.message}).encode()
            self._send(err.status, body, {"Content-Type": "application/json", **headers}, head_only=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- endpoints ------------------------------------------------------------------------------------------------
    def whoami(self, query):
        if self._authenticated_user() is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        self._send_json(
            200,
            {
                "type": "user",
                "name": USER,
                "fullname": "Test User",
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in ORGS],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            },
        )

    def create_repo(self, query):
        payload = self._json_body()
        name, namespace = payload.get("name"), payload.get("organization") or USER
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX or not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,96}", name):
            raise HttpError(400, f"Invalid repo name or type: {name!r} ({repo_type!r})")
        self._require_write(namespace)
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            self._send_json(409, {"error": "You already created this model repo", "url": url})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_type, repo_id, private)
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, query):
        import yaml

        content = self._json_body().get("content", "")
        errors = []
        match = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n", content, flags=re.S)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                metadata, errors = None, [{"message": f"Invalid YAML: {err}"}]
            if not errors and not isinstance(metadata, dict):
                errors = [{"message": "YAML metadata must be a mapping"}]
            for key in ("license", "library_name", "pipeline_tag"):
                if not errors and key in metadata and not isinstance(metadata[key], str):
                    errors.append({"message": f'"{key}" must be a string'})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, query, kind, repo_id, revision):
        repo = self._get_repo(REPO_TYPES[kind], repo_id, write=True)
        commit = self._get_commit(repo, revision)
        files = []
        for entry in self._json_body().get("files", []):
            path, size = entry["path"], int(entry["size"])
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.lfs_sha256 or existing.blob_oid)
            mode = "lfs" if self.hub.is_lfs(path, size) else "regular"
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json(200, {"files": files, "commitOid": commit.oid})

    def lfs_batch(self, query, prefix, repo_id):
        repo_type = "dataset" if prefix == "datasets/" else "model"
        self._get_repo(repo_type, repo_id, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HttpError(400, "Only the 'upload' operation with the 'basic' transfer is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                entry["error"] = {"code": 422, "message": f"Invalid sha256 oid {oid!r}"}
            elif oid not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}/{size}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, query, oid, size):
        data = self._body()
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != oid:
            raise HttpError(400, f"Uploaded content does not match oid {oid} / size {size}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = data
        self._send(200)

    def lfs_verify(self, query):
        payload = self._json_body()
        data = self.hub.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise HttpError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._send_json(200, {"success": True})

    def commit(self, query, kind, repo_id, revision):
        repo = self._get_repo(REPO_TYPES[kind], repo_id, write=True)
        if query.get("create_pr"):
            raise HttpError(400, "Pull requests are not supported by the test hub")
        parent = self._get_commit(repo, revision)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "The first ndjson line must be the commit header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HttpError(412, "A commit has happened since the parent commit. Please pull and retry.")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, f"Unsupported encoding for {path}")
                files[path] = self.hub._store_regular(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                oid = value.get("oid")
                if oid not in self.hub.lfs_objects:
                    raise HttpError(422, f"LFS file {path} ({oid}) was not uploaded before the commit")
                files[path] = self.hub._store_lfs(oid, len(self.hub.lfs_objects[oid]))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"Unknown commit operation {key!r}")
        new = self.hub._new_commit(repo, parent, header.get("summary") or "commit", files)
        branch = unquote(revision)
        repo.branches[branch if branch in repo.branches else "main"] = new.oid
        commit_url = f"{self.hub.url}/{URL_PREFIX[repo.repo_type]}{repo_id}/commit/{new.oid}"
        self._send_json(200, {"success": True, "commitOid": new.oid, "commitUrl": commit_url, "pullRequestUrl": None})

    def repo_info(self, query, kind, repo_id, revision=None):
        repo = self._get_repo(REPO_TYPES[kind], repo_id)
        commit = self._get_commit(repo, revision or "main")
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "tags": [],
            "siblings": [self._sibling(p, f, bool(query.get("blobs"))) for p, f in sorted(commit.files.items())],
        }
        if kind == "models":
            info["modelId"] = repo_id
        readme = commit.files.get("README.md")
        if readme is not None:
            card = _front_matter(self.hub._content(readme).decode("utf-8", "replace"))
            info["cardData"] = card
            info["tags"] = list(card.get("tags") or [])
            for key in ("library_name", "pipeline_tag"):
                if key in card:
                    info[key] = card[key]
        self._send_json(200, info)

    @staticmethod
    def _sibling(path: str, stored: StoredFile, blobs: bool) -> dict:
        sibling = {"rfilename": path}
        if blobs:
            sibling.update(size=stored.size, blobId=stored.blob_oid)
            if stored.lfs_sha256:
                pointer_size = len(lfs_pointer(stored.lfs_sha256, stored.size))
                sibling["lfs"] = {"sha256": stored.lfs_sha256, "size": stored.size, "pointerSize": pointer_size}
        return sibling

    def tree(self, query, kind, repo_id, revision, path=None):
        repo = self._get_repo(REPO_TYPES[kind], repo_id)
        commit = self._get_commit(repo, revision)
        base = unquote(path or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            raise HttpError(404, f"{base} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": stored.blob_oid, "size": stored.size, "path": file_path}
                if stored.lfs_sha256:
                    pointer_size = len(lfs_pointer(stored.lfs_sha256, stored.size))
                    entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": pointer_size}
                entries.append(entry)
        for folder in sorted(folders):
            tree_oid = hashlib.sha1(f"tree:{commit.oid}:{folder}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_oid, "size": 0, "path": folder})
        self._send_json(200, sorted(entries, key=lambda e: e["path"]))

    def resolve(self, query, prefix, repo_id, revision, path):
        repo_type = "dataset" if prefix == "datasets/" else "model"
        repo = self._get_repo(repo_type, repo_id)
        commit = self._get_commit(repo, revision)
        stored = commit.files.get(unquote(path))
        if stored is None:
            headers = {
                "X-Repo-Commit": commit.oid,
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": "Entry not found",
                "Content-Type": "application/json",
            }
            self._send(404, b'{"error":"Entry not found"}', headers, head_only=self.command == "HEAD")
            return
        data = self.hub._content(stored)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if stored.lfs_sha256:
            headers.update(
                {
                    "ETag": f'"{stored.lfs_sha256}"',
                    "X-Linked-Etag": f'"{stored.lfs_sha256}"',
                    "X-Linked-Size": str(stored.size),
                }
            )
        else:
            headers["ETag"] = f'"{stored.blob_oid}"'
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match and self.command == "GET":
            start = int(range_match.group(1))
            end = int(range_match.group(2)) if range_match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, head_only=self.command == "HEAD")


def _front_matter(text: str) -> dict:
    import yaml

    match = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


_REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
_KIND = r"(?P<kind>models|datasets)"
_REV = r"(?P<revision>[^/]+)"
ROUTES = [
    (r"/api/whoami-v2", "GET", "whoami"),
    (r"/api/repos/create", "POST", "create_repo"),
    (r"/api/validate-yaml", "POST", "validate_yaml"),
    (rf"/api/{_KIND}/{_REPO}/preupload/{_REV}", "POST", "preupload"),
    (rf"/api/{_KIND}/{_REPO}/commit/{_REV}", "POST", "commit"),
    (rf"/api/{_KIND}/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "GET", "tree"),
    (rf"/api/{_KIND}/{_REPO}(?:/revision/{_REV})?", "GET", "repo_info"),
    (rf"/(?P<prefix>datasets/)?{_REPO}\.git/info/lfs/objects/batch", "POST", "lfs_batch"),
    (r"/_lfs/upload/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)", "PUT", "lfs_put"),
    (r"/_lfs/verify", "POST", "lfs_verify"),
    (rf"/(?P<prefix>datasets/)?{_REPO}/resolve/{_REV}/(?P<path>.+)", "HEAD", "resolve"),
    (rf"/(?P<prefix>datasets/)?{_REPO}/resolve/{_REV}/(?P<path>.+)", "GET", "resolve"),
]


# ---------------------------------------------------------------------------------------------------------------------
# One server per test session, started at import so that HF_ENDPOINT is set before huggingface_hub is imported.
# ---------------------------------------------------------------------------------------------------------------------
HUB = HubServer().start()
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture
def hub_server(monkeypatch, tmp_path) -> HubServer:
    """The session's Hub server, with the client pointed at it, `HF_TOKEN` set to the server's write token and the
    download cache (also of subprocesses: `HF_HUB_CACHE`, `HF_MODULES_CACHE`) in the test's tmp dir."""
    import huggingface_hub.constants as constants

    if constants.ENDPOINT != HUB.url:  # huggingface_hub was imported before this module: patch what it read
        monkeypatch.setattr(constants, "ENDPOINT", HUB.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", HUB.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", HUB.token)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache / "modules"))
    return HUB
