"""Measure TCP throughput between two test-bed nodes.

    python3 tcp_rate.py recv ADDR PORT         # prints one JSON line at the end
    python3 tcp_rate.py send ADDR PORT SECONDS

The receiver computes goodput (payload bytes) over the transfer, skipping
the first 0.5 s so TCP's slow start does not pull the figure down.
Standard library only; bounded in time on both sides.
"""

import json
import socket
import sys
import time

CHUNK = 256 * 1024
WARMUP = 0.5


def recv(addr: str, port: int) -> int:
    with socket.create_server((addr, port)) as srv:
        srv.settimeout(30)
        conn, _ = srv.accept()
        conn.settimeout(30)
        with conn:
            total = 0
            first = None
            mark_t = mark_b = None
            last_t = None
            while True:
                data = conn.recv(CHUNK)
                now = time.monotonic()
                if not data:
                    break
                if first is None:
                    first = now
                total += len(data)
                last_t = now
                if mark_t is None and now - first >= WARMUP:
                    mark_t, mark_b = now, total
    if mark_t is None or last_t <= mark_t:
        print(json.dumps({"error": "transfer too short", "bytes": total}))
        return 1
    mbit = (total - mark_b) * 8 / (last_t - mark_t) / 1e6
    print(json.dumps({"mbit_s": round(mbit, 2), "bytes": total,
                      "seconds": round(last_t - mark_t, 3)}), flush=True)
    return 0


def send(addr: str, port: int, seconds: float) -> int:
    buf = b"\xa5" * CHUNK
    deadline = time.monotonic() + 10
    while True:  # the receiver may still be starting
        try:
            sock = socket.create_connection((addr, port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with sock:
        sock.settimeout(30)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(buf)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the receiver to finish reading
    return 0


if __name__ == "__main__":
    mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "recv":
        sys.exit(recv(addr, port))
    sys.exit(send(addr, port, float(sys.argv[4])))
