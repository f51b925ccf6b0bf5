"""The demo's client: one TCP connection, a request every INTERVAL seconds.

Writes one JSON line at the end (on SIGTERM, or when the connection
breaks or stays silent for TIMEOUT seconds): requests answered, the
longest wait for an answer (what the client saw of the migration's
pause), answers that reported a memory check failure, and whether the one
connection lasted throughout.

    python3 client.py HOST PORT INTERVAL_S
"""

import json
import os
import signal
import socket
import sys
import time


TIMEOUT = 20.0


class Tally:
    def __init__(self):
        self.answered = self.bad = 0
        self.longest = 0.0
        self.waiting_since = None

    def report(self, survived: bool, error: str = "") -> int:
        longest = self.longest
        if self.waiting_since is not None:  # stopped while waiting
            longest = max(longest, time.monotonic() - self.waiting_since)
        print(json.dumps({"answered": self.answered, "bad": self.bad,
                          "longest_wait_ms": round(longest * 1000, 1),
                          "connection_survived": survived, "error": error}),
              flush=True)
        return 0 if survived and not self.bad else 1


def main() -> int:
    host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    t = Tally()
    # Report from the handler: the main loop may be blocked in a read.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(t.report(True)))
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    f = sock.makefile("rwb", buffering=0)
    seq = 0
    try:
        while True:
            seq += 1
            t.waiting_since = time.monotonic()
            f.write(b"ping %d\n" % seq)
            line = f.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            t.longest = max(t.longest, time.monotonic() - t.waiting_since)
            t.waiting_since = None
            parts = line.split()
            if parts[:2] != [b"pong", str(seq).encode()]:
                raise ConnectionError(f"unexpected answer {line!r}")
            t.answered += 1
            t.bad += parts[3] != b"ok"
            time.sleep(interval)
    except (OSError, ConnectionError) as e:
        return t.report(False, str(e) or type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
