/* internal.h - shared by the pager core's C files; not part of the API. */
#ifndef MEMFS_CORE_INTERNAL_H
#define MEMFS_CORE_INTERNAL_H
#define _GNU_SOURCE
#include "memfs_core.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/ioctl.h>
#include <time.h>

#define PAGE MC_PAGE_SIZE
#define PAGE_SHIFT 12

/*
 * One page's metadata: 16 bytes, in a flat array per range (mmap'ed, so
 * a range never touched costs nothing).  `copy` holds a store handle, or
 * the fill word of a same-filled page (MC_PF_SAME).  csize == PAGE means
 * the copy is stored raw.  `recompressed`: recompress has dealt with this
 * copy (re-encoded it, or there is nothing to gain: it did not shrink, it is
 * raw, same-filled or lz4hc's), so it is left alone until the page gets a
 * new copy; a bit beside csize, because the flags byte is
 * full and a copy's size never needs more than 13 bits.
 */
struct page {
	uint64_t copy;
	uint32_t stamp_ms; /* last evidence of use, mc_now_ms() clock (wraps after 49 days) */
	uint16_t csize : 15;
	uint16_t recompressed : 1;
	uint8_t state;
	uint8_t flags;
};
_Static_assert(sizeof(struct page) == 16, "per-page metadata must stay 16 bytes");

struct range {
	uint64_t start;
	uint64_t npages;
	uint32_t index; /* registration order */
	struct page *pages;
	uint64_t nstate[MC_NSTATES];
	uint64_t bytes_compressed;
};

#define TRACE_CAP 2048u

/* A staging slot: where a sampled page waits, and what to give back to it. */
struct slot {
	uint64_t page;
	uint32_t range;
	uint32_t old_stamp; /* the page's stamp before sampling (the page's field holds the slot) */
	uint8_t status;
	uint8_t reported; /* a USED slot was reported by mc_sample_collect */
};
/*
 * FREE: empty, reusable.  PENDING: the agent was asked to move the page in.
 * OUT: the page is here.  USED: the page was used and copied back (the
 * slot keeps a stale copy).  DIRTY: copied back unused, stale copy.  The
 * agent zaps the whole staging area before the next moves, which turns
 * USED and DIRTY slots FREE.  LOST: never reused (see sample_forget).
 */
enum { SLOT_FREE, SLOT_PENDING, SLOT_OUT, SLOT_USED, SLOT_DIRTY, SLOT_LOST };

struct mc_session {
	int uffd;
	int pid;
	int pagemap_fd;
	int notify_fd; /* eventfd: Python waits on it */
	int stop_fd;   /* eventfd: tells the fault thread to leave */
	atomic_int notify_armed;
	atomic_int dead; /* the target's mm is gone */
	atomic_int stopping;

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

	uint32_t nranges;
	struct range *ranges;   /* registration order */
	struct range **by_addr; /* sorted by start */

	pthread_t fault_thread;
	bool fault_thread_running;

	struct mc_counters c;
	uint64_t hist[MC_HIST_BUCKETS];

	/* sequential fault detection for readahead (fault thread only) */
	/* sampling: staging area in the target, registered like a range */
	uint64_t staging_start;
	uint32_t staging_npages;
	struct slot *slots;
	uint32_t *free_slots;
	uint32_t nfree_slots;

	uint64_t last_fault_addr;
	uint64_t ra_expect; /* first page after the last readahead window */
	uint32_t ra_window;

	struct mc_trace_event trace[TRACE_CAP];
	uint64_t trace_head; /* seq of the next event */
};

/* store.c */
uint64_t store_alloc(uint32_t len, void **ptr);
void store_free(uint64_t handle, uint32_t len);
void *store_ptr(uint64_t handle);
uint32_t store_slot_size(uint32_t len);

/* codec.c */
extern struct mc_tunables tun;
int codec_compress(uint32_t codec, const void *src, void *dst, int cap);
int codec_decompress(const void *src, int srclen, void *dst);
bool page_fill_word(const void *page, uint64_t *word);
void fill_page(void *dst, uint64_t word);
uint64_t now_ns(void);
uint64_t thread_cpu_ns(void); /* the calling thread's CPU time */

/* session.c */
struct range *range_of(struct mc_session *s, uint64_t addr);
void set_state(struct range *r, struct page *p, uint8_t state);
void drop_copy(struct mc_session *s, struct range *r, struct page *p);
void set_copy(struct mc_session *s, struct range *r, struct page *p, uint64_t copy,
	      uint16_t csize, bool same);
void mark_recompressed(struct mc_session *s, struct page *p); /* the page has a copy */
int page_bytes(const struct page *p, void *dst);
void trace_add(struct mc_session *s, uint16_t kind, uint32_t range, uint64_t page,
	       uint64_t count, uint64_t latency_ns, uint32_t tid);
void notify(struct mc_session *s);
void hist_add(struct mc_session *s, uint64_t ns);
int uffd_ioctl(struct mc_session *s, unsigned long req, void *arg);
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

/*
 * A run of zero pages at least this long is mapped to the shared zero page
 * (one UFFDIO_ZEROPAGE, no memory); a shorter one is copied as zeros along
 * with its neighbours.  Data sets that interleave zero pages with others
 * would otherwise cost an ioctl per page, and an ioctl costs more than
 * clearing and copying a page.
 */
#define ZERO_RUN_MIN 8
uint64_t zero_run(const struct range *r, uint64_t first, uint64_t i, uint64_t count);

/* restore.c: used by the fault thread and operations; caller holds s->lock */
int restore_page(struct mc_session *s, struct range *r, uint64_t idx, bool writable,
		 uint8_t *scratch);
uint64_t restore_run(struct mc_session *s, struct range *r, uint64_t first, uint64_t count,
		     bool final, uint8_t *scratch);
void copied_in(struct mc_session *s, struct range *r, struct page *p, bool writable);
void release_held(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
void lose_page(struct mc_session *s, struct range *r, uint64_t idx);

/* sample.c (caller holds s->lock) */
uint32_t page_stamp(const struct mc_session *s, const struct page *p);
int sample_fault(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
void sample_forget(struct mc_session *s, struct page *p);
bool unsample(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch);
uint64_t sampled_page_addr(struct mc_session *s, struct range *r, uint64_t idx);

/* fault.c */
void *fault_main(void *arg);

#endif
