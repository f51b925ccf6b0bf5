"""cffi build of migrator's native layer (API mode, compiled at install time).

One extension, ``migrator._native``, assembled from the C units listed in
``SOURCES``; the C declarations below are the whole surface Python sees.
The module carries the package version and a digest of the C sources it
was built from, so ``migrator.kernel.native`` can refuse a stale build.
"""

import hashlib
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["inject.c", "seccomp.c", "uffd.c", "pagemap_scan.c", "softdirty.c",
           "vmread.c", "crc32c.c"]
HEADERS = ["migrator_native.h", "uapi_compat.h"]

CDEF = """
struct mig_range { uint64_t start; uint64_t end; };
struct mig_inject;

int mig_inject_attach(int pid, int timeout_ms, struct mig_inject **out);
int mig_inject_syscall(struct mig_inject *s, long nr, const long args[6],
                       long *result);
int mig_inject_detach(struct mig_inject *s);
long mig_nr_userfaultfd(void);
long mig_nr_close(void);

#define MIG_SECCOMP_NONE ...
long mig_seccomp_verdict(struct mig_inject *s, long nr, const long args[6]);

#define MIG_UFFD_HAS_WP_ASYNC ...
#define MIG_UFFD_HAS_WP_UNPOPULATED ...
int mig_uffd_open(struct mig_inject *s, int pidfd, unsigned *features);
int mig_uffd_open_local(unsigned *features);
int mig_uffd_register_wp(int uffd, uint64_t start, uint64_t end);
int mig_uffd_unregister(int uffd, uint64_t start, uint64_t end);
long mig_uffd_drop_markers(int uffd, int pagemap_fd, uint64_t start,
                           uint64_t end);
long mig_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
                      struct mig_range *out, size_t max_out,
                      uint64_t *walk_end);
long mig_scan_written_ranges(int pagemap_fd, const struct mig_range *in,
                             size_t n_in, struct mig_range *out,
                             size_t max_out, size_t *next_in,
                             uint64_t *walk_end);
long mig_scan_unregistered_ranges(int pagemap_fd, const struct mig_range *in,
                                  size_t n_in, struct mig_range *out,
                                  size_t max_out, size_t *next_in,
                                  uint64_t *walk_end);
long mig_scan_present(int pagemap_fd, uint64_t start, uint64_t end,
                      struct mig_range *out, size_t max_out,
                      uint64_t *walk_end);
long mig_scan_unregistered(int pagemap_fd, uint64_t start, uint64_t end,
                           struct mig_range *out, size_t max_out,
                           uint64_t *walk_end);
long mig_pagemap_runs(int pagemap_fd, uint64_t start, uint64_t end,
                      struct mig_range *out, size_t max_out,
                      uint64_t *walk_end, uint64_t flags, uint64_t mask,
                      uint64_t inverted);
int mig_pagemap_scan_supported(int pagemap_fd);
#define PAGE_IS_SOFT_DIRTY ...
#define PAGE_IS_WRITTEN ...

int mig_softdirty_clear(int pid);
long mig_softdirty_scan(int pagemap_fd, uint64_t start, uint64_t end,
                        struct mig_range *out, size_t max_out,
                        uint64_t *walk_end);

long mig_vm_read(int pid, const struct mig_range *src, size_t n, void *dst,
                 struct mig_range *missing, size_t max_missing,
                 size_t *n_missing);

uint32_t mig_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t mig_crc32c_table(uint32_t crc, const void *data, size_t n);
const char *mig_crc32c_impl(void);

#define SECCOMP_RET_ALLOW ...
#define SECCOMP_RET_ERRNO ...
#define SECCOMP_RET_KILL_PROCESS ...
#define SECCOMP_RET_KILL_THREAD ...
#define SECCOMP_RET_TRAP ...
#define SECCOMP_RET_TRACE ...
#define SECCOMP_RET_LOG ...
#define SECCOMP_RET_USER_NOTIF ...

static const char MIG_BUILD_VERSION[];
static const char MIG_BUILD_DIGEST[];
"""


def package_version() -> str:
    init = (HERE.parent / "migrator" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1)


def source_digest() -> str:
    """Digest of every C file and of this script: what the build depends on."""
    h = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS + ["build.py"]):
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return h.hexdigest()[:16]


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "migrator._native",
    f"""
#include <linux/seccomp.h>
#include "migrator_native.h"
#include "uapi_compat.h"
static const char MIG_BUILD_VERSION[] = "{package_version()}";
static const char MIG_BUILD_DIGEST[] = "{source_digest()}";
""",
    sources=[f"native/{s}" for s in SOURCES],  # setuptools wants them relative
    include_dirs=["native"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
