/* iogen: block-device load for a Linux guest whose initramfs has only busybox (no fio, no
 * libaio). Native AIO through raw syscalls, a fixed queue depth, per-I/O latency, and optionally
 * IRQ affinity churn (/proc/irq/N/smp_affinity_list) while the I/O runs.
 *
 *   iogen DEVICE --qd N --seconds S [--bs BYTES] [--seed N]
 *         [--churn IRQ[,IRQ...] --churn-hz HZ --cpus NCPUS]
 *         [--verify [--write-pct P]] [--progress SECONDS] [--stall-seconds S]
 *
 * Without --verify: random reads for S seconds (phase "read").
 * With --verify the device is opened read-write and the run has three phases:
 *   fill   every block written once (generation 1), QD N;
 *   mixed  S seconds of random reads and writes (P% writes, default 50) at QD N;
 *   sweep  every block read back once.
 * A written block is a deterministic function of (block number, generation): a header (magic,
 * block number, generation, FNV-1a-64 of the rest of the block) and a payload drawn from a
 * PRNG seeded by both. iogen keeps the generation it last wrote to each block in memory, and
 * every read must give back exactly that block; anything else is "corrupt": "stale" (a whole,
 * valid block of another generation: a lost or reordered write), "misdirected" (a whole, valid
 * block of another block number) or "damaged" (torn, bit flips, zeros: the checksum or header
 * does not hold). Two I/Os on one block are never in flight at once, so the expectation is exact.
 *
 * --progress T: a line KVMITS-IOGEN-PROGRESS {json} every T seconds (counts so far, the oldest
 * I/O in flight), so that a watcher sees throughput over time and a stall as it happens.
 * --stall-seconds S (default 10): an I/O outstanding longer than S is "stalled" (counted when it
 * completes; still outstanding at the end it is "lost").
 *
 * One line on stdout at the end: KVMITS-IOGEN {json}. Exit 0 clean; 1 errors, lost, stalled or
 * corrupt I/O (the line is still printed); 2 setup failure (message on stderr, no line). */
#define _GNU_SOURCE /* O_DIRECT, syscall() */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 4096            /* io_setup's nr_events also counts against fs.aio-max-nr */
#define MAX_IRQS 64
#define LAT_CAP 2000000        /* latencies kept for the percentiles (16 MB of u64) */
#define DRAIN_NS 10000000000ull /* after the run, wait at most 10 s for what is in flight */

static void die(const char *what, int err)
{
    fprintf(stderr, "iogen: %s: %s\n", what, strerror(err));
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* xorshift64* (Vigna), seeded through splitmix64 so that seeds 0, 1, 2... give unrelated
 * streams and the state is never 0 (xorshift's one fixed point). */
static uint64_t rng;
static void rng_seed(uint64_t seed)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    rng = (z ^ (z >> 31)) | 1;
}
static uint64_t rng_next(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}
/* uniform in [0, n): reject the top partial range instead of taking a biased modulo */
static uint64_t rng_below(uint64_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % n, r;
    do r = rng_next(); while (r >= limit);
    return r % n;
}

static int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || *s == '-' || v < min || v > max) return -1;
    *out = v;
    return 0;
}

static int parse_pos_double(const char *s, double max, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v > 0) || !(v <= max)) return -1;
    *out = v;
    return 0;
}

static void bad_arg(const char *opt, const char *val)
{
    char what[256];
    snprintf(what, sizeof what, "bad argument %s %s", opt, val ? val : "(missing)");
    die(what, EINVAL);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile (pct of 100) of sorted v[0..n), n >= 1, in µs */
static double pct_us(const uint64_t *v, uint64_t n, unsigned pct)
{
    uint64_t k = (n * pct + 99) / 100; /* ceil(n * pct / 100), >= 1 */
    return (double)v[k - 1] / 1000.0;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

/* churn state: one write of "CPU\n" per IRQ per tick, IRQ i of tick t going to CPU (t + i) % n,
 * so each IRQ moves every tick (n >= 2) and the IRQs do not all land on one CPU */
static unsigned irqs[MAX_IRQS], nirqs, ncpus, tick;
static double churn_hz;
static uint64_t moves, move_failures;
static int first_errno;

static void churn_once(void)
{
    for (unsigned i = 0; i < nirqs; i++) {
        char path[64], text[16];
        snprintf(path, sizeof path, "/proc/irq/%u/smp_affinity_list", irqs[i]);
        int len = snprintf(text, sizeof text, "%u\n", (tick + i) % ncpus);
        int fd = open(path, O_WRONLY | O_CLOEXEC), err = 0;
        if (fd < 0) err = errno;
        else {
            ssize_t w = write(fd, text, (size_t)len);
            if (w != len) err = w < 0 ? errno : EIO;
            if (close(fd) < 0 && !err) err = errno;
        }
        if (err) { move_failures++; if (!first_errno) first_errno = err; }
        else moves++;
    }
    tick++;
}

/* --verify: the block format. Little-endian u64s (both the guest, arm64, and the host tests,
 * x86_64, are little-endian: the words are stored as the CPU holds them). */
#define MAGIC 0x314B4C4253544D4Bull   /* "KMTSBLK1" read as bytes */
#define HDR_MAGIC 0
#define HDR_BLOCK 1
#define HDR_GEN 2
#define HDR_SUM 3
#define HDR_WORDS 4
#define CORRUPT_LIST 8                /* block numbers of the first corrupt reads, in the JSON */

/* FNV-1a, 64-bit (Fowler, Noll, Vo): over the block's bytes except the checksum word */
static uint64_t block_sum(const unsigned char *b, uint64_t bs)
{
    uint64_t h = 0xCBF29CE484222325ull;
    for (uint64_t i = 0; i < bs; i++) {
        if (i == HDR_SUM * 8) { i += 7; continue; }
        h ^= b[i];
        h *= 0x100000001B3ull;
    }
    return h;
}

/* the contents of block `block` at generation `gen`: the header, then a payload of xorshift64*
 * words from a state that splitmix64 makes of (block, gen), so every (block, gen) differs */
static void block_fill(unsigned char *b, uint64_t bs, uint64_t block, uint64_t gen)
{
    uint64_t w[HDR_WORDS] = { MAGIC, block, gen, 0 };
    uint64_t z = block * 0xD1342543DE82EF95ull + gen + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    uint64_t s = (z ^ (z >> 31)) | 1;
    memcpy(b, w, sizeof w);
    for (uint64_t off = sizeof w; off + 8 <= bs; off += 8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        uint64_t v = s * 0x2545F4914F6CDD1Dull;
        memcpy(b + off, &v, 8);
    }
    uint64_t sum = block_sum(b, bs);
    memcpy(b + HDR_SUM * 8, &sum, 8);
}

enum kind { OK, STALE, MISDIRECTED, DAMAGED };

/* what a read of `block` (expected at generation `gen`) gave back; `scratch` is bs bytes */
static enum kind block_check(const unsigned char *b, uint64_t bs, uint64_t block, uint64_t gen,
                             unsigned char *scratch)
{
    block_fill(scratch, bs, block, gen);
    if (!memcmp(b, scratch, bs)) return OK;
    uint64_t w[HDR_WORDS];
    memcpy(w, b, sizeof w);
    /* a whole block (its checksum holds) that is not the one expected: which one it is says how
     * it got there; the checksum alone could be a chance match, so it must also be the exact
     * contents of the (block, generation) its header names */
    if (w[HDR_MAGIC] != MAGIC || w[HDR_SUM] != block_sum(b, bs)) return DAMAGED;
    block_fill(scratch, bs, w[HDR_BLOCK], w[HDR_GEN]);
    if (memcmp(b, scratch, bs)) return DAMAGED;
    return w[HDR_BLOCK] != block ? MISDIRECTED : STALE;
}

enum phase { PH_READ, PH_FILL, PH_MIXED, PH_SWEEP };
static const char *const phase_names[] = { "read", "fill", "mixed", "sweep" };

struct slot { struct iocb cb; void *buf; uint64_t t0, block, gen; int busy, write; };

int main(int argc, char **argv)
{
    const char *dev = NULL;
    uint64_t qd = 0, bs = 4096, seed = 1, write_pct = 50, v;
    double seconds = 0, progress = 0, stall_seconds = 10;
    int have_churn = 0, have_hz = 0, have_cpus = 0, verify = 0, have_pct = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (dev) bad_arg("(second device)", a);
            dev = a;
            continue;
        }
        if (!strcmp(a, "--verify")) { verify = 1; continue; }   /* the one option without a value */
        if (!val) bad_arg(a, NULL);
        i++;
        if (!strcmp(a, "--qd")) { if (parse_u64(val, 1, MAX_QD, &qd)) bad_arg(a, val); }
        /* O_DIRECT: length and offset must be multiples of the device's logical block size
         * (512 or 4096), and the buffer aligned likewise: posix_memalign(4096) covers both */
        else if (!strcmp(a, "--bs")) { if (parse_u64(val, 512, 1 << 24, &bs) || bs % 512) bad_arg(a, val); }
        else if (!strcmp(a, "--seed")) { if (parse_u64(val, 0, UINT64_MAX, &seed)) bad_arg(a, val); }
        else if (!strcmp(a, "--seconds")) { if (parse_pos_double(val, 1e6, &seconds)) bad_arg(a, val); }
        else if (!strcmp(a, "--progress")) { if (parse_pos_double(val, 1e6, &progress)) bad_arg(a, val); }
        else if (!strcmp(a, "--stall-seconds")) { if (parse_pos_double(val, 1e6, &stall_seconds)) bad_arg(a, val); }
        else if (!strcmp(a, "--write-pct")) { if (parse_u64(val, 0, 100, &write_pct)) bad_arg(a, val); have_pct = 1; }
        else if (!strcmp(a, "--churn-hz")) { if (parse_pos_double(val, 1e5, &churn_hz)) bad_arg(a, val); have_hz = 1; }
        else if (!strcmp(a, "--cpus")) { if (parse_u64(val, 1, 1u << 16, &v)) bad_arg(a, val); ncpus = (unsigned)v; have_cpus = 1; }
        else if (!strcmp(a, "--churn")) {
            char list[1024], *save, *tok;
            if (strlen(val) >= sizeof list) bad_arg(a, val);
            strcpy(list, val);
            for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (nirqs == MAX_IRQS || parse_u64(tok, 0, UINT32_MAX, &v)) bad_arg(a, val);
                irqs[nirqs++] = (unsigned)v;
            }
            if (!nirqs) bad_arg(a, val);
            have_churn = 1;
        } else bad_arg(a, val);
    }
    if (!dev) bad_arg("DEVICE", NULL);
    if (!qd) bad_arg("--qd", NULL);
    if (seconds <= 0) bad_arg("--seconds", NULL);
    if (have_churn != have_hz || have_churn != have_cpus)
        bad_arg("--churn", "needs --churn-hz and --cpus (and they need --churn)");
    if (have_pct && !verify) bad_arg("--write-pct", "needs --verify (without it iogen only reads)");
    /* the header must fit, and the payload is whole u64s */
    if (verify && (bs < HDR_WORDS * 8 || bs % 8)) bad_arg("--bs", "too small for --verify");

    /* O_DIRECT: the I/O bypasses the page cache, so each one reaches the device */
    int fd = open(dev, (verify ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
    if (fd < 0) die(dev, errno);
    struct stat st;
    uint64_t size;
    if (fstat(fd, &st) < 0) die(dev, errno);
    if (S_ISBLK(st.st_mode)) { if (ioctl(fd, BLKGETSIZE64, &size) < 0) die("BLKGETSIZE64", errno); }
    else if (S_ISREG(st.st_mode)) size = (uint64_t)st.st_size;
    else die(dev, ENOTBLK);
    uint64_t nblocks = size / bs;
    if (!nblocks) die("device smaller than --bs", EINVAL);
    /* --verify keeps one I/O per block in flight at most: the random pick needs a free block */
    if (verify && nblocks <= qd) die("--verify needs more blocks than --qd", EINVAL);

    struct slot *slots = calloc(qd, sizeof *slots);
    unsigned *free_ = calloc(qd, sizeof *free_);
    struct io_event *events = calloc(qd, sizeof *events);
    uint64_t *lat = malloc(LAT_CAP * sizeof *lat);
    if (!slots || !free_ || !events || !lat) die("malloc", ENOMEM);
    /* --verify: per block the generation last written (0: none yet), whether its contents are
     * known (a failed write or a corrupt read leaves them unknown until the next good write),
     * and whether an I/O on it is in flight */
    uint32_t *gens = NULL;
    unsigned char *known = NULL, *busy = NULL, *scratch = NULL;
    if (verify) {
        gens = calloc(nblocks, sizeof *gens);
        known = calloc(nblocks, 1);
        busy = calloc(nblocks, 1);
        scratch = malloc(bs);
        if (!gens || !known || !busy || !scratch) die("malloc", ENOMEM);
    }
    unsigned nfree = 0;
    for (unsigned i = 0; i < qd; i++) {
        int err = posix_memalign(&slots[i].buf, 4096, bs);
        if (err) die("posix_memalign", err);
        free_[nfree++] = i;
    }
    /* io_setup(nr_events, &ctx): ctx must be 0 on entry; the ring holds at least qd events */
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, (unsigned)qd, &ctx) < 0) {
        char what[64];
        snprintf(what, sizeof what, "io_setup(%" PRIu64 ")", qd);
        die(what, errno);
    }
    rng_seed(seed);

    uint64_t ios = 0, errors = 0, nlat = 0, sum_ns = 0, max_ns = 0, stalled = 0;
    uint64_t reads = 0, writes = 0, fill_writes = 0, sweep_reads = 0, unverified = 0;
    uint64_t corrupt = 0, stale = 0, misdirected = 0, damaged = 0, corrupt_blocks[CORRUPT_LIST];
    int64_t first_error = 0;
    int have_first_error = 0, stop = 0, draining = 0;
    enum phase phase = verify ? PH_FILL : PH_READ;
    uint64_t next_block = 0;            /* fill and sweep: the next block to submit */
    uint64_t stall_ns = (uint64_t)(stall_seconds * 1e9);
    uint64_t start = now_ns(), end = verify ? UINT64_MAX : start + (uint64_t)(seconds * 1e9);
    uint64_t period = have_churn ? (uint64_t)(1e9 / churn_hz) : 0, next_churn = start + period;
    uint64_t pperiod = progress > 0 ? (uint64_t)(progress * 1e9) : 0, next_progress = start + pperiod;
    uint64_t deadline = 0, t = start, t_last = start;

    for (;;) {
        /* keep qd in flight: one io_submit per free slot */
        while (!stop && !draining && nfree) {
            uint64_t block;
            int write;
            if (phase == PH_FILL || phase == PH_SWEEP) {
                /* the sweep reads only what it can check */
                while (phase == PH_SWEEP && next_block < nblocks && !known[next_block]) { unverified++; next_block++; }
                if (next_block == nblocks) break;
                block = next_block++;
                write = phase == PH_FILL;
            } else {
                if (t >= end) break;
                block = rng_below(nblocks);
                if (verify) {
                    while (busy[block]) block = block + 1 == nblocks ? 0 : block + 1;
                    /* a block whose contents are unknown cannot be checked: write it instead */
                    write = rng_below(100) < write_pct || !known[block];
                } else write = 0;
            }
            unsigned s = free_[--nfree];
            struct slot *sl = &slots[s];
            struct iocb *cb = &sl->cb, *cbs[1] = { cb };
            sl->block = block;
            sl->write = write;
            if (write) {
                sl->gen = (uint64_t)gens[block] + 1;
                block_fill(sl->buf, bs, block, sl->gen);
            }
            memset(cb, 0, sizeof *cb);
            cb->aio_data = s; /* comes back in io_event.data */
            cb->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
            cb->aio_fildes = (uint32_t)fd;
            cb->aio_buf = (uint64_t)(uintptr_t)sl->buf;
            cb->aio_nbytes = bs;
            cb->aio_offset = (int64_t)(block * bs);
            sl->t0 = now_ns();
            /* io_submit fails only for a bad iocb or no resources; an I/O error of the request
             * itself arrives as a completion with a negative res */
            if (syscall(SYS_io_submit, ctx, 1L, cbs) != 1) {
                int err = errno;
                free_[nfree++] = s;
                if (phase == PH_FILL || phase == PH_SWEEP) next_block--;   /* submit it again */
                if (err == EAGAIN && nfree < qd) break; /* retry after a completion */
                errors++;
                if (!have_first_error) { first_error = -err; have_first_error = 1; }
                stop = 1; /* a submission that fails will fail again: end the run, drain */
                break;
            }
            sl->busy = 1;
            if (verify) busy[block] = 1;
        }
        /* a phase's submissions are over: wait (at most DRAIN_NS) for what is in flight, then
         * the next phase, or the end */
        int submitted_all = phase == PH_FILL || phase == PH_SWEEP ? next_block == nblocks : t >= end;
        if (!draining && (submitted_all || stop)) { draining = 1; deadline = t + DRAIN_NS; }
        if (draining && nfree == qd) {
            if (stop || phase == PH_READ || phase == PH_SWEEP) break;
            phase = phase == PH_FILL ? PH_MIXED : PH_SWEEP;
            if (phase == PH_MIXED) end = t + (uint64_t)(seconds * 1e9);
            next_block = 0;
            draining = 0;
            continue;
        }
        if (draining && t >= deadline) break;   /* lost I/O: the run ends here */
        /* wait for at least one completion, but not past the next deadline (churn tick,
         * progress line, end of the phase or of the drain), and at least once a second:
         * io_getevents' timeout is relative */
        uint64_t until = draining ? deadline : end < t + 1000000000ull ? end : t + 1000000000ull;
        if (have_churn && next_churn < until) until = next_churn;
        if (pperiod && next_progress < until) until = next_progress;
        uint64_t wait = until > t ? until - t : 0;
        struct timespec ts = { (time_t)(wait / 1000000000u), (long)(wait % 1000000000u) };
        long n = syscall(SYS_io_getevents, ctx, 1L, (long)qd, events, &ts);
        if (n < 0 && errno != EINTR) die("io_getevents", errno);
        t = now_ns();
        if (n > 0) t_last = t;
        for (long i = 0; i < n; i++) {
            unsigned s = (unsigned)events[i].data;
            struct slot *sl = &slots[s];
            free_[nfree++] = s;
            sl->busy = 0;
            if (verify) busy[sl->block] = 0;
            uint64_t d = t - sl->t0;
            if (d > stall_ns) stalled++;
            if (events[i].res != (int64_t)bs) { /* short transfer or -errno */
                errors++;
                if (!have_first_error) { first_error = events[i].res; have_first_error = 1; }
                /* a failed write may have written some of the block, or none, or all of it */
                if (verify && sl->write) { gens[sl->block] = (uint32_t)sl->gen; known[sl->block] = 0; }
                continue;
            }
            ios++;
            sum_ns += d;
            if (d > max_ns) max_ns = d;
            if (nlat < LAT_CAP) lat[nlat++] = d;
            if (!verify) { reads++; continue; }
            if (sl->write) {
                writes++;
                if (phase == PH_FILL) fill_writes++;
                gens[sl->block] = (uint32_t)sl->gen;
                known[sl->block] = 1;
                continue;
            }
            reads++;
            if (phase == PH_SWEEP) sweep_reads++;
            enum kind k = block_check(sl->buf, bs, sl->block, gens[sl->block], scratch);
            if (k == OK) continue;
            if (corrupt < CORRUPT_LIST) corrupt_blocks[corrupt] = sl->block;
            corrupt++;
            if (k == STALE) stale++;
            else if (k == MISDIRECTED) misdirected++;
            else damaged++;
            known[sl->block] = 0;   /* counted once; the next write of it makes it known again */
        }
        if (have_churn && t >= next_churn) {
            churn_once();
            next_churn += period;
            if (next_churn <= t) next_churn = t + period; /* fell behind: skip, do not burst */
        }
        if (pperiod && t >= next_progress) {
            /* the oldest I/O in flight, and how many are past the stall bound, right now */
            uint64_t oldest = 0, stalled_now = 0;
            for (unsigned s = 0; s < qd; s++) {
                if (!slots[s].busy) continue;
                uint64_t age = t - slots[s].t0;
                if (age > oldest) oldest = age;
                if (age > stall_ns) stalled_now++;
            }
            printf("KVMITS-IOGEN-PROGRESS {\"t\":%.3f,\"phase\":\"%s\",\"ios\":%" PRIu64 ",\"reads\":%" PRIu64
                   ",\"writes\":%" PRIu64 ",\"errors\":%" PRIu64 ",\"corrupt\":%" PRIu64 ",\"stalled\":%" PRIu64
                   ",\"inflight\":%u,\"stalled_now\":%" PRIu64 ",\"oldest_ms\":%.3f,\"moves\":%" PRIu64
                   ",\"move_failures\":%" PRIu64 "}\n",
                   (double)(t - start) / 1e9, phase_names[phase], ios, reads, writes, errors, corrupt, stalled,
                   (unsigned)(qd - nfree), stalled_now, (double)oldest / 1e6, moves, move_failures);
            fflush(stdout);
            next_progress += pperiod;
            if (next_progress <= t) next_progress = t + pperiod;
        }
    }
    uint64_t lost = qd - nfree;
    /* measured: from the first submission to the last completion (not the drain's timeout) */
    double secs = (double)((t_last > start ? t_last : t) - start) / 1e9;

    printf("KVMITS-IOGEN {\"device\":");
    json_str(dev);
    printf(",\"bs\":%" PRIu64 ",\"qd\":%" PRIu64 ",\"seconds\":%.6f,\"ios\":%" PRIu64
           ",\"errors\":%" PRIu64 ",\"first_error\":", bs, qd, secs, ios, errors);
    if (have_first_error) printf("%" PRId64, first_error); else printf("null");
    printf(",\"lost\":%" PRIu64 ",\"stalled\":%" PRIu64 ",\"stall_seconds\":%g,\"iops\":%.1f,\"lat_us\":",
           lost, stalled, stall_seconds, secs > 0 ? ios / secs : 0.0);
    if (nlat) {
        qsort(lat, nlat, sizeof *lat, cmp_u64);
        printf("{\"mean\":%.3f,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f}", sum_ns / 1000.0 / ios,
               pct_us(lat, nlat, 50), pct_us(lat, nlat, 99), max_ns / 1000.0);
    } else printf("{\"mean\":null,\"p50\":null,\"p99\":null,\"max\":null}");
    printf(",\"churn\":");
    if (have_churn) {
        printf("{\"irqs\":[");
        for (unsigned i = 0; i < nirqs; i++) printf("%s%u", i ? "," : "", irqs[i]);
        printf("],\"hz\":%g,\"moves\":%" PRIu64 ",\"move_failures\":%" PRIu64 ",\"first_errno\":",
               churn_hz, moves, move_failures);
        if (first_errno) printf("%d}", first_errno); else printf("null}");
    } else printf("null");
    printf(",\"verify\":");
    if (verify) {
        printf("{\"blocks\":%" PRIu64 ",\"write_pct\":%" PRIu64 ",\"phase\":\"%s\",\"reads\":%" PRIu64
               ",\"writes\":%" PRIu64 ",\"fill_writes\":%" PRIu64 ",\"sweep_reads\":%" PRIu64
               ",\"unverified\":%" PRIu64 ",\"corrupt\":%" PRIu64 ",\"stale\":%" PRIu64
               ",\"misdirected\":%" PRIu64 ",\"damaged\":%" PRIu64 ",\"corrupt_blocks\":[",
               nblocks, write_pct, phase_names[phase], reads, writes, fill_writes, sweep_reads, unverified,
               corrupt, stale, misdirected, damaged);
        for (uint64_t i = 0; i < corrupt && i < CORRUPT_LIST; i++)
            printf("%s%" PRIu64, i ? "," : "", corrupt_blocks[i]);
        printf("]}");
    } else printf("null");
    printf("}\n");
    fflush(stdout);
    /* io_destroy waits for every outstanding request (as process exit does): with lost I/O it
     * may never return, so the line above goes out first */
    if (!lost) syscall(SYS_io_destroy, ctx);
    return errors || lost || stalled || corrupt ? 1 : 0;
}
