"""Links between test-bed nodes: veth pairs (pyroute2) and tc shaping.

Addresses come from the benchmarking range 198.18.0.0/15, one /24 per link
(198.18.<k>.1 and .2).  Both ends of every pair live inside node network
namespaces and no route for the range is ever added on the host, so test
traffic cannot leave the nodes.  The links die with the nodes' network
namespaces; a veth left on the host by a crash between "create" and "move"
is recorded by the run and removed by teardown / cleanup_stale().
"""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass
from typing import Optional

from pyroute2 import IPRoute

from .nodes import Node

_subnets = itertools.count(1)
_subnet_lock = threading.Lock()
_names = itertools.count()


@dataclass
class Link:
    a: Node
    b: Node
    a_ifname: str
    b_ifname: str
    a_addr: str
    b_addr: str
    prefixlen: int = 24


def _ipr(node: Node) -> IPRoute:
    # A path (not a name) so pyroute2 neither needs nor creates an entry in
    # /run/netns; flags=0: never create a namespace.
    return IPRoute(netns=node.netns_path, flags=0)


def _ifname_for(node: Node, peer: Node) -> str:
    name = f"v-{peer.name}"[:15]
    if name in node.ifnames.values():
        raise ValueError(f"{node.name} already has an interface {name}")
    return name


def _veth(a: Node, b: Node, a_if: str, b_if: str) -> None:
    """A veth pair with one end named a_if in node a, the other b_if in b."""
    # Host-side temporary names, unique per process, recorded before they
    # exist so a crash right after creation is still cleaned up.
    n = next(_names)
    tmp_a, tmp_b = f"mgb{os.getpid()}a{n}"[:15], f"mgb{os.getpid()}b{n}"[:15]
    a.run_state.record_link(tmp_a)
    with IPRoute() as host:
        host.link("add", ifname=tmp_a, kind="veth", peer=tmp_b)
        try:
            ia = host.link_lookup(ifname=tmp_a)[0]
            ib = host.link_lookup(ifname=tmp_b)[0]
            host.link("set", index=ib, net_ns_pid=b.init_pid)
            host.link("set", index=ia, net_ns_pid=a.init_pid)
        except BaseException:
            idx = host.link_lookup(ifname=tmp_a)
            if idx:
                host.link("del", index=idx[0])
            raise
    for node, tmp, ifname in ((a, tmp_a, a_if), (b, tmp_b, b_if)):
        with _ipr(node) as ipr:
            found = ipr.link_lookup(ifname=tmp)
            if not found:
                names = [l.get("ifname") for l in ipr.get_links()]
                raise RuntimeError(f"{tmp} did not arrive in {node.name} (has {names})")
            ipr.link("set", index=found[0], ifname=ifname)


def bridge_segment(a: Node, b: Node, bridge: str = "brmig") -> None:
    """One layer-2 segment across two nodes: a bridge named `bridge` in
    each (created if missing), joined by a veth pair enslaved to both.
    Containers attached to either bridge are neighbours, so an address can
    move with its container from one node to the other."""
    a_if, b_if = f"s-{b.name}"[:15], f"s-{a.name}"[:15]
    _veth(a, b, a_if, b_if)
    for node, ifname in ((a, a_if), (b, b_if)):
        with _ipr(node) as ipr:
            if not ipr.link_lookup(ifname=bridge):
                ipr.link("add", ifname=bridge, kind="bridge")
            br = ipr.link_lookup(ifname=bridge)[0]
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=br, state="up")


def connect(a: Node, b: Node, subnet: Optional[int] = None) -> Link:
    """Join two nodes with a veth pair on a fresh 198.18.<k>.0/24.

    Inside ``a`` the interface is ``v-<b.name>`` with 198.18.<k>.1, inside
    ``b`` it is ``v-<a.name>`` with .2.  Sets ``node.addr`` (first link
    only), ``node.addrs[peer]`` and ``node.peers[peer]``.
    """
    if subnet is None:
        with _subnet_lock:
            subnet = next(_subnets)
    # 198.18.0.0/15 is 198.18.0.0 - 198.19.255.255: 512 /24s.
    if not 0 <= subnet < 512:
        raise ValueError("out of 198.18.0.0/15 subnets")
    net = f"198.{18 + subnet // 256}.{subnet % 256}"
    a_addr, b_addr = f"{net}.1", f"{net}.2"
    a_if, b_if = _ifname_for(a, b), _ifname_for(b, a)

    _veth(a, b, a_if, b_if)
    for node, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        with _ipr(node) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=addr, prefixlen=24)
            ipr.link("set", index=idx, state="up")
    for node, peer, ifname, mine, theirs in ((a, b, a_if, a_addr, b_addr), (b, a, b_if, b_addr, a_addr)):
        node.ifnames[peer.name] = ifname
        node.addrs[peer.name] = mine
        node.peers[peer.name] = theirs
        if node.addr is None:
            node.addr = mine
    return Link(a, b, a_if, b_if, a_addr, b_addr)


def shape(node: Node, ifname: str, rate_mbit: Optional[float] = None,
          delay_ms: Optional[float] = None, loss_pct: Optional[float] = None,
          jitter_ms: Optional[float] = None) -> None:
    """Shape egress of ``ifname`` inside ``node``.

    Rate: tbf at the root.  Delay/loss: netem (under tbf when both are
    given, so packets are delayed and then paced).  Replaces any earlier
    shaping of that interface; all None removes it.  Shape both ends for a
    symmetric link.
    """
    with _ipr(node) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise ValueError(f"{node.name} has no interface {ifname}")
        idx = idx[0]
        try:
            ipr.tc("del", index=idx, handle="1:", parent=0xFFFFFFFF)
        except Exception:
            pass  # nothing there yet
        netem = {}
        if delay_ms:
            netem["delay"] = int(delay_ms * 1000)  # microseconds
            if jitter_ms:
                netem["jitter"] = int(jitter_ms * 1000)
        if loss_pct:
            netem["loss"] = loss_pct
        if rate_mbit:
            rate_bps = int(rate_mbit * 1_000_000)
            # Burst: at least one 4 ms tick of data (and a few full frames),
            # or tbf cannot reach its rate.
            burst = max(rate_bps // 8 // 250, 16 * 1514)
            ipr.tc("add", "tbf", index=idx, handle="1:", rate=f"{rate_bps}bit",
                   burst=burst, latency="50ms")
            if netem:
                ipr.tc("add", "netem", index=idx, handle="10:", parent="1:1", **netem)
        elif netem:
            ipr.tc("add", "netem", index=idx, handle="1:", **netem)
