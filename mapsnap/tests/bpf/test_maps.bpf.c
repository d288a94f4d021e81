// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Test fixture for mapsnap's kernel tests: one map of every kind mapsnap handles,
// declared libbpf-style (BTF map definitions in SEC(".maps")) with BTF-typed keys
// and values, plus a trivial XDP program so the object is realistic.
//
// Every map is `pinning = LIBBPF_PIN_BY_NAME`: a loader (aya's EbpfLoader with
// default_map_pin_directory, or libbpf/bpftool with a pin root) pins each map
// under `<dir>/<map name>`.
//
// Built by mapsnap/tests/common/mod.rs:
//   clang -O2 -g -target bpf -I/usr/include/$(gcc -dumpmachine) -c test_maps.bpf.c -o test_maps.bpf.o
//
// Kernel facts worth knowing when reading tests against this object:
// - QUEUE/STACK and the map-in-map outer maps are created WITHOUT key/value BTF
//   by libbpf and aya alike (the kernel refuses value BTF on keyless maps), so
//   their `btf_id` is 0. All the other maps carry BTF (the spin-lock map must).
// - The inner map template of outer_hash / outer_arr is `struct inner_map`.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* ---------- key / value types (all named, several fields) ---------- */

struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct flow_stats {
	__u64 packets;
	__u64 bytes;
	__u64 first_seen_ns;
	__u64 last_seen_ns;
	__u32 flags;
	__u32 ifindex;
};

struct locked_value {
	struct bpf_spin_lock lock;
	__u32 hits;
	__u64 packets;
	__u64 bytes;
};

struct lru_value {
	__u64 last_seen_ns;
	__u32 count;
	__u32 reserved;
};

struct pcpu_counter {
	__u64 packets;
	__u64 bytes;
};

struct arr_value {
	__u32 id;
	__u32 flags;
	__u64 counter;
	char label[16];
};

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct route_value {
	__u32 nexthop;
	__u32 ifindex;
	__u32 metric;
};

struct event {
	__u64 ts_ns;
	__u32 pid;
	__u32 kind;
};

/* ---------- maps ---------- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct flow_key);
	__type(value, struct flow_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct locked_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} locked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 128);
	__type(key, struct flow_key);
	__type(value, struct lru_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct pcpu_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pcpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct arr_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} arr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, struct pcpu_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pcpu_arr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__type(key, struct lpm_v4_key);
	__type(value, struct route_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} trie SEC(".maps");

/* Inner map template shared by both map-in-maps. */
struct inner_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 8);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct inner_map);
} outer_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 4);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct inner_map);
} outer_arr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, 32);
	__type(value, struct event);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fifo SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_STACK);
	__uint(max_entries, 32);
	__type(value, struct event);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lifo SEC(".maps");

/* ---------- program ---------- */

SEC("xdp")
int pass(struct xdp_md *ctx)
{
	__u32 key = ctx->ingress_ifindex;
	struct locked_value *v;

	v = bpf_map_lookup_elem(&locked, &key);
	if (v) {
		bpf_spin_lock(&v->lock);
		v->hits++;
		v->packets++;
		v->bytes += ctx->data_end - ctx->data;
		bpf_spin_unlock(&v->lock);
	}
	return XDP_PASS;
}
