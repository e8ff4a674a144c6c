/*
 * predicomp_store.h - the layout of a session's store, shared by the daemon
 * and the target's client library.
 *
 * The daemon keeps each session's compressed copies and its page index in a
 * memfd (the store) and hands the target a read-only descriptor of it with
 * ACK(START).  The target never maps it while the daemon lives.  When the
 * daemon dies, the client maps it read-only and serves its own faults from
 * it; a restarted daemon imports it (RESUME, memfs(7)).  So everything a
 * reader needs to find a page's contents is in the file, and the file is
 * consistent at every instant the daemon could die (docs/design.md, "The
 * store outlives the daemon"):
 *
 *   - a page entry is always rewritten whole, with one 16-byte store, when
 *     its copy changes together with its state;
 *   - a blob is written before the entry that points at it, and freed only
 *     after no entry points at it;
 *   - an entry claims a copy (a state in PCS_HAS_COPY_STATES) only while the
 *     copy equals the page's contents whenever the page is absent from the
 *     target: a write lands only after its page's entry dropped the copy;
 *   - uffd messages are read into the journal; an event the daemon read but
 *     had not yet applied is still there (the daemon clears each message
 *     after applying it), so a reader replays it.  Faults read and never
 *     answered are not replayed: a reader wakes every registered range.
 *
 * Second, a fence page (its own small, sealed memfd, writable by both):
 * one word per agent request, so that a request the daemon has given up on
 * is never carried out later (PCS_FENCE_*).
 *
 * Integers are in host byte order.  All offsets are from the start of the
 * file.  A reader treats a file it did not make as untrusted: every offset
 * and count is checked against the file's size before use.
 */
#ifndef PREDICOMP_STORE_H
#define PREDICOMP_STORE_H

#include <stdint.h>

#define PCS_MAGIC 0x31534350u /* "PCS1" in memory order */
#define PCS_VERSION 1
#define PCS_PAGE 4096u
#define PCS_CHUNK (64u * 1024u)                   /* the unit of allocation in the file */
#define PCS_ENTRIES_PER_CHUNK (PCS_CHUNK / 16u)    /* page entries in an index chunk: 4096 */
#define PCS_DIR_PER_CHUNK (PCS_CHUNK / 4u)         /* directory entries in a chunk: 16384 */
#define PCS_MAX_RANGE_PAGES (1ull << 35)           /* 128 TiB, all of user space */
#define PCS_BLOB_ALIGN 32u                         /* a blob's offset is a multiple of this */
#define PCS_JOURNAL_MSGS 64                        /* struct uffd_msg, 32 bytes each */
#define PCS_MAX_SLOTS 65536
#define PCS_MAX_RANGES 4096

/* Where things are (fixed for version 1; the header repeats them). */
#define PCS_JOURNAL_OFF 4096u
#define PCS_SLOTS_OFF 8192u
#define PCS_RANGES_OFF (2u << 20)
#define PCS_CHUNKS_OFF (4u << 20) /* chunk c (1 .. nchunks - 1) at PCS_CHUNKS_OFF + c * PCS_CHUNK */

/* Page states. */
#define PCS_UNTOUCHED 0  /* never populated: reads as zeros */
#define PCS_RESIDENT 1   /* in the target, no copy */
#define PCS_CLEAN 2      /* in the target, write-protected, copy valid */
#define PCS_COMPRESSED 3 /* only the copy has it */
#define PCS_ZERO 4       /* only the copy has it: all zeros, no blob */
#define PCS_EVICTING 5   /* being dropped by the agent; the copy is valid */
#define PCS_NSTATES 6
/* the states in which the entry's copy is the page's contents whenever it is absent */
#define PCS_HAS_COPY_STATES ((1u << PCS_CLEAN) | (1u << PCS_COMPRESSED) | (1u << PCS_ZERO) | (1u << PCS_EVICTING))

/* Page flags a reader uses (the daemon keeps others of its own in the same byte). */
#define PCS_PF_SAME 0x01    /* the copy is `copy`, a repeated 8-byte word: no blob */
#define PCS_PF_SAMPLED 0x40 /* parked in staging slot `stamp` by the access sampler */

struct pcs_page {
	uint64_t copy;     /* blob offset / PCS_BLOB_ALIGN, or the fill word with PCS_PF_SAME */
	uint32_t stamp;    /* last use (ms clock), or the staging slot while PCS_PF_SAMPLED */
	uint16_t csize : 15; /* blob bytes; PCS_PAGE means stored raw */
	uint16_t recompressed : 1;
	uint8_t state;
	uint8_t flags;
};

struct pcs_range {
	uint64_t start;   /* the range's address now (mremap moves it) */
	uint64_t npages;  /* 0: an unused entry */
	uint32_t dir;     /* first chunk of its directory (consecutive chunks, as many as it needs):
			   * a uint32 index chunk per 4096 pages, 0: none yet */
	uint32_t flags;   /* PCP_RANGE_* */
	uint32_t born_ms; /* the stamp of pages never touched */
	uint32_t reserved[9];
};

/* A staging slot of the access sampler (the page parked there, if any). */
#define PCS_SLOT_FREE 0
#define PCS_SLOT_PENDING 1 /* the agent was asked to move the page here */
#define PCS_SLOT_OUT 2     /* the page is here */
#define PCS_SLOT_USED 3    /* copied back after a use: stale */
#define PCS_SLOT_DIRTY 4   /* copied back unused: stale */
#define PCS_SLOT_LOST 5
struct pcs_slot {
	uint64_t page;
	uint32_t range;
	uint32_t old_stamp;
	uint8_t status;
	uint8_t reported;
	uint8_t reserved[6];
};

struct pcs_header {
	uint32_t magic;
	uint32_t version;
	uint64_t size;          /* bytes of the file */
	uint32_t page_size;     /* PCS_PAGE */
	uint32_t chunk_size;    /* PCS_CHUNK */
	uint64_t journal_off;   /* PCS_JOURNAL_MSGS struct uffd_msg */
	uint64_t slots_off;     /* PCS_MAX_SLOTS struct pcs_slot */
	uint64_t ranges_off;    /* PCS_MAX_RANGES struct pcs_range */
	uint64_t chunks_off;
	uint64_t nchunks;       /* chunk numbers 1 .. nchunks - 1 */
	uint64_t staging_start; /* the staging area's address, 0: none */
	uint32_t staging_pages;
	uint32_t nranges;       /* range entries [0, nranges) may be in use */
	uint64_t session_id;    /* the daemon's id of the session that made the store */
	uint64_t reserved[6];
};

/* The fence page: word[id % PCS_FENCE_WORDS] = id << 2 | state, for each agent request. */
#define PCS_FENCE_MAGIC 0x31464350u /* "PCF1" */
#define PCS_FENCE_WORDS 64
#define PCS_FENCE_PENDING 1   /* sent; the agent has not begun */
#define PCS_FENCE_STARTED 2   /* the agent began it (compare-and-swap from PENDING) */
#define PCS_FENCE_CANCELLED 3 /* the daemon gave up on it (compare-and-swap from PENDING) */
struct pcs_fence {
	uint32_t magic;
	uint32_t nwords;
	uint64_t word[PCS_FENCE_WORDS];
};
#define PCS_FENCE_SIZE 4096u

#endif
