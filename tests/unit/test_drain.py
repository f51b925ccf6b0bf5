"""examples/drain.py against a stub CLI.

The stub stands in for `migrator` ONLY in this unit test: `migrator send
CONTAINER` is being written elsewhere, and what drain.py must get right is
its reading of the CLI's contract (JSON events on stdout, exit codes from
migrator/cli/exits.py), which the stub reproduces.  The real end-to-end
drain runs against the real CLI.
"""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("drain", ROOT / "examples" / "drain.py")
drain = importlib.util.module_from_spec(spec)
sys.modules["drain"] = drain  # dataclasses look their module up there
spec.loader.exec_module(drain)

STUB = r'''
import json, os, sys, time
log = os.environ["STUB_LOG"]
args = sys.argv[1:]
if args[:2] == ["list", "--json"]:
    print(os.environ["STUB_LIST"])
    sys.exit(0)
assert args[0] == "send" and args[2] == "--to" and "--json" in args, args
cid = args[1]
with open(log, "a") as f:
    f.write(f"start {cid} {' '.join(args[3:])}\n")
time.sleep(0.2)
def ev(**kw):
    print(json.dumps(kw), flush=True)
ev(event="round", round=1, dirty_pages=10, sent_bytes=40960, bandwidth=1e6)
code = 0
if cid.startswith("ok"):
    ev(event="done", rounds=3, downtime_ms=42.4, total_ms=900.0)
elif cid.startswith("fail"):
    ev(event="error", message="migration: peer closed the connection", exit_code=6)
    code = 6
elif cid.startswith("undecided"):
    ev(event="error", message="commit: hand-over undecided; migrator resolve --dir /d "
       "--migration m-1 --commit|--abort on the target", exit_code=7)
    code = 7
elif cid.startswith("crash"):
    print("Traceback: something broke", file=sys.stderr)
    code = 1
with open(log, "a") as f:
    f.write(f"end {cid}\n")
sys.exit(code)
'''


def _entries(*ids, dead=()):
    return [{"id": i, "pid": 100 + n, "alive": i not in dead} for n, i in enumerate(ids)]


@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "migrator_stub.py"
    script.write_text(STUB)
    log = tmp_path / "log"
    monkeypatch.setenv("STUB_LOG", str(log))

    def run(entries, *extra):
        monkeypatch.setenv("STUB_LIST", json.dumps(entries))
        return drain.main(["--to", "198.18.0.2:7000", "--migrator",
                           f"{sys.executable} {script}", "--json", *extra])
    run.log = log
    return run


def test_report_and_exit_codes(stub, capsys):
    code = stub(_entries("ok-1", "fail-1", "undecided-1", "crash-1", "gone", dead=("gone",)))
    report = {o["id"]: o for o in json.loads(capsys.readouterr().out)}
    assert code == drain.UNDECIDED, "an undecided hand-over dominates the exit status"
    assert report["ok-1"]["status"] == "migrated" and "42 ms" in report["ok-1"]["detail"]
    assert report["fail-1"]["status"] == "failed"
    assert "peer closed" in report["fail-1"]["detail"] and "still running" in report["fail-1"]["detail"]
    assert report["undecided-1"]["status"] == "undecided"
    assert "migrator resolve" in report["undecided-1"]["detail"]
    assert report["crash-1"]["status"] == "failed" and "something broke" in report["crash-1"]["detail"]
    assert report["gone"]["status"] == "skipped"


def test_all_migrated_is_zero_and_failed_is_one(stub, capsys):
    assert stub(_entries("ok-1", "ok-2")) == 0
    assert stub(_entries("ok-3", "fail-2")) == 1
    assert stub([]) == 0


def test_parallel_bound_and_send_args(stub, capsys):
    assert stub(_entries(*[f"ok-{i}" for i in range(6)]), "--parallel", "2",
                "--send-arg=--psk-file=/etc/psk") == 0
    running, peak = 0, 0
    for line in stub.log.read_text().splitlines():
        if line.startswith("start"):
            assert line.endswith("--json --psk-file=/etc/psk")
            running += 1
            peak = max(peak, running)
        else:
            running -= 1
    assert peak <= 2 and running == 0


def test_only(stub, capsys):
    assert stub(_entries("ok-1", "fail-1"), "--only", "ok-1") == 0
    assert [o["id"] for o in json.loads(capsys.readouterr().out)] == ["ok-1"]


def test_list_failure_is_reported(tmp_path, capsys):
    code = drain.main(["--to", "x:1", "--migrator", f"{sys.executable} -c 'raise SystemExit(3)'"])
    assert code == 1 and "cannot list" in capsys.readouterr().err


def test_classify_interrupted():
    o = drain.classify("c", 130, [{"event": "error", "message": "interrupted",
                                   "exit_code": 130}], "")
    assert o.status == "interrupted"
