/*
 * memfs-target: a target process for tests and benchmarks.
 *
 * Fills an anonymous region with a deterministic data set, registers it
 * with the daemon through libpredicomp_client, prints one READY line and
 * then obeys commands on stdin, one per line, answering one line each:
 *
 *   verify                 compare every page with its expected contents
 *   rss                    RssAnon of this process, in kB
 *   write PAGE BYTE        fill a page with BYTE (updates the expectation)
 *   discard FIRST COUNT    madvise(MADV_DONTNEED) those pages: they read as zeros from now on
 *   stress SECONDS THREADS writers put sequence numbers in random pages,
 *                          then every page is checked for each writer's last value
 *   touch seq|rand N SEED [THINK_US]
 *                          read all pages in order (seq) or N distinct ones in random
 *                          order (rand); per-touch latency in ns, and slow= the touches
 *                          over SLOW_NS, of which slow_tick= spanned a timer tick (with
 *                          --tick-hz); with THINK_US, spin that long after each touch
 *                          (a program that works between faults)
 *   prefetch FIRST COUNT   predicomp_client_prefetch on those pages
 *   pageout                madvise(MADV_PAGEOUT) on the whole region (the kernel's swap,
 *                          e.g. zram, takes it); answers the time it took
 *   hot FIRST COUNT        a thread keeps using those pages (reads and rewrites a word
 *                          of each, every few ms) without changing them; "hot off" stops it
 *   bare N SEED            the floor under any pager here: N random reads like touch rand,
 *                          on a fresh region of the same size served by a bare userfaultfd
 *                          handler in a child process (one constant page, nothing else),
 *                          both pinned to this CPU; only with --no-start
 *   gaps SECONDS           spin, reading the clock, and report the gaps over 10 us: how
 *                          often, and for how long, the machine takes a busy CPU away
 *                          (timer ticks, the host); a fault that meets one is that much slower
 *   stats                  what the library did without a daemon: takeovers, faults it
 *                          served itself, resumes, and whether it is alone now
 *   stop | exit
 *
 * MEMFS_TARGET_DEBUG=1 makes stress report the first lost write of each writer on stderr.
 *
 * Data sets (4 KiB pages): zero, text (word records), ints (small
 * integers), random (incompressible), mixed (the four in turn), none
 * (nothing written: the pages stay untouched), or --data FILE: the file's
 * pages in turn (repeated if the file is shorter than the region).
 */
#define _GNU_SOURCE
#include "predicomp_client.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

enum kind { K_ZERO, K_TEXT, K_INTS, K_RANDOM };

static uint8_t *region;
static size_t npages;
static uint64_t *expect; /* FNV-1a of each page's expected contents */
static uint64_t seed = 1;
static const char *pattern = "mixed";
static uint8_t *data_file; /* --data: the pages of a file */
static size_t data_pages;
static struct predicomp_client *pc;

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t fnv(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	const uint64_t *w = (const uint64_t *)p;
	for (size_t i = 0; i < n / 8; i++)
		h = (h ^ w[i]) * 0x100000001b3ull;
	return h;
}

static enum kind kind_of(size_t i)
{
	if (!strcmp(pattern, "zero"))
		return K_ZERO;
	if (!strcmp(pattern, "text"))
		return K_TEXT;
	if (!strcmp(pattern, "ints"))
		return K_INTS;
	if (!strcmp(pattern, "random"))
		return K_RANDOM;
	return (enum kind)(i % 4);
}

static void gen_page(uint8_t *p, size_t i)
{
	static const char *words[] = {"alpha", "bravo", "charlie", "delta", "echo", "foxtrot",
				      "golf", "hotel", "india", "juliet", "kilo", "lima",
				      "mike", "november", "oscar", "papa"};
	uint64_t st = seed * 0x9e3779b97f4a7c15ull ^ (i * 0x100000001b3ull);
	if (data_file) {
		memcpy(p, data_file + (i % data_pages) * PAGE, PAGE);
		return;
	}
	switch (kind_of(i)) {
	case K_ZERO:
		memset(p, 0, PAGE);
		break;
	case K_TEXT: {
		size_t off = 0;
		while (off < PAGE) {
			char line[128];
			uint64_t r = splitmix(&st);
			int n = snprintf(line, sizeof line, "id=%08" PRIu64 " name=%s %s city=%s qty=%u\n",
					 r % 100000000u, words[r >> 40 & 15], words[r >> 44 & 15],
					 words[r >> 48 & 15], (unsigned)(r >> 52 & 1023));
			size_t take = (size_t)n < PAGE - off ? (size_t)n : PAGE - off;
			memcpy(p + off, line, take);
			off += take;
		}
		break;
	}
	case K_INTS: {
		uint32_t *w = (uint32_t *)p;
		for (size_t k = 0; k < PAGE / 4; k++)
			w[k] = (uint32_t)(splitmix(&st) % 1000u);
		break;
	}
	case K_RANDOM: {
		uint64_t *w = (uint64_t *)p;
		for (size_t k = 0; k < PAGE / 8; k++)
			w[k] = splitmix(&st);
		break;
	}
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long rss_anon_kb(void)
{
	FILE *f = fopen("/proc/self/status", "re");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof line, f))
		if (sscanf(line, "RssAnon: %ld", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}

static void cmd_verify(void)
{
	size_t bad = 0, first_bad = (size_t)-1;
	for (size_t i = 0; i < npages; i++)
		if (fnv(region + i * PAGE, PAGE) != expect[i]) {
			if (!bad)
				first_bad = i;
			bad++;
		}
	printf("VERIFY ok=%zu bad=%zu first_bad=%zd\n", npages - bad, bad, (ssize_t)first_bad);
}

/* ---- stress: writers leave sequence numbers; each page must keep the last ---- */

struct writer {
	pthread_t t;
	unsigned id;
	uint64_t *last; /* per page: last sequence number this writer stored */
	uint64_t writes;
	uint64_t lost; /* times the slot did not hold what this writer last stored */
};
static atomic_int stress_stop;

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t st = seed ^ ((uint64_t)w->id << 32), seq = 0;
	while (!atomic_load_explicit(&stress_stop, memory_order_relaxed)) {
		size_t pg = splitmix(&st) % npages;
		volatile uint64_t *slot = (volatile uint64_t *)(region + pg * PAGE + w->id * 64);
		/* every write first checks the previous one survived, so no loss goes unseen */
		if (*slot != w->last[pg]) {
			if (!w->lost && getenv("MEMFS_TARGET_DEBUG"))
				fprintf(stderr, "LOST writer=%u page=%zu expected=%" PRIu64 " found=%" PRIu64 " t=%" PRIu64 "\n",
					w->id, pg, w->last[pg], *slot, now_ns());
			w->lost++;
		}
		*slot = ++seq;
		w->last[pg] = seq;
		w->writes++;
	}
	return NULL;
}

static void cmd_stress(double seconds, unsigned nthreads)
{
	struct writer *ws = calloc(nthreads, sizeof *ws);
	uint64_t writes = 0, bad = 0, lost = 0;
	long first_bad = -1;

	if (nthreads > PAGE / 64)
		nthreads = PAGE / 64;
	atomic_store(&stress_stop, 0);
	for (unsigned i = 0; i < nthreads; i++) {
		ws[i].id = i;
		ws[i].last = calloc(npages, sizeof(uint64_t));
		/* a writer's slot starts at zero so that "never written" is checkable too */
		for (size_t pg = 0; pg < npages; pg++)
			*(uint64_t *)(region + pg * PAGE + i * 64) = 0;
		pthread_create(&ws[i].t, NULL, writer_main, &ws[i]);
	}
	usleep((useconds_t)(seconds * 1e6));
	atomic_store(&stress_stop, 1);
	for (unsigned i = 0; i < nthreads; i++) {
		pthread_join(ws[i].t, NULL);
		writes += ws[i].writes;
		lost += ws[i].lost;
	}
	for (size_t pg = 0; pg < npages; pg++) {
		for (unsigned i = 0; i < nthreads; i++)
			if (*(uint64_t *)(region + pg * PAGE + i * 64) != ws[i].last[pg]) {
				if (first_bad < 0)
					first_bad = (long)pg;
				bad++;
			}
		expect[pg] = fnv(region + pg * PAGE, PAGE);
	}
	for (unsigned i = 0; i < nthreads; i++)
		free(ws[i].last);
	free(ws);
	/* bad: slots that lost their last write (checked at the end) or an earlier one (checked
	 * by the writer at its next visit) */
	printf("STRESS writes=%" PRIu64 " bad=%" PRIu64 " lost_seen=%" PRIu64 " final_bad=%" PRIu64
	       " first_bad=%ld\n",
	       writes, bad + lost, lost, bad, first_bad);
}

/* ---- a hot set: pages in use, contents unchanged ---- */

static pthread_t hot_thread;
static atomic_int hot_stop, hot_running;
static size_t hot_first, hot_count;

static void *hot_main(void *arg)
{
	(void)arg;
	while (!atomic_load(&hot_stop)) {
		for (size_t i = hot_first; i < hot_first + hot_count && i < npages; i++) {
			volatile uint64_t *w = (volatile uint64_t *)(region + i * PAGE + 256);
			*w = *w; /* a read and a write, same value */
		}
		usleep(5000);
	}
	return NULL;
}

static void cmd_hot(const char *arg, size_t first, size_t count)
{
	if (atomic_load(&hot_running)) {
		atomic_store(&hot_stop, 1);
		pthread_join(hot_thread, NULL);
		atomic_store(&hot_running, 0);
	}
	if (strcmp(arg, "off")) {
		hot_first = first;
		hot_count = count;
		atomic_store(&hot_stop, 0);
		pthread_create(&hot_thread, NULL, hot_main, NULL);
		atomic_store(&hot_running, 1);
	}
	printf("HOT running=%d first=%zu count=%zu\n", atomic_load(&hot_running), hot_first, hot_count);
}

static void cmd_pageout(void)
{
	uint64_t t0 = now_ns();
	int rc = madvise(region, npages * PAGE, MADV_PAGEOUT);
	printf("PAGEOUT rc=%d wall_ns=%" PRIu64 "\n", rc ? -errno : 0, now_ns() - t0);
}

static int load_data(const char *path)
{
	FILE *f = fopen(path, "rbe");
	long len;
	if (!f || fseek(f, 0, SEEK_END) || (len = ftell(f)) < (long)PAGE || fseek(f, 0, SEEK_SET))
		return -1;
	data_pages = (size_t)len / PAGE;
	data_file = malloc(data_pages * PAGE);
	if (!data_file || fread(data_file, PAGE, data_pages, f) != data_pages)
		return -1;
	fclose(f);
	return 0;
}

#define GAP_NS 10000u /* a clock read takes tens of ns: anything this long is the machine's */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/*
 * A touch slower than this met more than the work of its fault: on the VM
 * this was written on, a timer tick or the host (a typical gap, `gaps`
 * below, is longer), or a slow path of the pager's.  It sits a little under
 * the p99 goal's line there (three times zram's random-fault p99).
 */
#define SLOW_NS 40000u

/*
 * The kernel's tick period (--tick-hz: CONFIG_HZ), or 0 when not given.
 * Ticks fall on multiples of it in CLOCK_MONOTONIC (the kernel aligns its
 * tick to them), so a touch spanning one is known without a trace.  On the
 * VM this was written on, a tick inside a touch costs it ~100 us: such slow
 * touches are the machine's, the rest the pager's or the host's.
 */
static uint64_t tick_ns;

/*
 * Touch pages of [base, base + np pages) and time each touch, the latency a
 * program sees, spinning `think_ns` after each; print one line, `tag`
 * first, and with a nonzero `want` the count of touched pages whose first
 * word is not `want` (bad=).
 */
static void time_touches(const char *tag, uint8_t *base, size_t np, bool seq, size_t n, uint64_t s,
			 uint64_t want, uint64_t think_ns)
{
	uint64_t *lat, sum = 0, t_all, bad = 0, slow = 0, slow_tick = 0;
	size_t *order = NULL;
	volatile uint64_t sink = 0;
	if (seq || !n || n > np)
		n = np;
	lat = malloc(n * sizeof *lat);
	if (!seq) { /* n distinct pages in random order: a partial Fisher-Yates shuffle */
		order = malloc(np * sizeof *order);
		for (size_t k = 0; k < np; k++)
			order[k] = k;
		for (size_t k = 0; k < n; k++) {
			size_t j = k + splitmix(&s) % (np - k), t = order[k];
			order[k] = order[j];
			order[j] = t;
		}
	}
	t_all = now_ns();
	for (size_t k = 0; k < n; k++) {
		size_t pg = seq ? k : order[k];
		uint64_t t0 = now_ns();
		sink += *(volatile uint64_t *)(base + pg * PAGE);
		lat[k] = now_ns() - t0;
		while (think_ns && now_ns() < t0 + lat[k] + think_ns)
			;
		sum += lat[k];
		if (lat[k] > SLOW_NS) {
			slow++;
			slow_tick += tick_ns && (t0 + lat[k]) / tick_ns != t0 / tick_ns;
		}
	}
	t_all = now_ns() - t_all;
	for (size_t k = 0; want && k < n; k++)
		bad += *(uint64_t *)(base + (seq ? k : order[k]) * PAGE) != want;
	(void)sink;
	qsort(lat, n, sizeof *lat, cmp_u64);
	printf("%s n=%zu wall_ns=%" PRIu64 " p50=%" PRIu64 " p99=%" PRIu64 " p999=%" PRIu64
	       " max=%" PRIu64 " mean=%" PRIu64 " slow=%" PRIu64,
	       tag, n, t_all, lat[n / 2], lat[n * 99 / 100], lat[n * 999 / 1000], lat[n - 1], sum / n,
	       slow);
	if (tick_ns)
		printf(" slow_tick=%" PRIu64, slow_tick);
	if (want)
		printf(" bad=%" PRIu64, bad);
	printf("\n");
	free(lat);
	free(order);
}

/*
 * The floor under any user-space pager on this machine: the same random
 * read, on a fresh region of the same size, served by a bare userfaultfd
 * handler in another process that copies in one constant page and does
 * nothing else.  Handler and reader are pinned to the reader's CPU, the
 * handler SCHED_IDLE (the placement memfs's fault thread arrives at on its
 * own), so this is a round trip at its cheapest.  Only for a target that is
 * not registered (--no-start): its fork must not reach a daemon.
 */
static void cmd_bare(size_t n, uint64_t s)
{
	const uint64_t fill = 0x5a5a5a5a5a5a5a5aull;
	struct uffdio_api api = {.api = UFFD_API};
	cpu_set_t was, here;
	int uffd, stop[2] = {-1, -1}, cpu = sched_getcpu();
	uint8_t *base = MAP_FAILED;
	pid_t child = -1;

	sched_getaffinity(0, sizeof was, &was);
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (pc || uffd < 0 || ioctl(uffd, UFFDIO_API, &api) || pipe2(stop, O_CLOEXEC)) {
		printf("ERROR bare: %s\n", pc ? "only without a daemon (--no-start)" : strerror(errno));
		goto out;
	}
	base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct uffdio_register reg = {.range = {.start = (uintptr_t)base, .len = npages * PAGE},
				      .mode = UFFDIO_REGISTER_MODE_MISSING};
	if (base == MAP_FAILED || ioctl(uffd, UFFDIO_REGISTER, &reg)) {
		printf("ERROR bare: %s\n", strerror(errno));
		goto out;
	}
	CPU_ZERO(&here);
	CPU_SET(cpu, &here);
	sched_setaffinity(0, sizeof here, &here);
	child = fork();
	if (child == 0) {
		static uint64_t page[PAGE / 8] __attribute__((aligned(PAGE)));
		struct sched_param sp = {0};
		struct uffd_msg msg[64];
		close(stop[1]);
		for (size_t k = 0; k < PAGE / 8; k++)
			page[k] = fill;
		sched_setscheduler(0, SCHED_IDLE, &sp);
		for (;;) {
			struct pollfd pfd[2] = {{.fd = uffd, .events = POLLIN}, {.fd = stop[0], .events = POLLIN}};
			ssize_t got = read(uffd, msg, sizeof msg);
			for (ssize_t k = 0; k < got / (ssize_t)sizeof *msg; k++) {
				struct uffdio_copy c = {.dst = msg[k].arg.pagefault.address & ~(uint64_t)(PAGE - 1),
							.src = (uintptr_t)page, .len = PAGE};
				ioctl(uffd, UFFDIO_COPY, &c);
			}
			if (got > 0)
				continue;
			if (poll(pfd, 2, -1) < 0 || pfd[1].revents)
				_exit(0);
		}
	}
	if (child < 0) {
		printf("ERROR bare: fork: %s\n", strerror(errno));
		goto out;
	}
	time_touches("BARE", base, npages, false, n, s, fill, 0);
out:
	if (stop[1] >= 0)
		close(stop[1]);
	if (child > 0)
		waitpid(child, NULL, 0);
	if (stop[0] >= 0)
		close(stop[0]);
	if (base != MAP_FAILED)
		munmap(base, npages * PAGE);
	if (uffd >= 0)
		close(uffd);
	sched_setaffinity(0, sizeof was, &was);
}

/* Spin for `seconds` and time what interrupts a running thread (see `gaps` above). */
static void cmd_gaps(double seconds)
{
	size_t cap = 1 << 16, n = 0;
	uint64_t *gap = malloc(cap * sizeof *gap), lost = 0;
	uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9), prev = start, t;
	while ((t = now_ns()) < end) {
		if (t - prev > GAP_NS) {
			lost += t - prev;
			if (n < cap)
				gap[n++] = t - prev;
		}
		prev = t;
	}
	qsort(gap, n, sizeof *gap, cmp_u64);
	printf("GAPS seconds=%.3f n=%zu per_s=%.0f p50_ns=%" PRIu64 " p90_ns=%" PRIu64 " lost_ppm=%.0f\n",
	       seconds, n, n / seconds, n ? gap[n / 2] : 0, n ? gap[n * 9 / 10] : 0,
	       lost / (seconds * 1e9) * 1e6);
	free(gap);
}

int main(int argc, char **argv)
{
	size_t mb = 64, nranges = 1;
	const char *sock = NULL;
	int start = 1;
	char line[256];

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--mb") && i + 1 < argc)
			mb = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--pattern") && i + 1 < argc)
			pattern = argv[++i];
		else if (!strcmp(argv[i], "--data") && i + 1 < argc) {
			pattern = "data";
			if (load_data(argv[++i])) {
				fprintf(stderr, "%s: cannot read at least one page\n", argv[i]);
				return 2;
			}
		} else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
			seed = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--socket") && i + 1 < argc)
			sock = argv[++i];
		else if (!strcmp(argv[i], "--ranges") && i + 1 < argc)
			nranges = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--tick-hz") && i + 1 < argc) {
			unsigned long hz = strtoul(argv[++i], NULL, 0);
			tick_ns = hz ? 1000000000ull / hz : 0;
		} else if (!strcmp(argv[i], "--no-start"))
			start = 0;
		else if (!strcmp(argv[i], "--no-dump"))
			prctl(PR_SET_DUMPABLE, 0); /* as a program holding secrets does: /proc/PID/mem closes */
		else {
			fprintf(stderr, "usage: %s [--mb N] [--pattern mixed|text|ints|random|zero|none] "
					"[--data FILE] [--seed S] [--socket PATH] [--ranges K] [--tick-hz HZ] "
					"[--no-start] [--no-dump]\n",
				argv[0]);
			return 2;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	npages = mb * 256;
	if (!nranges || nranges > npages)
		nranges = 1;
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	expect = malloc(npages * sizeof *expect);
	if (!strcmp(pattern, "none")) { /* leave the region untouched: it reads as zeros */
		static const uint8_t zero[PAGE];
		uint64_t h = fnv(zero, PAGE);
		for (size_t i = 0; i < npages; i++)
			expect[i] = h;
	} else {
		for (size_t i = 0; i < npages; i++) {
			gen_page(region + i * PAGE, i);
			expect[i] = fnv(region + i * PAGE, PAGE);
		}
		free(data_file); /* the region holds it now: only the region should count in RSS */
		data_file = NULL;
	}
	if (start) {
		uint64_t sid = 0;
		int rc = predicomp_client_open(&pc, sock);
		size_t per = npages / nranges;
		for (size_t k = 0; !rc && k < nranges; k++) {
			size_t first = k * per, cnt = k == nranges - 1 ? npages - first : per;
			rc = predicomp_client_register_range(
				pc, region + first * PAGE, cnt * PAGE,
				PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE | PREDICOMP_CLIENT_RANGE_F_WRITABLE, NULL);
		}
		if (!rc)
			rc = predicomp_client_start(pc);
		if (rc) {
			printf("ERROR rc=%d %s: %s\n", rc, strerror(-rc),
			       pc ? predicomp_client_last_error(pc) : "");
			return 1;
		}
		predicomp_client_session_id(pc, &sid);
		printf("READY session=%" PRIu64 " pid=%d addr=0x%lx pages=%zu agent=%d\n", sid,
		       getpid(), (unsigned long)region, npages, predicomp_client_has_agent(pc));
	} else {
		printf("READY session=0 pid=%d addr=0x%lx pages=%zu agent=0\n", getpid(),
		       (unsigned long)region, npages);
	}
	while (fgets(line, sizeof line, stdin)) {
		char a[32] = "";
		unsigned long x = 0, y = 0, z = 0;
		double d = 0;
		if (!strncmp(line, "verify", 6)) {
			cmd_verify();
		} else if (!strncmp(line, "rss", 3)) {
			printf("RSS anon_kb=%ld\n", rss_anon_kb());
		} else if (sscanf(line, "write %lu %lu", &x, &y) == 2 && x < npages) {
			memset(region + x * PAGE, (int)y, PAGE);
			expect[x] = fnv(region + x * PAGE, PAGE);
			printf("WROTE %lu\n", x);
		} else if (sscanf(line, "discard %lu %lu", &x, &y) == 2 && x < npages && y <= npages - x) {
			static const uint8_t zero[PAGE];
			int rc = madvise(region + x * PAGE, y * PAGE, MADV_DONTNEED) ? -errno : 0;
			for (size_t i = x; i < x + y && !rc; i++)
				expect[i] = fnv(zero, PAGE);
			printf("DISCARD rc=%d\n", rc);
		} else if (sscanf(line, "gaps %lf", &d) == 1 && d > 0 && d <= 60) {
			cmd_gaps(d);
		} else if (sscanf(line, "stress %lf %lu", &d, &x) == 2) {
			cmd_stress(d, (unsigned)x);
		} else if (sscanf(line, "touch %31s %lu %lu %lu", a, &x, &z, &y) >= 1 && y <= 1000000) {
			time_touches("TOUCH", region, npages, !strcmp(a, "seq"), x, z ? z : 1, 0, y * 1000);
		} else if (sscanf(line, "bare %lu %lu", &x, &z) >= 1) {
			cmd_bare(x, z ? z : 1);
		} else if (!strncmp(line, "hot off", 7)) {
			cmd_hot("off", 0, 0);
		} else if (sscanf(line, "hot %lu %lu", &x, &y) == 2) {
			cmd_hot("on", x, y);
		} else if (sscanf(line, "prefetch %lu %lu", &x, &y) == 2) {
			int rc = pc ? predicomp_client_prefetch(pc, region + x * PAGE, y * PAGE) : -ENOTCONN;
			printf("PREFETCH rc=%d\n", rc);
		} else if (!strncmp(line, "pageout", 7)) {
			cmd_pageout();
		} else if (!strncmp(line, "stats", 5)) {
			struct predicomp_client_stats st = {0};
			int rc = pc ? predicomp_client_stats(pc, &st) : -ENOTCONN;
			uint64_t sid = 0;
			if (pc)
				predicomp_client_session_id(pc, &sid);
			printf("STATS rc=%d takeovers=%" PRIu64 " agent_faults=%" PRIu64 " resumes=%" PRIu64
			       " alone=%u session=%" PRIu64 "\n",
			       rc, st.takeovers, st.agent_faults, st.resumes, st.alone, sid);
		} else if (!strncmp(line, "stop", 4)) {
			int rc = pc ? predicomp_client_stop(pc) : 0;
			printf("STOP rc=%d\n", rc);
		} else if (!strncmp(line, "exit", 4)) {
			break;
		} else {
			printf("ERROR unknown command\n");
		}
	}
	cmd_hot("off", 0, 0);
	if (pc)
		predicomp_client_close(pc);
	return 0;
}
