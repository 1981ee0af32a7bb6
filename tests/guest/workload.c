/*
 * Guest workload for p2pvbd's VM tests: writes numbered, self-checking records to a virtio disk so
 * the host can prove, after a migration, that every write the guest saw acknowledged is still there.
 *
 *   workload write  DEV [slots=N] [delay_ms=D] [count=C] [alive_every=A] [mem_mb=M] [mem_churn=P]
 *   workload verify DEV [slots=N] [acked=K]
 *   workload idle
 *   workload stream DEV dst=A.B.C.D [port=P]
 *   workload bench  DEV [bs=B] [rand=0|1] [span_mb=M] [every_ms=E] [dsync=0|1]
 *
 * Record k (k = 1, 2, ...) is one 4096-byte block at offset (k mod slots) * 4096 holding a header
 * (magic, k, slot, slots) and 4064 bytes of a pattern computed from k, so a torn, stale or misplaced
 * block is caught. Each write is O_DIRECT|O_SYNC (acknowledged only once the device says it is
 * durable) and is read back and compared before `REC <k> OK` is printed. `write` resumes after the
 * highest record already on the disk, so sequence numbers only grow; after `count` records (0 means
 * never) it stops writing but keeps printing ALIVE lines. `verify` checks every slot and, given
 * acked=K, that each slot holds at least the last record K or an earlier acknowledged write put there.
 *
 * Console lines (one per event, stdout is the serial port):
 *   GUEST READY                       the workload runs and the disk is open
 *   RESUME from=<k>                   first record this boot will write
 *   REC <k> OK                        record k is durable and read back intact
 *   ERR <k> <reason>                  record k failed (it is retried)
 *   ALIVE <k> <monotonic ms>          heartbeat: every alive_every records and at least once a second
 *   BAD <slot> <reason>               verify: a slot holds garbage
 *   STALE <slot> have=<k> want=<k>    verify: a slot misses an acknowledged record
 *   VERIFY ok=<n> bad=<m> maxseq=<k> empty=<e> stale=<s>
 *   WRITE DONE <k>                    count reached, idling
 *   MEM OK <checks>                   mem_mb: the memory checks found nothing wrong so far (once a second)
 *   ERR 0 memory <what>               mem_mb: guest memory lost a store or changed under the guest
 *
 * With mem_mb=M (write mode) the guest also checks its own memory, so a VM move that corrupts memory
 * without crashing the kernel is caught: M/2 MiB are filled once and compared against their checksum
 * about once a second; the other M/2 MiB are rewritten P pages (mem_churn,
 * default 32) after every record, each page stamped with its pass number, and every stamp is checked
 * before it is overwritten: a store the move lost shows as a page one pass behind.
 *
 * `stream` (benchmarks: a TCP flow out of the VM; DEV is not touched) connects to dst:port and sends
 * as fast as the socket takes it, reconnecting after an error; `bench` (benchmarks: guest disk
 * throughput) writes bs-byte blocks of fresh pseudo-random (incompressible) data with O_DIRECT (and
 * O_DSYNC with dsync=1), at random (rand=1, default) or sequential bs-aligned offsets within the first
 * span_mb MiB (0: the whole disk). Their lines:
 *   STREAM CONNECTED                  stream: the connection is up
 *   STREAM <monotonic ms> <bytes> <ms> stream: bytes sent in the last <ms>, about once a second
 *   BENCH <monotonic ms> <bytes> <ms> bench: bytes written in the last <ms>, about every every_ms
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAGIC "P2PVBDR1"

struct header {
    char magic[8];
    uint64_t seq;
    uint64_t slot;
    uint64_t slots;
};

static uint64_t opt_slots = 1024, opt_delay_ms = 5, opt_count = 0, opt_alive_every = 10, opt_acked = 0;
/* stream and bench modes */
static uint64_t opt_mem_mb = 0, opt_mem_churn = 32;
static uint64_t opt_port = 5001, opt_bs = 65536, opt_rand = 1, opt_span_mb = 0, opt_every_ms = 250, opt_dsync = 0;
static struct in_addr opt_dst;

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(uint64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The whole block that record `seq` must be, byte for byte. */
static void fill_record(unsigned char *buf, uint64_t seq)
{
    struct header h;
    memcpy(h.magic, MAGIC, 8);
    h.seq = seq;
    h.slot = seq % opt_slots;
    h.slots = opt_slots;
    memcpy(buf, &h, sizeof h);
    for (size_t i = sizeof h; i < BLOCK; i += 8) {
        uint64_t w = splitmix64(seq * BLOCK + i);
        memcpy(buf + i, &w, 8);
    }
}

static int all_zero(const unsigned char *buf)
{
    for (size_t i = 0; i < BLOCK; i++)
        if (buf[i])
            return 0;
    return 1;
}

enum slot_state { SLOT_EMPTY, SLOT_OK, SLOT_BAD };

/* Classify what a slot holds; on SLOT_OK *seq is its record, on SLOT_BAD *why says what is wrong. */
static enum slot_state check_slot(const unsigned char *buf, uint64_t slot, unsigned char *scratch, uint64_t *seq,
                                  const char **why)
{
    struct header h;
    if (all_zero(buf))
        return SLOT_EMPTY;
    memcpy(&h, buf, sizeof h);
    if (memcmp(h.magic, MAGIC, 8) != 0) {
        *why = "magic";
        return SLOT_BAD;
    }
    if (h.slots != opt_slots || h.slot != slot || h.seq % opt_slots != slot || h.seq == 0) {
        *why = "header";
        return SLOT_BAD;
    }
    fill_record(scratch, h.seq);
    if (memcmp(buf, scratch, BLOCK) != 0) {
        *why = "pattern";
        return SLOT_BAD;
    }
    *seq = h.seq;
    return SLOT_OK;
}

static int read_block(int fd, unsigned char *buf, uint64_t slot)
{
    ssize_t n = pread(fd, buf, BLOCK, (off_t)(slot * BLOCK));
    if (n == BLOCK)
        return 0;
    if (n >= 0)
        errno = EIO;
    return -1;
}

/* Scan every slot; prints BAD/STALE lines and the VERIFY summary when `report`. Returns the highest record. */
static uint64_t scan(int fd, unsigned char *buf, unsigned char *scratch, int report)
{
    uint64_t ok = 0, bad = 0, empty = 0, stale = 0, maxseq = 0, shown = 0;
    for (uint64_t slot = 0; slot < opt_slots; slot++) {
        uint64_t seq = 0;
        const char *why = "read";
        enum slot_state st = read_block(fd, buf, slot) ? SLOT_BAD : check_slot(buf, slot, scratch, &seq, &why);
        if (st == SLOT_BAD) {
            bad++;
            if (report && shown++ < 20)
                printf("BAD %" PRIu64 " %s\n", slot, why);
            continue;
        }
        if (st == SLOT_EMPTY)
            empty++;
        else {
            ok++;
            if (seq > maxseq)
                maxseq = seq;
        }
        /* The last acknowledged record that went to this slot, if any: the slot must hold it or a later one. */
        uint64_t first = slot ? slot : opt_slots;
        if (opt_acked >= first) {
            uint64_t want = opt_acked - (opt_acked - first) % opt_slots;
            if (seq < want) {
                stale++;
                if (report && shown++ < 20)
                    printf("STALE %" PRIu64 " have=%" PRIu64 " want=%" PRIu64 "\n", slot, seq, want);
            }
        }
    }
    if (report)
        printf("VERIFY ok=%" PRIu64 " bad=%" PRIu64 " maxseq=%" PRIu64 " empty=%" PRIu64 " stale=%" PRIu64 "\n", ok,
               bad, maxseq, empty, stale);
    return maxseq;
}

#define PAGE 4096
#define STAMP_MAGIC 0x5032505642444d45ULL /* "P2PVBDME" */

/* The memory checks of mem_mb: a static half and a churned half, see the top of this file. */
static struct {
    uint64_t *fixed, *churn;
    uint64_t fixed_words, churn_pages, sum, pass, next, checks, errors;
} mem;

static uint64_t fixed_sum(void)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < mem.fixed_words; i++)
        sum = (sum ^ mem.fixed[i]) * 0x100000001b3ULL;
    return sum;
}

static void mem_error(const char *what, uint64_t page, uint64_t have, uint64_t want)
{
    if (mem.errors++ < 20)
        printf("ERR 0 memory %s page=%" PRIu64 " have=%" PRIu64 " want=%" PRIu64 "\n", what, page, have, want);
}

static void mem_init(void)
{
    if (!opt_mem_mb)
        return;
    uint64_t half = opt_mem_mb << 19;
    if (posix_memalign((void **)&mem.fixed, PAGE, half) || posix_memalign((void **)&mem.churn, PAGE, half)) {
        printf("ERR 0 memory cannot allocate %" PRIu64 " MiB\n", opt_mem_mb);
        exit(1);
    }
    mem.fixed_words = half / 8;
    mem.churn_pages = half / PAGE;
    for (uint64_t i = 0; i < mem.fixed_words; i++)
        mem.fixed[i] = splitmix64(i);
    mem.sum = fixed_sum();
    for (uint64_t p = 0; p < mem.churn_pages; p++) {
        memset(mem.churn + p * (PAGE / 8), 0, PAGE);
        mem.churn[p * (PAGE / 8)] = STAMP_MAGIC ^ p;
    }
}

/* Stamp the next mem_churn pages with this pass, checking that each holds the previous one. */
static void mem_churn(void)
{
    for (uint64_t n = 0; n < opt_mem_churn && mem.churn_pages; n++) {
        uint64_t *w = mem.churn + mem.next * (PAGE / 8);
        if (w[0] != (STAMP_MAGIC ^ mem.next))
            mem_error("stamp", mem.next, w[0], STAMP_MAGIC ^ mem.next);
        else if (w[1] != mem.pass)
            mem_error("pass", mem.next, w[1], mem.pass);
        w[1] = mem.pass + 1;
        w[2 + (mem.pass % (PAGE / 8 - 2))] = mem.pass; /* a second store, elsewhere in the page */
        if (++mem.next == mem.churn_pages) {
            mem.next = 0;
            mem.pass++;
        }
    }
}

static void mem_check(void)
{
    if (!opt_mem_mb)
        return;
    uint64_t sum = fixed_sum();
    if (sum != mem.sum)
        mem_error("checksum", 0, sum, mem.sum);
    mem.checks++;
    if (!mem.errors)
        printf("MEM OK %" PRIu64 "\n", mem.checks);
}

static void idle_forever(uint64_t k)
{
    for (;;) {
        printf("ALIVE %" PRIu64 " %" PRIu64 "\n", k, now_ms());
        mem_check();
        for (int i = 0; i < 100; i++) {
            mem_churn();
            sleep_ms(10);
        }
    }
}

/* One record: write it durably, read it back, compare. Returns NULL or the reason it failed. */
static const char *put_record(int fd, unsigned char *buf, unsigned char *back, uint64_t seq)
{
    static char why[96];
    uint64_t slot = seq % opt_slots;
    fill_record(buf, seq);
    ssize_t n = pwrite(fd, buf, BLOCK, (off_t)(slot * BLOCK));
    if (n != BLOCK) {
        snprintf(why, sizeof why, "write %s", n < 0 ? strerror(errno) : "short");
        return why;
    }
    if (read_block(fd, back, slot)) {
        snprintf(why, sizeof why, "readback %s", strerror(errno));
        return why;
    }
    return memcmp(buf, back, BLOCK) ? "mismatch" : NULL;
}

static int write_mode(int fd, unsigned char *buf, unsigned char *back)
{
    uint64_t k = scan(fd, buf, back, 0) + 1, written = 0, last_alive = now_ms(), last_check = now_ms();
    printf("RESUME from=%" PRIu64 "\n", k);
    while (opt_count == 0 || written < opt_count) {
        const char *err = put_record(fd, buf, back, k);
        if (err) {
            printf("ERR %" PRIu64 " %s\n", k, err);
            sleep_ms(100);
            continue;
        }
        printf("REC %" PRIu64 " OK\n", k);
        written++;
        mem_churn();
        if (written % opt_alive_every == 0 || now_ms() - last_alive >= 1000) {
            last_alive = now_ms();
            printf("ALIVE %" PRIu64 " %" PRIu64 "\n", k, last_alive);
        }
        if (now_ms() - last_check >= 1000) {
            last_check = now_ms();
            mem_check();
        }
        k++;
        if (opt_delay_ms)
            sleep_ms(opt_delay_ms);
    }
    printf("WRITE DONE %" PRIu64 "\n", k - 1);
    idle_forever(k - 1);
    return 0;
}

/* A fast generator for bulk data (one xorshift step per 8 bytes): every block written is new data. */
static void fill_random(unsigned char *buf, size_t len, uint64_t *state)
{
    uint64_t x = *state;
    for (size_t i = 0; i + 8 <= len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    *state = x;
}

static void stream_mode(void)
{
    static unsigned char buf[65536];
    uint64_t state = 0x2545f4914f6cdd1dULL, sent = 0, last = now_ms();
    fill_random(buf, sizeof buf, &state);
    printf("GUEST READY\n");
    for (;;) {
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt_port), .sin_addr = opt_dst};
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&to, sizeof to) < 0) {
            printf("ERR 0 connect %s\n", strerror(errno));
            if (s >= 0)
                close(s);
            sleep_ms(500);
            continue;
        }
        printf("STREAM CONNECTED\n");
        for (;;) {
            ssize_t n = send(s, buf, sizeof buf, MSG_NOSIGNAL);
            if (n < 0) {
                printf("ERR 0 send %s\n", strerror(errno));
                break;
            }
            sent += (uint64_t)n;
            uint64_t t = now_ms();
            if (t - last >= 1000) {
                printf("STREAM %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", t, sent, t - last);
                sent = 0;
                last = t;
            }
        }
        close(s);
        sleep_ms(500);
    }
}

static int bench_mode(const char *dev)
{
    int fd = open(dev, O_RDWR | O_DIRECT | (opt_dsync ? O_DSYNC : 0));
    uint64_t size = 0;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) != 0) {
        printf("ERR 0 open %s %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t span = opt_span_mb ? opt_span_mb << 20 : size;
    if (opt_bs < BLOCK || opt_bs % BLOCK || span > size || span < opt_bs) {
        printf("ERR 0 bad bs=%" PRIu64 " or span of %" PRIu64 " bytes on a disk of %" PRIu64 "\n", opt_bs, span,
               size);
        return 2;
    }
    unsigned char *buf;
    if (posix_memalign((void **)&buf, BLOCK, opt_bs)) {
        printf("ERR 0 out of memory\n");
        return 1;
    }
    uint64_t blocks = span / opt_bs, state = 0x9e3779b97f4a7c15ULL ^ now_ms(), k = 0, done = 0, last = now_ms();
    printf("GUEST READY\n");
    for (;; k++) {
        uint64_t block = opt_rand ? splitmix64(state + k) % blocks : k % blocks;
        fill_random(buf, opt_bs, &state);
        ssize_t n = pwrite(fd, buf, opt_bs, (off_t)(block * opt_bs));
        if (n != (ssize_t)opt_bs) {
            printf("ERR %" PRIu64 " write %s\n", k, n < 0 ? strerror(errno) : "short");
            sleep_ms(100);
        } else
            done += opt_bs;
        uint64_t t = now_ms();
        if (t - last >= opt_every_ms) {
            printf("BENCH %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", t, done, t - last);
            done = 0;
            last = t;
        }
    }
}

static void parse_option(const char *arg)
{
    const char *eq = strchr(arg, '=');
    if (!eq)
        return;
    uint64_t v = strtoull(eq + 1, NULL, 10);
    size_t len = (size_t)(eq - arg);
    if (len == 5 && !strncmp(arg, "slots", 5) && v)
        opt_slots = v;
    else if (len == 8 && !strncmp(arg, "delay_ms", 8))
        opt_delay_ms = v;
    else if (len == 5 && !strncmp(arg, "count", 5))
        opt_count = v;
    else if (len == 11 && !strncmp(arg, "alive_every", 11) && v)
        opt_alive_every = v;
    else if (len == 5 && !strncmp(arg, "acked", 5))
        opt_acked = v;
    else if (len == 3 && !strncmp(arg, "dst", 3) && inet_pton(AF_INET, eq + 1, &opt_dst) == 1) {
    } else if (len == 4 && !strncmp(arg, "port", 4) && v)
        opt_port = v;
    else if (len == 2 && !strncmp(arg, "bs", 2))
        opt_bs = v;
    else if (len == 4 && !strncmp(arg, "rand", 4))
        opt_rand = v;
    else if (len == 7 && !strncmp(arg, "span_mb", 7))
        opt_span_mb = v;
    else if (len == 8 && !strncmp(arg, "every_ms", 8) && v)
        opt_every_ms = v;
    else if (len == 5 && !strncmp(arg, "dsync", 5))
        opt_dsync = v;
    else if (len == 6 && !strncmp(arg, "mem_mb", 6))
        opt_mem_mb = v;
    else if (len == 9 && !strncmp(arg, "mem_churn", 9))
        opt_mem_churn = v;
    else
        printf("WARN unknown option %s\n", arg);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "write";
    if (!strcmp(mode, "idle")) {
        printf("GUEST READY\n");
        idle_forever(0);
    }
    if (argc < 3) {
        printf("ERR 0 usage: workload write|verify|idle|stream|bench DEV [key=value...]\n");
        return 2;
    }
    for (int i = 3; i < argc; i++)
        parse_option(argv[i]);
    if (!strcmp(mode, "stream")) {
        stream_mode();
        return 0;
    }
    if (!strcmp(mode, "bench"))
        return bench_mode(argv[2]);
    int fd = open(argv[2], O_RDWR | O_DIRECT | O_SYNC);
    if (fd < 0) {
        printf("ERR 0 open %s %s\n", argv[2], strerror(errno));
        return 1;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) == 0 && size < opt_slots * BLOCK) {
        printf("ERR 0 disk of %" PRIu64 " bytes is smaller than %" PRIu64 " slots\n", size, opt_slots);
        return 1;
    }
    unsigned char *buf, *back;
    if (posix_memalign((void **)&buf, BLOCK, BLOCK) || posix_memalign((void **)&back, BLOCK, BLOCK)) {
        printf("ERR 0 out of memory\n");
        return 1;
    }
    printf("GUEST READY\n");
    if (!strcmp(mode, "verify")) {
        scan(fd, buf, back, 1);
        return 0;
    }
    if (!strcmp(mode, "write")) {
        mem_init();
        return write_mode(fd, buf, back);
    }
    printf("ERR 0 unknown mode %s\n", mode);
    return 2;
}
