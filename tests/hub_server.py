"""A local HTTP server that speaks the part of the Hugging Face Hub API that huggingface_hub, transformers and
diffusers use to push and load a model, so publishing is tested offline.

Real HTTP on 127.0.0.1 (ephemeral port, loopback only), in-memory git-like repos, bearer tokens with users,
organisations and read/write roles. Endpoints (huggingface_hub 2.4):

- ``GET  /api/whoami-v2``                                   (HfApi.whoami)
- ``GET  /api/agent-harnesses``                             (an empty registry for huggingface_hub's agent detection)
- ``POST /api/repos/create``                                (HfApi.create_repo: 409 when it exists, 403 when the
  token may not write to the namespace)
- ``POST /api/validate-yaml``                               (README.md metadata check before a commit)
- ``POST /api/models/{repo}/preupload/{rev}``               (always ``uploadMode: "regular"``: no LFS / Xet)
- ``POST /api/models/{repo}/commit/{rev}``                  (NDJSON: header, file (base64), deletedFile)
- ``GET  /api/models/{repo}[/revision/{rev}]``              (HfApi.model_info, with ``siblings``)
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``           (HfApi.list_repo_tree / list_repo_files)
- ``POST /api/models/{repo}/paths-info/{rev}``              (HfApi.get_paths_info)
- ``GET|HEAD /{repo}/resolve/{rev}/{path}``                 (hf_hub_download, get_hf_file_metadata: ``ETag``,
  ``X-Repo-Commit``, ``Content-Length``; ``X-Error-Code`` ``RepoNotFound`` / ``EntryNotFound`` /
  ``RevisionNotFound`` on 404s)

Dataset repos (``repo_type="dataset"``, what `datasets.load_dataset` reads) answer the same routes under
``/api/datasets/...`` and ``/datasets/{repo}/resolve/...``, plus ``GET /api/datasets/{repo}[/revision/{rev}]``
(HfApi.dataset_info); they live in ``server.datasets``.

Every request is recorded in ``server.requests``; requests no route answers go to ``server.unhandled``.
``server.fail_next(method, path_regex, times=1)`` makes the next matching requests fail as a network failure: the
connection is closed without an answer (the client sees the server disconnect), and nothing is changed.

Use::

    with HubServer(tokens={"hf_write": HubUser("tester", orgs=["my-org"])}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write", "HF_HUB_DISABLE_XET": "1"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class HubUser:
    """The owner of a token: user name, organisations it may write to, and the token role ("read" or "write")."""

    name: str
    orgs: list[str] = field(default_factory=list)
    role: str = "write"


@dataclass
class HubRepo:
    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"oid", "summary", "files"}

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else hashlib.sha1(self.repo_id.encode()).hexdigest()


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


REPO = r"(?P<repo>[^/]+/[^/]+)"
KIND = r"(?P<kind>models|datasets)"
REV = r"(?P<rev>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------------------------------ plumbing
    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        path = unquote(parts.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization", "")
        self.token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        self.user = self.server.hub.tokens.get(self.token)
        self.server.hub.requests.append((method, path, self.token))
        if self.server.hub._take_fault(method, path):  # a dropped connection: no answer, no change
            self.close_connection = True
            return
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("GET", r"/api/agent-harnesses", self.agent_harnesses),
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", rf"/api/{KIND}/{REPO}/preupload/{REV}", self.preupload),
            ("POST", rf"/api/{KIND}/{REPO}/commit/{REV}", self.commit),
            ("POST", rf"/api/{KIND}/{REPO}/paths-info/{REV}", self.paths_info),
            ("GET", rf"/api/{KIND}/{REPO}/tree/{REV}(?:/(?P<path>.*))?", self.tree),
            ("GET", rf"/api/{KIND}/{REPO}(?:/revision/{REV})?", self.model_info),
            ("GET", rf"/(?P<kind>datasets)/{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
            ("HEAD", rf"/(?P<kind>datasets)/{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
            ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
            ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", self.resolve),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                with self.server.hub.lock:
                    return handler(**{k: v for k, v in match.groupdict().items()})
        self.server.hub.unhandled.append((method, path))
        self._send(404, {"error": f"no route for {method} {path}"})

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        content_type = "application/json" if payload is not None else "application/octet-stream"
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _can_write(self, namespace: str) -> bool:
        return self.user is not None and self.user.role == "write" and namespace in [self.user.name, *self.user.orgs]

    def _repos(self, kind: str | None) -> dict[str, HubRepo]:
        return self.server.hub.datasets if kind == "datasets" else self.server.hub.repos

    def _readable_repo(self, repo: str, kind: str | None = None) -> HubRepo | None:
        """The repo, or None after answering 404 RepoNotFound (missing, or private and not ours)."""
        found = self._repos(kind).get(repo)
        namespace = repo.split("/")[0]
        if found is None or (found.private and not (self.user and namespace in [self.user.name, *self.user.orgs])):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return found

    def _check_revision(self, found: HubRepo, rev: str | None) -> bool:
        if rev in (None, "main", found.sha) or any(c["oid"] == rev for c in found.commits):
            return True
        self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return False

    # ------------------------------------------------------------------------------------------ API
    def whoami(self):
        if self.user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": org, "roleInOrg": "write"} for org in self.user.orgs]
        token_info = {"displayName": "test-token", "role": self.user.role}
        self._send(200, {"type": "user", "name": self.user.name, "orgs": orgs,
                         "auth": {"type": "access_token", "accessToken": token_info}})

    def agent_harnesses(self):  # fetched by huggingface_hub's user-agent detection
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self):
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            return self._error(400, "This test server only hosts model and dataset repos")
        namespace = payload.get("organization") or (self.user.name if self.user else None)
        if self.user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{namespace}/{payload['name']}"
        if not self._can_write(namespace):
            return self._error(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        repos = self._repos(f"{repo_type}s")
        url = f"{self.server.hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        if repo_id in repos:  # the Hub names the existing repo; create_repo(exist_ok=True) reads it
            message = f"You already created this {repo_type} repo"
            return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repos[repo_id] = HubRepo(repo_id, private=private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        content = json.loads(self.body).get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError("metadata must be a mapping")
        except Exception as err:  # noqa: BLE001 - any YAML error is a 400 with a message, as on the Hub
            return self._send(400, {"errors": [{"message": f"Invalid YAML: {err}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, rev: str, kind: str = "models"):
        found = self._readable_repo(repo, kind)
        if found is None:
            return
        if not self._can_write(repo.split("/")[0]):
            return self._error(403, "You don't have write access to this repo")
        files = json.loads(self.body)["files"]
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(found.files[f["path"]]) if f["path"] in found.files else None}
            for f in files
        ]
        self._send(200, {"files": answer, "commitOid": found.sha})

    def commit(self, repo: str, rev: str, kind: str = "models"):
        found = self._readable_repo(repo, kind)
        if found is None or not self._check_revision(found, rev):
            return
        if not self._can_write(repo.split("/")[0]):
            return self._error(403, "You don't have write access to this repo")
        summary, changed = "", {}
        deleted = []
        for line in self.body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "file content must be base64")
                changed[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile, copies: this server never asked for them (uploadMode "regular")
                return self._error(400, f"unsupported commit operation {key!r}")
        for path in deleted:
            for existing in list(found.files):
                if existing == path or existing.startswith(path.rstrip("/") + "/"):
                    del found.files[existing]
        found.files.update(changed)
        oid = hashlib.sha1(f"{found.sha}{time.time_ns()}{sorted(changed)}".encode()).hexdigest()
        found.commits.append({"oid": oid, "summary": summary, "files": sorted(changed)})
        self._send(200, {"commitUrl": f"{self.server.hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def _entry(self, found: HubRepo, path: str) -> dict:
        content = found.files[path]
        return {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)}

    def model_info(self, repo: str, rev: str | None = None, kind: str = "models"):
        found = self._readable_repo(repo, kind)
        if found is None or not self._check_revision(found, rev):
            return
        self._send(200, {
            "_id": found.sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": found.sha,
            "private": found.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(found.files.items())],
        })

    def tree(self, repo: str, rev: str, path: str | None = None, kind: str = "models"):
        found = self._readable_repo(repo, kind)
        if found is None or not self._check_revision(found, rev):
            return
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name in sorted(found.files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1 :] if prefix else name
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entries.append(self._entry(found, name))
        entries = [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)] + entries
        if prefix and not entries:
            return self._error(404, f"{prefix} does not exist", "EntryNotFound")
        self._send(200, entries)

    def paths_info(self, repo: str, rev: str, kind: str = "models"):
        found = self._readable_repo(repo, kind)
        if found is None or not self._check_revision(found, rev):
            return
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(self.body).get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        self._send(200, [self._entry(found, p) for p in paths if p in found.files])

    def resolve(self, repo: str, rev: str, path: str, kind: str | None = None):
        found = self._readable_repo(repo, kind)
        if found is None or not self._check_revision(found, rev):
            return
        if path not in found.files:
            return self._error(404, "Entry not found", "EntryNotFound")
        content = found.files[path]
        headers = {"X-Repo-Commit": found.sha, "ETag": f'"{git_blob_sha1(content)}"', "Accept-Ranges": "bytes"}
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range:
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, headers=headers, body=content[start : end + 1])
        self._send(200, headers=headers, body=content)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """In-memory Hub on ``http://127.0.0.1:<ephemeral port>``; a context manager that starts and stops it.

    Args:
        tokens: bearer token -> [`HubUser`] (who it is, its organisations, "read" or "write").
    """

    def __init__(self, tokens: dict[str, HubUser] | None = None):
        self.tokens = dict(tokens or {})
        self.repos: dict[str, HubRepo] = {}
        self.datasets: dict[str, HubRepo] = {}  # dataset repos
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.faults: list[list] = []  # [method, path regex, remaining count]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, method: str, path_pattern: str, times: int = 1) -> None:
        """Drop the connection of the next `times` `method` requests whose path fully matches `path_pattern`."""
        with self.lock:
            self.faults.append([method, path_pattern, times])

    def _take_fault(self, method: str, path: str) -> bool:
        with self.lock:
            for fault in self.faults:
                if fault[0] == method and fault[2] > 0 and re.fullmatch(fault[1], path):
                    fault[2] -= 1
                    return True
        return False

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files at the head of `repo_id`."""
        return dict(self.repos[repo_id].files)

    def dataset_files(self, repo_id: str) -> dict[str, bytes]:
        """The files at the head of the dataset repo `repo_id`."""
        return dict(self.datasets[repo_id].files)
