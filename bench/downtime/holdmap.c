// holdmap: the workload of the downtime benchmark's fd-held case. Inside a container it
// creates BPF maps, fills them with BPF_MAP_UPDATE_BATCH and keeps them open by fd (nothing
// pinned), so that only CRIU (with mapsnap's plugin) can carry them across a checkpoint.
//
// Build: cc -O2 -static -o holdmap holdmap.c        (raw bpf(2): no libbpf in the image)
// Run:   holdmap READY_FILE [TYPE:ENTRIES:VALUE_SIZE ...]
//        TYPE is hash, lru_hash, percpu_hash or array. Entry i has key i (4 bytes) and a
//        value whose first 4 bytes are i, as bench/anchors/fill_map.c. With no map it only
//        waits (the baseline container). READY_FILE is written once every map is full.
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static long sys_bpf(int cmd, union bpf_attr *attr) {
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int possible_cpus(void) {
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int lo = 0, hi = 0;
    if (!f || fscanf(f, "%d-%d", &lo, &hi) < 1) return (int)sysconf(_SC_NPROCESSORS_CONF);
    fclose(f);
    return hi >= lo ? hi + 1 : lo + 1;
}

static int make_map(const char *spec) {
    char tname[32];
    long n;
    int vs;
    if (sscanf(spec, "%31[a-z_]:%ld:%d", tname, &n, &vs) != 3 || n <= 0 || vs <= 0) {
        fprintf(stderr, "holdmap: bad map spec %s (TYPE:ENTRIES:VALUE_SIZE)\n", spec);
        return -1;
    }
    int type, percpu = 0;
    if (!strcmp(tname, "hash")) type = BPF_MAP_TYPE_HASH;
    else if (!strcmp(tname, "lru_hash")) type = BPF_MAP_TYPE_LRU_HASH;
    else if (!strcmp(tname, "array")) type = BPF_MAP_TYPE_ARRAY;
    else if (!strcmp(tname, "percpu_hash")) { type = BPF_MAP_TYPE_PERCPU_HASH; percpu = 1; }
    else { fprintf(stderr, "holdmap: unknown map type %s\n", tname); return -1; }
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_type = type;
    a.key_size = 4;
    a.value_size = vs;
    // An LRU map evicts before it is full (per-CPU free lists): room for twice the entries,
    // as in the downtime script's pinned LRU maps.
    a.max_entries = (unsigned)(type == BPF_MAP_TYPE_LRU_HASH ? 2 * n : n);
    strncpy(a.map_name, "held", sizeof(a.map_name) - 1);
    int fd = (int)sys_bpf(BPF_MAP_CREATE, &a);
    if (fd < 0) { perror("holdmap: BPF_MAP_CREATE"); return -1; }
    size_t slot = percpu ? (size_t)((vs + 7) & ~7) * possible_cpus() : (size_t)vs;
    unsigned *keys = malloc(4 * (size_t)n);
    char *vals = calloc((size_t)n, slot);
    if (!keys || !vals) { perror("holdmap: malloc"); return -1; }
    for (long i = 0; i < n; i++) {
        keys[i] = (unsigned)i;
        memcpy(vals + i * slot, &i, 4);
    }
    for (long done = 0; done < n;) {
        unsigned count = (unsigned)(n - done < 65536 ? n - done : 65536);
        memset(&a, 0, sizeof(a));
        a.batch.map_fd = fd;
        a.batch.keys = (unsigned long)(keys + done);
        a.batch.values = (unsigned long)(vals + done * slot);
        a.batch.count = count;
        if (sys_bpf(BPF_MAP_UPDATE_BATCH, &a)) { perror("holdmap: BPF_MAP_UPDATE_BATCH"); return -1; }
        done += count;
    }
    free(keys);
    free(vals);
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s READY_FILE [TYPE:ENTRIES:VALUE_SIZE ...]\n", argv[0]); return 2; }
    for (int i = 2; i < argc; i++)
        if (make_map(argv[i]) < 0) return 1;
    FILE *r = fopen(argv[1], "w");
    if (!r) { perror("holdmap: ready file"); return 1; }
    fclose(r);
    for (;;) pause();
}
