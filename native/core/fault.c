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
 *
 * Messages are read into the store's journal, and each is cleared once
 * applied: an event the daemon read and died before applying is still
 * there for whoever serves the target next (docs/design.md, "The store
 * outlives the daemon").
 */
#include "internal.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RETRY_CAP 1024
#define SCRATCH_PAGES 257 /* the faulting page and the largest readahead */

struct retry {
	uint64_t addr, flags, t0;
	uint32_t tid;
};

struct fault_loop {
	struct mc_session *s;
	struct fault_ctx *place; /* placement.c */
	uint8_t *scratch;
	struct retry retry[RETRY_CAP];
	unsigned nretry;
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
	struct pcs_page *p = page_get(s, r, idx);
	int64_t done;
	int rc;

	if (hi > r->npages)
		hi = r->npages;
	if (!p) /* no room in the index: serve the fault, leave the page untouched to us */
		return zero_pages(s, addr, PAGE, &done);
	for (a = idx; a > lo && page_state(page_at(s, r, a - 1)) == MC_UNTOUCHED; a--)
		;
	for (b = idx + 1; b < hi && page_state(page_at(s, r, b)) == MC_UNTOUCHED; b++)
		;
	/* the window shares the faulting page's index chunk only if aligned inside it; page_get each */
	if (write) {
		/* the writer gets a real page at once; its neighbours share the zero page */
		memset(scratch, 0, PAGE);
		rc = copy_pages(s, addr, scratch, PAGE, false, &done);
		if (rc)
			return rc;
		set_state(r, p, MC_RESIDENT);
		done = 0;
		if (a < idx)
			zero_pages(s, r->start + (a << PAGE_SHIFT), (idx - a) << PAGE_SHIFT, &done);
		for (uint64_t k = a; k < a + ((uint64_t)done >> PAGE_SHIFT); k++)
			if ((p = page_get(s, r, k)))
				set_state(r, p, MC_RESIDENT);
		done = 0;
		if (idx + 1 < b)
			zero_pages(s, addr + PAGE, (b - idx - 1) << PAGE_SHIFT, &done);
		for (uint64_t k = idx + 1; k < idx + 1 + ((uint64_t)done >> PAGE_SHIFT); k++)
			if ((p = page_get(s, r, k)))
				set_state(r, p, MC_RESIDENT);
	} else {
		rc = zero_pages(s, r->start + (a << PAGE_SHIFT), (b - a) << PAGE_SHIFT, &done);
		for (uint64_t k = a; k < a + ((uint64_t)done >> PAGE_SHIFT); k++)
			if ((p = page_get(s, r, k)))
				set_state(r, p, MC_RESIDENT);
		if (rc && page_state(page_at(s, r, idx)) != MC_RESIDENT)
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
static int serve_fault(struct fault_loop *fl, uint64_t fault_addr, uint64_t flags, uint32_t tid,
		       uint64_t t0)
{
	struct mc_session *s = fl->s;
	uint64_t addr = fault_addr & ~(uint64_t)(PAGE - 1), idx;
	bool held = false;
	uint16_t kind = 0;
	uint64_t answered = 0;
	struct range *r;
	struct pcs_page *p;
	int rc = 0;

	r = range_of(s, addr);
	if (!r) {
		s->c.anomalies++;
		wake(s, addr, PAGE);
		return 0;
	}
	idx = (addr - r->start) >> PAGE_SHIFT;
	p = page_at(s, r, idx);
	if (p && (p->flags & MC_PF_SAMPLED) && !(flags & UFFD_PAGEFAULT_FLAG_WP)) {
		rc = sample_fault(s, r, idx, fl->scratch);
		if (rc == -EEXIST) {
			wake(s, addr, PAGE);
			rc = 0;
		}
		return rc;
	}
	if (p)
		p->stamp = (uint32_t)(t0 / 1000000u);

	answer_issued_ns = &answered;
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		s->c.faults_wp++;
		if (!p && (p = page_get(s, r, idx))) /* write-protected, yet unknown to us: it is resident */
			set_state(r, p, MC_RESIDENT);
		if (p && (p->flags & MC_PF_PREFETCHED))
			s->c.prefetch_hits++;
		if (p)
			p->flags &= (uint8_t)~(MC_PF_PREFETCHED | MC_PF_INCOMPRESSIBLE | MC_PF_COMPRESSING);
		if (p && p->state == MC_EVICTING && !tun.debug_unsafe_evict) {
			/* the agent may be dropping this page right now: the write must wait */
			p->flags |= MC_PF_HELD;
			s->c.faults_held++;
			held = true;
			kind = MC_TR_HELD;
		} else {
			/* (with debug_unsafe_evict an EVICTING page keeps its stale copy: the bug on purpose) */
			if (p && p->state == MC_CLEAN) {
				/* the entry first: the write lands only after it says the copy is gone */
				set_state(r, p, MC_RESIDENT);
				drop_copy(s, r, p);
			}
			rc = wp_range(s, addr, PAGE, false);
			kind = MC_TR_WRITE;
		}
	} else {
		bool write = flags & UFFD_PAGEFAULT_FLAG_WRITE;
		s->c.faults_missing++;
		if (p && (p->flags & MC_PF_PREFETCH_PENDING))
			s->c.prefetch_misses++;
		if (p)
			p->flags &= (uint8_t)~(MC_PF_PREFETCH_PENDING | MC_PF_PREFETCHED);
		switch (page_state(p)) {
		case MC_COMPRESSED:
		case MC_EVICTING: /* the agent dropped it already; the copy is good */
		case MC_ZERO:
			kind = p->state == MC_ZERO ? MC_TR_ZEROFILL : MC_TR_FAULT;
			rc = restore_page(s, r, idx, write, fl->scratch);
			if (!rc) {
				s->c.promotions++;
				p->flags &= (uint8_t)~MC_PF_HELD; /* the copy woke any held writer */
				read_ahead(s, r, idx, fl->scratch); /* zero pages too: they are part of a sweep */
			}
			break;
		case MC_UNTOUCHED:
			rc = first_touch(s, r, idx, write, fl->scratch);
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
				set_state(r, p, MC_RESIDENT);
				drop_copy(s, r, p);
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

/*
 * The target removed or unmapped [start, end) itself: those pages read as
 * zeros now.  A range unmapped whole is gone: it leaves the session.
 */
static void forget_pages(struct mc_session *s, uint64_t start, uint64_t end, bool unmap)
{
	if (unmap)
		s->c.events_unmap++;
	else
		s->c.events_remove++;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = range_get(s, i);
		uint64_t rend, lo, hi, n = 0;
		if (!r)
			continue;
		rend = r->start + (r->npages << PAGE_SHIFT);
		lo = start > r->start ? start : r->start;
		hi = end < rend ? end : rend;
		if (lo >= hi)
			continue;
		if (unmap && lo == r->start && hi == rend) {
			trace_add(s, MC_TR_UNMAP, r->index, 0, r->npages, 0, 0);
			range_retire(s, r);
			continue;
		}
		for (uint64_t j = (lo - r->start) >> PAGE_SHIFT, e = (hi - r->start + PAGE - 1) >> PAGE_SHIFT;
		     (j = next_indexed(s, r, j, e)) < e; j++) {
			struct pcs_page *p = page_at(s, r, j), v;
			/* an EVICTING page is being dropped by our own agent: that REMOVE is ours */
			if (p->state == MC_EVICTING && !unmap)
				continue;
			if (p->state == MC_UNTOUCHED && !p->flags)
				continue;
			if (p->flags & MC_PF_HELD)
				wake(s, r->start + (j << PAGE_SHIFT), PAGE);
			if (p->flags & MC_PF_SAMPLED)
				sample_forget(s, p);
			set_state(r, p, MC_UNTOUCHED);
			drop_copy(s, r, p);
			v = *p;
			v.flags = 0;
			page_commit(p, &v);
			n++;
		}
		if (n)
			trace_add(s, unmap ? MC_TR_UNMAP : MC_TR_REMOVE, r->index,
				  (lo - r->start) >> PAGE_SHIFT, n, 0, 0);
	}
}

/* mremap moved [from, from+len) to `to`: ranges inside it move along (applying it twice moves once). */
static void remap(struct mc_session *s, uint64_t from, uint64_t to, uint64_t len)
{
	s->c.events_remap++;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = range_get(s, i);
		uint64_t rend;
		if (!r)
			continue;
		rend = r->start + (r->npages << PAGE_SHIFT);
		if (r->start >= from && rend <= from + len) {
			range_move(s, r, r->start - from + to);
			trace_add(s, MC_TR_REMAP, r->index, 0, r->npages, 0, 0);
		} else if (r->start < from + len && from < rend) {
			s->c.anomalies++; /* part of a range moved: its pages there are lost to us */
		}
	}
}

static void handle_msg(struct fault_loop *fl, const struct uffd_msg *m, uint64_t t0)
{
	struct mc_session *s = fl->s;
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		placement_faulted(fl->place, m->arg.pagefault.feat.ptid);
		if (serve_fault(fl, m->arg.pagefault.address, m->arg.pagefault.flags,
				m->arg.pagefault.feat.ptid, t0) == -EAGAIN &&
		    fl->nretry < RETRY_CAP)
			fl->retry[fl->nretry++] = (struct retry){.addr = m->arg.pagefault.address,
								 .flags = m->arg.pagefault.flags,
								 .t0 = t0,
								 .tid = m->arg.pagefault.feat.ptid};
		break;
	case UFFD_EVENT_REMOVE:
		forget_pages(s, m->arg.remove.start, m->arg.remove.end, false);
		placement_unmapped(fl->place);
		break;
	case UFFD_EVENT_UNMAP:
		forget_pages(s, m->arg.remove.start, m->arg.remove.end, true);
		placement_unmapped(fl->place);
		break;
	case UFFD_EVENT_REMAP:
		/* applied once even if replayed: a range already at `to` is not at `from` */
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
static void retry_faults(struct fault_loop *fl)
{
	unsigned n = fl->nretry;
	fl->nretry = 0;
	for (unsigned i = 0; i < n; i++) {
		struct retry *t = &fl->retry[i];
		if (serve_fault(fl, t->addr, t->flags, t->tid, t->t0) == -EAGAIN)
			fl->retry[fl->nretry++] = *t;
	}
}

/*
 * Messages are read and handled under s->lock, as one step.  This matters
 * for events: reading a REMOVE lets the madvise() that sent it go on (the
 * agent's own, when evicting), and its answer could otherwise complete the
 * eviction and see the pages restored before we handled the event, which
 * would then forget pages that hold data again.  The events gate keeps
 * prefetch copies (made without s->lock) out of the same step.  They are
 * read into the journal, each cleared once applied (see the top).
 */
static bool drain(struct fault_loop *fl, int *err, bool *faulted)
{
	struct mc_session *s = fl->s;
	struct uffd_msg *msgs = s->journal;
	ssize_t n;
	*faulted = false;
	pthread_rwlock_wrlock(&s->events_gate);
	pthread_mutex_lock(&s->lock);
	n = read(s->uffd, msgs, PCS_JOURNAL_MSGS * sizeof *msgs);
	if (n > 0) {
		uint64_t t0 = now_ns();
		for (ssize_t i = 0; i < n / (ssize_t)sizeof *msgs; i++) {
			handle_msg(fl, &msgs[i], t0);
			*faulted |= msgs[i].event == UFFD_EVENT_PAGEFAULT;
			atomic_signal_fence(memory_order_seq_cst);
			memset(&msgs[i], 0, sizeof msgs[i]);
		}
	}
	*err = n < 0 ? errno : 0;
	if (fl->nretry)
		retry_faults(fl);
	pthread_mutex_unlock(&s->lock);
	pthread_rwlock_unlock(&s->events_gate);
	if (*faulted) /* the target did something: ends an idle policy's or sampler's wait (the
		      * staging area's zaps, REMOVE events of our own making, must not) */
		notify(s);
	return n > 0;
}

void *fault_main(void *arg)
{
	struct mc_session *s = arg;
	struct fault_loop *fl = calloc(1, sizeof *fl);
	uint64_t spin_until = 0;

	if (fl) {
		fl->s = s;
		fl->scratch = aligned_alloc(PAGE, SCRATCH_PAGES * PAGE);
		fl->place = placement_new(s);
	}
	if (!fl || !fl->scratch || !fl->place) {
		if (fl) {
			free(fl->scratch);
			placement_free(fl->place);
		}
		free(fl);
		atomic_store(&s->dead, 1);
		notify(s);
		return NULL;
	}
	/* visible in top -H and /proc/PID/task/TID/comm: which thread serves faults */
	pthread_setname_np(pthread_self(), "memfs-fault");
	while (!atomic_load(&s->stopping)) {
		struct pollfd pfd[2] = {{.fd = s->uffd, .events = POLLIN},
					{.fd = s->stop_fd, .events = POLLIN}};
		int err = 0, timeout;
		bool faulted;
		if (drain(fl, &err, &faulted)) {
			placement_after_drain(fl->place, faulted);
			if (tun.spin_us)
				spin_until = now_ns() + (uint64_t)tun.spin_us * 1000u;
			continue;
		}
		if (err && err != EAGAIN && err != EINTR) {
			atomic_store(&s->dead, 1);
			notify(s);
			break;
		}
		placement_before_sleep(fl->place);
		/* spin a while after a fault: the next one is likely soon */
		timeout = fl->nretry ? 1 : -1;
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
	placement_free(fl->place);
	free(fl->scratch);
	free(fl);
	return NULL;
}
