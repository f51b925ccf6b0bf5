"""Fixtures for the e2e tier: test-bed nodes built from the node image.

The tier skips (with the reason) only when a capability is really missing:
not root, no debootstrap / unshare / nsenter on the host, or an image that
cannot be built.
"""

import os
import shutil

import pytest

from tests.beds import image, nodes


def _missing_capability() -> str:
    if os.geteuid() != 0:
        return "e2e test beds need root (namespaces, mounts, cgroups)"
    for tool in ("unshare", "nsenter", "setpriv"):
        if not shutil.which(tool):
            return f"e2e test beds need {tool} (util-linux) on the host"
    if not os.path.exists("/proc/self/ns/cgroup"):
        return "e2e test beds need cgroup namespaces in the kernel"
    return ""


@pytest.fixture(scope="session")
def bed_image():
    reason = _missing_capability()
    if reason:
        pytest.skip(reason)
    nodes.cleanup_stale(log=print)
    try:
        return image.ensure_image(log=lambda m: print(f"[image] {m}", flush=True))
    except image.ImageError as e:
        pytest.skip(f"node image cannot be built: {e}")


@pytest.fixture
def two_nodes(bed_image):
    """Nodes a and b, joined by one veth link (a: 198.18.k.1, b: .2)."""
    with nodes.cluster(2, image=bed_image) as cl:
        yield cl
