/*
 * keeper.c - when the daemon dies, the target serves its own faults.
 *
 * The keeper thread watches the daemon's socket.  When it ends without the
 * session ending (the daemon was killed, crashed, or gave the session up),
 * the keeper maps the session's store read-only (predicomp_store.h) and
 * becomes the fault handler: it reads the userfaultfd the target still
 * holds and restores each page from its copy (LZ4 blocks, same-filled
 * words, raw pages), maps zeros where nothing was ever stored, and lifts
 * write protection on a write.  Meanwhile it keeps trying to reach a
 * daemon at the same socket; one that answers takes the session back
 * (RESUME, memfs(7)).  (docs/design.md, "A daemon that dies".)
 *
 * Taking over, in order:
 *   1. taken_over is raised: the agent begins no request from now on.
 *   2. The journal is replayed: events the daemon read and never applied.
 *   3. While the agent finishes a request it had begun (its madvise waits
 *      for someone to read its REMOVE event: us), events are applied and
 *      faults left unanswered, until the agent says whether the session
 *      ended (ERR, STOP answered: nothing to do) or the daemon is lost.
 *   4. Pages the sampler had parked in the staging area are moved home.
 *   5. Every registered range is woken: faults the daemon read and never
 *      answered, and writes it held, are retried by their threads and
 *      reach us.
 * A page the daemon was evicting when it died is either still in the
 * target (then it is write-protected, its copy valid, and a write just
 * lifts the protection) or gone (then its copy is in the store, and a
 * fault restores it, with the write landing on it): it is never both
 * written and dropped, because the agent drops pages only for requests it
 * began before step 1, and step 3 waits for those to end.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <lz4.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
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
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
	struct uffdio_range range;
	uint64_t mode;
	int64_t updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#define KEEP_BATCH 64
#define RETRY_CAP 1024
#define READAHEAD 63              /* pages restored after a sequential fault */
#define RECONNECT_FIRST_MS 50     /* a restarted daemon is looked for this soon, */
#define RECONNECT_MAX_MS 2000     /* then at doubling intervals up to this */

struct alone_range {
	uint32_t index; /* its entry in the store */
	bool live;
	uint64_t start, npages;
	uint32_t dir, flags;
	uint8_t *forgot; /* a bit per page the target discarded since: reads as zeros (mmap, lazily) */
};

struct retry {
	uint64_t addr, flags;
};

struct alone {
	const uint8_t *base; /* the store, mapped read-only */
	uint64_t size;
	const struct pcs_header *hdr;
	struct alone_range *ranges;
	uint32_t nranges;
	uint8_t *scratch; /* READAHEAD + 1 pages */
	uint64_t last_fault;
	struct uffd_msg msgs[KEEP_BATCH];
	struct retry retry[RETRY_CAP];
	unsigned nretry;
};

void keeper_poke(struct predicomp_client *pc)
{
	uint64_t one = 1;
	if (pc->keeper_efd >= 0 && write(pc->keeper_efd, &one, sizeof one) < 0) {
		/* saturated: the keeper has not read it yet, it will */
	}
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the store, read-only --------------------------------------------------- */

static const void *at(const struct alone *a, uint64_t off, uint64_t len)
{
	return off <= a->size && len <= a->size - off ? a->base + off : NULL;
}

static const uint32_t *chunk(const struct alone *a, uint32_t c)
{
	if (!c || c >= a->hdr->nchunks)
		return NULL;
	return at(a, PCS_CHUNKS_OFF + (uint64_t)c * PCS_CHUNK, PCS_CHUNK);
}

/* A range's directory: consecutive chunks from r->dir, one uint32 per 4096 pages. */
static const uint32_t *directory(const struct alone *a, const struct alone_range *r)
{
	uint64_t ndir = (r->npages + PCS_ENTRIES_PER_CHUNK - 1) / PCS_ENTRIES_PER_CHUNK;
	if (!r->dir || r->dir >= a->hdr->nchunks)
		return NULL;
	return at(a, PCS_CHUNKS_OFF + (uint64_t)r->dir * PCS_CHUNK, ndir * sizeof(uint32_t));
}

/* The page's entry, or NULL (untouched as far as the store knows). */
static const struct pcs_page *entry(const struct alone *a, const struct alone_range *r, uint64_t idx)
{
	const uint32_t *dir = directory(a, r);
	const struct pcs_page *e;
	if (!dir || idx >= r->npages)
		return NULL;
	e = (const struct pcs_page *)chunk(a, dir[idx / PCS_ENTRIES_PER_CHUNK]);
	return e ? e + idx % PCS_ENTRIES_PER_CHUNK : NULL;
}

static bool has_copy(const struct pcs_page *e)
{
	return e && e->state < PCS_NSTATES && ((PCS_HAS_COPY_STATES >> e->state) & 1) &&
	       (e->copy || (e->flags & PCS_PF_SAME));
}

/* The page's contents from its copy; false if it cannot be decoded. */
static bool decode(const struct alone *a, const struct pcs_page *e, uint8_t *dst)
{
	const uint8_t *blob;
	if (e->flags & PCS_PF_SAME) {
		uint64_t *w = (uint64_t *)dst;
		for (size_t i = 0; i < PAGE / 8; i++)
			w[i] = e->copy;
		return true;
	}
	blob = at(a, e->copy * PCS_BLOB_ALIGN, e->csize);
	if (!blob || !e->csize || e->csize > PAGE)
		return false;
	if (e->csize == PAGE) {
		memcpy(dst, blob, PAGE);
		return true;
	}
	return LZ4_decompress_safe((const char *)blob, (char *)dst, e->csize, PAGE) == PAGE;
}

static void free_alone(struct alone *a)
{
	if (!a)
		return;
	for (uint32_t i = 0; i < a->nranges; i++)
		if (a->ranges[i].forgot)
			munmap(a->ranges[i].forgot, (a->ranges[i].npages + 7) / 8);
	free(a->ranges);
	if (a->base)
		munmap((void *)a->base, a->size);
	free(a->scratch);
	free(a);
}

/* Map the store and learn its ranges as the daemon left them. */
static struct alone *open_alone(int store_fd)
{
	struct alone *a = calloc(1, sizeof *a);
	struct stat st;
	if (!a || fstat(store_fd, &st) || st.st_size < (off_t)PCS_CHUNKS_OFF)
		goto fail;
	a->size = (uint64_t)st.st_size;
	a->base = mmap(NULL, a->size, PROT_READ, MAP_SHARED | MAP_NORESERVE, store_fd, 0);
	if (a->base == MAP_FAILED) {
		a->base = NULL;
		goto fail;
	}
	a->hdr = (const struct pcs_header *)a->base;
	if (a->hdr->magic != PCS_MAGIC || a->hdr->version != PCS_VERSION || a->hdr->nranges > PCS_MAX_RANGES)
		goto fail;
	a->scratch = aligned_alloc(PAGE, (READAHEAD + 1) * PAGE);
	a->ranges = calloc(a->hdr->nranges + 1, sizeof *a->ranges);
	if (!a->scratch || !a->ranges)
		goto fail;
	for (uint32_t i = 0; i < a->hdr->nranges; i++) {
		const struct pcs_range *pr = at(a, PCS_RANGES_OFF + (uint64_t)i * sizeof *pr, sizeof *pr);
		if (!pr || !pr->npages || pr->npages > PCS_MAX_RANGE_PAGES)
			continue;
		a->ranges[a->nranges++] = (struct alone_range){.index = i, .live = true, .start = pr->start,
								.npages = pr->npages, .dir = pr->dir,
								.flags = pr->flags};
	}
	return a;
fail:
	free_alone(a);
	return NULL;
}

static struct alone_range *range_of(struct alone *a, uint64_t addr)
{
	for (uint32_t i = 0; i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		if (r->live && addr >= r->start && addr < r->start + r->npages * PAGE)
			return r;
	}
	return NULL;
}

static bool forgotten(const struct alone_range *r, uint64_t idx)
{
	return r->forgot && (r->forgot[idx / 8] >> (idx % 8) & 1);
}

static void forget(struct alone_range *r, uint64_t idx)
{
	if (!r->forgot) {
		void *m = mmap(NULL, (r->npages + 7) / 8, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (m == MAP_FAILED)
			return;
		r->forgot = m;
	}
	r->forgot[idx / 8] |= (uint8_t)(1u << (idx % 8));
}

/* ---- events ------------------------------------------------------------------- */

/* The target dropped or unmapped [start, end): those pages read as zeros now. */
static void on_remove(struct alone *a, uint64_t start, uint64_t end, bool unmap)
{
	for (uint32_t i = 0; i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		uint64_t rend = r->start + r->npages * PAGE;
		uint64_t lo = start > r->start ? start : r->start, hi = end < rend ? end : rend;
		if (!r->live || lo >= hi)
			continue;
		if (unmap && lo == r->start && hi == rend) {
			r->live = false;
			continue;
		}
		for (uint64_t p = (lo - r->start) / PAGE; p < (hi - r->start + PAGE - 1) / PAGE; p++) {
			const struct pcs_page *e = entry(a, r, p);
			/* a page being evicted is being dropped by our own agent: that REMOVE is its */
			if (!unmap && e && e->state == PCS_EVICTING)
				continue;
			forget(r, p);
		}
	}
}

/* mremap moved [from, from + len) to `to`; applying it twice moves once. */
static void on_remap(struct alone *a, uint64_t from, uint64_t to, uint64_t len)
{
	for (uint32_t i = 0; i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		uint64_t rend = r->start + r->npages * PAGE;
		if (!r->live)
			continue;
		if (r->start >= from && rend <= from + len)
			r->start = r->start - from + to;
		else if (r->start < from + len && from < rend)
			r->live = false; /* part of it moved: we cannot follow it (nor could the daemon) */
	}
}

static void apply_event(struct alone *a, const struct uffd_msg *m)
{
	switch (m->event) {
	case UFFD_EVENT_REMOVE:
		on_remove(a, m->arg.remove.start, m->arg.remove.end, false);
		break;
	case UFFD_EVENT_UNMAP:
		on_remove(a, m->arg.remove.start, m->arg.remove.end, true);
		break;
	case UFFD_EVENT_REMAP:
		on_remap(a, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
		break;
	case UFFD_EVENT_FORK:
		close((int)m->arg.fork.ufd);
		break;
	default:
		break;
	}
}

/* Events the daemon read and died before applying (fault.c clears each once applied). */
static void replay_journal(struct alone *a)
{
	const struct uffd_msg *j = at(a, PCS_JOURNAL_OFF, PCS_JOURNAL_MSGS * sizeof *j);
	for (int i = 0; j && i < PCS_JOURNAL_MSGS; i++)
		if (j[i].event && j[i].event != UFFD_EVENT_PAGEFAULT)
			apply_event(a, &j[i]);
}

/* ---- faults --------------------------------------------------------------------- */

static int uffd_do(struct predicomp_client *pc, unsigned long req, void *arg)
{
	return ioctl(pc->uffd, req, arg) ? -errno : 0;
}

static void wake(struct predicomp_client *pc, uint64_t addr, uint64_t len)
{
	struct uffdio_range r = {.start = addr, .len = len};
	uffd_do(pc, UFFDIO_WAKE, &r);
}

static int zero(struct predicomp_client *pc, uint64_t addr)
{
	struct uffdio_zeropage z = {.range = {.start = addr, .len = PAGE}};
	return uffd_do(pc, UFFDIO_ZEROPAGE, &z);
}

static int copy_in(struct predicomp_client *pc, uint64_t addr, const void *src, uint64_t len, int64_t *done)
{
	struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)src, .len = len};
	int rc = uffd_do(pc, UFFDIO_COPY, &c);
	*done = rc ? (c.copy > 0 ? c.copy : 0) : (int64_t)len;
	return rc;
}

/* A sampled page: move it home from its staging slot (0), or it is not there. */
static int from_slot(struct predicomp_client *pc, const struct pcs_page *e, uint64_t addr)
{
	struct alone *a = pc->alone;
	struct uffdio_move mv;
	if (!pc->staging || e->stamp >= a->hdr->staging_pages)
		return -ENOENT;
	mv = (struct uffdio_move){.dst = addr, .src = (uintptr_t)pc->staging + (uint64_t)e->stamp * PAGE,
				  .len = PAGE};
	return uffd_do(pc, UFFDIO_MOVE, &mv);
}

/* Restore the page at addr of r (absent, with a copy), and after a sequential fault a few after it. */
static int restore(struct predicomp_client *pc, struct alone_range *r, uint64_t idx, const struct pcs_page *e)
{
	struct alone *a = pc->alone;
	uint64_t addr = r->start + idx * PAGE, n = 1;
	int64_t done;
	int rc;

	if (!decode(a, e, a->scratch)) {
		struct uffdio_poison po = {.range = {.start = addr, .len = PAGE}};
		/* its data is gone: a loud SIGBUS rather than zeros where it was */
		return uffd_do(pc, UFFDIO_POISON, &po) ? zero(pc, addr) : 0;
	}
	if (addr == a->last_fault + PAGE)
		while (n <= READAHEAD && idx + n < r->npages && !forgotten(r, idx + n)) {
			const struct pcs_page *f = entry(a, r, idx + n);
			if (!has_copy(f) || (f->flags & PCS_PF_SAMPLED) || !decode(a, f, a->scratch + n * PAGE))
				break;
			n++;
		}
	a->last_fault = addr;
	rc = copy_in(pc, addr, a->scratch, n * PAGE, &done);
	if (rc && done >= (int64_t)PAGE)
		rc = 0; /* the faulting page is in; a neighbour was there already */
	return rc;
}

static int serve(struct predicomp_client *pc, uint64_t fault_addr, uint64_t flags)
{
	struct alone *a = pc->alone;
	uint64_t addr = fault_addr & ~(uint64_t)(PAGE - 1), idx;
	struct alone_range *r;
	const struct pcs_page *e;
	int rc;

	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		struct uffdio_writeprotect wp = {.range = {.start = addr, .len = PAGE}, .mode = 0};
		rc = uffd_do(pc, UFFDIO_WRITEPROTECT, &wp);
	} else if (!(r = range_of(a, addr))) {
		rc = zero(pc, addr); /* registered but unknown to the store: never populated by us */
	} else {
		idx = (addr - r->start) / PAGE;
		e = forgotten(r, idx) ? NULL : entry(a, r, idx);
		rc = -ENOENT;
		if (e && (e->flags & PCS_PF_SAMPLED))
			rc = from_slot(pc, e, addr);
		if (rc == -ENOENT || rc == -EINVAL)
			rc = has_copy(e) ? restore(pc, r, idx, e) : zero(pc, addr);
	}
	if (rc == -EAGAIN)
		return rc; /* an event waits to be read first */
	if (rc)
		wake(pc, addr, PAGE); /* there already (EEXIST), or nothing we can do: let it retry */
	pc->agent_faults++;
	return 0;
}

/* Read what waits on the userfaultfd: events applied, faults served (if `serving`) or left. */
static bool drain(struct predicomp_client *pc, bool serving)
{
	struct alone *a = pc->alone;
	ssize_t n = read(pc->uffd, a->msgs, sizeof a->msgs);
	unsigned nretry;
	if (n <= 0)
		return false;
	for (ssize_t i = 0; i < n / (ssize_t)sizeof *a->msgs; i++) {
		const struct uffd_msg *m = &a->msgs[i];
		if (m->event != UFFD_EVENT_PAGEFAULT)
			apply_event(a, m);
		else if (serving && serve(pc, m->arg.pagefault.address, m->arg.pagefault.flags) == -EAGAIN &&
			 a->nretry < RETRY_CAP)
			a->retry[a->nretry++] = (struct retry){m->arg.pagefault.address, m->arg.pagefault.flags};
	}
	nretry = a->nretry;
	a->nretry = 0;
	for (unsigned i = 0; i < nretry; i++)
		if (serve(pc, a->retry[i].addr, a->retry[i].flags) == -EAGAIN)
			a->retry[a->nretry++] = a->retry[i];
	return true;
}

/* Sampled pages back to their places (step 4 above). */
static void sampled_home(struct predicomp_client *pc)
{
	struct alone *a = pc->alone;
	const struct pcs_slot *slots = at(a, PCS_SLOTS_OFF, (uint64_t)a->hdr->staging_pages * sizeof *slots);
	if (!slots || !pc->staging)
		return;
	for (uint32_t i = 0; i < a->hdr->staging_pages && i < PCP_STAGING_PAGES; i++) {
		struct alone_range *r = NULL;
		struct uffdio_move mv;
		int tries = 0;
		if (slots[i].status != PCS_SLOT_PENDING && slots[i].status != PCS_SLOT_OUT)
			continue;
		for (uint32_t k = 0; k < a->nranges; k++)
			if (a->ranges[k].live && a->ranges[k].index == slots[i].range)
				r = &a->ranges[k];
		if (!r || slots[i].page >= r->npages || forgotten(r, slots[i].page))
			continue;
		mv = (struct uffdio_move){.dst = r->start + slots[i].page * PAGE,
					  .src = (uintptr_t)pc->staging + (uint64_t)i * PAGE, .len = PAGE};
		/* EEXIST: it never left (or came back); ENOENT: the slot is empty */
		while (uffd_do(pc, UFFDIO_MOVE, &mv) == -EAGAIN && tries++ < 1000)
			drain(pc, false);
	}
}

static void wake_all(struct predicomp_client *pc)
{
	struct alone *a = pc->alone;
	for (uint32_t i = 0; i < a->nranges; i++)
		if (a->ranges[i].live)
			wake(pc, a->ranges[i].start, a->ranges[i].npages * PAGE);
}

/* predicomp_client_stop() while alone: every page back, the ranges unregistered. */
static int settle(struct predicomp_client *pc)
{
	struct alone *a = pc->alone;
	int rc = 0;
	for (uint32_t i = 0; i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		struct uffdio_range ur = {.start = r->start, .len = r->npages * PAGE};
		const uint32_t *dir = directory(a, r);
		if (!r->live)
			continue;
		for (uint64_t idx = 0; dir && idx < r->npages; idx++) {
			const struct pcs_page *e;
			int64_t done;
			if (!dir[idx / PCS_ENTRIES_PER_CHUNK]) {
				idx = (idx / PCS_ENTRIES_PER_CHUNK + 1) * PCS_ENTRIES_PER_CHUNK - 1;
				continue;
			}
			e = forgotten(r, idx) ? NULL : entry(a, r, idx);
			if (!has_copy(e) || (e->flags & PCS_PF_SAMPLED))
				continue;
			if (!decode(a, e, a->scratch))
				continue;
			for (int tries = 0; copy_in(pc, r->start + idx * PAGE, a->scratch, PAGE, &done) == -EAGAIN &&
					    tries < 1000; tries++)
				drain(pc, true);
		}
		if (ioctl(pc->uffd, UFFDIO_UNREGISTER, &ur) && !rc)
			rc = -errno;
	}
	if (pc->staging) {
		struct uffdio_range ur = {.start = (uintptr_t)pc->staging, .len = PCP_STAGING_PAGES * PAGE};
		ioctl(pc->uffd, UFFDIO_UNREGISTER, &ur);
	}
	return rc;
}

/* ---- a restarted daemon --------------------------------------------------------- */

static int send_forgotten(struct predicomp_client *pc, int sock, uint32_t *total)
{
	struct alone *a = pc->alone;
	struct {
		struct pcp_forget f;
		struct pcp_forget_run runs[PCP_FORGET_MAX_RUNS];
	} *msg = malloc(sizeof *msg);
	int rc = 0;
	if (!msg)
		return -ENOMEM;
	msg->f = (struct pcp_forget){0};
	*total = 0;
	for (uint32_t i = 0; !rc && i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		for (uint64_t p = 0; r->live && r->forgot && p < r->npages && !rc;) {
			uint64_t q = p;
			if (!r->forgot[p / 8]) {
				p = (p / 8 + 1) * 8;
				continue;
			}
			while (q < r->npages && forgotten(r, q))
				q++;
			if (q > p) {
				if (*total >= PCP_MAX_FORGET_RUNS)
					break; /* past this, the daemon would refuse: the rest stay ours to forget */
				msg->runs[msg->f.nruns++] = (struct pcp_forget_run){.range = r->index, .first = p,
										      .count = q - p};
				++*total;
				if (msg->f.nruns == PCP_FORGET_MAX_RUNS) {
					rc = send_frame(pc, sock, PCP_FORGET, msg,
							sizeof msg->f + msg->f.nruns * sizeof msg->runs[0], NULL, 0);
					msg->f.nruns = 0;
				}
			}
			p = q + 1;
		}
	}
	if (!rc && msg->f.nruns)
		rc = send_frame(pc, sock, PCP_FORGET, msg, sizeof msg->f + msg->f.nruns * sizeof msg->runs[0],
				NULL, 0);
	free(msg);
	return rc;
}

/*
 * Offer the session to a daemon at our socket.  While this runs no fault is
 * served (they wait in the userfaultfd); the daemon rebuilds the session
 * from the store, what we forgot and pagemap, then answers ACK with its new
 * store.  From then on that store is ours to fall back on, whatever
 * happens; ADOPT hands the faults over.  0: the daemon serves them now.
 */
static int try_resume(struct predicomp_client *pc, int caps)
{
	struct alone *a = pc->alone;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct pcp_hello hello;
	struct pcp_resume res;
	struct pcp_header h;
	char buf[512 + PCP_MAX_ERR_TEXT];
	int fds[2], nfds = 0, sock, rc, len, pass[2];
	uint32_t nlive = 0, nforget = 0;

	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	strcpy(sa.sun_path, pc->path);
	if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof sa)) {
		rc = -errno;
		if (sock >= 0)
			close(sock);
		return rc;
	}
	for (uint32_t i = 0; i < a->nranges; i++)
		nlive += a->ranges[i].live;
	hello = (struct pcp_hello){.pid = (uint32_t)getpid(), .nranges = nlive + (pc->staging ? 1 : 0),
				   .caps = (uint64_t)caps, .page_size = PAGE};
	rc = nlive ? send_frame(pc, sock, PCP_HELLO, &hello, sizeof hello, NULL, 0) : -ENOENT;
	for (uint32_t i = 0; !rc && i < a->nranges; i++) {
		struct alone_range *r = &a->ranges[i];
		struct pcp_range m = {.addr = r->start, .length = r->npages * PAGE, .flags = r->flags,
				      .index = r->index};
		if (r->live)
			rc = send_frame(pc, sock, PCP_RANGE, &m, sizeof m, NULL, 0);
	}
	if (!rc && pc->staging) {
		struct pcp_range m = {.addr = (uintptr_t)pc->staging, .length = PCP_STAGING_PAGES * PAGE,
				      .flags = PCP_RANGE_ANON_PRIVATE | PCP_RANGE_WRITABLE | PCP_RANGE_STAGING};
		rc = send_frame(pc, sock, PCP_RANGE, &m, sizeof m, NULL, 0);
	}
	if (!rc)
		rc = send_forgotten(pc, sock, &nforget);
	res = (struct pcp_resume){.uffd_features = pc->features, .old_session = a->hdr->session_id,
				  .takeovers = pc->takeovers, .agent_faults = pc->agent_faults,
				  .resumes = pc->resumes, .nforget = nforget};
	pass[0] = pc->uffd;
	pass[1] = pc->store_fd;
	if (!rc)
		rc = send_frame(pc, sock, PCP_RESUME, &res, sizeof res, pass, 2);
	if (!rc) {
		set_timeout(sock, RESUME_TIMEOUT_S);
		len = recv_frame(sock, &h, buf, sizeof buf, fds, &nfds, 2);
		if (len < 0)
			rc = len;
		else if (h.type == PCP_ERR)
			rc = decode_err(pc, buf, len);
		else if (h.type != PCP_ACK || len < (int)sizeof(struct pcp_ack) || nfds != 2)
			rc = -EPROTO;
	}
	if (rc) {
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		close(sock);
		return rc;
	}
	/* the daemon's store is the session's now, whether or not it goes on to serve */
	{
		struct pcp_ack ack;
		struct alone *fresh = open_alone(fds[0]);
		memcpy(&ack, buf, sizeof ack);
		if (!fresh) {
			close(fds[0]);
			close(fds[1]);
			close(sock);
			return -EPROTO;
		}
		unmap_fence(pc); /* the agent waits for us: nobody uses the old one */
		if (map_fence(pc, fds[1])) {
			free_alone(fresh);
			close(fds[0]);
			close(sock);
			return -EPROTO;
		}
		close(pc->store_fd);
		pc->store_fd = fds[0];
		free_alone(pc->alone);
		pc->alone = fresh;
		pc->session_id = ack.value;
	}
	set_timeout(sock, 0);
	rc = send_frame(pc, sock, PCP_ADOPT, NULL, 0, NULL, 0);
	if (rc) {
		close(sock);
		return rc; /* we go on alone, from the new store */
	}
	pthread_mutex_lock(&pc->lock);
	close(pc->sock);
	pc->sock = sock;
	pc->resumes++;
	atomic_store(&pc->taken_over, 0);
	pc->link = LINK_UP;
	pthread_cond_broadcast(&pc->cond);
	pthread_mutex_unlock(&pc->lock);
	return 0;
}

/* ---- the thread ------------------------------------------------------------------- */

static enum link_state link_of(struct predicomp_client *pc)
{
	enum link_state l;
	pthread_mutex_lock(&pc->lock);
	l = pc->link;
	pthread_mutex_unlock(&pc->lock);
	return l;
}

static void eat_pokes(struct predicomp_client *pc)
{
	uint64_t v;
	if (read(pc->keeper_efd, &v, sizeof v) < 0) {
		/* nothing waiting */
	}
}

/*
 * The daemon is lost (or the agent is about to say so): take over (steps
 * 1-5 above), serve until a daemon takes the session back (true), or until
 * it ends (false).
 */
static bool take_over(struct predicomp_client *pc, int caps)
{
	uint64_t backoff = RECONNECT_FIRST_MS, next_try;
	atomic_store(&pc->taken_over, 1);
	pc->alone = open_alone(pc->store_fd);
	if (!pc->alone) {
		/* no store to serve from: nothing can be kept; what was never evicted still is ours */
		fprintf(stderr, "predicomp_client: memfs daemon lost, and its store cannot be read: %s\n",
			strerror(errno));
		pthread_mutex_lock(&pc->lock);
		if (pc->bytes_evicted)
			abort(); /* better than running on with memory that reads as zeros */
		for (uint32_t i = 0; i < pc->nranges; i++) {
			struct uffdio_range ur = {.start = pc->ranges[i].addr, .len = pc->ranges[i].len};
			ioctl(pc->uffd, UFFDIO_UNREGISTER, &ur);
		}
		pc->ended_errno = ECONNRESET;
		pc->link = LINK_ENDED;
		pthread_cond_broadcast(&pc->cond);
		pthread_mutex_unlock(&pc->lock);
		return false;
	}
	replay_journal(pc->alone);
	for (;;) {
		struct pollfd p[2] = {{.fd = pc->uffd, .events = POLLIN}, {.fd = pc->keeper_efd, .events = POLLIN}};
		enum link_state l = link_of(pc);
		if (l == LINK_ENDED) {
			/* the session ended (the daemon gave everything back): nothing to serve */
			wake_all(pc);
			free_alone(pc->alone);
			pc->alone = NULL;
			return false;
		}
		if (l == LINK_LOST && !atomic_load(&pc->agent_busy))
			break;
		poll(p, 2, 100);
		eat_pokes(pc);
		while (drain(pc, false))
			;
	}
	pc->takeovers++;
	sampled_home(pc);
	wake_all(pc);
	next_try = now_ms() + RECONNECT_FIRST_MS;
	for (;;) {
		struct pollfd p[2] = {{.fd = pc->uffd, .events = POLLIN}, {.fd = pc->keeper_efd, .events = POLLIN}};
		uint64_t now = now_ms();
		int stop;
		poll(p, 2, next_try > now ? (int)(next_try - now) : 0);
		if (p[1].revents)
			eat_pokes(pc);
		while (drain(pc, true))
			;
		pthread_mutex_lock(&pc->lock);
		stop = pc->stop_alone;
		pthread_mutex_unlock(&pc->lock);
		if (stop) {
			int rc = settle(pc);
			free_alone(pc->alone);
			pc->alone = NULL;
			pthread_mutex_lock(&pc->lock);
			pc->stop_alone_rc = rc;
			pc->link = LINK_ENDED;
			pthread_cond_broadcast(&pc->cond);
			pthread_mutex_unlock(&pc->lock);
			return false;
		}
		if (now_ms() >= next_try) {
			if (!try_resume(pc, caps)) {
				free_alone(pc->alone);
				pc->alone = NULL;
				return true;
			}
			wake_all(pc); /* faults that arrived while we asked wait for nobody */
			backoff = backoff * 2 > RECONNECT_MAX_MS ? RECONNECT_MAX_MS : backoff * 2;
			next_try = now_ms() + backoff;
		}
	}
}

void *keeper_main(void *arg)
{
	struct predicomp_client *pc = arg;
	int caps;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_setname_np(pthread_self(), "predicomp-keep");
	pthread_mutex_lock(&pc->lock);
	caps = PCP_CAP_PREFETCH | (pc->has_agent ? PCP_CAP_AGENT : 0) | (pc->staging ? PCP_CAP_STAGING : 0);
	pthread_mutex_unlock(&pc->lock);
	for (;;) {
		struct pollfd p[2] = {{.fd = pc->sock, .events = POLLRDHUP}, {.fd = pc->keeper_efd, .events = POLLIN}};
		enum link_state l = link_of(pc);
		if (l == LINK_ENDED)
			break;
		if (l == LINK_UP) {
			if (poll(p, 2, -1) < 0 && errno != EINTR)
				break;
			if (p[1].revents)
				eat_pokes(pc);
			if (!(p[0].revents & (POLLRDHUP | POLLHUP | POLLERR)) && link_of(pc) == LINK_UP)
				continue;
		}
		/* the socket ended: the daemon is gone, or the session is over */
		if (!take_over(pc, caps) && link_of(pc) == LINK_ENDED)
			break;
	}
	return NULL;
}
