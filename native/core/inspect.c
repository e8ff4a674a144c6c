/* inspect.c - reading a session's pages and page states, and choosing pages by state and age. */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

static struct range *check_span(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count)
{
	struct range *r = range_get(s, range);
	if (!r || first > r->npages || count > r->npages - first)
		return NULL;
	return r;
}

int mc_page_info(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count,
		 struct mc_page_info *out)
{
	uint32_t now = (uint32_t)mc_now_ms();
	struct range *r;
	int rc = 0;
	pthread_mutex_lock(&s->lock);
	r = check_span(s, range, first, count);
	for (uint64_t i = 0; r && i < count; i++) {
		const struct pcs_page *p = page_at(s, r, first + i);
		out[i] = (struct mc_page_info){
			.state = p && (p->flags & MC_PF_SAMPLED) ? MC_SAMPLED : page_state(p),
			.flags = p ? p->flags : 0,
			.csize = p && !(p->flags & MC_PF_SAME) ? p->csize : 0,
			.age_ms = now - page_stamp(s, r, p)};
	}
	if (!r)
		rc = -ERANGE;
	pthread_mutex_unlock(&s->lock);
	return rc;
}

/*
 * The logical bytes of pages, whatever their state, without faulting the
 * target: copies come from the store, untouched pages are zeros, and only
 * pages the target holds (resident, clean) are read from it, under the
 * gate that keeps them from being evicted meanwhile.  What was read from
 * the target counts only if it still lives afterwards: then its pid was
 * its own all along, never a newcomer's.
 */
int mc_read_data(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count, void *buf)
{
	enum { BATCH = 64 };
	struct iovec local[BATCH], remote[BATCH];
	int rc = 0;

	for (uint64_t pos = 0; pos < count && !rc; pos += BATCH) {
		uint64_t n = count - pos < BATCH ? count - pos : BATCH;
		struct range *r;
		int nio = 0;
		pthread_rwlock_rdlock(&s->gate);
		pthread_mutex_lock(&s->lock);
		r = check_span(s, range, first, count);
		for (uint64_t i = 0; r && i < n; i++) {
			struct pcs_page *p = page_at(s, r, first + pos + i);
			char *dst = (char *)buf + (pos + i) * PAGE;
			uint8_t st = page_state(p);
			if (st == MC_RESIDENT || st == MC_CLEAN) {
				/* a sampled page waits in its staging slot */
				uint64_t addr = p->flags & MC_PF_SAMPLED
						    ? sampled_page_addr(s, r, first + pos + i)
						    : r->start + ((first + pos + i) << PAGE_SHIFT);
				if (nio && (char *)local[nio - 1].iov_base + local[nio - 1].iov_len == dst &&
				    (uint64_t)(uintptr_t)remote[nio - 1].iov_base + remote[nio - 1].iov_len == addr) {
					local[nio - 1].iov_len += PAGE;
					remote[nio - 1].iov_len += PAGE;
				} else {
					local[nio] = (struct iovec){dst, PAGE};
					remote[nio] = (struct iovec){(void *)(uintptr_t)addr, PAGE};
					nio++;
				}
			} else if (st == MC_UNTOUCHED || st == MC_ZERO || page_bytes(s, p, dst)) {
				memset(dst, 0, PAGE);
			}
		}
		if (!r)
			rc = -ERANGE;
		pthread_mutex_unlock(&s->lock);
		if (nio && !rc) {
			ssize_t got = process_vm_readv(s->pid, local, (unsigned long)nio, remote,
						       (unsigned long)nio, 0);
			if (got < 0)
				rc = -errno;
			else if (!target_alive(s))
				rc = -ESRCH;
		}
		pthread_rwlock_unlock(&s->gate);
	}
	if (rc)
		memset(buf, 0, count * PAGE); /* nothing read from a process that may not be ours */
	return rc;
}

static inline unsigned age_bucket(uint32_t age)
{
	return age ? 32u - (unsigned)__builtin_clz(age) : 0u; /* 0..32 */
}

/*
 * Is the page in one of `state_mask` states, idle at least min_age_ms, without any of `skip_flags`
 * (MC_PF_* and MC_SKIP_RECOMPRESSED)?  Pages without an entry are untouched, born with the range.
 */
static bool page_selected(struct mc_session *s, const struct range *r, const struct pcs_page *p,
			  uint32_t state_mask, uint32_t min_age_ms, uint32_t skip_flags, uint32_t now,
			  uint32_t *age)
{
	*age = now - page_stamp(s, r, p);
	if (!p)
		return (state_mask >> MC_UNTOUCHED) & 1 && *age >= min_age_ms;
	return (state_mask >> p->state) & 1 && *age >= min_age_ms && !(p->flags & skip_flags) &&
	       !((skip_flags & MC_SKIP_RECOMPRESSED) && p->recompressed);
}

/*
 * Call fn(page index, age) for each page of r that page_selected() takes, in
 * address order, until it returns false.  Blocks without an index chunk are
 * untouched pages: skipped unless untouched pages are asked for.
 */
static bool each_selected(struct mc_session *s, struct range *r, uint32_t state_mask, uint32_t min_age_ms,
			  uint32_t skip_flags, uint32_t now, bool (*fn)(void *, uint64_t, uint32_t), void *ctx)
{
	bool untouched = (state_mask >> MC_UNTOUCHED) & 1;
	uint32_t age;
	for (uint64_t j = 0; j < r->npages;) {
		uint64_t end = (j / PCS_ENTRIES_PER_CHUNK + 1) * PCS_ENTRIES_PER_CHUNK;
		struct pcs_page *base = page_at(s, r, j); /* entry 0 of the block, or NULL */
		if (end > r->npages)
			end = r->npages;
		if (!base && !untouched) {
			j = end;
			continue;
		}
		for (; j < end; j++) {
			struct pcs_page *p = base ? base + j % PCS_ENTRIES_PER_CHUNK : NULL; /* j starts a block */
			if (page_selected(s, r, p, state_mask, min_age_ms, skip_flags, now, &age) && !fn(ctx, j, age))
				return false;
		}
	}
	return true;
}

static bool count_age(void *ctx, uint64_t j, uint32_t age)
{
	(void)j;
	((uint64_t *)ctx)[age_bucket(age)]++;
	return true;
}

/* The pages page_selected() takes, by age class (caller holds s->lock). */
static void age_hist(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		     uint32_t skip_flags, uint32_t now, uint64_t *hist)
{
	for (uint32_t ri = 0; ri < s->nranges; ri++) {
		struct range *r = range_get(s, ri);
		if (r && (range < 0 || (uint32_t)range == ri))
			each_selected(s, r, state_mask, min_age_ms, skip_flags, now, count_age, hist);
	}
}

int mc_age_hist(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		uint32_t skip_flags, uint64_t *out)
{
	int rc = 0;
	memset(out, 0, MC_AGE_CLASSES * sizeof *out);
	pthread_mutex_lock(&s->lock);
	if (range >= 0 && !range_get(s, (uint32_t)range))
		rc = -ERANGE;
	else
		age_hist(s, range, state_mask, min_age_ms, skip_flags, (uint32_t)mc_now_ms(), out);
	pthread_mutex_unlock(&s->lock);
	return rc;
}

struct select_ctx {
	struct mc_run *out;
	size_t cap;
	int64_t nout;
	uint32_t ri;
	uint64_t taken, max_pages;
	int order, cut;
	uint64_t in_cut_allowed;
	bool full;
};

static bool take(void *arg, uint64_t j, uint32_t age)
{
	struct select_ctx *c = arg;
	if (c->taken >= c->max_pages)
		return false;
	if (c->cut >= 0) {
		int b = (int)age_bucket(age);
		if (c->order > 0 ? b < c->cut : b > c->cut)
			return true;
		if (b == c->cut) {
			if (!c->in_cut_allowed)
				return true;
			c->in_cut_allowed--;
		}
	}
	if (c->nout && c->out[c->nout - 1].range == c->ri && c->out[c->nout - 1].first + c->out[c->nout - 1].count == j) {
		c->out[c->nout - 1].count++;
	} else {
		if ((size_t)c->nout == c->cap) {
			c->full = true;
			return false;
		}
		c->out[c->nout++] = (struct mc_run){.range = c->ri, .first = j, .count = 1};
	}
	c->taken++;
	return true;
}

/*
 * Runs of pages in `state_mask` states idle at least min_age_ms, without any
 * of `skip_flags` (as page_selected).  With a max_pages limit, `order` > 0
 * takes the oldest first and < 0 the youngest first (by power-of-two age
 * class; address order within the class that straddles the limit); 0 takes
 * them in address order.
 */
int64_t mc_select(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		  uint32_t skip_flags, uint64_t max_pages, int order, struct mc_run *out, size_t cap,
		  uint64_t *npages)
{
	uint32_t now = (uint32_t)mc_now_ms();
	uint64_t hist[MC_AGE_CLASSES] = {0};
	struct select_ctx c = {.out = out, .cap = cap, .max_pages = max_pages ? max_pages : UINT64_MAX,
			       .order = order, .cut = -1};

	pthread_mutex_lock(&s->lock);
	if (range >= 0 && !range_get(s, (uint32_t)range)) {
		pthread_mutex_unlock(&s->lock);
		return -ERANGE;
	}
	if (order && c.max_pages != UINT64_MAX) {
		uint64_t acc = 0;
		age_hist(s, range, state_mask, min_age_ms, skip_flags, now, hist); /* what the pass below takes */
		for (int k = 0; k < MC_AGE_CLASSES && acc < c.max_pages; k++) {
			c.cut = order > 0 ? MC_AGE_CLASSES - 1 - k : k;
			acc += hist[c.cut];
		}
		c.in_cut_allowed = c.cut >= 0 ? hist[c.cut] - (acc > c.max_pages ? acc - c.max_pages : 0) : 0;
	}
	for (uint32_t ri = 0; ri < s->nranges && c.taken < c.max_pages && !c.full; ri++) {
		struct range *r = range_get(s, ri);
		if (!r || (range >= 0 && (uint32_t)range != ri))
			continue;
		c.ri = ri;
		each_selected(s, r, state_mask, min_age_ms, skip_flags, now, take, &c);
	}
	pthread_mutex_unlock(&s->lock);
	*npages = c.taken;
	return c.nout;
}

size_t mc_trace_read(struct mc_session *s, uint64_t *cursor, struct mc_trace_event *out,
		     size_t cap, uint64_t *missed)
{
	size_t n = 0;
	pthread_mutex_lock(&s->lock);
	*missed = 0;
	if (s->trace_head > TRACE_CAP && *cursor < s->trace_head - TRACE_CAP) {
		*missed = s->trace_head - TRACE_CAP - *cursor;
		*cursor = s->trace_head - TRACE_CAP;
	}
	while (*cursor < s->trace_head && n < cap)
		out[n++] = s->trace[(*cursor)++ % TRACE_CAP];
	pthread_mutex_unlock(&s->lock);
	return n;
}

/* Pages of the runs in `state_mask` states (untouched ones only if asked for). */
int64_t mc_count(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t state_mask)
{
	int64_t n = 0;
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < nruns; i++) {
		struct range *r = range_get(s, runs[i].range);
		uint64_t end;
		if (!r || runs[i].first >= r->npages)
			continue;
		end = runs[i].count > r->npages - runs[i].first ? r->npages : runs[i].first + runs[i].count;
		for (uint64_t j = runs[i].first; j < end; j++) {
			struct pcs_page *p = page_at(s, r, j);
			if (!p && !((state_mask >> MC_UNTOUCHED) & 1)) {
				j = (j / PCS_ENTRIES_PER_CHUNK + 1) * PCS_ENTRIES_PER_CHUNK - 1;
				continue;
			}
			n += (state_mask >> page_state(p)) & 1;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return n;
}
