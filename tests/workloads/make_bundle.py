"""Build a minimal OCI bundle inside a node: busybox-static as the rootfs.

    python3 make_bundle.py BUNDLE_DIR

Runs inside a test-bed node (its image has busybox-static and runc).  The
container runs tests/workloads/counter.sh, copied into the rootfs, and
writes its progress to /data/progress (BUNDLE_DIR/rootfs/data/progress).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys


def main() -> int:
    bundle = pathlib.Path(sys.argv[1])
    rootfs = bundle / "rootfs"
    for d in ("bin", "data", "proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox") or "/usr/bin/busybox"
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo", "cat"):
        link = rootfs / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    here = pathlib.Path(__file__).resolve().parent
    shutil.copy2(here / "counter.sh", rootfs / "counter.sh")

    # Start from runc's own default spec, change only what the test needs.
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False  # detached, stdio from the caller
    spec["process"]["args"] = ["/bin/sh", "/counter.sh", "/data/progress"]
    spec["root"]["readonly"] = False
    spec["hostname"] = "counter"
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
