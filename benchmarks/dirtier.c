/* Workload and copy floor for benchmarks/migration.py.
 *
 *   dirtier run PROGRESS SIZE_MIB RATE_MIB_S FILL
 *       FILL = random (incompressible) | half (each page's body is half
 *       random, half zero: compressible about 2x).  Maps SIZE_MIB of
 *       anonymous memory (MADV_NOHUGEPAGE: dirtying is page-granular),
 *       fills every page, writes "ready <pid>" to PROGRESS, then rewrites
 *       RATE_MIB_S worth of random pages per second (10 ms steps).
 *       Every page = header {index, generation, checksum of the body} +
 *       body.  SIGUSR1: verify every page, append "verify <pid> ok <gen>"
 *       or "verify <pid> BAD <first bad page>".  Every second: a line
 *       "tick <pid> <n> <pages rewritten>".  PROGRESS is opened, appended
 *       and closed each time: no file stays open, so CRIU can dump and
 *       restore the process anywhere /shared exists.  Start it with
 *       setsid and stdio on /dev/null.
 *
 *   dirtier floor-send PID HOST PORT
 *       The copy floor: process_vm_readv of every writable private
 *       mapping of PID (/proc/PID/maps), 2 MiB at a time, each piece sent
 *       with send(2) on one TCP connection.  Prints
 *       "bytes <n> seconds <s>" (from connect to the receiver's close).
 *   dirtier floor-recv ADDR PORT [FILE]
 *       Accepts one connection, reads everything into a 4 MiB buffer,
 *       closes, prints "bytes <n>".  Without FILE the data is discarded:
 *       the floor is a raw socket copy, no store.  With FILE a second
 *       thread writes every filled buffer to FILE (created, truncated)
 *       while the next is read: the floor plus the one write into fresh
 *       memory that any receiver keeping the pages must do.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define HDR 24

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static inline uint64_t next64(void)
{
	/* xorshift64* */
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 2685821657736338717ull;
}

static uint64_t sum_body(const uint64_t *w, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ w[i]) * 1099511628211ull + (h >> 29);
	return h;
}

static int half;		/* FILL = half */
static volatile sig_atomic_t want_verify;
static const char *progress;

static void note(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
	FILE *f = fopen(progress, "a");
	if (!f)
		return;
	va_list ap;
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	fputc('\n', f);
	fclose(f);
}

static void write_page(unsigned char *p, uint64_t idx, uint64_t gen)
{
	uint64_t *w = (uint64_t *)(p + HDR);
	size_t nw = (PAGE - HDR) / 8;
	size_t nr = half ? nw / 2 : nw;
	for (size_t i = 0; i < nr; i++)
		w[i] = next64();
	for (size_t i = nr; i < nw; i++)
		w[i] = 0;
	uint64_t *h = (uint64_t *)p;
	h[0] = idx;
	h[1] = gen;
	h[2] = sum_body(w, nw);
}

static long verify(unsigned char *mem, size_t pages)
{
	for (size_t i = 0; i < pages; i++) {
		unsigned char *p = mem + i * PAGE;
		uint64_t *h = (uint64_t *)p;
		if (h[0] != i || h[2] != sum_body((uint64_t *)(p + HDR), (PAGE - HDR) / 8))
			return (long)i;
	}
	return -1;
}

static void on_usr1(int sig)
{
	(void)sig;
	want_verify = 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int run(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: dirtier run PROGRESS SIZE_MIB RATE_MIB_S random|half\n");
		return 2;
	}
	progress = argv[2];
	size_t size = (size_t)atol(argv[3]) << 20;
	double rate = atof(argv[4]);
	half = strcmp(argv[5], "half") == 0;
	size_t pages = size / PAGE;
	rng ^= (uint64_t)getpid() * 0x2545F4914F6CDD1Dull ^ (uint64_t)(now() * 1e9);

	unsigned char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		note("error mmap %s", strerror(errno));
		return 1;
	}
	madvise(mem, size, MADV_NOHUGEPAGE);
	uint64_t gen = 1;
	for (size_t i = 0; i < pages; i++)
		write_page(mem + i * PAGE, i, gen);

	struct sigaction sa = { .sa_handler = on_usr1 };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	note("ready %d", getpid());

	double per_step = rate * 1048576.0 / PAGE / 100.0;	/* pages per 10 ms */
	double owed = 0, t_tick = now() + 1, next = now();
	unsigned long ticks = 0, rewritten = 0;
	for (;;) {
		if (want_verify) {
			want_verify = 0;
			long bad = verify(mem, pages);
			if (bad < 0)
				note("verify %d ok %llu", getpid(), (unsigned long long)gen);
			else
				note("verify %d BAD %ld", getpid(), bad);
		}
		owed += per_step;
		while (owed >= 1) {
			uint64_t i = next64() % pages;
			write_page(mem + i * PAGE, i, ++gen);
			rewritten++;
			owed -= 1;
		}
		double t = now();
		if (t >= t_tick) {
			note("tick %d %lu %lu", getpid(), ++ticks, rewritten);
			t_tick += 1;
			if (t_tick < t)	/* we were frozen: no catch-up burst */
				t_tick = t + 1;
		}
		next += 0.01;
		if (next < t - 0.1)	/* frozen or migrated: restart the clock */
			next = t;
		double d = next - now();
		if (d > 0) {
			struct timespec ts = { (time_t)d, (long)((d - (time_t)d) * 1e9) };
			nanosleep(&ts, NULL);
		}
	}
}

static int floor_send(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: dirtier floor-send PID HOST PORT\n");
		return 2;
	}
	pid_t pid = atoi(argv[2]);
	char path[64];
	snprintf(path, sizeof path, "/proc/%d/maps", pid);
	FILE *maps = fopen(path, "r");
	if (!maps) {
		perror(path);
		return 1;
	}
	struct { unsigned long s, e; } r[4096];
	int nr = 0;
	char line[512];
	while (fgets(line, sizeof line, maps) && nr < 4096) {
		unsigned long s, e;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3)
			continue;
		if (perms[0] == 'r' && perms[1] == 'w' && perms[3] == 'p' &&
		    !strstr(line, "[vvar") && !strstr(line, "[vsyscall")) {
			r[nr].s = s;
			r[nr].e = e;
			nr++;
		}
	}
	fclose(maps);

	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[4])) };
	inet_pton(AF_INET, argv[3], &a.sin_addr);
	double t0 = now();
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		perror("connect");
		return 1;
	}
	size_t chunk = 2 << 20;
	char *buf = malloc(chunk);
	unsigned long long total = 0;
	for (int k = 0; k < nr; k++) {
		for (unsigned long s = r[k].s; s < r[k].e; s += chunk) {
			size_t len = r[k].e - s < chunk ? r[k].e - s : chunk;
			struct iovec local = { buf, len }, remote = { (void *)s, len };
			ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
			if (got <= 0)
				continue;	/* a guard page or a vanished mapping */
			for (ssize_t off = 0; off < got;) {
				ssize_t n = send(fd, buf + off, got - off, 0);
				if (n < 0) {
					if (errno == EINTR)
						continue;
					perror("send");
					return 1;
				}
				off += n;
			}
			total += got;
		}
	}
	shutdown(fd, SHUT_WR);
	char c;
	while (read(fd, &c, 1) > 0)	/* the receiver closes when it has all */
		;
	double t1 = now();
	printf("bytes %llu seconds %.6f\n", total, t1 - t0);
	return 0;
}

/* floor-recv with FILE: the socket is read into a ring of buffers while a
 * second thread writes the filled ones to the file, so that receiving and
 * storing overlap (as in any receiver that keeps what it gets). */
#define RING 4
#define RING_BUF (4u << 20)

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	char *buf[RING];
	size_t len[RING];
	unsigned filled, written; /* counters; slot = counter % RING */
	int done, out, failed;
} ring = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static void *ring_writer(void *arg)
{
	for (;;) {
		pthread_mutex_lock(&ring.mu);
		while (ring.written == ring.filled && !ring.done)
			pthread_cond_wait(&ring.cv, &ring.mu);
		if (ring.written == ring.filled) {
			pthread_mutex_unlock(&ring.mu);
			return NULL;
		}
		unsigned k = ring.written % RING;
		pthread_mutex_unlock(&ring.mu);
		for (size_t done = 0; done < ring.len[k];) {
			ssize_t w = write(ring.out, ring.buf[k] + done, ring.len[k] - done);
			if (w < 0 && errno != EINTR) {
				perror("write");
				ring.failed = 1;
				break;
			}
			done += w > 0 ? (size_t)w : 0;
		}
		pthread_mutex_lock(&ring.mu);
		ring.written++;
		pthread_cond_broadcast(&ring.cv);
		pthread_mutex_unlock(&ring.mu);
	}
}

static unsigned long long recv_discard(int fd)
{
	char *buf = malloc(RING_BUF);
	unsigned long long total = 0;

	for (;;) {
		ssize_t n = read(fd, buf, RING_BUF);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return total;
		total += n;
	}
}

static unsigned long long recv_store(int fd)
{
	unsigned long long total = 0;
	pthread_t th;
	int eof = 0;

	for (int i = 0; i < RING; i++)
		ring.buf[i] = malloc(RING_BUF);
	pthread_create(&th, NULL, ring_writer, NULL);
	while (!eof) {
		pthread_mutex_lock(&ring.mu);
		while (ring.filled - ring.written == RING)
			pthread_cond_wait(&ring.cv, &ring.mu);
		unsigned k = ring.filled % RING;
		pthread_mutex_unlock(&ring.mu);
		size_t len = 0;
		while (len < RING_BUF) {
			ssize_t n = read(fd, ring.buf[k] + len, RING_BUF - len);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				eof = 1;
				break;
			}
			len += n;
		}
		total += len;
		pthread_mutex_lock(&ring.mu);
		ring.len[k] = len;
		ring.filled++;
		pthread_cond_broadcast(&ring.cv);
		pthread_mutex_unlock(&ring.mu);
	}
	pthread_mutex_lock(&ring.mu);
	ring.done = 1;
	pthread_cond_broadcast(&ring.cv);
	pthread_mutex_unlock(&ring.mu);
	pthread_join(th, NULL);
	return total;
}

static int floor_recv(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fprintf(stderr, "usage: dirtier floor-recv ADDR PORT [FILE]\n");
		return 2;
	}
	ring.out = -1;
	if (argc == 5) {
		ring.out = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (ring.out < 0) {
			perror(argv[4]);
			return 1;
		}
	}
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
	inet_pton(AF_INET, argv[2], &a.sin_addr);
	if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 1) < 0) {
		perror("bind/listen");
		return 1;
	}
	printf("listening\n");
	fflush(stdout);
	int fd = accept(ls, NULL, NULL);
	if (fd < 0) {
		perror("accept");
		return 1;
	}
	unsigned long long total = ring.out >= 0 ? recv_store(fd) : recv_discard(fd);
	close(fd);
	if (ring.out >= 0)
		close(ring.out);
	if (ring.failed)
		return 1;
	printf("bytes %llu\n", total);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "run"))
		return run(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "floor-send"))
		return floor_send(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "floor-recv"))
		return floor_recv(argc, argv);
	fprintf(stderr, "usage: dirtier run|floor-send|floor-recv ...\n");
	return 2;
}
