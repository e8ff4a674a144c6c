/* internal.h - shared by libpredicomp_client's C files; not part of the API. */
#ifndef PREDICOMP_CLIENT_INTERNAL_H
#define PREDICOMP_CLIENT_INTERNAL_H
#define _GNU_SOURCE
#include "predicomp_client.h"
#include "predicomp_proto.h"
#include "predicomp_store.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE 4096u
#define START_TIMEOUT_S 120
#define STOP_TIMEOUT_S 600
#define RESUME_TIMEOUT_S 120

enum client_state { ST_OPEN, ST_RUNNING, ST_STOPPED, ST_ENDED };

/*
 * The link to a daemon.  UP: the daemon serves the faults.  LOST: its
 * socket ended without the session ending, and the keeper serves them from
 * the store (keeper.c).  ENDED: the session is over (STOP answered, ERR, or
 * settled by the keeper).
 */
enum link_state { LINK_UP, LINK_LOST, LINK_ENDED };

struct client_range {
	uintptr_t addr;
	size_t len;
	uint32_t flags;
};

struct alone; /* keeper.c */

struct predicomp_client {
	pthread_mutex_t lock; /* API calls; agent and keeper notifications */
	pthread_cond_t cond;
	pthread_mutex_t send_lock; /* one frame at a time on the socket */
	int sock;
	int uffd; /* our copy while a session runs */
	uint64_t features; /* what UFFDIO_API granted */
	void *staging; /* pages the daemon's access sampler parks here (PCP_STAGING_PAGES) */
	char path[108]; /* the daemon's socket, to find a restarted one */
	enum client_state state;
	uint32_t seq;
	uint32_t nranges;
	struct client_range ranges[PREDICOMP_CLIENT_MAX_RANGES];
	uint64_t session_id;
	int has_agent;
	pthread_t agent, keeper;
	int agent_running, keeper_running;
	int keeper_efd; /* eventfd: wakes the keeper (the link changed, a stop, the end) */
	/* under lock */
	int stop_acked;
	int ended_errno; /* the daemon ended the session (ERR), or it could not be kept */
	uint64_t bytes_evicted;
	enum link_state link;
	int stop_alone; /* predicomp_client_stop() while LOST: the keeper gives every page back */
	int stop_alone_rc;
	char last_error[256];
	/* the store and fence page of the session (-1 before START) */
	int store_fd, fence_fd;
	struct pcs_fence *fence;
	/*
	 * The agent carries out a request only while the keeper has not taken
	 * over: it raises agent_busy, then looks at taken_over; the keeper
	 * raises taken_over, then waits for agent_busy to fall.  One of them
	 * always sees the other (sequentially consistent atomics).
	 */
	atomic_int taken_over, agent_busy;
	uint64_t takeovers, agent_faults, resumes;
	struct alone *alone;
};

/* wire.c */
void set_error(struct predicomp_client *pc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int send_frame(struct predicomp_client *pc, int sock, uint16_t type, const void *payload, size_t len,
	       const int *fds, int nfds);
int recv_frame(int fd, struct pcp_header *h, void *buf, size_t cap, int *fds, int *nfds, int maxfds);
int decode_err(struct predicomp_client *pc, const void *buf, int len);
void set_timeout(int fd, int seconds);
int map_fence(struct predicomp_client *pc, int fd);
void unmap_fence(struct predicomp_client *pc);

/* agent.c */
void *agent_main(void *arg);

/* keeper.c */
void *keeper_main(void *arg);
void keeper_poke(struct predicomp_client *pc);

#endif
