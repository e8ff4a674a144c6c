/*
 * libpredicomp_client: the target side of memfs.
 *
 * The library validates and records ranges, creates the userfaultfd, sends
 * it to the daemon (protocol v1, predicomp_proto.h) and then runs an agent
 * thread.  The agent is the only reader of the socket once a session runs:
 * it executes EVICT requests (MADV_DONTNEED on pages the daemon holds a
 * copy of: a process may not be made to drop its private pages from
 * outside), and it delivers the daemon's answer to STOP to the thread
 * waiting in predicomp_client_stop().
 *
 * Built with -DPREDICOMP_CLIENT_NO_AGENT the library has no agent: the
 * daemon then runs the session in wp-only mode (pages are compressed and
 * tracked but never freed).
 */
#define _GNU_SOURCE
#include "predicomp_client.h"
#include "predicomp_proto.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define PAGE 4096u
#define START_TIMEOUT_S 120
#define STOP_TIMEOUT_S 600

#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14) /* Linux 6.6; older headers lack it */
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16) /* Linux 6.8 */
#endif

/*
 * What the daemon needs from UFFDIO_API; the optional ones are taken when
 * offered.  POISON lets the daemon make a page it cannot restore raise
 * SIGBUS instead of reading as zeros; MOVE lets its access sampler park
 * pages in the staging area.
 */
#define FEATURES_REQUIRED ((uint64_t)UFFD_FEATURE_PAGEFAULT_FLAG_WP)
#define FEATURES_WANTED                                                                      \
	((uint64_t)UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_THREAD_ID |                     \
	 UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP |        \
	 UFFD_FEATURE_POISON | UFFD_FEATURE_MOVE)

enum client_state { ST_OPEN, ST_RUNNING, ST_STOPPED, ST_ENDED };

struct client_range {
	uintptr_t addr;
	size_t len;
	uint32_t flags;
};

struct predicomp_client {
	pthread_mutex_t lock; /* API calls; agent notifications */
	pthread_cond_t cond;
	pthread_mutex_t send_lock; /* one frame at a time on the socket */
	int sock;
	int uffd; /* our copy while a session runs, so a vanished daemon is noticed */
	void *staging; /* pages the daemon's access sampler parks here (PCP_STAGING_PAGES) */
	enum client_state state;
	uint32_t seq;
	uint32_t nranges;
	struct client_range ranges[PREDICOMP_CLIENT_MAX_RANGES];
	uint64_t session_id;
	int has_agent;
	pthread_t agent;
	int agent_running;
	/* set by the agent, under lock */
	int stop_acked;
	int ended_errno; /* the daemon ended the session (ERR) or vanished */
	uint64_t bytes_evicted;
	char last_error[256];
};

static void set_error(struct predicomp_client *pc, const char *fmt, ...)
{
	va_list ap;
	if (!pc)
		return;
	va_start(ap, fmt);
	vsnprintf(pc->last_error, sizeof pc->last_error, fmt, ap);
	va_end(ap);
}

/* ---- framing ---------------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = recv(fd, p, len, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return -ETIMEDOUT;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Send one frame; pass_fd >= 0 attaches it with SCM_RIGHTS. */
static int send_frame(struct predicomp_client *pc, uint16_t type, const void *payload, size_t len,
		      int pass_fd)
{
	struct pcp_header h = {
		.magic = PCP_MAGIC, .version = PCP_VERSION, .type = type, .length = (uint32_t)len};
	int rc;

	pthread_mutex_lock(&pc->send_lock);
	h.seq = ++pc->seq;
	if (pass_fd >= 0) {
		union {
			char buf[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} cbuf;
		struct iovec iov[2] = {{&h, sizeof h}, {(void *)payload, len}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
		struct cmsghdr *c;
		size_t total = sizeof h + len;
		ssize_t n;

		memset(&cbuf, 0, sizeof cbuf);
		m.msg_control = cbuf.buf;
		m.msg_controllen = sizeof cbuf.buf;
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
		do
			n = sendmsg(pc->sock, &m, MSG_NOSIGNAL);
		while (n < 0 && errno == EINTR);
		if (n < 0)
			rc = -errno;
		else if ((size_t)n < total)
			rc = write_all(pc->sock, (const char *)payload + ((size_t)n - sizeof h),
				       total - (size_t)n);
		else
			rc = 0;
	} else {
		rc = write_all(pc->sock, &h, sizeof h);
		if (!rc && len)
			rc = write_all(pc->sock, payload, len);
	}
	pthread_mutex_unlock(&pc->send_lock);
	return rc;
}

/* Read one frame into buf (cap bytes); returns payload length or -errno. */
static int recv_frame(int fd, struct pcp_header *h, void *buf, size_t cap)
{
	int rc = read_all(fd, h, sizeof *h);
	if (rc)
		return rc;
	if (h->magic != PCP_MAGIC || h->version != PCP_VERSION || h->length > PCP_MAX_PAYLOAD ||
	    h->length > cap)
		return -EPROTO;
	rc = read_all(fd, buf, h->length);
	if (rc)
		return rc;
	return (int)h->length;
}

/* The text of an ERR frame, for last_error. */
static int decode_err(struct predicomp_client *pc, const void *buf, int len)
{
	struct pcp_err e;
	if (len < (int)sizeof e)
		return -EPROTO;
	memcpy(&e, buf, sizeof e);
	if (e.text_len > (uint32_t)len - sizeof e)
		e.text_len = (uint32_t)len - sizeof e;
	set_error(pc, "daemon: %.*s", (int)e.text_len, (const char *)buf + sizeof e);
	return e.err > 0 ? -e.err : -EPROTO;
}

/* ---- ranges ------------------------------------------------------------ */

/*
 * Is [addr, addr+len) covered by private anonymous mappings?  -EFAULT when
 * part of it is not mapped, -EINVAL when part of it is shared or file backed.
 */
static int check_private_anon(uintptr_t addr, size_t len)
{
	FILE *f = fopen("/proc/self/maps", "re");
	char line[512];
	uintptr_t want = addr, end = addr + len;
	int rc = -EFAULT;

	if (!f)
		return -errno;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi, ino;
		char perms[8], path[256] = "";
		if (sscanf(line, "%lx-%lx %7s %*s %*s %lu %255s", &lo, &hi, perms, &ino, path) < 4)
			continue;
		if (hi <= want || lo > want)
			continue;
		/* this mapping holds `want` */
		if (perms[3] != 'p' || ino != 0 ||
		    (path[0] && path[0] != '[')) { /* [heap], [stack], [anon:...] are fine */
			rc = -EINVAL;
			break;
		}
		want = hi;
		if (want >= end) {
			rc = 0;
			break;
		}
	}
	fclose(f);
	return rc;
}

int predicomp_client_register_range(struct predicomp_client *pc, void *addr, size_t len,
				    uint32_t flags, struct predicomp_range_handle *out)
{
	uintptr_t a = (uintptr_t)addr;
	int rc;

	if (!pc)
		return -EINVAL;
	pthread_mutex_lock(&pc->lock);
	if (pc->state != ST_OPEN) {
		set_error(pc, "ranges can only be registered before start");
		rc = -EBUSY;
		goto out;
	}
	if (!addr || !len || (a % PAGE) || (len % PAGE) || a + len < a) {
		set_error(pc, "range %p+%zu is empty or not page aligned", addr, len);
		rc = -EINVAL;
		goto out;
	}
	if (!(flags & PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE) ||
	    (flags & ~(PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE | PREDICOMP_CLIENT_RANGE_F_WRITABLE))) {
		set_error(pc, "flags 0x%x: ANON_PRIVATE is required, no other bits are known", flags);
		rc = -EINVAL;
		goto out;
	}
	if (pc->nranges >= PREDICOMP_CLIENT_MAX_RANGES) {
		set_error(pc, "at most %d ranges", PREDICOMP_CLIENT_MAX_RANGES);
		rc = -E2BIG;
		goto out;
	}
	for (uint32_t i = 0; i < pc->nranges; i++) {
		struct client_range *r = &pc->ranges[i];
		if (a < r->addr + r->len && r->addr < a + len) {
			set_error(pc, "range %p+%zu overlaps range %u", addr, len, i);
			rc = -EEXIST;
			goto out;
		}
	}
	rc = check_private_anon(a, len);
	if (rc) {
		set_error(pc, rc == -EFAULT ? "range %p+%zu is not fully mapped"
					    : "range %p+%zu is not private anonymous memory",
			  addr, len);
		goto out;
	}
	/*
	 * Base pages keep eviction exact (no huge page to split under a
	 * fault), and a child of fork() must not inherit pages whose
	 * contents live in the daemon: it would read zeros, not our data.
	 */
	madvise(addr, len, MADV_NOHUGEPAGE);
	if (madvise(addr, len, MADV_DONTFORK)) {
		rc = -errno;
		set_error(pc, "madvise(MADV_DONTFORK): %s", strerror(errno));
		goto out;
	}
	pc->ranges[pc->nranges] = (struct client_range){a, len, flags};
	if (out) {
		out->index = pc->nranges;
		out->addr = addr;
		out->len = len;
	}
	pc->nranges++;
	rc = 0;
out:
	pthread_mutex_unlock(&pc->lock);
	return rc;
}

/* ---- userfaultfd --------------------------------------------------------- */

static int new_uffd(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0)
		return fd;
	if (errno == EPERM || errno == ENOSYS) {
		/* Without vm.unprivileged_userfaultfd, /dev/userfaultfd may still be open to us. */
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			int saved = errno;
			close(dev);
			if (fd >= 0)
				return fd;
			errno = saved;
		} else {
			errno = EPERM;
		}
	}
	return -errno;
}

/* UFFDIO_API may be called once per fd, so the offered features are probed on a spare one. */
static int open_uffd(struct predicomp_client *pc, uint64_t *features)
{
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	int probe = new_uffd(), fd;

	if (probe < 0) {
		set_error(pc, "userfaultfd: %s (root, vm.unprivileged_userfaultfd=1 or access to "
			      "/dev/userfaultfd is needed)",
			  strerror(-probe));
		return probe;
	}
	if (ioctl(probe, UFFDIO_API, &api)) {
		int e = errno;
		close(probe);
		set_error(pc, "UFFDIO_API: %s", strerror(e));
		return -e;
	}
	close(probe);
	if ((api.features & FEATURES_REQUIRED) != FEATURES_REQUIRED) {
		set_error(pc, "kernel lacks userfaultfd write-protect support");
		return -EOPNOTSUPP;
	}
	fd = new_uffd();
	if (fd < 0)
		return fd;
	api = (struct uffdio_api){.api = UFFD_API, .features = api.features & FEATURES_WANTED};
	if (ioctl(fd, UFFDIO_API, &api)) {
		int e = errno;
		close(fd);
		set_error(pc, "UFFDIO_API: %s", strerror(e));
		return -e;
	}
	*features = api.features;
	return fd;
}

/* ---- agent ---------------------------------------------------------------- */

#ifndef PREDICOMP_CLIENT_NO_AGENT
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
	for (uint32_t i = 0; i < ev.nruns; i++) {
		struct pcp_addr_run run;
		memcpy(&run, p + i * sizeof run, sizeof run);
		if (madvise((void *)(uintptr_t)run.addr, run.length, MADV_DONTNEED)) {
			done.status = -errno;
			break;
		}
		done.bytes_done += run.length;
	}
	pthread_mutex_lock(&pc->lock);
	pc->bytes_evicted += done.bytes_done;
	pthread_mutex_unlock(&pc->lock);
	return send_frame(pc, PCP_EVICT_DONE, &done, sizeof done, -1);
}

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
	done.request_id = sm.request_id;
	done.nmoves = sm.nmoves;
	memcpy(reply, &done, sizeof done);
	memcpy(reply + sizeof done, bitmap, (sm.nmoves + 7) / 8);
	return send_frame(pc, PCP_SAMPLE_DONE, reply, sizeof done + (sm.nmoves + 7) / 8, -1);
}

static void unregister_all(struct predicomp_client *pc)
{
	for (uint32_t i = 0; i < pc->nranges; i++) {
		struct uffdio_range r = {.start = pc->ranges[i].addr, .len = pc->ranges[i].len};
		ioctl(pc->uffd, UFFDIO_UNREGISTER, &r);
	}
}

/*
 * The daemon vanished without ending the session.  Pages it evicted
 * exist nowhere else: rather than let the process read zeros where its
 * data was, stop it loudly.  If nothing was ever evicted, nothing is
 * lost: unregister and carry on without the pager.
 */
static void daemon_lost(struct predicomp_client *pc, int err)
{
	if (pc->bytes_evicted) {
		fprintf(stderr,
			"predicomp_client: memfs daemon lost (%s) while it held evicted pages of "
			"this process (%" PRIu64 " bytes evicted so far); aborting rather than "
			"continuing with missing memory\n",
			strerror(-err), pc->bytes_evicted);
		abort();
	}
	unregister_all(pc);
}

static void *agent_main(void *arg)
{
	struct predicomp_client *pc = arg;
	char *buf = malloc(PCP_MAX_PAYLOAD);
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		struct pcp_header h;
		int len = buf ? recv_frame(pc->sock, &h, buf, PCP_MAX_PAYLOAD) : -ENOMEM, rc = 0;
		if (len < 0) {
			pthread_mutex_lock(&pc->lock);
			if (!pc->stop_acked) {
				daemon_lost(pc, len);
				pc->ended_errno = len == -ECONNRESET ? ECONNRESET : -len;
			}
			pthread_cond_broadcast(&pc->cond);
			pthread_mutex_unlock(&pc->lock);
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
					pthread_cond_broadcast(&pc->cond);
					pthread_mutex_unlock(&pc->lock);
					break;
				}
			}
		} else if (h.type == PCP_ERR) {
			/* The daemon ended the session; it restored and unregistered our memory first. */
			pthread_mutex_lock(&pc->lock);
			pc->ended_errno = -decode_err(pc, buf, len);
			pthread_cond_broadcast(&pc->cond);
			pthread_mutex_unlock(&pc->lock);
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
#endif

/* ---- lifecycle ------------------------------------------------------------ */

int predicomp_client_open(struct predicomp_client **out, const char *socket_path)
{
	struct predicomp_client *pc;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	const char *path = socket_path;

	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!path || !*path)
		path = getenv("PREDICOMP_SOCKET");
	if (!path || !*path)
		path = PCP_DEFAULT_SOCKET;
	if (strlen(path) >= sizeof sa.sun_path)
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);

	pc = calloc(1, sizeof *pc);
	if (!pc)
		return -ENOMEM;
	pthread_mutex_init(&pc->lock, NULL);
	pthread_mutex_init(&pc->send_lock, NULL);
	pthread_cond_init(&pc->cond, NULL);
	pc->uffd = -1;
	pc->state = ST_OPEN;
#ifndef PREDICOMP_CLIENT_NO_AGENT
	pc->has_agent = 1;
#endif
	pc->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (pc->sock < 0 || connect(pc->sock, (struct sockaddr *)&sa, sizeof sa)) {
		int e = errno;
		if (pc->sock >= 0)
			close(pc->sock);
		free(pc);
		return -e; /* ENOENT or ECONNREFUSED: no daemon there */
	}
	*out = pc;
	return 0;
}

static void set_timeout(int fd, int seconds)
{
	struct timeval tv = {.tv_sec = seconds};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

int predicomp_client_start(struct predicomp_client *pc)
{
	char buf[512 + PCP_MAX_ERR_TEXT]; /* ACK or ERR */
	struct pcp_hello hello;
	struct pcp_start start;
	struct pcp_header h;
	int rc, len, fd;

	if (!pc)
		return -EINVAL;
	pthread_mutex_lock(&pc->lock);
	if (pc->state != ST_OPEN) {
		set_error(pc, "a session was already started on this client");
		rc = -EALREADY;
		goto out;
	}
	if (!pc->nranges) {
		set_error(pc, "no range registered");
		rc = -ENODATA;
		goto out;
	}
	fd = open_uffd(pc, &start.uffd_features);
	if (fd < 0) {
		rc = fd;
		goto out;
	}
	if ((start.uffd_features & UFFD_FEATURE_MOVE) && pc->has_agent && !pc->staging) {
		/* address space only: pages arrive here just while they are being sampled */
		void *st = mmap(NULL, PCP_STAGING_PAGES * PAGE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (st != MAP_FAILED) {
			madvise(st, PCP_STAGING_PAGES * PAGE, MADV_NOHUGEPAGE);
			madvise(st, PCP_STAGING_PAGES * PAGE, MADV_DONTFORK);
			pc->staging = st;
		}
	}
	hello = (struct pcp_hello){.pid = (uint32_t)getpid(),
				   .nranges = pc->nranges + (pc->staging ? 1 : 0),
				   .caps = PCP_CAP_PREFETCH | (pc->has_agent ? PCP_CAP_AGENT : 0) |
					   (pc->staging ? PCP_CAP_STAGING : 0),
				   .page_size = PAGE};
	rc = send_frame(pc, PCP_HELLO, &hello, sizeof hello, -1);
	for (uint32_t i = 0; !rc && i < pc->nranges; i++) {
		struct pcp_range r = {.addr = pc->ranges[i].addr,
				      .length = pc->ranges[i].len,
				      .flags = pc->ranges[i].flags,
				      .index = i};
		rc = send_frame(pc, PCP_RANGE, &r, sizeof r, -1);
	}
	if (!rc && pc->staging) {
		struct pcp_range r = {.addr = (uintptr_t)pc->staging,
				      .length = PCP_STAGING_PAGES * PAGE,
				      .flags = PCP_RANGE_ANON_PRIVATE | PCP_RANGE_WRITABLE | PCP_RANGE_STAGING,
				      .index = pc->nranges};
		rc = send_frame(pc, PCP_RANGE, &r, sizeof r, -1);
	}
	if (!rc)
		rc = send_frame(pc, PCP_START, &start, sizeof start, fd);
	if (rc) {
		set_error(pc, "sending to the daemon: %s", strerror(-rc));
		close(fd);
		goto out;
	}
	set_timeout(pc->sock, START_TIMEOUT_S);
	len = recv_frame(pc->sock, &h, buf, sizeof buf);
	set_timeout(pc->sock, 0);
	if (len < 0) {
		set_error(pc, "waiting for the daemon: %s", strerror(-len));
		rc = len;
	} else if (h.type == PCP_ERR) {
		rc = decode_err(pc, buf, len);
	} else if (h.type == PCP_ACK && len >= (int)sizeof(struct pcp_ack)) {
		struct pcp_ack ack;
		memcpy(&ack, buf, sizeof ack);
		rc = ack.acked_type == PCP_START ? 0 : -EPROTO;
		pc->session_id = ack.value;
	} else {
		rc = -EPROTO;
	}
	if (rc) {
		close(fd);
		goto out;
	}
	pc->state = ST_RUNNING;
#ifndef PREDICOMP_CLIENT_NO_AGENT
	pc->uffd = fd;
	rc = pthread_create(&pc->agent, NULL, agent_main, pc);
	if (rc) {
		/* The daemon holds the session; without an agent it would wait forever on EVICT. */
		set_error(pc, "cannot start the agent thread: %s", strerror(rc));
		pthread_mutex_unlock(&pc->lock);
		predicomp_client_stop(pc);
		return -rc;
	}
	pc->agent_running = 1;
#else
	close(fd); /* nobody here would watch it; the daemon's copy is the session */
#endif
out:
	pthread_mutex_unlock(&pc->lock);
	return rc;
}

int predicomp_client_prefetch(struct predicomp_client *pc, void *addr, size_t len)
{
	uintptr_t lo = (uintptr_t)addr & ~(uintptr_t)(PAGE - 1);
	uintptr_t hi = ((uintptr_t)addr + len + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
	struct pcp_prefetch p;
	int inside = 0, rc;

	if (!pc || !len || hi < lo)
		return -EINVAL;
	pthread_mutex_lock(&pc->lock);
	if (pc->state != ST_RUNNING) {
		rc = pc->state == ST_ENDED ? -pc->ended_errno : -ENOTCONN;
		goto out;
	}
	for (uint32_t i = 0; i < pc->nranges; i++)
		if (lo >= pc->ranges[i].addr && hi <= pc->ranges[i].addr + pc->ranges[i].len)
			inside = 1;
	if (!inside) {
		set_error(pc, "prefetch %p+%zu is not inside one registered range", addr, len);
		rc = -EINVAL;
		goto out;
	}
	p = (struct pcp_prefetch){.addr = lo, .length = hi - lo};
	rc = send_frame(pc, PCP_PREFETCH, &p, sizeof p, -1);
out:
	pthread_mutex_unlock(&pc->lock);
	return rc;
}

int predicomp_client_stop(struct predicomp_client *pc)
{
	int rc;

	if (!pc)
		return -EINVAL;
	pthread_mutex_lock(&pc->lock);
	if (pc->state != ST_RUNNING) {
		rc = pc->state == ST_OPEN ? -ENOTCONN : 0;
		goto out;
	}
	rc = send_frame(pc, PCP_STOP, NULL, 0, -1);
#ifndef PREDICOMP_CLIENT_NO_AGENT
	{
		struct timespec deadline;
		clock_gettime(CLOCK_REALTIME, &deadline);
		deadline.tv_sec += STOP_TIMEOUT_S;
		while (!rc && !pc->stop_acked && !pc->ended_errno)
			if (pthread_cond_timedwait(&pc->cond, &pc->lock, &deadline) == ETIMEDOUT)
				rc = -ETIMEDOUT;
		if (!rc && !pc->stop_acked)
			rc = -pc->ended_errno;
	}
#else
	if (!rc) {
		char buf[512 + PCP_MAX_ERR_TEXT];
		struct pcp_header h;
		int len;
		set_timeout(pc->sock, STOP_TIMEOUT_S);
		len = recv_frame(pc->sock, &h, buf, sizeof buf);
		if (len < 0)
			rc = len;
		else if (h.type == PCP_ERR)
			rc = decode_err(pc, buf, len);
		else if (h.type != PCP_ACK)
			rc = -EPROTO;
	}
#endif
	if (rc && rc != -ETIMEDOUT)
		set_error(pc, "stop: %s", strerror(-rc));
	pc->state = pc->stop_acked || !rc ? ST_STOPPED : ST_ENDED;
out:
	pthread_mutex_unlock(&pc->lock);
	return rc;
}

int predicomp_client_close(struct predicomp_client *pc)
{
	int rc = 0;
	if (!pc)
		return -EINVAL;
	if (pc->state == ST_RUNNING)
		rc = predicomp_client_stop(pc);
	if (rc == -ETIMEDOUT)
		return rc; /* the agent may still be answering: keep everything alive */
	shutdown(pc->sock, SHUT_RDWR);
#ifndef PREDICOMP_CLIENT_NO_AGENT
	if (pc->agent_running)
		pthread_join(pc->agent, NULL);
#endif
	if (pc->uffd >= 0)
		close(pc->uffd);
	if (pc->staging)
		munmap(pc->staging, PCP_STAGING_PAGES * PAGE);
	close(pc->sock);
	pthread_mutex_destroy(&pc->lock);
	pthread_mutex_destroy(&pc->send_lock);
	pthread_cond_destroy(&pc->cond);
	free(pc);
	return rc;
}

int predicomp_client_session_id(struct predicomp_client *pc, uint64_t *id)
{
	if (!pc || !id)
		return -EINVAL;
	if (pc->state == ST_OPEN)
		return -ENOTCONN;
	*id = pc->session_id;
	return 0;
}

int predicomp_client_has_agent(struct predicomp_client *pc)
{
	return pc ? pc->has_agent : -EINVAL;
}

const char *predicomp_client_last_error(struct predicomp_client *pc)
{
	return pc ? pc->last_error : "no client";
}
