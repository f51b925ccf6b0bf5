/*
 * migrator's native API.
 *
 * Every function returns a non-negative value on success and -errno on
 * failure; none of them prints, exits or keeps global state.  The Python
 * side (migrator/kernel) turns negative returns into OSError.
 *
 * Units: addresses and lengths are bytes and page aligned; ranges are
 * half-open [start, end).
 */
#ifndef MIGRATOR_NATIVE_H
#define MIGRATOR_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* A run of pages, [start, end).  Same layout as the kernel's
 * struct page_region minus its categories, so results can be compacted
 * in place. */
struct mig_range {
	uint64_t start;
	uint64_t end;
};

/* ------------------------------------------------------------------ */
/* inject.c: run syscalls inside another process through ptrace.       */
/* ------------------------------------------------------------------ */

/* A target whose threads are all stopped by us.  Opaque. */
struct mig_inject;

/*
 * Seize and stop every thread of `pid` (threads that appear meanwhile are
 * caught too).  Blocks the caller's catchable termination signals until
 * mig_inject_detach, so the window cannot be cut short by Ctrl-C or
 * SIGTERM.  Gives up with -ETIMEDOUT after `timeout_ms` if a thread never
 * stops (for example a target frozen by a cgroup freezer); nothing is left
 * attached then.
 */
int mig_inject_attach(int pid, int timeout_ms, struct mig_inject **out);

/*
 * Execute syscall `nr` with `args` in one thread of the stopped target and
 * store its raw return value (a negative errno if it failed inside the
 * target) in *result.  The registers of that thread are restored exactly
 * afterwards, and a syscall it was blocked in is restarted on detach.
 * Returns -errno only if the injection itself failed.
 */
int mig_inject_syscall(struct mig_inject *s, long nr, const long args[6],
		       long *result);

/* Restore what was changed, resume and detach every thread, free `s`,
 * and restore the caller's signal mask.  Always frees `s`. */
int mig_inject_detach(struct mig_inject *s);

/* Syscall numbers of the architecture this was compiled for. */
long mig_nr_userfaultfd(void);
long mig_nr_close(void);

/* ------------------------------------------------------------------ */
/* seccomp.c: would the target's seccomp filters allow a syscall?     */
/* ------------------------------------------------------------------ */

/* Verdicts, the kernel's SECCOMP_RET_ACTION_FULL part of the result. */
/* No filter installed: the same value as SECCOMP_RET_ALLOW (a kill verdict
 * is 0, so 0 cannot mean "none"). */
#define MIG_SECCOMP_NONE  0x7fff0000L

/*
 * Evaluate every seccomp filter of thread `tid` (which the caller has
 * ptrace-stopped, e.g. inside a mig_inject session) for syscall `nr` with
 * `args`, as the kernel would, and return the resulting action
 * (SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, ...;
 * the masked action value, not -errno), MIG_SECCOMP_NONE with no filter,
 * or -errno if the filters cannot be read.
 */
long mig_seccomp_verdict(struct mig_inject *s, long nr, const long args[6]);

/* ------------------------------------------------------------------ */
/* uffd.c: userfaultfd write-protect tracking;                         */
/* pagemap_scan.c: the PAGEMAP_SCAN ioctl.                             */
/* ------------------------------------------------------------------ */

/* Feature bits the kernel reported to mig_uffd_open. */
#define MIG_UFFD_HAS_WP_ASYNC        1u
#define MIG_UFFD_HAS_WP_UNPOPULATED  2u

/*
 * Make the stopped target create a userfaultfd (O_CLOEXEC|O_NONBLOCK and
 * UFFD_USER_MODE_ONLY when the kernel needs it), take it over with
 * pidfd_getfd, close the target's copy again, and do the UFFDIO_API
 * handshake asking for WP_ASYNC (and WP_UNPOPULATED when offered).
 * Returns our fd, bound to the target's memory; *features gets MIG_UFFD_HAS_*.
 * The target holds no new fd afterwards, on every path.
 */
int mig_uffd_open(struct mig_inject *s, int pidfd, unsigned *features);

/* The same for the calling process itself: feature probes and tests. */
int mig_uffd_open_local(unsigned *features);

/* UFFDIO_REGISTER with MODE_WP, then write-protect the whole range. */
int mig_uffd_register_wp(int uffd, uint64_t start, uint64_t end);

/*
 * Clear the PTE markers that protection left on never-touched pages of
 * [start, end) (pagemap shows them as swapped out, and CRIU would dump
 * them as zero pages).  Returns the pages unprotected; see uffd.c.
 */
long mig_uffd_drop_markers(int uffd, int pagemap_fd, uint64_t start, uint64_t end);

/* UFFDIO_UNREGISTER; ranges that are no longer mapped are not an error. */
int mig_uffd_unregister(int uffd, uint64_t start, uint64_t end);

/*
 * PAGEMAP_SCAN over [start, end) of the process whose /proc/PID/pagemap is
 * open as `pagemap_fd`: find the pages written since they were last
 * write-protected and write-protect them again, atomically per page
 * (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC).  Stores up to `max_out`
 * merged ranges in `out` and returns how many; *walk_end gets where the
 * walk stopped (`end` when the range is done, less when `out` filled up:
 * call again from there).  -EPERM if part of the range is not registered
 * for async write-protection (then nothing after the pages already
 * reported can be trusted: treat the range as written).
 */
long mig_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end);

/*
 * Runs of [start, end) whose pages are present in memory: what pre-copy
 * sends.  Never-touched memory reads as zero and needs no copy; swapped
 * pages are left to the final step rather than swapped in by reading them
 * (and a uffd-wp marker on an untouched page also reads as "swapped").
 */
long mig_scan_present(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end);

/*
 * Runs of [start, end) that are mapped but not registered for async
 * write-protection (no PAGE_IS_WPALLOWED): memory whose registration was
 * lost (munmap + mmap over it, mremap).  Reads only; protects nothing.
 */
long mig_scan_unregistered(int pagemap_fd, uint64_t start, uint64_t end,
			   struct mig_range *out, size_t max_out,
			   uint64_t *walk_end);

/*
 * mig_scan_written and mig_scan_unregistered over many ranges in one call.
 * Start at range *next_in, address *walk_end (0: its start); on return
 * both say where to continue (*next_in == n_in when done).  A negative
 * return is the errno of range *next_in (e.g. -EPERM); skip it (advance
 * *next_in, zero *walk_end) and call again.  If some runs were already
 * stored when a range fails, their count is returned first.
 */
long mig_scan_written_ranges(int pagemap_fd, const struct mig_range *in,
			     size_t n_in, struct mig_range *out, size_t max_out,
			     size_t *next_in, uint64_t *walk_end);
long mig_scan_unregistered_ranges(int pagemap_fd, const struct mig_range *in,
				  size_t n_in, struct mig_range *out,
				  size_t max_out, size_t *next_in,
				  uint64_t *walk_end);

/*
 * The general form of the above: runs of pages whose PAGE_IS_* categories,
 * after flipping the bits in `inverted`, include all of `mask`; PM_SCAN_*
 * `flags`.  Soft-dirty scans use it with PAGE_IS_SOFT_DIRTY and no flags.
 */
long mig_pagemap_runs(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end,
		      uint64_t flags, uint64_t mask, uint64_t inverted);

/* Does this kernel know PAGEMAP_SCAN?  1, 0, or -errno. */
int mig_pagemap_scan_supported(int pagemap_fd);

/* ------------------------------------------------------------------ */
/* softdirty.c: soft-dirty bits.                                       */
/* ------------------------------------------------------------------ */

/* Write "4" to /proc/PID/clear_refs: clear every soft-dirty bit. */
int mig_softdirty_clear(int pid);

/*
 * Read pagemap entries of [start, end) and store the runs of pages with
 * bit 55 (soft-dirty) set as ranges, up to `max_out`; *walk_end as for
 * mig_scan_written.  Returns the number of ranges.
 */
long mig_softdirty_scan(int pagemap_fd, uint64_t start, uint64_t end,
			struct mig_range *out, size_t max_out, uint64_t *walk_end);

/* ------------------------------------------------------------------ */
/* vmread.c: batched reads of another process's memory.                */
/* ------------------------------------------------------------------ */

/*
 * Copy the `n` ranges `src` of process `pid` into `dst`, back to back
 * (dst must hold the sum of their lengths), with as few process_vm_readv
 * calls as the kernel's IOV_MAX allows.  Partial reads are continued;
 * a page that is no longer mapped is filled with zeroes and its range
 * (merged) is stored in `missing`, up to `max_missing`, *n_missing gets
 * the count.  Returns the number of bytes read from the target.
 */
long mig_vm_read(int pid, const struct mig_range *src, size_t n, void *dst,
		 struct mig_range *missing, size_t max_missing,
		 size_t *n_missing);

/* ---- crc32c.c ------------------------------------------------------------
 * CRC-32C of n bytes, continuing from crc (0 to start): the checksum of the
 * wire protocol's page batches.  Uses the CPU's CRC instruction when it has
 * one (mig_crc32c_impl() names what was chosen: "sse4.2", "armv8-crc32" or
 * "table"); mig_crc32c_table() is the portable loop, for tests.
 */
uint32_t mig_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t mig_crc32c_table(uint32_t crc, const void *data, size_t n);
const char *mig_crc32c_impl(void);

#endif /* MIGRATOR_NATIVE_H */
