/*
 * agent.c - the agent thread: the target's hands for what only the target
 * itself may do to its memory.
 *
 * It is the only reader of the socket while a session runs: it executes
 * EVICT requests (MADV_DONTNEED on pages the daemon holds a copy of: a
 * process may not be made to drop its private pages from outside), SAMPLE
 * requests (UFFDIO_MOVE, allowed only within one's own address space), and
 * delivers the daemon's answer to STOP to the thread waiting in
 * predicomp_client_stop().
 *
 * Each request is begun only by moving its word of the fence page from
 * PENDING to STARTED (predicomp_store.h): a request the daemon gave up on
 * is never carried out, however late the agent reads it.  And none is begun
 * once the keeper has taken over (keeper.c).
 *
 * When the socket ends without the session ending, the agent tells the
 * keeper and waits: for a restarted daemon's connection (the keeper hands
 * it over), or for the end.
 */
#include "internal.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
	uint64_t dst;
	uint64_t src;
	uint64_t len;
	uint64_t mode;
	int64_t move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

/*
 * May this request begin?  Only if the keeper has not taken over (the
 * daemon is gone: nobody would answer for the pages) and the daemon still
 * wants it.  On true, agent_busy stays raised until agent_done().
 */
static bool agent_begin(struct predicomp_client *pc, uint64_t rid)
{
	_Atomic uint64_t *w = (_Atomic uint64_t *)&pc->fence->word[rid % PCS_FENCE_WORDS];
	uint64_t want = rid << 2 | PCS_FENCE_PENDING;
	atomic_store(&pc->agent_busy, 1);
	if (atomic_load(&pc->taken_over) ||
	    !atomic_compare_exchange_strong(w, &want, rid << 2 | PCS_FENCE_STARTED)) {
		atomic_store(&pc->agent_busy, 0);
		return false;
	}
	return true;
}

static void agent_done(struct predicomp_client *pc)
{
	atomic_store(&pc->agent_busy, 0);
	keeper_poke(pc); /* a keeper waiting for us to finish may go on */
}

static int do_evict(struct predicomp_client *pc, const void *buf, int len)
{
	struct pcp_evict ev;
	struct pcp_evict_done done = {0};
	const char *p = (const char *)buf + sizeof ev;

	if (len < (int)sizeof ev)
		return -EPROTO;
	memcpy(&ev, buf, sizeof ev);
	if ((size_t)len != sizeof ev + (size_t)ev.nruns * sizeof(struct pcp_addr_run))
		return -EPROTO;
	done.request_id = ev.request_id;
	if (!agent_begin(pc, ev.request_id)) {
		done.status = -ECANCELED;
		return send_frame(pc, pc->sock, PCP_EVICT_DONE, &done, sizeof done, NULL, 0);
	}
	for (uint32_t i = 0; i < ev.nruns; i++) {
		struct pcp_addr_run run;
		memcpy(&run, p + i * sizeof run, sizeof run);
		if (madvise((void *)(uintptr_t)run.addr, run.length, MADV_DONTNEED)) {
			done.status = -errno;
			break;
		}
		done.bytes_done += run.length;
	}
	agent_done(pc);
	pthread_mutex_lock(&pc->lock);
	pc->bytes_evicted += done.bytes_done;
	pthread_mutex_unlock(&pc->lock);
	return send_frame(pc, pc->sock, PCP_EVICT_DONE, &done, sizeof done, NULL, 0);
}

/*
 * The daemon's access sampler parks pages in the staging area.  The moves
 * are ours to make: the kernel allows UFFDIO_MOVE only within the caller's
 * own address space.
 */
static int do_sample(struct predicomp_client *pc, const void *buf, int len)
{
	struct pcp_sample sm;
	struct pcp_sample_done done = {0};
	uint8_t bitmap[(PCP_SAMPLE_MAX_MOVES + 7) / 8] = {0};
	const char *p = (const char *)buf + sizeof sm;
	char reply[sizeof done + sizeof bitmap];

	if (len < (int)sizeof sm)
		return -EPROTO;
	memcpy(&sm, buf, sizeof sm);
	if (sm.nmoves > PCP_SAMPLE_MAX_MOVES ||
	    (size_t)len != sizeof sm + (size_t)sm.nmoves * sizeof(struct pcp_move) || !pc->staging)
		return -EPROTO;
	if (agent_begin(pc, sm.request_id)) {
		if (sm.flags & PCP_SAMPLE_ZAP_STAGING)
			madvise(pc->staging, PCP_STAGING_PAGES * PAGE, MADV_DONTNEED);
		for (uint32_t i = 0; i < sm.nmoves; i++) {
			struct pcp_move mv;
			struct uffdio_move um;
			memcpy(&mv, p + i * sizeof mv, sizeof mv);
			if ((uintptr_t)mv.dst < (uintptr_t)pc->staging ||
			    (uintptr_t)mv.dst >= (uintptr_t)pc->staging + PCP_STAGING_PAGES * PAGE)
				continue; /* only ever into our staging area */
			um = (struct uffdio_move){.dst = mv.dst, .src = mv.src, .len = PAGE};
			if (!ioctl(pc->uffd, UFFDIO_MOVE, &um)) {
				bitmap[i / 8] |= (uint8_t)(1u << (i % 8));
				done.nmoved++;
			}
		}
		agent_done(pc);
	}
	done.request_id = sm.request_id;
	done.nmoves = sm.nmoves;
	memcpy(reply, &done, sizeof done);
	memcpy(reply + sizeof done, bitmap, (sm.nmoves + 7) / 8);
	return send_frame(pc, pc->sock, PCP_SAMPLE_DONE, reply, sizeof done + (sm.nmoves + 7) / 8, NULL, 0);
}

/* The socket ended.  Is the session over (STOP answered) or is the daemon lost? */
static bool link_lost(struct predicomp_client *pc)
{
	bool lost;
	pthread_mutex_lock(&pc->lock);
	lost = !pc->stop_acked && pc->link == LINK_UP;
	if (lost)
		pc->link = LINK_LOST;
	pthread_cond_broadcast(&pc->cond);
	pthread_mutex_unlock(&pc->lock);
	keeper_poke(pc);
	return lost;
}

static void link_ended(struct predicomp_client *pc, int err)
{
	pthread_mutex_lock(&pc->lock);
	if (err)
		pc->ended_errno = err;
	pc->link = LINK_ENDED;
	pthread_cond_broadcast(&pc->cond);
	pthread_mutex_unlock(&pc->lock);
	keeper_poke(pc);
}

void *agent_main(void *arg)
{
	struct predicomp_client *pc = arg;
	char *buf = malloc(PCP_MAX_PAYLOAD);
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		struct pcp_header h;
		int len = buf ? recv_frame(pc->sock, &h, buf, PCP_MAX_PAYLOAD, NULL, NULL, 0) : -ENOMEM, rc = 0;
		if (len < 0) {
			if (!link_lost(pc))
				break;
			/* the keeper serves our faults now; wait for a daemon that takes us back */
			pthread_mutex_lock(&pc->lock);
			while (pc->link == LINK_LOST)
				pthread_cond_wait(&pc->cond, &pc->lock);
			pthread_mutex_unlock(&pc->lock);
			if (pc->link == LINK_UP)
				continue; /* pc->sock is the new connection */
			break;
		}
		if (h.type == PCP_EVICT) {
			rc = do_evict(pc, buf, len);
		} else if (h.type == PCP_SAMPLE) {
			rc = do_sample(pc, buf, len);
		} else if (h.type == PCP_ACK) {
			struct pcp_ack ack;
			if (len < (int)sizeof ack) {
				rc = -EPROTO;
			} else {
				memcpy(&ack, buf, sizeof ack);
				if (ack.acked_type == PCP_STOP) {
					pthread_mutex_lock(&pc->lock);
					pc->stop_acked = 1;
					pthread_mutex_unlock(&pc->lock);
					link_ended(pc, 0);
					break;
				}
			}
		} else if (h.type == PCP_ERR) {
			/* The daemon ended the session; it restored and unregistered our memory first. */
			int err = decode_err(pc, buf, len);
			link_ended(pc, -err);
			break;
		} else {
			rc = -EPROTO;
		}
		if (rc) {
			pthread_mutex_lock(&pc->lock);
			set_error(pc, "agent: %s", strerror(-rc));
			pthread_mutex_unlock(&pc->lock);
		}
	}
	free(buf);
	return NULL;
}
