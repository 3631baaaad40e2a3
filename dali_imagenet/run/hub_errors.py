"""What a call to the Hugging Face Hub failed on, in one line and whole (the Hub's own words and
the fix they name are never cut): offline mode, the network (or HF_ENDPOINT), the token, the
name (a repo, a revision, a file), the size (a storage limit), or whatever else the Hub said.
Used by reading `hf://` models (`published.py`) and by publishing (`sharing/hub.py`)."""
from __future__ import annotations

import os

# Transport failures of the HTTP clients huggingface_hub has used (httpx, httpx2, requests) and
# of the standard library: none of them reached the Hub.
NETWORK_ERRORS = ("TransportError", "ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError",
                  "ConnectionError", "Timeout", "TimeoutError", "ProxyError", "SSLError")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def describe(error: BaseException, target: str) -> str:
    """`target`: what was asked for ("alice/tiny", "hf://alice/tiny@abc1234"), named first."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    for cause in _causes(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return f"{target}: offline mode: {one_line(cause)}"
        if isinstance(cause, LocalTokenNotFoundError):
            return f"{target}: no Hugging Face token: set HF_TOKEN or log in with `hf auth login`"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            return _http(cause, target)
        if any(kind.__name__ in NETWORK_ERRORS for kind in type(cause).__mro__):
            return (f"{target}: cannot reach the Hub at {endpoint()} (the network: {type(cause).__name__}: "
                    f"{one_line(cause)}); check the connection, a proxy, or HF_ENDPOINT")
    return f"{target}: {one_line(error)}"


def _http(error, target: str) -> str:
    status = error.response.status_code
    code = error.response.headers.get("X-Error-Code", "")
    said = f"{status}: {one_line(error)}"
    if code == "RevisionNotFound":
        return f"{target}: no such revision ({said})"
    if code == "EntryNotFound":
        return f"{target}: no such file in the repo ({said})"
    if code in ("RepoNotFound", "GatedRepo") or status == 404:
        return f"{target}: no such repo, or a private or gated one this token cannot see ({said})"
    if status == 401:
        return f"{target}: the Hub refused the token ({said}); check HF_TOKEN or `hf auth login`"
    if status in (402, 403, 413) and any(word in str(error).lower() for word in ("storage", "too large", "size",
                                                                                  "quota", "exceed")):
        return f"{target}: too large for what the Hub allows this account ({said})"
    if status == 403:
        return (f"{target}: the token may not do this ({said}); a write token of the repo's owner or of its "
                f"organisation can")
    if status == 409:
        return f"{target}: the name is taken ({said})"
    return f"{target}: the Hub answered {said}"
