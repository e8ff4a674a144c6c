/* codec.c - page compression (LZ4 blocks), same-filled pages, clocks, tunables. */
#include "internal.h"

#include <lz4.h>
#include <lz4hc.h>
#include <string.h>

struct mc_tunables tun = {
	.codec = MC_CODEC_LZ4,
	.min_savings_pct = 12,
	.spin_us = 0,
	.faultaround_pages = 16,
	.readahead_max_pages = 64,
	.follow_fault_cpu = 1,
	.debug_unsafe_evict = 0,
	.store_cap_bytes = UINT64_MAX,
};

/* Written by Python between operations; word-sized fields, read racily by design. */
void mc_set_tunables(const struct mc_tunables *t)
{
	tun = *t;
}

void mc_get_tunables(struct mc_tunables *t)
{
	*t = tun;
}

static uint64_t clock_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t now_ns(void)
{
	return clock_ns(CLOCK_MONOTONIC);
}

uint64_t thread_cpu_ns(void)
{
	return clock_ns(CLOCK_THREAD_CPUTIME_ID);
}

uint64_t mc_now_ms(void)
{
	return now_ns() / 1000000u;
}

/* Compressed length, or 0 when the page does not fit in `cap` bytes. */
int codec_compress(uint32_t codec, const void *src, void *dst, int cap)
{
	switch (codec) {
	case MC_CODEC_LZ4HC:
		return LZ4_compress_HC(src, dst, PAGE, cap, 9);
	case MC_CODEC_LZ4FAST:
		return LZ4_compress_fast(src, dst, PAGE, cap, 8);
	default:
		return LZ4_compress_default(src, dst, PAGE, cap);
	}
}

/* 0 when the blob decodes to exactly one page. */
int codec_decompress(const void *src, int srclen, void *dst)
{
	return LZ4_decompress_safe(src, dst, srclen, PAGE) == PAGE ? 0 : -1;
}

bool page_fill_word(const void *page, uint64_t *word)
{
	const uint64_t *w = page;
	uint64_t first = w[0];
	for (size_t i = 1; i < PAGE / sizeof *w; i++)
		if (w[i] != first)
			return false;
	*word = first;
	return true;
}

void fill_page(void *dst, uint64_t word)
{
	uint64_t *w = dst;
	if (!word) {
		memset(dst, 0, PAGE);
		return;
	}
	for (size_t i = 0; i < PAGE / sizeof *w; i++)
		w[i] = word;
}
