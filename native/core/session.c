/* session.c - a target's ranges and page tables, their lifecycle and inspection. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- page helpers (caller holds s->lock) ---------------------------------- */

struct range *range_of(struct mc_session *s, uint64_t addr)
{
	uint32_t lo = 0, hi = s->nranges;
	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		struct range *r = s->by_addr[mid];
		if (addr < r->start)
			hi = mid;
		else if (addr >= r->start + (r->npages << PAGE_SHIFT))
			lo = mid + 1;
		else
			return r;
	}
	return NULL;
}

void set_state(struct range *r, struct page *p, uint8_t state)
{
	r->nstate[p->state]--;
	r->nstate[state]++;
	p->state = state;
}

static void account_copy(struct mc_session *s, struct range *r, const struct page *p, int sign)
{
	uint64_t used = p->flags & MC_PF_SAME ? 0 : store_slot_size(p->csize);
	if (sign > 0) {
		s->c.store_pages++;
		s->c.store_bytes_compressed += p->csize;
		s->c.store_bytes_used += used;
		r->bytes_compressed += p->csize;
		if (s->c.store_bytes_used > s->c.store_bytes_peak)
			s->c.store_bytes_peak = s->c.store_bytes_used;
	} else {
		s->c.store_pages--;
		s->c.store_bytes_compressed -= p->csize;
		s->c.store_bytes_used -= used;
		r->bytes_compressed -= p->csize;
	}
	s->c.store_bytes_logical = s->c.store_pages * PAGE;
}

static bool has_copy(const struct page *p)
{
	return p->copy || (p->flags & MC_PF_SAME);
}

void drop_copy(struct mc_session *s, struct range *r, struct page *p)
{
	if (!has_copy(p))
		return;
	account_copy(s, r, p, -1);
	if (p->flags & MC_PF_PINNED)
		p->flags &= (uint8_t)~MC_PF_PINNED; /* its pinner frees the blob (unpin_copy in ops.c) */
	else if (!(p->flags & MC_PF_SAME))
		store_free(p->copy, p->csize);
	if (p->recompressed)
		s->c.store_pages_recompressed--;
	p->copy = 0;
	p->csize = 0;
	p->recompressed = 0;
	p->flags &= (uint8_t)~MC_PF_SAME;
}

void mark_recompressed(struct mc_session *s, struct page *p)
{
	if (!p->recompressed)
		s->c.store_pages_recompressed++;
	p->recompressed = 1;
}

void set_copy(struct mc_session *s, struct range *r, struct page *p, uint64_t copy,
	      uint16_t csize, bool same)
{
	drop_copy(s, r, p);
	p->copy = copy;
	p->csize = csize;
	if (same)
		p->flags |= MC_PF_SAME;
	account_copy(s, r, p, +1);
}

/* The page's logical contents from its copy. */
int page_bytes(const struct page *p, void *dst)
{
	if (p->flags & MC_PF_SAME) {
		fill_page(dst, p->copy);
		return 0;
	}
	if (!p->copy)
		return -1;
	if (p->csize == PAGE) {
		memcpy(dst, store_ptr(p->copy), PAGE);
		return 0;
	}
	return codec_decompress(store_ptr(p->copy), p->csize, dst);
}

void notify(struct mc_session *s)
{
	if (atomic_exchange(&s->notify_armed, 0)) {
		uint64_t one = 1;
		if (write(s->notify_fd, &one, sizeof one) < 0) {
			/* the counter is saturated: Python has not read it yet, it will */
		}
	}
}

void trace_add(struct mc_session *s, uint16_t kind, uint32_t range, uint64_t page,
	       uint64_t count, uint64_t latency_ns, uint32_t tid)
{
	struct mc_trace_event *e = &s->trace[s->trace_head % TRACE_CAP];
	*e = (struct mc_trace_event){.seq = s->trace_head,
				     .ts_ns = now_ns(),
				     .page = page,
				     .count = count,
				     .latency_ns = latency_ns,
				     .range = range,
				     .tid = tid,
				     .kind = kind};
	s->trace_head++;
	notify(s);
}

/* 8 sub-buckets per power of two: bucket = 8*log2(ns) + next three bits. */
void hist_add(struct mc_session *s, uint64_t ns)
{
	unsigned b;
	if (ns < 8) {
		b = (unsigned)ns;
	} else {
		unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
		b = msb * 8u + (unsigned)((ns >> (msb - 3)) & 7u);
	}
	if (b >= MC_HIST_BUCKETS)
		b = MC_HIST_BUCKETS - 1;
	s->hist[b]++;
	s->c.fault_latency_ns_total += ns;
	if (ns > s->c.fault_latency_ns_max)
		s->c.fault_latency_ns_max = ns;
}

/* ---- uffd ioctls ------------------------------------------------------------ */

__thread uint64_t *answer_issued_ns;

int uffd_ioctl(struct mc_session *s, unsigned long req, void *arg)
{
	if (answer_issued_ns && !*answer_issued_ns)
		*answer_issued_ns = now_ns();
	if (ioctl(s->uffd, req, arg) == 0)
		return 0;
	int e = errno;
	if (e == EAGAIN) {
		s->c.uffd_eagain++;
	} else {
		s->c.uffd_ioctl_fail++;
		if (e == ESRCH || e == ENOENT) {
			/* the target's mm is gone: nothing left to serve */
			atomic_store(&s->dead, 1);
			notify(s);
		}
	}
	return -e;
}

int wp_range(struct mc_session *s, uint64_t addr, uint64_t len, bool protect)
{
	struct uffdio_writeprotect wp = {.range = {.start = addr, .len = len},
					 .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
	return uffd_ioctl(s, UFFDIO_WRITEPROTECT, &wp);
}

/* UFFDIO_COPY; *done gets the bytes copied even when it fails part way. */
int copy_pages(struct mc_session *s, uint64_t dst, const void *src, uint64_t len, bool wp,
	       int64_t *done)
{
	struct uffdio_copy c = {.dst = dst,
				.src = (uint64_t)(uintptr_t)src,
				.len = len,
				.mode = wp ? UFFDIO_COPY_MODE_WP : 0};
	int rc = uffd_ioctl(s, UFFDIO_COPY, &c);
	*done = rc ? (c.copy > 0 ? c.copy : 0) : (int64_t)len;
	return rc;
}

int zero_pages(struct mc_session *s, uint64_t dst, uint64_t len, int64_t *done)
{
	struct uffdio_zeropage z = {.range = {.start = dst, .len = len}};
	int rc = uffd_ioctl(s, UFFDIO_ZEROPAGE, &z);
	*done = rc ? (z.zeropage > 0 ? z.zeropage : 0) : (int64_t)len;
	return rc;
}

/* present[i] = 1 if the page is in memory or swap (not a hole) */
int pagemap_present(struct mc_session *s, uint64_t addr, uint64_t npages, uint8_t *present)
{
	uint64_t buf[512];
	for (uint64_t done = 0; done < npages;) {
		uint64_t n = npages - done < 512 ? npages - done : 512;
		ssize_t got = pread(s->pagemap_fd, buf, n * 8, (off_t)(((addr >> PAGE_SHIFT) + done) * 8));
		if (got < 0)
			return -errno;
		if ((uint64_t)got != n * 8)
			return -EIO;
		for (uint64_t i = 0; i < n; i++)
			present[done + i] = (buf[i] >> 62) & 3 ? 1 : 0; /* bit 63 present, 62 swapped */
		done += n;
	}
	return 0;
}

/* ---- lifecycle --------------------------------------------------------------- */

static int cmp_start(const void *a, const void *b)
{
	const struct range *x = *(struct range *const *)a, *y = *(struct range *const *)b;
	return x->start < y->start ? -1 : x->start > y->start;
}

struct mc_session *mc_session_new(int uffd, int pid, uint32_t nranges, const uint64_t *addrs,
				  const uint64_t *lengths, int *err)
{
	struct mc_session *s = calloc(1, sizeof *s);
	char path[64];

	*err = ENOMEM;
	if (!s)
		return NULL;
	s->uffd = uffd;
	s->pid = pid;
	s->pagemap_fd = s->notify_fd = s->stop_fd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_rwlock_init(&s->gate, NULL);
	{
		pthread_rwlockattr_t a;
		pthread_rwlockattr_init(&a);
		pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&s->events_gate, &a);
		pthread_rwlockattr_destroy(&a);
	}
	s->ranges = calloc(nranges, sizeof *s->ranges);
	s->by_addr = calloc(nranges, sizeof *s->by_addr);
	if (!s->ranges || !s->by_addr)
		goto fail;
	for (uint32_t i = 0; i < nranges; i++) {
		struct range *r = &s->ranges[i];
		r->start = addrs[i];
		r->npages = lengths[i] >> PAGE_SHIFT;
		r->index = i;
		r->pages = mmap(NULL, r->npages * sizeof(struct page), PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (r->pages == MAP_FAILED) {
			r->pages = NULL;
			goto fail;
		}
		r->nstate[MC_UNTOUCHED] = r->npages;
		s->by_addr[i] = r;
		s->nranges = i + 1;
	}
	qsort(s->by_addr, nranges, sizeof *s->by_addr, cmp_start);
	snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
	s->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (s->pagemap_fd < 0) {
		*err = errno;
		goto fail;
	}
	s->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->notify_fd < 0 || s->stop_fd < 0) {
		*err = errno;
		goto fail;
	}
	*err = 0;
	return s;
fail:
	s->uffd = -1; /* the caller still owns it */
	mc_session_free(s);
	return NULL;
}

/*
 * Register every range for missing and write-protect faults, then learn
 * from pagemap which pages the target has populated.  Reading pagemap
 * after registering is what makes it exact: from then on no page appears
 * without a fault that we serve.
 */
int mc_session_register(struct mc_session *s, char *errbuf, size_t errlen)
{
	const uint64_t need = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE) |
			      (1ULL << _UFFDIO_WRITEPROTECT) | (1ULL << _UFFDIO_WAKE);
	uint64_t now = mc_now_ms();

	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = &s->ranges[i];
		struct uffdio_register reg = {
			.range = {.start = r->start, .len = r->npages << PAGE_SHIFT},
			.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP};
		uint8_t *present;
		int rc;

		if (ioctl(s->uffd, UFFDIO_REGISTER, &reg)) {
			int e = errno;
			snprintf(errbuf, errlen, "UFFDIO_REGISTER of range %u (0x%llx+%llu): %s%s", i,
				 (unsigned long long)r->start,
				 (unsigned long long)(r->npages << PAGE_SHIFT), strerror(e),
				 e == EBUSY ? " (already registered with another userfaultfd)" : "");
			return -e;
		}
		if ((reg.ioctls & need) != need) {
			snprintf(errbuf, errlen, "range %u does not support copy/zeropage/write-protect", i);
			return -EOPNOTSUPP;
		}
		present = malloc(r->npages);
		if (!present)
			return -ENOMEM;
		rc = pagemap_present(s, r->start, r->npages, present);
		if (rc) {
			free(present);
			snprintf(errbuf, errlen, "reading /proc/%d/pagemap: %s", s->pid, strerror(-rc));
			return rc;
		}
		pthread_mutex_lock(&s->lock);
		for (uint64_t j = 0; j < r->npages; j++) {
			r->pages[j].stamp_ms = (uint32_t)now;
			if (present[j])
				set_state(r, &r->pages[j], MC_RESIDENT);
		}
		pthread_mutex_unlock(&s->lock);
		free(present);
	}
	if (s->staging_npages) {
		/* where the sampler parks pages; moving pages in and out needs UFFDIO_MOVE */
		struct uffdio_register reg = {
			.range = {.start = s->staging_start, .len = (uint64_t)s->staging_npages << PAGE_SHIFT},
			.mode = UFFDIO_REGISTER_MODE_MISSING};
		if (ioctl(s->uffd, UFFDIO_REGISTER, &reg) || !(reg.ioctls & (1ULL << 0x05))) {
			free(s->slots);
			free(s->free_slots);
			s->slots = NULL;
			s->free_slots = NULL;
			s->staging_npages = s->nfree_slots = 0; /* no sampling in this session */
		}
	}
	return 0;
}

int mc_session_start(struct mc_session *s)
{
	int rc = pthread_create(&s->fault_thread, NULL, fault_main, s);
	if (rc)
		return -rc;
	s->fault_thread_running = true;
	return 0;
}

void mc_session_stop(struct mc_session *s)
{
	uint64_t one = 1;
	if (!s->fault_thread_running)
		return;
	atomic_store(&s->stopping, 1);
	if (write(s->stop_fd, &one, sizeof one) < 0) {
		/* cannot happen with a fresh eventfd; the thread also polls `stopping` */
	}
	pthread_join(s->fault_thread, NULL);
	s->fault_thread_running = false;
}

int mc_session_unregister(struct mc_session *s)
{
	int rc = 0;
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = &s->ranges[i];
		struct uffdio_range ur = {.start = r->start, .len = r->npages << PAGE_SHIFT};
		if (ioctl(s->uffd, UFFDIO_UNREGISTER, &ur) && !rc)
			rc = -errno;
	}
	if (s->staging_npages) {
		struct uffdio_range ur = {.start = s->staging_start,
					  .len = (uint64_t)s->staging_npages << PAGE_SHIFT};
		ioctl(s->uffd, UFFDIO_UNREGISTER, &ur);
	}
	return rc;
}

void mc_session_free(struct mc_session *s)
{
	if (!s)
		return;
	mc_session_stop(s);
	for (uint32_t i = 0; i < s->nranges; i++) {
		struct range *r = &s->ranges[i];
		if (!r->pages)
			continue;
		for (uint64_t j = 0; j < r->npages; j++)
			drop_copy(s, r, &r->pages[j]);
		munmap(r->pages, r->npages * sizeof(struct page));
	}
	free(s->ranges);
	free(s->by_addr);
	free(s->slots);
	free(s->free_slots);
	if (s->uffd >= 0)
		close(s->uffd);
	if (s->pagemap_fd >= 0)
		close(s->pagemap_fd);
	if (s->notify_fd >= 0)
		close(s->notify_fd);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	pthread_mutex_destroy(&s->lock);
	pthread_rwlock_destroy(&s->gate);
	pthread_rwlock_destroy(&s->events_gate);
	free(s);
}

int mc_session_notify_fd(struct mc_session *s)
{
	return s->notify_fd;
}

void mc_session_arm_notify(struct mc_session *s)
{
	atomic_store(&s->notify_armed, 1);
}

int mc_session_dead(struct mc_session *s)
{
	return atomic_load(&s->dead);
}

void mc_session_counters(struct mc_session *s, struct mc_counters *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->c;
	pthread_mutex_unlock(&s->lock);
}

void mc_session_hist(struct mc_session *s, uint64_t *out)
{
	pthread_mutex_lock(&s->lock);
	memcpy(out, s->hist, sizeof s->hist);
	pthread_mutex_unlock(&s->lock);
}

uint32_t mc_session_nranges(struct mc_session *s)
{
	return s->nranges;
}

int mc_range_get(struct mc_session *s, uint32_t range, struct mc_range_info *out)
{
	struct range *r;
	if (range >= s->nranges)
		return -ERANGE;
	r = &s->ranges[range];
	pthread_mutex_lock(&s->lock);
	out->start = r->start;
	out->npages = r->npages;
	memcpy(out->nstate, r->nstate, sizeof r->nstate);
	out->bytes_compressed = r->bytes_compressed;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int mc_addr_to_page(struct mc_session *s, uint64_t addr, uint32_t *range, uint64_t *page)
{
	struct range *r;
	pthread_mutex_lock(&s->lock);
	r = range_of(s, addr);
	if (r) {
		*range = r->index;
		*page = (addr - r->start) >> PAGE_SHIFT;
	}
	pthread_mutex_unlock(&s->lock);
	return r ? 0 : -ERANGE;
}

/* ---- inspection ----------------------------------------------------------- */

static int check_span(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count)
{
	if (range >= s->nranges || first > s->ranges[range].npages ||
	    count > s->ranges[range].npages - first)
		return -ERANGE;
	return 0;
}

int mc_page_info(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count,
		 struct mc_page_info *out)
{
	uint32_t now = (uint32_t)mc_now_ms();
	int rc = check_span(s, range, first, count);
	if (rc)
		return rc;
	pthread_mutex_lock(&s->lock);
	for (uint64_t i = 0; i < count; i++) {
		const struct page *p = &s->ranges[range].pages[first + i];
		out[i] = (struct mc_page_info){.state = p->flags & MC_PF_SAMPLED ? MC_SAMPLED : p->state,
					       .flags = p->flags,
					       .csize = (p->flags & MC_PF_SAME) ? 0 : p->csize,
					       .age_ms = now - page_stamp(s, p)};
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/*
 * The logical bytes of pages, whatever their state, without faulting the
 * target: copies come from the store, untouched pages are zeros, and only
 * pages the target holds (resident, clean) are read from it, under the
 * gate that keeps them from being evicted meanwhile.
 */
int mc_read_data(struct mc_session *s, uint32_t range, uint64_t first, uint64_t count, void *buf)
{
	enum { BATCH = 64 };
	struct iovec local[BATCH], remote[BATCH];
	int rc = check_span(s, range, first, count);
	struct range *r;

	if (rc)
		return rc;
	r = &s->ranges[range];
	for (uint64_t pos = 0; pos < count; pos += BATCH) {
		uint64_t n = count - pos < BATCH ? count - pos : BATCH;
		int nio = 0;
		pthread_rwlock_rdlock(&s->gate);
		pthread_mutex_lock(&s->lock);
		for (uint64_t i = 0; i < n; i++) {
			struct page *p = &r->pages[first + pos + i];
			char *dst = (char *)buf + (pos + i) * PAGE;
			if (p->state == MC_RESIDENT || p->state == MC_CLEAN) {
				/* a sampled page waits in its staging slot */
				uint64_t addr = p->flags & MC_PF_SAMPLED
						    ? sampled_page_addr(s, r, first + pos + i)
						    : r->start + ((first + pos + i) << PAGE_SHIFT);
				if (nio && (char *)local[nio - 1].iov_base + local[nio - 1].iov_len == dst &&
				    (uint64_t)(uintptr_t)remote[nio - 1].iov_base + remote[nio - 1].iov_len == addr) {
					local[nio - 1].iov_len += PAGE;
					remote[nio - 1].iov_len += PAGE;
				} else {
					local[nio] = (struct iovec){dst, PAGE};
					remote[nio] = (struct iovec){(void *)(uintptr_t)addr, PAGE};
					nio++;
				}
			} else if (p->state == MC_UNTOUCHED || p->state == MC_ZERO || page_bytes(p, dst)) {
				memset(dst, 0, PAGE);
			}
		}
		pthread_mutex_unlock(&s->lock);
		if (nio) {
			ssize_t got = process_vm_readv(s->pid, local, (unsigned long)nio, remote,
						       (unsigned long)nio, 0);
			if (got < 0)
				rc = -errno;
		}
		pthread_rwlock_unlock(&s->gate);
		if (rc)
			return rc;
	}
	return 0;
}

static inline unsigned age_bucket(uint32_t age)
{
	return age ? 32u - (unsigned)__builtin_clz(age) : 0u; /* 0..32 */
}

/* Is the page in one of `state_mask` states, idle at least min_age_ms, without any of `skip_flags`
 * (MC_PF_* and MC_SKIP_RECOMPRESSED)? */
static bool page_selected(struct mc_session *s, const struct page *p, uint32_t state_mask,
			  uint32_t min_age_ms, uint32_t skip_flags, uint32_t now, uint32_t *age)
{
	*age = now - page_stamp(s, p);
	return (state_mask >> p->state) & 1 && *age >= min_age_ms && !(p->flags & skip_flags) &&
	       !((skip_flags & MC_SKIP_RECOMPRESSED) && p->recompressed);
}

/* The pages page_selected() takes, by age class (caller holds s->lock). */
static void age_hist(struct mc_session *s, uint32_t lo, uint32_t hi, uint32_t state_mask,
		     uint32_t min_age_ms, uint32_t skip_flags, uint32_t now, uint64_t *hist)
{
	uint32_t age;
	for (uint32_t ri = lo; ri < hi; ri++)
		for (uint64_t j = 0; j < s->ranges[ri].npages; j++)
			if (page_selected(s, &s->ranges[ri].pages[j], state_mask, min_age_ms, skip_flags, now,
					  &age))
				hist[age_bucket(age)]++;
}

int mc_age_hist(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		uint32_t skip_flags, uint64_t *out)
{
	uint32_t lo = range < 0 ? 0 : (uint32_t)range, hi = range < 0 ? s->nranges : (uint32_t)range + 1;
	if (range >= 0 && (uint32_t)range >= s->nranges)
		return -ERANGE;
	memset(out, 0, MC_AGE_CLASSES * sizeof *out);
	pthread_mutex_lock(&s->lock);
	age_hist(s, lo, hi, state_mask, min_age_ms, skip_flags, (uint32_t)mc_now_ms(), out);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/*
 * Runs of pages in `state_mask` states idle at least min_age_ms, without any
 * of `skip_flags` (as page_selected).  With a max_pages limit, `order` > 0
 * takes the oldest first and < 0 the youngest first (by power-of-two age
 * class; address order within the class that straddles the limit); 0 takes
 * them in address order.
 */
int64_t mc_select(struct mc_session *s, int32_t range, uint32_t state_mask, uint32_t min_age_ms,
		  uint32_t skip_flags, uint64_t max_pages, int order, struct mc_run *out, size_t cap,
		  uint64_t *npages)
{
	uint32_t now = (uint32_t)mc_now_ms();
	uint64_t hist[MC_AGE_CLASSES] = {0}, taken = 0;
	int cut = -1; /* the age class partly taken; classes beyond it (in `order`) are all taken */
	uint64_t in_cut_allowed = 0;
	int64_t nout = 0;
	uint32_t lo = range < 0 ? 0 : (uint32_t)range, hi = range < 0 ? s->nranges : (uint32_t)range + 1;

	if (range >= 0 && (uint32_t)range >= s->nranges)
		return -ERANGE;
	if (!max_pages)
		max_pages = UINT64_MAX;
	pthread_mutex_lock(&s->lock);
	if (order && max_pages != UINT64_MAX) {
		uint64_t acc = 0;
		age_hist(s, lo, hi, state_mask, min_age_ms, skip_flags, now, hist); /* what the pass below takes */
		for (int k = 0; k < MC_AGE_CLASSES && acc < max_pages; k++) {
			cut = order > 0 ? MC_AGE_CLASSES - 1 - k : k;
			acc += hist[cut];
		}
		in_cut_allowed = cut >= 0 ? hist[cut] - (acc > max_pages ? acc - max_pages : 0) : 0;
	}
	for (uint32_t ri = lo; ri < hi && taken < max_pages; ri++) {
		struct range *r = &s->ranges[ri];
		for (uint64_t j = 0; j < r->npages && taken < max_pages; j++) {
			uint32_t age;
			if (!page_selected(s, &r->pages[j], state_mask, min_age_ms, skip_flags, now, &age))
				continue;
			if (cut >= 0) {
				int b = (int)age_bucket(age);
				if (order > 0 ? b < cut : b > cut)
					continue;
				if (b == cut) {
					if (!in_cut_allowed)
						continue;
					in_cut_allowed--;
				}
			}
			if (nout && out[nout - 1].range == ri && out[nout - 1].first + out[nout - 1].count == j) {
				out[nout - 1].count++;
			} else {
				if ((size_t)nout == cap)
					goto full;
				out[nout++] = (struct mc_run){.range = ri, .first = j, .count = 1};
			}
			taken++;
		}
	}
full:
	pthread_mutex_unlock(&s->lock);
	*npages = taken;
	return nout;
}

size_t mc_trace_read(struct mc_session *s, uint64_t *cursor, struct mc_trace_event *out,
		     size_t cap, uint64_t *missed)
{
	size_t n = 0;
	pthread_mutex_lock(&s->lock);
	*missed = 0;
	if (s->trace_head > TRACE_CAP && *cursor < s->trace_head - TRACE_CAP) {
		*missed = s->trace_head - TRACE_CAP - *cursor;
		*cursor = s->trace_head - TRACE_CAP;
	}
	while (*cursor < s->trace_head && n < cap)
		out[n++] = s->trace[(*cursor)++ % TRACE_CAP];
	pthread_mutex_unlock(&s->lock);
	return n;
}
