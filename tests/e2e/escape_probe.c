/* Tries, from inside a project's container, the privileged operations a hostile project would use
 * to break out or to lift its limits, each as one direct system call, and prints one line per
 * attempt: `<what> ok` or `<what> <errno name>`. The e2e suite asserts the errno of each (a refusal
 * for the wrong reason, say ENOENT because a path is missing, is a failure). Built static on the
 * host by the e2e suite.  usage: escape_probe */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static const char *name(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EROFS: return "EROFS";
    case ENOENT: return "ENOENT";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    default: return strerror(e);
    }
}

static void report(const char *what, long r) {
    if (r >= 0)
        printf("%s ok\n", what);
    else
        printf("%s %s\n", what, name(errno));
    fflush(stdout);
}

/* opens the first existing path for writing (the cgroup layout differs between v1 and v2) */
static long open_first_for_write(const char **paths) {
    for (; *paths; paths++) {
        if (access(*paths, F_OK) == 0)
            return open(*paths, O_WRONLY);
    }
    errno = ENOENT;
    return -1;
}

static long raise_limit(int res) {
    struct rlimit l;
    if (getrlimit(res, &l) != 0)
        return -1;
    if (l.rlim_max == RLIM_INFINITY) {
        errno = EEXIST; /* nothing to raise: reported, and the test refuses it */
        return -1;
    }
    l.rlim_max += 1;
    l.rlim_cur = l.rlim_max;
    return setrlimit(res, &l);
}

int main(void) {
    report("mount_tmpfs", mount("none", "/tmp", "tmpfs", 0, ""));
    report("mount_bind", mount("/home/user", "/tmp", NULL, MS_BIND, NULL));
    /* an ELF header: the permission check comes before the image is parsed */
    static const char elf[64] = "\x7f" "ELF\x02\x01\x01";
    report("init_module", syscall(SYS_init_module, elf, sizeof elf, ""));
    int self = open("/proc/self/exe", O_RDONLY);
    report("finit_module", syscall(SYS_finit_module, self, "", 0));
    report("chroot", chroot("/"));
    report("unshare_mount_ns", unshare(CLONE_NEWNS));
    report("mknod_block_device", mknod("/tmp/e2e-sda", S_IFBLK | 0600, makedev(8, 0)));
    /* the "shocker" escape: a file handle opened outside the container's mounts */
    struct {
        unsigned int bytes;
        int type;
        unsigned char h[8];
    } fh = {8, 1, {2, 0, 0, 0, 0, 0, 0, 0}};
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY));
    report("host_sysctl", open("/proc/sys/vm/overcommit_memory", O_WRONLY));
    report("host_sysfs", open("/sys/kernel/mm/transparent_hugepage/enabled", O_WRONLY));
    const char *pids[] = {"/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max", NULL};
    report("own_pids_limit", open_first_for_write(pids));
    const char *mem[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                         NULL};
    report("own_memory_limit", open_first_for_write(mem));
    report("raise_nofile", raise_limit(RLIMIT_NOFILE));
    report("raise_nproc", raise_limit(RLIMIT_NPROC));
    report("renice_below_0", setpriority(PRIO_PROCESS, 0, -5));
    report("sethostname", sethostname("e2e-escaped", 11));
    /* CAD off: harmless even if it were allowed, and it needs CAP_SYS_BOOT like a reboot */
    report("reboot", reboot(RB_DISABLE_CAD));
    return 0;
}
