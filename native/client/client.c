/*
 * libpredicomp_client: the target side of memfs (predicomp_client(3)).
 *
 * The library validates and records ranges, creates the userfaultfd, sends
 * it to the daemon (protocol v2, predicomp_proto.h) and then runs two
 * threads: the agent (agent.c), which does for the daemon what only this
 * process may do to its memory, and the keeper (keeper.c), which serves
 * this process's faults itself from the store the daemon handed over if
 * the daemon dies, until a restarted daemon takes the session back.
 *
 * Built with -DPREDICOMP_CLIENT_NO_AGENT the library has neither: the
 * daemon then runs the session in wp-only mode (pages are compressed and
 * tracked but never freed, so a daemon's death costs nothing: the kernel
 * lifts the write protection when the daemon's userfaultfd goes).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

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
	pc->uffd = pc->store_fd = pc->fence_fd = pc->keeper_efd = -1;
	pc->state = ST_OPEN;
	strcpy(pc->path, path);
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

static void close_fds(const int *fds, int n)
{
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

int predicomp_client_start(struct predicomp_client *pc)
{
	char buf[512 + PCP_MAX_ERR_TEXT]; /* ACK or ERR */
	struct pcp_hello hello;
	struct pcp_start start;
	struct pcp_header h;
	int rc, len, fd, fds[2], nfds = 0;

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
	pc->features = start.uffd_features;
	hello = (struct pcp_hello){.pid = (uint32_t)getpid(),
				   .nranges = pc->nranges + (pc->staging ? 1 : 0),
				   .caps = PCP_CAP_PREFETCH | (pc->has_agent ? PCP_CAP_AGENT : 0) |
					   (pc->staging ? PCP_CAP_STAGING : 0),
				   .page_size = PAGE};
	rc = send_frame(pc, pc->sock, PCP_HELLO, &hello, sizeof hello, NULL, 0);
	for (uint32_t i = 0; !rc && i < pc->nranges; i++) {
		struct pcp_range r = {.addr = pc->ranges[i].addr,
				      .length = pc->ranges[i].len,
				      .flags = pc->ranges[i].flags,
				      .index = i};
		rc = send_frame(pc, pc->sock, PCP_RANGE, &r, sizeof r, NULL, 0);
	}
	if (!rc && pc->staging) {
		struct pcp_range r = {.addr = (uintptr_t)pc->staging,
				      .length = PCP_STAGING_PAGES * PAGE,
				      .flags = PCP_RANGE_ANON_PRIVATE | PCP_RANGE_WRITABLE | PCP_RANGE_STAGING,
				      .index = pc->nranges};
		rc = send_frame(pc, pc->sock, PCP_RANGE, &r, sizeof r, NULL, 0);
	}
	if (!rc)
		rc = send_frame(pc, pc->sock, PCP_START, &start, sizeof start, &fd, 1);
	if (rc) {
		set_error(pc, "sending to the daemon: %s", strerror(-rc));
		close(fd);
		goto out;
	}
	set_timeout(pc->sock, START_TIMEOUT_S);
	len = recv_frame(pc->sock, &h, buf, sizeof buf, fds, &nfds, 2);
	set_timeout(pc->sock, 0);
	if (len < 0) {
		set_error(pc, "waiting for the daemon: %s", strerror(-len));
		rc = len;
	} else if (h.type == PCP_ERR) {
		rc = decode_err(pc, buf, len);
	} else if (h.type == PCP_ACK && len >= (int)sizeof(struct pcp_ack) && nfds == 2) {
		struct pcp_ack ack;
		memcpy(&ack, buf, sizeof ack);
		rc = ack.acked_type == PCP_START ? 0 : -EPROTO;
		pc->session_id = ack.value;
	} else {
		rc = -EPROTO;
	}
	if (rc) {
		close_fds(fds, nfds);
		close(fd);
		goto out;
	}
	pc->state = ST_RUNNING;
	pc->link = LINK_UP;
#ifndef PREDICOMP_CLIENT_NO_AGENT
	pc->uffd = fd;
	pc->store_fd = fds[0];
	pc->keeper_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	rc = map_fence(pc, fds[1]);
	if (!rc && pc->keeper_efd < 0)
		rc = -errno;
	if (!rc)
		rc = -pthread_create(&pc->agent, NULL, agent_main, pc);
	if (!rc) {
		pc->agent_running = 1;
		rc = -pthread_create(&pc->keeper, NULL, keeper_main, pc);
		pc->keeper_running = !rc;
	}
	if (rc) {
		/* The daemon holds the session; without our threads it could not evict nor survive. */
		set_error(pc, "cannot start the agent and keeper threads: %s", strerror(-rc));
		pthread_mutex_unlock(&pc->lock);
		predicomp_client_stop(pc);
		return rc;
	}
#else
	close_fds(fds, nfds); /* nothing is ever evicted: the daemon's death costs us nothing */
	close(fd);            /* nobody here would watch it; the daemon's copy is the session */
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
	if (pc->link != LINK_UP) {
		rc = 0; /* a hint: without a daemon, faults bring pages back anyway */
		goto out;
	}
	p = (struct pcp_prefetch){.addr = lo, .length = hi - lo};
	rc = send_frame(pc, pc->sock, PCP_PREFETCH, &p, sizeof p, NULL, 0);
	if (rc == -EPIPE || rc == -ECONNRESET)
		rc = 0; /* the daemon just went: the keeper takes over */
out:
	pthread_mutex_unlock(&pc->lock);
	return rc;
}

#ifndef PREDICOMP_CLIENT_NO_AGENT
static int wait_link_not(struct predicomp_client *pc, enum link_state l, int seconds)
{
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += seconds;
	while (pc->link == l)
		if (pthread_cond_timedwait(&pc->cond, &pc->lock, &deadline) == ETIMEDOUT)
			return -ETIMEDOUT;
	return 0;
}
#endif

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
#ifndef PREDICOMP_CLIENT_NO_AGENT
	if (pc->link == LINK_UP) {
		rc = send_frame(pc, pc->sock, PCP_STOP, NULL, 0, NULL, 0);
		if (!rc)
			rc = wait_link_not(pc, LINK_UP, STOP_TIMEOUT_S);
		else
			rc = 0; /* the daemon just went: the keeper settles below */
	} else {
		rc = 0;
	}
	if (!rc && pc->link == LINK_LOST) {
		/* no daemon: the keeper gives every page back itself */
		pc->stop_alone = 1;
		keeper_poke(pc);
		rc = wait_link_not(pc, LINK_LOST, STOP_TIMEOUT_S);
		if (!rc)
			rc = pc->stop_alone_rc;
	}
	if (!rc && !pc->stop_acked && pc->ended_errno && !pc->stop_alone)
		rc = -pc->ended_errno;
#else
	rc = send_frame(pc, pc->sock, PCP_STOP, NULL, 0, NULL, 0);
	if (!rc) {
		char buf[512 + PCP_MAX_ERR_TEXT];
		struct pcp_header h;
		int len;
		set_timeout(pc->sock, STOP_TIMEOUT_S);
		len = recv_frame(pc->sock, &h, buf, sizeof buf, NULL, NULL, 0);
		if (len < 0)
			rc = len;
		else if (h.type == PCP_ERR)
			rc = decode_err(pc, buf, len);
		else if (h.type != PCP_ACK)
			rc = -EPROTO;
		else
			pc->stop_acked = 1;
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
	pthread_mutex_lock(&pc->lock);
	if (pc->link != LINK_ENDED)
		pc->link = LINK_ENDED; /* the threads leave */
	pthread_cond_broadcast(&pc->cond);
	pthread_mutex_unlock(&pc->lock);
#ifndef PREDICOMP_CLIENT_NO_AGENT
	keeper_poke(pc);
	if (pc->agent_running)
		pthread_join(pc->agent, NULL);
	if (pc->keeper_running)
		pthread_join(pc->keeper, NULL);
#endif
	if (pc->uffd >= 0)
		close(pc->uffd);
	if (pc->store_fd >= 0)
		close(pc->store_fd);
	unmap_fence(pc);
	if (pc->keeper_efd >= 0)
		close(pc->keeper_efd);
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
	pthread_mutex_lock(&pc->lock);
	*id = pc->session_id;
	pthread_mutex_unlock(&pc->lock);
	return 0;
}

int predicomp_client_has_agent(struct predicomp_client *pc)
{
	return pc ? pc->has_agent : -EINVAL;
}

int predicomp_client_stats(struct predicomp_client *pc, struct predicomp_client_stats *out)
{
	if (!pc || !out)
		return -EINVAL;
	pthread_mutex_lock(&pc->lock);
	*out = (struct predicomp_client_stats){.takeovers = pc->takeovers,
					       .agent_faults = pc->agent_faults,
					       .resumes = pc->resumes,
					       .alone = pc->link == LINK_LOST};
	pthread_mutex_unlock(&pc->lock);
	return 0;
}

const char *predicomp_client_last_error(struct predicomp_client *pc)
{
	return pc ? pc->last_error : "no client";
}
