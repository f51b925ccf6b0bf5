/*
 * PAGEMAP_SCAN (Linux 6.7+) on another process's /proc/PID/pagemap: runs
 * of pages by page-table category, optionally write-protecting the
 * written ones again in the same walk.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>

#include "migrator_native.h"
#include "uapi_compat.h"

/*
 * Runs of pages matching `mask` in [start, end), written to `out` as merged
 * mig_range entries.  PAGEMAP_SCAN fills struct page_region (24 bytes);
 * to need no second buffer, the kernel writes them into the tail of `out`
 * and they are compacted forward into 16-byte ranges, a write never
 * overtaking a region not yet read.
 */
static long scan_runs(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end,
		      uint64_t flags, uint64_t mask, uint64_t inverted,
		      uint64_t anyof)
{
	const size_t per = sizeof(struct page_region);
	size_t total = 0;

	*walk_end = start;
	while (start < end) {
		size_t room = (max_out - total) * sizeof(*out) / per;
		if (room == 0)
			break;
		struct page_region *v = (struct page_region *)
			((char *)(out + max_out) - room * per);
		struct pm_scan_arg arg = {
			.size = sizeof(arg),
			.flags = flags,
			.start = start,
			.end = end,
			.vec = (uintptr_t)v,
			.vec_len = room,
			.category_inverted = inverted,
			.category_mask = mask,
			.category_anyof_mask = anyof,
			.return_mask = mask | anyof,
		};
		long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		if (n < 0)
			return -errno;
		for (long i = 0; i < n; i++) {
			uint64_t s = v[i].start, e = v[i].end;
			if (total && out[total - 1].end == s) {
				out[total - 1].end = e;
			} else {
				out[total].start = s;
				out[total].end = e;
				total++;
			}
		}
		start = arg.walk_end;
		*walk_end = start;
	}
	return (long)total;
}

long mig_pagemap_runs(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end,
		      uint64_t flags, uint64_t mask, uint64_t inverted)
{
	return scan_runs(pagemap_fd, start, end, out, max_out, walk_end,
			 flags, mask, inverted, 0);
}

long mig_scan_written(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end)
{
	return mig_pagemap_runs(pagemap_fd, start, end, out, max_out,
				walk_end,
				PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
				PAGE_IS_WRITTEN, 0);
}

long mig_scan_present(int pagemap_fd, uint64_t start, uint64_t end,
		      struct mig_range *out, size_t max_out, uint64_t *walk_end)
{
	return mig_pagemap_runs(pagemap_fd, start, end, out, max_out, walk_end,
				0, PAGE_IS_PRESENT, 0);
}

long mig_scan_unregistered(int pagemap_fd, uint64_t start, uint64_t end,
			   struct mig_range *out, size_t max_out,
			   uint64_t *walk_end)
{
	/* PAGE_IS_WPALLOWED is a property of the whole VMA, so the kernel
	 * skips registered VMAs without walking their page tables. */
	return mig_pagemap_runs(pagemap_fd, start, end, out, max_out,
				walk_end, 0, PAGE_IS_WPALLOWED,
				PAGE_IS_WPALLOWED);
}

int mig_pagemap_scan_supported(int pagemap_fd)
{
	/* An empty range is a valid no-op scan on kernels that know the
	 * ioctl; older kernels answer ENOTTY. */
	struct pm_scan_arg arg = { .size = sizeof(arg) };

	if (ioctl(pagemap_fd, PAGEMAP_SCAN, &arg) == 0)
		return 1;
	if (errno == ENOTTY || errno == EINVAL)
		return 0;
	return -errno;
}

/*
 * The same scans over many ranges in one call (one per registered mapping
 * is typical): the per-call cost from Python is then paid once per
 * collect, not once per mapping.  *next_in and *walk_end say where to
 * start and, on return, where to continue: the range index and the
 * address inside it.  An error is returned with *next_in naming the range
 * that failed; the caller may skip it and call again.
 */
static long scan_many(int pagemap_fd, const struct mig_range *in, size_t n_in,
		      struct mig_range *out, size_t max_out, size_t *next_in,
		      uint64_t *walk_end, uint64_t flags, uint64_t mask,
		      uint64_t inverted)
{
	size_t total = 0;

	while (*next_in < n_in && total < max_out) {
		const struct mig_range *r = &in[*next_in];
		uint64_t from = *walk_end > r->start ? *walk_end : r->start;
		uint64_t stop = from;
		long n = scan_runs(pagemap_fd, from, r->end, out + total,
				   max_out - total, &stop, flags, mask,
				   inverted, 0);
		if (n < 0) {
			*walk_end = from;
			return total ? (long)total : n;
		}
		/* runs of one range may touch the previous range's last run */
		if (n && total && out[total - 1].end == out[total].start) {
			out[total - 1].end = out[total].end;
			for (long i = 1; i < n; i++)
				out[total + i - 1] = out[total + i];
			n--;
		}
		total += (size_t)n;
		if (stop < r->end) {	/* out is full */
			*walk_end = stop;
			return (long)total;
		}
		(*next_in)++;
		*walk_end = 0;
	}
	return (long)total;
}

long mig_scan_written_ranges(int pagemap_fd, const struct mig_range *in,
			     size_t n_in, struct mig_range *out, size_t max_out,
			     size_t *next_in, uint64_t *walk_end)
{
	return scan_many(pagemap_fd, in, n_in, out, max_out, next_in, walk_end,
			 PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
			 PAGE_IS_WRITTEN, 0);
}

long mig_scan_unregistered_ranges(int pagemap_fd, const struct mig_range *in,
				  size_t n_in, struct mig_range *out,
				  size_t max_out, size_t *next_in,
				  uint64_t *walk_end)
{
	return scan_many(pagemap_fd, in, n_in, out, max_out, next_in, walk_end,
			 0, PAGE_IS_WPALLOWED, PAGE_IS_WPALLOWED);
}
