"""The EC2 spot interruption notice, from the instance metadata service (IMDSv2).

EC2 announces a spot reclaim about two minutes ahead through IMDS, not with a signal (the OS
gets SIGTERM only at the very end): `PUT /latest/api/token` gives a session token (with a TTL;
refreshed before it runs out), then `GET /latest/meta-data/spot/instance-action` answers 404
until a notice exists, 200 with `{"action": ..., "time": ...}` after. `SpotWatcher` polls it every
few seconds in a background thread and, on a notice, asks the run to stop exactly as SIGTERM
does: at the next step or batch, with a checkpoint in S3, exit code 75 (`exits.RECLAIM`: relaunch). It also logs
a rebalance recommendation (`events/recommendations/rebalance`), an earlier, softer hint.

The endpoint is botocore's: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else the link-local address;
`AWS_EC2_METADATA_DISABLED=true` turns it off. Off the cloud, `--spot auto` costs one token
request that fails within `PROBE_TIMEOUT_S`. Only IMDSv2: a request without a token is refused.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.error
import urllib.request

from dali_imagenet.errors import UsageError

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_S = 21600  # the largest IMDS allows: 6 hours
PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 5.0  # EC2's notice comes ~120 s ahead: a check every 5 s leaves ~115 s
NOTICE = "spot interruption notice"


def endpoint() -> str | None:
    """Where IMDS is, or None when it is turned off."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        return None
    return os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


class IMDS:
    """A small IMDSv2 client: a session token, refreshed a minute before it expires (or on 401)."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        self.url = url
        self.timeout_s = timeout_s
        self._token = None
        self._expires = 0.0

    def token(self, force: bool = False) -> str:
        if force or self._token is None or time.monotonic() > self._expires - 60:
            request = urllib.request.Request(f"{self.url}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                self._token = response.read().decode()
            self._expires = time.monotonic() + TOKEN_TTL_S
        return self._token

    def get(self, path: str, tree: str = "meta-data") -> tuple[int, str]:
        """(HTTP status, body) of `/latest/<tree>/<path>`; 404 is an answer, not an error."""
        for attempt in (0, 1):
            request = urllib.request.Request(f"{self.url}/latest/{tree}/{path}",
                                             headers={"X-aws-ec2-metadata-token": self.token(force=attempt > 0)})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                if error.code == 401 and attempt == 0:  # the token expired or IMDS restarted: a new one
                    continue
                return error.code, ""
        return 401, ""

    def instance(self) -> dict:
        """The instance type, lifecycle ("spot" or "on-demand"), region and zone for the run's machine
        record (the region prices data moved from a bucket elsewhere; type and zone, the spot price),
        its id, and `pending_time`: when EC2 launched it (Unix time; billing starts about then)."""
        info = {}
        for key, path in (("instance_type", "instance-type"), ("lifecycle", "instance-life-cycle"),
                          ("region", "placement/region"), ("zone", "placement/availability-zone")):
            status, body = self.get(path)
            if status == 200:
                info[key] = body.strip()
        status, body = self.get("instance-identity/document", tree="dynamic")
        document = _json_or_text(body) if status == 200 else None
        document = document if isinstance(document, dict) else {}
        if isinstance(document.get("instanceId"), str):
            info["instance_id"] = document["instanceId"]
        if isinstance(document.get("pendingTime"), str) and (when := _unix(document["pendingTime"])) is not None:
            info["pending_time"] = when
        return info


def probe(url: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> IMDS | None:
    """An IMDS client if IMDS at `url` hands out a token within `timeout_s`, else None."""
    if url is None:
        return None
    imds = IMDS(url, timeout_s)
    try:
        imds.token()
    except Exception:  # noqa: BLE001 - nothing that answers like IMDS (http.client's errors included)
        return None
    imds.timeout_s = 2.0
    return imds


def connect(mode: str) -> tuple[IMDS | None, str]:
    """`--spot`: "off" -> None; "auto" -> a client when IMDS answers; "on" -> one, or UsageError.
    With the client, one line that says whether the notice is watched, and if not, why."""
    if mode == "off":
        return None, "spot notice: not watched (--spot off)"
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true" and mode == "auto":
        return None, "spot notice: not watched (AWS_EC2_METADATA_DISABLED=true; --spot on to insist)"
    imds = probe(endpoint())
    if mode == "on" and imds is None:
        raise UsageError(f"--spot on, but no instance metadata service answers at {endpoint()}")
    if imds is None:
        return None, (f"spot notice: not watched: no instance metadata service answered at {endpoint()} within "
                      f"{PROBE_TIMEOUT_S:g} s (not on EC2?; --spot on makes that an error)")
    return imds, f"spot notice: watched at {endpoint()}"


class SpotWatcher:
    """Polls IMDS in a daemon thread; `ask(reason)` is called once on a notice (a StopRequest's).
    A poll that fails in any way (no answer, a malformed reply) is logged once, and polling goes
    on: one bad answer must not blind the run to the notice that follows."""

    def __init__(self, imds: IMDS, ask, log=print, interval_s: float = POLL_INTERVAL_S):
        self.imds = imds
        self._ask = ask
        self.log = log  # may be replaced once the run's log exists
        self._interval = interval_s
        self._stop = threading.Event()
        self.notice: dict | str | None = None
        self.noticed_at: float | None = None  # time.time() when the notice was seen
        self.failed_polls = 0  # in a row
        self._rebalance_seen = False
        self._thread = threading.Thread(target=self._run, name="spot-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._poll():
                    return
                if self.failed_polls:
                    self.log(f"spot watcher: IMDS answers again after {self.failed_polls} failed poll(s)")
                self.failed_polls = 0
            except Exception as error:  # noqa: BLE001 - any failure (http.client's too): log it, poll on
                if not self.failed_polls:
                    self.log(f"spot watcher: IMDS poll failed ({type(error).__name__}: {error}); polling on")
                self.failed_polls += 1
            self._stop.wait(self._interval)

    def _poll(self) -> bool:
        """One look at IMDS; True once the notice was seen and passed on."""
        status, body = self.imds.get("spot/instance-action")
        if status == 200:
            self.notice = _json_or_text(body)
            self.noticed_at = time.time()
            self._ask(NOTICE)  # first: a log that fails must not keep the run from hearing it
            try:
                self.log(f"EC2 {NOTICE}: {body.strip()}")
            except Exception:  # noqa: BLE001 - the notice is passed on; its log line is not worth dying for
                pass
            return True
        if not self._rebalance_seen:
            status, body = self.imds.get("events/recommendations/rebalance")
            if status == 200:
                self._rebalance_seen = True
                self.log(f"EC2 rebalance recommendation: {body.strip()} (a reclaim may follow)")
        return False

    def timing(self, now: float | None = None) -> dict:
        """For the run's closing record: when the notice came, when EC2 said it reclaims the
        instance, and how long ago the notice was (seconds); empty without a notice."""
        if self.noticed_at is None:
            return {}
        now = time.time() if now is None else now
        info = {"noticed_at": _iso(self.noticed_at), "since_notice_s": round(now - self.noticed_at, 2)}
        reclaim = reclaim_time(self.notice)
        if reclaim is not None:
            info.update(reclaim_at=_iso(reclaim), notice_to_reclaim_s=round(reclaim - self.noticed_at, 1))
        return info

    def close(self) -> None:
        """Stops polling and waits for the thread (one IMDS timeout at most)."""
        self._stop.set()
        self._thread.join(timeout=self.imds.timeout_s + 1)


def reclaim_time(notice) -> float | None:
    """EC2's reclaim time (`{"action": ..., "time": "2026-12-01T12:00:00Z"}`) as a Unix time, or None."""
    if not isinstance(notice, dict) or not isinstance(notice.get("time"), str):
        return None
    return _unix(notice["time"])


def _unix(stamp: str) -> float | None:
    """EC2's "2026-12-01T12:00:00Z" as a Unix time, or None."""
    try:
        return utc_seconds(stamp)
    except ValueError:
        return None


def utc_seconds(stamp: str) -> float:
    """A UTC stamp ("2026-12-01T12:00:00Z", any number of fraction digits) as a Unix time; parsed by
    hand: Python 3.10's `fromisoformat` takes only 3 or 6 fraction digits, and no "Z"."""
    whole, _, fraction = stamp.removesuffix("Z").removesuffix("+00:00").partition(".")
    start = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return start.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _iso(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _json_or_text(body: str):
    try:
        return json.loads(body)
    except ValueError:
        return body
