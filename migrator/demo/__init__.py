"""`migrator demo`: a live migration of a container between two local nodes.

Two nodes (Debian 13 roots in their own namespaces, built by the set-up
command; see tests/beds) share one layer-2 segment (a bridge in each,
joined by a veth pair).  A runc container on node A runs server.py, a TCP
service that churns its memory; a client on node A's side of the bridge
keeps one connection to it, asking every 20 ms.  The container moves to
node B with `migrator send` / `migrator recv`, keeping its address; at the
end a table shows the rounds, the pages and bytes sent, the downtime and
whether the client's connection survived.

The nodes come from the source tree's test beds, so the demo runs from a
checkout after scripts/setup, as root.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Callable

NAME = "demo"
ADDRESS = "198.18.5.10"
CLIENT_ADDRESS = "198.18.5.1"
PORT = 8080
RECV_PORT = 7000
BUNDLE = "/var/lib/migrator-demo/bundle"


class DemoError(RuntimeError):
    pass


def _beds():
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / "tests" / "beds" / "nodes.py").exists():
        raise DemoError("migrator demo needs the source checkout's test beds "
                        "(run it from the repository, after scripts/setup)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests.beds import image, net, nodes
    return image, net, nodes


def _wait(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise DemoError(f"timed out waiting for {what}")


def _read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def run(out: Callable[[str], None] = print, mib: int = 64,
        churn: int = 2000, bandwidth: float | None = None) -> dict:
    image, net, nodes = _beds()
    out("building or reusing the node image ...")
    image.ensure_image()
    with nodes.cluster(2) as (a, b):
        out(f"nodes up: a ({a.addr}), b ({b.addr}); joining their bridges")
        net.bridge_segment(a, b)
        a.run(f"ip addr add {CLIENT_ADDRESS}/24 dev brmig")
        network = f"{ADDRESS}/24@brmig"
        for n in (a, b):
            n.run(["python3", "-m", "migrator.demo.bundle", BUNDLE, "--name",
                   NAME, "--network", network, "--", "python3",
                   "/app/server.py", str(PORT), str(mib), str(churn)])
        a.run(["ip", "netns", "add", NAME])
        a.run(["python3", "-c",
               "from migrator.network import cutover as c; "
               f"c.attach('/run/netns/{NAME}', '{ADDRESS}/24', 'brmig', "
               f"host_if=c.host_ifname('{NAME}'), mac=c.container_mac('{NAME}'))"])
        a.run(f"runc run -d --bundle {BUNDLE} {NAME} </dev/null >/dev/null 2>&1")
        out(f"container {NAME} runs on a: {mib} MiB, {churn} pages/s rewritten, "
            f"serving {ADDRESS}:{PORT}")
        probe = ("import socket,sys; socket.create_connection(("
                 f"'{ADDRESS}', {PORT}), timeout=1).close()")
        _wait(lambda: a.run(["python3", "-c", probe], check=False).returncode == 0,
              60, "the service to listen")
        client_log = a.dir / "demo-client.log"
        client = a.spawn(["python3", "/src/migrator/demo/client.py", ADDRESS,
                          str(PORT), "0.02"], log=str(client_log))
        time.sleep(1.0)
        recv_log = b.dir / "demo-recv.log"
        recv = b.spawn(["python3", "-m", "migrator", "recv", "--listen",
                        f"{b.addr}:{RECV_PORT}", "--dir", "/var/tmp/migrator",
                        "--insecure", "--once", "--json"], log=str(recv_log))
        _wait(lambda: "listening" in _read(recv_log), 30, "the receiver")
        out(f"migrating {NAME} from a to b ...")
        send_log = a.dir / "demo-send.log"
        extra = ["--bandwidth", str(bandwidth)] if bandwidth else []
        sender = a.spawn(["env", f"MIGRATOR_LOG={os.environ.get('MIGRATOR_LOG', 'INFO')}",
                          "python3", "-m", "migrator", "send", NAME, "--to",
                          f"{b.addr}:{RECV_PORT}", "--insecure", "--json",
                          *extra], log=str(send_log))
        events = _follow(sender, send_log, out)
        recv.wait(timeout=60)
        time.sleep(1.0)  # let the client talk to the moved service a while
        client.stop()
        verdict = _last_json(_read(client_log))
        where = b.run(["runc", "list", "-q"], check=False).stdout.split()
        left = a.run(["runc", "list", "-q"], check=False).stdout.split()
        done = events[-1] if events else {}
        if done.get("event") != "done":
            raise DemoError(f"migration failed: {done.get('message', done)}")
        summary = {"migration": done, "rounds": [e for e in events
                                                 if e.get("event") == "round"],
                   "client": verdict, "running_on_b": NAME in where,
                   "left_on_a": NAME in left}
        _table(summary, out)
        b.run(["runc", "kill", NAME, "KILL"], check=False)
        time.sleep(0.2)
        b.run(["runc", "delete", "-f", NAME], check=False)
        return summary


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _follow(svc, log, out) -> list[dict]:
    """Print the sender's events as they come; return them all."""
    seen, events = 0, []
    while True:
        alive = svc.running()
        lines = _read(log).splitlines()
        for line in lines[seen:]:
            try:
                ev = json.loads(line)
            except ValueError:
                if line.strip():
                    out(f"  | {line}")  # the sender's diagnostics (stderr)
                continue
            events.append(ev)
            if ev.get("event") == "round":
                out(f"  round {ev['round']}: {ev['dirty_pages']} pages, "
                    f"{ev['sent_bytes'] / 2**20:.1f} MiB sent, "
                    f"{(ev['bandwidth'] or 0) / 2**20:.0f} MiB/s")
            elif ev.get("event") == "switchover":
                out(f"  switch-over: {ev['reason']}")
        seen = len(lines)
        if not alive:
            return events
        time.sleep(0.1)


def _table(s: dict, out) -> None:
    d, c = s["migration"], s["client"]
    rows = [
        ("tracker", d.get("tracker")),
        ("pre-copy rounds", d.get("rounds")),
        ("pages per round", ", ".join(str(r["dirty_pages"]) for r in s["rounds"])),
        ("final delta pages", d.get("breakdown_ms", {}).get("delta_pages")),
        ("bytes sent", f"{d.get('sent_bytes', 0) / 2**20:.1f} MiB"),
        ("downtime", f"{d.get('downtime_ms')} ms"),
        ("total time", f"{d.get('total_ms')} ms"),
        ("running on b / left on a", f"{s['running_on_b']} / {s['left_on_a']}"),
        ("client connection survived", c.get("connection_survived")),
        ("client requests answered", c.get("answered")),
        ("client's longest wait", f"{c.get('longest_wait_ms')} ms"),
        ("memory checks failed", c.get("bad")),
    ]
    width = max(len(k) for k, _ in rows)
    out("")
    for k, v in rows:
        out(f"  {k:<{width}}  {v}")
    if c.get("error"):
        out(f"  client error: {c['error']}")


__all__ = ["run", "DemoError"]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
