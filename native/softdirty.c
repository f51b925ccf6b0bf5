/*
 * Soft-dirty bits: the kernel sets bit 55 of a page's pagemap entry when
 * the page is written after "4" was written to /proc/PID/clear_refs.
 *
 * Beware: without CONFIG_MEM_SOFT_DIRTY, clear_refs still accepts "4" and
 * bit 55 simply never comes on; callers must probe the feature by effect
 * (migrator.tracking.features), not by this write succeeding.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include "migrator_native.h"

#define PM_SOFT_DIRTY (1ULL << 55)
#define CHUNK 8192 /* pagemap entries per read: 64 KiB, 32 MiB of memory */

int mig_softdirty_clear(int pid)
{
	char path[64];
	int fd, err = 0;

	snprintf(path, sizeof(path), "/proc/%d/clear_refs", pid);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (write(fd, "4", 1) != 1)
		err = -errno;
	close(fd);
	return err;
}

long mig_softdirty_scan(int pagemap_fd, uint64_t start, uint64_t end,
			struct mig_range *out, size_t max_out, uint64_t *walk_end)
{
	const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t buf[CHUNK];
	size_t total = 0;
	uint64_t addr = start;

	*walk_end = start;
	while (addr < end) {
		size_t want = (end - addr) / page;
		if (want > CHUNK)
			want = CHUNK;
		ssize_t got = pread(pagemap_fd, buf, want * sizeof(buf[0]),
				    (off_t)(addr / page * sizeof(buf[0])));
		if (got < 0)
			return -errno;
		if (got == 0)
			return -EIO;
		size_t n = (size_t)got / sizeof(buf[0]);
		for (size_t i = 0; i < n; i++) {
			uint64_t a = addr + i * page;
			if (!(buf[i] & PM_SOFT_DIRTY))
				continue;
			if (total && out[total - 1].end == a) {
				out[total - 1].end = a + page;
				continue;
			}
			if (total == max_out) {
				/* full: resume exactly at this page */
				*walk_end = a;
				return (long)total;
			}
			out[total].start = a;
			out[total].end = a + page;
			total++;
		}
		addr += n * page;
		*walk_end = addr;
	}
	return (long)total;
}
