"""A fake Hugging Face Hub at the HTTP level: a WSGI app serving the endpoints an upload uses, and the
ones a download uses (resolve, repo info, tree) for the files committed so far.

huggingface_hub talks to it through its own httpx2 client (set_client_factory with a WSGITransport,
in process) or over a real socket (wsgiref server + HF_ENDPOINT, for a CLI subprocess). It keeps
what was committed so tests can assert on the uploaded bytes. Every file is answered "regular" by
preupload, so contents arrive base64-encoded in the commit's ndjson (no LFS/xet round trip).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote

import yaml

TOKEN = "hf_fake_token_for_tests"


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    endpoint: str = "https://hub.test"
    token: str = TOKEN
    forbidden_namespaces: set[str] = field(default_factory=set)
    repos: dict[str, dict] = field(default_factory=dict)  # repo_id -> {"private": bool, "branches": {name: files}}
    commits: list[Commit] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    validated_cards: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        with self.lock:
            self.requests.append((method, path))
            status, payload, headers = self.handle(method, path, environ.get("HTTP_AUTHORIZATION"), body)
        if isinstance(payload, bytes):  # a file's content
            start_response(status, [("Content-Type", "application/octet-stream"),
                                    ("Content-Length", str(len(payload))), *headers])
            return [b""] if method == "HEAD" else [payload]
        data = json.dumps(payload).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
        return [data]

    # -- routing ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, auth: str | None, body: bytes):
        if auth != f"Bearer {self.token}":
            return "401 Unauthorized", {"error": "Invalid credentials in Authorization header"}, [
                ("X-Error-Message", "Invalid credentials in Authorization header")]
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(body))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if method == "POST" and match:
            repo_id, action, revision = match.groups()
            if repo_id not in self.repos:
                return "404 Not Found", {"error": "Repository not found"}, [("X-Error-Code", "RepoNotFound")]
            if repo_id.split("/")[0] in self.forbidden_namespaces:
                return "403 Forbidden", {"error": "You don't have the rights to write here"}, [
                    ("X-Error-Message", "You don't have the rights to write here")]
            return getattr(self, action)(repo_id, revision, body)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("GET", "HEAD") and match:
            return self.resolve(*match.groups())
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if method == "GET" and match:
            return getattr(self, f"{match.group(2)}_info")(*match.group(1, 3))
        return "404 Not Found", {"error": f"fake hub does not serve {method} {path}"}, []

    # -- downloads ---------------------------------------------------------------------------
    def _files_at(self, repo_id: str, revision: str):
        """(files, commit sha) of a branch or of a branch's commit sha; an error response when there is none."""
        if repo_id not in self.repos:
            return "404 Not Found", {"error": "Repository not found"}, [("X-Error-Code", "RepoNotFound")]
        for branch, files in self.repos[repo_id]["branches"].items():
            sha = hashlib.sha1(json.dumps({k: hashlib.sha1(v).hexdigest() for k, v in sorted(files.items())})
                               .encode()).hexdigest()
            if revision in (branch, sha):
                return files, sha
        return "404 Not Found", {"error": "Invalid rev id"}, [("X-Error-Code", "RevisionNotFound")]

    def resolve(self, repo_id: str, revision: str, filename: str):
        found = self._files_at(repo_id, revision)
        if len(found) == 3:
            return found
        files, sha = found
        if filename not in files:
            return "404 Not Found", {"error": "Entry not found"}, [("X-Error-Code", "EntryNotFound")]
        data = files[filename]
        return "200 OK", data, [("X-Repo-Commit", sha), ("ETag", f'"{hashlib.sha1(data).hexdigest()}"')]

    def revision_info(self, repo_id: str, revision: str):
        found = self._files_at(repo_id, revision)
        if len(found) == 3:
            return found
        files, sha = found
        return "200 OK", {"id": repo_id, "sha": sha, "private": self.repos[repo_id]["private"],
                          "siblings": [{"rfilename": name} for name in sorted(files)]}, []

    def tree_info(self, repo_id: str, revision: str):
        """The whole tree, recursive, one page."""
        found = self._files_at(repo_id, revision)
        if len(found) == 3:
            return found
        files, _ = found
        return "200 OK", [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                          for name, data in sorted(files.items())], []

    def create_repo(self, payload: dict):
        namespace = payload.get("organization") or "fake-user"
        if namespace in self.forbidden_namespaces:
            return "403 Forbidden", {"error": "You don't have the rights to create a model under this namespace"}, [
                ("X-Error-Message", "You don't have the rights to create a model under this namespace")]
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return "409 Conflict", {"error": "You already created this model repo", "url": url}, []
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "visibility": payload.get("visibility"),
                               "type": payload.get("type"), "branches": {"main": {}}}
        return "200 OK", {"url": url, "name": repo_id}, []

    def branch(self, repo_id: str, branch: str, body: bytes):
        branches = self.repos[repo_id]["branches"]
        if branch in branches:
            return "409 Conflict", {"error": "Reference already exists"}, []
        branches[branch] = dict(branches["main"])
        return "200 OK", {}, []

    def validate_yaml(self, payload: dict):
        """The Hub's rules that matter here: a YAML mapping header, base_model_relation needs base_model."""
        content = payload["content"]
        self.validated_cards.append(content)
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        errors = []
        try:
            header = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as e:
            header, errors = None, [{"message": f"YAML: {e}"}]
        if not isinstance(header, dict):
            errors = errors or [{"message": "metadata is not a YAML mapping"}]
        elif header.get("base_model_relation") and not header.get("base_model"):
            errors = [{"message": "base_model_relation requires base_model"}]
        if errors:
            return "400 Bad Request", {"errors": errors, "warnings": []}, []
        return "200 OK", {"errors": [], "warnings": []}, []

    def preupload(self, repo_id: str, revision: str, body: bytes):
        if revision not in self.repos[repo_id]["branches"]:
            return "404 Not Found", {"error": "Invalid rev id"}, [("X-Error-Code", "RevisionNotFound")]
        files = json.loads(body)["files"]
        return "200 OK", {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                    for f in files]}, []

    def commit(self, repo_id: str, revision: str, body: bytes):
        if revision not in self.repos[repo_id]["branches"]:
            return "404 Not Found", {"error": "Invalid rev id"}, [("X-Error-Code", "RevisionNotFound")]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return "400 Bad Request", {"error": f"fake hub only takes regular files, got {line['key']}"}, []
        self.repos[repo_id]["branches"][revision].update(files)
        self.commits.append(Commit(repo_id, revision, header["summary"], files))
        oid = hashlib.sha1(body).hexdigest()
        return "200 OK", {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}"}, []
