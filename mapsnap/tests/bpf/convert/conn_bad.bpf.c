// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// Conversion test fixture: versions of conn_v1.bpf.c's refusal pairs that cannot be
// converted into (a shorter array, a union whose layout changed, a scalar that became a
// struct). The tests expect the plan to refuse each, naming the member.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

union conn_label {
	__u64 id;
	__u8 bytes[8];
};

struct endpoint {
	__u32 addr;
	__u16 port;
};

struct arr_s {
	__u32 hist[2];
};

struct un_s {
	union conn_label label;
};

struct kind_s {
	struct endpoint x;
};

struct arr_s g_arr;
struct un_s g_un;
struct kind_s g_kind;
