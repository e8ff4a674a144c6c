/*
 * sample.c - seeing which pages a target uses, without DAMON.
 *
 * A sampled page is moved (UFFDIO_MOVE: a page-table operation, no copy)
 * from its place into a slot of the session's staging area, a range of
 * the target's memory that the client library set aside.  The kernel lets
 * only the target itself move its pages, so the target's agent makes the
 * moves, on request (PCP_SAMPLE).  If the target then touches the page, it
 * takes a missing fault: the daemon copies the page back from its slot and
 * counts it as used.  At the end of the sampling interval the pages not
 * touched are copied back the same way.  Copied-back slots hold stale
 * copies until the agent zaps the whole staging area, first thing in its
 * next sampling request.
 *
 * Only resident (dirty) pages are sampled: a page comes back writable, so
 * a clean page would lose its write protection.  A clean page's writes
 * are seen anyway, through write protection.
 *
 * While a page is out, its `stamp` holds the slot number; the slot
 * keeps the real stamp (page_stamp()).  Operations put sampled pages back
 * before acting on them.  A slot is read only after pagemap showed it
 * present: reading a missing registered page would wait for a fault that
 * only the reading thread could serve.  Callers hold s->lock.
 */
#include "internal.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

static uint64_t slot_addr(const struct mc_session *s, uint32_t slot)
{
	return s->staging_start + ((uint64_t)slot << PAGE_SHIFT);
}

static uint64_t page_addr(const struct range *r, uint64_t idx)
{
	return r->start + (idx << PAGE_SHIFT);
}

/* Copy a page back from its slot into its place (which wakes anyone waiting there). */
static int copy_back(struct mc_session *s, struct range *r, uint64_t idx, uint32_t slot,
		     uint8_t *scratch)
{
	uint8_t present = 0;
	struct iovec local = {scratch, PAGE};
	struct iovec remote = {(void *)(uintptr_t)slot_addr(s, slot), PAGE};
	int64_t done;

	if (pagemap_present(s, slot_addr(s, slot), 1, &present) || !present)
		return -ENOENT;
	if (process_vm_readv(s->pid, &local, 1, &remote, 1, 0) != PAGE || !target_alive(s))
		return -EIO;
	return copy_pages(s, page_addr(r, idx), scratch, PAGE, false, &done);
}

static void release_slot(struct mc_session *s, struct pcs_page *p, uint8_t status)
{
	struct pcs_slot *sl = &s->slots[p->stamp];
	struct pcs_page v = *p;
	v.stamp = sl->old_stamp;
	v.flags &= (uint8_t)~MC_PF_SAMPLED;
	page_commit(p, &v); /* never a stamp read as a slot */
	sl->status = status;
}

/* A missing fault on a sampled page: it was used.  Bring it back. */
int sample_fault(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch)
{
	struct pcs_page *p = page_at(s, r, idx);
	struct pcs_slot *sl = &s->slots[p->stamp];
	int rc;

	if (sl->status != SLOT_OUT && sl->status != SLOT_PENDING)
		return -EEXIST; /* not out: let the thread retry */
	rc = copy_back(s, r, idx, p->stamp, scratch);
	if (rc == -ENOENT) {
		/* in neither place: the move has not happened (retry), or the data is gone */
		if (sl->status == SLOT_PENDING)
			return -EAGAIN;
		s->c.anomalies++;
		release_slot(s, p, SLOT_LOST);
		lose_page(s, r, idx);
		return 0;
	}
	if (rc)
		return rc;
	release_slot(s, p, SLOT_USED);
	p->stamp = (uint32_t)mc_now_ms();
	if (p->flags & MC_PF_PREFETCHED) {
		p->flags &= (uint8_t)~MC_PF_PREFETCHED;
		s->c.prefetch_hits++;
	}
	s->c.sampler_faults++;
	return 0;
}

/* An operation needs a sampled page at home; false if it cannot be had now. */
bool unsample(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch)
{
	struct pcs_page *p = page_at(s, r, idx);
	if (s->slots[p->stamp].status != SLOT_OUT || copy_back(s, r, idx, p->stamp, scratch))
		return false;
	release_slot(s, p, SLOT_DIRTY);
	return true;
}

/* Where a sampled page is now: its slot, or still its place (the agent has not moved it yet). */
uint64_t sampled_page_addr(struct mc_session *s, struct range *r, uint64_t idx)
{
	uint32_t slot = page_at(s, r, idx)->stamp;
	uint8_t present = 0;
	if (s->slots[slot].status == SLOT_OUT ||
	    (!pagemap_present(s, slot_addr(s, slot), 1, &present) && present))
		return slot_addr(s, slot);
	return page_addr(r, idx);
}

/* The target dropped or unmapped a sampled page itself: its slot is given up. */
void sample_forget(struct mc_session *s, struct pcs_page *p)
{
	release_slot(s, p, SLOT_LOST);
	s->c.sampler_lost_slots++;
}

int64_t mc_sample_prepare(struct mc_session *s, const struct mc_run *pages, size_t n,
			  struct mc_move *moves, size_t cap, int *zap)
{
	int64_t k = 0;
	bool busy = false, dirty = false;

	*zap = 0;
	pthread_mutex_lock(&s->lock);
	for (uint32_t i = 0; i < s->staging_npages; i++) {
		busy |= s->slots[i].status == SLOT_PENDING || s->slots[i].status == SLOT_OUT;
		dirty |= s->slots[i].status == SLOT_USED || s->slots[i].status == SLOT_DIRTY;
	}
	if (dirty && !busy) { /* the agent zaps staging before it moves: those slots are free again */
		for (uint32_t i = 0; i < s->staging_npages; i++)
			if (s->slots[i].status == SLOT_USED || s->slots[i].status == SLOT_DIRTY) {
				s->slots[i].status = SLOT_FREE;
				s->free_slots[s->nfree_slots++] = i;
			}
		*zap = 1;
	}
	for (size_t i = 0; i < n && (size_t)k < cap && s->nfree_slots; i++) {
		struct range *r = range_get(s, pages[i].range);
		struct pcs_page *p;
		uint32_t slot;
		if (!r || pages[i].first >= r->npages)
			continue;
		p = page_at(s, r, pages[i].first);
		if (!p || p->state != MC_RESIDENT || (p->flags & (MC_PF_COMPRESSING | MC_PF_HELD | MC_PF_SAMPLED)))
			continue;
		slot = s->free_slots[--s->nfree_slots];
		s->slots[slot] = (struct pcs_slot){.page = pages[i].first, .range = r->index,
					       .old_stamp = p->stamp, .status = SLOT_PENDING, .reported = 0};
		/* the slot table first: a reader finds the page through its slot (predicomp_store.h) */
		atomic_signal_fence(memory_order_seq_cst);
		{
			struct pcs_page v = *p;
			v.stamp = slot;
			v.flags |= MC_PF_SAMPLED;
			page_commit(p, &v);
		}
		moves[k++] = (struct mc_move){.src = page_addr(r, pages[i].first), .dst = slot_addr(s, slot)};
	}
	pthread_mutex_unlock(&s->lock);
	return k;
}

/* The agent's answer: bit i of `moved` says whether moves[i] happened. */
int mc_sample_commit(struct mc_session *s, const struct mc_move *moves, size_t n, const uint8_t *moved)
{
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < n; i++) {
		uint64_t off = moves[i].dst - s->staging_start;
		uint32_t slot = (uint32_t)(off >> PAGE_SHIFT);
		struct pcs_slot *sl;
		struct pcs_page *p;
		if (moves[i].dst < s->staging_start || slot >= s->staging_npages)
			continue;
		sl = &s->slots[slot];
		if (sl->status != SLOT_PENDING)
			continue; /* used meanwhile (a fault came before the answer) */
		if (!range_get(s, sl->range)) {
			sl->status = SLOT_LOST; /* its range went (sample_forget did the rest) */
			continue;
		}
		p = page_at(s, range_get(s, sl->range), sl->page);
		if (moved[i / 8] & (1u << (i % 8))) {
			sl->status = SLOT_OUT;
			s->c.samples++;
		} else {
			release_slot(s, p, SLOT_DIRTY); /* the slot may hold something: zap it first */
		}
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/*
 * The end of a sampling interval: report every sampled page (used or not)
 * and copy back the ones still out, with their stamps unchanged.  `final`
 * (the session is ending, no request is in flight) settles pending slots
 * too, by where pagemap finds the page.
 */
int64_t mc_sample_collect(struct mc_session *s, struct mc_sample_result *out, size_t cap, int final)
{
	uint8_t *scratch = aligned_alloc(PAGE, PAGE);
	int64_t n = 0;

	if (!scratch)
		return -ENOMEM;
	pthread_mutex_lock(&s->lock);
	for (uint32_t slot = 0; slot < s->staging_npages && (size_t)n < cap; slot++) {
		struct pcs_slot *sl = &s->slots[slot];
		struct range *r = range_get(s, sl->range);
		bool used = sl->status == SLOT_USED;
		if (!r && (sl->status == SLOT_PENDING || sl->status == SLOT_OUT)) {
			sl->status = SLOT_LOST;
			continue;
		}
		if (final && sl->status == SLOT_PENDING) {
			uint8_t present = 0;
			if (!pagemap_present(s, slot_addr(s, slot), 1, &present) && present)
				sl->status = SLOT_OUT; /* moved, the answer lost: bring it home below */
			else
				release_slot(s, page_at(s, r, sl->page), SLOT_DIRTY); /* never left */
		}
		if (sl->status == SLOT_OUT) {
			if (!unsample(s, r, sl->page, scratch))
				continue; /* cannot now: next time */
		} else if (!used || sl->reported) {
			continue;
		}
		sl->reported = used; /* a used slot is reported once, then waits for the zap */
		out[n++] = (struct mc_sample_result){.range = sl->range, .accessed = used, .page = sl->page};
	}
	pthread_mutex_unlock(&s->lock);
	free(scratch);
	return n;
}

/* Evidence from an access source: these pages were used at `when_ms` (never makes a page older). */
int mc_note_access(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t when_ms)
{
	pthread_mutex_lock(&s->lock);
	for (size_t i = 0; i < nruns; i++) {
		struct range *r = range_get(s, runs[i].range);
		uint64_t end;
		if (!r)
			continue;
		end = runs[i].first + runs[i].count < r->npages ? runs[i].first + runs[i].count : r->npages;
		for (uint64_t j = runs[i].first; (j = next_indexed(s, r, j, end)) < end; j++) {
			struct pcs_page *p = page_at(s, r, j);
			uint32_t *stamp = p->flags & MC_PF_SAMPLED ? &s->slots[p->stamp].old_stamp : &p->stamp;
			if ((int32_t)(when_ms - *stamp) > 0)
				*stamp = when_ms;
			if (p->flags & MC_PF_PREFETCHED) {
				p->flags &= (uint8_t)~MC_PF_PREFETCHED;
				s->c.prefetch_hits++;
			}
		}
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}
