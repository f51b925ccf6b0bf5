/*
 * Victim for tests/linux/test_inject.py: blocks in a chosen way while the
 * test injects syscalls into it, then checks that what it was doing still
 * behaved correctly.  Prints "ready" once set up, then "pass" or
 * "fail: <why>" and exits 0 / 1.
 *
 *   inject_victim nanosleep MS | clock_nanosleep MS
 *   inject_victim read              read one line from stdin, expect "hello"
 *   inject_victim futex             main thread waits on a condition that a
 *                                   helper signals after reading stdin
 *   inject_victim threads MS        writers and sleepers for MS ms
 *   inject_victim seccomp_errno | seccomp_kill | seccomp_other
 *                                   install a filter, then behave like "read"
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#endif

static int fail(const char *why)
{
	printf("fail: %s\n", why);
	fflush(stdout);
	return 1;
}

static int pass(void)
{
	printf("pass\n");
	fflush(stdout);
	return 0;
}

static void ready(void)
{
	printf("ready\n");
	fflush(stdout);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int do_sleep(int clock_variant, long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
	int64_t t0 = now_ns();
	int r;

	ready();
	if (clock_variant)
		r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
	else
		r = (int)syscall(SYS_nanosleep, &ts, NULL);
	int64_t el = now_ns() - t0;
	if (r != 0) {
		printf("fail: sleep returned %d errno %d\n", r, errno);
		return 1;
	}
	if (el < ms * 1000000) {
		printf("fail: slept %lld ns < %ld ms\n", (long long)el, ms);
		return 1;
	}
	return pass();
}

static int do_read(void)
{
	char buf[64] = { 0 };

	ready();
	ssize_t n = read(0, buf, sizeof(buf) - 1);
	if (n < 0) {
		printf("fail: read errno %d\n", errno);
		return 1;
	}
	if (strcmp(buf, "hello\n") != 0) {
		printf("fail: read %zd bytes '%s'\n", n, buf);
		return 1;
	}
	return pass();
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int flag;

static void *signaller(void *arg)
{
	char buf[64];
	(void)arg;
	if (read(0, buf, sizeof(buf)) <= 0)
		return NULL;
	pthread_mutex_lock(&mu);
	flag = 1;
	pthread_cond_signal(&cv);
	pthread_mutex_unlock(&mu);
	return NULL;
}

static int do_futex(void)
{
	pthread_t t;

	pthread_mutex_lock(&mu);
	if (pthread_create(&t, NULL, signaller, NULL))
		return fail("pthread_create");
	ready();
	while (!flag)
		pthread_cond_wait(&cv, &mu);
	pthread_mutex_unlock(&mu);
	pthread_join(t, NULL);
	return pass();
}

static volatile int stop_threads;
static volatile int thread_failed;
static char thread_why[128];

static void thread_fail(const char *why)
{
	if (!thread_failed) {
		snprintf(thread_why, sizeof(thread_why), "%s", why);
		thread_failed = 1;
	}
}

static void *writer(void *arg)
{
	unsigned id = (unsigned)(uintptr_t)arg;
	size_t n = 16384;
	unsigned *buf = malloc(n * sizeof(*buf));

	for (unsigned it = 0; !stop_threads; it++) {
		for (size_t i = 0; i < n; i++)
			buf[i] = id * 1000003u + it + (unsigned)i;
		for (size_t i = 0; i < n; i++)
			if (buf[i] != id * 1000003u + it + (unsigned)i) {
				thread_fail("writer saw a wrong value");
				break;
			}
	}
	free(buf);
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	while (!stop_threads) {
		struct timespec ts = { 0, 5000000 };
		int64_t t0 = now_ns();
		int r = nanosleep(&ts, NULL);
		if (r != 0)
			thread_fail("nanosleep failed in a thread");
		else if (now_ns() - t0 < 5000000)
			thread_fail("nanosleep in a thread was short");
	}
	return NULL;
}

static int do_threads(long ms)
{
	pthread_t t[6];
	int n = 0;

	for (int i = 0; i < 3; i++)
		if (!pthread_create(&t[n], NULL, writer, (void *)(uintptr_t)i))
			n++;
	for (int i = 0; i < 3; i++)
		if (!pthread_create(&t[n], NULL, sleeper, NULL))
			n++;
	if (n != 6)
		return fail("pthread_create");
	ready();
	{
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
		int64_t t0 = now_ns();
		if (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL) != 0)
			thread_fail("main clock_nanosleep failed");
		else if (now_ns() - t0 < ms * 1000000)
			thread_fail("main clock_nanosleep was short");
	}
	stop_threads = 1;
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	if (thread_failed)
		return fail(thread_why);
	return pass();
}

static int install(struct sock_filter *f, unsigned short len)
{
	struct sock_fprog prog = { len, f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return -1;
	return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}

/* Refuse (or kill on) syscall `nr`, allow everything else. */
static int filter_one(long nr, unsigned action)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, action),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	return install(f, sizeof(f) / sizeof(f[0]));
}

/* A second filter exercising more of cBPF: scratch memory, ALU, X, JSET
 * and a jump-always.  Logs (allows) userfaultfd when args[0] has
 * O_CLOEXEC-ish bit 0x80000 set, allows everything else. */
static int filter_busy(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_STMT(BPF_ST, 3),
		BPF_STMT(BPF_LDX | BPF_W | BPF_IMM, 2),
		BPF_STMT(BPF_ALU | BPF_MUL | BPF_X, 0),	/* A = nr*2 */
		BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 1),	/* A = nr */
		BPF_STMT(BPF_MISC | BPF_TAX, 0),
		BPF_STMT(BPF_LD | BPF_MEM, 3),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_X, 0, 1, 0),	/* A == X ? */
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JA, 3, 0, 0),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
		BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x80000, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_LOG),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	return install(f, sizeof(f) / sizeof(f[0]));
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	long ms = argc > 2 ? atol(argv[2]) : 1000;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "nanosleep"))
		return do_sleep(0, ms);
	if (!strcmp(mode, "clock_nanosleep"))
		return do_sleep(1, ms);
	if (!strcmp(mode, "read"))
		return do_read();
	if (!strcmp(mode, "futex"))
		return do_futex();
	if (!strcmp(mode, "threads"))
		return do_threads(ms);
	if (!strcmp(mode, "seccomp_errno")) {
		if (filter_busy() || filter_one(SYS_userfaultfd, SECCOMP_RET_ERRNO | EPERM))
			return fail("seccomp");
		return do_read();
	}
	if (!strcmp(mode, "seccomp_kill")) {
		if (filter_one(SYS_userfaultfd, SECCOMP_RET_KILL_PROCESS))
			return fail("seccomp");
		return do_read();
	}
	if (!strcmp(mode, "seccomp_other")) {
		if (filter_one(SYS_getppid, SECCOMP_RET_ERRNO | EACCES))
			return fail("seccomp");
		return do_read();
	}
	return fail("unknown mode");
}
