// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Shared by xdp_ct_v1.bpf.c and xdp_ct_v2.bpf.c: the UDP flow parser and the lifetime.
// The two programs differ only in their conntrack entry layout, as a real upgrade would.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define CLOCK(spec) __attribute__((btf_decl_tag("mapsnap:clock=" spec)))

/* Entries live this long after their last packet (CLOCK_MONOTONIC ns). */
#define CT_LIFETIME_NS (60ULL * 1000000000ULL)
/* Only UDP to this port is tracked, so stray traffic cannot change the counts. */
#define CT_PORT 7777

struct flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 len;
};

static __always_inline int parse_flow(struct xdp_md *ctx, struct flow *f)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return -1;
	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end || udp->dest != bpf_htons(CT_PORT))
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->sport = bpf_ntohs(udp->source);
	f->dport = bpf_ntohs(udp->dest);
	f->len = (__u32)(end - data);
	return 0;
}
