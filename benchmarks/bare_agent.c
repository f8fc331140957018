/* benchmarks/bare_agent.py in C: an SPOE agent that only ACKs, with no interpreter in the way.
 *
 * The Python responder measures what HAProxy allows when the agent does nothing; this one
 * also measures what the round trips themselves cost on this machine, since it spends a few
 * hundred nanoseconds per NOTIFY where Python spends tens of microseconds. Its added latency
 * is the floor under any agent, in any language, that serves the same events: with --poll
 * it never sleeps (epoll_wait with a null timeout), as spoe-agent --busy-poll. --delay US
 * spins US microseconds after each read before writing its ACKs: what an agent's work before
 * its ACKs costs the request, with nothing else different.
 *
 *     cc -O2 -o bare_agent benchmarks/bare_agent.c
 *     ./bare_agent --port 12345 [--poll] [--delay US]
 *
 * One thread, epoll, non-blocking sockets. It answers HAPROXY-HELLO with version 2.0,
 * max-frame-size 16380 and pipelining, every NOTIFY with an empty ACK (its stream and frame
 * ids copied from the NOTIFY's bytes), HAPROXY-DISCONNECT with an AGENT-DISCONNECT, and closes
 * a health check's connection once answered. It checks nothing else: a benchmark instrument.
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
#define MAX_FRAME 16380

enum { HAPROXY_HELLO = 1, HAPROXY_DISCONNECT = 2, NOTIFY = 3,
       AGENT_HELLO = 101, AGENT_DISCONNECT = 102, ACK = 103 };

struct conn {
    int fd;
    size_t in_len, out_len;
    int closing, watching_out;
    unsigned char in[BUF_SIZE];
    unsigned char out[BUF_SIZE];
};

/* SPOP varints (SPOE.txt 3.1): one byte below 240, else 4 more bits per byte while >= 128. */
static size_t varint_len(const unsigned char *p, size_t avail) {
    size_t n = 1;
    if (avail == 0) return 0;
    if (p[0] < 240) return 1;
    while (n < avail && n < 10) {
        if (p[n++] < 128) return n;
    }
    return 0;
}

static size_t put_varint(unsigned char *p, uint64_t v) {
    size_t n = 0;
    if (v < 240) { p[0] = (unsigned char)v; return 1; }
    p[n++] = (unsigned char)(v | 240);
    v = (v - 240) >> 4;
    while (v >= 128) { p[n++] = (unsigned char)(v | 128); v = (v - 128) >> 7; }
    p[n++] = (unsigned char)v;
    return n;
}

static size_t put_str(unsigned char *p, const char *s) {
    size_t len = strlen(s), n = put_varint(p, len);
    memcpy(p + n, s, len);
    return n + len;
}

/* A frame with stream-id and frame-id 0 and flags FIN; returns its length, header included. */
static size_t put_frame(unsigned char *p, int type, const unsigned char *payload, size_t len) {
    uint32_t size = (uint32_t)(1 + 4 + 1 + 1 + len);
    p[0] = size >> 24; p[1] = size >> 16; p[2] = size >> 8; p[3] = size;
    p[4] = (unsigned char)type;
    p[5] = 0; p[6] = 0; p[7] = 0; p[8] = 1;
    p[9] = 0; p[10] = 0;
    memcpy(p + 11, payload, len);
    return 4 + size;
}

static size_t agent_hello(unsigned char *p) {
    unsigned char kv[128];
    size_t n = 0;
    n += put_str(kv + n, "version"); kv[n++] = 8; n += put_str(kv + n, "2.0");
    n += put_str(kv + n, "max-frame-size"); kv[n++] = 3; n += put_varint(kv + n, MAX_FRAME);
    n += put_str(kv + n, "capabilities"); kv[n++] = 8; n += put_str(kv + n, "pipelining");
    return put_frame(p, AGENT_HELLO, kv, n);
}

static size_t agent_disconnect(unsigned char *p) {
    unsigned char kv[64];
    size_t n = 0;
    n += put_str(kv + n, "status-code"); kv[n++] = 3; n += put_varint(kv + n, 0);
    n += put_str(kv + n, "message"); kv[n++] = 8; n += put_str(kv + n, "bye");
    return put_frame(p, AGENT_DISCONNECT, kv, n);
}

/* Frames in c->in answered into c->out; returns -1 if the connection is to be dropped. */
static int handle(struct conn *c) {
    size_t pos = 0;
    while (c->in_len - pos >= 4) {
        const unsigned char *f = c->in + pos;
        size_t size = ((size_t)f[0] << 24) | ((size_t)f[1] << 16) | ((size_t)f[2] << 8) | f[3];
        if (size < 7 || size > BUF_SIZE - 4) return -1;
        if (c->in_len - pos < 4 + size) break;
        if (c->out_len + 64 + 4 + size > BUF_SIZE) break; /* answer once out drains */
        const unsigned char *body = f + 4;
        size_t sl = varint_len(body + 5, size - 5);
        size_t fl = sl ? varint_len(body + 5 + sl, size - 5 - sl) : 0;
        if (!fl) return -1;
        unsigned char *o = c->out + c->out_len;
        if (body[0] == NOTIFY) {
            uint32_t n = (uint32_t)(1 + 4 + sl + fl);
            o[0] = n >> 24; o[1] = n >> 16; o[2] = n >> 8; o[3] = n;
            o[4] = ACK; o[5] = 0; o[6] = 0; o[7] = 0; o[8] = 1;
            memcpy(o + 9, body + 5, sl + fl);
            c->out_len += 4 + n;
        } else if (body[0] == HAPROXY_HELLO) {
            c->out_len += agent_hello(o);
            if (memmem(body, size, "healthcheck", 11)) c->closing = 1;
        } else if (body[0] == HAPROXY_DISCONNECT) {
            c->out_len += agent_disconnect(o);
            c->closing = 1;
        }
        pos += 4 + size;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 0;
}

static int flush_out(struct conn *c) {
    size_t sent = 0;
    while (sent < c->out_len) {
        ssize_t n = send(c->fd, c->out + sent, c->out_len - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        sent += (size_t)n;
    }
    memmove(c->out, c->out + sent, c->out_len - sent);
    c->out_len -= sent;
    return 0;
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

int main(int argc, char **argv) {
    int port = 0, poll_forever = 0;
    double delay = 0;
    const char *usage = "usage: %s --port PORT [--poll] [--delay US]\n";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--poll")) poll_forever = 1;
        else if (!strcmp(argv[i], "--delay") && i + 1 < argc) delay = atof(argv[++i]);
        else { fprintf(stderr, usage, argv[0]); return 2; }
    }
    if (port <= 0 || delay < 0) { fprintf(stderr, usage, argv[0]); return 2; }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 1024)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL }, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 64, poll_forever ? 0 : -1);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (c == NULL) { close(fd); continue; }
                    c->fd = fd;
                    struct epoll_event cev = { .events = EPOLLIN, .data.ptr = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            ssize_t got = 0;
            if (evs[i].events & EPOLLIN) {
                got = recv(c->fd, c->in + c->in_len, BUF_SIZE - c->in_len, 0);
                if (got == 0 || (got < 0 && errno != EAGAIN)) { drop(ep, c); continue; }
                if (got > 0) c->in_len += (size_t)got;
            }
            if (handle(c) < 0) {
                drop(ep, c);
                continue;
            }
            if (delay > 0 && got > 0 && c->out_len) {
                double until = now_us() + delay;
                while (now_us() < until) {}
            }
            if (flush_out(c) < 0 || (c->closing && c->out_len == 0)) {
                drop(ep, c);
                continue;
            }
            if (!c->out_len != !c->watching_out) { /* a syscall only when that changes */
                c->watching_out = c->out_len != 0;
                struct epoll_event cev = { .events = EPOLLIN | (c->out_len ? EPOLLOUT : 0),
                                           .data.ptr = c };
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
        }
    }
}
