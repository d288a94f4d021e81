// SPDX-License-Identifier: Apache-2.0
// The in-container test app (statically linked with libbpf).
//
//   app run     DIR IFNAME OBJ   load OBJ (its maps pinned by name under /sys/fs/bpf, reused
//                                when already pinned), attach XDP to IFNAME through netlink,
//                                close every BPF fd, write DIR/ready, then idle; whenever
//                                DIR/attach appears: do the same again (re-attach, reusing the
//                                pinned maps), remove DIR/attach and write DIR/attached.N
//   app attach  DIR IFNAME OBJ   load and attach once, then exit
//
// It holds no BPF program, link or map fd while idle, so CRIU can checkpoint it. Errors go
// to DIR/error.
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_link.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

static const char *dir;

static void put_file(const char *name, const char *fmt, ...)
{
    char path[512], tmp[520];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fclose(f);
    rename(tmp, path);
}

static int load_and_attach(const char *ifname, const char *obj_path)
{
    unsigned ifindex = if_nametoindex(ifname);
    if (!ifindex) {
        put_file("error", "no interface %s: %s\n", ifname, strerror(errno));
        return -1;
    }
    struct bpf_object *obj = bpf_object__open_file(obj_path, NULL);
    if (!obj) {
        put_file("error", "open %s: %s\n", obj_path, strerror(errno));
        return -1;
    }
    int err = bpf_object__load(obj);
    if (err) {
        put_file("error", "load %s: %s\n", obj_path, strerror(-err));
        bpf_object__close(obj);
        return -1;
    }
    struct bpf_program *prog = bpf_object__find_program_by_name(obj, "count_packets");
    if (!prog) {
        put_file("error", "no program count_packets in %s\n", obj_path);
        bpf_object__close(obj);
        return -1;
    }
    // Legacy (netlink) attach in generic mode: the interface keeps the program after its fd
    // is closed. Replaces a program already attached.
    err = bpf_xdp_attach(ifindex, bpf_program__fd(prog), XDP_FLAGS_SKB_MODE, NULL);
    if (err) {
        put_file("error", "attach XDP to %s: %s\n", ifname, strerror(-err));
        bpf_object__close(obj);
        return -1;
    }
    bpf_object__close(obj); // closes every program and map fd; pins and the attachment stay
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s run|attach DIR IFNAME OBJ\n", argv[0]);
        return 2;
    }
    dir = argv[2];
    if (load_and_attach(argv[3], argv[4]))
        return 1;
    if (strcmp(argv[1], "attach") == 0)
        return 0;
    put_file("ready", "%d\n", (int)getpid());
    char trigger[512];
    snprintf(trigger, sizeof(trigger), "%s/attach", dir);
    for (int n = 1;; ) {
        usleep(50 * 1000);
        if (access(trigger, F_OK) != 0)
            continue;
        unlink(trigger);
        if (load_and_attach(argv[3], argv[4]) == 0) {
            char name[32];
            snprintf(name, sizeof(name), "attached.%d", n++);
            put_file(name, "%d\n", (int)getpid());
        }
    }
}
