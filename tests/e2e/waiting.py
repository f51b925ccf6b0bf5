"""Polling helper shared by the end-to-end tests."""

import time


def wait_for(cond, timeout, what):
    """cond()'s first truthy value within `timeout` seconds, else fail."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
