"""A stand-in for the Hugging Face Hub on 127.0.0.1: one dataset repo served from a local folder.

It answers what `huggingface_hub` asks when `shard-imagenet hf://datasets/OWNER/NAME` runs:
repo info (`/api/datasets/R[/revision/V]`), `auth-check`, the tree listing (paginated with a
`Link` header as the Hub does), `paths-info`, and `resolve` (HEAD and GET: a 302 with the file's
size, ETag and commit, to a "CDN" on a second port that serves byte ranges without a token). Gated like
ImageNet: repo info is public; everything else is 401 without a token, 401 "Invalid credentials"
with an unknown one, 403 with a valid token whose user has not accepted the licence (the Hub's
`X-Error-Code` headers and messages). Faults for tests: `drop_next(name, after_bytes)` closes a
connection mid-body, `fail_next(name, status)` answers a 5xx. Used by the tests and by
`python -m benchmarks.hub`.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from standins import http

PAGE = 2  # tree entries per page: small, so that the client's pagination is exercised


class StandInHub:
    def __init__(self, folder: str | Path, repo_id: str = "ILSVRC/imagenet-1k", gated: bool = True,
                 tokens: dict[str, bool] | None = None):
        """`tokens`: token -> whether its user accepted the licence."""
        self.folder = Path(folder)
        self.repo_id = repo_id
        self.gated = gated
        self.tokens = {"hf_accepted": True, "hf_not_accepted": False} if tokens is None else tokens
        self.shas = [self._commit_sha("")]
        self.requests: list[tuple[str, str, str | None, int]] = []  # method, path, range, status
        self.faults: list[tuple[str, str, int]] = []  # (kind, file name, bytes or status)
        self.delay_s = 0.0  # before each file read: a slow link, so that a test can stop a run mid-way
        self.lock = threading.Lock()
        # The Hub answers `resolve` with a redirect to its CDN (another host, signed URLs, no token).
        self.server, self.url, self.thread = self._serve()
        self.cdn, self.cdn_url, _ = self._serve()

    def _serve(self):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server, f"http://127.0.0.1:{server.server_address[1]}", thread

    @property
    def sha(self) -> str:
        return self.shas[-1]

    def commit(self, message: str) -> str:
        """A new commit on main (same files): what a push to the repo looks like to a reader."""
        self.shas.append(self._commit_sha(message))
        return self.sha

    def drop_next(self, name: str, after_bytes: int) -> None:
        with self.lock:
            self.faults.append(("drop", name, after_bytes))

    def fail_next(self, name: str, status: int = 503) -> None:
        with self.lock:
            self.faults.append(("status", name, status))

    def close(self) -> None:
        for server in (self.server, self.cdn):
            server.shutdown()
            server.server_close()

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())

    def _commit_sha(self, salt: str) -> str:
        listing = json.dumps([(f, (self.folder / f).stat().st_size) for f in self.files()])
        return hashlib.sha1((listing + salt).encode()).hexdigest()

    def _take_fault(self, name: str) -> tuple[str, int] | None:
        with self.lock:
            for fault in self.faults:
                if fault[1] == name or name.endswith("/" + fault[1]):
                    self.faults.remove(fault)
                    return fault[0], fault[2]
        return None


def _handler(hub: StandInHub):
    class Handler(http.Handler):
        def record(self, method: str, status: int) -> None:
            hub.requests.append((method, self.path, self.headers.get("Range"), status))

        def _error(self, status: int, code: str | None, message: str, method: str = "GET") -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json({"error": message}, status, headers, method)

        # -- checks ---------------------------------------------------------------------------
        def _split(self) -> tuple[str, list[str]]:
            parsed = urlparse(self.path)
            return parsed.query, [unquote(p) for p in parsed.path.strip("/").split("/")]

        def _repo_ok(self, repo: str, method: str) -> bool:
            if repo != hub.repo_id:
                self._error(404 if self._token() else 401, "RepoNotFound", "Repository not found", method)
                return False
            return True

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

        def _token_ok(self, method: str) -> bool:
            if self._token() is not None and self._token() not in hub.tokens:
                self._error(401, None, "Invalid credentials in Authorization header", method)
                return False
            return True

        def _access_ok(self, method: str) -> bool:
            """The gate, as the Hub answers for a gated repo."""
            token = self._token()
            if not self._token_ok(method):
                return False
            if not hub.gated:
                return True
            if token is None:
                self._error(401, "GatedRepo", f"Access to dataset {hub.repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it. Please log in.", method)
                return False
            if not hub.tokens[token]:
                self._error(403, "GatedRepo", f"Access to dataset {hub.repo_id} is restricted and you are not in the "
                            f"authorized list. Visit {hub.url}/datasets/{hub.repo_id} to ask for access.", method)
                return False
            return True

        def _revision(self, revision: str, method: str) -> str | None:
            if revision == "main":
                return hub.sha
            if revision in hub.shas:
                return revision
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", method)
            return None

        # -- routes ---------------------------------------------------------------------------
        def _route(self, method: str) -> None:
            query, parts = self._split()
            if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                repo, rest = "/".join(parts[2:4]), parts[4:]
                if not self._repo_ok(repo, method):
                    return
                if not rest or rest[0] == "revision":
                    return self._token_ok(method) and self._info(rest[1] if len(rest) > 1 else "main", method)
                if rest[0] == "auth-check":
                    return self._access_ok(method) and self._json({"ok": True}, method=method)
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._access_ok(method) and self._tree(rest[1], "/".join(rest[2:]), query, method)
                if rest[0] == "paths-info" and len(rest) >= 2 and method == "POST":
                    return self._access_ok(method) and self._paths_info(rest[1])
            if parts[:1] == ["cdn"] and len(parts) >= 3 and "signature=" in query:
                return self._blob(parts[1], "/".join(parts[2:]), method)
            if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                repo = "/".join(parts[1:3])
                if self._repo_ok(repo, method) and self._access_ok(method):
                    return self._resolve(parts[4], "/".join(parts[5:]), method)
                return
            self._error(404, None, "Not found", method)

        def _info(self, revision: str, method: str) -> None:
            sha = self._revision(revision, method)
            if sha is not None:
                self._json({"id": hub.repo_id, "sha": sha, "private": False, "gated": "manual" if hub.gated else False,
                            "siblings": [{"rfilename": f} for f in hub.files()]}, method=method)

        def _entry(self, path: str) -> dict:
            full = hub.folder / path
            if full.is_dir():
                return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
            data_oid = hashlib.sha1(f"{path}:{full.stat().st_size}".encode()).hexdigest()
            return {"type": "file", "oid": data_oid, "size": full.stat().st_size, "path": path,
                    "lfs": {"oid": hashlib.sha256(data_oid.encode()).hexdigest(), "size": full.stat().st_size,
                            "pointerSize": 134}}

        def _tree(self, revision: str, path: str, query: str, method: str) -> None:
            if self._revision(revision, method) is None:
                return
            folder = hub.folder / path
            if not folder.is_dir():
                return self._error(404, "EntryNotFound", f"{path} does not exist", method)
            recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
            found = folder.rglob("*") if recursive else folder.iterdir()
            entries = sorted(str(p.relative_to(hub.folder)) for p in found)
            start = int(parse_qs(query).get("cursor", ["0"])[0])
            page = [self._entry(e) for e in entries[start:start + PAGE]]
            headers = {}
            if start + PAGE < len(entries):
                base = self.path.split("?")[0]
                headers["Link"] = (
                    f'<{hub.url}{base}?recursive={str(recursive).lower()}&cursor={start + PAGE}>; rel="next"'
                )
            self._json(page, headers=headers, method=method)

        def _paths_info(self, revision: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            if self._revision(revision, "POST") is None:
                return
            paths = [p for p in form.get("paths", []) if (hub.folder / p).exists()]
            self._json([self._entry(p) for p in paths], method="POST")

        def _resolve(self, revision: str, path: str, method: str) -> None:
            """As the Hub does for LFS/Xet files: 302 to the CDN, with the file's size, ETag and commit."""
            sha = self._revision(revision, method)
            if sha is None:
                return
            full = hub.folder / path
            if not full.is_file():
                return self._error(404, "EntryNotFound", f"{path} does not exist at {sha}", method)
            etag = f'"{self._entry(path)["lfs"]["oid"]}"'
            self._reply(302, headers={"Location": f"{hub.cdn_url}/cdn/{sha}/{path}?expires=3600&signature=s",
                                      "X-Repo-Commit": sha, "X-Linked-Size": str(full.stat().st_size),
                                      "X-Linked-Etag": etag, "ETag": etag}, method=method)

        def _blob(self, sha: str, path: str, method: str) -> None:
            full = hub.folder / path
            if sha not in hub.shas or not full.is_file():
                return self._error(404, None, "Not found", method)
            size = full.stat().st_size
            start, end = 0, size - 1
            wanted = self.headers.get("Range")
            if wanted:
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
                if start >= size:
                    return self._reply(416, headers={"Content-Range": f"bytes */{size}"}, method=method)
            time.sleep(hub.delay_s)
            fault = hub._take_fault(path) if method == "GET" else None
            if fault and fault[0] == "status":
                return self._error(fault[1], None, "Service unavailable", method)
            status = 206 if wanted else 200
            self.send_response(status)
            headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                       "Content-Length": str(end - start + 1)}
            if wanted:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            hub.requests.append((method, self.path, wanted, status))
            if method == "HEAD":
                return
            with open(full, "rb") as f:
                f.seek(start)
                left = end - start + 1
                if fault and fault[0] == "drop":
                    self.wfile.write(f.read(min(fault[1], left)))
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-body: the client sees a short read
                    return
                while left > 0:
                    block = f.read(min(left, 1 << 20))
                    self.wfile.write(block)
                    left -= len(block)

    return Handler


def serve(folder: str, repo_id: str, gated: bool) -> None:
    """`python -m standins.hub FOLDER`: serve it until interrupted (prints HF_ENDPOINT)."""
    hub = StandInHub(folder, repo_id, gated)
    print(f"HF_ENDPOINT={hub.url} (repo {repo_id}, commit {hub.sha}; token hf_accepted)", flush=True)
    try:
        hub.thread.join()
    except KeyboardInterrupt:
        hub.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--repo", default="ILSVRC/imagenet-1k")
    parser.add_argument("--public", action="store_true", help="not gated")
    args = parser.parse_args()
    serve(os.path.abspath(args.folder), args.repo, not args.public)
