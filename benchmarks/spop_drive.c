/* A load generator playing HAProxy's side of SPOP, in C, so that it takes almost no CPU.
 *
 * worker_wallclock.py uses it to time --workers N on this 2-core VM: the Python load generator
 * (spop_load.py) costs a good part of a core itself, so the agent never had its cores to
 * itself, and through HAProxy the front end needs a core of its own. This one replays the
 * traced requests spop_load.py encodes (8 NOTIFYs each, written by the Python side to POOL),
 * sequenced as HAProxy sends them: a request's next event only once the last one is ACKed.
 * Like HAProxy at saturation, it may send that next event over another of its connections
 * (--spread PERCENT of events, to a connection picked at random): an agent with several
 * workers must then route the event to its session's owner.
 *
 *     cc -O2 -o spop_drive benchmarks/spop_drive.c
 *     ./spop_drive --port P --pool FILE [--connections 8] [--window 20] [--spread 20]
 *                  [--duration 10] [--warmup 2] [--seed 1]
 *
 * POOL: a u32 (little-endian) length and the HAPROXY-HELLO frame, a u32 request count, then
 * per request a u8 frame count and per frame a u32 length and the whole frame (length prefix
 * included). Request i's frames carry stream id i, so an ACK names its request directly.
 *
 * It prints one line of JSON: the requests and ACKs completed in the measured window, its
 * length, and the errors (an ACK of a frame not awaited, a frame other than an ACK).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (1 << 20)
#define MAX_CONNS 256

enum { AGENT_HELLO = 101, AGENT_DISCONNECT = 102, ACK = 103 };

struct frame { uint32_t len; unsigned char *bytes; };
struct request { int nframes; struct frame *frames; };

struct conn {
    int fd;
    size_t in_len, out_len;
    unsigned char in[BUF_SIZE];
    unsigned char out[BUF_SIZE];
};

static struct request *pool;
static uint32_t pool_size;
static int *next_frame;   /* per request of the pool: the frame awaiting its ACK, -1 if idle */
static int *home;         /* per request: the connection its first event went to */
static struct conn *conns[MAX_CONNS];
static int nconns = 8, window = 20, spread = 20, epfd;
static uint64_t issued, completed, acks, errors;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(2); }

/* SPOP varint (SPOE.txt 3.1); returns the bytes read, 0 if incomplete. */
static size_t get_varint(const unsigned char *p, size_t avail, uint64_t *out) {
    size_t n = 1;
    unsigned shift = 4;
    uint64_t v;
    if (avail == 0) return 0;
    v = p[0];
    if (v < 240) { *out = v; return 1; }
    while (n < avail && n < 10) {
        v += (uint64_t)p[n] << shift;
        shift += 7;
        if (p[n++] < 128) { *out = v; return n; }
    }
    return 0;
}

static void queue(struct conn *c, const struct frame *f) {
    if (c->out_len + f->len > BUF_SIZE) { fprintf(stderr, "output buffer full\n"); exit(2); }
    memcpy(c->out + c->out_len, f->bytes, f->len);
    c->out_len += f->len;
}

static void flush(struct conn *c) {
    size_t off = 0;
    while (off < c->out_len) {
        ssize_t n = send(c->fd, c->out + off, c->out_len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {   /* the agent is not reading: wait for it, briefly */
                struct timespec pause = {0, 20000};
                nanosleep(&pause, NULL);
                continue;
            }
            die("send");
        }
        off += (size_t)n;
    }
    c->out_len = 0;
}

static int pick(int own) {
    if (spread > 0 && nconns > 1 && rand() % 100 < spread) return rand() % nconns;
    return own;
}

static void start_request(int conn_index) {
    uint32_t r = (uint32_t)(issued++ % pool_size);
    if (next_frame[r] >= 0) { fprintf(stderr, "pool too small for what is in flight\n"); exit(2); }
    next_frame[r] = 0;
    home[r] = conn_index;
    queue(conns[conn_index], &pool[r].frames[0]);
}

static void on_ack(uint64_t sid, uint64_t fid, int measuring) {
    uint32_t r = (uint32_t)(sid % pool_size);
    /* Request r's frames carry frame ids 1, 2, ...: only the one awaited may be ACKed. */
    if (sid >= pool_size || next_frame[r] < 0 || fid != (uint64_t)next_frame[r] + 1) {
        errors++;
        return;
    }
    if (measuring) acks++;
    if (++next_frame[r] < pool[r].nframes) {
        queue(conns[pick(home[r])], &pool[r].frames[next_frame[r]]);
        return;
    }
    next_frame[r] = -1;
    if (measuring) completed++;
    start_request(home[r]);   /* the connection keeps its window of requests in flight */
}

/* Whole frames in c->in: ACKs move their request on; returns -1 on an AGENT-DISCONNECT. */
static int read_frames(struct conn *c, int measuring) {
    size_t pos = 0;
    while (c->in_len - pos >= 4) {
        uint32_t len = ((uint32_t)c->in[pos] << 24) | ((uint32_t)c->in[pos + 1] << 16) |
                       ((uint32_t)c->in[pos + 2] << 8) | c->in[pos + 3];
        const unsigned char *f = c->in + pos + 4;
        uint64_t sid, fid;
        size_t n1, n2;
        if (c->in_len - pos - 4 < len) break;
        if (len < 7 || f[0] != ACK) {
            if (len >= 1 && f[0] == AGENT_DISCONNECT) return -1;
            errors++;
        } else if ((n1 = get_varint(f + 5, len - 5, &sid)) == 0 ||
                   (n2 = get_varint(f + 5 + n1, len - 5 - n1, &fid)) == 0) {
            errors++;
        } else {
            on_ack(sid, fid, measuring);
        }
        pos += 4 + len;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 0;
}

static void load_pool(const char *path, struct frame *hello) {
    FILE *fp = fopen(path, "rb");
    uint32_t i;
    if (!fp) die(path);
#define READ(ptr, size) do { if (fread((ptr), 1, (size), fp) != (size_t)(size)) die("pool"); } while (0)
    READ(&hello->len, 4);
    hello->bytes = malloc(hello->len);
    READ(hello->bytes, hello->len);
    READ(&pool_size, 4);
    pool = calloc(pool_size, sizeof *pool);
    next_frame = malloc(pool_size * sizeof *next_frame);
    home = calloc(pool_size, sizeof *home);
    for (i = 0; i < pool_size; i++) {
        unsigned char count;
        int k;
        READ(&count, 1);
        pool[i].nframes = count;
        pool[i].frames = calloc(count, sizeof(struct frame));
        for (k = 0; k < count; k++) {
            READ(&pool[i].frames[k].len, 4);
            pool[i].frames[k].bytes = malloc(pool[i].frames[k].len);
            READ(pool[i].frames[k].bytes, pool[i].frames[k].len);
        }
        next_frame[i] = -1;
    }
#undef READ
    fclose(fp);
}

static void handshake(struct conn *c, const struct frame *hello) {
    queue(c, hello);
    flush(c);
    for (;;) {   /* blocking until the AGENT-HELLO is whole */
        ssize_t n = recv(c->fd, c->in + c->in_len, BUF_SIZE - c->in_len, 0);
        uint32_t len;
        if (n <= 0) die("handshake");
        c->in_len += (size_t)n;
        if (c->in_len < 4) continue;
        len = ((uint32_t)c->in[0] << 24) | ((uint32_t)c->in[1] << 16) |
              ((uint32_t)c->in[2] << 8) | c->in[3];
        if (c->in_len < 4 + len) continue;
        if (len < 1 || c->in[4] != AGENT_HELLO) { fprintf(stderr, "no AGENT-HELLO\n"); exit(2); }
        memmove(c->in, c->in + 4 + len, c->in_len - 4 - len);
        c->in_len -= 4 + len;
        return;
    }
}

int main(int argc, char **argv) {
    int port = 0, i, seed = 1, filled;
    double duration = 10, warmup = 2, t0, start_at, end_at;
    const char *pool_path = NULL;
    struct frame hello;
    struct epoll_event ev, events[MAX_CONNS];
    for (i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--pool")) pool_path = argv[i + 1];
        else if (!strcmp(argv[i], "--connections")) nconns = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--window")) window = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--spread")) spread = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) seed = atoi(argv[i + 1]);
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 64; }
    }
    if (!port || !pool_path || nconns < 1 || nconns > MAX_CONNS || window < 1) {
        fprintf(stderr, "usage: %s --port P --pool FILE [--connections N<=%d] [--window W] "
                "[--spread PERCENT] [--duration S] [--warmup S] [--seed N]\n", argv[0], MAX_CONNS);
        return 64;
    }
    srand((unsigned)seed);
    load_pool(pool_path, &hello);
    if ((uint64_t)nconns * (uint64_t)window * 4 > pool_size) {
        fprintf(stderr, "the pool needs at least 4 x connections x window requests\n");
        return 64;
    }
    if ((epfd = epoll_create1(0)) < 0) die("epoll_create1");
    for (i = 0; i < nconns; i++) {
        struct sockaddr_in addr = {0};
        int one = 1;
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        conns[i] = c;
        addr.sin_family = AF_INET;
        addr.sin_port = htons((uint16_t)port);
        addr.sin_addr.s_addr = htonl(0x7f000001);
        if ((c->fd = socket(AF_INET, SOCK_STREAM, 0)) < 0) die("socket");
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        handshake(c, &hello);
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    }
    /* One request per connection per turn of the loop until each has its window: started at
     * once, a connection's requests would go through their events in lockstep, every read
     * holding one event of each (a pattern HAProxy never sends, and kind to any cache). */
    for (i = 0; i < nconns; i++) {
        start_request(i);
        flush(conns[i]);
    }
    filled = 1;
    t0 = now();
    start_at = t0 + warmup;
    end_at = start_at + duration;
    for (;;) {
        double t = now();
        int measuring = t >= start_at, n, k;
        if (t >= end_at) break;
        n = epoll_wait(epfd, events, MAX_CONNS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (k = 0; k < n; k++) {
            struct conn *c = conns[events[k].data.u32];
            ssize_t got = recv(c->fd, c->in + c->in_len, BUF_SIZE - c->in_len, MSG_DONTWAIT);
            if (got == 0) { fprintf(stderr, "the agent closed a connection\n"); return 1; }
            if (got < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                die("recv");
            }
            c->in_len += (size_t)got;
            if (read_frames(c, measuring) < 0) {
                fprintf(stderr, "the agent disconnected\n");
                return 1;
            }
        }
        if (filled < window) {
            for (i = 0; i < nconns; i++) start_request(i);
            filled++;
        }
        for (i = 0; i < nconns; i++) {
            if (conns[i]->out_len) flush(conns[i]);
        }
    }
    printf("{\"requests\": %llu, \"acks\": %llu, \"seconds\": %.3f, \"errors\": %llu}\n",
           (unsigned long long)completed, (unsigned long long)acks, duration,
           (unsigned long long)errors);
    return 0;
}
