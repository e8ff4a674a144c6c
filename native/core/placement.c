/*
 * placement.c - where the fault thread runs: on the CPU of the thread that
 * faults, SCHED_IDLE (docs/design.md, "Where the fault thread runs").
 */
#include "internal.h"

#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

struct fault_ctx {
	struct mc_session *s;
	uint32_t last_tid;   /* the thread that faulted last */
	uint64_t next_place; /* when to look at its CPU again */
	uint64_t last_look;  /* when we last did */
	uint64_t follow_wait; /* least time between looks made because apart (FOLLOW_NS..PLACE_NS) */
	uint64_t run_delay;  /* our schedstat run-queue delay when last looked */
	uint64_t tid_run;    /* the faulting thread's CPU time then (schedstat) */
	uint32_t tid_looked; /* ... of this thread */
	int self_sched_fd;   /* our /proc schedstat, kept open: read while a fault waits */
	int tid_sched_fd;    /* ... and tid_looked's */
	uint64_t backoff_until;
	long nivcsw;         /* our involuntary context switches when we last went to sleep */
	unsigned answered;   /* drains since then that answered a fault */
	bool apart;          /* ... and not each of them made the woken thread preempt us */
	bool idle;           /* running SCHED_IDLE (following faulting threads) */
	int pinned;          /* the one CPU we are pinned to, or -1 */
	cpu_set_t cpus;      /* the affinity we started with */
	unsigned unmapped;   /* REMOVE and UNMAP events since the last starvation check */
};

/*
 * Placement.  On this kind of VM a wake-up across vCPUs costs tens of
 * microseconds each way, more than serving the fault; on the faulting
 * thread's own CPU the switch to us and back is cheap, and that thread
 * cannot run anyway while its fault waits.  So the fault thread follows
 * the thread that faults (a /proc read, ~10 us).  It also runs SCHED_IDLE:
 * otherwise, when our UFFDIO_COPY wakes the faulting thread, the scheduler
 * sees our CPU busy (with us) and wakes it on the other one, and the two
 * drift apart again; a CPU running only a SCHED_IDLE thread counts as
 * idle, so the woken thread stays.  Nobody pins anything by hand.
 *
 * When to look.  Together, the thread we wake preempts us on our way back
 * from the ioctl that woke it (it is not SCHED_IDLE, we are), and we run
 * again only when it faults next, with that fault's message waiting: we
 * never sleep between two of its faults.  Apart, each answer returns at
 * once and we sleep until the next fault, which then pays two cross-vCPU
 * wake-ups.  So before we sleep, having answered faults, one
 * getrusage(RUSAGE_THREAD) tells which (note_apart), and apart we look at
 * once (at most every FOLLOW_NS) instead of waiting for the next PLACE_NS.
 * The check costs nothing while the two run together, the case that must
 * be fast.
 *
 * Costs.  Together, whatever we do after an answer runs when we are next
 * switched in, which is while the target's next fault waits for us: a
 * /proc look there (the periodic one) took 80-130 us in an ftrace of
 * random reads with work between them.  So every PLACE_NS we first count
 * our preemptions, as above, and look only if some answer did not preempt
 * us; the run-queue delays of "The price of SCHED_IDLE" come from
 * schedstat files kept open (pread, no path walk).
 *
 * Not preempted.  SCHED_IDLE makes the woken thread preempt us only within
 * one task group: when the target sits in another (another session's
 * autogroup, another cgroup with the cpu controller), the kernel weighs the
 * two groups instead, and a target that worked a while between faults has
 * used its share: it waits for the CPU until we sleep.  Then the sign above
 * says "apart" while we are together, and each look (~10 us of /proc) keeps
 * the target waiting.  A look made because apart that finds us together
 * doubles the wait before the next such look, up to PLACE_NS; a look that
 * moves us resets it.  The scheduler moves threads for its own reasons (another task
 * woke on that CPU) several times a second under load, and a fault every
 * ~15 us makes each slow stretch hundreds of faults long.
 *
 * The balancer.  While the target works between faults, we wait runnable
 * behind it (its wake-up preempted us), pinned: the kernel's load balancer
 * sees two tasks on one CPU and none on the other, cannot move the pinned
 * one and, after a few failed tries, moves the running target (active
 * balancing), tens of times a second at ~1 ms of work a fault; each move
 * costs a fault served across vCPUs before we follow.  Not mended: it
 * would take a fault thread that is not runnable while the target works,
 * and the answer's wake-up preempts us at once (docs/design.md, "Where the fault
 * thread runs").
 *
 * The price of SCHED_IDLE: other busy threads on that CPU would starve us.
 * Our run-queue delay (schedstat) tells: above STARVED_NS per PLACE_NS we
 * become an ordinary thread on any CPU for BACKOFF_NS, then try again.
 * Waiting while the faulting thread itself runs is not starving (it is
 * what SCHED_IDLE is for: readahead goes on behind a target reading what
 * we restored), so its CPU time meanwhile does not count.  Nor is waiting
 * through an eviction: each REMOVE we read lets the target's agent go on
 * zapping (its madvise waits for us to read the event), and that thread
 * preempts us on our CPU, none of its time the faulting thread's.  A
 * period with REMOVE or UNMAP events passes no verdict: one did, leaving
 * the thread ordinary and apart from the target for the first 0.2 s of
 * the faults after every `evict` (docs/design.md, "Where the fault thread
 * runs").
 */
#define PLACE_NS 20000000ull
#define FOLLOW_NS 500000ull
#define STARVED_NS 10000000ull
#define BACKOFF_NS 200000000ull

/* Field `field` (from 1) of a /proc file open at fd, or UINT64_MAX. */
static uint64_t read_u64_field_fd(int fd, int field)
{
	char buf[1024], *p = buf;
	ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf - 1, 0);
	if (n <= 0)
		return UINT64_MAX;
	buf[n] = 0;
	if (field > 2) { /* a /proc stat line: the command name may hold spaces */
		p = strrchr(buf, ')');
		for (int f = 2; p && f < field; f++)
			p = strchr(p + 1, ' ');
	} else {
		for (int f = 1; p && f < field; f++)
			p = strchr(p + 1, ' ');
	}
	return p ? strtoull(p + (p != buf), NULL, 10) : UINT64_MAX;
}

static uint64_t read_u64_field(const char *path, int field)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	uint64_t v = read_u64_field_fd(fd, field);
	if (fd >= 0)
		close(fd);
	return v;
}

static void set_idle_policy(struct fault_ctx *fc, bool idle)
{
	struct sched_param sp = {0};
	if (sched_setscheduler(0, idle ? SCHED_IDLE : SCHED_OTHER, &sp))
		return;
	fc->idle = idle;
	if (!idle && !sched_setaffinity(0, sizeof fc->cpus, &fc->cpus)) /* the daemon's CPUs, again */
		fc->pinned = -1;
}

/*
 * About to sleep: did the last faults we answered wake a thread on another
 * CPU?  Together, every drain that answers a fault ends in an involuntary
 * switch to the thread it woke, so fewer switches than such drains since we
 * last slept means the last of them did not (other threads preempting us
 * can only hide a move until the next sleep, not invent one).
 */
static void note_apart(struct fault_ctx *fc)
{
	struct rusage ru;
	if (!fc->answered || !fc->idle || getrusage(RUSAGE_THREAD, &ru))
		return;
	fc->apart = ru.ru_nivcsw - fc->nivcsw < (long)fc->answered;
	fc->answered = 0;
	fc->nivcsw = ru.ru_nivcsw;
}

/* Every PLACE_NS: are busy threads keeping us waiting? (see "The price of SCHED_IDLE") */
static void check_starved(struct fault_ctx *fc, uint64_t now)
{
	char path[64];
	uint64_t delay, tid_run, waited;

	delay = read_u64_field_fd(fc->self_sched_fd, 2);
	if (fc->tid_looked != fc->last_tid) {
		if (fc->tid_sched_fd >= 0)
			close(fc->tid_sched_fd);
		snprintf(path, sizeof path, "/proc/%d/task/%u/schedstat", fc->s->pid, fc->last_tid);
		fc->tid_sched_fd = open(path, O_RDONLY | O_CLOEXEC);
	}
	tid_run = read_u64_field_fd(fc->tid_sched_fd, 1);
	waited = delay != UINT64_MAX && fc->run_delay ? delay - fc->run_delay : 0;
	if (tid_run != UINT64_MAX && fc->tid_looked == fc->last_tid && fc->tid_run)
		waited = waited > tid_run - fc->tid_run ? waited - (tid_run - fc->tid_run) : 0;
	fc->tid_run = tid_run == UINT64_MAX ? 0 : tid_run;
	fc->tid_looked = fc->last_tid;
	if (fc->unmapped) /* an eviction's handshake, not starving */
		waited = 0;
	fc->unmapped = 0;
	if (fc->idle && waited > STARVED_NS) {
		set_idle_policy(fc, false);
		fc->backoff_until = now + BACKOFF_NS;
		fc->s->c.fault_thread_starved++;
	} else if (!fc->idle && now >= fc->backoff_until) {
		set_idle_policy(fc, true);
	}
	fc->run_delay = delay;
}

static void follow_faulting_cpu(struct fault_ctx *fc)
{
	char path[64];
	uint64_t now = now_ns(), cpu;
	int here;
	bool periodic = now >= fc->next_place, because_apart, was_apart;
	cpu_set_t set;

	if (!tun.follow_fault_cpu) {
		if (fc->idle)
			set_idle_policy(fc, false);
		return;
	}
	if (!fc->last_tid || !(periodic || (fc->apart && now >= fc->last_look + fc->follow_wait)))
		return;
	because_apart = fc->apart && !periodic;
	was_apart = fc->apart;
	fc->apart = false;
	fc->last_look = now;
	if (periodic) {
		fc->next_place = now + PLACE_NS;
		check_starved(fc, now);
	}
	if (!fc->idle)
		return;
	if (periodic && !was_apart && fc->pinned >= 0) {
		/*
		 * Every answer since the last check preempted us: together,
		 * nothing to look for.  This runs while the next fault waits
		 * (see "Costs"), so it takes one getrusage(), not a look.
		 */
		note_apart(fc);
		if (!fc->apart)
			return;
		fc->apart = false;
	}
	snprintf(path, sizeof path, "/proc/%d/task/%u/stat", fc->s->pid, fc->last_tid);
	cpu = read_u64_field(path, 39);
	fc->s->c.fault_thread_looks++;
	here = sched_getcpu();
	if (cpu >= CPU_SETSIZE || ((int)cpu == fc->pinned && (int)cpu == here)) {
		/* together after all: the sign misled us (see "Not preempted"); trust it less */
		if (because_apart && fc->follow_wait < PLACE_NS)
			fc->follow_wait *= 2;
		return;
	}
	fc->follow_wait = FOLLOW_NS;
	/* pinned even where we are already: unpinned, the next wake-up may put us elsewhere */
	CPU_ZERO(&set);
	CPU_SET((int)cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		return;
	fc->pinned = (int)cpu;
	if ((int)cpu != here)
		fc->s->c.fault_thread_moves++;
}


struct fault_ctx *placement_new(struct mc_session *s)
{
	struct fault_ctx *fc = calloc(1, sizeof *fc);
	if (!fc)
		return NULL;
	fc->s = s;
	fc->pinned = -1;
	fc->self_sched_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
	fc->tid_sched_fd = -1;
	fc->follow_wait = FOLLOW_NS;
	sched_getaffinity(0, sizeof fc->cpus, &fc->cpus);
	if (tun.follow_fault_cpu)
		set_idle_policy(fc, true);
	return fc;
}

void placement_free(struct fault_ctx *fc)
{
	if (!fc)
		return;
	if (fc->self_sched_fd >= 0)
		close(fc->self_sched_fd);
	if (fc->tid_sched_fd >= 0)
		close(fc->tid_sched_fd);
	free(fc);
}

/* A page fault of thread `tid` was read. */
void placement_faulted(struct fault_ctx *fc, uint32_t tid)
{
	fc->last_tid = tid;
}

/* A drain read messages; `faulted`: some were faults, answered. */
void placement_after_drain(struct fault_ctx *fc, bool faulted)
{
	fc->answered += faulted;
	follow_faulting_cpu(fc);
}

/* Nothing left to read: about to sleep. */
void placement_before_sleep(struct fault_ctx *fc)
{
	note_apart(fc);
	if (fc->apart)
		follow_faulting_cpu(fc);
}

/* A REMOVE or UNMAP event was read: an eviction's handshake, maybe (see check_starved). */
void placement_unmapped(struct fault_ctx *fc)
{
	fc->unmapped++;
}
