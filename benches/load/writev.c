// benches/load/writev.c — what the system call moat writes with costs against HAProxy's (issue 22,
// analysis.md "Run 24"): N writes of LEN bytes over a loopback TCP connection, each read back by the
// other end, as writev (two iovecs, as tokio writes a vectored buffer), send (one buffer) or sendmsg
// (two iovecs); prints CPU µs per write + read.
//
//   gcc -O2 -o /tmp/writev benches/load/writev.c
//   for m in 0 1 2; do taskset -c 0 /tmp/writev $m 300000 200; done   # 0 writev, 1 send, 2 sendmsg
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODE(0 writev, 1 send, 2 sendmsg) N LEN\n", argv[0]);
        return 64;
    }
    int mode = atoi(argv[1]), n = atoi(argv[2]), len = atoi(argv[3]);
    static char buf[65536], rb[65536];
    if (len < 2 || len > (int)sizeof buf) return 64;
    memset(buf, 'x', sizeof buf);

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &al)) return perror("listen"), 1;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) return perror("connect"), 1;
    int s = accept(l, 0, 0), one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    struct iovec iov[2] = {{buf, len / 2}, {buf + len / 2, len - len / 2}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
    double t0 = cpu_seconds();
    for (int i = 0; i < n; i++) {
        ssize_t w = mode == 0 ? writev(c, iov, 2)
                  : mode == 1 ? send(c, buf, len, MSG_NOSIGNAL)
                              : sendmsg(c, &m, MSG_NOSIGNAL);
        if (w != len) return perror("write"), 1;
        for (ssize_t got = 0, r; got < len; got += r)
            if ((r = recv(s, rb, sizeof rb, 0)) <= 0) return perror("recv"), 1;
    }
    double t1 = cpu_seconds();
    printf("%s len=%d: %.3f us per write+recv\n", mode == 0 ? "writev " : mode == 1 ? "send   " : "sendmsg", len,
           (t1 - t0) / n * 1e6);
    return 0;
}
