/*
 * fault.c - the fault service: one thread per session reads the target's
 * userfaultfd and answers every message.
 *
 * Missing fault on an evicted page: restore it (a read keeps it tracked,
 * a write takes it writable).  Missing fault on untouched memory: map
 * zeros, with the neighbours that are untouched too.  Write-protect
 * fault: the page is being dirtied, so its copy is dropped and the
 * protection lifted, except while the page is being evicted: then the
 * write is held (not answered) until the agent has freed the page, and
 * released by restoring the page writable with the saved contents, on
 * which the write then lands.  REMOVE/UNMAP/REMAP events keep the page
 * tables true to what the target did to its own memory.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <stdio.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define MSG_BATCH 64
#define RETRY_CAP 1024
#define SCRATCH_PAGES 257 /* the faulting page and the largest readahead */

struct retry {
	uint64_t addr, flags, t0;
	uint32_t tid;
};

struct fault_ctx {
	struct mc_session *s;
	uint8_t *scratch;
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
	struct retry retry[RETRY_CAP];
	unsigned nretry;
	unsigned unmapped;   /* REMOVE and UNMAP events since the last starvation check */
};

static void wake(struct mc_session *s, uint64_t addr, uint64_t len)
{
	struct uffdio_range r = {.start = addr, .len = len};
	uffd_ioctl(s, UFFDIO_WAKE, &r);
}

/* First touch of untouched memory: zeros, for the untouched neighbours too. */
static int first_touch(struct mc_session *s, struct range *r, uint64_t idx, bool write,
		       uint8_t *scratch)
{
	uint64_t w = tun.faultaround_pages ? tun.faultaround_pages : 1;
	uint64_t lo = idx - idx % w, hi = lo + w, a, b;
	uint64_t addr = r->start + (idx << PAGE_SHIFT);
	int64_t done;
	int rc;

	if (hi > r->npages)
		hi = r->npages;
	for (a = idx; a > lo && r->pages[a - 1].state == MC_UNTOUCHED; a--)
		;
	for (b = idx + 1; b < hi && r->pages[b].state == MC_UNTOUCHED; b++)
		;
	if (write) {
		/* the writer gets a real page at once; its neighbours share the zero page */
		memset(scratch, 0, PAGE);
		rc = copy_pages(s, addr, scratch, PAGE, false, &done);
		if (rc)
			return rc;
		set_state(r, &r->pages[idx], MC_RESIDENT);
		done = 0;
		if (a < idx)
			zero_pages(s, r->start + (a << PAGE_SHIFT), (idx - a) << PAGE_SHIFT, &done);
		for (uint64_t k = a; k < a + ((uint64_t)done >> PAGE_SHIFT); k++)
			set_state(r, &r->pages[k], MC_RESIDENT);
		done = 0;
		if (idx + 1 < b)
			zero_pages(s, addr + PAGE, (b - idx - 1) << PAGE_SHIFT, &done);
		for (uint64_t k = idx + 1; k < idx + 1 + ((uint64_t)done >> PAGE_SHIFT); k++)
			set_state(r, &r->pages[k], MC_RESIDENT);
	} else {
		rc = zero_pages(s, r->start + (a << PAGE_SHIFT), (b - a) << PAGE_SHIFT, &done);
		for (uint64_t k = a; k < a + ((uint64_t)done >> PAGE_SHIFT); k++)
			set_state(r, &r->pages[k], MC_RESIDENT);
		if (rc && r->pages[idx].state != MC_RESIDENT)
			return rc;
	}
	s->c.faultaround_pages += b - a - 1;
	return 0;
}

/*
 * Sequential faults on evicted pages pull the next pages in after the
 * faulting one is served, in a window that doubles while the pattern
 * holds (as the kernel's readahead does).
 */
static void read_ahead(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch)
{
	uint64_t addr = r->start + (idx << PAGE_SHIFT), n;
	uint32_t max = tun.readahead_max_pages;

	if (max > SCRATCH_PAGES - 1)
		max = SCRATCH_PAGES - 1;
	if (!max) {
		s->ra_window = 0;
		return;
	}
	if (addr == s->last_fault_addr + PAGE || (s->ra_window && addr == s->ra_expect))
		s->ra_window = s->ra_window ? (s->ra_window * 2 > max ? max : s->ra_window * 2)
					    : (max < 4 ? max : 4);
	else
		s->ra_window = 0;
	s->last_fault_addr = addr;
	s->ra_expect = addr + PAGE;
	if (!s->ra_window || idx + 1 >= r->npages)
		return;
	n = r->npages - idx - 1 < s->ra_window ? r->npages - idx - 1 : s->ra_window;
	n = restore_run(s, r, idx + 1, n, false, scratch);
	s->c.readahead_pages += n;
	s->ra_expect = addr + PAGE + (s->ra_window << PAGE_SHIFT);
	if (n)
		trace_add(s, MC_TR_READAHEAD, r->index, idx + 1, n, 0, 0);
}

/* Serve one page fault (s->lock held); returns -EAGAIN when it must be tried again later. */
static int serve_fault(struct fault_ctx *fc, uint64_t fault_addr, uint64_t flags, uint32_t tid,
		       uint64_t t0)
{
	struct mc_session *s = fc->s;
	uint64_t addr = fault_addr & ~(uint64_t)(PAGE - 1), idx;
	bool held = false;
	uint16_t kind = 0;
	uint64_t answered = 0;
	struct range *r;
	struct page *p;
	int rc = 0;

	r = range_of(s, addr);
	if (!r) {
		s->c.anomalies++;
		wake(s, addr, PAGE);
		return 0;
	}
	idx = (addr - r->start) >> PAGE_SHIFT;
	p = &r->pages[idx];
	if ((p->flags & MC_PF_SAMPLED) && !(flags & UFFD_PAGEFAULT_FLAG_WP)) {
		rc = sample_fault(s, r, idx, fc->scratch);
		if (rc == -EEXIST) {
			wake(s, addr, PAGE);
			rc = 0;
		}
		return rc;
	}
	p->stamp_ms = (uint32_t)(t0 / 1000000u);

	answer_issued_ns = &answered;
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		s->c.faults_wp++;
		if (p->flags & MC_PF_PREFETCHED)
			s->c.prefetch_hits++;
		p->flags &= (uint8_t)~(MC_PF_PREFETCHED | MC_PF_INCOMPRESSIBLE | MC_PF_COMPRESSING);
		if (p->state == MC_EVICTING && !tun.debug_unsafe_evict) {
			/* the agent may be dropping this page right now: the write must wait */
			p->flags |= MC_PF_HELD;
			s->c.faults_held++;
			held = true;
			kind = MC_TR_HELD;
		} else {
			/* (with debug_unsafe_evict an EVICTING page keeps its stale copy: the bug on purpose) */
			if (p->state == MC_CLEAN) {
				drop_copy(s, r, p);
				set_state(r, p, MC_RESIDENT);
			}
			rc = wp_range(s, addr, PAGE, false);
			kind = MC_TR_WRITE;
		}
	} else {
		bool write = flags & UFFD_PAGEFAULT_FLAG_WRITE;
		s->c.faults_missing++;
		if (p->flags & MC_PF_PREFETCH_PENDING)
			s->c.prefetch_misses++;
		p->flags &= (uint8_t)~(MC_PF_PREFETCH_PENDING | MC_PF_PREFETCHED);
		switch (p->state) {
		case MC_COMPRESSED:
		case MC_EVICTING: /* the agent dropped it already; the copy is good */
		case MC_ZERO:
			kind = p->state == MC_ZERO ? MC_TR_ZEROFILL : MC_TR_FAULT;
			rc = restore_page(s, r, idx, write, fc->scratch);
			if (!rc) {
				s->c.promotions++;
				p->flags &= (uint8_t)~MC_PF_HELD; /* the copy woke any held writer */
				read_ahead(s, r, idx, fc->scratch); /* zero pages too: they are part of a sweep */
			}
			break;
		case MC_UNTOUCHED:
			rc = first_touch(s, r, idx, write, fc->scratch);
			break;
		default: {
			/*
			 * Present as far as we know: usually a stale fault that a
			 * prefetch or another thread's fault already answered (then
			 * the page is there: EEXIST, and the thread just retries).
			 * Really missing means it was dropped behind our back.
			 */
			int64_t done;
			rc = zero_pages(s, addr, PAGE, &done);
			if (!rc) {
				s->c.anomalies++;
				drop_copy(s, r, p);
				set_state(r, p, MC_RESIDENT);
			}
			break;
		}
		}
	}
	if (rc == -EEXIST) {
		/* someone else put the page there: let the faulting thread retry */
		wake(s, addr, PAGE);
		rc = 0;
	}
	answer_issued_ns = NULL;
	if (rc != -EAGAIN && !held) {
		/* to the answer (see answer_issued_ns), not the read-ahead after it */
		uint64_t ns = (answered ? answered : now_ns()) - t0;
		hist_add(s, ns);
		if (kind)
			trace_add(s, kind, r->index, idx, 1, ns, tid);
	} else if (held) {
		trace_add(s, MC_TR_HELD, r->index, idx, 1, 0, tid);
	}
	return rc == -EAGAIN ? -EAGAIN : 0;
}

/* The target removed or unmapped [start, end) itself: those pages read as zeros now. */
static void forget_pages(struct mc_session *s, uint64_t start, uint64_t end, bool unmap)
{
	if (unmap)
		s->c.events_unmap++;
	else
		s->c.events_remove++;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = &s->ranges[i];
		uint64_t rend = r->start + (r->npages << PAGE_SHIFT);
		uint64_t lo = start > r->start ? start : r->start, hi = end < rend ? end : rend;
		uint64_t n = 0;
		if (lo >= hi)
			continue;
		for (uint64_t a = lo & ~(uint64_t)(PAGE - 1); a < hi; a += PAGE) {
			uint64_t idx = (a - r->start) >> PAGE_SHIFT;
			struct page *p = &r->pages[idx];
			/* an EVICTING page is being dropped by our own agent: that REMOVE is ours */
			if (p->state == MC_EVICTING && !unmap)
				continue;
			if (p->flags & MC_PF_HELD)
				wake(s, a, PAGE);
			if (p->flags & MC_PF_SAMPLED)
				sample_forget(s, p);
			drop_copy(s, r, p);
			p->flags = 0;
			set_state(r, p, MC_UNTOUCHED);
			n++;
		}
		if (n)
			trace_add(s, unmap ? MC_TR_UNMAP : MC_TR_REMOVE, r->index,
				  (lo - r->start) >> PAGE_SHIFT, n, 0, 0);
	}
}

static int cmp_start(const void *a, const void *b)
{
	const struct range *x = *(struct range *const *)a, *y = *(struct range *const *)b;
	return x->start < y->start ? -1 : x->start > y->start;
}

/* mremap moved [from, from+len) to `to`: ranges inside it move along. */
static void remap(struct mc_session *s, uint64_t from, uint64_t to, uint64_t len)
{
	s->c.events_remap++;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = &s->ranges[i];
		uint64_t rend = r->start + (r->npages << PAGE_SHIFT);
		if (r->start >= from && rend <= from + len) {
			r->start = r->start - from + to;
			trace_add(s, MC_TR_REMAP, r->index, 0, r->npages, 0, 0);
		} else if (r->start < from + len && from < rend) {
			s->c.anomalies++; /* part of a range moved: its pages there are lost to us */
		}
	}
	qsort(s->by_addr, s->nranges, sizeof *s->by_addr, cmp_start);
}

static void handle_msg(struct fault_ctx *fc, const struct uffd_msg *m, uint64_t t0)
{
	struct mc_session *s = fc->s;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		fc->last_tid = m->arg.pagefault.feat.ptid;
		if (serve_fault(fc, m->arg.pagefault.address, m->arg.pagefault.flags,
				m->arg.pagefault.feat.ptid, t0) == -EAGAIN &&
		    fc->nretry < RETRY_CAP)
			fc->retry[fc->nretry++] = (struct retry){.addr = m->arg.pagefault.address,
								 .flags = m->arg.pagefault.flags,
								 .t0 = t0,
								 .tid = m->arg.pagefault.feat.ptid};
		break;
	case UFFD_EVENT_REMOVE:
		forget_pages(s, m->arg.remove.start, m->arg.remove.end, false);
		fc->unmapped++;
		break;
	case UFFD_EVENT_UNMAP:
		forget_pages(s, m->arg.remove.start, m->arg.remove.end, true);
		fc->unmapped++;
		break;
	case UFFD_EVENT_REMAP:
		remap(s, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
		break;
	case UFFD_EVENT_FORK:
		close((int)m->arg.fork.ufd); /* not asked for; do not leak it */
		break;
	default:
		s->c.anomalies++;
		break;
	}
}

/* Faults that met -EAGAIN (the target's layout was changing) go again. */
static void retry_faults(struct fault_ctx *fc)
{
	unsigned n = fc->nretry;
	fc->nretry = 0;
	for (unsigned i = 0; i < n; i++) {
		struct retry *t = &fc->retry[i];
		if (serve_fault(fc, t->addr, t->flags, t->tid, t->t0) == -EAGAIN)
			fc->retry[fc->nretry++] = *t;
	}
}

/*
 * Messages are read and handled under s->lock, as one step.  This matters
 * for events: reading a REMOVE lets the madvise() that sent it go on (the
 * agent's own, when evicting), and its answer could otherwise complete the
 * eviction and see the pages restored before we handled the event, which
 * would then forget pages that hold data again.  The events gate keeps
 * prefetch copies (made without s->lock) out of the same step.
 */
static bool drain(struct fault_ctx *fc, struct uffd_msg *msgs, int *err, bool *faulted)
{
	struct mc_session *s = fc->s;
	ssize_t n;
	*faulted = false;
	pthread_rwlock_wrlock(&s->events_gate);
	pthread_mutex_lock(&s->lock);
	n = read(s->uffd, msgs, MSG_BATCH * sizeof *msgs);
	if (n > 0) {
		uint64_t t0 = now_ns();
		for (ssize_t i = 0; i < n / (ssize_t)sizeof *msgs; i++) {
			handle_msg(fc, &msgs[i], t0);
			*faulted |= msgs[i].event == UFFD_EVENT_PAGEFAULT;
		}
	}
	*err = n < 0 ? errno : 0;
	if (fc->nretry)
		retry_faults(fc);
	pthread_mutex_unlock(&s->lock);
	pthread_rwlock_unlock(&s->events_gate);
	if (*faulted) /* the target did something: ends an idle policy's or sampler's wait (the
		      * staging area's zaps, REMOVE events of our own making, must not) */
		notify(s);
	return n > 0;
}

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
 * and the answer's wake-up preempts us at once (README, "Where the fault
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
 * the faults after every `evict` (README, "What a random-fault p99 is
 * made of").
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

void *fault_main(void *arg)
{
	struct mc_session *s = arg;
	struct fault_ctx *fc = calloc(1, sizeof *fc);
	struct uffd_msg msgs[MSG_BATCH];
	uint64_t spin_until = 0;

	if (!fc || !(fc->scratch = aligned_alloc(PAGE, SCRATCH_PAGES * PAGE))) {
		free(fc);
		atomic_store(&s->dead, 1);
		notify(s);
		return NULL;
	}
	fc->s = s;
	fc->pinned = -1;
	fc->self_sched_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
	fc->tid_sched_fd = -1;
	fc->follow_wait = FOLLOW_NS;
	/* visible in top -H and /proc/PID/task/TID/comm: which thread serves faults */
	pthread_setname_np(pthread_self(), "memfs-fault");
	sched_getaffinity(0, sizeof fc->cpus, &fc->cpus);
	if (tun.follow_fault_cpu)
		set_idle_policy(fc, true);
	while (!atomic_load(&s->stopping)) {
		struct pollfd pfd[2] = {{.fd = s->uffd, .events = POLLIN},
					{.fd = s->stop_fd, .events = POLLIN}};
		int err = 0, timeout;
		bool faulted;
		if (drain(fc, msgs, &err, &faulted)) {
			fc->answered += faulted;
			follow_faulting_cpu(fc);
			if (tun.spin_us)
				spin_until = now_ns() + (uint64_t)tun.spin_us * 1000u;
			continue;
		}
		if (err && err != EAGAIN && err != EINTR) {
			atomic_store(&s->dead, 1);
			notify(s);
			break;
		}
		note_apart(fc);
		if (fc->apart)
			follow_faulting_cpu(fc);
		/* spin a while after a fault: the next one is likely soon */
		timeout = fc->nretry ? 1 : -1;
		if (spin_until) {
			if (now_ns() < spin_until)
				timeout = 0;
			else
				spin_until = 0;
		}
		if (poll(pfd, 2, timeout) < 0 && errno != EINTR)
			break;
		if (pfd[1].revents)
			break;
		if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
			atomic_store(&s->dead, 1);
			notify(s);
			break;
		}
	}
	if (fc->self_sched_fd >= 0)
		close(fc->self_sched_fd);
	if (fc->tid_sched_fd >= 0)
		close(fc->tid_sched_fd);
	free(fc->scratch);
	free(fc);
	return NULL;
}
