"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: nothing reaches the network.

It serves, over repositories held in memory, the HTTP endpoints ``huggingface_hub`` (2.x) calls:

- fetch: ``GET /api/models/{repo}[/revision/{rev}]`` (model info: ``sha``, ``siblings``), ``GET
  /api/models/{repo}/tree/{rev}[/{path}]`` (the file listing ``snapshot_download`` filters with ``allow_patterns``),
  ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` (the file, with the ``X-Repo-Commit`` and ``ETag`` headers the
  cache is keyed by);
- push: ``POST /api/repos/create``, ``/api/models/{repo}/branch/{branch}``, ``/api/validate-yaml`` (the model card's
  front matter), ``/api/models/{repo}/preupload/{rev}`` (every file "regular", so its bytes travel inside the commit)
  and ``/api/models/{repo}/commit/{rev}`` (the ndjson commit: header, files, deletions).

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``). What it does not do: LFS / Xet transfers (the real Hub asks for them for large binary files),
pagination, pull requests, authentication (the ``Authorization`` header is only recorded). ``requests`` logs every
request as (method, path, authorization), so a test can tell that nothing was asked (offline mode).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)    # name -> commit
    tags: dict[str, str] = field(default_factory=dict)        # name -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)    # commit -> summary

    def commit_of(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


class StandInHub:
    """``with StandInHub() as hub:`` serves on ``hub.url`` until closed."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> StandInHub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ test setup

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self._lock:
            return self.repos.setdefault(repo_id, Repo(private=private))

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "commit",
               deleted: tuple[str, ...] = ()) -> str:
        """A new commit on ``branch`` (created from main if new): the branch's files, plus ``files``, less
        ``deleted``. Returns its 40-hex id."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.branches.get(branch) or repo.branches.get("main")
            tree = dict(repo.commits.get(parent, {})) if parent else {}
            tree.update(files)
            for path in deleted:
                tree.pop(path, None)
            digest = hashlib.sha1(f"{parent}\n{message}\n{len(repo.commits)}".encode())
            for path in sorted(tree):
                digest.update(f"{path}\0{git_blob_oid(tree[path])}\n".encode())
            sha = digest.hexdigest()
            repo.commits[sha], repo.messages[sha], repo.branches[branch] = tree, message, sha
            return sha

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        self.repos[repo_id].tags[name] = commit

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.commit_of(rev)]


class _Handler(BaseHTTPRequestHandler):
    stand_in: StandInHub

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------------------------------ replies

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._json({"error": message}, status, extra)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.stand_in.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        sha = repo.commit_of(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # ------------------------------------------------------------------------------------------ routing

    def _route(self) -> None:
        path = urlsplit(self.path).path
        self.stand_in.requests.append((self.command, path, self.headers.get("authorization")))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if self.command == "GET" and (not rest or rest[0] == "revision"):
                return self._info(repo_id, rest[1] if len(rest) > 1 else "main")
            if self.command == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            posts = {"preupload": self._preupload, "commit": self._commit_request, "branch": self._branch}
            if self.command == "POST" and len(rest) == 2 and rest[0] in posts:
                return posts[rest[0]](repo_id, rest[1])
        if self.command == "POST" and parts == ["api", "repos", "create"]:
            return self._create()
        if self.command == "POST" and parts == ["api", "validate-yaml"]:
            self._body()
            return self._json({"errors": [], "warnings": []})
        if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self._error(404, None, f"no such endpoint: {self.command} {path}")

    do_GET = do_HEAD = do_POST = _route

    # ------------------------------------------------------------------------------------------ fetch

    def _info(self, repo_id: str, rev: str) -> None:
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        self._json({"id": repo_id, "sha": sha, "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})

    def _tree(self, repo_id: str, rev: str, under: str) -> None:
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        prefix = f"{under}/" if under else ""
        self._json([{"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)}
                    for p, data in sorted(repo.commits[sha].items()) if p.startswith(prefix)])

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        start = self.headers.get("Range", "").removeprefix("bytes=").split("-")[0]
        if start:  # a resumed download
            headers["Content-Range"] = f"bytes {int(start)}-{len(data) - 1}/{len(data)}"
            return self._reply(206, data[int(start):], headers, "application/octet-stream")
        self._reply(200, data, headers, "application/octet-stream")

    # ------------------------------------------------------------------------------------------ push

    def _create(self) -> None:
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.stand_in.repos:  # the Hub names the existing repository's url (create_repo returns it)
            message = "You already created this model repo"
            return self._json({"error": message, "url": f"{self.stand_in.url}/{repo_id}"}, 409,
                              {"X-Error-Message": message})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.stand_in.create_repo(repo_id, private=private)
        self.stand_in.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             message="initial commit")
        self._json({"url": f"{self.stand_in.url}/{repo_id}", "name": repo_id})

    def _branch(self, repo_id: str, branch: str) -> None:
        self._body()
        if (repo := self._repo(repo_id)) is None:
            return
        if branch in repo.branches:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = repo.branches["main"]
        self._json({})

    def _preupload(self, repo_id: str, rev: str) -> None:
        payload = json.loads(self._body())
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        tree = repo.commits[sha]
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                               "oid": git_blob_oid(tree[f["path"]]) if f["path"] in tree else None}
                              for f in payload["files"]]})

    def _commit_request(self, repo_id: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if (repo := self._repo(repo_id)) is None or self._commit(repo, rev) is None:
            return
        if rev not in repo.branches:
            return self._error(400, None, f"{rev} is not a branch")
        header = next(item["value"] for item in lines if item["key"] == "header")
        files, deleted = {}, []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                deleted.append(value["path"])
            elif item["key"] != "header":
                return self._error(400, None, f"the stand-in does not take {item['key']} operations")
        sha = self.stand_in.commit(repo_id, files, branch=rev, message=header["summary"], deleted=tuple(deleted))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.stand_in.url}/{repo_id}/commit/{sha}",
                    "pullRequestUrl": None})
