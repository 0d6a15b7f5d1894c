/* iogen: random-read load on a block device for a Linux guest whose initramfs has only busybox
 * (no fio, no libaio). Native AIO through raw syscalls, a fixed queue depth, per-I/O latency,
 * and optionally IRQ affinity churn (/proc/irq/N/smp_affinity_list) while the I/O runs.
 *
 *   iogen DEVICE --qd N --seconds S [--bs BYTES] [--seed N]
 *         [--churn IRQ[,IRQ...] --churn-hz HZ --cpus NCPUS]
 *
 * One line on stdout at the end: KVMITS-IOGEN {json}. Exit 0 clean, 1 errors or lost I/O (the
 * line is still printed), 2 setup failure (message on stderr, no line). */
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

struct slot { struct iocb cb; void *buf; uint64_t t0; };

int main(int argc, char **argv)
{
    const char *dev = NULL;
    uint64_t qd = 0, bs = 4096, seed = 1, v;
    double seconds = 0;
    int have_churn = 0, have_hz = 0, have_cpus = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (dev) bad_arg("(second device)", a);
            dev = a;
            continue;
        }
        if (!val) bad_arg(a, NULL);
        i++;
        if (!strcmp(a, "--qd")) { if (parse_u64(val, 1, MAX_QD, &qd)) bad_arg(a, val); }
        /* O_DIRECT: length and offset must be multiples of the device's logical block size
         * (512 or 4096), and the buffer aligned likewise: posix_memalign(4096) covers both */
        else if (!strcmp(a, "--bs")) { if (parse_u64(val, 512, 1 << 24, &bs) || bs % 512) bad_arg(a, val); }
        else if (!strcmp(a, "--seed")) { if (parse_u64(val, 0, UINT64_MAX, &seed)) bad_arg(a, val); }
        else if (!strcmp(a, "--seconds")) { if (parse_pos_double(val, 1e6, &seconds)) bad_arg(a, val); }
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

    /* O_DIRECT: the reads bypass the page cache, so each one reaches the device */
    int fd = open(dev, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) die(dev, errno);
    struct stat st;
    uint64_t size;
    if (fstat(fd, &st) < 0) die(dev, errno);
    if (S_ISBLK(st.st_mode)) { if (ioctl(fd, BLKGETSIZE64, &size) < 0) die("BLKGETSIZE64", errno); }
    else if (S_ISREG(st.st_mode)) size = (uint64_t)st.st_size;
    else die(dev, ENOTBLK);
    uint64_t nblocks = size / bs;
    if (!nblocks) die("device smaller than --bs", EINVAL);

    struct slot *slots = calloc(qd, sizeof *slots);
    unsigned *free_ = calloc(qd, sizeof *free_);
    struct io_event *events = calloc(qd, sizeof *events);
    uint64_t *lat = malloc(LAT_CAP * sizeof *lat);
    if (!slots || !free_ || !events || !lat) die("malloc", ENOMEM);
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

    uint64_t ios = 0, errors = 0, nlat = 0, sum_ns = 0, max_ns = 0;
    int64_t first_error = 0;
    int have_first_error = 0, stop = 0, draining = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    uint64_t period = have_churn ? (uint64_t)(1e9 / churn_hz) : 0, next_churn = start + period;
    uint64_t deadline = end, t = start, t_last = start;

    for (;;) {
        /* keep qd in flight: one io_submit per free slot, each iocb a PREAD at a random block */
        while (!stop && t < end && nfree) {
            unsigned s = free_[--nfree];
            struct iocb *cb = &slots[s].cb, *cbs[1] = { cb };
            memset(cb, 0, sizeof *cb);
            cb->aio_data = s; /* comes back in io_event.data */
            cb->aio_lio_opcode = IOCB_CMD_PREAD;
            cb->aio_fildes = (uint32_t)fd;
            cb->aio_buf = (uint64_t)(uintptr_t)slots[s].buf;
            cb->aio_nbytes = bs;
            cb->aio_offset = (int64_t)(rng_below(nblocks) * bs);
            slots[s].t0 = now_ns();
            /* io_submit fails only for a bad iocb or no resources; an I/O error of the read
             * itself arrives as a completion with a negative res */
            if (syscall(SYS_io_submit, ctx, 1L, cbs) != 1) {
                int err = errno;
                free_[nfree++] = s;
                if (err == EAGAIN && nfree < qd) break; /* retry after a completion */
                errors++;
                if (!have_first_error) { first_error = -err; have_first_error = 1; }
                stop = 1; /* a submission that fails will fail again: end the run, drain */
            }
        }
        if (!draining && (t >= end || stop)) { draining = 1; deadline = t + DRAIN_NS; }
        if (draining && (nfree == qd || t >= deadline)) break;
        /* wait for at least one completion, but not past the next deadline (churn tick, end of
         * run, end of drain): io_getevents' timeout is relative */
        uint64_t until = deadline;
        if (have_churn && !draining && next_churn < until) until = next_churn;
        uint64_t wait = until > t ? until - t : 0;
        struct timespec ts = { (time_t)(wait / 1000000000u), (long)(wait % 1000000000u) };
        long n = syscall(SYS_io_getevents, ctx, 1L, (long)qd, events, &ts);
        if (n < 0 && errno != EINTR) die("io_getevents", errno);
        t = now_ns();
        if (n > 0) t_last = t;
        for (long i = 0; i < n; i++) {
            unsigned s = (unsigned)events[i].data;
            free_[nfree++] = s;
            if (events[i].res != (int64_t)bs) { /* short read or -errno */
                errors++;
                if (!have_first_error) { first_error = events[i].res; have_first_error = 1; }
                continue;
            }
            uint64_t d = t - slots[s].t0;
            ios++;
            sum_ns += d;
            if (d > max_ns) max_ns = d;
            if (nlat < LAT_CAP) lat[nlat++] = d;
        }
        if (have_churn && !draining && t >= next_churn) {
            churn_once();
            next_churn += period;
            if (next_churn <= t) next_churn = t + period; /* fell behind: skip, do not burst */
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
    printf(",\"lost\":%" PRIu64 ",\"iops\":%.1f,\"lat_us\":", lost, secs > 0 ? ios / secs : 0.0);
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
    printf("}\n");
    fflush(stdout);
    /* io_destroy waits for every outstanding request (as process exit does): with lost I/O it
     * may never return, so the line above goes out first */
    if (!lost) syscall(SYS_io_destroy, ctx);
    return errors || lost ? 1 : 0;
}
