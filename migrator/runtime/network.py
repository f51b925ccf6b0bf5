"""A container's network across a move: same address, same MAC.

A container keeps its address when it has an *external* network namespace
(config.json names its path, so runc checkpoints and restores it as
external: CRIU neither dumps nor recreates its interfaces) and asks for
the io.migrator.network annotation (ADDR/PREFIX@BRIDGE).  Then:

source, final checkpoint   the host end of its veth goes down before the
                           dump: from that instant no packet reaches the old
                           copy, so TCP peers retransmit what the restored
                           copy has not seen (anything the old kernel
                           acknowledged after the dump would be lost)
source, undo               the link comes back up
source, commit             the veth and the namespace are removed
destination, before restore  the namespace is created at the same path
                           and attached to the same bridge with the same
                           address and MAC, so CRIU can restore sockets
                           bound to that address; its host end stays down,
                           or a peer's retransmission arriving before the
                           socket exists would be answered with a reset
destination, after restore   the link comes up, and gratuitous ARPs (or
                           unsolicited NAs) tell neighbours and bridges
                           where the address is now
"""

from __future__ import annotations

import os
from typing import Optional

from migrator.hooks.stages import network_request
from migrator.network import cutover

NETNS_DIR = "/run/netns"


def _netns_path(spec: dict) -> Optional[str]:
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return ns.get("path") or None
    return None


class ContainerNetwork:
    def __init__(self, cid: str, netns: str, address: str, bridge: str,
                 ifname: str = "eth0", gateway: Optional[str] = None):
        self.cid, self.netns, self.address = cid, netns, address
        self.bridge, self.ifname, self.gateway = bridge, ifname, gateway
        self.host_if = cutover.host_ifname(cid)
        self.mac = cutover.container_mac(cid)
        self.created_netns = False

    @classmethod
    def of_bundle(cls, cid: str, spec: dict) -> Optional["ContainerNetwork"]:
        """The container's network if it is one that can move, else None."""
        path = _netns_path(spec)
        req = network_request({"annotations": spec.get("annotations") or {}})
        if not path or not req:
            return None
        return cls(cid, path, req["address"], req["bridge"], req["ifname"],
                   req["gateway"])

    @classmethod
    def from_manifest(cls, cid: str, m: Optional[dict]) -> Optional["ContainerNetwork"]:
        if not m:
            return None
        return cls(cid, m["netns"], m["address"], m["bridge"], m["ifname"],
                   m.get("gateway"))

    def manifest(self) -> dict:
        return {"netns": self.netns, "address": self.address,
                "bridge": self.bridge, "ifname": self.ifname,
                "gateway": self.gateway}

    # -- source ---------------------------------------------------------
    def _set_host_link(self, state: str) -> None:
        with cutover.netlink() as host:
            idx = host.link_lookup(ifname=self.host_if)
            if not idx:
                raise cutover.CutoverError(
                    f"container {self.cid} has no host interface {self.host_if}")
            host.link("set", index=idx[0], state=state)

    def isolate(self) -> None:
        self._set_host_link("down")

    def reconnect(self) -> None:
        self._set_host_link("up")

    def remove(self) -> None:
        cutover.detach(self.host_if)
        self._remove_netns()

    def _remove_netns(self) -> None:
        # Only a namespace bound under /run/netns is ours to remove; any
        # other path belongs to whoever made it.
        if os.path.dirname(self.netns) != NETNS_DIR:
            return
        from pyroute2 import netns
        try:
            netns.remove(os.path.basename(self.netns))
        except OSError:
            pass

    # -- destination ----------------------------------------------------
    def prepare(self) -> None:
        if not os.path.exists(self.netns):
            if os.path.dirname(self.netns) != NETNS_DIR:
                raise cutover.CutoverError(
                    f"network namespace {self.netns} missing on this node and "
                    f"not under {NETNS_DIR}: create it before the migration")
            from pyroute2 import netns
            netns.create(os.path.basename(self.netns))
            self.created_netns = True
        cutover.attach(self.netns, self.address, self.bridge,
                       ifname=self.ifname, gateway=self.gateway,
                       host_if=self.host_if, mac=self.mac, host_up=False)

    def undo_prepare(self) -> None:
        cutover.detach(self.host_if)
        if self.created_netns:
            self._remove_netns()

    def go_live(self) -> dict:
        """After the restore: up, and tell the neighbours."""
        self._set_host_link("up")
        return cutover.announce(self.netns, self.address, ifname=self.ifname,
                                mac=self.mac)
