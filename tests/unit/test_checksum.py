"""CRC-32C of the wire protocol's page batches (native/crc32c.c)."""

import zlib

from hypothesis import given
from hypothesis import strategies as st

from migrator.protocol.checksum import crc32c, crc32c_table, implementation

# RFC 3720 (iSCSI), appendix B.4, and the usual check value.
VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


def test_known_values_both_implementations():
    for data, want in VECTORS:
        assert crc32c(data) == want, data
        assert crc32c_table(data) == want, data


def test_the_cpu_instruction_is_used_where_there_is_one():
    import platform
    impl = implementation()
    machine = platform.machine()
    # Every x86-64 server CPU since 2008 has SSE4.2; every arm64 CPU we
    # target has the CRC32 extension.  Elsewhere the table loop is right.
    if machine == "x86_64":
        assert impl == "sse4.2"
    elif machine == "aarch64":
        assert impl == "armv8-crc32"
    else:
        assert impl == "table"


@given(st.binary(max_size=5000), st.integers(0, 7), st.integers(0, 2**32 - 1))
def test_fast_equals_table_at_any_alignment_and_start(data, skip, start):
    view = memoryview(data)[skip:]
    assert crc32c(view, start) == crc32c_table(view, start)


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_chaining(a, b):
    assert crc32c(b, crc32c(a)) == crc32c(a + b)


def test_buffers_of_every_kind_and_a_page_batch_size():
    data = bytearray(range(256)) * (8192 * 2)        # 4 MiB
    whole = crc32c(bytes(data))
    assert crc32c(data) == whole
    assert crc32c(memoryview(data)) == whole
    assert crc32c(memoryview(data)[4096:]) == crc32c(bytes(data[4096:]))
    # not zlib's CRC-32 (another polynomial): version 1 peers disagree
    assert whole != zlib.crc32(data)
