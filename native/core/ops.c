/*
 * ops.c - compress, evict and restore pages on request.
 *
 * These run on Python's worker threads, never on the fault thread, and
 * take s->lock only to change states together with the ioctl that makes
 * the kernel agree; reading the target and compressing happen unlocked,
 * so faults are served meanwhile, and so does write-protecting pages to
 * compress (below), which may have to wait for the fault thread.
 *
 * Compression of a page: mark it COMPRESSING (under the lock), then
 * write-protect it, read it with process_vm_readv and compress it
 * (unlocked), then commit the copy only if the page is still RESIDENT
 * and COMPRESSING (under the lock).  A write before the protection is in
 * what is read; a write after it takes a write-protect fault,
 * whose handler clears COMPRESSING, so a copy older than the page's
 * contents is never committed.  Two threads may compress at once (the
 * daemon spreads an operation's chunks over two workers): a page another
 * thread has marked COMPRESSING is skipped, never compressed twice.
 *
 * Eviction: only CLEAN pages (write-protected, valid copy) become
 * EVICTING; the agent then drops them.  A write to an EVICTING page is
 * held by the fault thread and released by mc_evict_complete() once the
 * page is gone, by restoring the copy writable: the write lands on the
 * saved contents, never on a page that is about to be dropped.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#define CBATCH 64
#define RBATCH 16
#define PBATCH 64

/* What a batch function gets besides its pages: the operation's scratch and result. */
struct batch_args {
	uint32_t flags; /* compress's */
	uint8_t *buf; /* `pages` pages */
	uint8_t *out; /* one page */
	struct mc_op_result *res;
};

/* The live range a run names, if the run lies inside it. */
static struct range *run_range(struct mc_session *s, const struct mc_run *run)
{
	struct range *r;
	pthread_mutex_lock(&s->lock);
	r = range_get(s, run->range);
	if (r && (run->first > r->npages || run->count > r->npages - run->first))
		r = NULL;
	pthread_mutex_unlock(&s->lock);
	return r;
}

static int check_runs(struct mc_session *s, const struct mc_run *runs, size_t nruns)
{
	for (size_t i = 0; i < nruns; i++)
		if (!run_range(s, &runs[i]))
			return -ERANGE;
	return 0;
}

struct cand {
	uint64_t idx;
	uint64_t copy; /* store handle or fill word */
	uint16_t csize;
	uint8_t kind; /* 0 failed, 1 blob, 2 same-filled, 3 incompressible (no copy) */
};

/*
 * Write-protect (or unprotect) the candidates in contiguous runs; failed
 * ones get kind 0.  Protecting meets EAGAIN while an event of the target's
 * waits to be read -- most often the REMOVE of the chunk the other worker
 * just had evicted -- so it waits for the fault thread to read it and tries
 * again, for a while (WP_EAGAIN_TRIES).  Callers protect without s->lock,
 * which the fault thread may need before it reads on.
 */
#define WP_EAGAIN_TRIES 1000
#define WP_EAGAIN_WAIT_US 20

static void wp_cands(struct mc_session *s, struct range *r, struct cand *c, int n, bool protect)
{
	for (int i = 0; i < n;) {
		int j = i + 1, rc, tries = 0;
		while (j < n && c[j].idx == c[j - 1].idx + 1)
			j++;
		while ((rc = wp_range(s, r->start + (c[i].idx << PAGE_SHIFT),
				      (uint64_t)(j - i) << PAGE_SHIFT, protect)) == -EAGAIN &&
		       protect && ++tries < WP_EAGAIN_TRIES && !atomic_load(&s->dead))
			usleep(WP_EAGAIN_WAIT_US);
		if (rc && protect)
			for (int k = i; k < j; k++)
				c[k].kind = 0;
		i = j;
	}
}

static int compress_batch(struct mc_session *s, struct range *r, uint64_t first, uint64_t n,
			  struct batch_args *a)
{
	uint32_t flags = a->flags;
	uint8_t *buf = a->buf, *out = a->out;
	struct mc_op_result *res = a->res;
	struct cand c[CBATCH];
	struct iovec local[CBATCH], remote[CBATCH];
	int nc = 0, nio = 0;
	uint64_t attempts = 0, ok = 0, incompressible = 0, same = 0, raced = 0, full = 0;
	int cap = (int)(PAGE * (100 - (tun.min_savings_pct > 100 ? 100 : tun.min_savings_pct)) / 100);
	uint32_t codec = tun.codec;
	ssize_t want = 0, got;

	pthread_mutex_lock(&s->lock);
	for (uint64_t i = first; i < first + n; i++) {
		struct pcs_page *p = page_at(s, r, i);
		res->pages_seen++;
		if (!p) {
			res->pages_skipped++; /* untouched */
			continue;
		}
		if (p->flags & MC_PF_SAMPLED)
			unsample(s, r, i, buf); /* buf is free until the pages are read */
		if (p->state == MC_CLEAN) {
			res->pages_done++; /* has a copy already */
			continue;
		}
		if (p->state != MC_RESIDENT || (p->flags & (MC_PF_COMPRESSING | MC_PF_SAMPLED)) ||
		    (!(flags & MC_COMPRESS_FOR_EVICT) && (p->flags & MC_PF_INCOMPRESSIBLE))) {
			res->pages_skipped++;
			continue;
		}
		p->flags |= MC_PF_COMPRESSING;
		c[nc++] = (struct cand){.idx = i, .kind = 1};
	}
	pthread_mutex_unlock(&s->lock);
	if (!nc)
		return 0;
	/* unlocked, but before the read: a write after this faults and clears COMPRESSING */
	wp_cands(s, r, c, nc, true);

	for (int i = 0; i < nc; i++) {
		void *dst = buf + (size_t)i * PAGE;
		uint64_t addr = r->start + (c[i].idx << PAGE_SHIFT);
		if (!c[i].kind)
			continue;
		if (nio && (char *)local[nio - 1].iov_base + local[nio - 1].iov_len == dst &&
		    (uint64_t)(uintptr_t)remote[nio - 1].iov_base + remote[nio - 1].iov_len == addr) {
			local[nio - 1].iov_len += PAGE;
			remote[nio - 1].iov_len += PAGE;
		} else {
			local[nio] = (struct iovec){dst, PAGE};
			remote[nio] = (struct iovec){(void *)(uintptr_t)addr, PAGE};
			nio++;
		}
		want += PAGE;
	}
	got = nio ? process_vm_readv(s->pid, local, (unsigned long)nio, remote, (unsigned long)nio, 0) : 0;
	if (got < 0 || (nio && !target_alive(s)))
		got = 0; /* read from a process that may not be ours any more: none of it counts */

	/* pages are read front to back: those past `got` were not read */
	for (int i = 0, seen = 0; i < nc; i++) {
		uint8_t *src = buf + (size_t)i * PAGE;
		uint64_t word;
		int len;
		void *slot;
		if (!c[i].kind)
			continue;
		if ((ssize_t)(++seen) * PAGE > got) {
			c[i].kind = 0;
			continue;
		}
		attempts++;
		res->bytes_in += PAGE;
		if (page_fill_word(src, &word)) {
			c[i].kind = 2;
			c[i].copy = word;
			c[i].csize = 0;
			continue;
		}
		len = codec_compress(codec, src, out, cap);
		if (len <= 0) {
			if (!(flags & MC_COMPRESS_FOR_EVICT)) {
				c[i].kind = 3;
				continue;
			}
			len = PAGE; /* kept raw, so that evicting it frees it */
			memcpy(out, src, PAGE);
		}
		c[i].copy = store_alloc(s, (uint32_t)len, &slot);
		if (!c[i].copy) {
			c[i].kind = 0;
			full++;
			continue;
		}
		memcpy(slot, out, (size_t)len);
		c[i].csize = (uint16_t)len;
	}

	pthread_mutex_lock(&s->lock);
	for (int i = 0; i < nc; i++) {
		struct pcs_page *p = page_at(s, r, c[i].idx);
		bool current = p && p->state == MC_RESIDENT && (p->flags & MC_PF_COMPRESSING);
		if (current)
			p->flags &= (uint8_t)~MC_PF_COMPRESSING;
		if (!current && c[i].kind) {
			raced++;
			if (c[i].kind == 1)
				store_free(s, c[i].copy, c[i].csize);
			continue;
		}
		if (!current)
			continue;
		if (c[i].kind == 1 || c[i].kind == 2) {
			/* the copy and the state clean in one entry: see predicomp_store.h */
			set_copy(s, r, p, c[i].copy, c[i].csize, c[i].kind == 2, MC_CLEAN);
			/* nothing recompress could better: a fill word, a raw copy, lz4hc's own */
			if (c[i].kind == 2 || c[i].csize == PAGE || codec == MC_CODEC_LZ4HC)
				mark_recompressed(s, p);
			ok++;
			same += c[i].kind == 2;
			incompressible += c[i].csize == PAGE;
			res->pages_done++;
			res->bytes_out += c[i].kind == 1 ? c[i].csize : 0;
		} else {
			if (c[i].kind == 3) {
				p->flags |= MC_PF_INCOMPRESSIBLE;
				incompressible++;
			}
			res->pages_skipped++;
		}
	}
	/* pages that got no copy must not stay write-protected */
	{
		struct cand u[CBATCH];
		int nu = 0;
		for (int i = 0; i < nc; i++) {
			struct pcs_page *p = page_at(s, r, c[i].idx);
			if (p && p->state == MC_RESIDENT && !(p->flags & MC_PF_COMPRESSING))
				u[nu++] = c[i];
		}
		wp_cands(s, r, u, nu, false);
	}
	s->c.compress_attempts += attempts;
	s->c.compress_ok += ok;
	s->c.compress_incompressible += incompressible;
	s->c.compress_same_filled += same;
	s->c.compress_raced += raced;
	s->c.compress_store_full += full;
	if (ok)
		trace_add(s, MC_TR_COMPRESS, r->index, first, ok, 0, 0);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/*
 * Call `fn` on the runs' pages, `pages` at a time, until it fails or the
 * session dies (-ESRCH); `args` gets scratch for `pages` pages and one more.
 */
static int each_batch(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint64_t pages,
		      int (*fn)(struct mc_session *, struct range *, uint64_t, uint64_t, struct batch_args *),
		      struct batch_args *args)
{
	int rc = check_runs(s, runs, nruns);

	memset(args->res, 0, sizeof *args->res);
	if (rc)
		return rc;
	args->buf = aligned_alloc(PAGE, pages * PAGE);
	args->out = malloc(PAGE);
	for (size_t i = 0; i < nruns && !rc && args->buf && args->out; i++) {
		struct range *r = run_range(s, &runs[i]);
		uint64_t end = runs[i].first + runs[i].count;
		if (!r)
			continue; /* gone meanwhile (the target unmapped it) */
		for (uint64_t at = runs[i].first; at < end && !rc;) {
			uint64_t n;
			/* blocks without an index chunk hold only untouched pages: nothing to do there */
			uint64_t next = next_indexed(s, r, at, end);
			args->res->pages_seen += next - at;
			args->res->pages_skipped += next - at;
			if ((at = next) >= end)
				break;
			n = end - at < pages ? end - at : pages;
			rc = atomic_load(&s->dead) ? -ESRCH : fn(s, r, at, n, args);
			at += n;
		}
	}
	if (!args->buf || !args->out)
		rc = -ENOMEM;
	free(args->buf);
	free(args->out);
	return rc;
}

int mc_compress(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t flags,
		struct mc_op_result *res)
{
	struct batch_args a = {.flags = flags, .res = res};
	return each_batch(s, runs, nruns, CBATCH, compress_batch, &a);
}

int64_t mc_evict_prepare(struct mc_session *s, const struct mc_run *runs, size_t nruns,
			 struct mc_addr_run *out, size_t cap, struct mc_op_result *res)
{
	int64_t nout = 0;
	int rc = check_runs(s, runs, nruns);
	uint8_t *scratch;

	memset(res, 0, sizeof *res);
	if (rc)
		return rc;
	scratch = aligned_alloc(PAGE, PAGE);
	if (!scratch)
		return -ENOMEM;
	pthread_rwlock_wrlock(&s->gate);
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < nruns; i++) {
		struct range *r = range_get(s, runs[i].range);
		uint64_t end = runs[i].first + runs[i].count;
		if (!r || end > r->npages)
			continue;
		res->pages_seen += runs[i].count;
		for (uint64_t j = runs[i].first; (j = next_indexed(s, r, j, end)) < end; j++) {
			struct pcs_page *p = page_at(s, r, j);
			uint64_t addr = r->start + (j << PAGE_SHIFT);
			if (p->flags & MC_PF_SAMPLED)
				unsample(s, r, j, scratch);
			if (p->state != MC_CLEAN || (p->flags & MC_PF_SAMPLED))
				continue;
			if (nout && out[nout - 1].addr + out[nout - 1].length == addr) {
				out[nout - 1].length += PAGE;
			} else {
				if ((size_t)nout == cap)
					continue;
				out[nout++] = (struct mc_addr_run){addr, PAGE};
			}
			set_state(r, p, MC_EVICTING);
			res->pages_done++;
		}
	}
	res->pages_skipped = res->pages_seen - res->pages_done;
	pthread_mutex_unlock(&s->lock);
	pthread_rwlock_unlock(&s->gate);
	free(scratch);
	return nout;
}

/*
 * The agent answered, or the request was cancelled before it began.  On
 * success every EVICTING page of the request is gone from the target;
 * otherwise pagemap says which are.  Held writes are released either way.
 */
int mc_evict_complete(struct mc_session *s, const struct mc_addr_run *runs, size_t nruns,
		      int status, struct mc_op_result *res)
{
	uint8_t *scratch = aligned_alloc(PAGE, PAGE), *present = NULL;
	int rc = 0;

	memset(res, 0, sizeof *res);
	if (!scratch)
		return -ENOMEM;
	pthread_mutex_lock(&s->lock);
	s->c.evict_requests++;
	for (size_t i = 0; i < nruns; i++) {
		struct range *r = range_of(s, runs[i].addr);
		uint64_t first, n, ok = 0;
		if (!r || runs[i].addr + runs[i].length > r->start + (r->npages << PAGE_SHIFT)) {
			rc = -ERANGE; /* moved or gone meanwhile: its pages were dealt with by the event */
			continue;
		}
		first = (runs[i].addr - r->start) >> PAGE_SHIFT;
		n = runs[i].length >> PAGE_SHIFT;
		if (status) {
			free(present);
			present = malloc(n);
			if (!present || pagemap_present(s, runs[i].addr, n, present)) {
				free(present);
				present = NULL; /* cannot tell: assume the worst, that it is still there */
			}
		}
		for (uint64_t k = 0; k < n; k++) {
			struct pcs_page *p = page_at(s, r, first + k);
			bool gone = !status || (present && !present[k]);
			res->pages_seen++;
			if (page_state(p) != MC_EVICTING) {
				res->pages_skipped++; /* restored meanwhile by a fault */
				continue;
			}
			if (gone) {
				set_state(r, p, (p->flags & MC_PF_SAME) && !p->copy ? MC_ZERO : MC_COMPRESSED);
				s->c.evict_ok++;
				res->pages_done++;
				ok++;
			} else {
				set_state(r, p, MC_CLEAN);
				s->c.evict_fail++;
				res->pages_skipped++;
			}
			if (p->flags & MC_PF_HELD)
				release_held(s, r, first + k, scratch);
		}
		if (ok)
			trace_add(s, MC_TR_EVICT, r->index, first, ok, 0, 0);
	}
	pthread_mutex_unlock(&s->lock);
	free(present);
	free(scratch);
	return rc;
}

/*
 * The pin protocol, for a blob read without s->lock (prefetch, recompress):
 * set MC_PF_PINNED under the lock first; drop_copy() of a pinned page then
 * unpins it and leaves the blob to the pinner.  Back under the lock, the
 * pinner unpins: true if the page's copy is still the one pinned (`snap`),
 * false if it was dropped meanwhile, and then its blob is freed here.
 */
static bool unpin_copy(struct mc_session *s, struct pcs_page *p, const struct pcs_page *snap)
{
	if (!p || !(p->flags & MC_PF_PINNED)) {
		store_free(s, snap->copy, snap->csize);
		return false;
	}
	p->flags &= (uint8_t)~MC_PF_PINNED;
	return true;
}

/* After a batch was restored: count it, stamp the pages that came back (caller holds s->lock). */
static void restored_batch(struct mc_session *s, struct range *r, uint64_t first, uint64_t n,
			   const bool *was_out, bool final, struct mc_op_result *res)
{
	uint64_t restored = 0;
	uint32_t now = (uint32_t)mc_now_ms();
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *p = page_at(s, r, first + k);
		if (final && page_state(p) == MC_CLEAN) {
			set_state(r, p, MC_RESIDENT);
			drop_copy(s, r, p);
		}
		if (!was_out[k])
			continue;
		if (p->state == MC_CLEAN || p->state == MC_RESIDENT) {
			restored++;
			p->stamp = now; /* restored: as good as used */
			p->flags &= (uint8_t)~MC_PF_PREFETCH_PENDING;
			if (!final)
				p->flags |= MC_PF_PREFETCHED;
		}
	}
	if (final)
		wp_range(s, r->start + (first << PAGE_SHIFT), n << PAGE_SHIFT, false);
	res->pages_done += restored;
	res->pages_skipped += n - restored;
	if (!final)
		s->c.prefetch_restored += restored;
	if (restored)
		trace_add(s, MC_TR_PREFETCH, r->index, first, restored, 0, 0);
}

/*
 * Prefetch a batch in three steps: pin the blobs (locked), decode them
 * unlocked -- so that two threads decode at once and faults are served
 * meanwhile -- then copy in the pages nothing changed, in as few
 * UFFDIO_COPYs as the batch allows: same-filled pages and short runs of
 * zero pages are filled in with the rest (long zero runs are left to
 * restore_run, which maps the zero page).  The copies run without s->lock,
 * under the events gate (see internal.h), so two threads copy at once too.
 * A page restored by a fault in between is skipped; if that fault dropped
 * the copy (a write), drop_copy() left the pinned blob to us to free.
 */
static void prefetch_batch(struct mc_session *s, struct range *r, uint64_t first, uint64_t n,
			   uint8_t *scratch, struct mc_op_result *res)
{
	struct pcs_page snap[PBATCH]; /* the pages as checked, decoded without s->lock */
	bool pinned[PBATCH], ready[PBATCH], was_out[PBATCH], copied[PBATCH];
	uint64_t t0, t1, t2, t3, t4; /* thread CPU: decoding [t0, t1), copying in [t2, t3) and from t4 */

	pthread_mutex_lock(&s->lock);
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *p = page_at(s, r, first + k);
		snap[k] = p ? *p : (struct pcs_page){0};
		was_out[k] = snap[k].state == MC_COMPRESSED || snap[k].state == MC_ZERO;
		pinned[k] = ready[k] = copied[k] = false;
		res->pages_seen++;
		if (!was_out[k])
			continue;
		if (p->flags & MC_PF_SAME) {
			ready[k] = true; /* zero or same-filled: the word is all there is */
		} else if (p->copy && !(p->flags & MC_PF_PINNED)) {
			p->flags |= MC_PF_PINNED;
			pinned[k] = ready[k] = true;
		}
	}
	for (uint64_t k = 0; k < n;) { /* long zero runs: the zero page, not a copy */
		uint64_t z = zero_run(s, r, first, k, n);
		if (z >= ZERO_RUN_MIN)
			memset(ready + k, 0, z * sizeof *ready);
		k += z ? z : 1;
	}
	pthread_mutex_unlock(&s->lock);

	t0 = thread_cpu_ns();
	for (uint64_t k = 0; k < n; k++)
		if (ready[k])
			ready[k] = page_bytes(s, &snap[k], scratch + k * PAGE) == 0;
	t1 = thread_cpu_ns();

	pthread_rwlock_rdlock(&s->events_gate);
	pthread_mutex_lock(&s->lock);
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *p = page_at(s, r, first + k);
		if (pinned[k] && !unpin_copy(s, p, &snap[k]))
			ready[k] = false;
		/* only what is still evicted with the same copy goes in */
		if (ready[k] && (!p || p->state != snap[k].state || p->copy != snap[k].copy))
			ready[k] = false;
	}
	pthread_mutex_unlock(&s->lock);
	/* the events gate is held: no message is read until the states below are true */
	if (tun.debug_prefetch_delay_us)
		usleep(tun.debug_prefetch_delay_us);
	t2 = thread_cpu_ns();
	for (uint64_t i = 0; i < n;) {
		uint64_t j = i, got;
		int64_t done = 0;
		if (!ready[i]) {
			i++;
			continue;
		}
		while (j < n && ready[j])
			j++;
		copy_pages(s, r->start + ((first + i) << PAGE_SHIFT), scratch + i * PAGE,
			   (j - i) << PAGE_SHIFT, true, &done);
		got = (uint64_t)done >> PAGE_SHIFT;
		memset(copied + i, 1, got * sizeof *copied);
		/* stopped early (the page is there already, or the mm changed): skip it */
		i = got < j - i ? i + got + 1 : j;
	}
	t3 = thread_cpu_ns();
	pthread_mutex_lock(&s->lock);
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *q = page_at(s, r, first + k);
		/* an operation that restored the page meanwhile found ours there and took it over */
		if (copied[k] && q && q->state == snap[k].state && q->copy == snap[k].copy)
			copied_in(s, r, q, false);
	}
	t4 = thread_cpu_ns();
	for (uint64_t i = 0; i < n;) { /* long zero runs, and any copy that did not decode: as usual */
		uint64_t j = i;
		if (ready[i]) {
			i++;
			continue;
		}
		while (j < n && !ready[j])
			j++;
		restore_run(s, r, first + i, j - i, false, scratch + i * PAGE);
		i = j;
	}
	s->c.prefetch_decode_ns += t1 - t0;
	s->c.prefetch_copy_ns += t3 - t2 + thread_cpu_ns() - t4; /* with the zero runs' */
	restored_batch(s, r, first, n, was_out, false, res);
	pthread_mutex_unlock(&s->lock);
	pthread_rwlock_unlock(&s->events_gate);
}

int mc_restore(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t flags,
	       struct mc_op_result *res)
{
	bool final = flags & MC_RESTORE_FINAL;
	uint64_t batch = final ? RBATCH : PBATCH;
	uint8_t *scratch;
	int rc = check_runs(s, runs, nruns);

	memset(res, 0, sizeof *res);
	if (rc)
		return rc;
	scratch = aligned_alloc(PAGE, batch * PAGE);
	if (!scratch)
		return -ENOMEM;
	for (size_t i = 0; i < nruns && !rc; i++) {
		struct range *r = run_range(s, &runs[i]);
		uint64_t end = runs[i].first + runs[i].count;
		if (!r)
			continue;
		for (uint64_t first = runs[i].first; first < end;) {
			uint64_t next = next_indexed(s, r, first, end), n;
			bool was_out[RBATCH];
			res->pages_seen += next - first;
			res->pages_skipped += next - first;
			if ((first = next) >= end)
				break;
			n = end - first < batch ? end - first : batch;
			if (atomic_load(&s->dead)) {
				rc = -ESRCH;
				break;
			}
			if (!final) {
				prefetch_batch(s, r, first, n, scratch, res);
				first += n;
				continue;
			}
			/* the end of a session: the target gets every page back writable */
			pthread_mutex_lock(&s->lock);
			for (uint64_t k = 0; k < n; k++) {
				uint8_t st = page_state(page_at(s, r, first + k));
				was_out[k] = st == MC_COMPRESSED || st == MC_ZERO;
				res->pages_seen++;
			}
			restore_run(s, r, first, n, true, scratch);
			restored_batch(s, r, first, n, was_out, true, res);
			pthread_mutex_unlock(&s->lock);
			first += n;
		}
	}
	free(scratch);
	return rc;
}

int mc_mark_prefetch(struct mc_session *s, const struct mc_run *runs, size_t nruns)
{
	int rc = check_runs(s, runs, nruns);
	if (rc)
		return rc;
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < nruns; i++) {
		struct range *r = range_get(s, runs[i].range);
		uint64_t end = runs[i].first + runs[i].count;
		if (!r || end > r->npages)
			continue;
		for (uint64_t j = runs[i].first; (j = next_indexed(s, r, j, end)) < end; j++) {
			struct pcs_page *p = page_at(s, r, j);
			if (p->state == MC_COMPRESSED || p->state == MC_ZERO || p->state == MC_EVICTING) {
				p->flags |= MC_PF_PREFETCH_PENDING;
				s->c.prefetch_issued++;
			}
		}
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/*
 * Recompress: copies made by the fast codec at eviction are encoded again
 * by lz4hc where that gives a smaller blob, as zram's recompress does for
 * idle pages.  An LZ4 block decodes the same whichever LZ4 encoder made
 * it, so decoding needs no record of which one did; the stronger encoder's
 * blobs are smaller and also decode faster (fewer, longer matches), which
 * is what restores and prefetches then pay.
 *
 * The same steps as a prefetch: pin the blobs (locked), decode and encode
 * unlocked, then swap in the new blob of every page still pinned (locked;
 * see unpin_copy()).  A fault in between reads the old blob under s->lock,
 * and the swap is under s->lock too, so no blob is freed while read.
 * Operations run one at a time per session, so no prefetch pins these
 * pages meanwhile.  Each copy is dealt with once (page->recompressed,
 * cleared with the copy), so a policy that offers idle copies round after
 * round costs nothing for those done already; raw copies (the page did not
 * shrink enough), same-filled pages and lz4hc's own copies are marked so
 * when they are made.
 */
static int recompress_batch(struct mc_session *s, struct range *r, uint64_t first, uint64_t n,
			    struct batch_args *a)
{
	struct pcs_page snap[PBATCH];
	uint64_t blob[PBATCH]; /* the new copy's handle, 0: none */
	uint16_t len[PBATCH];
	bool pinned[PBATCH];
	uint64_t attempts = 0, ok = 0;

	pthread_mutex_lock(&s->lock);
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *p = page_at(s, r, first + k);
		snap[k] = p ? *p : (struct pcs_page){0};
		blob[k] = 0;
		/* (raw and same-filled copies are marked recompressed when made) */
		pinned[k] = p && (p->state == MC_COMPRESSED || p->state == MC_CLEAN) && !p->recompressed &&
			    !(p->flags & (MC_PF_PINNED | MC_PF_SAMPLED));
		if (pinned[k])
			p->flags |= MC_PF_PINNED;
		a->res->pages_seen++;
	}
	pthread_mutex_unlock(&s->lock);

	for (uint64_t k = 0; k < n; k++) {
		void *slot;
		int l;
		if (!pinned[k])
			continue;
		attempts++;
		if (page_bytes(s, &snap[k], a->buf))
			continue; /* undecodable: a fault on it says so, not us */
		l = codec_compress(MC_CODEC_LZ4HC, a->buf, a->out, snap[k].csize - 1);
		if (l <= 0 || store_slot_size((uint32_t)l) >= store_slot_size(snap[k].csize))
			continue; /* no smaller in the store */
		blob[k] = store_alloc(s, (uint32_t)l, &slot);
		if (!blob[k])
			continue;
		memcpy(slot, a->out, (size_t)l);
		len[k] = (uint16_t)l;
	}

	pthread_mutex_lock(&s->lock);
	for (uint64_t k = 0; k < n; k++) {
		struct pcs_page *p = page_at(s, r, first + k);
		if (!pinned[k]) {
			a->res->pages_skipped++;
			continue;
		}
		if (!unpin_copy(s, p, &snap[k])) { /* the copy was dropped meanwhile: ours is no use either */
			if (blob[k])
				store_free(s, blob[k], len[k]);
			a->res->pages_skipped++;
			continue;
		}
		if (!blob[k]) {
			mark_recompressed(s, p); /* lz4hc found nothing smaller: so it stays */
			a->res->pages_skipped++;
			continue;
		}
		set_copy(s, r, p, blob[k], len[k], false, p->state); /* frees the old blob */
		mark_recompressed(s, p);
		ok++;
		a->res->pages_done++;
		a->res->bytes_in += snap[k].csize;
		a->res->bytes_out += len[k];
	}
	s->c.recompress_attempts += attempts;
	s->c.recompress_ok += ok;
	if (ok)
		trace_add(s, MC_TR_RECOMPRESS, r->index, first, ok, 0, 0);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int mc_recompress(struct mc_session *s, const struct mc_run *runs, size_t nruns, struct mc_op_result *res)
{
	struct batch_args a = {.res = res};
	return each_batch(s, runs, nruns, PBATCH, recompress_batch, &a);
}
