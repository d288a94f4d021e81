// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Conntrack-style XDP program, version 1: counts UDP flows in `ct`. Version 2
// (xdp_ct_v2.bpf.c) changes the entry layout; tests/convert_xdp.rs fills this version's
// map from real traffic over a veth and restores it into version 2's map with --convert.

#include "xdp_ct.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

enum ct_state {
	CT_NEW = 1,
	CT_ESTABLISHED = 2,
};

struct ct_entry {
	__u32 packets;
	__u64 bytes;
	__u64 expires CLOCK("monotonic_ns");
	__u32 legacy;
	__u16 last_len;
	enum ct_state state;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} ct SEC(".maps");

SEC("xdp")
int xdp_ct(struct xdp_md *ctx)
{
	struct ct_key k = {};
	struct ct_entry *e;
	struct flow f;
	__u64 now;

	if (parse_flow(ctx, &f))
		return XDP_PASS;
	k.saddr = f.saddr;
	k.daddr = f.daddr;
	k.sport = f.sport;
	k.dport = f.dport;
	k.proto = IPPROTO_UDP;
	now = bpf_ktime_get_ns();
	e = bpf_map_lookup_elem(&ct, &k);
	if (!e) {
		struct ct_entry n = {
			.packets = 1,
			.bytes = f.len,
			.expires = now + CT_LIFETIME_NS,
			.legacy = 0xabcd,
			.last_len = (__u16)f.len,
			.state = CT_NEW,
		};
		bpf_map_update_elem(&ct, &k, &n, BPF_NOEXIST);
		return XDP_PASS;
	}
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, f.len);
	e->expires = now + CT_LIFETIME_NS;
	e->last_len = (__u16)f.len;
	e->state = CT_ESTABLISHED;
	return XDP_PASS;
}
