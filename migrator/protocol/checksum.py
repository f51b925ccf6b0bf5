"""The checksum of page data on the wire: CRC-32C, in the native layer.

Both sides checksum every byte a migration moves, so the checksum must cost
little next to copying the bytes.  CRC-32C has an instruction on x86-64
(SSE4.2) and arm64 (ARMv8 CRC32): 7.5 GB/s here against 2.5 GB/s for
zlib.crc32's table loop.  The native call releases the GIL.
"""

from __future__ import annotations

from migrator.kernel.native import ffi, lib


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of a bytes-like object, continuing from `crc`."""
    return lib.mig_crc32c(crc, ffi.from_buffer(data), memoryview(data).nbytes)


def crc32c_table(data, crc: int = 0) -> int:
    """The same with the portable table loop (to check the fast one)."""
    return lib.mig_crc32c_table(crc, ffi.from_buffer(data), memoryview(data).nbytes)


def implementation() -> str:
    """Which code computes crc32c(): "sse4.2", "armv8-crc32" or "table"."""
    return ffi.string(lib.mig_crc32c_impl()).decode()
