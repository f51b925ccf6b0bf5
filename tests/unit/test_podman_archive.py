"""podman's export archive taken apart on the source and put together on
the destination (migrator/runtime/podman.py), without podman."""

import io
import json
import os
import tarfile

from migrator.migration.workload import MANIFEST
from migrator.runtime.podman import (CRIU_CONFIG_ANNOTATION, PODMAN_ARCHIVE,
                                     _join_export, split_export)

CRIU_FILES = {"pagemap-1.img": b"PM", "pages-1.img": b"P" * 8192,
              "core-1.img": b"CORE", "descriptors.json": b"[]"}
PODMAN_FILES = {"config.dump": b'{"id": "abc"}',
                "spec.dump": json.dumps({"ociVersion": "1.0",
                                         "annotations": {"a": "b"}}).encode(),
                "rootfs-diff.tar": b"T" * 1024, "network.status": b"[]"}


def add(t, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def export(path):
    with tarfile.open(path, "w") as t:
        for name, data in PODMAN_FILES.items():
            add(t, name, data)
        d = tarfile.TarInfo("checkpoint")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, data in CRIU_FILES.items():
            add(t, "checkpoint/" + name, data)


def members(path):
    with tarfile.open(path) as t:
        return {m.name: (t.extractfile(m).read() if m.isfile() else None) for m in t}


def test_split_then_join_gives_podman_its_archive_back(tmp_path):
    src = tmp_path / "export.tar"
    export(src)
    images = tmp_path / "images"
    images.mkdir()
    split_export(str(src), str(images))
    # CRIU's images are plain files of the images directory (the delta
    # logic reads them there); podman's own files stay one archive.
    for name, data in CRIU_FILES.items():
        assert (images / name).read_bytes() == data
    assert set(members(images / PODMAN_ARCHIVE)) == set(PODMAN_FILES)

    # The destination adds what it must not pass on to podman.
    (images / MANIFEST).write_text("{}")
    (images / ".tmp-x").write_text("")
    os.makedirs(images / "levels" / "level-1")
    os.symlink("levels/level-1", images / "parent")
    out = tmp_path / "import.tar"
    _join_export(str(images), str(out), "/run/migrator/restore.conf")
    got = members(out)
    assert got.pop("checkpoint") is None
    spec = json.loads(got.pop("spec.dump"))
    assert spec["annotations"] == {"a": "b",
                                   CRIU_CONFIG_ANNOTATION: "/run/migrator/restore.conf"}
    want = {k: v for k, v in PODMAN_FILES.items() if k != "spec.dump"}
    want.update({"checkpoint/" + k: v for k, v in CRIU_FILES.items()})
    assert got == want
