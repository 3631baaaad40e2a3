"""The Hugging Face Hub as a source: its parquet files read by byte range, with no local copy.

`hf://datasets/OWNER/NAME[@REVISION]` is resolved once to a commit sha, and every read after that
names the sha, so a push to the repo during a conversion cannot mix two versions of the data.
Files are read through `huggingface_hub.HfFileSystem` (fsspec): one HTTP range request per read,
nothing written to disk; pyarrow reads a file's footer, then one row group's column chunks.

The token and the endpoint come the Hub client's way: `HF_TOKEN` or `hf auth login`, and
`HF_ENDPOINT`. Network failures (a dropped connection, a timeout, 5xx, 429) are retried: the
client retries each request 5 times (~23 s of backoff); on top of that, each call here is retried
with backoff for up to `RETRY_S`, so an outage of a few minutes costs time, not the run.
"""
from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from dali_imagenet.errors import DaliImagenetError
from dali_imagenet.retry import with_backoff

RETRY_S = 600.0  # s a call may keep failing on network errors before the conversion gives up
FOOTER_THREADS = 16  # footers read at once when a repo is opened (one small range request each)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
PREFIX = "hf://"
log = logging.getLogger(__name__)


class HubError(DaliImagenetError):
    """The Hub refused or could not be reached; one line naming the URL and what to do."""


@dataclass(frozen=True)
class HubFile:
    path: str  # in the repo: data/train-00000-of-00294.parquet
    size: int  # bytes
    location: str  # hf://datasets/OWNER/NAME@SHA/PATH: what the readers open


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    revision: str  # as asked ("main" unless @REVISION)
    sha: str  # the commit it resolved to
    endpoint: str
    files: list[HubFile]  # the parquet files, sorted by path

    def describe(self) -> dict:
        """What the manifest records of the source."""
        return {"repo": self.repo_id, "revision": self.revision, "sha": self.sha, "endpoint": self.endpoint,
                "files": [{"path": f.path, "size": f.size} for f in self.files]}


def is_hub(source: str) -> bool:
    return str(source).startswith(PREFIX)


def parse(url: str) -> tuple[str, str]:
    """hf://datasets/OWNER/NAME[@REVISION] -> (OWNER/NAME, REVISION or "main")."""
    from huggingface_hub.utils import parse_hf_uri

    try:
        parsed = parse_hf_uri(url)
    except Exception as error:  # HfUriError / ValueError, depending on the client's version
        raise HubError(f"{url}: {error} (expected hf://datasets/OWNER/NAME[@REVISION])") from None
    if parsed.type != "dataset" or parsed.path_in_repo or getattr(parsed, "is_bucket", False):
        raise HubError(f"{url}: expected hf://datasets/OWNER/NAME[@REVISION], a dataset repo and no path inside it")
    return parsed.id, parsed.revision or "main"


def open_dataset(url: str) -> HubDataset:
    """Resolves the revision, checks access, lists the parquet files (under data/ if there is one)."""
    from huggingface_hub import HfApi, constants

    repo_id, revision = parse(url)
    api = HfApi()
    info = retrying(url, lambda: api.dataset_info(repo_id, revision=revision))
    # The Hub shows a gated repo's info to anyone; the files need a token and an accepted licence.
    retrying(url, lambda: api.auth_check(repo_id, repo_type="dataset"))
    entries = retrying(url, lambda: _list_parquet(api, repo_id, info.sha))
    files = [HubFile(e.path, e.size, f"{PREFIX}datasets/{repo_id}@{info.sha}/{e.path}") for e in entries]
    return HubDataset(repo_id, revision, info.sha, constants.ENDPOINT, sorted(files, key=lambda f: f.path))


def _list_parquet(api, repo_id: str, sha: str) -> list:
    from huggingface_hub.errors import RemoteEntryNotFoundError

    def parquet_in(folder: str | None) -> list:
        return [e for e in api.list_repo_tree(repo_id, folder, revision=sha, repo_type="dataset")
                if getattr(e, "size", None) is not None and e.path.endswith(".parquet")]

    try:
        found = parquet_in("data")
    except RemoteEntryNotFoundError:
        found = []
    return found or parquet_in(None)  # as locally: data/*.parquet, else the top folder's


def read_footers(locations: list[str]) -> list[pq.FileMetaData]:
    """Each file's footer (schema, row groups), FOOTER_THREADS at a time, through one client: the
    first read makes its repo check and listing, which the others then share."""
    from huggingface_hub import HfFileSystem

    filesystem = HfFileSystem()
    footers = [footer(location, filesystem) for location in locations[:1]]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return footers + list(pool.map(lambda location: footer(location, filesystem), locations[1:]))


_footers: dict[str, pq.FileMetaData] = {}  # a worker reads many row groups of each file: its footer once


def remember_footers(footers: dict[str, pq.FileMetaData]) -> None:
    """Footers the planner read, handed to a worker: it then reads none again (each is one
    `resolve` request, and the Hub limits those)."""
    _footers.update(footers)


def footer(location: str, filesystem=None) -> pq.FileMetaData:
    if location not in _footers:
        def read() -> pq.FileMetaData:
            with _open(location, filesystem) as file:
                return pq.ParquetFile(file).metadata

        _footers[location] = retrying(location, read, what="not a readable parquet file")
    return _footers[location]


def read_row_group(location: str, group: int, columns: list[str]) -> tuple[pa.Table, int]:
    """One row group (~10 MB in the Hub's ImageNet files) and the bytes fetched for it."""
    def read() -> tuple[pa.Table, int]:
        with _open(location) as file:
            fetched = _count_fetches(file)
            table = pq.ParquetFile(file, metadata=footer(location)).read_row_group(group, columns=columns)
            return table, fetched[0]

    return retrying(location, read, what=f"row group {group} unreadable")


def _open(location: str, filesystem=None):
    from huggingface_hub import HfFileSystem

    # cache_type "none": one range request per read, exactly the bytes pyarrow asks for (the default
    # read-ahead would fetch 5 MB past each column chunk).
    return (filesystem or HfFileSystem()).open(location, "rb", cache_type="none")


def _count_fetches(file) -> list[int]:
    """Counts the bytes of every range the file fetches over HTTP (fsspec's caches call
    `fetcher(start, end)` for each one)."""
    count = [0]
    fetch = file.cache.fetcher

    def counted(start: int, end: int) -> bytes:
        data = fetch(start, end)
        count[0] += len(data)
        return data

    file.cache.fetcher = counted
    return count


def retrying(url: str, call, what: str | None = None, timeout_s: float | None = None):
    """`call()`, retried with exponential backoff while it fails on the network, for up to
    `timeout_s` (RETRY_S); any other failure, or the last, becomes one HubError line."""
    timeout_s = RETRY_S if timeout_s is None else timeout_s

    def waiting(error: Exception, wait_s: float) -> None:
        log.warning("%s: %s; retrying in %g s", url, _reason(error), wait_s)

    try:
        return with_backoff(call, is_transient, timeout_s, first_wait_s=2.0, max_wait_s=60.0, on_wait=waiting)
    except Exception as error:  # httpx, huggingface_hub and pyarrow errors: sorted by `explain`
        if is_transient(error):
            raise HubError(f"{url}: cannot read from the Hub: {_reason(error)} (retried for {timeout_s:g} s)") from None
        raise HubError(explain(error, url, what)) from None


def is_transient(error: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):  # a ConnectionError that no wait will cure
        return False
    if isinstance(error, (httpx2.TransportError, TimeoutError, ConnectionError)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(error, HfHubHTTPError) and status in TRANSIENT_STATUS


def explain(error: Exception, url: str, what: str | None = None) -> str:
    """The one line a user needs: which of token, licence, name or revision is wrong, and the fix."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = _repo_of(url)
    page = f"{constants.ENDPOINT}/datasets/{repo_id}"
    has_token = get_token() is not None
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return f"{url}: HF_HUB_OFFLINE is set, so the Hub cannot be read: unset it, or give a local copy"
    if isinstance(error, GatedRepoError):
        if not has_token:
            return (f"{url}: a gated dataset and no Hugging Face token was found: accept its licence at {page}, "
                    "then set HF_TOKEN or run `hf auth login`")
        return (f"{url}: your Hugging Face token has no access to this gated dataset: accept its licence at {page} "
                "with the account the token belongs to")
    if isinstance(error, RevisionNotFoundError):
        return f"{url}: the dataset has no revision {_revision_of(url)!r} (a branch, tag or commit sha)"
    if isinstance(error, RepositoryNotFoundError):
        hidden = "no token was given" if not has_token else "your token cannot see it"
        return f"{url}: no dataset {repo_id} on {constants.ENDPOINT} (or it is private and {hidden})"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{url}: not in the repo at this commit"
    if isinstance(error, HfHubHTTPError) and status == 401:
        return (f"{url}: the Hub refused the Hugging Face token (401 invalid credentials): make a new one at "
                f"{constants.ENDPOINT}/settings/tokens, then set HF_TOKEN or run `hf auth login`")
    if isinstance(error, HfHubHTTPError):
        return f"{url}: the Hub answered {status}: {_reason(error)}"
    return f"{url}: {what or 'failed'} ({_reason(error)})"


def _repo_of(url: str) -> str:
    match = re.match(rf"{PREFIX}datasets/([^/@]+/[^/@]+)", url)
    return match.group(1) if match else url


def _revision_of(url: str) -> str:
    match = re.match(rf"{PREFIX}datasets/[^/@]+/[^/@]+@([^/]+)", url)
    return match.group(1) if match else "main"


def _reason(error: Exception, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit] or type(error).__name__

