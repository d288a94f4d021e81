// fill_map: create a BPF map, fill it with BPF_MAP_UPDATE_BATCH and pin it, so that
// benchmarks can dump a real map of a known size.
//
// Build: cc -O2 -o fill_map fill_map.c -lbpf
// Run:   ./fill_map PIN_PATH [entries] [value_size] [hash|percpu_hash|array|percpu_array|lru_hash]
//                   [key_size] [max_entries]
// Entry i has key i (in the first 4 bytes of a key of key_size bytes, default 4, the rest
// zero) and a value whose first 4 bytes are i. max_entries (default entries) sizes the map
// beyond what is filled.
// lpm_trie (added for mapsnap's benchmark): key {prefixlen = 32, addr = i}, BPF_F_NO_PREALLOC.
// Copied from the team's shared anchors so the benchmark needs nothing outside the repository.
#include <bpf/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int possible_cpus(void) {
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int lo = 0, hi = 0;
    if (!f || fscanf(f, "%d-%d", &lo, &hi) < 1) return (int)sysconf(_SC_NPROCESSORS_CONF);
    fclose(f);
    return hi >= lo ? hi + 1 : lo + 1;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s PIN_PATH [entries] [value_size] [type] [key_size] [max_entries]\n", argv[0]); return 2; }
    long n = argc > 2 ? atol(argv[2]) : 1000000;
    int vs = argc > 3 ? atoi(argv[3]) : 64;
    const char *t = argc > 4 ? argv[4] : "hash";
    enum bpf_map_type type;
    int percpu = 0;
    if (!strcmp(t, "hash")) type = BPF_MAP_TYPE_HASH;
    else if (!strcmp(t, "lru_hash")) type = BPF_MAP_TYPE_LRU_HASH;
    else if (!strcmp(t, "lpm_trie")) type = BPF_MAP_TYPE_LPM_TRIE;
    else if (!strcmp(t, "array")) type = BPF_MAP_TYPE_ARRAY;
    else if (!strcmp(t, "percpu_hash")) { type = BPF_MAP_TYPE_PERCPU_HASH; percpu = 1; }
    else if (!strcmp(t, "percpu_array")) { type = BPF_MAP_TYPE_PERCPU_ARRAY; percpu = 1; }
    else { fprintf(stderr, "unknown map type %s\n", t); return 2; }
    int lpm = type == BPF_MAP_TYPE_LPM_TRIE;
    size_t ks = argc > 5 ? (size_t)atoi(argv[5]) : (lpm ? 8 : 4);
    long max = argc > 6 ? atol(argv[6]) : n;
    if (ks < (lpm ? 8u : 4u) || max < n) { fprintf(stderr, "bad key size or max_entries\n"); return 2; }
    size_t slot = percpu ? (size_t)((vs + 7) & ~7) * possible_cpus() : (size_t)vs;
    DECLARE_LIBBPF_OPTS(bpf_map_create_opts, copts, .map_flags = lpm ? BPF_F_NO_PREALLOC : 0);
    int fd = bpf_map_create(type, "filled", (__u32)ks, vs, (__u32)max, &copts);
    if (fd < 0) { perror("bpf_map_create"); return 1; }
    char *keys = calloc((size_t)n, ks);
    char *vals = calloc((size_t)n, slot);
    if (!keys || !vals) { perror("malloc"); return 1; }
    for (long i = 0; i < n; i++) {
        __u32 k = (__u32)i, plen = 32;
        if (lpm) { memcpy(keys + i * ks, &plen, 4); memcpy(keys + i * ks + 4, &k, 4); }
        else memcpy(keys + i * ks, &k, 4);
        memcpy(vals + i * slot, &i, 4);
    }
    DECLARE_LIBBPF_OPTS(bpf_map_batch_opts, opts);
    for (long done = 0; done < n;) {
        __u32 count = (__u32)(n - done < 65536 ? n - done : 65536);
        if (bpf_map_update_batch(fd, keys + ks * done, vals + done * slot, &count, &opts)) {
            perror("bpf_map_update_batch"); return 1;
        }
        done += count;
    }
    if (bpf_obj_pin(fd, argv[1])) { perror("bpf_obj_pin"); return 1; }
    return 0;
}
