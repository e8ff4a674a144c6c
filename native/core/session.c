/* session.c - a target's session: page helpers, uffd ioctls, lifecycle, fences. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- page helpers (caller holds s->lock) ---------------------------------- */

void set_state(struct range *r, struct pcs_page *p, uint8_t state)
{
	r->nstate[p->state]--;
	r->nstate[state]++;
	p->state = state;
}

static void account_copy(struct mc_session *s, struct range *r, const struct pcs_page *p, int sign)
{
	uint64_t used = p->flags & MC_PF_SAME ? 0 : store_slot_size(p->csize);
	if (sign > 0) {
		s->c.store_pages++;
		s->c.store_bytes_compressed += p->csize;
		s->c.store_bytes_used += used;
		r->bytes_compressed += p->csize;
		if (s->c.store_bytes_used > s->c.store_bytes_peak)
			s->c.store_bytes_peak = s->c.store_bytes_used;
		if (p->recompressed)
			s->c.store_pages_recompressed++;
	} else {
		s->c.store_pages--;
		s->c.store_bytes_compressed -= p->csize;
		s->c.store_bytes_used -= used;
		r->bytes_compressed -= p->csize;
		if (p->recompressed)
			s->c.store_pages_recompressed--;
	}
	s->c.store_bytes_logical = s->c.store_pages * PAGE;
}

static bool has_copy(const struct pcs_page *p)
{
	return p->copy || (p->flags & MC_PF_SAME);
}

/* Free what a replaced or dropped entry pointed at, unless a pinner reads it (it frees it then). */
static void release_blob(struct mc_session *s, struct pcs_page *p, const struct pcs_page *old)
{
	if (old->flags & MC_PF_SAME)
		return;
	if (old->flags & MC_PF_PINNED)
		p->flags &= (uint8_t)~MC_PF_PINNED; /* its pinner frees the blob (unpin_copy in ops.c) */
	else
		store_free(s, old->copy, old->csize);
}

/* The page no longer has a copy; its state stays. */
void drop_copy(struct mc_session *s, struct range *r, struct pcs_page *p)
{
	struct pcs_page old = *p, v = *p;
	if (!has_copy(p))
		return;
	account_copy(s, r, p, -1);
	v.copy = 0;
	v.csize = 0;
	v.recompressed = 0;
	v.flags &= (uint8_t)~MC_PF_SAME;
	page_commit(p, &v); /* the entry first: the blob may be reused once freed */
	release_blob(s, p, &old);
}

void mark_recompressed(struct mc_session *s, struct pcs_page *p)
{
	if (!p->recompressed)
		s->c.store_pages_recompressed++;
	p->recompressed = 1;
}

/* The page's copy becomes `copy`, and its state `state`, in one step. */
void set_copy(struct mc_session *s, struct range *r, struct pcs_page *p, uint64_t copy,
	      uint16_t csize, bool same, uint8_t state)
{
	struct pcs_page old = *p, v = *p;
	if (has_copy(p))
		account_copy(s, r, p, -1);
	v.copy = copy;
	v.csize = csize;
	v.recompressed = 0;
	v.flags = (uint8_t)((v.flags & ~MC_PF_SAME) | (same ? MC_PF_SAME : 0));
	r->nstate[p->state]--;
	r->nstate[state]++;
	v.state = state;
	page_commit(p, &v);
	account_copy(s, r, p, +1);
	if (has_copy(&old))
		release_blob(s, p, &old);
}

/* The page's logical contents from its copy. */
int page_bytes(const struct mc_session *s, const struct pcs_page *p, void *dst)
{
	if (p->flags & MC_PF_SAME) {
		fill_page(dst, p->copy);
		return 0;
	}
	if (!p->copy)
		return -1;
	if (p->csize == PAGE) {
		memcpy(dst, store_ptr(s, p->copy), PAGE);
		return 0;
	}
	return codec_decompress(store_ptr(s, p->copy), p->csize, dst);
}

uint32_t page_stamp(const struct mc_session *s, const struct range *r, const struct pcs_page *p)
{
	if (!p)
		return r->born_ms;
	return p->flags & MC_PF_SAMPLED ? s->slots[p->stamp].old_stamp : p->stamp;
}

void notify(struct mc_session *s)
{
	if (atomic_exchange(&s->notify_armed, 0)) {
		uint64_t one = 1;
		if (write(s->notify_fd, &one, sizeof one) < 0) {
			/* the counter is saturated: Python has not read it yet, it will */
		}
	}
}

void trace_add(struct mc_session *s, uint16_t kind, uint32_t range, uint64_t page,
	       uint64_t count, uint64_t latency_ns, uint32_t tid)
{
	struct mc_trace_event *e = &s->trace[s->trace_head % TRACE_CAP];
	*e = (struct mc_trace_event){.seq = s->trace_head,
				     .ts_ns = now_ns(),
				     .page = page,
				     .count = count,
				     .latency_ns = latency_ns,
				     .range = range,
				     .tid = tid,
				     .kind = kind};
	s->trace_head++;
	notify(s);
}

/* 8 sub-buckets per power of two: bucket = 8*log2(ns) + next three bits. */
void hist_add(struct mc_session *s, uint64_t ns)
{
	unsigned b;
	if (ns < 8) {
		b = (unsigned)ns;
	} else {
		unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
		b = msb * 8u + (unsigned)((ns >> (msb - 3)) & 7u);
	}
	if (b >= MC_HIST_BUCKETS)
		b = MC_HIST_BUCKETS - 1;
	s->hist[b]++;
	s->c.fault_latency_ns_total += ns;
	if (ns > s->c.fault_latency_ns_max)
		s->c.fault_latency_ns_max = ns;
}

/* ---- uffd ioctls ------------------------------------------------------------ */

__thread uint64_t *answer_issued_ns;

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif

/* Which ioctl, and the address it was about (the first field of every argument struct). */
static int ioctl_kind(unsigned long req)
{
	switch (_IOC_NR(req)) {
	case _UFFDIO_COPY: return MC_IOCTL_COPY;
	case _UFFDIO_ZEROPAGE: return MC_IOCTL_ZEROPAGE;
	case _UFFDIO_WRITEPROTECT: return MC_IOCTL_WRITEPROTECT;
	case _UFFDIO_WAKE: return MC_IOCTL_WAKE;
	case _UFFDIO_MOVE: return MC_IOCTL_MOVE;
	case _UFFDIO_POISON: return MC_IOCTL_POISON;
	case _UFFDIO_REGISTER: return MC_IOCTL_REGISTER;
	case _UFFDIO_UNREGISTER: return MC_IOCTL_UNREGISTER;
	default: return -1;
	}
}

/* Keep the failure for mc_ioctl_failures (the daemon logs it, rate-limited). */
static void note_failure(struct mc_session *s, unsigned long req, const void *arg, int e)
{
	int k = ioctl_kind(req);
	uint64_t addr;
	if (k < 0)
		return;
	memcpy(&addr, arg, sizeof addr);
	s->ioctl_fail[k].count++;
	s->ioctl_fail[k].err = e;
	s->ioctl_fail[k].addr = addr;
}

int uffd_ioctl(struct mc_session *s, unsigned long req, void *arg)
{
	int e, k;
	if (answer_issued_ns && !*answer_issued_ns)
		*answer_issued_ns = now_ns();
	k = tun.debug_fail_ioctl ? ioctl_kind(req) : -1;
	if (k >= 0 && (tun.debug_fail_ioctl >> k & 1))
		e = EINVAL; /* a failure made on purpose, for the tests of what follows one */
	else if (ioctl(s->uffd, req, arg) == 0)
		return 0;
	else
		e = errno;
	if (e == EAGAIN) {
		s->c.uffd_eagain++;
	} else if (e == ESRCH || e == ENOENT) {
		/* the target's mm is gone: nothing left to serve */
		atomic_store(&s->dead, 1);
		notify(s);
	} else if (e != EEXIST) {
		/* (EEXIST: the page is there already, a race that is answered by a wake-up) */
		s->c.uffd_ioctl_fail++;
		note_failure(s, req, arg, e);
	}
	return -e;
}

bool target_alive(struct mc_session *s)
{
	struct pollfd p = {.fd = s->pidfd, .events = POLLIN};
	if (s->pidfd < 0)
		return !atomic_load(&s->dead);
	return poll(&p, 1, 0) == 0; /* a pidfd is readable once its process has exited */
}

int wp_range(struct mc_session *s, uint64_t addr, uint64_t len, bool protect)
{
	struct uffdio_writeprotect wp = {.range = {.start = addr, .len = len},
					 .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
	return uffd_ioctl(s, UFFDIO_WRITEPROTECT, &wp);
}

/* UFFDIO_COPY; *done gets the bytes copied even when it fails part way. */
int copy_pages(struct mc_session *s, uint64_t dst, const void *src, uint64_t len, bool wp,
	       int64_t *done)
{
	struct uffdio_copy c = {.dst = dst,
				.src = (uint64_t)(uintptr_t)src,
				.len = len,
				.mode = wp ? UFFDIO_COPY_MODE_WP : 0};
	int rc = uffd_ioctl(s, UFFDIO_COPY, &c);
	*done = rc ? (c.copy > 0 ? c.copy : 0) : (int64_t)len;
	return rc;
}

int zero_pages(struct mc_session *s, uint64_t dst, uint64_t len, int64_t *done)
{
	struct uffdio_zeropage z = {.range = {.start = dst, .len = len}};
	int rc = uffd_ioctl(s, UFFDIO_ZEROPAGE, &z);
	*done = rc ? (z.zeropage > 0 ? z.zeropage : 0) : (int64_t)len;
	return rc;
}

size_t mc_ioctl_failures(struct mc_session *s, struct mc_ioctl_failure *out, size_t cap)
{
	size_t n = 0;
	pthread_mutex_lock(&s->lock);
	for (int k = 0; k < MC_IOCTL_KINDS && n < cap; k++) {
		if (!s->ioctl_fail[k].count)
			continue;
		out[n] = s->ioctl_fail[k];
		out[n++].kind = (uint32_t)k;
		s->ioctl_fail[k].count = 0;
	}
	pthread_mutex_unlock(&s->lock);
	return n;
}

/* ---- lifecycle --------------------------------------------------------------- */

static int new_fence(struct mc_session *s)
{
	s->fence_fd = memfd_create("memfs-fence", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (s->fence_fd < 0 || ftruncate(s->fence_fd, PCS_FENCE_SIZE))
		return -errno;
	s->fence = mmap(NULL, PCS_FENCE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, s->fence_fd, 0);
	if (s->fence == MAP_FAILED) {
		s->fence = NULL;
		return -errno;
	}
	/* the target maps it writable too, but can never shrink it under us */
	if (fcntl(s->fence_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
		return -errno;
	s->fence->magic = PCS_FENCE_MAGIC;
	s->fence->nwords = PCS_FENCE_WORDS;
	return 0;
}

struct mc_session *mc_session_new(int uffd, int pid, int pidfd, uint64_t id, uint64_t store_reserve,
				  int *err)
{
	struct mc_session *s = calloc(1, sizeof *s);
	char path[64];
	int rc;

	*err = ENOMEM;
	if (!s)
		return NULL;
	s->uffd = -1;
	s->pid = pid;
	s->id = id;
	s->pidfd = s->pagemap_fd = s->notify_fd = s->stop_fd = s->fence_fd = -1;
	s->st.fd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_rwlock_init(&s->gate, NULL);
	{
		pthread_rwlockattr_t a;
		pthread_rwlockattr_init(&a);
		pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&s->events_gate, &a);
		pthread_rwlockattr_destroy(&a);
	}
	if (pidfd >= 0 && (s->pidfd = fcntl(pidfd, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail_errno;
	snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
	s->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (s->pagemap_fd < 0)
		goto fail_errno;
	if (!target_alive(s)) { /* opened after the pid was reused: not our target's */
		*err = ESRCH;
		goto fail;
	}
	s->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->notify_fd < 0 || s->stop_fd < 0)
		goto fail_errno;
	rc = store_init(s, store_reserve);
	if (!rc)
		rc = new_fence(s);
	if (rc) {
		*err = -rc;
		goto fail;
	}
	s->uffd = uffd; /* ours from here on */
	*err = 0;
	return s;
fail_errno:
	*err = errno;
fail:
	mc_session_free(s);
	return NULL;
}

struct scan_ctx {
	struct mc_session *s;
	struct range *r;
	uint32_t now;
};

/* A run of pages present when the range was registered: resident (the target's, no copy). */
static int mark_present(void *arg, const struct pm_run *run)
{
	struct scan_ctx *c = arg;
	for (uint64_t a = run->start; a < run->end; a += PAGE) {
		uint64_t idx = (a - c->r->start) >> PAGE_SHIFT;
		struct pcs_page *p = page_get(c->s, c->r, idx);
		if (p && p->state == MC_UNTOUCHED) {
			set_state(c->r, p, MC_RESIDENT);
			p->stamp = c->now;
		}
	}
	return 0;
}

/*
 * Add a range: known to the session first (so that a fault on it is never
 * one on an unknown address), then registered for missing and write-protect
 * faults, then pagemap says which pages the target has populated.  Reading
 * pagemap after registering, with the session locked (the target's
 * discards wait for their event to be read), is what makes it exact: from
 * then on no page appears or goes without a message we read.
 */
int mc_range_add(struct mc_session *s, uint64_t addr, uint64_t length, uint32_t flags, int32_t index,
		 char *errbuf, size_t errlen)
{
	const uint64_t need = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) |
			      (1ULL << _UFFDIO_WRITEPROTECT) | (1ULL << _UFFDIO_WAKE);
	struct uffdio_register reg = {.range = {.start = addr, .len = length},
				      .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP};
	struct range *r;
	uint32_t now = (uint32_t)mc_now_ms();
	int rc;

	if (!length || addr % PAGE || length % PAGE) {
		snprintf(errbuf, errlen, "range 0x%llx+%llu is empty or not page aligned",
			 (unsigned long long)addr, (unsigned long long)length);
		return -EINVAL;
	}
	pthread_mutex_lock(&s->lock);
	for (uint32_t i = 0; i < s->nlive; i++) {
		struct range *o = s->by_addr[i];
		if (addr < o->start + (o->npages << PAGE_SHIFT) && o->start < addr + length) {
			pthread_mutex_unlock(&s->lock);
			snprintf(errbuf, errlen, "range 0x%llx+%llu overlaps range %u",
				 (unsigned long long)addr, (unsigned long long)length, o->index);
			return -EEXIST;
		}
	}
	if (index < 0) {
		for (index = 0; index < MAX_RANGES && s->ranges[index] && s->ranges[index]->live; index++)
			;
	}
	if (index >= MAX_RANGES) {
		pthread_mutex_unlock(&s->lock);
		snprintf(errbuf, errlen, "no room for another range (at most %d)", MAX_RANGES);
		return -ENOSPC;
	}
	rc = range_add(s, addr, length >> PAGE_SHIFT, flags, (uint32_t)index, now, &r);
	pthread_mutex_unlock(&s->lock);
	if (rc) {
		snprintf(errbuf, errlen, "range %d (0x%llx+%llu): %s", index, (unsigned long long)addr,
			 (unsigned long long)length,
			 rc == -EFBIG ? "larger than user space" : rc == -ENOSPC ? "the store is full" : strerror(-rc));
		return rc;
	}
	rc = ioctl(s->uffd, UFFDIO_REGISTER, &reg) ? -errno : (reg.ioctls & need) != need ? -EOPNOTSUPP : 0;
	if (rc) {
		snprintf(errbuf, errlen, "UFFDIO_REGISTER of range %d (0x%llx+%llu): %s%s", index,
			 (unsigned long long)addr, (unsigned long long)length,
			 rc == -EOPNOTSUPP ? "no copy/zeropage/write-protect there" : strerror(-rc),
			 rc == -EBUSY ? " (already registered with another userfaultfd)" : "");
		pthread_mutex_lock(&s->lock);
		range_retire(s, r);
		pthread_mutex_unlock(&s->lock);
		return rc;
	}
	pthread_mutex_lock(&s->lock);
	{
		struct scan_ctx c = {.s = s, .r = r, .now = now};
		rc = pagemap_scan(s->pagemap_fd, addr, length, mark_present, &c);
	}
	pthread_mutex_unlock(&s->lock);
	if (rc) {
		snprintf(errbuf, errlen, "reading /proc/%d/pagemap: %s", s->pid, strerror(-rc));
		return rc;
	}
	return index;
}

/* The sampler's staging area (the target's memory where pages are parked); 0 slots: no sampling. */
int mc_session_set_staging(struct mc_session *s, uint64_t addr, uint64_t npages)
{
	struct uffdio_register reg = {.range = {.start = addr, .len = npages << PAGE_SHIFT},
				      .mode = UFFDIO_REGISTER_MODE_MISSING};
	if (!npages || npages > PCS_MAX_SLOTS || addr % PAGE)
		return -EINVAL;
	s->free_slots = malloc(npages * sizeof *s->free_slots);
	if (!s->free_slots)
		return -ENOMEM;
	/* moving pages in and out needs UFFDIO_MOVE */
	if (ioctl(s->uffd, UFFDIO_REGISTER, &reg) || !(reg.ioctls & (1ULL << 0x05))) {
		free(s->free_slots);
		s->free_slots = NULL;
		return 0;
	}
	s->staging_start = addr;
	s->staging_npages = (uint32_t)npages;
	for (uint32_t i = 0; i < npages; i++)
		s->free_slots[s->nfree_slots++] = (uint32_t)(npages - 1 - i);
	s->st.hdr->staging_pages = (uint32_t)npages;
	atomic_signal_fence(memory_order_seq_cst);
	s->st.hdr->staging_start = addr;
	return (int)npages;
}

int mc_session_start(struct mc_session *s)
{
	int rc = pthread_create(&s->fault_thread, NULL, fault_main, s);
	if (rc)
		return -rc;
	s->fault_thread_running = true;
	return 0;
}

void mc_session_stop(struct mc_session *s)
{
	uint64_t one = 1;
	if (!s->fault_thread_running)
		return;
	atomic_store(&s->stopping, 1);
	if (write(s->stop_fd, &one, sizeof one) < 0) {
		/* cannot happen with a fresh eventfd; the thread also polls `stopping` */
	}
	pthread_join(s->fault_thread, NULL);
	s->fault_thread_running = false;
}

int mc_session_unregister(struct mc_session *s)
{
	int rc = 0;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = range_get(s, i);
		struct uffdio_range ur;
		if (!r)
			continue;
		ur = (struct uffdio_range){.start = r->start, .len = r->npages << PAGE_SHIFT};
		if (ioctl(s->uffd, UFFDIO_UNREGISTER, &ur) && !rc)
			rc = -errno;
	}
	if (s->staging_npages) {
		struct uffdio_range ur = {.start = s->staging_start,
					  .len = (uint64_t)s->staging_npages << PAGE_SHIFT};
		ioctl(s->uffd, UFFDIO_UNREGISTER, &ur);
	}
	return rc;
}

void mc_session_free(struct mc_session *s)
{
	if (!s)
		return;
	mc_session_stop(s);
	for (uint32_t i = 0; i < MAX_RANGES; i++)
		free(s->ranges[i]);
	free(s->by_addr);
	free(s->free_slots);
	store_destroy(s); /* every copy with it (the target may hold the file a while longer) */
	if (s->fence)
		munmap(s->fence, PCS_FENCE_SIZE);
	if (s->fence_fd >= 0)
		close(s->fence_fd);
	if (s->uffd >= 0)
		close(s->uffd);
	if (s->pidfd >= 0)
		close(s->pidfd);
	if (s->pagemap_fd >= 0)
		close(s->pagemap_fd);
	if (s->notify_fd >= 0)
		close(s->notify_fd);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	pthread_mutex_destroy(&s->lock);
	pthread_rwlock_destroy(&s->gate);
	pthread_rwlock_destroy(&s->events_gate);
	free(s);
}

/* The descriptors the target keeps: the store, opened read-only, and the fence page. */
int mc_session_store_fds(struct mc_session *s, int *store_ro_fd, int *fence_fd)
{
	char path[64];
	snprintf(path, sizeof path, "/proc/self/fd/%d", s->st.fd);
	*store_ro_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (*store_ro_fd < 0)
		return -errno;
	*fence_fd = fcntl(s->fence_fd, F_DUPFD_CLOEXEC, 3);
	if (*fence_fd < 0) {
		int e = errno;
		close(*store_ro_fd);
		return -e;
	}
	return 0;
}

/* ---- fences ------------------------------------------------------------------ */

static _Atomic uint64_t *fence_word(struct mc_session *s, uint64_t rid)
{
	return (_Atomic uint64_t *)&s->fence->word[rid % PCS_FENCE_WORDS];
}

void mc_fence_arm(struct mc_session *s, uint64_t rid)
{
	atomic_store(fence_word(s, rid), rid << 2 | PCS_FENCE_PENDING);
}

int mc_fence_cancel(struct mc_session *s, uint64_t rid)
{
	uint64_t want = rid << 2 | PCS_FENCE_PENDING;
	if (atomic_compare_exchange_strong(fence_word(s, rid), &want, rid << 2 | PCS_FENCE_CANCELLED))
		return 1;
	return want != (rid << 2 | PCS_FENCE_STARTED); /* anything else: nothing of it can start */
}

void mc_fence_clear(struct mc_session *s, uint64_t rid)
{
	uint64_t w = atomic_load(fence_word(s, rid));
	if (w >> 2 == rid)
		atomic_compare_exchange_strong(fence_word(s, rid), &w, 0);
}

int mc_fence_busy(struct mc_session *s, uint64_t rid)
{
	uint64_t w = atomic_load(fence_word(s, rid));
	return w && w >> 2 != rid && ((w & 3) == PCS_FENCE_PENDING || (w & 3) == PCS_FENCE_STARTED);
}

/* ---- queries ------------------------------------------------------------------ */

int mc_session_notify_fd(struct mc_session *s)
{
	return s->notify_fd;
}

void mc_session_arm_notify(struct mc_session *s)
{
	atomic_store(&s->notify_armed, 1);
}

int mc_session_dead(struct mc_session *s)
{
	return atomic_load(&s->dead);
}

void mc_session_counters(struct mc_session *s, struct mc_counters *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->c;
	pthread_mutex_unlock(&s->lock);
}

void mc_session_hist(struct mc_session *s, uint64_t *out)
{
	pthread_mutex_lock(&s->lock);
	memcpy(out, s->hist, sizeof s->hist);
	pthread_mutex_unlock(&s->lock);
}

uint32_t mc_session_nranges(struct mc_session *s)
{
	return s->nranges;
}

int mc_range_get(struct mc_session *s, uint32_t range, struct mc_range_info *out)
{
	struct range *r;
	int rc = 0;
	pthread_mutex_lock(&s->lock);
	r = range_get(s, range);
	if (r) {
		out->start = r->start;
		out->npages = r->npages;
		out->flags = r->flags;
		memcpy(out->nstate, r->nstate, sizeof r->nstate);
		out->bytes_compressed = r->bytes_compressed;
	} else {
		rc = -ENOENT;
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}

int mc_addr_to_page(struct mc_session *s, uint64_t addr, uint32_t *range, uint64_t *page)
{
	struct range *r;
	pthread_mutex_lock(&s->lock);
	r = range_of(s, addr);
	if (r) {
		*range = r->index;
		*page = (addr - r->start) >> PAGE_SHIFT;
	}
	pthread_mutex_unlock(&s->lock);
	return r ? 0 : -ERANGE;
}
