"""`migrator resolve` on an undecided hand-over: --commit resumes the
restored tree the way its kind resumes at a Commit, --abort destroys it;
the migration's directory goes either way."""

import json
import os

import pytest

from migrator.migration import destination, workload


def undecided(base, kind: str, pid: int) -> str:
    d = base / "m1"
    (d / "images").mkdir(parents=True)
    (d / "images" / workload.MANIFEST).write_text(json.dumps({"kind": kind}))
    (d / "state").write_text(f"restored {pid}\n")
    return "m1"


def test_commit_resumes_through_the_kinds_resumer(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setitem(workload.RESTORERS, "test-kind", lambda d, m: 0)
    monkeypatch.setitem(workload.RESUMERS, "test-kind",
                        lambda manifest, pid: seen.append((manifest["kind"], pid)))
    mig = undecided(tmp_path, "test-kind", 4242)
    out = destination.resolve(str(tmp_path), mig, commit=True)
    assert seen == [("test-kind", 4242)]
    assert "resumed" in out
    assert not os.path.exists(tmp_path / mig)


def test_abort_destroys_and_cleans(tmp_path, monkeypatch):
    killed = []
    monkeypatch.setattr(workload, "kill_tree", killed.append)
    mig = undecided(tmp_path, "process", 4243)
    out = destination.resolve(str(tmp_path), mig, commit=False)
    assert killed == [4243] and "destroyed" in out
    assert not os.path.exists(tmp_path / mig)


def test_unknown_migration(tmp_path):
    with pytest.raises(FileNotFoundError, match="no undecided migration"):
        destination.resolve(str(tmp_path), "nope", commit=True)
