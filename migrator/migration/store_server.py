"""The page stores served to CRIU's lazy-pages daemon, as a process of its own.

    python3 -m migrator.migration.store_server STATE FD CRIU_VERSION

STATE is a msgpack file {checkpoint pid: PageStore.state()}; FD is our end
of the socket whose other end the daemon holds (--ps-socket).  The
receiver starts this in a session of its own beside the daemon, so that
neither depends on the receiver once the tree has resumed: if the
receiver is stopped (Ctrl-C, SIGKILL) while the daemon is still filling
the tree's memory, the pages keep coming, instead of the daemon losing
its source and the tree reading zeroes where its pages were.  Exit status
0 once the daemon said CLOSE, 1 with the reason on stderr otherwise.
"""

from __future__ import annotations

import socket
import sys

import msgpack

from migrator.criu.page_server import PageServerError, StorePageServer
from migrator.migration.store import PageStore


def write_state(path: str, stores: dict[int, PageStore]) -> None:
    with open(path, "wb") as f:
        f.write(msgpack.packb({pid: s.state() for pid, s in stores.items()}))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    state_path, fd, version = argv[0], int(argv[1]), argv[2]
    sock = socket.socket(fileno=fd)
    with open(state_path, "rb") as f:
        state = msgpack.unpackb(f.read(), strict_map_key=False)
    stores = {pid: PageStore.open_state(st) for pid, st in state.items()}
    server = StorePageServer(stores, version)
    try:
        server.serve(sock)
    except PageServerError as e:
        print(f"store server: {e}", file=sys.stderr)
        return 1
    finally:
        sock.close()
        for s in stores.values():
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
