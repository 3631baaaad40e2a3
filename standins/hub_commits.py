"""A stand-in for the Hugging Face Hub's write side on 127.0.0.1: model and Space repos that
`huggingface_hub` creates, commits to and reads back, each commit kept (a revision is never lost).

It answers what `publish.py --hub/--space` and `hf://USER/NAME[@REVISION]` ask: `whoami-v2`,
`repos/create`, the commit API (`preupload` says which files go through LFS, the LFS `batch`
answers with an upload and a verify action, the bytes are PUT and checked against their sha256,
then the ndjson `commit` names regular files inline and LFS files by oid), repo info by revision,
and `resolve` (HEAD and GET, ranges). Tokens map to users; a user writes only its own namespace
and its organisations'; a private repo is "not found" to anyone else.

Visibility as the Hub decides it: `repos/create` reads `"visibility"` (what huggingface_hub 2.x
sends; `private=None` sends none) and, without it, the namespace's default (an organisation may
make its repos private by default); an existing repo keeps its own. `PUT .../settings` changes it
(`update_repo_settings`). A namespace may have a private storage limit: an LFS batch that would
pass it is refused as the Hub does (403 "Private repository storage limit reached"). It does not
speak Xet (the Hub's newer storage): clients set `HF_HUB_DISABLE_XET=1`, which makes
`huggingface_hub` use LFS as above.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import unquote, urlparse

from standins import http

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".npz", ".html")
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, str]  # path -> sha256 of its bytes


@dataclass
class Repo:
    kind: str  # model | dataset | space
    private: bool
    sdk: str | None
    commits: list[Commit] = field(default_factory=list)

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Org:
    members: set[str]
    private_by_default: bool = False  # the organisation's setting: new repos are private unless asked otherwise


class StandInModelHub:
    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, Org] | None = None,
                 private_storage_bytes: dict[str, int] | None = None):
        """`tokens`: token -> user name. `private_storage_bytes`: namespace -> its private storage limit."""
        self.tokens = {"hf_alice_write": "alice"} if tokens is None else tokens
        self.orgs = orgs or {}
        self.private_storage_bytes = private_storage_bytes or {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seed(self, repo_id: str, files: dict[str, bytes], kind: str = "model") -> str:
        """A repo as someone else published it (timm's own weights): one commit of `files`."""
        with self.lock:
            shas = {}
            for path, data in files.items():
                shas[path] = hashlib.sha256(data).hexdigest()
                self.blobs[shas[path]] = data
            oid = hashlib.sha1(json.dumps(sorted(shas.items())).encode()).hexdigest()
            self.repos[(kind, repo_id)] = Repo(kind, False, None, [Commit(oid, "seeded", shas)])
        return oid

    def files(self, repo_id: str, kind: str = "model", revision: str = "main") -> dict[str, bytes]:
        """What the repo holds at `revision`: path -> bytes."""
        commit = self.repos[(kind, repo_id)].at(revision)
        return {path: self.blobs[sha] for path, sha in commit.files.items()}

    def commits(self, repo_id: str, kind: str = "model") -> list[Commit]:
        return list(self.repos[(kind, repo_id)].commits)

    def may_write(self, user: str | None, namespace: str) -> bool:
        return bool(user) and (user == namespace or user in self.orgs.get(namespace, Org(set())).members)

    def private_bytes(self, namespace: str) -> int:
        """What the namespace's private repos hold (each stored object once)."""
        shas = {sha for (_, repo_id), repo in self.repos.items() if repo.private and repo_id.split("/")[0] == namespace
                for commit in repo.commits for sha in commit.files.values()}
        return sum(len(self.blobs[sha]) for sha in shas)


def _handler(hub: StandInModelHub):
    class Handler(http.Handler):
        def record(self, method: str, status: int) -> None:
            hub.requests.append((method, self.path, status))

        def _error(self, status: int, message: str, code: str | None = None, method: str | None = None) -> None:
            method = method or self.command
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._reply(status, json.dumps({"error": message}).encode(), headers, method)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _user(self) -> str | None | bool:
            """The token's user; None without a token; False for a token the Hub does not know."""
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return None
            return hub.tokens.get(auth[len("Bearer "):], False)

        def _repo(self, kind: str, repo_id: str, method: str, write: bool = False) -> Repo | None:
            user = self._user()
            if user is False:
                self._error(401, "Invalid credentials in Authorization header", method=method)
                return None
            repo = hub.repos.get((kind, repo_id))
            if repo is None or (repo.private and not hub.may_write(user, repo_id.split("/")[0])):
                self._error(404 if user else 401, "Repository not found", "RepoNotFound", method)
                return None
            if write and not hub.may_write(user, repo_id.split("/")[0]):
                self._error(403, f"You don't have the rights to write to {repo_id}", method=method)
                return None
            return repo

        def _route(self, method: str) -> None:
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            with hub.lock:
                if parts == ["api", "whoami-v2"]:
                    return self._whoami(method)
                if parts == ["api", "repos", "create"] and method == "POST":
                    return self._create()
                if parts == ["api", "validate-yaml"] and method == "POST":
                    return self._validate_yaml()
                if parts[:1] == ["lfs-upload"] and method == "PUT":
                    return self._lfs_put(parts[1])
                if parts == ["lfs-verify"] and method == "POST":
                    body = json.loads(self._body())
                    return self._json({}) if body["oid"] in hub.blobs else self._error(404, "object not uploaded")
                if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
                    return self._api(parts[1][:-1], "/".join(parts[2:4]), parts[4:], method)
                if parts[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
                    kind = "space" if parts[0] == "spaces" else "dataset" if parts[0] == "datasets" else "model"
                    repo_id = "/".join(parts[1 if kind != "model" else 0:-4])
                    return self._lfs_batch(kind, repo_id.removesuffix(".git"))
                kind = "space" if parts[0] == "spaces" else "dataset" if parts[0] == "datasets" else "model"
                rest = parts[1:] if kind != "model" else parts
                if len(rest) >= 5 and rest[2] == "resolve":
                    return self._resolve(kind, "/".join(rest[:2]), rest[3], "/".join(rest[4:]), method)
                self._error(404, "Not found", method=method)

        def _whoami(self, method: str) -> None:
            user = self._user()
            if not user:
                return self._error(401, "Invalid credentials in Authorization header", method=method)
            orgs = [{"type": "org", "name": name} for name, org in sorted(hub.orgs.items()) if user in org.members]
            self._json({"type": "user", "name": user, "orgs": orgs,
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}},
                       method=method)

        def _validate_yaml(self) -> None:
            """The README's metadata (what upload_folder checks before a commit): YAML, a mapping."""
            import yaml

            content = json.loads(self._body())["content"]
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
            except (yaml.YAMLError, IndexError) as error:
                return self._json({"errors": [{"message": f"invalid YAML: {error}"}]}, 400)
            if not isinstance(meta, dict):
                return self._json({"errors": [{"message": "the metadata is not a mapping"}]}, 400)
            self._json({"errors": [], "warnings": []})

        def _create(self) -> None:
            user = self._user()
            body = json.loads(self._body())
            kind = body.get("type") or "model"
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            if not user:
                return self._error(401, "Invalid credentials in Authorization header")
            namespace = repo_id.split("/")[0]
            if not hub.may_write(user, namespace):
                return self._error(403, f"You don't have the rights to create a repo in {namespace}")
            visibility = body.get("visibility")
            if visibility not in (None, "public", "private", "protected") or (visibility == "protected"
                                                                              and kind != "space"):
                return self._error(400, f"Invalid visibility: {visibility}")
            if visibility is None and "private" in body:  # what older huggingface_hub versions sent
                visibility = "private" if body["private"] else "public"
            if visibility is None:
                visibility = "private" if hub.orgs.get(namespace, Org(set())).private_by_default else "public"
            if (kind, repo_id) in hub.repos:  # the Hub's 409 names the repo: huggingface_hub reads its url
                return self._reply(409, json.dumps({"error": "You already created this repo",
                                                    "url": f"{hub.url}/{PREFIX[kind]}{repo_id}"}).encode(),
                                   {"Content-Type": "application/json"}, "POST")
            readme = b"" if kind != "space" else f"---\nsdk: {body.get('sdk')}\n---\n".encode()
            files = {}
            if readme:
                hub.blobs[hashlib.sha256(readme).hexdigest()] = readme
                files["README.md"] = hashlib.sha256(readme).hexdigest()
            repo = Repo(kind, visibility == "private", body.get("sdk"))
            repo.commits.append(Commit(hashlib.sha1(f"{kind}/{repo_id}".encode()).hexdigest(), "initial commit", files))
            hub.repos[(kind, repo_id)] = repo
            self._json({"url": f"{hub.url}/{PREFIX[kind]}{repo_id}", "name": repo_id})

        def _api(self, kind: str, repo_id: str, rest: list[str], method: str) -> None:
            write = bool(rest) and rest[0] in ("preupload", "commit", "settings")
            repo = self._repo(kind, repo_id, method, write=write)
            if repo is None:
                return
            if rest == ["settings"] and method == "PUT":  # update_repo_settings: visibility, gating
                body = json.loads(self._body())
                if body.get("visibility") not in (None, "public", "private"):
                    return self._error(400, f"Invalid visibility: {body['visibility']}")
                if "visibility" in body:
                    repo.private = body["visibility"] == "private"
                return self._json({})
            if not rest or rest[0] == "revision":
                commit = repo.at(rest[1] if len(rest) > 1 else "main")
                if commit is None:
                    return self._error(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound", method)
                return self._json({"id": repo_id, "sha": commit.oid, "private": repo.private,
                                   "siblings": [{"rfilename": p} for p in sorted(commit.files)]}, method=method)
            if rest[0] == "tree" and len(rest) >= 2:  # snapshot_download lists the files at a revision
                commit = repo.at(rest[1])
                if commit is None:
                    return self._error(404, f"Invalid rev id: {rest[1]}", "RevisionNotFound", method)
                entries = []
                for path, sha in sorted(commit.files.items()):
                    size = len(hub.blobs[sha])
                    entries.append({"type": "file", "path": path, "size": size,
                                    "oid": hashlib.sha1(b"blob %d\0" % size + hub.blobs[sha]).hexdigest(),
                                    **({"lfs": {"oid": sha, "size": size, "pointerSize": 134}}
                                       if path.endswith(LFS_SUFFIXES) else {})})
                return self._json(entries, method=method)
            if rest[0] == "preupload":
                files = json.loads(self._body())["files"]
                return self._json({"files": [{"path": f["path"], "shouldIgnore": False,
                                              "uploadMode": "lfs" if (f["path"].endswith(LFS_SUFFIXES)
                                                                      or f["size"] > 10 << 20) else "regular"}
                                             for f in files]})
            if rest[0] == "commit":
                return self._commit(repo, kind, repo_id)
            self._error(404, "Not found", method=method)

        def _lfs_batch(self, kind: str, repo_id: str) -> None:
            if self._repo(kind, repo_id, "POST", write=True) is None:
                return
            body = json.loads(self._body())
            namespace = repo_id.split("/")[0]
            limit = hub.private_storage_bytes.get(namespace)
            new = sum(item["size"] for item in body["objects"] if item["oid"] not in hub.blobs)
            if hub.repos[(kind, repo_id)].private and limit is not None and hub.private_bytes(namespace) + new > limit:
                return self._error(403, "Private repository storage limit reached, please upgrade your plan to "
                                        "increase your private storage limit")
            objects = []
            for item in body["objects"]:
                entry = {"oid": item["oid"], "size": item["size"]}
                if item["oid"] not in hub.blobs:  # already there: no actions, the client skips it
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{item['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify"}}
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "sha256 of the body does not match the oid")
            hub.blobs[oid] = data
            self._reply(200)

        def _commit(self, repo: Repo, kind: str, repo_id: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            files = dict(repo.commits[-1].files)
            message = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    sha = hashlib.sha256(data).hexdigest()
                    hub.blobs[sha] = data
                    files[value["path"]] = sha
                elif key == "lfsFile":
                    if value["oid"] not in hub.blobs:
                        return self._error(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = value["oid"]
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            oid = hashlib.sha1(json.dumps([repo.commits[-1].oid, sorted(files.items()), message]).encode()).hexdigest()
            repo.commits.append(Commit(oid, message, files))
            self._json({"commitUrl": f"{hub.url}/{PREFIX[kind]}{repo_id}/commit/{oid}", "commitOid": oid})

        def _resolve(self, kind: str, repo_id: str, revision: str, path: str, method: str) -> None:
            repo = self._repo(kind, repo_id, method)
            if repo is None:
                return
            commit = repo.at(revision)
            if commit is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", method)
            if path not in commit.files:
                return self._error(404, f"{path} does not exist at {commit.oid}", "EntryNotFound", method)
            data = hub.blobs[commit.files[path]]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{commit.files[path]}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            wanted = self.headers.get("Range")
            if wanted:
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._reply(206, data[start:end + 1], headers, method)
            self._reply(200, data, headers, method)

    return Handler
