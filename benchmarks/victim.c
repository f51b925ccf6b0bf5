/*
 * Benchmark victim: a region of anonymous memory written on command.
 *
 *   victim SIZE_MIB
 *
 * Maps SIZE_MIB of private anonymous memory with MADV_NOHUGEPAGE (so that
 * dirty tracking is page-granular: a THP is tracked, and reported, as one
 * 2 MiB unit), touches every page, then prints
 *
 *   ready <pid> <start hex> <end hex> <pages>
 *
 * and answers one line on stdout per command line read from stdin:
 *
 *   w K I1 I2 ... IK   write one byte in each listed page (indices into the
 *                      region)                     -> "ok K"
 *   f FRACTION SEED    write round(FRACTION * pages) distinct pages chosen
 *                      with SEED (xorshift, partial Fisher-Yates)
 *                                                  -> "ok K SUM SUMSQ"
 *                      (SUM, SUMSQ: sums of the page indices and of their
 *                      squares, mod 2^64, to compare with a tracker's answer)
 *   s SECONDS SEED [HOT]
 *                      spin writing one byte in random pages for SECONDS,
 *                      in the whole region, or only in its first HOT pages
 *                                                  -> "spun WRITES NS WRITES_PER_S"
 *   q                  exit
 *
 * It dies with its parent (PR_SET_PDEATHSIG), so a benchmark killed with
 * SIGKILL leaves no victim behind.  Nothing else of the process is written
 * on purpose between commands; its stack and stdio buffers are, a little.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned char *mem;
static uint64_t npages;
static long page;
static unsigned char gen = 1;

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_page(uint64_t i)
{
	/* a different offset per page, and a value that always changes */
	mem[i * page + (i % 64) * 8] = gen;
}

static void cmd_list(char *p)
{
	char *q;
	unsigned long long k = strtoull(p, &q, 10), done = 0;

	gen++;
	for (unsigned long long j = 0; j < k; j++) {
		p = q;
		unsigned long long i = strtoull(p, &q, 10);
		if (q == p)
			break;
		if (i < npages) {
			write_page(i);
			done++;
		}
	}
	printf("ok %llu\n", done);
}

static void cmd_fraction(char *p)
{
	double frac = 0;
	unsigned long long seed = 1;
	static uint32_t *perm;

	if (sscanf(p, "%lf %llu", &frac, &seed) < 1 || frac < 0 || frac > 1) {
		printf("error bad fraction\n");
		return;
	}
	uint64_t k = (uint64_t)(frac * (double)npages + 0.5);
	if (!perm) {
		perm = malloc(npages * sizeof(*perm));
		if (!perm) {
			printf("error out of memory\n");
			return;
		}
	}
	for (uint64_t i = 0; i < npages; i++)
		perm[i] = (uint32_t)i;
	uint64_t s = seed * 0x9e3779b97f4a7c15ull | 1, sum = 0, sumsq = 0;
	gen++;
	for (uint64_t j = 0; j < k; j++) {
		uint64_t r = j + xorshift(&s) % (npages - j);
		uint32_t t = perm[j];
		perm[j] = perm[r];
		perm[r] = t;
		write_page(perm[j]);
		sum += perm[j];
		sumsq += (uint64_t)perm[j] * perm[j];
	}
	printf("ok %llu %llu %llu\n", (unsigned long long)k,
	       (unsigned long long)sum, (unsigned long long)sumsq);
}

static void cmd_spin(char *p)
{
	double secs = 1;
	unsigned long long seed = 1, hot = 0;

	sscanf(p, "%lf %llu %llu", &secs, &seed, &hot);
	uint64_t n = hot && hot < npages ? hot : npages;
	uint64_t s = seed * 0x9e3779b97f4a7c15ull | 1, writes = 0;
	uint64_t t0 = now_ns(), until = t0 + (uint64_t)(secs * 1e9), t = t0;
	while (t < until) {
		for (int j = 0; j < 4096; j++) {
			uint64_t x = xorshift(&s);
			mem[(x % n) * page + ((x >> 40) & 0xff8) % page] =
				(unsigned char)x;
		}
		writes += 4096;
		t = now_ns();
	}
	double el = (double)(t - t0);
	printf("spun %llu %llu %.0f\n", (unsigned long long)writes,
	       (unsigned long long)(t - t0), writes / (el / 1e9));
}

int main(int argc, char **argv)
{
	char *line = NULL;
	size_t cap = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: victim SIZE_MIB\n");
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		return 1;	/* parent already gone */
	setvbuf(stdout, NULL, _IOLBF, 0);
	page = sysconf(_SC_PAGESIZE);
	size_t len = (size_t)strtoull(argv[1], NULL, 10) << 20;
	npages = len / page;
	if (npages == 0) {
		fprintf(stderr, "victim: empty region\n");
		return 2;
	}
	void *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED) {
		perror("victim: mmap");
		return 1;
	}
	if (madvise(m, len, MADV_NOHUGEPAGE))
		perror("victim: madvise(MADV_NOHUGEPAGE)");	/* not fatal */
	mem = m;
	for (uint64_t i = 0; i < npages; i++)
		mem[i * page] = 1;
	printf("ready %d %#lx %#lx %llu\n", (int)getpid(), (unsigned long)m,
	       (unsigned long)m + len, (unsigned long long)npages);

	while (getline(&line, &cap, stdin) > 0) {
		switch (line[0]) {
		case 'w':
			cmd_list(line + 1);
			break;
		case 'f':
			cmd_fraction(line + 1);
			break;
		case 's':
			cmd_spin(line + 1);
			break;
		case 'q':
			return 0;
		default:
			printf("error unknown command %c\n", line[0]);
		}
	}
	return 0;
}
