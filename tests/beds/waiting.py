"""Polling helper for everything that drives the test beds (tests and
benchmarks)."""

import time


def wait_for(cond, timeout, what, interval=0.1, error=AssertionError):
    """cond()'s first truthy value within `timeout` seconds, else raise
    `error`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise error(f"timed out after {timeout}s waiting for {what}")
