/*
 * restore.c - putting pages back into the target (caller holds s->lock).
 *
 * A restored page either stays tracked (UFFDIO_COPY_MODE_WP: state clean,
 * the copy is kept, so evicting it again costs no compression) or becomes
 * the target's alone (writable: state resident, the copy is dropped).  A
 * read fault takes the first, a write fault the second: either way the
 * faulting access completes without a second trip through the daemon.
 */
#include "internal.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <string.h>

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
	struct uffdio_range range;
	uint64_t mode;
	int64_t updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

static const uint8_t zero_page[PAGE] __attribute__((aligned(PAGE)));

/*
 * A copy that cannot be decoded means the data is gone.  Make the target
 * fail loudly on that page (SIGBUS) rather than read zeros where its data
 * was; fall back to zeros only on kernels without UFFDIO_POISON.
 */
void lose_page(struct mc_session *s, struct range *r, uint64_t idx)
{
	struct pcs_page *p = page_at(s, r, idx);
	uint64_t addr = r->start + (idx << PAGE_SHIFT);
	struct uffdio_poison po = {.range = {.start = addr, .len = PAGE}};
	int64_t done;

	s->c.restore_fail++;
	trace_add(s, MC_TR_FAIL, r->index, idx, 1, 0, 0);
	if (uffd_ioctl(s, UFFDIO_POISON, &po))
		zero_pages(s, addr, PAGE, &done);
	set_state(r, p, MC_RESIDENT);
	drop_copy(s, r, p);
}

int restore_page(struct mc_session *s, struct range *r, uint64_t idx, bool writable,
		 uint8_t *scratch)
{
	struct pcs_page *p = page_at(s, r, idx);
	uint64_t addr = r->start + (idx << PAGE_SHIFT);
	const void *src = scratch;
	int64_t done;
	int rc;

	if (p->state == MC_ZERO) {
		rc = writable ? copy_pages(s, addr, zero_page, PAGE, false, &done)
			      : zero_pages(s, addr, PAGE, &done);
		if (rc)
			return rc;
		s->c.zero_fill++;
		set_state(r, p, MC_RESIDENT);
		drop_copy(s, r, p); /* the fill word: a mapped zero page takes writes unseen */
		return 0;
	}
	if (p->copy && !(p->flags & MC_PF_SAME) && p->csize == PAGE)
		src = store_ptr(s, p->copy); /* raw: copy straight from the store */
	else if (page_bytes(s, p, scratch)) {
		lose_page(s, r, idx);
		return 0;
	}
	rc = copy_pages(s, addr, src, PAGE, !writable, &done);
	if (rc)
		return rc;
	copied_in(s, r, p, writable);
	return 0;
}

/*
 * An evicted page was copied back in from its copy: count it, and it is
 * clean (the copy kept, write-protected) or, copied in `writable`, the
 * target's alone (a write fault; the end of a session).  A zero page keeps
 * its fill word (0) as its copy.
 */
void copied_in(struct mc_session *s, struct range *r, struct pcs_page *p, bool writable)
{
	if (p->state == MC_ZERO)
		s->c.zero_fill++;
	else
		s->c.restore_ok++;
	if (writable) {
		set_state(r, p, MC_RESIDENT);
		drop_copy(s, r, p);
	} else {
		set_state(r, p, MC_CLEAN);
	}
}

/* How many zero pages start at first+i (before first+count). */
uint64_t zero_run(const struct mc_session *s, const struct range *r, uint64_t first, uint64_t i,
		  uint64_t count)
{
	uint64_t j = i;
	while (j < count && page_state(page_at(s, r, first + j)) == MC_ZERO)
		j++;
	return j - i;
}

/*
 * Restore the evicted pages among [first, first+count): one UFFDIO_COPY per
 * run of evicted pages, one UFFDIO_ZEROPAGE per long run of zero pages.
 * `scratch` holds count pages.  Returns pages restored.
 */
uint64_t restore_run(struct mc_session *s, struct range *r, uint64_t first, uint64_t count,
		     bool final, uint8_t *scratch)
{
	uint64_t restored = 0, i = 0;
	while (i < count) {
		struct pcs_page *p = page_at(s, r, first + i);
		uint64_t j = i, addr = r->start + ((first + i) << PAGE_SHIFT);
		uint64_t zeros = zero_run(s, r, first, i, count);
		int64_t done;

		if (zeros >= ZERO_RUN_MIN) {
			j = i + zeros;
			zero_pages(s, addr, (j - i) << PAGE_SHIFT, &done);
			for (uint64_t k = i; k < i + ((uint64_t)done >> PAGE_SHIFT); k++) {
				struct pcs_page *q = page_at(s, r, first + k);
				set_state(r, q, MC_RESIDENT);
				drop_copy(s, r, q);
			}
			s->c.zero_fill += (uint64_t)done >> PAGE_SHIFT;
		} else if (page_state(p) == MC_COMPRESSED || page_state(p) == MC_ZERO) {
			while (j < count) {
				struct pcs_page *q = page_at(s, r, first + j);
				if (page_state(q) == MC_ZERO) {
					uint64_t z = zero_run(s, r, first, j, count);
					if (z >= ZERO_RUN_MIN)
						break;
					memset(scratch + ((j - i) << PAGE_SHIFT), 0, z << PAGE_SHIFT);
					j += z;
					continue;
				}
				if (page_state(q) != MC_COMPRESSED ||
				    page_bytes(s, q, scratch + ((j - i) << PAGE_SHIFT)))
					break;
				j++;
			}
			if (j == i) { /* the first page cannot be decoded */
				lose_page(s, r, first + i);
				i++;
				continue;
			}
			copy_pages(s, addr, scratch, (j - i) << PAGE_SHIFT, !final, &done);
			for (uint64_t k = i; k < i + ((uint64_t)done >> PAGE_SHIFT); k++)
				copied_in(s, r, page_at(s, r, first + k), final);
		} else {
			i++;
			continue;
		}
		restored += (uint64_t)done >> PAGE_SHIFT;
		if ((uint64_t)done >> PAGE_SHIFT < j - i) {
			/* stopped early (the page is there already, or the mm changed): skip it */
			i += ((uint64_t)done >> PAGE_SHIFT) + 1;
			if (atomic_load(&s->dead))
				break;
		} else {
			i = j;
		}
	}
	return restored;
}

/*
 * A write held during an eviction may go on: give the page back writable,
 * so the write lands on the saved contents.  If the page cannot be put
 * there now (the target's layout is changing), wake the writer instead:
 * it faults again, on a missing page, and is served then.
 */
void release_held(struct mc_session *s, struct range *r, uint64_t idx, uint8_t *scratch)
{
	struct pcs_page *p = page_at(s, r, idx);
	uint64_t addr = r->start + (idx << PAGE_SHIFT);
	struct uffdio_range wake = {.start = addr, .len = PAGE};
	int rc = -EEXIST;

	p->flags &= (uint8_t)~MC_PF_HELD;
	if (p->state == MC_COMPRESSED || p->state == MC_ZERO)
		rc = restore_page(s, r, idx, true, scratch);
	if (rc == -EEXIST) { /* still in the target: lift the protection (which wakes it) */
		set_state(r, p, MC_RESIDENT);
		drop_copy(s, r, p);
		rc = wp_range(s, addr, PAGE, false);
	}
	if (rc)
		uffd_ioctl(s, UFFDIO_WAKE, &wake);
	trace_add(s, MC_TR_RELEASE, r->index, idx, 1, 0, 0);
}
