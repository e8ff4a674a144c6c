/*
 * pagemap.c - what the kernel says of a target's pages, from its
 * /proc/PID/pagemap (opened once per session: the file stays bound to the
 * target's memory, whatever becomes of its pid).
 */
#include "internal.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* PAGEMAP_SCAN (Linux 6.7), for headers that predate it. */
struct mc_page_region {
	uint64_t start, end, categories;
};
struct mc_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
		category_mask, category_anyof_mask, return_mask;
};
#define MC_PAGEMAP_SCAN _IOWR('f', 16, struct mc_pm_scan_arg)
#define MC_PAGE_IS_WRITTEN (1u << 1) /* not uffd write-protected */
#define MC_PAGE_IS_PRESENT (1u << 3)
#define MC_PAGE_IS_SWAPPED (1u << 4)

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

/*
 * Call fn for each run of pages in memory or swap in [addr, addr + len),
 * telling whether they are write-protected (uffd-wp).  PAGEMAP_SCAN skips
 * holes without a word per page, so a sparse terabyte costs what it holds.
 * Kernels without it get the per-page words, in batches.
 */
int pagemap_scan(int pagemap_fd, uint64_t addr, uint64_t len,
		 int (*fn)(void *ctx, const struct pm_run *run), void *ctx)
{
	struct mc_page_region reg[256];
	uint64_t end = addr + len, at = addr;

	while (at < end) {
		struct mc_pm_scan_arg a = {.size = sizeof a,
					   .start = at,
					   .end = end,
					   .vec = (uint64_t)(uintptr_t)reg,
					   .vec_len = 256,
					   .category_anyof_mask = MC_PAGE_IS_PRESENT | MC_PAGE_IS_SWAPPED,
					   .return_mask = MC_PAGE_IS_WRITTEN};
		long n = ioctl(pagemap_fd, MC_PAGEMAP_SCAN, &a);
		if (n < 0 && (errno == ENOTTY || errno == EINVAL))
			break; /* an older kernel: the slow way below */
		if (n < 0)
			return -errno;
		for (long i = 0; i < n; i++) {
			struct pm_run run = {reg[i].start, reg[i].end, (reg[i].categories & MC_PAGE_IS_WRITTEN) != 0};
			int rc = fn(ctx, &run);
			if (rc)
				return rc;
		}
		if (a.walk_end <= at)
			return -EIO;
		at = a.walk_end;
	}
	while (at < end) {
		uint64_t buf[512], n = (end - at) >> PAGE_SHIFT;
		ssize_t got;
		if (n > 512)
			n = 512;
		got = pread(pagemap_fd, buf, n * 8, (off_t)((at >> PAGE_SHIFT) * 8));
		if (got < 0)
			return -errno;
		if ((uint64_t)got != n * 8)
			return -EIO;
		for (uint64_t i = 0; i < n;) {
			uint64_t j = i;
			bool present = (buf[i] >> 62) & 3, written = !((buf[i] >> 57) & 1);
			while (j < n && (bool)((buf[j] >> 62) & 3) == present && (bool)!((buf[j] >> 57) & 1) == written)
				j++;
			if (present) {
				struct pm_run run = {at + (i << PAGE_SHIFT), at + (j << PAGE_SHIFT), written};
				int rc = fn(ctx, &run);
				if (rc)
					return rc;
			}
			i = j;
		}
		at += n << PAGE_SHIFT;
	}
	return 0;
}
