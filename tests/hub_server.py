"""A small Hugging Face Hub-compatible HTTP server for the tests, on loopback, storing repos in a folder.

It speaks the subset of the Hub protocol that the real `huggingface_hub` client (and transformers through it)
uses to create a repo, commit files, read repo info and trees, and download files:

    GET  /api/whoami-v2
    POST /api/repos/create                                  {"name", "organization", "type", "visibility"}
    POST /api/validate-yaml                                 README metadata check before a commit
    POST /api/{type}s/{ns}/{name}/preupload/{rev}           always answers uploadMode "regular" (no LFS, no Xet)
    POST /api/{type}s/{ns}/{name}/commit/{rev}              NDJSON: header, file (base64), deletedFile, deletedFolder
    POST /api/{type}s/{ns}/{name}/branch/{branch}
    GET  /api/{type}s/{ns}/{name}/refs
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]          repo info with siblings
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]       ?recursive=true
    POST /api/{type}s/{ns}/{name}/paths-info/{rev}
    HEAD|GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}    with X-Repo-Commit, ETag, Content-Length

Repos are git-like: content-addressed blobs (git blob SHA-1, which is also what the client compares to skip
unchanged files), immutable commits holding a full tree, and refs (branches and `refs/pr/N`). Authorization is
a bearer token mapped to a user; an unknown token is rejected with 401 like the real Hub, so the tests exercise
real token handling. Every request is recorded (method, path, status, whether a token was sent — never the
token) so tests can assert that nothing reached the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    message: str
    description: str
    author: str
    tree: dict[str, str]  # path -> blob sha
    created_at: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner: str
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0

    def resolve(self, revision: str) -> Optional[Commit]:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)

    def history(self, revision: str) -> list[Commit]:
        out, commit = [], self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass
class RequestRecord:
    method: str
    path: str
    status: int
    sent_token: bool


class HubError(Exception):
    """An HTTP error answer: status, the Hub's X-Error-Code (drives the client's exception type) and a message."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """Start with `with HubServer(folder, tokens={"hf_x": "alice"}, orgs={"alice": ["org"]}) as hub: hub.url`."""

    def __init__(self, root: Path, tokens: dict[str, str], orgs: Optional[dict[str, list[str]]] = None):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.orgs = dict(orgs or {})
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RequestRecord] = []
        self._faults: list[tuple[str, re.Pattern, int, bool]] = []
        self._lock = threading.RLock()
        self._httpd: Optional[ThreadingHTTPServer] = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------------------------- test helpers
    def fail_next(self, method: str, path_regex: str, status: int, echo_authorization: bool = False) -> None:
        """Answer the next request matching method and path with `status` (once), to simulate a Hub outage.
        echo_authorization: the error message repeats the request's Authorization header, as a misconfigured
        server or proxy might, so tests can check that clients do not relay it."""
        with self._lock:
            self._faults.append((method, re.compile(path_regex), status, echo_authorization))

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: self.blob(sha) for path, sha in commit.tree.items()}

    def blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def all_blobs(self) -> list[bytes]:
        return [p.read_bytes() for p in (self.root / "blobs").iterdir()]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------------------------------------- state
    def _store_blob(self, data: bytes) -> str:
        sha = git_blob_sha(data)
        path = self.root / "blobs" / sha
        if not path.exists():
            tmp = path.with_name(f".{sha}.{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _new_commit(self, repo: Repo, parent: Optional[Commit], tree: dict[str, str], message: str,
                    description: str, author: str) -> Commit:
        body = json.dumps([parent.oid if parent else None, sorted(tree.items()), message, description,
                           author, time.time_ns()]).encode()
        commit = Commit(oid=hashlib.sha1(body).hexdigest(), parent=parent.oid if parent else None, message=message,
                        description=description, author=author, tree=dict(tree), created_at=time.time())
        repo.commits[commit.oid] = commit
        return commit


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the client's own errors are what the tests look at
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # ---------------------------------------------------------------------------------------- plumbing
    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        status = 500
        try:
            self.user = self._authenticate()
            fault, echo = self._take_fault(method, split.path)
            if fault:
                sent = f"; you sent Authorization: {self.headers.get('Authorization')}" if echo else ""
                raise HubError(fault, f"simulated failure {fault}{sent}")
            status = self._route(method, split.path)
        except HubError as e:
            status = e.status
            self._send_error(e)
        except Exception as e:  # a bug in the server must show up as a clear 500, not a hung client
            status = 500
            self._send_error(HubError(500, f"test hub server error: {type(e).__name__}: {e}"))
        finally:
            with self.hub._lock:
                self.hub.requests.append(RequestRecord(method, split.path, status,
                                                       "authorization" in {k.lower() for k in self.headers}))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authenticate(self) -> Optional[str]:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _take_fault(self, method: str, path: str) -> tuple[Optional[int], bool]:
        """(status, echo_authorization) of the fault planned for this request, or (None, False)."""
        with self.hub._lock:
            for i, (m, pattern, status, echo) in enumerate(self.hub._faults):
                if m == method and pattern.search(path):
                    del self.hub._faults[i]
                    return status, echo
        return None, False

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: Optional[dict] = None) -> int:
        self._send(status, json.dumps(data).encode(), headers=headers)
        return status

    def _send_error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, json.dumps({"error": e.message}).encode(), headers=headers)

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, method: str, path: str) -> int:
        parts = path.strip("/").split("/")
        if parts[0] == "api":
            return self._route_api(method, parts[1:])
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
        raise HubError(404, f"no route {method} {path}")

    def _route_api(self, method: str, parts: list[str]) -> int:
        if parts == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if parts == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if parts == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(parts) >= 3 and parts[0] in ("models", "datasets", "spaces"):
            repo_type, repo_id, rest = parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3:]
            return self._route_repo(method, repo_type, repo_id, rest)
        raise HubError(404, f"no route {method} /api/{'/'.join(parts)}")

    def _route_repo(self, method: str, repo_type: str, repo_id: str, rest: list[str]) -> int:
        action = rest[0] if rest else ""
        rev = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "GET" and not rest:
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision":
            return self._repo_info(repo_type, repo_id, rev)
        if method == "GET" and action == "tree":
            return self._tree(repo_type, repo_id, rev, unquote("/".join(rest[2:])))
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo_type, repo_id, rev)
        if method == "POST" and action == "preupload":
            return self._preupload(repo_type, repo_id, rev)
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, rev)
        if method == "POST" and action == "branch":
            return self._create_branch(repo_type, repo_id, unquote("/".join(rest[1:])))
        raise HubError(404, f"no route {method} {repo_type} {repo_id} {'/'.join(rest)}")

    # ----------------------------------------------------------------------------------- access checks
    def _may_write(self, namespace: str) -> bool:
        return self.user is not None and (namespace == self.user or namespace in self.hub.orgs.get(self.user, []))

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        # a private repo is indistinguishable from a missing one to outsiders, as on the Hub
        if repo is None or (repo.private and not self._may_write(repo_id.split("/")[0])):
            status = 401 if self.user is None else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str) -> Repo:
        if self.user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self._readable_repo(repo_type, repo_id)
        if not self._may_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------------------- routes
    def _whoami(self) -> int:
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [{"type": "org", "name": o} for o in self.hub.orgs.get(self.user, [])]
        return self._json({"type": "user", "name": self.user, "fullname": self.user, "orgs": orgs,
                           "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self) -> int:
        payload = json.loads(self.body or b"{}")
        namespace = payload.get("organization") or self.user
        repo_type = payload.get("type") or "model"
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"invalid repo type {repo_type!r}")
        if not self._may_write(namespace):
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                return self._json({"error": "You already created this repo", "url": url}, status=409)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, owner=self.user)
            gitattributes = self.hub._store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            first = self.hub._new_commit(repo, None, {".gitattributes": gitattributes}, "initial commit", "",
                                         self.user)
            repo.refs["main"] = first.oid
            self.hub.repos[(repo_type, repo_id)] = repo
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> int:
        content = json.loads(self.body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            raise HubError(400, f"Invalid YAML in README metadata: {e}")
        if data is not None and not isinstance(data, dict):
            raise HubError(400, "README metadata must be a mapping")
        return self._json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        first = repo.history(revision)[-1]
        return self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.oid, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "lastModified": _iso(commit.created_at), "createdAt": _iso(first.created_at),
            "siblings": [{"rfilename": p} for p in sorted(commit.tree)],
        })

    def _entries(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        files, folders = [], set()
        for path, sha in sorted(commit.tree.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            dirs = rest.split("/")[:-1]
            for depth in range(1, len(dirs) + 1 if recursive else min(1, len(dirs)) + 1):
                folders.add(prefix + "/".join(dirs[:depth]))
            if recursive or not dirs:
                size = (self.hub.root / "blobs" / sha).stat().st_size
                files.append({"type": "file", "oid": sha, "size": size, "path": path})
        dir_entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                       for d in sorted(folders)]
        return dir_entries + files

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> int:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries = self._entries(commit, folder, recursive)
        if folder and not entries:
            raise HubError(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        return self._json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(self.body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        wanted = {p.strip("/") for p in paths}
        entries = [e for e in self._entries(commit, "", True) if e["path"] in wanted]
        return self._json(entries)

    def _refs(self, repo_type: str, repo_id: str) -> int:
        repo = self._readable_repo(repo_type, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid}
                    for n, oid in repo.refs.items() if not n.startswith("refs/")]
        return self._json({"branches": branches, "tags": [], "converts": []})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> int:
        repo = self._writable_repo(repo_type, repo_id)
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        with self.hub._lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference {branch} already exists")
            repo.refs[branch] = self._commit_at(repo, start).oid
        return self._json({})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._writable_repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        files = json.loads(self.body or b"{}").get("files", [])
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": commit.tree.get(f["path"])} for f in files]
        return self._json({"files": answer, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> int:
        repo = self._writable_repo(repo_type, repo_id)
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "commit has no header/summary")
        with self.hub._lock:
            base = self._commit_at(repo, revision)
            if header.get("parentCommit") and header["parentCommit"] != base.oid:
                raise HubError(412, "parent commit is not the head of the revision")
            tree = self._apply(dict(base.tree), lines)
            commit = self.hub._new_commit(repo, base, tree, header["summary"], header.get("description", ""),
                                          self.user)
            create_pr = self.query.get("create_pr") in ("1", "true")
            if not create_pr and revision not in repo.refs:
                raise HubError(400, f"can only commit to a branch, not {revision!r}")
            if create_pr:
                repo.pr_count += 1
                repo.refs[f"refs/pr/{repo.pr_count}"] = commit.oid
            else:
                repo.refs[revision] = commit.oid
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        answer = {"success": True, "commitOid": commit.oid,
                  "commitUrl": f"{self.hub.url}/{prefix}{repo_id}/commit/{commit.oid}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.hub.url}/{prefix}{repo_id}/discussions/{repo.pr_count}"
        return self._json(answer)

    def _apply(self, tree: dict[str, str], lines: list[dict]) -> dict[str, str]:
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                tree[value["path"]] = self.hub._store_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if value["path"] not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del tree[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
            elif key in ("lfsFile", "copyFile"):
                raise HubError(400, f"this test hub only accepts regular uploads, got {key}")
            elif key != "header":
                raise HubError(400, f"unknown commit operation {key!r}")
        return tree

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self._commit_at(repo, revision)
        sha = commit.tree.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if sha is None:
            self._send(404, json.dumps({"error": "Entry not found"}).encode(),
                       headers={**headers, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            return 404
        data = self.hub.blob(sha)
        self._send(200, data, content_type="application/octet-stream",
                   headers={**headers, "ETag": f'"{sha}"', "Accept-Ranges": "none",
                            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"})
        return 200
