/*
 * index.c - a session's ranges and their page entries, in the store.
 *
 * Each range has an entry in the store's range table and a directory (one
 * store chunk): directory slot k names the index chunk holding the entries
 * of pages [k * 4096, (k + 1) * 4096), or 0 while none of them ever had a
 * state (they are untouched, stamped with the range's birth).  So a range's
 * metadata grows with the pages the target touches (64 KiB per 16 MiB
 * block touched), never with the address space it registered, and scans
 * skip blocks without a chunk instead of reading them (a read of a hole in
 * the store would allocate it).  Callers hold s->lock unless said.
 */
#include "internal.h"

#include <emmintrin.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct range *range_of(struct mc_session *s, uint64_t addr)
{
	uint32_t lo = 0, hi = s->nlive;
	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		struct range *r = s->by_addr[mid];
		if (addr < r->start)
			hi = mid;
		else if (addr >= r->start + (r->npages << PAGE_SHIFT))
			lo = mid + 1;
		else
			return r;
	}
	return NULL;
}

struct range *range_get(struct mc_session *s, uint32_t index)
{
	struct range *r = index < s->nranges ? s->ranges[index] : NULL;
	return r && r->live ? r : NULL;
}

/*
 * Write a whole entry with one 16-byte store: whatever instant the daemon
 * dies at, a reader sees the old entry or the new one, never a new copy
 * with an old state or size.  What the entry points at (a blob) was
 * written before: the compiler keeps that order (the fence), and the CPU's
 * stores retire in order.
 */
void page_commit(struct pcs_page *p, const struct pcs_page *v)
{
	__m128i x;
	memcpy(&x, v, sizeof x);
	atomic_signal_fence(memory_order_seq_cst);
	_mm_store_si128((__m128i *)(void *)p, x);
	atomic_signal_fence(memory_order_seq_cst);
}

/* A dead range's directory: no entries, and none are made (page_get). */
static uint32_t no_dir[PCS_MAX_RANGE_PAGES / PCS_ENTRIES_PER_CHUNK];

struct pcs_page *page_get(struct mc_session *s, struct range *r, uint64_t idx)
{
	uint64_t k = idx / PCS_ENTRIES_PER_CHUNK;
	if (!r->live)
		return NULL;
	if (!r->dir[k]) {
		uint32_t c = store_new_chunk(s);
		if (!c)
			return NULL; /* no room: the page stays untouched as far as the index knows */
		struct pcs_page *e = chunk_ptr(s, c);
		for (uint32_t i = 0; i < PCS_ENTRIES_PER_CHUNK; i++)
			e[i].stamp = r->born_ms;
		atomic_signal_fence(memory_order_seq_cst); /* the entries before the directory names them */
		r->dir[k] = c;
		s->c.index_bytes += PCS_CHUNK;
	}
	return page_at(s, r, idx);
}

uint64_t next_indexed(const struct mc_session *s, const struct range *r, uint64_t i, uint64_t end)
{
	(void)s;
	while (i < end && !r->dir[i / PCS_ENTRIES_PER_CHUNK])
		i = (i / PCS_ENTRIES_PER_CHUNK + 1) * PCS_ENTRIES_PER_CHUNK;
	return i < end ? i : end;
}

static int cmp_start(const void *a, const void *b)
{
	const struct range *x = *(struct range *const *)a, *y = *(struct range *const *)b;
	return x->start < y->start ? -1 : x->start > y->start;
}

void sort_ranges(struct mc_session *s)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < s->nranges; i++)
		if (s->ranges[i] && s->ranges[i]->live)
			s->by_addr[n++] = s->ranges[i];
	s->nlive = n;
	qsort(s->by_addr, n, sizeof *s->by_addr, cmp_start);
}

/* A new range at table entry `index` (its pages all untouched). */
int range_add(struct mc_session *s, uint64_t addr, uint64_t npages, uint32_t flags, uint32_t index,
	      uint32_t born_ms, struct range **out)
{
	struct pcs_range *tab = (struct pcs_range *)(s->st.base + PCS_RANGES_OFF);
	struct range *r;
	uint32_t dir, ndir = (uint32_t)((npages + PCS_ENTRIES_PER_CHUNK - 1) / PCS_ENTRIES_PER_CHUNK);
	uint32_t dir_chunks = (ndir + PCS_DIR_PER_CHUNK - 1) / PCS_DIR_PER_CHUNK;

	if (index >= MAX_RANGES || (s->ranges[index] && s->ranges[index]->live))
		return -EEXIST;
	if (!npages || npages > PCS_MAX_RANGE_PAGES)
		return -EFBIG;
	if (!s->by_addr) {
		s->by_addr = calloc(MAX_RANGES, sizeof *s->by_addr);
		if (!s->by_addr)
			return -ENOMEM;
	}
	r = s->ranges[index];
	if (!r) {
		r = calloc(1, sizeof *r);
		if (!r)
			return -ENOMEM;
	}
	dir = store_new_chunks(s, dir_chunks);
	if (!dir) {
		if (!s->ranges[index])
			free(r);
		return -ENOSPC;
	}
	*r = (struct range){.start = addr,
			    .npages = npages,
			    .index = index,
			    .flags = flags,
			    .born_ms = born_ms,
			    .live = true,
			    .dir = chunk_ptr(s, dir),
			    .ndir = dir_chunks,
			    .pub = &tab[index]};
	r->nstate[MC_UNTOUCHED] = npages;
	s->c.index_bytes += (uint64_t)dir_chunks * PCS_CHUNK;
	/* the reader finds a range by npages != 0: that goes last */
	r->pub->start = addr;
	r->pub->dir = dir;
	r->pub->flags = flags;
	r->pub->born_ms = born_ms;
	atomic_signal_fence(memory_order_seq_cst);
	r->pub->npages = npages;
	s->ranges[index] = r;
	if (index >= s->nranges) {
		s->nranges = index + 1;
		s->st.hdr->nranges = s->nranges;
	}
	sort_ranges(s);
	*out = r;
	return 0;
}

/* mremap moved the range (UFFD_EVENT_REMAP). */
void range_move(struct mc_session *s, struct range *r, uint64_t to)
{
	r->start = to;
	r->pub->start = to;
	sort_ranges(s);
}

/*
 * The range is gone from the target (unmapped): its entries and copies go,
 * its table entry is free again.  The struct stays, dead, until the session
 * ends (an operation in flight may hold it).
 */
void range_retire(struct mc_session *s, struct range *r)
{
	uint64_t ndir = (r->npages + PCS_ENTRIES_PER_CHUNK - 1) / PCS_ENTRIES_PER_CHUNK;
	r->pub->npages = 0; /* first: a reader no longer looks at it */
	atomic_signal_fence(memory_order_seq_cst);
	for (uint64_t k = 0; k < ndir; k++) {
		uint32_t c = r->dir[k];
		if (!c)
			continue;
		for (uint32_t i = 0; i < PCS_ENTRIES_PER_CHUNK && k * PCS_ENTRIES_PER_CHUNK + i < r->npages; i++) {
			struct pcs_page *p = (struct pcs_page *)chunk_ptr(s, c) + i;
			if (p->flags & MC_PF_SAMPLED)
				sample_forget(s, p);
			drop_copy(s, r, p);
		}
		r->dir[k] = 0;
		store_free_chunk(s, c);
		s->c.index_bytes -= PCS_CHUNK;
	}
	for (uint32_t k = 0; k < r->ndir; k++)
		store_free_chunk(s, r->pub->dir + k);
	s->c.index_bytes -= (uint64_t)r->ndir * PCS_CHUNK;
	r->pub->dir = 0;
	r->dir = no_dir;
	r->live = false;
	memset(r->nstate, 0, sizeof r->nstate);
	sort_ranges(s);
}

/* Runs of pages whose blocks have an index chunk: all a whole-range operation needs to visit. */
int64_t mc_indexed(struct mc_session *s, int32_t range, struct mc_run *out, size_t cap)
{
	int64_t n = 0;
	pthread_mutex_lock(&s->lock);
	for (uint32_t ri = 0; ri < s->nranges; ri++) {
		struct range *r = range_get(s, ri);
		if (!r || (range >= 0 && (uint32_t)range != ri))
			continue;
		for (uint64_t j = 0; (j = next_indexed(s, r, j, r->npages)) < r->npages;) {
			uint64_t end = (j / PCS_ENTRIES_PER_CHUNK + 1) * PCS_ENTRIES_PER_CHUNK;
			if (end > r->npages)
				end = r->npages;
			if (n && out[n - 1].range == ri && out[n - 1].first + out[n - 1].count == j) {
				out[n - 1].count += end - j;
			} else if ((size_t)n < cap) {
				out[n++] = (struct mc_run){.range = ri, .first = j, .count = end - j};
			} else {
				pthread_mutex_unlock(&s->lock);
				return -ENOSPC;
			}
			j = end;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return n;
}
