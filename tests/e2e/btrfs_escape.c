/* Tries, from inside a project's container, every way of making a btrfs subvolume in a directory
 * (which would escape the project's qgroup): subvolume create v1/v2 and snapshot v1/v2 of the
 * directory's own subvolume, each also with the request number's upper 32 bits set (the kernel
 * truncates `cmd` to 32 bits; a filter comparing 64 bits would miss it). One line per attempt:
 * `<what> ok` or `<what> <errno name>`. Built static on the host by the e2e suite.
 *   usage: btrfs_escape DIR */
#include <errno.h>
#include <fcntl.h>
#include <linux/btrfs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *what, long r) {
    if (r == 0)
        printf("%s ok\n", what);
    else
        printf("%s %s\n", what, errno == EPERM ? "EPERM" : errno == EDQUOT ? "EDQUOT" : strerror(errno));
}

static long try(int fd, unsigned long req, int hi, void *arg) {
    unsigned long r = hi ? (req | (1UL << 32)) : req;
    return syscall(SYS_ioctl, fd, r, arg);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
        perror(argv[1]);
        return 2;
    }
    for (int hi = 0; hi < 2; hi++) {
        char what[64];
        struct btrfs_ioctl_vol_args a;
        struct btrfs_ioctl_vol_args_v2 b;

        memset(&a, 0, sizeof a);
        snprintf(a.name, sizeof a.name, "nested-create-v1%s", hi ? "-hi" : "");
        snprintf(what, sizeof what, "subvol_create%s", hi ? "_hi" : "");
        report(what, try(fd, BTRFS_IOC_SUBVOL_CREATE, hi, &a));

        memset(&b, 0, sizeof b);
        snprintf(b.name, sizeof b.name, "nested-create-v2%s", hi ? "-hi" : "");
        snprintf(what, sizeof what, "subvol_create_v2%s", hi ? "_hi" : "");
        report(what, try(fd, BTRFS_IOC_SUBVOL_CREATE_V2, hi, &b));

        memset(&a, 0, sizeof a);
        a.fd = fd;
        snprintf(a.name, sizeof a.name, "nested-snap-v1%s", hi ? "-hi" : "");
        snprintf(what, sizeof what, "snap_create%s", hi ? "_hi" : "");
        report(what, try(fd, BTRFS_IOC_SNAP_CREATE, hi, &a));

        memset(&b, 0, sizeof b);
        b.fd = fd;
        snprintf(b.name, sizeof b.name, "nested-snap-v2%s", hi ? "-hi" : "");
        snprintf(what, sizeof what, "snap_create_v2%s", hi ? "_hi" : "");
        report(what, try(fd, BTRFS_IOC_SNAP_CREATE_V2, hi, &b));
    }
    /* an ordinary ioctl must still work: FS_IOC_GETFLAGS on the directory */
    long flags = 0;
    report("getflags", ioctl(fd, 0x80086601UL, &flags));
    return 0;
}
