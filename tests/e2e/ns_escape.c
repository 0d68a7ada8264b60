/* Tries to make or join namespaces and to mount, the way an escape would start; then checks that
 * fork and threads still work. One line per attempt: "<what> ok" or "<what> errno=<n>".
 * Built static on the host by the e2e test (tests/e2e/isolation.rs) and run inside a project. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x80
#endif

static const struct { unsigned long flag; const char *name; } NS[] = {
    {CLONE_NEWUSER, "NEWUSER"}, {CLONE_NEWNS, "NEWNS"},         {CLONE_NEWNET, "NEWNET"},
    {CLONE_NEWPID, "NEWPID"},   {CLONE_NEWIPC, "NEWIPC"},       {CLONE_NEWUTS, "NEWUTS"},
    {CLONE_NEWCGROUP, "NEWCGROUP"},
};

static void report(const char *what, long r) {
    if (r < 0)
        printf("%s errno=%d\n", what, errno);
    else
        printf("%s ok\n", what);
}

/* raw clone: child exits at once; returns the syscall's result */
static long raw_clone(unsigned long flags) {
    long r = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, 0, 0);
    return r;
}

static long raw_clone3(unsigned long flags) {
    struct clone_args a;
    memset(&a, 0, sizeof a);
    a.flags = flags;
    a.exit_signal = SIGCHLD;
    long r = syscall(SYS_clone3, &a, sizeof a);
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, 0, 0);
    return r;
}

static void *thread_main(void *p) { return p; }

int main(void) {
    char what[64];
    setvbuf(stdout, 0, _IOLBF, 0);
    /* the ordinary things first (a namespace that was made would change them) */
    report("unshare-files", unshare(CLONE_FILES));
    report("clone-plain", raw_clone(0));
    pid_t p = fork();
    if (p == 0) _exit(7);
    int st = 0;
    long w = p > 0 ? waitpid(p, &st, 0) : -1;
    report("fork", (w == p && WIFEXITED(st) && WEXITSTATUS(st) == 7) ? 0 : -1);
    int threads_ok = 1;
    for (int i = 0; i < 8; i++) {
        pthread_t t;
        void *ret = 0;
        if (pthread_create(&t, 0, thread_main, (void *)(intptr_t)(i + 1)) != 0 ||
            pthread_join(t, &ret) != 0 || ret != (void *)(intptr_t)(i + 1))
            threads_ok = 0;
    }
    errno = EAGAIN;
    report("threads", threads_ok ? 0 : -1);
    for (size_t i = 0; i < sizeof NS / sizeof NS[0]; i++) {
        snprintf(what, sizeof what, "unshare-%s", NS[i].name);
        report(what, unshare((int)NS[i].flag));
        snprintf(what, sizeof what, "clone-%s", NS[i].name);
        report(what, raw_clone(NS[i].flag));
        snprintf(what, sizeof what, "clone3-%s", NS[i].name);
        report(what, raw_clone3(NS[i].flag));
    }
    report("unshare-NEWTIME", unshare(CLONE_NEWTIME));
    report("clone3-plain", raw_clone3(0));
    int fd = open("/proc/self/ns/net", O_RDONLY);
    report("setns", setns(fd, 0));
    report("mount", mount("none", "/tmp", "tmpfs", 0, 0));
    return 0;
}
