"""The demo container's OCI bundle, built on a node.

The rootfs borrows the node's /usr read-only (so the service runs on the
node's python3) and the demo's scripts at /app; the network namespace is
an external one, /run/netns/NAME, whose address moves with the container.

    python3 -m migrator.demo.bundle DIR --name demo --address A/P@BRIDGE \
        -- python3 /app/server.py 8080 64 2000
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent


def build(bundle: str, name: str, network: str, args: list[str]) -> None:
    b = pathlib.Path(bundle)
    if b.exists():
        shutil.rmtree(b)
    rootfs = b / "rootfs"
    for d in ("usr", "app", "proc", "dev", "sys", "tmp", "etc", "run"):
        (rootfs / d).mkdir(parents=True)
    # Debian's merged /usr: the top-level names are links into it.
    for link in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink(f"/{link}"):
            os.symlink(os.readlink(f"/{link}"), rootfs / link)
    for f in ("passwd", "group", "hosts"):
        if os.path.exists(f"/etc/{f}"):
            shutil.copy(f"/etc/{f}", rootfs / "etc" / f)
    subprocess.run(["runc", "spec", "--bundle", str(b)], check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["hostname"] = name
    spec["mounts"] += [
        {"destination": "/usr", "type": "bind", "source": "/usr",
         "options": ["rbind", "ro"]},
        {"destination": "/app", "type": "bind", "source": str(HERE),
         "options": ["rbind", "ro"]},
    ]
    spec["linux"]["namespaces"] = [
        ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
    ] + [{"type": "network", "path": f"/run/netns/{name}"}]
    spec["annotations"] = {"io.migrator.enable": "true",
                           "io.migrator.network": network}
    (b / "config.json").write_text(json.dumps(spec, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--name", required=True)
    p.add_argument("--network", required=True, help="ADDR/PREFIX@BRIDGE")
    p.add_argument("args", nargs="+")
    a = p.parse_args()
    build(a.bundle, a.name, a.network, a.args)


if __name__ == "__main__":
    main()
