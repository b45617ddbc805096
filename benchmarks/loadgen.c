/* One load client for authd, Cyrus saslauthd and Dovecot auth, so the peers are driven alike.
 *
 * Compiled by benchmarks/bench_peers.py with gcc at run time. A Python client would cost more
 * CPU per request than the daemons it measures, on the same two cores; this one costs a few
 * microseconds. Each of CONNS threads runs one request at a time, blocking, for SECONDS:
 *
 *   loadgen sasl    SOCKET CONNS SECONDS USER PASSWORD SERVICE   one connection per request
 *   loadgen dovecot SOCKET CONNS SECONDS USER PASSWORD SERVICE   AUTH PLAIN, persistent
 *   loadgen native  SOCKET CONNS SECONDS USER PASSWORD SERVICE   authd's "auth", persistent
 *   loadgen session SOCKET CONNS SECONDS TOKEN                   authd's "session", persistent
 *   loadgen check   SOCKET CONNS SECONDS TOKEN PERMISSION        authd's "check", persistent
 *   loadgen hello   SOCKET CONNS SECONDS                         authd's "hello", persistent
 *
 * Prints one line: "ok N failed N errors N p50_us X p99_us Y"; failed = the server said no,
 * errors = the connection broke (a broken persistent connection ends that thread).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum mode { SASL, DOVECOT, NATIVE, SESSION, CHECK, HELLO };

static enum mode mode;
static const char *path;
static char request[4096];
static size_t request_len;
static double stop_at;
static pthread_barrier_t ready, go; /* all connected; the window has started */

struct worker {
    pthread_t thread;
    double *lat;
    size_t n, cap;
    long ok, failed, errors;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int dial(void) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A line reader over one connection; the servers answer one line per request. */
struct lines {
    int fd;
    char buf[65536];
    size_t start, end;
};

static char *read_line(struct lines *r) {
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl) {
            char *line = r->buf + r->start;
            *nl = 0;
            r->start = (size_t)(nl - r->buf) + 1;
            return line;
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        if (r->end == sizeof r->buf)
            return NULL;
        ssize_t n = read(r->fd, r->buf + r->end, sizeof r->buf - r->end);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return NULL;
        r->end += (size_t)n;
    }
}

static void record(struct worker *w, double latency) {
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 65536;
        w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
        if (!w->lat)
            abort();
    }
    w->lat[w->n++] = latency;
}

/* saslauthd: connect, send the counted strings, read a counted reply, close. */
static int sasl_once(void) {
    int fd = dial();
    if (fd < 0)
        return -1;
    unsigned char reply[1026];
    size_t got = 0, want = 2;
    int result = -1;
    if (write_all(fd, request, request_len) == 0) {
        while (got < want) {
            ssize_t n = read(fd, reply + got, want - got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += (size_t)n;
            if (got == 2) {
                want = 2 + ((size_t)reply[0] << 8 | reply[1]);
                if (want > sizeof reply)
                    break;
            }
        }
        if (got == want && want >= 4)
            result = memcmp(reply + 2, "OK", 2) == 0;
    }
    close(fd);
    return result;
}

static void *run(void *arg) {
    struct worker *w = arg;
    struct lines *r = calloc(1, sizeof *r);
    r->fd = -1;
    if (mode != SASL) {
        r->fd = dial();
        if (r->fd < 0) {
            w->errors++;
        } else if (mode == DOVECOT) {
            char hello[64];
            int len = snprintf(hello, sizeof hello, "VERSION\t1\t2\nCPID\t%d\n", (int)getpid());
            char *line;
            while ((line = read_line(r)) && strcmp(line, "DONE") != 0)
                ;
            if (!line || write_all(r->fd, hello, (size_t)len) < 0) {
                w->errors++;
                close(r->fd);
                r->fd = -1;
            }
        }
    }
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    if (mode != SASL && r->fd < 0)
        return NULL;
    unsigned long id = 0;
    char buf[4096];
    double t0;
    while ((t0 = now()) < stop_at) {
        int ok;
        if (mode == SASL) {
            ok = sasl_once();
        } else {
            int len = snprintf(buf, sizeof buf, request, ++id);
            ok = -1;
            if (write_all(r->fd, buf, (size_t)len) == 0) {
                char *line = read_line(r);
                if (line) {
                    if (mode == DOVECOT)
                        ok = strncmp(line, "OK\t", 3) == 0;
                    else
                        ok = strstr(line, "\"ok\":true") != NULL;
                }
            }
        }
        double t1 = now();
        if (ok < 0) {
            w->errors++;
            if (mode != SASL)
                break;
            continue;
        }
        if (t1 > stop_at)
            break;
        record(w, t1 - t0);
        if (ok)
            w->ok++;
        else
            w->failed++;
    }
    if (r->fd >= 0)
        close(r->fd);
    free(r);
    return NULL;
}

static size_t counted(char *out, const char *s) {
    size_t n = strlen(s);
    out[0] = (char)(n >> 8);
    out[1] = (char)(n & 0xff);
    memcpy(out + 2, s, n);
    return n + 2;
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0, o = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = a[v >> 18];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = a[(v >> 6) & 63];
        out[o++] = a[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = a[v >> 18];
        out[o++] = a[(v >> 12) & 63];
        out[o++] = i + 1 < n ? a[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fputs("usage: loadgen sasl|dovecot|native SOCKET CONNS SECONDS USER PASSWORD SERVICE\n"
          "       loadgen session SOCKET CONNS SECONDS TOKEN\n"
          "       loadgen check SOCKET CONNS SECONDS TOKEN PERMISSION\n"
          "       loadgen hello SOCKET CONNS SECONDS\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 5)
        usage();
    const char *name = argv[1];
    path = argv[2];
    int conns = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (conns < 1 || seconds <= 0)
        usage();
    int credentials = argc == 8;
    if (!strcmp(name, "sasl") && credentials) {
        mode = SASL;
        request_len = counted(request, argv[5]);
        request_len += counted(request + request_len, argv[6]);
        request_len += counted(request + request_len, argv[7]);
        request_len += counted(request + request_len, "");
    } else if (!strcmp(name, "dovecot") && credentials) {
        mode = DOVECOT;
        unsigned char plain[1024];
        char encoded[1400];
        size_t u = strlen(argv[5]), p = strlen(argv[6]);
        if (u + p + 2 > sizeof plain)
            usage();
        plain[0] = 0;
        memcpy(plain + 1, argv[5], u);
        plain[1 + u] = 0;
        memcpy(plain + 2 + u, argv[6], p);
        base64(plain, u + p + 2, encoded);
        snprintf(request, sizeof request,
                 "AUTH\t%%lu\tPLAIN\tservice=%s\tnologin\tlip=127.0.0.1\trip=127.0.0.1\tsecured\tresp=%s\n",
                 argv[7], encoded);
    } else if (!strcmp(name, "native") && credentials) {
        mode = NATIVE;
        snprintf(request, sizeof request,
                 "{\"id\":%%lu,\"op\":\"auth\",\"user\":\"%s\",\"password\":\"%s\",\"service\":\"%s\","
                 "\"rhost\":\"127.0.0.1\",\"open_session\":false}\n",
                 argv[5], argv[6], argv[7]);
    } else if (!strcmp(name, "session") && argc == 6) {
        mode = SESSION;
        snprintf(request, sizeof request, "{\"id\":%%lu,\"op\":\"session\",\"token\":\"%s\"}\n", argv[5]);
    } else if (!strcmp(name, "check") && argc == 7) {
        mode = CHECK;
        snprintf(request, sizeof request, "{\"id\":%%lu,\"op\":\"check\",\"token\":\"%s\",\"permission\":\"%s\"}\n",
                 argv[5], argv[6]);
    } else if (!strcmp(name, "hello") && argc == 5) {
        mode = HELLO;
        snprintf(request, sizeof request, "{\"id\":%%lu,\"op\":\"hello\"}\n");
    } else {
        usage();
    }
    struct worker *workers = calloc((size_t)conns, sizeof *workers);
    pthread_barrier_init(&ready, NULL, (unsigned)conns + 1);
    pthread_barrier_init(&go, NULL, (unsigned)conns + 1);
    for (int i = 0; i < conns; i++)
        pthread_create(&workers[i].thread, NULL, run, &workers[i]);
    /* The window starts once the last thread has connected (and read Dovecot's handshake). */
    pthread_barrier_wait(&ready);
    stop_at = now() + seconds;
    pthread_barrier_wait(&go);
    long ok = 0, failed = 0, errors = 0;
    size_t n = 0;
    for (int i = 0; i < conns; i++) {
        pthread_join(workers[i].thread, NULL);
        ok += workers[i].ok;
        failed += workers[i].failed;
        errors += workers[i].errors;
        n += workers[i].n;
    }
    double *all = malloc((n ? n : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < conns; i++) {
        memcpy(all + k, workers[i].lat, workers[i].n * sizeof *all);
        k += workers[i].n;
    }
    qsort(all, n, sizeof *all, cmp);
    double p50 = n ? all[(size_t)(0.50 * (double)(n - 1))] : 0;
    double p99 = n ? all[(size_t)(0.99 * (double)(n - 1))] : 0;
    printf("ok %ld failed %ld errors %ld p50_us %.0f p99_us %.0f\n", ok, failed, errors, p50 * 1e6, p99 * 1e6);
    return 0;
}
