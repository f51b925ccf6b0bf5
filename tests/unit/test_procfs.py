from migrator.kernel.procfs import parse_maps, parse_smaps_vmflags
from migrator.tracking.memory import is_trackable

MAPS = """\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1c2c000000-7f1c2c021000 rw-p 00000000 00:00 0 
7f1c30000000-7f1c30200000 rw-s 00000000 00:01 4242                       /dev/shm/x (deleted)
7f1c31000000-7f1c31028000 r--p 00000000 fe:01 1234                       /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1b5f2000-7ffd1b5f6000 r--p 00000000 00:00 0                          [vvar]
7ffd1b5f6000-7ffd1b5f8000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_parse_maps_fields():
    v = parse_maps(MAPS)
    assert len(v) == 6
    assert v[0].start == 0x55D0C0A00000 and v[0].path == "[heap]"
    assert v[1].path == "" and v[1].private
    assert v[2].path == "/dev/shm/x (deleted)" and not v[2].private
    assert v[3].inode == 1234


def test_trackable_is_private_and_not_special():
    assert [is_trackable(v) for v in parse_maps(MAPS)] == \
        [True, True, False, True, False, False]


def test_smaps_vmflags():
    text = MAPS.splitlines()[0] + "\nRss: 4 kB\nVmFlags: rd wr mr mw me ac uw\n"
    [(s, e, flags)] = parse_smaps_vmflags(text)
    assert s == 0x55D0C0A00000 and "uw" in flags


def test_ended_running_zombie_and_reaped():
    import os
    import subprocess
    import time

    from migrator.kernel.procfs import ended
    assert not ended(os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not ended(child.pid)
        child.kill()
        # a zombie until reaped: ended, though /proc still has it
        deadline = time.monotonic() + 10
        while not ended(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{child.pid}")
        assert ended(child.pid)
    finally:
        child.kill()
        child.wait()
    assert ended(child.pid)
