"""Network cutover for a container that keeps its IP address across a move.

On the destination, ``attach`` gives the container's network namespace a
veth whose other end sits on a bridge of the node; ``announce`` then sends,
from inside the container's namespace, a gratuitous ARP (IPv4) or an
unsolicited neighbour advertisement (IPv6) so that neighbours and the
bridge's forwarding table learn the address's new place at once instead of
after their caches expire.  On the source, ``detach`` removes the host end
of the veth (the kernel deletes its peer with it).

All netlink work goes through pyroute2; nothing runs ``ip``.

Frames (``arp_frame``, ``na_frame``), byte grammar:

    ethernet  = dst(6) src(6) ethertype(2)
    garp      = ethernet(ff:ff:ff:ff:ff:ff, mac, 0x0806)
                htype=1(2) ptype=0x0800(2) hlen=6(1) plen=4(1) oper=1(2)
                sha=mac(6) spa=ip(4) tha=00*6(6) tpa=ip(4) pad=00*18
    na        = ethernet(33:33:00:00:00:01, mac, 0x86dd)
                ipv6(ver=6, plen=32, next=58, hops=255, src=ip, dst=ff02::1)
                icmp6(type=136 code=0 cksum(2) flags=O(4) target=ip(16)
                      opt(type=2 len=1 mac(6)))

The ARP is a *request* with sender and target address both the container's
own: Linux and most stacks update an existing neighbour entry from it
(is_garp in net/ipv4/arp.c overrides the entry's lock time), where an
unsolicited reply can be ignored.  The NA has Override set and Solicited
clear (RFC 4861 7.2.6), with hop limit 255 or receivers drop it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

from pyroute2 import IPRoute

NetnsRef = Union[int, str]  # a pid, or the path of a network namespace

_CLONE_NEWNET = 0x40000000
_IFA_F_NODAD = 0x02


class CutoverError(RuntimeError):
    """A network cutover step failed; the message says which and why."""


@dataclass
class Attachment:
    """What ``attach`` found or did; ``actions`` empty means all was in place."""
    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    address: str
    gateway: Optional[str]
    mac: Optional[str]
    actions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- names

def netns_path(ref: NetnsRef) -> str:
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        return f"/proc/{int(ref)}/ns/net"
    return str(ref)


def host_ifname(container_id: str) -> str:
    """A stable host-side name for a container's veth: the same on source
    and destination, at most 15 bytes (IFNAMSIZ - 1), from a hash because
    container ids are longer than that."""
    return "mg" + hashlib.sha256(container_id.encode()).hexdigest()[:11]


def container_mac(container_id: str) -> str:
    """A stable, locally administered unicast MAC for a container: keeping
    the MAC across a move means neighbours' caches stay right even before
    the announcement arrives; the announcement then only has to move the
    bridges' forwarding entries."""
    h = hashlib.sha256(b"mac:" + container_id.encode()).digest()
    octets = bytes([(h[0] & 0xFC) | 0x02]) + h[1:6]
    return ":".join(f"{b:02x}" for b in octets)


def parse_address(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as e:
        raise CutoverError(f"bad address {text!r}: {e}") from None
    if "/" not in text:
        raise CutoverError(f"address {text!r} needs a prefix length (ADDR/PREFIX)")
    return iface


# ---------------------------------------------------------------- netlink helpers

def netlink(path: Optional[str] = None) -> IPRoute:
    """A pyroute2 IPRoute in the network namespace at ``path`` (None: ours)."""
    if path is None:
        return IPRoute()
    if not os.path.exists(path):
        raise CutoverError(f"network namespace {path} does not exist")
    try:
        # flags=0: open an existing namespace only, never create one.
        return IPRoute(netns=path, flags=0)
    except TypeError:
        # pyroute2 < 0.8 (Debian 13 ships 0.7) has no netns= here.  Its
        # IPRoute opens the netlink socket in __init__, and a socket belongs
        # to the namespace of the thread that created it.
        return in_netns(path, IPRoute)


def _index(ipr: IPRoute, ifname: str) -> Optional[int]:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _link_attr(ipr: IPRoute, index: int, name: str):
    return ipr.get_links(index)[0].get_attr(name)


def _has_addr(ipr: IPRoute, index: int, iface) -> bool:
    for msg in ipr.get_addr(index=index, family=_family(iface)):
        if (msg.get_attr("IFA_ADDRESS") == str(iface.ip)
                and msg["prefixlen"] == iface.network.prefixlen):
            return True
    return False


def _family(iface) -> int:
    return socket.AF_INET if iface.version == 4 else socket.AF_INET6


# ---------------------------------------------------------------- attach / detach

def attach(netns: NetnsRef, address: str, bridge: str, ifname: str = "eth0",
           gateway: Optional[str] = None, host_if: Optional[str] = None,
           mac: Optional[str] = None, host_up: bool = True) -> Attachment:
    """Connect the network namespace ``netns`` (a pid or a path) to
    ``bridge`` with ``address`` (ADDR/PREFIX) on ``ifname`` inside it, and a
    default route (via ``gateway``, or out of ``ifname`` when there is none).

    Idempotent: what is already in place is kept (a restore may run the
    hook again, or CRIU may have restored part of it); ``actions`` lists
    what this call changed.  The host end is named ``host_if`` (default
    derived from the namespace path; pass ``host_ifname(id)`` so the
    source can find it by container id).  ``host_up=False`` leaves the host
    end down: nothing reaches the namespace, nor leaves it (not even IPv6
    duplicate-address probes that would teach the bridge where the MAC is)
    until the caller brings it up.
    """
    path = netns_path(netns)
    iface = parse_address(address)
    gw = None
    if gateway:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError as e:
            raise CutoverError(f"bad gateway {gateway!r}: {e}") from None
        if gw.version != iface.version:
            raise CutoverError(f"gateway {gateway} and address {address} differ in family")
    if len(bridge.encode()) > 15 or len(ifname.encode()) > 15:
        raise CutoverError("interface names are at most 15 bytes")
    host_if = host_if or ("mg" + hashlib.sha256(path.encode()).hexdigest()[:11])
    peer_tmp = (host_if + "p")[:15]
    if peer_tmp == host_if:
        raise CutoverError(f"host interface name {host_if!r} leaves no room for its peer's")
    result = Attachment(path, ifname, host_if, bridge, str(iface), gateway, None)
    try:
        with netlink(path) as inner:
            inside = _index(inner, ifname)
        with netlink() as host:
            br = _index(host, bridge)
            if br is None:
                host.link("add", ifname=bridge, kind="bridge")
                br = _index(host, bridge)
                result.actions.append(f"created bridge {bridge}")
            host.link("set", index=br, state="up")
            hidx = _index(host, host_if)
            if inside is None:
                if hidx is not None:
                    # Its peer is not in this namespace: another container's
                    # veth (or a namespace that still lives) owns that name.
                    raise CutoverError(
                        f"host interface {host_if} exists but {ifname} is not in "
                        f"{path}; detach it first")
                host.link("add", ifname=host_if, kind="veth", peer=peer_tmp)
                result.actions.append(f"created veth {host_if}")
                hidx = _index(host, host_if)
                pidx = _index(host, peer_tmp)
                try:
                    if mac:
                        host.link("set", index=pidx, address=mac)
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        host.link("set", index=pidx, net_ns_fd=fd)
                    finally:
                        os.close(fd)
                except BaseException:
                    host.link("del", index=hidx)  # takes the peer with it
                    raise
                result.actions.append(f"moved peer into {path}")
            if hidx is not None:
                if _link_attr(host, hidx, "IFLA_MASTER") != br:
                    host.link("set", index=hidx, master=br)
                    result.actions.append(f"attached {host_if} to {bridge}")
                host.link("set", index=hidx, state="up" if host_up else "down")
        with netlink(path) as inner:
            idx = _index(inner, ifname)
            if idx is None:
                idx = _index(inner, peer_tmp)
                if idx is None:
                    raise CutoverError(f"{peer_tmp} did not arrive in {path}")
                inner.link("set", index=idx, ifname=ifname)
            lo = _index(inner, "lo")
            if lo is not None:
                inner.link("set", index=lo, state="up")
            if not _has_addr(inner, idx, iface):
                extra = {"flags": _IFA_F_NODAD} if iface.version == 6 else {}
                # No DAD for IPv6: the address moved with its owner, and a
                # tentative address could not send the announcement's
                # source or accept traffic for a second or more.
                inner.addr("add", index=idx, address=str(iface.ip),
                           prefixlen=iface.network.prefixlen, **extra)
                result.actions.append(f"added {iface} to {ifname}")
            inner.link("set", index=idx, state="up")
            dst = "0.0.0.0" if iface.version == 4 else "::"
            route = {"dst": dst, "dst_len": 0, "family": _family(iface), "oif": idx}
            if gw is not None:
                route["gateway"] = str(gw)
            inner.route("replace", **route)
            result.actions.append("default route " + (f"via {gw}" if gw else f"dev {ifname}"))
            result.mac = _link_attr(inner, idx, "IFLA_ADDRESS")
    except CutoverError:
        raise
    except OSError as e:
        raise CutoverError(f"attach {path} to {bridge}: {e}") from e
    except Exception as e:  # pyroute2's NetlinkError is not an OSError
        raise CutoverError(f"attach {path} to {bridge}: {e}") from e
    return result


def detach(host_if: str) -> bool:
    """Remove the host end of a container's veth (its peer goes with it).
    True if it existed; a second call is a no-op returning False."""
    try:
        with netlink() as host:
            idx = _index(host, host_if)
            if idx is None:
                return False
            if _link_attr(host, idx, "IFLA_LINKINFO") is not None:
                kind = _link_attr(host, idx, "IFLA_LINKINFO").get_attr("IFLA_INFO_KIND")
                if kind != "veth":
                    raise CutoverError(f"{host_if} is a {kind}, not a veth: not removing it")
            host.link("del", index=idx)
            return True
    except CutoverError:
        raise
    except Exception as e:  # NetlinkError, OSError
        raise CutoverError(f"detach {host_if}: {e}") from e


# ---------------------------------------------------------------- announce

def _mac_bytes(mac: str) -> bytes:
    try:
        b = bytes(int(x, 16) for x in mac.split(":"))
    except ValueError:
        b = b""
    if len(b) != 6:
        raise CutoverError(f"bad MAC address {mac!r}")
    return b


def arp_frame(mac: str, ip: str) -> bytes:
    """A gratuitous ARP request (see the module grammar)."""
    m, a = _mac_bytes(mac), ipaddress.IPv4Address(ip).packed
    eth = b"\xff" * 6 + m + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + m + a + b"\x00" * 6 + a
    return (eth + arp).ljust(60, b"\x00")  # Ethernet minimum frame, no FCS


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def na_frame(mac: str, ip: str) -> bytes:
    """An unsolicited neighbour advertisement to all nodes (ff02::1)."""
    m, a = _mac_bytes(mac), ipaddress.IPv6Address(ip).packed
    dst = ipaddress.IPv6Address("ff02::1").packed
    body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + a + bytes([2, 1]) + m
    pseudo = a + dst + struct.pack("!I", len(body)) + b"\x00\x00\x00" + bytes([58])
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + a + dst
    eth = bytes.fromhex("333300000001") + m + struct.pack("!H", 0x86DD)
    return eth + ip6 + body


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(path: str, fn: Callable[[], object], timeout: float = 5.0):
    """Run ``fn`` in a thread that has joined the network namespace at
    ``path``.  Sockets belong to the namespace of the thread that created
    them, and setns(CLONE_NEWNET) affects only the calling thread, so the
    rest of the process (and a failure to switch back) never leaves the
    caller's namespace."""
    box: dict = {}

    def run():
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(path, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    box["value"] = fn()
                finally:
                    _setns(own)
            finally:
                os.close(target)
                os.close(own)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    t = threading.Thread(target=run, name="migrator-netns", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise CutoverError(f"no answer from inside {path} after {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def announce(netns: NetnsRef, address: str, ifname: str = "eth0",
             count: int = 3, interval: float = 0.05, mac: Optional[str] = None,
             timeout: float = 5.0) -> dict:
    """Tell the neighbours of ``ifname`` (inside ``netns``) that ``address``
    is there now: ``count`` gratuitous ARPs (IPv4) or unsolicited NAs
    (IPv6), ``interval`` seconds apart (a single frame can be lost while a
    bridge port is still learning).  Returns what was sent."""
    path = netns_path(netns)
    ip = parse_address(address).ip if "/" in address else ipaddress.ip_address(address)
    if not os.path.exists(path):
        raise CutoverError(f"network namespace {path} does not exist")
    if mac is None:
        with netlink(path) as inner:
            idx = _index(inner, ifname)
            if idx is None:
                raise CutoverError(f"no interface {ifname} in {path}")
            mac = _link_attr(inner, idx, "IFLA_ADDRESS")
    frame = arp_frame(mac, str(ip)) if ip.version == 4 else na_frame(mac, str(ip))

    def send() -> int:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            s.bind((ifname, 0))  # protocol 0: send only, receive nothing
            for i in range(count):
                if i:
                    time.sleep(interval)
                s.send(frame)
        return count

    try:
        sent = in_netns(path, send, timeout=max(timeout, count * interval + 1))
    except CutoverError:
        raise
    except OSError as e:
        raise CutoverError(f"announce {ip} on {ifname} in {path}: {e}") from e
    return {"kind": "garp" if ip.version == 4 else "unsolicited-na",
            "address": str(ip), "mac": mac, "ifname": ifname, "netns": path,
            "sent": sent}
