/*
 * Batched reads of another process's memory with process_vm_readv.
 *
 * One call moves many ranges (up to IOV_MAX iovecs on each side).  The
 * kernel stops at the first remote range it cannot read and returns what
 * it copied so far, so a short read means "continue after this point";
 * when even the first page of the remainder fails, that page is gone
 * (unmapped meanwhile): it is zero-filled, recorded and skipped.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "migrator_native.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static void note_missing(struct mig_range *missing, size_t max_missing,
			 size_t *n_missing, uint64_t start, uint64_t end)
{
	size_t k = *n_missing;

	if (k && missing[k - 1].end == start) {
		missing[k - 1].end = end;
		return;
	}
	if (k < max_missing) {
		missing[k].start = start;
		missing[k].end = end;
		*n_missing = k + 1;
	}
	/* more than the caller can take: the count stays, content is zero */
}

long mig_vm_read(int pid, const struct mig_range *src, size_t n, void *dst,
		 struct mig_range *missing, size_t max_missing,
		 size_t *n_missing)
{
	const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	struct iovec remote[IOV_MAX];
	struct iovec local;
	char *out = dst;
	size_t i = 0;
	uint64_t off = 0; /* bytes of src[i] already done */
	long total = 0;

	*n_missing = 0;
	while (i < n) {
		/* gather up to IOV_MAX remote ranges starting at src[i]+off */
		size_t k = 0, len = 0;
		for (size_t j = i; j < n && k < IOV_MAX; j++, k++) {
			uint64_t s = src[j].start + (j == i ? off : 0);
			remote[k].iov_base = (void *)(uintptr_t)s;
			remote[k].iov_len = src[j].end - s;
			len += remote[k].iov_len;
		}
		local.iov_base = out;
		local.iov_len = len;
		ssize_t got = process_vm_readv(pid, &local, 1, remote, k, 0);
		if (got < 0 && errno != EFAULT && errno != ENOMEM)
			return -errno;
		if (got < 0)
			got = 0;
		total += got;
		/* advance over what was copied */
		size_t left = (size_t)got;
		while (left) {
			uint64_t rest = src[i].end - src[i].start - off;
			if (left >= rest) {
				left -= rest;
				i++;
				off = 0;
			} else {
				off += left;
				left = 0;
			}
		}
		out += got;
		if ((size_t)got == len)
			continue;
		/* the page at the stop point cannot be read: it went away */
		uint64_t a = src[i].start + off;
		uint64_t e = a + page;
		memset(out, 0, page);
		note_missing(missing, max_missing, n_missing, a, e);
		out += page;
		off += page;
		if (src[i].start + off >= src[i].end) {
			i++;
			off = 0;
		}
	}
	return total;
}
