"""The native C units as native/build.py lists them, for tests and test beds
that compile the C layer themselves (the self-test, guests, benchmarks)."""

import importlib.util
import pathlib

NATIVE = pathlib.Path(__file__).resolve().parent.parent / "native"


def c_units() -> list[pathlib.Path]:
    spec = importlib.util.spec_from_file_location("_native_build",
                                                  NATIVE / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return [NATIVE / s for s in build.SOURCES]
