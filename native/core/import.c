/*
 * import.c - a restarted daemon takes a session back (RESUME, memfs(7)).
 *
 * The target kept its old store (predicomp_store.h) and served its own
 * faults from it while no daemon ran.  The new session's pages are rebuilt
 * from three sources: the old index (which pages had a copy), what the
 * target's agent reports it forgot (pages the target discarded while alone:
 * their copies are stale), and what the kernel says now (pagemap: present,
 * and write-protected or not).
 *
 *   present, write-protected, with a copy  -> clean (restored read-only, or never written)
 *   present, written                        -> resident (no copy)
 *   absent, with a copy                     -> compressed or zero
 *   absent, without                         -> untouched
 *
 * A page written after its copy was taken is never write-protected (the
 * write faulted and its protection was lifted first), so a copy kept for a
 * present page is always its contents.  The old file comes from the target
 * and is not trusted: it is read with pread only (a file shrunk under us
 * cannot fault the daemon), every offset and count is checked, and blobs
 * are copied into the new store, so nothing of the old file is used after.
 * The target waits (no fault is served) while this runs: its agent stopped
 * reading the userfaultfd before it asked to resume, and everything the
 * target does to registered memory meanwhile queues there.
 */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct old_store {
	int fd;
	uint64_t size, nchunks;
	uint32_t cached; /* the chunk in `buf`, 0: none */
	uint8_t *buf;    /* PCS_CHUNK bytes */
};

static int read_at(const struct old_store *o, void *dst, size_t len, uint64_t off)
{
	if (off > o->size || len > o->size - off)
		return -EINVAL;
	return pread(o->fd, dst, len, (off_t)off) == (ssize_t)len ? 0 : -EIO;
}

static bool chunk_ok(const struct old_store *o, uint32_t c)
{
	return c && c < o->nchunks && PCS_CHUNKS_OFF + ((uint64_t)c + 1) * PCS_CHUNK <= o->size;
}

/* The old blob of `e`, into a new blob of this store; 0: none (bad, or no room). */
static uint64_t import_blob(struct mc_session *s, struct old_store *o, const struct pcs_page *e)
{
	uint64_t off = e->copy * PCS_BLOB_ALIGN, rel;
	uint32_t c;
	void *slot;
	uint64_t h;

	if (!e->csize || e->csize > PAGE || off < PCS_CHUNKS_OFF)
		return 0;
	c = (uint32_t)((off - PCS_CHUNKS_OFF) / PCS_CHUNK);
	rel = off - PCS_CHUNKS_OFF - (uint64_t)c * PCS_CHUNK;
	if (!chunk_ok(o, c) || rel + e->csize > PCS_CHUNK)
		return 0;
	if (o->cached != c) {
		if (read_at(o, o->buf, PCS_CHUNK, PCS_CHUNKS_OFF + (uint64_t)c * PCS_CHUNK))
			return 0;
		o->cached = c;
	}
	h = store_alloc(s, e->csize, &slot);
	if (h)
		memcpy(slot, o->buf + rel, e->csize);
	return h;
}

/* One 4096-page block of an old range: its entries, and what pagemap says of them now. */
static int import_block(struct mc_session *s, struct old_store *o, struct range *r, uint64_t first,
			uint32_t chunk, struct pcs_page *old, uint64_t *pm)
{
	uint64_t n = r->npages - first < PCS_ENTRIES_PER_CHUNK ? r->npages - first : PCS_ENTRIES_PER_CHUNK;
	int rc = read_at(o, old, n * sizeof *old, PCS_CHUNKS_OFF + (uint64_t)chunk * PCS_CHUNK);
	if (rc)
		return rc;
	if (pread(s->pagemap_fd, pm, n * 8, (off_t)(((r->start >> PAGE_SHIFT) + first) * 8)) != (ssize_t)(n * 8))
		return -EIO;
	for (uint64_t k = 0; k < n; k++) {
		const struct pcs_page *e = &old[k];
		bool present = (pm[k] >> 62) & 3, wp = (pm[k] >> 57) & 1, same = e->flags & MC_PF_SAME;
		struct pcs_page *p;
		uint64_t copy;
		uint8_t state;

		if (e->state >= MC_NSTATES || !((PCS_HAS_COPY_STATES >> e->state) & 1) || (!e->copy && !same) ||
		    (e->flags & MC_PF_SAMPLED) || (present && !wp))
			continue; /* no copy worth keeping: present pages are resident from the scan */
		copy = same ? e->copy : import_blob(s, o, e);
		if (!copy && !same)
			continue; /* unreadable: an absent page without a copy reads as zeros, as untouched */
		p = page_get(s, r, first + k);
		if (!p) {
			if (!same)
				store_free(s, copy, e->csize);
			return -ENOSPC;
		}
		if (present)
			state = MC_CLEAN;
		else
			state = same && !e->copy ? MC_ZERO : MC_COMPRESSED;
		set_copy(s, r, p, copy, same ? 0 : e->csize, same, state);
		p->stamp = e->stamp;
		if (e->recompressed)
			mark_recompressed(s, p);
	}
	return 0;
}

static int import_range(struct mc_session *s, struct old_store *o, struct range *r, const struct pcs_range *old)
{
	uint64_t ndir = (r->npages + PCS_ENTRIES_PER_CHUNK - 1) / PCS_ENTRIES_PER_CHUNK;
	uint32_t *dir = malloc(ndir * sizeof *dir);
	struct pcs_page *entries = malloc(PCS_CHUNK);
	uint64_t *pm = malloc(PCS_ENTRIES_PER_CHUNK * 8);
	int rc = !dir || !entries || !pm ? -ENOMEM : 0;

	if (!rc && !chunk_ok(o, old->dir))
		rc = -EINVAL;
	if (!rc) /* consecutive chunks from old->dir; read_at checks the file holds them */
		rc = read_at(o, dir, ndir * sizeof *dir, PCS_CHUNKS_OFF + (uint64_t)old->dir * PCS_CHUNK);
	for (uint64_t k = 0; !rc && k < ndir; k++) {
		if (!dir[k])
			continue;
		if (!chunk_ok(o, dir[k]))
			rc = -EINVAL;
		else
			rc = import_block(s, o, r, k * PCS_ENTRIES_PER_CHUNK, dir[k], entries, pm);
	}
	free(dir);
	free(entries);
	free(pm);
	return rc;
}

/* Pages the target discarded while it served itself: their old copies are stale. */
static void forget(struct mc_session *s, const struct mc_run *runs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		struct range *r = range_get(s, runs[i].range);
		uint64_t end;
		if (!r || runs[i].first >= r->npages)
			continue;
		end = runs[i].count > r->npages - runs[i].first ? r->npages : runs[i].first + runs[i].count;
		for (uint64_t j = runs[i].first; (j = next_indexed(s, r, j, end)) < end; j++) {
			struct pcs_page *p = page_at(s, r, j);
			if (p->state == MC_CLEAN) {
				set_state(r, p, MC_RESIDENT);
				drop_copy(s, r, p);
			} else if (p->state == MC_COMPRESSED || p->state == MC_ZERO) {
				set_state(r, p, MC_UNTOUCHED);
				drop_copy(s, r, p);
			}
		}
	}
}

int mc_session_import(struct mc_session *s, int old_store_fd, const struct mc_resume_range *ranges,
		      size_t nranges, const struct mc_run *forget_runs, size_t nforget, char *errbuf,
		      size_t errlen)
{
	struct old_store o = {.fd = old_store_fd};
	struct pcs_header h;
	struct stat st;
	int rc;

	if (fstat(old_store_fd, &st) || st.st_size < (off_t)PCS_CHUNKS_OFF) {
		snprintf(errbuf, errlen, "the old store is not a memfs store (%lld bytes)", (long long)st.st_size);
		return -EINVAL;
	}
	o.size = (uint64_t)st.st_size;
	if (read_at(&o, &h, sizeof h, 0) || h.magic != PCS_MAGIC || h.version != PCS_VERSION ||
	    h.page_size != PCS_PAGE || h.chunk_size != PCS_CHUNK || h.chunks_off != PCS_CHUNKS_OFF ||
	    h.ranges_off != PCS_RANGES_OFF) {
		snprintf(errbuf, errlen, "the old store's header is not version %d's", PCS_VERSION);
		return -EINVAL;
	}
	o.nchunks = h.nchunks;
	o.buf = malloc(PCS_CHUNK);
	if (!o.buf)
		return -ENOMEM;
	for (size_t i = 0; i < nranges; i++) {
		const struct mc_resume_range *rr = &ranges[i];
		struct pcs_range old;
		struct range *r;
		if (rr->index >= PCS_MAX_RANGES ||
		    read_at(&o, &old, sizeof old, PCS_RANGES_OFF + (uint64_t)rr->index * sizeof old) ||
		    old.npages != rr->npages) {
			snprintf(errbuf, errlen, "range %u is not in the old store as %llu pages", rr->index,
				 (unsigned long long)rr->npages);
			rc = -EINVAL;
			goto out;
		}
		rc = mc_range_add(s, rr->start, rr->npages << PAGE_SHIFT, rr->flags, (int32_t)rr->index, errbuf,
				  errlen);
		if (rc < 0)
			goto out;
		pthread_mutex_lock(&s->lock);
		r = range_get(s, rr->index);
		rc = r ? import_range(s, &o, r, &old) : -ENOENT;
		pthread_mutex_unlock(&s->lock);
		if (rc) {
			snprintf(errbuf, errlen, "range %u of the old store: %s", rr->index,
				 rc == -EINVAL ? "its index is damaged" : strerror(-rc));
			goto out;
		}
	}
	pthread_mutex_lock(&s->lock);
	forget(s, forget_runs, nforget);
	pthread_mutex_unlock(&s->lock);
	rc = 0;
out:
	free(o.buf);
	return rc;
}
