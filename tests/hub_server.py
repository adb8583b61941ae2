"""Local stand-ins for the Hugging Face Hub, on 127.0.0.1, for the push / download tests.

- `UploadHub`: a small HTTP server of our own that answers the calls huggingface_hub 2.x makes to write a
  repository (`create_repo`, `create_branch`, `list_repo_files`, and `create_commit`: README metadata validation,
  preupload, the LFS batch API with basic transfers and verification, and the NDJSON commit with inline base64 and
  LFS files). It writes each commit into a bare git repository `MIRRORS/models/ORG/NAME`, file contents as plain
  git blobs, and records every request (without its token) for the tests to inspect.
- `start_olah`: olah (PyPI), a Hub server that in offline mode serves the git repositories under MIRRORS over the
  Hub's download API, so that `from_pretrained` runs through the real client against a real server.

No self-hostable Hub on PyPI accepts uploads, hence the first; nothing else here speaks the Hub's protocols.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# the .gitattributes the Hub puts in a new model repository (the LFS part of it)
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.bin", "*.ckpt", "*.h5", "*.msgpack", "*.npy", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.tar.*",
    "*tfevents*", "*.zip"))
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files of 10 MB and more in LFS whatever their name
_GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@localhost", "GIT_COMMITTER_NAME": "hub",
            "GIT_COMMITTER_EMAIL": "hub@localhost"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HubError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


class UploadHub:
    """The write side of the Hub for huggingface_hub's client, backed by git repositories under `mirrors`."""

    def __init__(self, mirrors: Path, lfs_store: Path):
        self.mirrors, self.lfs_store = Path(mirrors), Path(lfs_store)
        self.lfs_store.mkdir(parents=True, exist_ok=True)
        self.requests: list[dict] = []          # method, path, json body (no file contents), authorization present
        self.authorizations: list[str] = []     # the Authorization headers received (memory only, never written)
        self.created: dict[str, dict] = {}      # repo id -> create_repo payload
        self.commits: list[dict] = []           # repo, revision, summary, files, deleted
        self.received: dict[str, bytes] = {}    # (repo@revision:path) -> bytes, every file committed
        self._git_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> UploadHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def git(self, repo_id: str, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        result = subprocess.run(["git", "--git-dir", str(self.repo_path(repo_id)), *args], input=input,
                                capture_output=True, env={**os.environ, **_GIT_ENV, **(env or {})}, check=True)
        return result.stdout.decode().strip()

    # --- endpoints -----------------------------------------------------------------------------------------------

    def create_repo(self, body: dict) -> dict:
        if body.get("type") not in (None, "model"):
            raise HubError(400, "only model repositories here")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            raise HubError(400, "give the namespace: ORG/NAME")
        path = self.repo_path(repo_id)
        if path.exists():
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(path)], check=True)
        self.created[repo_id] = body
        self._commit(repo_id, "main", "initial commit", {".gitattributes": GITATTRIBUTES.encode()}, [], new=True)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo_id: str, branch: str, body: dict) -> dict:
        self._check_repo(repo_id)
        if self._head(repo_id, branch) is not None:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._head(repo_id, body.get("startingPoint") or "main")
        self.git(repo_id, "update-ref", f"refs/heads/{branch}", start)
        return {}

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
        self._require_revision(repo_id, revision)
        args = ["ls-tree", "-l"] + (["-r", "-t"] if recursive else []) + [revision]
        if path:
            args.append(path.rstrip("/") + "/")
        entries = []
        for line in self.git(repo_id, *args).splitlines():
            meta, name = line.split("\t", 1)
            _, kind, oid, size = meta.split()
            entries.append({"type": "directory", "oid": oid, "path": name} if kind == "tree" else
                           {"type": "file", "oid": oid, "size": int(size), "path": name})
        return entries

    def preupload(self, repo_id: str, revision: str, body: dict) -> dict:
        self._require_revision(repo_id, revision)
        patterns = self._lfs_patterns(repo_id, revision)
        files = [{"path": item["path"], "shouldIgnore": False,
                  "uploadMode": "lfs" if item["size"] >= LFS_MIN_SIZE or any(
                      fnmatch.fnmatch(item["path"].rpartition("/")[2], pattern) for pattern in patterns)
                  else "regular"} for item in body["files"]]
        return {"files": files, "commitOid": self._head(repo_id, revision)}

    def lfs_batch(self, repo_id: str, body: dict) -> dict:
        self._check_repo(repo_id)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "only basic uploads here")
        objects = []
        for item in body["objects"]:
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size}
            if not self._lfs_object(oid).is_file():
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{oid}"},
                                    "verify": {"href": f"{self.url}/_lfs/{oid}/verify"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> dict:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "content does not match its sha256")
        self._lfs_object(oid).write_bytes(data)
        return {}

    def lfs_verify(self, oid: str, body: dict) -> dict:
        path = self._lfs_object(oid)
        if body.get("oid") != oid or not path.is_file() or path.stat().st_size != body.get("size"):
            raise HubError(404, "object not uploaded")
        return {}

    def commit(self, repo_id: str, revision: str, lines: list[dict], create_pr: bool) -> dict:
        if create_pr:
            raise HubError(400, "pull requests are not supported here")
        self._require_revision(repo_id, revision)
        header, files, deleted = None, {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "inline files must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                path = self._lfs_object(value["oid"])
                if value.get("algo") != "sha256" or not path.is_file():
                    raise HubError(400, f"LFS object of {value['path']} was not uploaded")
                data = path.read_bytes()
                if "size" in value and len(data) != value["size"]:
                    raise HubError(400, f"LFS object of {value['path']} has the wrong size")
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "a commit needs a header with a summary")
        oid = self._commit(repo_id, revision, header["summary"], files, deleted,
                           parent=header.get("parentCommit"))
        self.commits.append({"repo": repo_id, "revision": revision, "summary": header["summary"],
                             "files": sorted(files), "deleted": sorted(deleted), "oid": oid})
        for path, data in files.items():
            self.received[f"{repo_id}@{revision}:{path}"] = data
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}

    @staticmethod
    def validate_yaml(body: dict) -> dict:
        match = re.match(r"^---\n(.*?)\n---\n", body.get("content", ""), flags=re.S)
        metadata = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(metadata, dict):
            raise HubError(400, "README.md has no YAML metadata block")
        for key in ("tags",):
            if key in metadata and not isinstance(metadata[key], list):
                raise HubError(400, f"{key} must be a list")
        return {"errors": [], "warnings": []}

    # --- git -----------------------------------------------------------------------------------------------------

    def _commit(self, repo_id: str, branch: str, message: str, files: dict[str, bytes], deleted: list[str],
                parent: str | None = None, new: bool = False) -> str:
        with self._git_lock, tempfile.TemporaryDirectory() as scratch:
            env = {"GIT_INDEX_FILE": str(Path(scratch, "index"))}
            head = None if new else self._head(repo_id, branch)
            if parent is not None and parent != head:
                raise HubError(412, "parentCommit is not the head of the branch")
            if head is not None:
                self.git(repo_id, "read-tree", head, env=env)
            for path in deleted:
                self.git(repo_id, "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", path, env=env)
            for path, data in files.items():
                blob = self.git(repo_id, "hash-object", "-w", "--no-filters", "--stdin", input=data)
                self.git(repo_id, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            tree = self.git(repo_id, "write-tree", env=env)
            oid = self.git(repo_id, "commit-tree", tree, *(["-p", head] if head else []), "-m", message)
            self.git(repo_id, "update-ref", f"refs/heads/{branch}", oid)
            return oid

    def _head(self, repo_id: str, revision: str) -> str | None:
        try:
            return self.git(repo_id, "rev-parse", "--verify", "-q", f"refs/heads/{revision}")
        except subprocess.CalledProcessError:
            return None

    def _check_repo(self, repo_id: str) -> None:
        if not self.repo_path(repo_id).is_dir():
            raise HubError(404, "Repository not found")

    def _require_revision(self, repo_id: str, revision: str) -> None:
        self._check_repo(repo_id)
        if self._head(repo_id, revision) is None:
            raise HubError(404, f"Invalid rev id: {revision}")

    def _lfs_patterns(self, repo_id: str, revision: str) -> list[str]:
        try:
            text = self.git(repo_id, "show", f"{revision}:.gitattributes")
        except subprocess.CalledProcessError:
            return []
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def _lfs_object(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise HubError(400, "bad oid")
        return self.lfs_store / oid

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body: bytes) -> dict | list:
        def js() -> dict:
            return json.loads(body) if body else {}

        def ndjson() -> list[dict]:
            return [json.loads(line) for line in body.decode().splitlines() if line.strip()]

        flag = query.get("create_pr", ["0"])[0] == "1"
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        repo = r"(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", r"/api/repos/create", lambda m: self.create_repo(js())),
            ("POST", r"/api/validate-yaml", lambda m: self.validate_yaml(js())),
            ("POST", rf"/api/models/{repo}/branch/(?P<rev>[^/]+)",
             lambda m: self.create_branch(m["repo"], unquote(m["rev"]), js())),
            ("GET", rf"/api/models/{repo}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?",
             lambda m: self.tree(m["repo"], unquote(m["rev"]), m["path"] or "", recursive)),
            ("POST", rf"/api/models/{repo}/preupload/(?P<rev>[^/]+)",
             lambda m: self.preupload(m["repo"], unquote(m["rev"]), js())),
            ("POST", rf"/{repo}\.git/info/lfs/objects/batch", lambda m: self.lfs_batch(m["repo"], js())),
            ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", lambda m: self.lfs_put(m["oid"], body)),
            ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", lambda m: self.lfs_verify(m["oid"], js())),
            ("POST", rf"/api/models/{repo}/commit/(?P<rev>[^/]+)",
             lambda m: self.commit(m["repo"], unquote(m["rev"]), ndjson(), flag)),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                return handler(match.groupdict())
        raise HubError(404, f"no route for {method} {path}")

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                url = urlsplit(self.path)
                auth = self.headers.get("Authorization")
                record = {"method": self.command, "path": url.path, "authorized": auth is not None}
                if body[:1] in (b"{", b"[") and self.command != "PUT":
                    try:
                        record["json"] = json.loads(body)
                    except ValueError:
                        pass
                hub.requests.append(record)
                if auth is not None:
                    hub.authorizations.append(auth)
                try:
                    writes = not (self.command == "GET" or url.path == "/api/validate-yaml"
                                  or url.path.startswith("/_lfs/"))
                    if writes and not (auth or "").startswith("Bearer "):
                        raise HubError(401, "Invalid credentials in Authorization header")
                    status, payload = 200, hub._route(self.command, url.path, parse_qs(url.query), body)
                except HubError as err:
                    status, payload = err.status, {"error": str(err), **err.extra}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format, *args):  # keep the test output clean
                pass

        return Handler


class OlahServer:
    """olah serving `mirrors` offline on a free port; stopped by its PID."""

    def __init__(self, mirrors: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{workdir / "cache"}"\nmirrors-path = ["{mirrors}"]\n'
            "[accessibility]\noffline = true\n", encoding="utf-8")
        self.log = workdir / "olah.out"
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "--config", str(config), "--host", "127.0.0.1",
                 "--port", str(self.port), "--repos-path", str(workdir / "cache"), "--log-path", str(workdir / "logs")],
                stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with code {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/models/none/none/revision/main", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers (404 for a repository it does not have)
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, 15)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, 9)
                self.process.wait()
