/*
 * predicomp_proto.h - memfs wire protocol, version 2.
 *
 * This header is the specification of the protocol spoken between a target
 * (libpredicomp_client) and the memfs daemon over a Unix stream socket.
 * The daemon's Python implementation (memfs/protocol.py) mirrors it; the
 * test suite checks that both agree.  Described for humans in memfs(7).
 *
 * Every message is one frame: a 16-byte header followed by `length` bytes
 * of payload.  Integers are in host byte order (the socket never leaves
 * the machine).  A frame whose magic, version, type, length or payload is
 * wrong is answered with ERR and ends the session.
 */
#ifndef PREDICOMP_PROTO_H
#define PREDICOMP_PROTO_H

#include <stdint.h>

#define PCP_MAGIC 0x50434d50u /* "PMCP" in memory order */
#define PCP_VERSION 2
#define PCP_HEADER_SIZE 16
#define PCP_MAX_PAYLOAD 65536
#define PCP_MAX_RANGES 1024
#define PCP_MAX_ERR_TEXT 1024
#define PCP_DEFAULT_SOCKET "/run/memfs/memfs.sock"

/* message types: target -> daemon */
#define PCP_HELLO 1
#define PCP_RANGE 2
#define PCP_START 3
#define PCP_STOP 4
#define PCP_PREFETCH 5
#define PCP_EVICT_DONE 6
#define PCP_SAMPLE_DONE 7
#define PCP_RESUME 8  /* a session whose daemon died, back to a new daemon */
#define PCP_FORGET 9  /* before RESUME: pages the target discarded while it served itself */
#define PCP_ADOPT 10  /* after ACK(RESUME): the daemon serves the faults from now on */
/* message types: daemon -> target */
#define PCP_ACK 64
#define PCP_ERR 65
#define PCP_EVICT 66
#define PCP_SAMPLE 67

/* HELLO capabilities */
#define PCP_CAP_AGENT 0x1    /* an agent thread executes EVICT requests */
#define PCP_CAP_PREFETCH 0x2 /* the target may send PREFETCH hints */
#define PCP_CAP_STAGING 0x4  /* the last RANGE is a staging area; the agent executes SAMPLE */

/* RANGE flags (same values as PREDICOMP_CLIENT_RANGE_F_*) */
#define PCP_RANGE_ANON_PRIVATE 0x1
#define PCP_RANGE_WRITABLE 0x2
#define PCP_RANGE_STAGING 0x4 /* not the target's data: where sampled pages are parked */
#define PCP_STAGING_PAGES 1024

struct pcp_header {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t length; /* payload bytes after the header */
	uint32_t seq;    /* sender's message number, from 1 */
};

struct pcp_hello {
	uint32_t pid;       /* the connecting process itself (SO_PEERPIDFD), else EPERM */
	uint32_t nranges;   /* RANGE messages that follow: 1..PCP_MAX_RANGES, and the staging area */
	uint64_t caps;      /* PCP_CAP_* */
	uint32_t page_size; /* must be 4096 */
	uint32_t reserved;  /* 0 */
};

struct pcp_range {
	uint64_t addr;   /* page aligned */
	uint64_t length; /* page aligned, > 0 */
	uint32_t flags;  /* PCP_RANGE_* */
	uint32_t index;  /* 0, 1, 2 ... in order */
};

struct pcp_start {
	uint64_t uffd_features; /* what UFFDIO_API granted; the fd rides along as SCM_RIGHTS */
};

struct pcp_prefetch {
	uint64_t addr;
	uint64_t length;
};

/*
 * ACK(START) and ACK(RESUME) carry two descriptors (SCM_RIGHTS): the session's
 * store, read-only, and its fence page (predicomp_store.h).  The target keeps
 * both for the session's life and maps neither while the daemon lives.
 */
struct pcp_ack {
	uint32_t acked_type;
	uint32_t acked_seq;
	uint64_t value; /* START, RESUME: session id */
};

/* RESUME: after HELLO and the RANGEs (each at its index in the old store) and any FORGETs;
 * the userfaultfd and the old store ride along (SCM_RIGHTS, in that order). */
struct pcp_resume {
	uint64_t uffd_features;
	uint64_t old_session; /* the session id the old daemon gave */
	uint64_t takeovers;   /* times the target served its own faults, this one included */
	uint64_t agent_faults; /* faults it served itself */
	uint64_t resumes;     /* times it was taken back before */
	uint32_t nforget;     /* runs sent in FORGET messages */
	uint32_t reserved;
};

struct pcp_forget_run {
	uint32_t range;
	uint32_t reserved;
	uint64_t first;
	uint64_t count;
};
struct pcp_forget {
	uint32_t nruns; /* struct pcp_forget_run follow */
	uint32_t reserved;
};
#define PCP_FORGET_MAX_RUNS ((PCP_MAX_PAYLOAD - sizeof(struct pcp_forget)) / sizeof(struct pcp_forget_run))
#define PCP_MAX_FORGET_RUNS 1048576 /* in all, per RESUME */

struct pcp_err {
	int32_t err;        /* a positive errno value */
	uint32_t acked_seq; /* the offending message, 0 if none */
	uint32_t text_len;  /* bytes of UTF-8 text that follow, <= PCP_MAX_ERR_TEXT */
	uint32_t reserved;
};

struct pcp_addr_run {
	uint64_t addr;
	uint64_t length;
};

/* request_id names the request's word in the fence page too (predicomp_store.h):
 * the agent begins it only by moving that word from PENDING to STARTED. */
struct pcp_evict {
	uint64_t request_id;
	uint32_t nruns; /* struct pcp_addr_run follow */
	uint32_t flags; /* 0 */
};
#define PCP_EVICT_MAX_RUNS ((PCP_MAX_PAYLOAD - sizeof(struct pcp_evict)) / sizeof(struct pcp_addr_run))

/* SAMPLE: the agent moves pages into staging slots (UFFDIO_MOVE works within one mm only) */
struct pcp_sample {
	uint64_t request_id;
	uint32_t nmoves; /* struct pcp_move follow */
	uint32_t flags;  /* PCP_SAMPLE_ZAP_STAGING */
};
#define PCP_SAMPLE_ZAP_STAGING 0x1 /* MADV_DONTNEED the whole staging area first */
struct pcp_move {
	uint64_t src; /* a page of a registered range */
	uint64_t dst; /* a staging slot */
};
#define PCP_SAMPLE_MAX_MOVES ((PCP_MAX_PAYLOAD - sizeof(struct pcp_sample)) / sizeof(struct pcp_move))

struct pcp_sample_done {
	uint64_t request_id;
	uint32_t nmoves; /* as asked; a bitmap of (nmoves + 7) / 8 bytes follows: bit i set = moved */
	uint32_t nmoved;
};

struct pcp_evict_done {
	uint64_t request_id;
	int32_t status; /* 0, or a negative errno from madvise */
	uint32_t reserved;
	uint64_t bytes_done;
};

#endif
