/*
 * The C floor of one collect round: the bare kernel calls of a dirty-page
 * scan over one region of another process, timed in a C loop, with no
 * Python and none of the tracker's bookkeeping around them.
 *
 *   floor MODE PID START END        (START, END: hex or decimal addresses)
 *
 * MODE:
 *   uffd-wp          set up uffd-wp async tracking of [START, END) inside
 *                    PID the way the uffd-wp tracker does (ptrace attach,
 *                    injected userfaultfd(2) taken with pidfd_getfd,
 *                    UFFDIO_REGISTER_MODE_WP); a scan is the complete
 *                    PAGEMAP_SCAN walk with PM_SCAN_WP_MATCHING |
 *                    PM_SCAN_CHECK_WPASYNC (mig_scan_written until the walk
 *                    reaches END)
 *   soft-dirty       a scan is a pagemap read of [START, END) for bit 55
 *                    (mig_softdirty_scan) followed by clear_refs
 *   soft-dirty-scan  the same with PAGEMAP_SCAN PAGE_IS_SOFT_DIRTY
 *                    (mig_pagemap_runs) instead of the read
 *
 * Prints "ready" once set up, then reads commands from stdin:
 *   s   scan; prints "NS RANGES PAGES SUM SUMSQ": nanoseconds of the
 *       kernel calls alone, merged runs found, pages in them, and the sums
 *       of their page indices (relative to START) and of their squares,
 *       mod 2^64
 *   q   undo the tracking (UFFDIO_UNREGISTER) and exit
 * Errors print "error ..." and exit 1.  Dies with its parent.
 *
 * Build (benchmarks/collect.py does it in a temporary directory):
 *   gcc -O2 -D_GNU_SOURCE -Inative benchmarks/floor.c native/inject.c \
 *       native/seccomp.c native/uffd.c native/softdirty.c native/vmread.c \
 *       -lpthread
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "migrator_native.h"
#include "uapi_compat.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

enum mode { UFFD_WP, SOFT_DIRTY, SOFT_DIRTY_SCAN };

static int die(const char *what, long err)
{
	if (err < 0)
		printf("error %s: %s\n", what, strerror((int)-err));
	else
		printf("error %s\n", what);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	enum mode mode;
	char path[64], cmd[16];
	unsigned features = 0;
	int uffd = -1;

	if (argc != 5) {
		fprintf(stderr, "usage: floor uffd-wp|soft-dirty|soft-dirty-scan "
			"PID START END\n");
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(argv[1], "uffd-wp"))
		mode = UFFD_WP;
	else if (!strcmp(argv[1], "soft-dirty"))
		mode = SOFT_DIRTY;
	else if (!strcmp(argv[1], "soft-dirty-scan"))
		mode = SOFT_DIRTY_SCAN;
	else
		return die("unknown mode", 0);
	int pid = atoi(argv[2]);
	uint64_t start = strtoull(argv[3], NULL, 0);
	uint64_t end = strtoull(argv[4], NULL, 0);
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	if (pid <= 0 || end <= start || (start | end) % page)
		return die("bad arguments", 0);

	/* Room for the worst case (every other page written), touched now so
	 * that no scan pays for faulting it in. */
	size_t max_out = (size_t)((end - start) / page / 2 + 1);
	struct mig_range *out = malloc(max_out * sizeof(*out));
	if (!out)
		return die("malloc", -ENOMEM);
	memset(out, 0, max_out * sizeof(*out));

	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	int pm = open(path, O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		return die("open pagemap", -errno);

	if (mode == UFFD_WP) {
		struct mig_inject *s;
		int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
		if (pidfd < 0)
			return die("pidfd_open", -errno);
		int err = mig_inject_attach(pid, 2000, &s);
		if (err < 0)
			return die("mig_inject_attach", err);
		uffd = mig_uffd_open(s, pidfd, &features);
		if (uffd >= 0)
			err = mig_uffd_register_wp(uffd, start, end);
		int derr = mig_inject_detach(s);
		close(pidfd);
		if (uffd < 0)
			return die("mig_uffd_open", uffd);
		if (err < 0)
			return die("mig_uffd_register_wp", err);
		if (derr < 0)
			return die("mig_inject_detach", derr);
		if (!(features & MIG_UFFD_HAS_WP_ASYNC))
			return die("no UFFD_FEATURE_WP_ASYNC", 0);
	} else {
		int err = mig_softdirty_clear(pid);
		if (err < 0)
			return die("mig_softdirty_clear", err);
	}
	printf("ready %#x\n", features);

	while (fgets(cmd, sizeof(cmd), stdin)) {
		if (cmd[0] == 'q')
			break;
		if (cmd[0] != 's')
			return die("unknown command", 0);
		long total = 0, n = 0;
		uint64_t walk_end = start, at = start;
		uint64_t t0 = now_ns();
		while (at < end) {
			if (mode == UFFD_WP)
				n = mig_scan_written(pm, at, end, out + total,
						     max_out - total, &walk_end);
			else if (mode == SOFT_DIRTY)
				n = mig_softdirty_scan(pm, at, end, out + total,
						       max_out - total, &walk_end);
			else
				n = mig_pagemap_runs(pm, at, end, out + total,
						     max_out - total, &walk_end,
						     0, PAGE_IS_SOFT_DIRTY, 0);
			if (n < 0)
				return die("scan", n);
			total += n;
			if (walk_end <= at)
				return die("walk did not advance", 0);
			at = walk_end;
		}
		if (mode != UFFD_WP) {
			int err = mig_softdirty_clear(pid);
			if (err < 0)
				return die("mig_softdirty_clear", err);
		}
		uint64_t ns = now_ns() - t0;

		/* Outside the timed part: merge runs split across calls, and
		 * count. */
		long runs = 0;
		uint64_t pages = 0, sum = 0, sumsq = 0, last_end = 0;
		for (long i = 0; i < total; i++) {
			if (!(i && out[i].start == last_end))
				runs++;
			last_end = out[i].end;
			for (uint64_t a = out[i].start; a < out[i].end; a += page) {
				uint64_t k = (a - start) / page;
				pages++;
				sum += k;
				sumsq += k * k;
			}
		}
		printf("%llu %ld %llu %llu %llu\n", (unsigned long long)ns, runs,
		       (unsigned long long)pages, (unsigned long long)sum,
		       (unsigned long long)sumsq);
	}
	if (uffd >= 0) {
		mig_uffd_unregister(uffd, start, end);
		close(uffd);
	}
	close(pm);
	free(out);
	return 0;
}
