/*
 * store.c - a session's store: its compressed copies and its page index,
 * in a memfd the target can read after the daemon is gone
 * (predicomp_store.h; docs/design.md, "The store outlives the daemon").
 *
 * The file is sized once, sparse, to what the store could ever hold (RAM
 * and swap, twice), and mapped whole; it costs only the pages written.
 * Past a header area it is cut into 64 KiB chunks.  A chunk holds index
 * entries, a range's directory, or blobs of one size class: blobs are
 * rounded up to a multiple of 32 bytes (128 classes up to one page) and a
 * slot may span the chunk's pages, so the only waste is the rounding and
 * each chunk's tail and the slots of chunks not yet full.  A blob chunk's
 * pages are mapped in one call when it is first used (cheaper than a shmem
 * fault for each), so `bytes_used` counts whole chunks; an empty chunk has
 * its pages punched out of the file at once.  The allocator's
 * bookkeeping is the daemon's alone (a reader needs none of it).
 *
 * The target gets a descriptor opened read-only, and the file's mode
 * (0400, root's) keeps it from opening one that writes: it may read its
 * copies, never change what the daemon relies on.
 *
 * Handle = the blob's offset in the file / 32 (0: none).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#define SLOT_STEP PCS_BLOB_ALIGN
#define NCLASSES (PAGE / SLOT_STEP)
#define CLASS_INDEX 0xfffeu /* a chunk of page entries or a directory */
#define FREE_END 0xffffu

struct chunk_meta {
	uint32_t prev, next; /* the class's list of chunks with free slots */
	uint16_t cls;
	uint16_t nslots;
	uint16_t nfree;
	uint16_t bump;      /* slots never handed out start here */
	uint16_t free_head; /* freed slots: a list threaded through the slots */
	uint16_t in_list;
};

/*
 * What all sessions' stores hold together: bytes_used (memory touched) is
 * kept here, for store_cap_bytes and the peak, changing only when a chunk's
 * touched pages do; the rest is summed over the stores when asked (a
 * per-blob atomic shared by two workers cost 1 % of an eviction's CPU).
 */
static struct {
	_Atomic uint64_t bytes_used, bytes_peak;
	pthread_mutex_t lock; /* the list of stores */
	struct store *first;
} G = {.lock = PTHREAD_MUTEX_INITIALIZER};

static inline uint32_t class_of(uint32_t len)
{
	return (len + SLOT_STEP - 1) / SLOT_STEP - 1;
}

static inline uint32_t class_size(uint32_t cls)
{
	return (cls + 1) * SLOT_STEP;
}

uint32_t store_slot_size(uint32_t len)
{
	return class_size(class_of(len));
}

static uint64_t chunk_off(uint32_t c)
{
	return PCS_CHUNKS_OFF + (uint64_t)c * PCS_CHUNK;
}

static void global_add(_Atomic uint64_t *v, int64_t d)
{
	atomic_fetch_add(v, (uint64_t)d);
}

/* What the file may hold: twice RAM and swap (the store lives there), at least 1 GiB. */
static uint64_t default_reserve(void)
{
	struct sysinfo si;
	uint64_t total = 1ull << 30;
	if (!sysinfo(&si))
		total = ((uint64_t)si.totalram + si.totalswap) * si.mem_unit;
	total *= 2;
	return total < (1ull << 30) ? (1ull << 30) : total;
}

int store_init(struct mc_session *s, uint64_t reserve)
{
	struct store *st = &s->st;
	char name[48];
	uint64_t nchunks;

	if (!reserve)
		reserve = default_reserve();
	nchunks = reserve / PCS_CHUNK + 1;
	if (nchunks > UINT32_MAX)
		nchunks = UINT32_MAX;
	st->size = chunk_off((uint32_t)(nchunks - 1)) + PCS_CHUNK;
	st->nchunks = nchunks;
	st->fd = -1;
	pthread_mutex_init(&st->lock, NULL);
	snprintf(name, sizeof name, "memfs-store-%llu", (unsigned long long)s->id);
	st->fd = memfd_create(name, MFD_CLOEXEC);
	if (st->fd < 0)
		return -errno;
	/* read-only for everyone else: the target's descriptor can never be reopened to write */
	if (fchmod(st->fd, 0400) || ftruncate(st->fd, (off_t)st->size))
		return -errno;
	st->base = mmap(NULL, st->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, st->fd, 0);
	if (st->base == MAP_FAILED) {
		st->base = NULL;
		return -errno;
	}
	st->cm = mmap(NULL, nchunks * sizeof *st->cm, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	st->free_chunks = mmap(NULL, nchunks * sizeof *st->free_chunks, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (st->cm == MAP_FAILED || st->free_chunks == MAP_FAILED) {
		if (st->cm != MAP_FAILED)
			munmap(st->cm, nchunks * sizeof *st->cm);
		if (st->free_chunks != MAP_FAILED)
			munmap(st->free_chunks, nchunks * sizeof *st->free_chunks);
		st->cm = NULL;
		st->free_chunks = NULL;
		return -ENOMEM;
	}
	st->next_chunk = 1; /* chunk 0 means none */
	st->hdr = (struct pcs_header *)st->base;
	*st->hdr = (struct pcs_header){.magic = PCS_MAGIC,
				       .version = PCS_VERSION,
				       .size = st->size,
				       .page_size = PCS_PAGE,
				       .chunk_size = PCS_CHUNK,
				       .journal_off = PCS_JOURNAL_OFF,
				       .slots_off = PCS_SLOTS_OFF,
				       .ranges_off = PCS_RANGES_OFF,
				       .chunks_off = PCS_CHUNKS_OFF,
				       .nchunks = nchunks,
				       .session_id = s->id};
	s->journal = (struct uffd_msg *)(st->base + PCS_JOURNAL_OFF);
	s->slots = (struct pcs_slot *)(st->base + PCS_SLOTS_OFF);
	pthread_mutex_lock(&G.lock);
	st->next = G.first;
	G.first = st;
	pthread_mutex_unlock(&G.lock);
	return 0;
}

void store_destroy(struct mc_session *s)
{
	struct store *st = &s->st;
	if (st->base) {
		pthread_mutex_lock(&G.lock);
		for (struct store **p = &G.first; *p; p = &(*p)->next)
			if (*p == st) {
				*p = st->next;
				break;
			}
		pthread_mutex_unlock(&G.lock);
		global_add(&G.bytes_used, -(int64_t)st->st.bytes_used);
		munmap(st->base, st->size);
		st->base = NULL;
	}
	if (st->cm)
		munmap(st->cm, st->nchunks * sizeof *st->cm);
	if (st->free_chunks)
		munmap(st->free_chunks, st->nchunks * sizeof *st->free_chunks);
	st->cm = NULL;
	st->free_chunks = NULL;
	if (st->fd >= 0)
		close(st->fd); /* the target's descriptor keeps the file, if it still holds one */
	st->fd = -1;
	pthread_mutex_destroy(&st->lock);
}

/* A chunk number, or 0 when the file is full (caller holds st->lock). */
static uint32_t take_chunk(struct store *st)
{
	if (st->nfree_chunks)
		return st->free_chunks[--st->nfree_chunks];
	if (st->next_chunk >= st->nchunks)
		return 0;
	return (uint32_t)st->next_chunk++;
}

/* Its pages go back to the system now (caller holds st->lock). */
static void give_chunk(struct store *st, uint32_t c)
{
	fallocate(st->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)chunk_off(c), PCS_CHUNK);
	st->free_chunks[st->nfree_chunks++] = c;
}

uint32_t store_new_chunk(struct mc_session *s)
{
	struct store *st = &s->st;
	uint32_t c;
	pthread_mutex_lock(&st->lock);
	c = take_chunk(st);
	if (c) {
		st->cm[c] = (struct chunk_meta){.cls = CLASS_INDEX};
		st->index_chunks++;
	}
	pthread_mutex_unlock(&st->lock);
	return c; /* fresh or punched: zeros */
}

uint32_t store_new_chunks(struct mc_session *s, uint32_t n)
{
	struct store *st = &s->st;
	uint32_t c = 0;
	if (n == 1)
		return store_new_chunk(s);
	pthread_mutex_lock(&st->lock);
	if (st->next_chunk + n <= st->nchunks) { /* only never-used ones are sure to be consecutive */
		c = (uint32_t)st->next_chunk;
		st->next_chunk += n;
		for (uint32_t i = 0; i < n; i++)
			st->cm[c + i] = (struct chunk_meta){.cls = CLASS_INDEX};
		st->index_chunks += n;
	}
	pthread_mutex_unlock(&st->lock);
	return c;
}

void store_free_chunk(struct mc_session *s, uint32_t c)
{
	struct store *st = &s->st;
	pthread_mutex_lock(&st->lock);
	st->index_chunks--;
	give_chunk(st, c);
	pthread_mutex_unlock(&st->lock);
}

static void list_remove(struct store *st, uint32_t id)
{
	struct chunk_meta *c = &st->cm[id];
	if (c->prev)
		st->cm[c->prev].next = c->next;
	else
		st->partial[c->cls] = c->next;
	if (c->next)
		st->cm[c->next].prev = c->prev;
	c->prev = c->next = 0;
	c->in_list = 0;
}

static void list_push(struct store *st, uint32_t id)
{
	struct chunk_meta *c = &st->cm[id];
	c->prev = 0;
	c->next = st->partial[c->cls];
	if (c->next)
		st->cm[c->next].prev = id;
	st->partial[c->cls] = id;
	c->in_list = 1;
}

/* What a blob chunk costs: all of it (its pages are mapped at once when it is first used). */
static uint64_t touched_bytes(const struct chunk_meta *c)
{
	return c->bump ? PCS_CHUNK : 0;
}

static uint32_t grow(struct store *st, uint32_t cls)
{
	uint32_t id = take_chunk(st);
	struct chunk_meta *c;
	if (!id)
		return 0;
	c = &st->cm[id];
	*c = (struct chunk_meta){.cls = (uint16_t)cls,
				 .nslots = (uint16_t)(PCS_CHUNK / class_size(cls)),
				 .free_head = FREE_END};
	c->nfree = c->nslots;
	list_push(st, id);
	st->st.chunks++;
	return id;
}

uint64_t store_alloc(struct mc_session *s, uint32_t len, void **ptr)
{
	struct store *st = &s->st;
	uint32_t cls = class_of(len), id, slot;
	struct chunk_meta *c;
	uint64_t before, off, used;
	bool fresh;

	if (atomic_load(&G.bytes_used) >= tun.store_cap_bytes)
		return 0; /* full: the page keeps living in the target */
	pthread_mutex_lock(&st->lock);
	id = st->partial[cls];
	if (!id)
		id = grow(st, cls);
	if (!id) {
		pthread_mutex_unlock(&st->lock);
		return 0;
	}
	c = &st->cm[id];
	fresh = c->bump == 0;
	before = touched_bytes(c);
	if (c->free_head != FREE_END) {
		slot = c->free_head;
		memcpy(&c->free_head, st->base + chunk_off(id) + (size_t)slot * class_size(cls),
		       sizeof c->free_head);
	} else {
		slot = c->bump++;
	}
	if (--c->nfree == 0)
		list_remove(st, id);
	used = touched_bytes(c) - before;
	st->st.blobs++;
	st->st.bytes_compressed += len;
	st->st.bytes_slots += class_size(cls);
	st->st.bytes_used += used;
	if (st->st.bytes_used > st->st.bytes_peak)
		st->st.bytes_peak = st->st.bytes_used;
	pthread_mutex_unlock(&st->lock);
	if (used) {
		uint64_t now = atomic_fetch_add(&G.bytes_used, used) + used, peak = atomic_load(&G.bytes_peak);
		while (now > peak && !atomic_compare_exchange_weak(&G.bytes_peak, &peak, now))
			;
	}
	off = chunk_off(id) + (uint64_t)slot * class_size(cls);
	*ptr = st->base + off;
	if (fresh) /* one call maps the chunk's pages: cheaper than a shmem fault for each */
		madvise(st->base + chunk_off(id), PCS_CHUNK, MADV_POPULATE_WRITE);
	return off / PCS_BLOB_ALIGN;
}

/* Blob lengths are not kept here: the page entry knows its csize. */
void store_free(struct mc_session *s, uint64_t handle, uint32_t len)
{
	struct store *st = &s->st;
	uint64_t off = handle * PCS_BLOB_ALIGN;
	uint32_t id = (uint32_t)((off - PCS_CHUNKS_OFF) / PCS_CHUNK), cls = class_of(len);
	uint16_t slot = (uint16_t)((off - chunk_off(id)) / class_size(cls));
	struct chunk_meta *c;
	int64_t freed = 0;

	pthread_mutex_lock(&st->lock);
	c = &st->cm[id];
	memcpy(st->base + off, &c->free_head, sizeof c->free_head);
	c->free_head = slot;
	c->nfree++;
	st->st.blobs--;
	st->st.bytes_compressed -= len;
	st->st.bytes_slots -= class_size(cls);
	if (c->nfree == c->nslots) {
		if (c->in_list)
			list_remove(st, id);
		freed = (int64_t)touched_bytes(c);
		st->st.bytes_used -= (uint64_t)freed;
		st->st.chunks--;
		give_chunk(st, id);
	} else if (!c->in_list) {
		list_push(st, id);
	}
	pthread_mutex_unlock(&st->lock);
	if (freed)
		global_add(&G.bytes_used, -freed);
}

/* Does `handle` name a blob of `len` bytes inside this store's chunks? */
bool store_handle_ok(const struct mc_session *s, uint64_t handle, uint32_t len)
{
	uint64_t off = handle * PCS_BLOB_ALIGN;
	return handle && len && len <= PAGE && off >= chunk_off(1) && off + len <= s->st.size;
}

void mc_store_get_stats(struct mc_store_stats *out)
{
	*out = (struct mc_store_stats){.bytes_used = atomic_load(&G.bytes_used),
				       .bytes_peak = atomic_load(&G.bytes_peak)};
	pthread_mutex_lock(&G.lock);
	for (struct store *st = G.first; st; st = st->next) {
		pthread_mutex_lock(&st->lock);
		out->sessions++;
		out->blobs += st->st.blobs;
		out->bytes_compressed += st->st.bytes_compressed;
		out->bytes_slots += st->st.bytes_slots;
		out->chunks += st->st.chunks;
		out->index_bytes += st->index_chunks * PCS_CHUNK;
		pthread_mutex_unlock(&st->lock);
	}
	pthread_mutex_unlock(&G.lock);
}
