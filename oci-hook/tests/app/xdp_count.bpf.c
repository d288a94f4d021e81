// SPDX-License-Identifier: Apache-2.0
// The BPF side of the test app: counts packets arriving on the container's veth (XDP).
// Both maps are pinned by name (LIBBPF_PIN_BY_NAME) in the container's bpffs mount, so a
// re-loaded program reuses them and counting continues from their values.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// pkt_count[0]: every packet; [1]: IPv4 packets; [2]: ICMP echo requests.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} pkt_count SEC(".maps");

// ICMP echo requests by IPv4 source address (network byte order).
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} src_count SEC(".maps");

static __always_inline void bump(__u32 k)
{
    __u64 *v = bpf_map_lookup_elem(&pkt_count, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

SEC("xdp")
int count_packets(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    bump(0);
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return XDP_PASS;
    bump(1);
    if (ip->protocol != IPPROTO_ICMP)
        return XDP_PASS;
    // First byte of the ICMP header: its type (8: echo request). <linux/icmp.h> pulls in
    // libc headers, which a BPF build cannot use.
    __u8 *icmp_type = (void *)ip + ip->ihl * 4;
    if ((void *)(icmp_type + 4) > end || *icmp_type != 8)
        return XDP_PASS;
    bump(2);
    __u32 src = ip->saddr;
    __u64 one = 1;
    __u64 *n = bpf_map_lookup_elem(&src_count, &src);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        bpf_map_update_elem(&src_count, &src, &one, BPF_NOEXIST);
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
