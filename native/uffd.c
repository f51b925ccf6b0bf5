/*
 * userfaultfd write-protect tracking of another process's memory.
 *
 * A userfaultfd is bound to the mm of the process that calls
 * userfaultfd(2), so the target must create it itself (syscall injection);
 * we take a duplicate with pidfd_getfd and close the target's copy, which
 * leaves the target without a new fd while the registration stays ours.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "migrator_native.h"
#include "uapi_compat.h"

#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

static int close_in_target(struct mig_inject *s, long fd)
{
	long args[6] = { fd, 0, 0, 0, 0, 0 };
	long res = 0;
	int err = mig_inject_syscall(s, mig_nr_close(), args, &res);

	if (err < 0)
		return err;
	return res < 0 ? (int)res : 0;
}

static int uffd_api(int uffd, unsigned *features)
{
	struct uffdio_api api;
	__u64 want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

	/* The API handshake may be done once per fd, so ask the kernel what
	 * it offers first through a throwaway fd of our own... */
	int probe = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
	if (probe < 0)
		probe = syscall(SYS_userfaultfd, O_CLOEXEC);
	if (probe >= 0) {
		memset(&api, 0, sizeof(api));
		api.api = UFFD_API;
		if (ioctl(probe, UFFDIO_API, &api) == 0)
			want &= api.features;
		close(probe);
	}
	/* ...then enable exactly the wanted subset on the target's fd. */
	memset(&api, 0, sizeof(api));
	api.api = UFFD_API;
	api.features = want;
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		return -errno;
	*features = 0;
	if (api.features & UFFD_FEATURE_WP_ASYNC)
		*features |= MIG_UFFD_HAS_WP_ASYNC;
	if (api.features & UFFD_FEATURE_WP_UNPOPULATED)
		*features |= MIG_UFFD_HAS_WP_UNPOPULATED;
	if (!(*features & MIG_UFFD_HAS_WP_ASYNC))
		return -EOPNOTSUPP;
	return 0;
}

int mig_uffd_open(struct mig_inject *s, int pidfd, unsigned *features)
{
	/* UFFD_USER_MODE_ONLY lets the fd be created without
	 * CAP_SYS_PTRACE in the target when vm.unprivileged_userfaultfd is 0;
	 * kernels before 5.11 reject the flag, so retry without it. */
	long flags[2] = { O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY,
			  O_CLOEXEC | O_NONBLOCK };
	long tfd = -EINVAL;
	int err, ours;

	for (int i = 0; i < 2 && tfd == -EINVAL; i++) {
		long args[6] = { flags[i], 0, 0, 0, 0, 0 };
		err = mig_inject_syscall(s, mig_nr_userfaultfd(), args, &tfd);
		if (err < 0)
			return err;
	}
	if (tfd < 0)
		return (int)tfd;

	ours = syscall(SYS_pidfd_getfd, pidfd, (int)tfd, 0);
	err = ours < 0 ? -errno : 0;
	/* Whatever happened, the target must not keep the fd. */
	int cerr = close_in_target(s, tfd);
	if (err < 0)
		return err;
	if (cerr < 0) {
		close(ours);
		return cerr;
	}
	err = uffd_api(ours, features);
	if (err < 0) {
		close(ours);
		return err;
	}
	return ours;
}

int mig_uffd_open_local(unsigned *features)
{
	int fd = syscall(SYS_userfaultfd,
			 O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	int err;

	if (fd < 0 && errno == EINVAL)
		fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	err = uffd_api(fd, features);
	if (err < 0) {
		close(fd);
		return err;
	}
	return fd;
}

int mig_uffd_register_wp(int uffd, uint64_t start, uint64_t end)
{
	struct uffdio_register reg = {
		.range = { .start = start, .len = end - start },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	struct uffdio_writeprotect wp = {
		.range = { .start = start, .len = end - start },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};

	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	/* Registration alone protects nothing already mapped. */
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
		int err = -errno;
		struct uffdio_range r = { .start = start, .len = end - start };
		ioctl(uffd, UFFDIO_UNREGISTER, &r);
		return err;
	}
	return 0;
}

int mig_uffd_unregister(int uffd, uint64_t start, uint64_t end)
{
	struct uffdio_range r = { .start = start, .len = end - start };

	if (ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0) {
		/* The mapping went away (munmap, exit): nothing to undo. */
		if (errno == ENOMEM || errno == ESRCH)
			return 0;
		return -errno;
	}
	return 0;
}

/*
 * Write-protecting a never-touched page of a WP_UNPOPULATED registration
 * leaves a PTE marker, which /proc/PID/pagemap shows as a swapped-out
 * page: CRIU would dump every such page as zeroes, and restore them as
 * real zero-filled pages, costing the restored process memory its original
 * never used.  Before the final checkpoint the markers are taken out of
 * [start, end): pages that are "swapped" (a marker is), not present, and
 * not written are unprotected, which clears a marker to an empty PTE.  A
 * write to such a page afterwards is still reported (an unprotected page
 * reads as written), and a genuinely swapped-out page unprotected here is
 * reported written too: copied again, never lost.  Returns the number of
 * pages unprotected.
 */
long mig_uffd_drop_markers(int uffd, int pagemap_fd, uint64_t start, uint64_t end)
{
	struct mig_range runs[256];
	uint64_t at = start;
	long pages = 0;

	while (at < end) {
		uint64_t next = at;
		long n = mig_pagemap_runs(pagemap_fd, at, end, runs, 256, &next, 0,
					  PAGE_IS_SWAPPED | PAGE_IS_PRESENT |
					  PAGE_IS_WRITTEN,
					  PAGE_IS_PRESENT | PAGE_IS_WRITTEN);
		if (n < 0)
			return n;
		for (long i = 0; i < n; i++) {
			struct uffdio_writeprotect wp = {
				.range = { .start = runs[i].start,
					   .len = runs[i].end - runs[i].start },
				.mode = 0,	/* unprotect */
			};
			if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
				return -errno;
			pages += (long)((runs[i].end - runs[i].start) /
					(uint64_t)sysconf(_SC_PAGESIZE));
		}
		if (next <= at)
			break;
		at = next;
	}
	return pages;
}
