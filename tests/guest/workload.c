/*
 * Guest workload for p2pvbd's VM tests: writes numbered, self-checking records to a virtio disk so
 * the host can prove, after a migration, that every write the guest saw acknowledged is still there.
 *
 *   workload write  DEV [slots=N] [delay_ms=D] [count=C] [alive_every=A]
 *   workload verify DEV [slots=N] [acked=K]
 *   workload idle
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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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

static void idle_forever(uint64_t k)
{
    for (;;) {
        printf("ALIVE %" PRIu64 " %" PRIu64 "\n", k, now_ms());
        sleep_ms(1000);
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
    uint64_t k = scan(fd, buf, back, 0) + 1, written = 0, last_alive = now_ms();
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
        if (written % opt_alive_every == 0 || now_ms() - last_alive >= 1000) {
            last_alive = now_ms();
            printf("ALIVE %" PRIu64 " %" PRIu64 "\n", k, last_alive);
        }
        k++;
        if (opt_delay_ms)
            sleep_ms(opt_delay_ms);
    }
    printf("WRITE DONE %" PRIu64 "\n", k - 1);
    idle_forever(k - 1);
    return 0;
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
        printf("ERR 0 usage: workload write|verify|idle DEV [key=value...]\n");
        return 2;
    }
    for (int i = 3; i < argc; i++)
        parse_option(argv[i]);
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
    if (!strcmp(mode, "write"))
        return write_mode(fd, buf, back);
    printf("ERR 0 unknown mode %s\n", mode);
    return 2;
}
