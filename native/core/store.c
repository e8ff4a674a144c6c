/*
 * store.c - the compressed store: a size-class slab allocator for blobs.
 *
 * Blobs are rounded up to a multiple of 32 bytes (128 classes up to one
 * page) and packed into 64 KiB chunks of one class each; a slot may span
 * the chunk's pages, so the only waste is the rounding and each chunk's
 * tail.  A chunk is handed out front to back, so `bytes_used` counts the
 * pages the store has actually touched; an empty chunk is unmapped at
 * once.  Shared by all sessions (each session accounts for its own
 * blobs); one mutex, held only to pick or return a slot.
 *
 * Handle = chunk id << 16 | slot.  Chunk descriptors sit in a two-level
 * table whose blocks are never freed, so store_ptr() needs no lock: a
 * live handle keeps its chunk alive.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define SLOT_STEP 32u
#define NCLASSES (PAGE / SLOT_STEP)
#define CHUNK_BYTES (64u * 1024u)
#define DIR_BITS 12u
#define DIR_SIZE (1u << DIR_BITS)
#define NO_CHUNK 0u

struct chunk {
	uint8_t *base;
	uint32_t prev, next; /* the class's list of chunks with free slots */
	uint16_t cls;
	uint16_t nslots;
	uint16_t nfree;
	uint16_t bump;      /* slots never handed out start here */
	uint16_t free_head; /* freed slots: a list threaded through the slots */
	uint16_t in_list;
};

#define FREE_END 0xffffu

static struct {
	pthread_mutex_t lock;
	struct chunk *dir[DIR_SIZE];
	uint32_t next_id;    /* ids handed out so far; id 0 means none */
	uint32_t *free_ids;  /* recycled ids */
	uint32_t nfree_ids, cap_free_ids;
	uint32_t partial[NCLASSES];
	struct mc_store_stats st;
} S = {.lock = PTHREAD_MUTEX_INITIALIZER};

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

static struct chunk *chunk_of(uint32_t id)
{
	struct chunk *blk = S.dir[id >> DIR_BITS];
	return blk ? &blk[id & (DIR_SIZE - 1)] : NULL;
}

static uint32_t new_chunk_id(void)
{
	uint32_t id;
	if (S.nfree_ids)
		return S.free_ids[--S.nfree_ids];
	if (S.next_id + 1 >= S.cap_free_ids) {
		/* room to recycle every id ever made, so that freeing never allocates */
		uint32_t cap = S.cap_free_ids ? 2 * S.cap_free_ids : 1024;
		uint32_t *n = realloc(S.free_ids, cap * sizeof *n);
		if (!n)
			return NO_CHUNK;
		S.free_ids = n;
		S.cap_free_ids = cap;
	}
	id = ++S.next_id;
	if ((id >> DIR_BITS) >= DIR_SIZE) {
		S.next_id--;
		return NO_CHUNK;
	}
	if (!S.dir[id >> DIR_BITS]) {
		S.dir[id >> DIR_BITS] = calloc(DIR_SIZE, sizeof(struct chunk));
		if (!S.dir[id >> DIR_BITS]) {
			S.next_id--;
			return NO_CHUNK;
		}
	}
	return id;
}

static void list_remove(uint32_t id)
{
	struct chunk *c = chunk_of(id);
	if (c->prev)
		chunk_of(c->prev)->next = c->next;
	else
		S.partial[c->cls] = c->next;
	if (c->next)
		chunk_of(c->next)->prev = c->prev;
	c->prev = c->next = NO_CHUNK;
	c->in_list = 0;
}

static void list_push(uint32_t id)
{
	struct chunk *c = chunk_of(id);
	c->prev = NO_CHUNK;
	c->next = S.partial[c->cls];
	if (c->next)
		chunk_of(c->next)->prev = id;
	S.partial[c->cls] = id;
	c->in_list = 1;
}

/* The pages of the chunk the bump pointer has reached: what the chunk costs. */
static uint64_t touched_bytes(const struct chunk *c)
{
	uint64_t end = (uint64_t)c->bump * class_size(c->cls);
	return (end + PAGE - 1) / PAGE * PAGE;
}

static uint32_t grow(uint32_t cls)
{
	uint32_t id = new_chunk_id();
	struct chunk *c;
	void *mem;

	if (id == NO_CHUNK)
		return NO_CHUNK;
	mem = mmap(NULL, CHUNK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		S.free_ids[S.nfree_ids++] = id;
		return NO_CHUNK;
	}
	c = chunk_of(id);
	*c = (struct chunk){.base = mem,
			    .cls = (uint16_t)cls,
			    .nslots = (uint16_t)(CHUNK_BYTES / class_size(cls)),
			    .free_head = FREE_END};
	c->nfree = c->nslots;
	list_push(id);
	S.st.chunks++;
	return id;
}

uint64_t store_alloc(uint32_t len, void **ptr)
{
	uint32_t cls = class_of(len), id, slot;
	struct chunk *c;
	uint64_t before;

	pthread_mutex_lock(&S.lock);
	if (tun.store_cap_bytes && S.st.bytes_used >= tun.store_cap_bytes) {
		pthread_mutex_unlock(&S.lock);
		return 0; /* full: the page keeps living in the target */
	}
	id = S.partial[cls];
	if (id == NO_CHUNK)
		id = grow(cls);
	if (id == NO_CHUNK) {
		pthread_mutex_unlock(&S.lock);
		return 0;
	}
	c = chunk_of(id);
	before = touched_bytes(c);
	if (c->free_head != FREE_END) {
		slot = c->free_head;
		memcpy(&c->free_head, c->base + (size_t)slot * class_size(cls), sizeof c->free_head);
	} else {
		slot = c->bump++;
	}
	if (--c->nfree == 0)
		list_remove(id);
	S.st.blobs++;
	S.st.bytes_compressed += len;
	S.st.bytes_slots += class_size(cls);
	S.st.bytes_used += touched_bytes(c) - before;
	if (S.st.bytes_used > S.st.bytes_peak)
		S.st.bytes_peak = S.st.bytes_used;
	pthread_mutex_unlock(&S.lock);
	*ptr = c->base + (size_t)slot * class_size(cls);
	return (uint64_t)id << 16 | slot;
}

/* Blob lengths are not kept here: the page entry knows its csize. */
void store_free(uint64_t handle, uint32_t len)
{
	uint32_t id = (uint32_t)(handle >> 16), slot = (uint32_t)(handle & 0xffff);
	struct chunk *c;

	pthread_mutex_lock(&S.lock);
	c = chunk_of(id);
	memcpy(c->base + (size_t)slot * class_size(c->cls), &c->free_head, sizeof c->free_head);
	c->free_head = (uint16_t)slot;
	c->nfree++;
	S.st.blobs--;
	S.st.bytes_compressed -= len;
	S.st.bytes_slots -= class_size(c->cls);
	if (c->nfree == c->nslots) {
		if (c->in_list)
			list_remove(id);
		S.st.bytes_used -= touched_bytes(c);
		munmap(c->base, CHUNK_BYTES);
		c->base = NULL;
		S.st.chunks--;
		S.free_ids[S.nfree_ids++] = id;
	} else if (!c->in_list) {
		list_push(id);
	}
	pthread_mutex_unlock(&S.lock);
}

void *store_ptr(uint64_t handle)
{
	struct chunk *c = chunk_of((uint32_t)(handle >> 16));
	return c->base + (size_t)(handle & 0xffff) * class_size(c->cls);
}

void mc_store_get_stats(struct mc_store_stats *out)
{
	pthread_mutex_lock(&S.lock);
	*out = S.st;
	pthread_mutex_unlock(&S.lock);
}
