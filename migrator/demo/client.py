"""The demo's client: one TCP connection, a request every INTERVAL seconds.

Writes one JSON line at the end (on SIGTERM, or when the connection
breaks): requests answered, the longest wait for an answer (what the
client saw of the migration's pause), answers that reported a memory
check failure, and whether the one connection lasted throughout.

    python3 client.py HOST PORT INTERVAL_S
"""

import json
import signal
import socket
import sys
import time


def main() -> int:
    host, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sock = socket.create_connection((host, port), timeout=30)
    f = sock.makefile("rwb", buffering=0)
    answered, bad, longest, seq = 0, 0, 0.0, 0
    survived, error = True, ""
    try:
        while not stop:
            seq += 1
            t0 = time.monotonic()
            f.write(b"ping %d\n" % seq)
            line = f.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            longest = max(longest, time.monotonic() - t0)
            parts = line.split()
            if parts[:2] != [b"pong", str(seq).encode()]:
                raise ConnectionError(f"unexpected answer {line!r}")
            answered += 1
            bad += parts[3] != b"ok"
            time.sleep(interval)
    except (OSError, ConnectionError) as e:
        survived, error = False, str(e)
    print(json.dumps({"answered": answered, "bad": bad,
                      "longest_wait_ms": round(longest * 1000, 1),
                      "connection_survived": survived, "error": error}),
          flush=True)
    return 0 if survived and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
