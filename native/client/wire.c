/* wire.c - protocol frames on the daemon's socket (predicomp_proto.h, memfs(7)). */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

void set_error(struct predicomp_client *pc, const char *fmt, ...)
{
	va_list ap;
	if (!pc)
		return;
	va_start(ap, fmt);
	vsnprintf(pc->last_error, sizeof pc->last_error, fmt, ap);
	va_end(ap);
}

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

/* Receive exactly len bytes; descriptors that ride along are added to fds. */
static int read_all(int fd, void *buf, size_t len, int *fds, int *nfds, int maxfds)
{
	char *p = buf;
	while (len) {
		union {
			char buf[CMSG_SPACE(4 * sizeof(int))];
			struct cmsghdr align;
		} cbuf;
		struct iovec iov = {p, len};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.buf,
				   .msg_controllen = sizeof cbuf.buf};
		ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return -ETIMEDOUT;
			return -errno;
		}
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			for (size_t k = 0; k < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
				int got;
				memcpy(&got, CMSG_DATA(c) + k * sizeof(int), sizeof got);
				if (fds && *nfds < maxfds)
					fds[(*nfds)++] = got;
				else
					close(got); /* not asked for: do not keep it */
			}
		}
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Send one frame on sock; fds (if any) ride along with SCM_RIGHTS. */
int send_frame(struct predicomp_client *pc, int sock, uint16_t type, const void *payload, size_t len,
	       const int *fds, int nfds)
{
	struct pcp_header h = {
		.magic = PCP_MAGIC, .version = PCP_VERSION, .type = type, .length = (uint32_t)len};
	int rc;

	pthread_mutex_lock(&pc->send_lock);
	h.seq = ++pc->seq;
	if (nfds > 0) {
		union {
			char buf[CMSG_SPACE(4 * sizeof(int))];
			struct cmsghdr align;
		} cbuf;
		struct iovec iov[2] = {{&h, sizeof h}, {(void *)payload, len}};
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
		struct cmsghdr *c;
		size_t total = sizeof h + len;
		ssize_t n;

		memset(&cbuf, 0, sizeof cbuf);
		m.msg_control = cbuf.buf;
		m.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
		do
			n = sendmsg(sock, &m, MSG_NOSIGNAL);
		while (n < 0 && errno == EINTR);
		if (n < 0)
			rc = -errno;
		else if ((size_t)n < sizeof h)
			rc = -EIO; /* a Unix stream socket takes the header of a fresh frame whole */
		else if ((size_t)n < total)
			rc = write_all(sock, (const char *)payload + ((size_t)n - sizeof h), total - (size_t)n);
		else
			rc = 0;
	} else {
		rc = write_all(sock, &h, sizeof h);
		if (!rc && len)
			rc = write_all(sock, payload, len);
	}
	pthread_mutex_unlock(&pc->send_lock);
	return rc;
}

/* Read one frame into buf (cap bytes); returns payload length or -errno. */
int recv_frame(int fd, struct pcp_header *h, void *buf, size_t cap, int *fds, int *nfds, int maxfds)
{
	int rc = read_all(fd, h, sizeof *h, fds, nfds, maxfds);
	if (rc)
		return rc;
	if (h->magic != PCP_MAGIC || h->version != PCP_VERSION || h->length > PCP_MAX_PAYLOAD ||
	    h->length > cap)
		return -EPROTO;
	rc = read_all(fd, buf, h->length, fds, nfds, maxfds);
	if (rc)
		return rc;
	return (int)h->length;
}

/* The text of an ERR frame, for last_error. */
int decode_err(struct predicomp_client *pc, const void *buf, int len)
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

void set_timeout(int fd, int seconds)
{
	struct timeval tv = {.tv_sec = seconds};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* The fence page the daemon shares with us (predicomp_store.h); takes fd. */
int map_fence(struct predicomp_client *pc, int fd)
{
	void *m = mmap(NULL, PCS_FENCE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		int e = errno;
		close(fd);
		return -e;
	}
	if (((struct pcs_fence *)m)->magic != PCS_FENCE_MAGIC) {
		munmap(m, PCS_FENCE_SIZE);
		close(fd);
		return -EPROTO;
	}
	pc->fence = m;
	pc->fence_fd = fd;
	return 0;
}

void unmap_fence(struct predicomp_client *pc)
{
	if (pc->fence)
		munmap(pc->fence, PCS_FENCE_SIZE);
	if (pc->fence_fd >= 0)
		close(pc->fence_fd);
	pc->fence = NULL;
	pc->fence_fd = -1;
}
