/*
 * Run syscalls inside another process through ptrace.
 *
 * Every thread of the target is seized and stopped (PTRACE_SEIZE +
 * PTRACE_INTERRUPT), then one thread is pointed at a syscall instruction
 * that already exists in the target's executable memory (preferably the
 * vDSO), run through one syscall with PTRACE_SYSCALL, and given its
 * registers back.
 *
 * We never write to the target's text.  If the migrator is SIGKILLed in
 * the middle of a session, the kernel detaches every tracee; with text
 * untouched the damage is limited to the registers of the one thread that
 * was executing the injected syscall (and only if the kill lands inside
 * that window), instead of a corrupted instruction that every thread of
 * the target may run into.
 */
#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "migrator_native.h"

#if defined(__x86_64__) || defined(__aarch64__)
#define MIG_INJECT_SUPPORTED 1
#endif

#ifndef NT_ARM_SYSTEM_CALL
#define NT_ARM_SYSTEM_CALL 0x404
#endif

/* Kernel-internal restart codes, visible to a tracer in the return
 * register of a syscall that was interrupted by our stop. */
#define ERESTARTSYS_           512
#define ERESTARTNOINTR_        513
#define ERESTARTNOHAND_        514
#define ERESTART_RESTARTBLOCK_ 516

#define MAX_DEFERRED 16

struct mig_inject {
	int pid;
	int *tids;		/* every seized thread */
	size_t ntids, cap;
	int exec_tid;		/* thread that runs injected syscalls */
	uint64_t gadget;	/* address of a syscall instruction */
	int have_saved;		/* saved regs must be written back */
	int dirty;		/* exec_tid's registers are not the saved ones */
#ifdef __x86_64__
	struct user_regs_struct saved;
#elif defined(__aarch64__)
	struct user_regs_struct saved;
#endif
	struct { int tid, sig; } deferred[MAX_DEFERRED];
	int ndeferred;
	sigset_t oldmask;
	int mask_set;

	/* The tracer thread and its mailbox (see "Tracer thread" below). */
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int op;			/* OP_*, 0 when idle */
	long ret;
	int timeout_ms;
	long nr;
	const long *args;
	long *result;
	long (*fn)(void *);
	void *ctx;
};

enum { OP_IDLE, OP_ATTACH, OP_SYSCALL, OP_CALL, OP_DETACH };

/* For seccomp.c: which thread runs the syscalls, and from where. */
int mig_inject_tid(const struct mig_inject *s) { return s->exec_tid; }
uint64_t mig_inject_gadget(const struct mig_inject *s) { return s->gadget; }

long mig_nr_userfaultfd(void) { return SYS_userfaultfd; }
long mig_nr_close(void) { return SYS_close; }

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void nap(void)
{
	struct timespec ts = { 0, 1000000 }; /* 1 ms */
	nanosleep(&ts, NULL);
}

static void defer_signal(struct mig_inject *s, int tid, int sig)
{
	/* Overflow only drops duplicates of standard signals in practice;
	 * standard signals do not queue anyway. */
	for (int i = 0; i < s->ndeferred; i++)
		if (s->deferred[i].tid == tid && s->deferred[i].sig == sig &&
		    sig < SIGRTMIN)
			return;
	if (s->ndeferred < MAX_DEFERRED) {
		s->deferred[s->ndeferred].tid = tid;
		s->deferred[s->ndeferred].sig = sig;
		s->ndeferred++;
	}
}

static int has_tid(const struct mig_inject *s, int tid)
{
	for (size_t i = 0; i < s->ntids; i++)
		if (s->tids[i] == tid)
			return 1;
	return 0;
}

static int add_tid(struct mig_inject *s, int tid)
{
	if (s->ntids == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 16;
		int *t = realloc(s->tids, cap * sizeof(*t));
		if (!t)
			return -ENOMEM;
		s->tids = t;
		s->cap = cap;
	}
	s->tids[s->ntids++] = tid;
	return 0;
}

static void drop_tid(struct mig_inject *s, size_t i)
{
	s->tids[i] = s->tids[--s->ntids];
}

/* A zombie thread (e.g. a leader that called pthread_exit) never stops. */
static int is_zombie(int pid, int tid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", pid, tid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = 0;
	char *p = strrchr(buf, ')');	/* comm may contain anything */
	return !p || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X';
}

/*
 * Wait until `tid` is in a ptrace-stop that we can use, i.e. the trap
 * requested by PTRACE_INTERRUPT.  A group-stop (the target was SIGSTOPped)
 * is not ours: running code in a job-control-stopped process would undo
 * the user's stop, so such a thread is treated as one that never stops.
 * Returns 0, -ESRCH if the thread died, -ETIMEDOUT at the deadline.
 */
static int wait_interrupt_stop(struct mig_inject *s, int tid, int64_t deadline)
{
	int status;

	for (;;) {
		pid_t r = waitpid(tid, &status, __WALL | WNOHANG);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno == ECHILD ? -ESRCH : -errno;
		}
		if (r == 0) {
			if (now_ms() >= deadline)
				return -ETIMEDOUT;
			nap();
			continue;
		}
		if (WIFEXITED(status) || WIFSIGNALED(status))
			return -ESRCH;
		if (!WIFSTOPPED(status))
			continue;
		int sig = WSTOPSIG(status);
		if ((status >> 16) == PTRACE_EVENT_STOP) {
			if (sig == SIGTRAP)
				return 0;
			continue;	/* group-stop: wait for the deadline */
		}
		/* A signal-delivery-stop that beat our interrupt: let the
		 * signal be delivered now (with its siginfo intact); the
		 * pending interrupt traps right after. */
		if (ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig) < 0 &&
		    errno == ESRCH)
			return -ESRCH;
	}
}

static int list_and_seize(struct mig_inject *s, int *added)
{
	char path[64];
	struct dirent *d;
	DIR *dir;
	int err = 0;

	*added = 0;
	snprintf(path, sizeof(path), "/proc/%d/task", s->pid);
	dir = opendir(path);
	if (!dir)
		return errno == ENOENT ? -ESRCH : -errno;
	while ((d = readdir(dir))) {
		int tid = atoi(d->d_name);
		if (tid <= 0 || has_tid(s, tid))
			continue;
		if (is_zombie(s->pid, tid))
			continue;
		if (ptrace(PTRACE_SEIZE, tid, 0, (void *)PTRACE_O_TRACESYSGOOD) < 0) {
			if (errno == ESRCH)
				continue;	/* exited meanwhile */
			err = -errno;
			break;
		}
		if ((err = add_tid(s, tid)) < 0) {
			ptrace(PTRACE_DETACH, tid, 0, 0);	/* not stopped yet: best effort */
			break;
		}
		ptrace(PTRACE_INTERRUPT, tid, 0, 0);
		(*added)++;
	}
	closedir(dir);
	return err;
}

/* Stop every thread; stopped threads cannot clone, so re-listing until no
 * new thread shows up catches threads created while we were seizing. */
static int stop_all(struct mig_inject *s, int64_t deadline)
{
	size_t waited = 0;
	int added, err;

	for (;;) {
		if ((err = list_and_seize(s, &added)) < 0)
			return err;
		if (!added && waited == s->ntids)
			break;
		while (waited < s->ntids) {
			err = wait_interrupt_stop(s, s->tids[waited], deadline);
			if (err == -ESRCH) {
				drop_tid(s, waited);
				continue;
			}
			if (err < 0)
				return err;
			waited++;
		}
	}
	return s->ntids ? 0 : -ESRCH;
}

/* ---------------------------------------------------------------- */
/* Finding a syscall instruction                                    */
/* ---------------------------------------------------------------- */

static uint64_t scan_chunk(const unsigned char *b, size_t n, uint64_t base)
{
#ifdef __x86_64__
	for (size_t i = 0; i + 1 < n; i++)
		if (b[i] == 0x0f && b[i + 1] == 0x05)
			return base + i;
#elif defined(__aarch64__)
	for (size_t i = (size_t)((4 - base % 4) % 4); i + 4 <= n; i += 4) {
		uint32_t insn;
		memcpy(&insn, b + i, 4);
		if (insn == 0xd4000001u)	/* svc #0 */
			return base + i;
	}
#endif
	return 0;
}

static uint64_t scan_range(int memfd, uint64_t start, uint64_t end)
{
	static const size_t CH = 65536;
	unsigned char *buf = malloc(CH);
	uint64_t found = 0;

	if (!buf)
		return 0;
	for (uint64_t a = start; a < end && !found;) {
		size_t want = end - a < CH ? (size_t)(end - a) : CH;
		ssize_t n = pread(memfd, buf, want, (off_t)a);
		if (n <= 0)
			break;
		found = scan_chunk(buf, (size_t)n, a);
		/* overlap so that an instruction across chunks is seen */
		a += (uint64_t)n > 4 ? (uint64_t)n - 3 : (uint64_t)n;
		if ((size_t)n < want)
			break;
	}
	free(buf);
	return found;
}

static int find_gadget(struct mig_inject *s)
{
	char path[64], line[512];
	FILE *maps;
	int memfd;

	snprintf(path, sizeof(path), "/proc/%d/mem", s->pid);
	memfd = open(path, O_RDONLY | O_CLOEXEC);
	if (memfd < 0)
		return -errno;
	snprintf(path, sizeof(path), "/proc/%d/maps", s->pid);
	maps = fopen(path, "re");
	if (!maps) {
		int err = -errno;
		close(memfd);
		return err;
	}
	s->gadget = 0;
	/* pass 0: the vDSO (always mapped by the kernel, never rewritten by
	 * the program); pass 1: any other readable executable mapping. */
	for (int pass = 0; pass < 2 && !s->gadget; pass++) {
		rewind(maps);
		while (!s->gadget && fgets(line, sizeof(line), maps)) {
			unsigned long long lo, hi;
			char perms[8];
			if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) != 3)
				continue;
			if (perms[0] != 'r' || perms[2] != 'x')
				continue;
			int vdso = strstr(line, "[vdso]") != NULL;
			if (vdso != (pass == 0))
				continue;
			s->gadget = scan_range(memfd, lo, hi);
		}
	}
	fclose(maps);
	close(memfd);
	return s->gadget ? 0 : -ENOENT;
}

/* ---------------------------------------------------------------- */
/* Registers                                                        */
/* ---------------------------------------------------------------- */

#ifdef __x86_64__
typedef struct user_regs_struct regs_t;
#define INSN_LEN 2

static int get_regs(int tid, regs_t *r)
{
	return ptrace(PTRACE_GETREGS, tid, 0, r) < 0 ? -errno : 0;
}

static int set_regs(int tid, const regs_t *r)
{
	return ptrace(PTRACE_SETREGS, tid, 0, r) < 0 ? -errno : 0;
}

static uint64_t regs_ip(const regs_t *r) { return r->rip; }
static long regs_ret(const regs_t *r) { return (long)r->rax; }

static void regs_setup(regs_t *r, uint64_t gadget, long nr, const long a[6])
{
	r->rip = gadget;
	r->rax = (unsigned long)nr;
	/* orig_rax = -1: no syscall in progress, so the kernel's restart
	 * fix-up on resume leaves our ip/rax alone. */
	r->orig_rax = (unsigned long)-1;
	r->rdi = a[0]; r->rsi = a[1]; r->rdx = a[2];
	r->r10 = a[3]; r->r8 = a[4]; r->r9 = a[5];
}

/*
 * A thread stopped while blocked in a syscall shows orig_rax >= 0 and a
 * restart code in rax; the kernel rewinds ip and reloads rax only after
 * the stop returns (arch_do_signal_or_restart), and it looks at the
 * registers it then finds.  We will have replaced them, so do the same
 * fix-up in what we restore, and clear orig_rax so it is not done twice.
 */
static void regs_fix_restart(regs_t *r)
{
	if ((long)r->orig_rax < 0)
		return;
	switch (-(long)r->rax) {
	case ERESTARTSYS_:
	case ERESTARTNOINTR_:
	case ERESTARTNOHAND_:
		r->rax = r->orig_rax;
		r->rip -= INSN_LEN;
		break;
	case ERESTART_RESTARTBLOCK_:
		r->rax = SYS_restart_syscall;
		r->rip -= INSN_LEN;
		break;
	default:
		return;
	}
	r->orig_rax = (unsigned long)-1;
}

#elif defined(__aarch64__)
typedef struct user_regs_struct regs_t;
#define INSN_LEN 4

static int get_regs(int tid, regs_t *r)
{
	struct iovec iov = { r, sizeof(*r) };
	return ptrace(PTRACE_GETREGSET, tid, (void *)NT_PRSTATUS, &iov) < 0 ? -errno : 0;
}

static int set_regs(int tid, const regs_t *r)
{
	struct iovec iov = { (void *)r, sizeof(*r) };
	return ptrace(PTRACE_SETREGSET, tid, (void *)NT_PRSTATUS, &iov) < 0 ? -errno : 0;
}

static int set_sysno(int tid, int no)
{
	struct iovec iov = { &no, sizeof(no) };
	return ptrace(PTRACE_SETREGSET, tid, (void *)NT_ARM_SYSTEM_CALL, &iov) < 0 ? -errno : 0;
}

static uint64_t regs_ip(const regs_t *r) { return r->pc; }
static long regs_ret(const regs_t *r) { return (long)r->regs[0]; }

static void regs_setup(regs_t *r, uint64_t gadget, long nr, const long a[6])
{
	r->pc = gadget;
	r->regs[8] = (unsigned long)nr;
	for (int i = 0; i < 6; i++)
		r->regs[i] = (unsigned long)a[i];
}

/* arm64 rewinds pc and reloads x0 before reporting the stop (do_signal),
 * so the saved registers already restart the syscall.  Only a
 * RESTART_RESTARTBLOCK syscall loses its restart_syscall substitution
 * (done after the stop only if pc is unchanged): it is restarted as the
 * original syscall, e.g. a relative sleep starts over. */
static void regs_fix_restart(regs_t *r) { (void)r; }
#endif

#ifdef MIG_INJECT_SUPPORTED
/* Put the saved registers back on exec_tid (which must be stopped). */
static int restore_regs(struct mig_inject *s)
{
	int err;

	if (!s->have_saved || !s->dirty)
		return 0;
	if ((err = set_regs(s->exec_tid, &s->saved)) < 0)
		return err;
#ifdef __aarch64__
	/* Leave no syscall "in progress", or the exit path could apply a
	 * restart fix-up to the registers we just restored. */
	if ((err = set_sysno(s->exec_tid, -1)) < 0)
		return err;
#endif
	s->dirty = 0;
	return 0;
}

static int pick_exec_tid(struct mig_inject *s)
{
	s->exec_tid = s->tids[0];
	for (size_t i = 0; i < s->ntids; i++)
		if (s->tids[i] == s->pid)
			s->exec_tid = s->pid;
	return 0;
}
#endif

/* ---------------------------------------------------------------- */
/* Caller's signal mask                                             */
/* ---------------------------------------------------------------- */

static void block_signals(struct mig_inject *s)
{
	static const int sigs[] = { SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE,
				    SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM,
				    SIGPROF, SIGTSTP, SIGTTIN, SIGTTOU,
				    SIGXCPU, SIGXFSZ };
	sigset_t set;

	sigemptyset(&set);
	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaddset(&set, sigs[i]);
	s->mask_set = pthread_sigmask(SIG_BLOCK, &set, &s->oldmask) == 0;
}

static void unblock_signals(struct mig_inject *s)
{
	if (s->mask_set)
		pthread_sigmask(SIG_SETMASK, &s->oldmask, NULL);
	s->mask_set = 0;
}


/* ---------------------------------------------------------------- */
/* Work done on the tracer thread                                   */
/* ---------------------------------------------------------------- */

/* Undo everything: registers, then let every thread go. */
static int do_detach(struct mig_inject *s)
{
	int err = 0;

#ifdef MIG_INJECT_SUPPORTED
	err = restore_regs(s);
#endif
	for (size_t i = 0; i < s->ntids; i++)
		if (ptrace(PTRACE_DETACH, s->tids[i], 0, 0) < 0 &&
		    errno != ESRCH && !err)
			err = -errno;
	s->ntids = 0;
	/* Only once the target runs again: suppressed signals go back to
	 * the thread that would have received them.  Their original
	 * siginfo (sender, si_code, value) is lost: tgkill makes SI_TKILL. */
	for (int i = 0; i < s->ndeferred; i++)
		syscall(SYS_tgkill, s->pid, s->deferred[i].tid, s->deferred[i].sig);
	s->ndeferred = 0;
	return err;
}

static int do_attach(struct mig_inject *s)
{
#ifndef MIG_INJECT_SUPPORTED
	return -ENOSYS;
#else
	int err = stop_all(s, now_ms() + (s->timeout_ms > 0 ? s->timeout_ms : 0));
	if (!err)
		err = find_gadget(s);
	if (!err)
		err = pick_exec_tid(s);
	return err;
#endif
}

#ifdef MIG_INJECT_SUPPORTED
/*
 * Resume exec_tid with PTRACE_SYSCALL until its next syscall stop.
 * Signals arriving meanwhile are suppressed and remembered, to be sent
 * again after detach; other stops (group-stop, interrupt traps) are just
 * resumed.  Gives up at `deadline` (the session's timeout) with the
 * thread stopped again, so that its registers can be restored.
 */
static int run_to_syscall_stop(struct mig_inject *s, int64_t deadline)
{
	int tid = s->exec_tid, status;
	int sig = 0, interrupted = 0;

	for (int guard = 0; guard < 1000; guard++) {
		if (ptrace(PTRACE_SYSCALL, tid, 0, (void *)(long)sig) < 0)
			return -errno;
		sig = 0;
		pid_t r;
		for (;;) {
			r = waitpid(tid, &status, __WALL | WNOHANG);
			if (r != 0 && !(r < 0 && errno == EINTR))
				break;
			if (r == 0 && now_ms() >= deadline) {
				/* It cannot get to the syscall: a cgroup v2
				 * freezer traps it on its way out of the
				 * kernel (v2 still honours our interrupt).
				 * Stop it where it is so that its registers
				 * can be put back; the caller gets
				 * -ETIMEDOUT once that is done. */
				if (interrupted)
					return -ETIMEDOUT;	/* registers lost */
				interrupted = 1;
				ptrace(PTRACE_INTERRUPT, tid, 0, 0);
				deadline = now_ms() + 1000;
			}
			if (r == 0)
				nap();
		}
		if (r < 0)
			return errno == ECHILD ? -ESRCH : -errno;
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			/* gone (SIGKILL cannot be held back) */
			for (size_t i = 0; i < s->ntids; i++)
				if (s->tids[i] == tid)
					drop_tid(s, i);
			s->have_saved = 0;
			return -ESRCH;
		}
		if (!WIFSTOPPED(status))
			continue;
		if (interrupted && (status >> 16) == PTRACE_EVENT_STOP)
			return -ETIMEDOUT;	/* stopped: restore and report */
		if (WSTOPSIG(status) == (SIGTRAP | 0x80))
			return 0;
		if ((status >> 16) != 0)
			continue;	/* PTRACE_EVENT_STOP etc.: not a signal */
		defer_signal(s, tid, WSTOPSIG(status));
	}
	return -EIO;
}
#endif

static int do_syscall(struct mig_inject *s, long nr, const long args[6],
		      long *result)
{
#ifndef MIG_INJECT_SUPPORTED
	return -ENOSYS;
#else
	regs_t regs;
	int err, rerr;

	if (!s->ntids)
		return -ESRCH;
	if (!s->have_saved) {
		if ((err = get_regs(s->exec_tid, &s->saved)) < 0)
			return err;
		regs_fix_restart(&s->saved);
		s->have_saved = 1;
	}
	regs = s->saved;
	regs_setup(&regs, s->gadget, nr, args);
	if ((err = set_regs(s->exec_tid, &regs)) < 0)
		return err;
	s->dirty = 1;

	int64_t deadline = now_ms() + (s->timeout_ms > 0 ? s->timeout_ms : 0);
	err = run_to_syscall_stop(s, deadline);		/* entry */
	if (!err)
		err = run_to_syscall_stop(s, deadline);	/* exit */
	if (!err)
		err = get_regs(s->exec_tid, &regs);
	if (!err && regs_ip(&regs) != s->gadget + INSN_LEN)
		err = -EFAULT;	/* stopped somewhere we did not send it */
	if (!err)
		*result = regs_ret(&regs);
	if (!s->have_saved)
		return err;	/* the thread died */
	rerr = restore_regs(s);
	return err ? err : rerr;
#endif
}

/* ---------------------------------------------------------------- */
/* Tracer thread                                                    */
/* ---------------------------------------------------------------- */

/*
 * Every ptrace request of a session runs on one thread created for it,
 * because the kernel ties tracees to the tracing *thread*.  That buys a
 * clean way out: a thread that never reached a ptrace-stop (frozen by a
 * cgroup v1 freezer, say) cannot be PTRACE_DETACHed, and would trap as
 * soon as it thaws and stay stopped; when the tracer thread exits, the
 * kernel detaches all its tracees and drops such pending traps.  The
 * thread exits after a failed attach and after detach.
 */
static void *tracer_main(void *arg)
{
	struct mig_inject *s = arg;
	int quit = 0;

	while (!quit) {
		long ret = 0;
		int op;

		pthread_mutex_lock(&s->mu);
		while (s->op == OP_IDLE || s->ret != LONG_MIN)
			pthread_cond_wait(&s->cv, &s->mu);
		op = s->op;
		pthread_mutex_unlock(&s->mu);

		switch (op) {
		case OP_ATTACH:
			ret = do_attach(s);
			if (ret < 0) {
				do_detach(s);
				quit = 1;
			}
			break;
		case OP_SYSCALL:
			ret = do_syscall(s, s->nr, s->args, s->result);
			break;
		case OP_CALL:
			ret = s->fn(s->ctx);
			break;
		case OP_DETACH:
			ret = do_detach(s);
			quit = 1;
			break;
		}
		pthread_mutex_lock(&s->mu);
		s->ret = ret;
		pthread_cond_broadcast(&s->cv);
		pthread_mutex_unlock(&s->mu);
	}
	return NULL;
}

/* Hand `op` to the tracer thread and wait for its result. */
static long call(struct mig_inject *s, int op)
{
	long ret;

	pthread_mutex_lock(&s->mu);
	s->op = op;
	s->ret = LONG_MIN;
	pthread_cond_broadcast(&s->cv);
	while (s->ret == LONG_MIN)
		pthread_cond_wait(&s->cv, &s->mu);
	ret = s->ret;
	s->op = OP_IDLE;
	pthread_mutex_unlock(&s->mu);
	return ret;
}

static void destroy(struct mig_inject *s)
{
	pthread_join(s->thread, NULL);
	unblock_signals(s);
	pthread_cond_destroy(&s->cv);
	pthread_mutex_destroy(&s->mu);
	free(s->tids);
	free(s);
}

/* ---------------------------------------------------------------- */
/* Public API                                                       */
/* ---------------------------------------------------------------- */

/* Run fn(ctx) on the session's tracer thread, e.g. ptrace requests of
 * seccomp.c that only the tracer may make. */
long mig_inject_call(struct mig_inject *s, long (*fn)(void *), void *ctx)
{
	if (!s)
		return -EINVAL;
	s->fn = fn;
	s->ctx = ctx;
	return call(s, OP_CALL);
}

int mig_inject_attach(int pid, int timeout_ms, struct mig_inject **out)
{
	struct mig_inject *s;
	sigset_t all, old;
	int err;

	*out = NULL;
#ifndef MIG_INJECT_SUPPORTED
	(void)pid; (void)timeout_ms; (void)s; (void)all; (void)old; (void)err;
	return -ENOSYS;
#else
	if (pid <= 0)
		return -EINVAL;
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->pid = pid;
	s->timeout_ms = timeout_ms;
	s->ret = LONG_MIN;
	pthread_mutex_init(&s->mu, NULL);
	pthread_cond_init(&s->cv, NULL);
	block_signals(s);

	/* The tracer thread takes no signals at all: they belong to the
	 * caller's threads (the thread inherits this mask). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = -pthread_create(&s->thread, NULL, tracer_main, s);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		unblock_signals(s);
		pthread_cond_destroy(&s->cv);
		pthread_mutex_destroy(&s->mu);
		free(s);
		return err;
	}
	err = (int)call(s, OP_ATTACH);
	if (err < 0) {
		destroy(s);	/* the thread has detached and exited */
		return err;
	}
	*out = s;
	return 0;
#endif
}

int mig_inject_syscall(struct mig_inject *s, long nr, const long args[6],
		       long *result)
{
	if (!s)
		return -EINVAL;
	s->nr = nr;
	s->args = args;
	s->result = result;
	return (int)call(s, OP_SYSCALL);
}

int mig_inject_detach(struct mig_inject *s)
{
	int err;

	if (!s)
		return 0;
	err = (int)call(s, OP_DETACH);
	destroy(s);
	return err;
}
