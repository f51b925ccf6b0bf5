/*
 * Would the target's seccomp filters let an injected syscall through?
 *
 * Injecting a syscall that a filter answers with KILL would kill the
 * target, so the caller asks first.  The filters are read back with
 * PTRACE_SECCOMP_GET_FILTER (needs CAP_SYS_ADMIN and a ptrace-stopped
 * thread) and run here by a small classic-BPF interpreter over the same
 * struct seccomp_data the kernel would build: syscall number, audit arch,
 * instruction pointer (the gadget the injection jumps to) and arguments.
 *
 * The return value is the winning action masked with
 * SECCOMP_RET_ACTION_FULL (SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, ...);
 * the data part (e.g. the errno) is dropped.  With no filter the answer
 * is MIG_SECCOMP_NONE, which the header defines as SECCOMP_RET_ALLOW
 * (0 would read as KILL_THREAD).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "migrator_native.h"

#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif
#ifndef SECCOMP_RET_ACTION_FULL
#define SECCOMP_RET_ACTION_FULL 0xffff0000U
#endif
#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif
#ifndef SECCOMP_RET_KILL_THREAD
#define SECCOMP_RET_KILL_THREAD 0x00000000U
#endif
#ifndef SECCOMP_RET_USER_NOTIF
#define SECCOMP_RET_USER_NOTIF 0x7fc00000U
#endif
#ifndef SECCOMP_RET_LOG
#define SECCOMP_RET_LOG 0x7ffc0000U
#endif

#define MAX_FILTERS 512		/* the kernel caps the total instructions too */

/* Defined in inject.c: the session's executing thread and gadget, and a
 * way to run code on its tracer thread (only the tracer may ask for the
 * filters). */
int mig_inject_tid(const struct mig_inject *s);
uint64_t mig_inject_gadget(const struct mig_inject *s);
long mig_inject_call(struct mig_inject *s, long (*fn)(void *), void *ctx);

#if defined(__x86_64__)
#define MIG_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define MIG_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

/* "Seccomp:" of /proc/PID/task/TID/status: 0, 1 (strict), 2 (filter). */
static int seccomp_mode(int tid)
{
	char path[64], line[256];
	int mode = -ENOENT;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? -ESRCH : -errno;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Seccomp: %d", &mode) == 1)
			break;
	fclose(f);
	return mode;
}

/*
 * Run one classic BPF program as seccomp does.  The programs come back
 * from the kernel as the user loaded them (before seccomp's rewrite of
 * BPF_ABS loads), and passed seccomp_check_filter, so only the opcodes
 * it accepts appear; anything else is reported as -EINVAL.
 */
static long run_bpf(const struct sock_filter *p, size_t len,
		    const struct seccomp_data *d)
{
	uint32_t A = 0, X = 0, M[BPF_MEMWORDS] = { 0 };
	const unsigned char *data = (const unsigned char *)d;

	for (size_t pc = 0; pc < len; pc++) {
		const struct sock_filter *f = &p[pc];
		uint32_t k = f->k, src;

		switch (BPF_CLASS(f->code)) {
		case BPF_LD:
			switch (BPF_MODE(f->code)) {
			case BPF_ABS:
				if (BPF_SIZE(f->code) != BPF_W || k % 4 ||
				    k + 4 > sizeof(*d))
					return -EINVAL;
				memcpy(&A, data + k, 4);
				break;
			case BPF_LEN: A = sizeof(*d); break;
			case BPF_IMM: A = k; break;
			case BPF_MEM:
				if (k >= BPF_MEMWORDS)
					return -EINVAL;
				A = M[k];
				break;
			default: return -EINVAL;
			}
			break;
		case BPF_LDX:
			switch (BPF_MODE(f->code)) {
			case BPF_LEN: X = sizeof(*d); break;
			case BPF_IMM: X = k; break;
			case BPF_MEM:
				if (k >= BPF_MEMWORDS)
					return -EINVAL;
				X = M[k];
				break;
			default: return -EINVAL;
			}
			break;
		case BPF_ST:
		case BPF_STX:
			if (k >= BPF_MEMWORDS)
				return -EINVAL;
			M[k] = BPF_CLASS(f->code) == BPF_ST ? A : X;
			break;
		case BPF_ALU:
			src = BPF_SRC(f->code) == BPF_X ? X : k;
			switch (BPF_OP(f->code)) {
			case BPF_ADD: A += src; break;
			case BPF_SUB: A -= src; break;
			case BPF_MUL: A *= src; break;
			case BPF_DIV:
			case BPF_MOD:
				/* the kernel's classic BPF ends the program
				 * with 0 on a division by zero */
				if (src == 0)
					return 0;
				A = BPF_OP(f->code) == BPF_DIV ? A / src : A % src;
				break;
			case BPF_AND: A &= src; break;
			case BPF_OR:  A |= src; break;
			case BPF_XOR: A ^= src; break;
			case BPF_LSH: A = src >= 32 ? 0 : A << src; break;
			case BPF_RSH: A = src >= 32 ? 0 : A >> src; break;
			case BPF_NEG: A = -A; break;
			default: return -EINVAL;
			}
			break;
		case BPF_JMP:
			src = BPF_SRC(f->code) == BPF_X ? X : k;
			switch (BPF_OP(f->code)) {
			case BPF_JA: pc += k; continue;
			case BPF_JEQ:  pc += A == src ? f->jt : f->jf; break;
			case BPF_JGT:  pc += A > src ? f->jt : f->jf; break;
			case BPF_JGE:  pc += A >= src ? f->jt : f->jf; break;
			case BPF_JSET: pc += (A & src) ? f->jt : f->jf; break;
			default: return -EINVAL;
			}
			break;
		case BPF_RET:
			if (BPF_RVAL(f->code) == BPF_K)
				return (long)k;
			if (BPF_RVAL(f->code) == BPF_A)
				return (long)A;
			return -EINVAL;
		case BPF_MISC:
			if (BPF_MISCOP(f->code) == BPF_TAX)
				X = A;
			else
				A = X;
			break;
		default:
			return -EINVAL;
		}
	}
	return -EINVAL;	/* fell off the end: the kernel never loads that */
}

/* The kernel's order: the action value compared as a signed int, so
 * KILL_PROCESS (0x80000000) comes first, ALLOW (0x7fff0000) last. */
static int32_t action_rank(uint32_t ret)
{
	return (int32_t)(ret & SECCOMP_RET_ACTION_FULL);
}

static long strict_verdict(long nr)
{
	/* mode 1 allows exactly these and kills the thread otherwise */
	if (nr == SYS_read || nr == SYS_write || nr == SYS_exit ||
	    nr == SYS_rt_sigreturn)
		return SECCOMP_RET_ALLOW;
	return SECCOMP_RET_KILL_THREAD;
}

#ifdef MIG_AUDIT_ARCH
struct verdict_req {
	struct mig_inject *s;
	long nr;
	const long *args;
};

static long verdict_on_tracer(void *arg)
{
	struct verdict_req *q = arg;
	struct seccomp_data d;
	long nr = q->nr, nprog, count = 0;
	const long *args = q->args;
	int tid = mig_inject_tid(q->s), mode;
	uint32_t best = SECCOMP_RET_ALLOW;

	mode = seccomp_mode(tid);
	if (mode < 0)
		return mode;
	if (mode == 0)
		return MIG_SECCOMP_NONE;
	if (mode == 1)
		return strict_verdict(nr);
	if (mode != 2)
		return -EINVAL;

	memset(&d, 0, sizeof(d));
	d.nr = (int)nr;
	d.arch = MIG_AUDIT_ARCH;
	d.instruction_pointer = mig_inject_gadget(q->s);
	for (int i = 0; i < 6; i++)
		d.args[i] = (uint64_t)args[i];

	/* Index 0 is the oldest filter.  The kernel runs the newest first
	 * and keeps a later result only if strictly more restrictive, so
	 * among equal actions the newest filter's data wins; counting
	 * first lets us walk in the same order. */
	while (count < MAX_FILTERS &&
	       ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void *)count, NULL) >= 0)
		count++;
	if (count == 0)
		return errno == ENOENT ? MIG_SECCOMP_NONE : -errno;
	if (errno != ENOENT && count < MAX_FILTERS)
		return -errno;

	for (long i = count - 1; i >= 0; i--) {
		nprog = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void *)i, NULL);
		if (nprog <= 0)
			return nprog < 0 ? -errno : -EINVAL;
		struct sock_filter *prog = calloc((size_t)nprog, sizeof(*prog));
		if (!prog)
			return -ENOMEM;
		long got = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void *)i, prog);
		long r = got == nprog ? run_bpf(prog, (size_t)nprog, &d)
				      : got < 0 ? -errno : -EAGAIN;
		free(prog);
		if (r < 0)
			return r;
		if (action_rank((uint32_t)r) < action_rank(best))
			best = (uint32_t)r;
	}
	return (long)(best & SECCOMP_RET_ACTION_FULL);
}
#endif

long mig_seccomp_verdict(struct mig_inject *s, long nr, const long args[6])
{
#ifndef MIG_AUDIT_ARCH
	(void)s; (void)nr; (void)args;
	return -ENOSYS;
#else
	struct verdict_req q = { s, nr, args };

	if (!s)
		return -EINVAL;
	return mig_inject_call(s, verdict_on_tracer, &q);
#endif
}
