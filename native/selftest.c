/*
 * Standalone check of the native layer on the running kernel, without
 * Python: for test guests (static build, also for aarch64).
 *
 *   gcc -static -O2 -D_GNU_SOURCE -Inative native/selftest.c \
 *       native/{inject,seccomp,uffd,pagemap_scan,softdirty,vmread,crc32c}.c \
 *       -o selftest          (the units are build.py's SOURCES)
 *
 * A forked victim dirties pages on command.  uffd-wp: we inject a
 * userfaultfd into it, register its region, let it write pages 3, 7, 11,
 * ... and expect PAGEMAP_SCAN to report exactly those.  Soft-dirty: clear,
 * let it write 16 pages, count how many are reported; a kernel without
 * soft-dirty reports none, which is a finding, not a failure.
 * CRC-32C: the CPU's instruction (where chosen) must agree with the table
 * loop and with the check value.
 * Prints "selftest: PASS" (exit 0) or "selftest: FAIL <reason>" (exit 1).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "migrator_native.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define NPAGES 64
#define SD_FIRST 40	/* soft-dirty check writes pages [40, 56) */
#define SD_COUNT 16

static long page;
static pid_t victim = -1;
static int cmd_w = -1, ack_r = -1;

static int fail(const char *what, long err)
{
	if (err < 0)
		printf("selftest: FAIL %s: %s\n", what, strerror((int)-err));
	else
		printf("selftest: FAIL %s\n", what);
	if (victim > 0) {
		kill(victim, SIGKILL);
		waitpid(victim, NULL, 0);
	}
	return 1;
}

static int check_crc32c(void)
{
	unsigned char buf[4096 + 8];
	uint32_t x = 1;

	if (mig_crc32c(0, "123456789", 9) != 0xE3069283u ||
	    mig_crc32c_table(0, "123456789", 9) != 0xE3069283u)
		return fail("crc32c of \"123456789\" is not e3069283", 0);
	for (size_t i = 0; i < sizeof buf; i++) {
		x = x * 1103515245u + 12345u;
		buf[i] = (unsigned char)(x >> 16);
	}
	for (size_t off = 0; off < 8; off++)
		for (size_t n = 0; n + off <= sizeof buf; n += 1 + n / 4)
			if (mig_crc32c(7, buf + off, n) !=
			    mig_crc32c_table(7, buf + off, n))
				return fail("crc32c: the CPU instruction and the "
					    "table loop disagree", 0);
	printf("crc32c: %s, agrees with the table loop\n", mig_crc32c_impl());
	return 0;
}

static void victim_main(volatile unsigned char *mem, int cmd, int ack)
{
	char c;
	unsigned gen = 1;

	for (int i = 0; i < NPAGES; i++)	/* populate every page */
		mem[i * page] = 1;
	if (write(ack, "r", 1) != 1)
		_exit(2);
	while (read(cmd, &c, 1) == 1) {
		gen++;
		if (c == 'w')
			for (int i = 3; i < NPAGES; i += 4)
				mem[i * page + 8] = (unsigned char)gen;
		else if (c == 's')
			for (int i = SD_FIRST; i < SD_FIRST + SD_COUNT; i++)
				mem[i * page + 16] = (unsigned char)gen;
		else
			_exit(0);
		if (write(ack, "k", 1) != 1)
			_exit(2);
	}
	_exit(0);
}

/* Tell the victim to do `c` and wait until it has. */
static int command(char c)
{
	char k;
	if (write(cmd_w, &c, 1) != 1 || read(ack_r, &k, 1) != 1)
		return -EPIPE;
	return 0;
}

static int count_pages(const struct mig_range *r, long n)
{
	int count = 0;
	for (long i = 0; i < n; i++)
		count += (int)((r[i].end - r[i].start) / (uint64_t)page);
	return count;
}

int main(void)
{
	int cmd[2], ack[2];
	char c, path[64];
	struct mig_range out[NPAGES];
	uint64_t walk_end;
	unsigned features = 0;
	struct mig_inject *s;

	setvbuf(stdout, NULL, _IONBF, 0);
	page = sysconf(_SC_PAGESIZE);
	if (check_crc32c())
		return 1;
	unsigned char *mem = mmap(NULL, NPAGES * page, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || pipe(cmd) || pipe(ack))
		return fail("setup", -errno);
	uint64_t start = (uint64_t)(uintptr_t)mem, end = start + NPAGES * page;

	victim = fork();
	if (victim < 0)
		return fail("fork", -errno);
	if (victim == 0) {
		close(cmd[1]);
		close(ack[0]);
		victim_main(mem, cmd[0], ack[1]);
	}
	close(cmd[0]);
	close(ack[1]);
	cmd_w = cmd[1];
	ack_r = ack[0];
	if (read(ack_r, &c, 1) != 1)
		return fail("victim did not start", 0);
	usleep(50000);	/* let it block in read() */

	/* --- uffd-wp ---------------------------------------------------- */
	int pidfd = (int)syscall(SYS_pidfd_open, victim, 0);
	if (pidfd < 0)
		return fail("pidfd_open", -errno);
	int err = mig_inject_attach(victim, 2000, &s);
	if (err < 0)
		return fail("mig_inject_attach", err);
	long pid_seen = 0, args[6] = { 0 };
	err = mig_inject_syscall(s, SYS_getpid, args, &pid_seen);
	if (err < 0 || pid_seen != victim) {
		mig_inject_detach(s);
		return fail("injected getpid", err < 0 ? err : 0);
	}
	int uffd = mig_uffd_open(s, pidfd, &features);
	if (uffd >= 0) {
		err = mig_uffd_register_wp(uffd, start, end);
	}
	int derr = mig_inject_detach(s);
	if (uffd < 0)
		return fail("mig_uffd_open", uffd);
	if (err < 0)
		return fail("mig_uffd_register_wp", err);
	if (derr < 0)
		return fail("mig_inject_detach", derr);
	printf("uffd-wp: fd %d, features %#x\n", uffd, features);

	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)victim);
	int pm = open(path, O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		return fail("open pagemap", -errno);
	/* a first scan would report nothing: everything was just protected */
	long n = mig_scan_written(pm, start, end, out, NPAGES, &walk_end);
	if (n != 0)
		return fail(n < 0 ? "first scan" : "pages reported before any write",
			    n < 0 ? n : 0);
	if (command('w'))
		return fail("victim died", 0);
	n = mig_scan_written(pm, start, end, out, NPAGES, &walk_end);
	if (n < 0)
		return fail("mig_scan_written", n);
	/* exact comparison: the written pages are 3, 7, 11, ... */
	int cnt = count_pages(out, n);
	int ok = cnt == NPAGES / 4;
	for (long i = 0, k = 0; ok && i < n; i++)
		for (uint64_t a = out[i].start; ok && a < out[i].end; a += page, k++)
			ok = a == start + (uint64_t)(3 + 4 * k) * page;
	if (!ok)
		return fail("uffd-wp reported other pages than 3, 7, 11, ...", 0);
	printf("uffd-wp: exactly the %d written pages reported\n", cnt);
	/* and after re-protection, nothing again */
	n = mig_scan_written(pm, start, end, out, NPAGES, &walk_end);
	if (n != 0)
		return fail("pages reported twice", n < 0 ? n : 0);
	mig_uffd_unregister(uffd, start, end);
	close(uffd);
	close(pidfd);

	/* --- soft-dirty ------------------------------------------------- */
	err = mig_softdirty_clear(victim);
	if (err < 0)
		return fail("mig_softdirty_clear", err);
	if (command('s'))
		return fail("victim died", 0);
	n = mig_softdirty_scan(pm, start, end, out, NPAGES, &walk_end);
	if (n < 0)
		return fail("mig_softdirty_scan", n);
	int found = 0;
	for (long i = 0; i < n; i++)
		for (uint64_t a = out[i].start; a < out[i].end; a += page)
			if (a >= start + SD_FIRST * page &&
			    a < start + (SD_FIRST + SD_COUNT) * page)
				found++;
	if (found == 0)
		printf("soft-dirty: unavailable (0/%d written pages reported)\n", SD_COUNT);
	else
		printf("soft-dirty: available (%d/%d)\n", found, SD_COUNT);
	close(pm);
	if (found != 0 && found != SD_COUNT)
		return fail("soft-dirty reported only some written pages", 0);

	c = 'q';
	if (write(cmd_w, &c, 1) != 1)
		return fail("victim died", 0);
	int status;
	waitpid(victim, &status, 0);
	victim = -1;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return fail("victim exited badly", 0);
	printf("selftest: PASS\n");
	return 0;
}
