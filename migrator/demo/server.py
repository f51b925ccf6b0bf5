"""The demo's containerised service: a TCP server that churns its memory.

It keeps BUF_MIB of pages whose content is a function of (page, generation)
and a table of generations, rewrites PAGES_PER_S pages per second in a
thread, and answers each request line "ping SEQ" with
"pong SEQ TICK ok|BAD" after checking a few pages against the table: a
migration that lost or mixed pages shows up as BAD in the client's log.

    python3 server.py PORT BUF_MIB PAGES_PER_S
"""

import random
import socket
import sys
import threading
import time

PAGE = 4096


def pattern(page: int, gen: int) -> bytes:
    word = ((page * 2654435761 + gen * 40503) & 0xFFFFFFFF).to_bytes(4, "little")
    return word * (PAGE // 4)


class Memory:
    def __init__(self, mib: int):
        self.pages = mib * 256
        self.buf = bytearray(self.pages * PAGE)
        self.gen = [0] * self.pages
        self.lock = threading.Lock()
        self.tick = 0
        for p in range(self.pages):
            self.buf[p * PAGE:(p + 1) * PAGE] = pattern(p, 0)

    def churn(self, per_s: int) -> None:
        rnd = random.Random(1)
        while True:
            with self.lock:
                self.tick += 1
                for _ in range(max(1, per_s // 50)):
                    p = rnd.randrange(self.pages)
                    self.gen[p] += 1
                    self.buf[p * PAGE:(p + 1) * PAGE] = pattern(p, self.gen[p])
            time.sleep(0.02)

    def check(self, n: int = 16) -> bool:
        rnd = random.Random()
        with self.lock:
            for _ in range(n):
                p = rnd.randrange(self.pages)
                if self.buf[p * PAGE:(p + 1) * PAGE] != pattern(p, self.gen[p]):
                    return False
        return True


def serve(conn: socket.socket, mem: Memory) -> None:
    f = conn.makefile("rwb", buffering=0)
    for line in f:
        parts = line.split()
        if len(parts) != 2 or parts[0] != b"ping":
            break
        ok = b"ok" if mem.check() else b"BAD"
        f.write(b"pong %s %d %s\n" % (parts[1], mem.tick, ok))
    conn.close()


def main() -> None:
    port, mib, per_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mem = Memory(mib)
    threading.Thread(target=mem.churn, args=(per_s,), daemon=True).start()
    srv = socket.create_server(("0.0.0.0", port))
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, mem), daemon=True).start()


if __name__ == "__main__":
    main()
