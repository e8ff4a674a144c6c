/*
 * memfs_core.h - the daemon's native pager core.
 *
 * Page tables, the compressed store and the fault service live here, in
 * C, so that a fault is served by a thread that never waits for Python's
 * GIL or the trio event loop.  The Python daemon (memfs/core.py) drives
 * everything through this API via cffi.  The file is read by cffi's cdef
 * as well as by the compiler: plain declarations and integer #defines only.
 */
#ifndef MEMFS_CORE_H
#define MEMFS_CORE_H
#include <stddef.h>
#include <stdint.h>

/* Page states (memfs(5), "pages"). */
#define MC_UNTOUCHED 0  /* never populated: reads as zeros, not in the target */
#define MC_RESIDENT 1   /* in the target, no valid copy in the store (dirty) */
#define MC_CLEAN 2      /* in the target, write-protected, valid copy in the store */
#define MC_COMPRESSED 3 /* evicted: only the store has it */
#define MC_ZERO 4       /* evicted, known all-zero: no blob */
#define MC_EVICTING 5   /* being freed by the agent; writes are held */
#define MC_NSTATES 6
#define MC_SAMPLED 6 /* shown by mc_page_info only: resident or clean, parked by the sampler */

/* Page flags. */
#define MC_PF_SAME 0x01             /* copy is a repeated 8-byte word (no blob) */
#define MC_PF_COMPRESSING 0x02      /* a compression of this page is in flight */
#define MC_PF_HELD 0x04             /* a write fault waits for the eviction to end */
#define MC_PF_PREFETCHED 0x08       /* restored by prefetch, not written since */
#define MC_PF_PREFETCH_PENDING 0x10 /* asked for by a prefetch, not restored yet */
#define MC_PF_INCOMPRESSIBLE 0x20   /* last attempt did not pay; skipped until written */
#define MC_PF_SAMPLED 0x40          /* moved to the staging area by the sampler */
#define MC_PF_PINNED 0x80           /* a prefetch or recompress reads the blob unlocked: a drop leaves it to it */
/* mc_select and mc_age_hist only, beside MC_PF_* in skip_flags: */
#define MC_SKIP_RECOMPRESSED 0x100 /* pages whose copy recompress has dealt with already */

/* Codecs: all produce LZ4 blocks (the format of python-lz4's lz4.block). */
#define MC_CODEC_LZ4 0
#define MC_CODEC_LZ4HC 1
#define MC_CODEC_LZ4FAST 2

/* mc_compress flags */
#define MC_COMPRESS_FOR_EVICT 0x1 /* keep incompressible pages raw so they can be freed */

/* mc_restore flags */
#define MC_RESTORE_FINAL 0x1 /* leave pages writable and drop the copies (session end) */

/* trace event kinds */
#define MC_TR_FAULT 1      /* missing fault served from the store */
#define MC_TR_ZEROFILL 2   /* missing fault served with zeros */
#define MC_TR_WRITE 3      /* write-protect fault: page dirtied */
#define MC_TR_HELD 4       /* write fault held during an eviction */
#define MC_TR_RELEASE 5    /* a held write released after the eviction */
#define MC_TR_EVICT 6      /* pages freed by the agent */
#define MC_TR_PREFETCH 7   /* pages restored ahead of use */
#define MC_TR_COMPRESS 8   /* pages given a compressed copy */
#define MC_TR_REMOVE 9     /* the target dropped pages itself (MADV_DONTNEED) */
#define MC_TR_UNMAP 10     /* the target unmapped pages */
#define MC_TR_REMAP 11     /* the target moved a range (mremap) */
#define MC_TR_FAIL 12      /* a restore failed */
#define MC_TR_READAHEAD 13 /* pages restored after a sequential fault */
#define MC_TR_RECOMPRESS 14 /* copies re-encoded smaller (lz4hc) */

#define MC_AGE_CLASSES 33 /* page ages: 0 ms, then one class per power of two */
#define MC_HIST_BUCKETS 256 /* fault latency: 8 sub-buckets per power of two */
#define MC_PAGE_SIZE 4096

struct mc_run {
	uint32_t range;
	uint32_t reserved;
	uint64_t first;
	uint64_t count;
};

struct mc_addr_run {
	uint64_t addr;
	uint64_t length;
};

struct mc_counters {
	uint64_t faults_missing;
	uint64_t faults_wp;
	uint64_t faults_held;
	uint64_t restore_ok;
	uint64_t restore_fail;
	uint64_t zero_fill;
	uint64_t uffd_ioctl_fail;
	uint64_t uffd_eagain;
	uint64_t fault_latency_ns_total;
	uint64_t fault_latency_ns_max;
	uint64_t compress_attempts;
	uint64_t compress_ok;
	uint64_t compress_incompressible;
	uint64_t compress_same_filled;
	uint64_t compress_raced;
	uint64_t compress_store_full;
	uint64_t evict_requests;
	uint64_t evict_ok;
	uint64_t evict_fail;
	uint64_t prefetch_issued;
	uint64_t prefetch_restored;
	uint64_t prefetch_hits;
	uint64_t prefetch_misses;
	uint64_t prefetch_decode_ns; /* prefetch threads' CPU time decoding copies */
	uint64_t prefetch_copy_ns;   /* ... and copying the pages in (UFFDIO_COPY) */
	uint64_t recompress_attempts; /* copies a recompress decoded and encoded again */
	uint64_t recompress_ok;       /* ... and replaced by a smaller one */
	uint64_t readahead_pages;
	uint64_t faultaround_pages;
	uint64_t fault_thread_moves;   /* times the fault thread followed a faulting thread's CPU */
	uint64_t fault_thread_starved; /* times it gave up SCHED_IDLE: busy threads kept it waiting */
	uint64_t fault_thread_looks;   /* times it read where the faulting thread runs (/proc) */
	uint64_t events_remove;
	uint64_t events_unmap;
	uint64_t events_remap;
	uint64_t anomalies;
	uint64_t promotions;      /* faults that restored an evicted page */
	uint64_t samples;         /* pages the sampler took out */
	uint64_t sampler_faults;  /* faults on sampled pages: accesses seen */
	uint64_t sampler_lost_slots; /* staging slots given up (the target dropped a sampled page) */
	uint64_t store_pages;
	uint64_t store_pages_recompressed; /* ... whose copy recompress has dealt with or would leave alone */
	uint64_t store_bytes_logical;
	uint64_t store_bytes_compressed;
	uint64_t store_bytes_used;
	uint64_t store_bytes_peak;
	uint64_t index_bytes; /* the session's index in the store: 64 KiB per 4096-page block it touched */
};

struct mc_store_stats {
	uint64_t sessions; /* stores alive */
	uint64_t blobs;
	uint64_t bytes_compressed; /* sum of blob lengths */
	uint64_t bytes_slots;      /* sum of slot sizes holding them */
	uint64_t bytes_used;       /* memory the store has touched: what it costs */
	uint64_t bytes_peak;
	uint64_t chunks;
	uint64_t index_bytes;
};

struct mc_tunables {
	uint32_t codec;
	uint32_t min_savings_pct;     /* a page must shrink by this much, else it is incompressible */
	uint32_t spin_us;             /* fault thread polls this long after a fault before sleeping */
	uint32_t faultaround_pages;   /* zero pages mapped around a fault on untouched memory */
	uint32_t readahead_max_pages; /* most pages restored after a sequential fault */
	uint32_t debug_unsafe_evict;  /* TESTS ONLY: let writes through during eviction (loses them) */
	uint32_t debug_prefetch_delay_us; /* TESTS ONLY: a prefetch waits this long between
					   * checking a batch and copying it in */
	uint32_t follow_fault_cpu;    /* fault thread moves to the CPU of the thread that faults */
	uint32_t debug_fail_ioctl;    /* TESTS ONLY: uffd ioctls of these kinds (1 << MC_IOCTL_*) fail, EINVAL */
	uint64_t store_cap_bytes; /* the stores take no new blob beyond this (UINT64_MAX: no limit) */
};

struct mc_range_info {
	uint64_t start;
	uint64_t npages;
	uint32_t flags;
	uint32_t reserved;
	uint64_t nstate[MC_NSTATES];
	uint64_t bytes_compressed;
};

struct mc_page_info {
	uint8_t state;
	uint8_t flags;
	uint16_t csize;
	uint32_t age_ms;
};

struct mc_trace_event {
	uint64_t seq;
	uint64_t ts_ns; /* CLOCK_MONOTONIC */
	uint64_t page;
	uint64_t count;
	uint64_t latency_ns;
	uint32_t range;
	uint32_t tid;
	uint16_t kind;
	uint16_t flags;
	uint32_t reserved;
};

struct mc_op_result {
	uint64_t pages_seen;
	uint64_t pages_done;
	uint64_t pages_skipped;
	uint64_t bytes_in;
	uint64_t bytes_out;
};

struct mc_move {
	uint64_t src; /* a page of a range */
	uint64_t dst; /* a staging slot */
};

struct mc_sample_result {
	uint32_t range;
	uint32_t accessed;
	uint64_t page;
};

struct mc_session;

/* global */
void mc_set_tunables(const struct mc_tunables *t);
void mc_get_tunables(struct mc_tunables *t);
void mc_store_get_stats(struct mc_store_stats *out);
uint64_t mc_now_ms(void);

/* session lifecycle */
struct mc_resume_range {
	uint32_t index; /* the range's number in the old store */
	uint32_t flags;
	uint64_t start; /* where it is now */
	uint64_t npages;
};

/* uffd ioctl failures, one record per kind (mc_ioctl_failures) */
#define MC_IOCTL_COPY 0
#define MC_IOCTL_ZEROPAGE 1
#define MC_IOCTL_WRITEPROTECT 2
#define MC_IOCTL_WAKE 3
#define MC_IOCTL_MOVE 4
#define MC_IOCTL_POISON 5
#define MC_IOCTL_REGISTER 6
#define MC_IOCTL_UNREGISTER 7
#define MC_IOCTL_KINDS 8
struct mc_ioctl_failure {
	uint32_t kind;
	int32_t err;    /* the last failure's errno */
	uint64_t count; /* failures since the last report */
	uint64_t addr;  /* the last failure's address */
};

struct mc_session *mc_session_new(int uffd, int pid, int pidfd, uint64_t id, uint64_t store_reserve,
				  int *err);
int mc_range_add(struct mc_session *s, uint64_t addr, uint64_t length, uint32_t flags, int32_t index,
		 char *errbuf, size_t errlen);
int mc_session_set_staging(struct mc_session *s, uint64_t addr, uint64_t npages);
int mc_session_import(struct mc_session *s, int old_store_fd, const struct mc_resume_range *ranges,
		      size_t nranges, const struct mc_run *forget, size_t nforget, char *errbuf,
		      size_t errlen);
int mc_session_start(struct mc_session *s);
void mc_session_stop(struct mc_session *s);
int mc_session_unregister(struct mc_session *s);
void mc_session_free(struct mc_session *s);
int mc_session_store_fds(struct mc_session *s, int *store_ro_fd, int *fence_fd);
int mc_session_notify_fd(struct mc_session *s);
void mc_session_arm_notify(struct mc_session *s);
int mc_session_dead(struct mc_session *s);
void mc_session_counters(struct mc_session *s, struct mc_counters *out);
void mc_session_hist(struct mc_session *s, uint64_t *out);
uint32_t mc_session_nranges(struct mc_session *s);
int mc_range_get(struct mc_session *s, uint32_t range, struct mc_range_info *out);
int mc_addr_to_page(struct mc_session *s, uint64_t addr, uint32_t *range, uint64_t *page);
size_t mc_ioctl_failures(struct mc_session *s, struct mc_ioctl_failure *out, size_t cap);

/* fences: an agent request the daemon gave up on is never carried out (predicomp_store.h) */
void mc_fence_arm(struct mc_session *s, uint64_t request_id);
int mc_fence_cancel(struct mc_session *s, uint64_t request_id); /* 1: cancelled, 0: the agent began it */
void mc_fence_clear(struct mc_session *s, uint64_t request_id);
int mc_fence_busy(struct mc_session *s, uint64_t request_id);   /* its word holds another request */

/* operations: each takes page runs and reports what it did */
int mc_compress(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t flags,
		struct mc_op_result *res);
int64_t mc_evict_prepare(struct mc_session *s, const struct mc_run *runs, size_t nruns,
			 struct mc_addr_run *out, size_t cap, struct mc_op_result *res);
int mc_evict_complete(struct mc_session *s, const struct mc_addr_run *runs, size_t nruns,
		      int status, struct mc_op_result *res);
int mc_restore(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t flags,
	       struct mc_op_result *res);
int mc_mark_prefetch(struct mc_session *s, const struct mc_run *runs, size_t nruns);
int mc_recompress(struct mc_session *s, const struct mc_run *runs, size_t nruns, struct mc_op_result *res);

/* access sampling: the agent moves pages to the staging area; a fault on one means "used" */
int64_t mc_sample_prepare(struct mc_session *s, const struct mc_run *pages, size_t n,
			  struct mc_move *moves, size_t cap, int *zap);
int mc_sample_commit(struct mc_session *s, const struct mc_move *moves, size_t n,
		     const uint8_t *moved);
int64_t mc_sample_collect(struct mc_session *s, struct mc_sample_result *out, size_t cap, int final);
int mc_note_access(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t when_ms);

/* inspection */
int64_t mc_indexed(struct mc_session *s, int32_t range, struct mc_run *out, size_t cap);
int64_t mc_count(struct mc_session *s, const struct mc_run *runs, size_t nruns, uint32_t state_mask);
int64_t mc_select(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		  uint32_t skip_flags, uint64_t max_pages, int order, struct mc_run *out, size_t cap,
		  uint64_t *npages);
int mc_age_hist(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		uint32_t skip_flags, uint64_t *out);
int mc_page_info(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count,
		 struct mc_page_info *out);
int mc_read_data(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count, void *buf);
size_t mc_trace_read(struct mc_session *s, uint64_t *cursor, struct mc_trace_event *out,
		     size_t cap, uint64_t *missed);

#endif
