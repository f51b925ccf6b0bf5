"""Loading the compiled native module, and turning its errors into OSError."""

from __future__ import annotations

import os
import pathlib

import migrator


class NativeBuildError(ImportError):
    """The compiled native module is missing or does not match this code."""


def _load():
    try:
        from migrator import _native
    except ImportError as e:
        raise NativeBuildError(
            "migrator's native module is not built "
            f"({e}); run the set-up command from README.md, "
            "or 'pip install .' in the source tree") from None
    built = _native.ffi.string(_native.lib.MIG_BUILD_VERSION).decode()
    if built != migrator.__version__:
        raise NativeBuildError(
            f"migrator's native module was built for version {built}, "
            f"this is {migrator.__version__}; rebuild it (pip install .)")
    _check_digest(_native)
    return _native.ffi, _native.lib


def _check_digest(native) -> None:
    """In a source checkout, refuse a module built from other C sources."""
    tree = pathlib.Path(migrator.__file__).resolve().parent.parent / "native"
    if not (tree / "build.py").is_file():
        return  # an installed package: the version check is all we have
    import importlib.util
    spec = importlib.util.spec_from_file_location("_migrator_native_build",
                                                  tree / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built = native.ffi.string(native.lib.MIG_BUILD_DIGEST).decode()
    if built != build.source_digest():
        raise NativeBuildError(
            "migrator's native module is stale: native/ changed since it "
            "was built; rebuild it (pip install -e . or the set-up command)")


ffi, lib = _load()


def check(ret: int, what: str) -> int:
    """Return ``ret``, or raise OSError for a native -errno return."""
    if ret < 0:
        err = -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


__all__ = ["ffi", "lib", "check", "NativeBuildError"]
