"""Exponential backoff under a deadline: the one retry loop that S3 calls and Hub reads share."""
from __future__ import annotations

import time


def with_backoff(call, retry_on, timeout_s: float, first_wait_s: float = 1.0, max_wait_s: float = 30.0,
                 on_wait=None):
    """`call()`, called again after waits of `first_wait_s` s, doubling up to `max_wait_s`, while it
    raises an error that `retry_on(error)` accepts and the next wait still ends within `timeout_s`
    of the first call. The first error `retry_on` refuses, or the last one, is raised as it is, for
    the caller to word. `on_wait(error, wait_s)` is told of each wait (to log it)."""
    deadline = time.monotonic() + timeout_s
    wait = first_wait_s
    while True:
        try:
            return call()
        except Exception as error:  # which errors count is retry_on's to say
            if not retry_on(error) or time.monotonic() + wait > deadline:
                raise
            if on_wait is not None:
                on_wait(error, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
