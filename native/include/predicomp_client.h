/*
 * predicomp_client.h - let the memfs daemon page a process's memory.
 *
 * A target registers page-aligned private anonymous ranges, then starts a
 * session: the library creates a userfaultfd, hands it to the daemon and
 * runs an agent thread that frees pages when the daemon has compressed
 * them, and a keeper thread that serves the faults itself if the daemon
 * dies.  Link with -lpredicomp_client -llz4 -pthread.  See predicomp_client(3).
 *
 * Every function returns 0 or a negative errno value.
 */
#ifndef PREDICOMP_CLIENT_H
#define PREDICOMP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE 0x1u
#define PREDICOMP_CLIENT_RANGE_F_WRITABLE 0x2u

#define PREDICOMP_CLIENT_MAX_RANGES 1024

struct predicomp_client;

struct predicomp_range_handle {
	uint32_t index; /* registration order: ranges/<index> in the filesystem */
	void *addr;
	size_t len;
};

int predicomp_client_open(struct predicomp_client **out, const char *socket_path);
int predicomp_client_register_range(struct predicomp_client *pc, void *addr, size_t len,
				    uint32_t flags, struct predicomp_range_handle *out);
int predicomp_client_start(struct predicomp_client *pc);
int predicomp_client_prefetch(struct predicomp_client *pc, void *addr, size_t len);
int predicomp_client_stop(struct predicomp_client *pc);
int predicomp_client_close(struct predicomp_client *pc);

/* Introspection. */
int predicomp_client_session_id(struct predicomp_client *pc, uint64_t *id);
int predicomp_client_has_agent(struct predicomp_client *pc);
const char *predicomp_client_last_error(struct predicomp_client *pc);

/* What the library did while no daemon served this process (protocol v2). */
struct predicomp_client_stats {
	uint64_t takeovers;    /* times the daemon was lost and this process served its own faults */
	uint64_t agent_faults; /* faults it served itself meanwhile */
	uint64_t resumes;      /* times a restarted daemon took the session back */
	uint32_t alone;        /* 1 while no daemon serves it */
	uint32_t reserved;
};
int predicomp_client_stats(struct predicomp_client *pc, struct predicomp_client_stats *out);

#ifdef __cplusplus
}
#endif

#endif
