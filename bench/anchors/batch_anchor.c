// batch_anchor: the speed limit for reading and writing one BPF map from user space.
//
// It creates a map, fills it with BPF_MAP_UPDATE_BATCH, then reads it back twice:
// element by element (GET_NEXT_KEY + LOOKUP, what bpftool does) and with
// BPF_MAP_LOOKUP_BATCH. Nothing is compressed or written anywhere: any tool that
// dumps or restores maps can only be slower than these loops. Each result is one
// JSON line on stdout.
//
// Build: cc -O2 -o batch_anchor batch_anchor.c -lbpf      (Debian: libbpf-dev)
// Run:   ./batch_anchor [entries] [value_size] [hash|percpu_hash|array|percpu_array|lru_hash|lpm_trie] [batch]
//                        [key_size] [max_entries] [dumps]
// key_size (default 4, lpm_trie 8): key i holds i in its first 4 bytes (lpm_trie: {32, i}), the
// rest zero. max_entries (default entries) sizes the map beyond what is filled (a nearly empty
// LRU, say). dumps (default 1) repeats the lookup_batch loop and reports the time of one full
// dump (the mean): small maps read in microseconds.
// lpm_trie was added for mapsnap's benchmark (8-byte keys {32, i}, BPF_F_NO_PREALLOC); copied
// from the team's shared anchors so the benchmark needs nothing outside the repository.
//        root, or CAP_BPF + CAP_SYS_ADMIN, is needed.
#include <bpf/bpf.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int possible_cpus(void) {
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int lo = 0, hi = 0;
    if (!f || fscanf(f, "%d-%d", &lo, &hi) < 1) return (int)sysconf(_SC_NPROCESSORS_CONF);
    fclose(f);
    return hi >= lo ? hi + 1 : lo + 1;
}

static void report(const char *op, const char *type, long n, int vs, double secs) {
    printf("{\"op\":\"%s\",\"type\":\"%s\",\"entries\":%ld,\"value_size\":%d,"
           "\"seconds\":%.6f,\"entries_per_sec\":%.0f}\n", op, type, n, vs, secs, n / secs);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int vs = argc > 2 ? atoi(argv[2]) : 64;
    const char *tname = argc > 3 ? argv[3] : "hash";
    __u32 batch = argc > 4 ? (__u32)atoi(argv[4]) : 4096;
    enum bpf_map_type type;
    int percpu = 0;
    if (!strcmp(tname, "hash")) type = BPF_MAP_TYPE_HASH;
    else if (!strcmp(tname, "lru_hash")) type = BPF_MAP_TYPE_LRU_HASH;
    else if (!strcmp(tname, "lpm_trie")) type = BPF_MAP_TYPE_LPM_TRIE;
    else if (!strcmp(tname, "array")) type = BPF_MAP_TYPE_ARRAY;
    else if (!strcmp(tname, "percpu_hash")) { type = BPF_MAP_TYPE_PERCPU_HASH; percpu = 1; }
    else if (!strcmp(tname, "percpu_array")) { type = BPF_MAP_TYPE_PERCPU_ARRAY; percpu = 1; }
    else { fprintf(stderr, "unknown map type %s\n", tname); return 2; }
    int lpm = type == BPF_MAP_TYPE_LPM_TRIE;
    size_t ks = argc > 5 ? (size_t)atoi(argv[5]) : (lpm ? 8 : 4);
    long max = argc > 6 ? atol(argv[6]) : n;
    long dumps = argc > 7 ? atol(argv[7]) : 1;
    if (ks < (lpm ? 8u : 4u) || max < n || dumps < 1) { fprintf(stderr, "bad key size, max_entries or dumps\n"); return 2; }

    // The kernel's value layout: per-CPU maps carry one 8-byte aligned slot per possible CPU.
    size_t slot = percpu ? (size_t)((vs + 7) & ~7) * possible_cpus() : (size_t)vs;
    DECLARE_LIBBPF_OPTS(bpf_map_create_opts, copts, .map_flags = lpm ? BPF_F_NO_PREALLOC : 0);
    // Creation is timed on its own (mapsnap's restore creates the map too): preallocating
    // a per-CPU hash costs as much as filling it.
    double tc = now();
    int fd = bpf_map_create(type, "anchor", (__u32)ks, vs, (__u32)max, &copts);
    if (fd < 0) { perror("bpf_map_create"); return 1; }
    report("create", tname, n, vs, now() - tc);

    char *keys = calloc((size_t)n, ks), *keys_out = malloc(ks * (size_t)n);
    char *vals = calloc((size_t)n, slot), *vals_out = malloc((size_t)n * slot);
    if (!keys || !keys_out || !vals || !vals_out) { perror("malloc"); return 1; }
    for (long i = 0; i < n; i++) {
        __u32 k = (__u32)i, plen = 32;
        if (lpm) { memcpy(keys + i * ks, &plen, 4); memcpy(keys + i * ks + 4, &k, 4); }
        else memcpy(keys + i * ks, &k, 4);
        memcpy(vals + i * slot, &i, 4);
    }
    DECLARE_LIBBPF_OPTS(bpf_map_batch_opts, opts);

    double t0 = now();
    for (long done = 0; done < n;) {
        __u32 count = (__u32)(n - done < batch ? n - done : batch);
        if (bpf_map_update_batch(fd, keys + ks * done, vals + done * slot, &count, &opts)) {
            perror("bpf_map_update_batch"); return 1;
        }
        done += count;
    }
    report("update_batch", tname, n, vs, now() - t0);

    char *one = malloc(slot), *key = malloc(ks), *next = malloc(ks);
    long got = 0;
    t0 = now();
    // Element by element is an order of magnitude slower: only up to 1M entries.
    for (void *prev = NULL; n <= 1000000 && bpf_map_get_next_key(fd, prev, next) == 0; prev = key) {
        if (bpf_map_lookup_elem(fd, next, one)) { perror("bpf_map_lookup_elem"); return 1; }
        memcpy(key, next, ks);
        got++;
    }
    report("get_next_key_lookup", tname, got, vs, now() - t0);

    // The cursor must hold a whole key for array maps; four bytes suffice for hash maps.
    __u32 in_batch[2] = {0}, out_batch[2] = {0};
    t0 = now();
    for (long d = 0; d < dumps; d++) {
        void *in = NULL;
        got = 0;
        for (;;) {
            __u32 count = (__u32)(n - got < batch ? n - got : batch);
            if (count == 0) count = batch; // let the kernel say ENOENT
            int r = bpf_map_lookup_batch(fd, in, out_batch, keys_out + ks * (got < n ? got : 0),
                                         vals_out + (got < n ? got : 0) * slot, &count, &opts);
            int err = r ? errno : 0;
            got += count;
            if (err == ENOENT) break;
            if (err) { errno = err; perror("bpf_map_lookup_batch"); return 1; }
            memcpy(in_batch, out_batch, sizeof(in_batch));
            in = in_batch;
        }
    }
    report("lookup_batch", tname, got, vs, (now() - t0) / dumps);
    if (got != n) { fprintf(stderr, "read %ld of %ld entries\n", got, n); return 1; }
    return 0;
}
