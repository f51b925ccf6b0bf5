"""A stale or mismatched native build is refused with a clear message."""

import pytest

import migrator
from migrator.kernel import native


class _Fake:
    """Stands in for a compiled module built from other sources."""

    def __init__(self, version, digest):
        from cffi import FFI
        self.ffi = FFI()
        self.lib = type("lib", (), {})()
        self.lib.MIG_BUILD_VERSION = self.ffi.new("char[]", version.encode())
        self.lib.MIG_BUILD_DIGEST = self.ffi.new("char[]", digest.encode())


def test_loaded_module_matches_sources():
    built = native.ffi.string(native.lib.MIG_BUILD_DIGEST).decode()
    assert len(built) == 16


def test_stale_digest_is_refused():
    with pytest.raises(native.NativeBuildError, match="stale"):
        native._check_digest(_Fake(migrator.__version__, "0" * 16))


def test_check_turns_negative_errno_into_oserror():
    import errno
    with pytest.raises(OSError) as e:
        native.check(-errno.ESRCH, "doing a thing")
    assert e.value.errno == errno.ESRCH and "doing a thing" in str(e.value)
    assert native.check(5, "x") == 5
