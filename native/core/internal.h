/* internal.h - shared by the pager core's C files; not part of the API. */
#ifndef MEMFS_CORE_INTERNAL_H
#define MEMFS_CORE_INTERNAL_H
#define _GNU_SOURCE
#include "memfs_core.h"
#include "predicomp_store.h"

#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/ioctl.h>
#include <time.h>

#define PAGE MC_PAGE_SIZE
#define PAGE_SHIFT 12

/*
 * One page's metadata: 16 bytes, an entry of the session's index, which
 * lives in the store file (predicomp_store.h: struct pcs_page).  `copy`
 * holds a blob handle (its offset in the store / 32), or the fill word of a
 * same-filled page (MC_PF_SAME).  csize == PAGE means the copy is stored
 * raw.  `recompressed`: recompress has dealt with this copy (re-encoded it,
 * or there is nothing to gain: it did not shrink, it is raw, same-filled or
 * lz4hc's), so it is left alone until the page gets a new copy.  An entry
 * whose copy changes together with its state is written whole
 * (page_commit), so that a reader after a crash never sees half of it.
 */
_Static_assert(sizeof(struct pcs_page) == 16, "per-page metadata must stay 16 bytes");
_Static_assert(MC_UNTOUCHED == PCS_UNTOUCHED && MC_RESIDENT == PCS_RESIDENT && MC_CLEAN == PCS_CLEAN &&
		       MC_COMPRESSED == PCS_COMPRESSED && MC_ZERO == PCS_ZERO &&
		       MC_EVICTING == PCS_EVICTING && MC_NSTATES == PCS_NSTATES,
	       "the store's states are the core's");
_Static_assert(MC_PF_SAME == PCS_PF_SAME && MC_PF_SAMPLED == PCS_PF_SAMPLED, "the store's flags are the core's");

/*
 * A registered range.  Its page entries sit in index chunks of the store,
 * named by its directory (a store chunk too): an index chunk exists only
 * for 4096-page blocks that ever held a page with a state, so the cost is
 * the pages the target touched, not the address space it registered.  A
 * range that goes (the target unmapped it) stays allocated, dead, until the
 * session ends: operations in flight may still hold it.
 */
struct range {
	uint64_t start;
	uint64_t npages;
	uint32_t index; /* its entry in the store's range table: ranges/<index> */
	uint32_t flags;
	uint32_t born_ms; /* stamp of pages never touched */
	bool live;
	uint32_t *dir;         /* in the store (ndir consecutive chunks from pub->dir) */
	uint32_t ndir;
	struct pcs_range *pub; /* its entry in the store's range table */
	uint64_t nstate[MC_NSTATES];
	uint64_t bytes_compressed;
};

#define TRACE_CAP 2048u
#define MAX_RANGES PCS_MAX_RANGES

/* Staging slots: predicomp_store.h, struct pcs_slot (they live in the store). */
enum { SLOT_FREE = PCS_SLOT_FREE, SLOT_PENDING = PCS_SLOT_PENDING, SLOT_OUT = PCS_SLOT_OUT,
       SLOT_USED = PCS_SLOT_USED, SLOT_DIRTY = PCS_SLOT_DIRTY, SLOT_LOST = PCS_SLOT_LOST };

struct chunk_meta; /* store.c */

/* The session's store: a memfd the daemon maps read-write (store.c). */
struct store {
	int fd;       /* read-write, the daemon's */
	uint8_t *base;
	uint64_t size;
	struct pcs_header *hdr;
	uint64_t nchunks;
	pthread_mutex_t lock; /* the allocator's; held only to pick or return a slot or chunk */
	struct chunk_meta *cm;
	uint32_t *free_chunks;
	uint64_t nfree_chunks, next_chunk;
	uint32_t partial[PAGE / 32];
	struct mc_store_stats st;
	uint64_t index_chunks;
	struct store *next; /* all stores (store.c) */
};

struct mc_session {
	int uffd;
	int pid;
	int pidfd;     /* the target itself: reads of its memory count only while it lives */
	int pagemap_fd;
	int notify_fd; /* eventfd: Python waits on it */
	int stop_fd;   /* eventfd: tells the fault thread to leave */
	int fence_fd;  /* the fence page's memfd */
	struct pcs_fence *fence;
	atomic_int notify_armed;
	atomic_int dead; /* the target's mm is gone */
	atomic_int stopping;
	uint64_t id;

	/*
	 * `lock` orders every change of page state together with the uffd
	 * ioctl that makes the kernel agree (write-protect, copy, unprotect).
	 * The fault thread and the operations both take it, never for long.
	 */
	pthread_mutex_t lock;
	/*
	 * `gate` keeps pages from turning EVICTING while mc_read_data reads
	 * resident pages without `lock` (a read of a page the agent has just
	 * dropped would fault the target).  Order: gate, then lock.
	 */
	pthread_rwlock_t gate;
	/*
	 * `events_gate` lets prefetch copy pages in without `lock`, two threads
	 * at once.  The danger is a REMOVE/UNMAP/REMAP read meanwhile: reading
	 * it lets the target's madvise() go on and zap the range, and a copy
	 * landing after the zap would bring back data the target threw away.
	 * The fault thread holds the gate exclusively while it reads and
	 * handles messages; a prefetch holds it shared from checking its pages
	 * (under `lock`) until their new state is recorded, so no message is
	 * read in between.  An event still unread makes the kernel refuse the
	 * copy (EAGAIN: the mm is changing), and the pages stay evicted.
	 * Writers are preferred: faults do not wait behind a stream of copies.
	 * Order: events_gate, then lock.
	 */
	pthread_rwlock_t events_gate;

	struct store st;
	struct uffd_msg *journal; /* in the store: messages are read here (fault.c) */

	struct range *ranges[MAX_RANGES]; /* by index; NULL: never used */
	uint32_t nranges;                 /* indexes [0, nranges) may be in use */
	struct range **by_addr;           /* live ranges, sorted by start */
	uint32_t nlive;

	pthread_t fault_thread;
	bool fault_thread_running;

	struct mc_counters c;
	uint64_t hist[MC_HIST_BUCKETS];

	/* sampling: staging area in the target, registered like a range */
	uint64_t staging_start;
	uint32_t staging_npages;
	struct pcs_slot *slots; /* in the store */
	uint32_t *free_slots;
	uint32_t nfree_slots;

	/* sequential fault detection for readahead (fault thread only) */
	uint64_t last_fault_addr;
	uint64_t ra_expect; /* first page after the last readahead window */
	uint32_t ra_window;

	/* the first failure of each uffd ioctl since it was last reported (mc_ioctl_failures) */
	struct mc_ioctl_failure ioctl_fail[MC_IOCTL_KINDS];

	struct mc_trace_event trace[TRACE_CAP];
	uint64_t trace_head; /* seq of the next event */
};

/* store.c */
int store_init(struct mc_session *s, uint64_t reserve);
void store_destroy(struct mc_session *s);
uint64_t store_alloc(struct mc_session *s, uint32_t len, void **ptr);
void store_free(struct mc_session *s, uint64_t handle, uint32_t len);
uint32_t store_slot_size(uint32_t len);
uint32_t store_new_chunk(struct mc_session *s); /* a zeroed chunk (index, directory); 0: none left */
uint32_t store_new_chunks(struct mc_session *s, uint32_t n); /* n consecutive ones: the first */
void store_free_chunk(struct mc_session *s, uint32_t c);
static inline void *store_ptr(const struct mc_session *s, uint64_t handle)
{
	return s->st.base + handle * PCS_BLOB_ALIGN;
}
static inline void *chunk_ptr(const struct mc_session *s, uint32_t c)
{
	return s->st.base + PCS_CHUNKS_OFF + (uint64_t)c * PCS_CHUNK;
}
bool store_handle_ok(const struct mc_session *s, uint64_t handle, uint32_t len);

/* codec.c */
extern struct mc_tunables tun;
int codec_compress(uint32_t codec, const void *src, void *dst, int cap);
int codec_decompress(const void *src, int srclen, void *dst);
bool page_fill_word(const void *page, uint64_t *word);
void fill_page(void *dst, uint64_t word);
uint64_t now_ns(void);
uint64_t thread_cpu_ns(void); /* the calling thread's CPU time */

/* index.c: ranges and their page entries (caller holds s->lock unless said) */
struct range *range_of(struct mc_session *s, uint64_t addr);
struct range *range_get(struct mc_session *s, uint32_t index); /* a live range, or NULL */
static inline struct pcs_page *page_at(const struct mc_session *s, const struct range *r, uint64_t idx)
{
	uint32_t c = r->dir[idx / PCS_ENTRIES_PER_CHUNK];
	return c ? (struct pcs_page *)chunk_ptr(s, c) + idx % PCS_ENTRIES_PER_CHUNK : NULL;
}
struct pcs_page *page_get(struct mc_session *s, struct range *r, uint64_t idx); /* makes its chunk; NULL: no room */
/* The first page of [first, first + count) at or after `i` whose index chunk exists. */
uint64_t next_indexed(const struct mc_session *s, const struct range *r, uint64_t i, uint64_t end);
void page_commit(struct pcs_page *p, const struct pcs_page *v); /* the whole entry, one store */
int range_add(struct mc_session *s, uint64_t addr, uint64_t npages, uint32_t flags, uint32_t index,
	      uint32_t born_ms, struct range **out);
void range_move(struct mc_session *s, struct range *r, uint64_t to);
void range_retire(struct mc_session *s, struct range *r);
void sort_ranges(struct mc_session *s);

/* session.c */
void set_state(struct range *r, struct pcs_page *p, uint8_t state);
void drop_copy(struct mc_session *s, struct range *r, struct pcs_page *p);
void set_copy(struct mc_session *s, struct range *r, struct pcs_page *p, uint64_t copy,
	      uint16_t csize, bool same, uint8_t state);
void mark_recompressed(struct mc_session *s, struct pcs_page *p); /* the page has a copy */
int page_bytes(const struct mc_session *s, const struct pcs_page *p, void *dst);
uint32_t page_stamp(const struct mc_session *s, const struct range *r, const struct pcs_page *p);
void trace_add(struct mc_session *s, uint16_t kind, uint32_t range, uint64_t page,
	       uint64_t count, uint64_t latency_ns, uint32_t tid);
void notify(struct mc_session *s);
void hist_add(struct mc_session *s, uint64_t ns);
int uffd_ioctl(struct mc_session *s, unsigned long req, void *arg);
bool target_alive(struct mc_session *s);
/*
 * Where uffd_ioctl() notes when this thread issued its first ioctl (the
 * answer) while it serves a fault; NULL otherwise.  A fault's latency ends
 * there: the ioctl that wakes a faulting thread on our CPU returns only
 * after that thread has run on until its next fault, so a time taken after
 * it would count the target's own work as ours.
 */
extern __thread uint64_t *answer_issued_ns;
int wp_range(struct mc_session *s, uint64_t addr, uint64_t len, bool protect);
int copy_pages(struct mc_session *s, uint64_t dst, const void *src, uint64_t len, bool wp,
	       int64_t *done);
int zero_pages(struct mc_session *s, uint64_t dst, uint64_t len, int64_t *done);
int pagemap_present(struct mc_session *s, uint64_t addr, uint64_t npages, uint8_t *present);
/* Runs of pages present (in memory or swap) in [addr, addr + len): pagemap.c */
struct pm_run {
	uint64_t start, end;
	bool written; /* not write-protected (uffd-wp) */
};
int pagemap_scan(int pagemap_fd, uint64_t addr, uint64_t len,
		 int (*fn)(void *ctx, const struct pm_run *run), void *ctx);

/*
 * A run of zero pages at least this long is mapped to the shared zero page
 * (one UFFDIO_ZEROPAGE, no memory); a shorter one is copied as zeros along
 * with its neighbours.  Data sets that interleave zero pages with others
 * would otherwise cost an ioctl per page, and an ioctl costs more than
 * clearing and copying a page.
 */
#define ZERO_RUN_MIN 8
uint64_t zero_run(const struct mc_session *s, const struct range *r, uint64_t first, uint64_t i,
		  uint64_t count);
static inline uint8_t page_state(const struct pcs_page *p)
{
	return p ? p->state : MC_UNTOUCHED;
}

/* restore.c: used by the fault thread and operations; caller holds s->lock */
int restore_page(struct mc_session *s, struct range *r, uint64_t idx, bool writable,
		 uint8_t *scratch);
uint64_t restore_run(struct mc_session *s, struct range *r, uint64_t first, uint64_t count,
		     bool final, uint8_t *scratch);
void copied_in(struct mc_session *s, struct range *r, struct pcs_page *p, bool writable);
void release_held(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
void lose_page(struct mc_session *s, struct range *r, uint64_t idx);

/* sample.c (caller holds s->lock) */
int sample_fault(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
void sample_forget(struct mc_session *s, struct pcs_page *p);
bool unsample(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
uint64_t sampled_page_addr(struct mc_session *s, struct range *r, uint64_t idx);

/* fault.c, placement.c */
void *fault_main(void *arg);
struct fault_ctx;
struct fault_ctx *placement_new(struct mc_session *s);
void placement_free(struct fault_ctx *fc);
void placement_faulted(struct fault_ctx *fc, uint32_t tid);
void placement_after_drain(struct fault_ctx *fc, bool faulted);
void placement_before_sleep(struct fault_ctx *fc);
void placement_unmapped(struct fault_ctx *fc);

#endif
