//! The BTF converter and clock rebasing on real clang-compiled BTF: two versions of a
//! conntrack-style entry (tests/bpf/convert/conn_v1.bpf.c -> conn_v2.bpf.c), refusals
//! against conn_bad.bpf.c, and property tests of the rebasing arithmetic.
//!
//! Needs clang (`make deps`); `kernel_maps_v1_to_v2_with_rebase` also needs root: it
//! converts real kernel maps created from the two objects.

#![allow(clippy::unwrap_used)]

mod convert_common;

use std::sync::OnceLock;

use btf_rs::{Btf, BtfType, Type};
use mapsnap::{
    btf_fmt::TypedBtf,
    clocks::{self, Clock, ClockSample, RebaseMode, RebaseSpec, Unit},
    convert::{
        BtfGraph, ConvertError, KeyCollisions, Options, Plan, RebaseClocks, btf_from_elf,
        percpu_stride,
    },
};
use proptest::prelude::*;
use serde_json::{Value, json};

use convert_common::object;

/// The `.BTF` blobs of v1, v2 and bad, compiled once per test process.
fn blobs() -> &'static [Vec<u8>; 3] {
    static B: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    B.get_or_init(|| {
        ["conn_v1", "conn_v2", "conn_bad"].map(|n| btf_from_elf(&object(n, true)).unwrap().to_vec())
    })
}

fn graph(i: usize) -> BtfGraph {
    BtfGraph::parse(&blobs()[i]).unwrap()
}

fn plan(
    from: usize,
    from_ty: &str,
    to: usize,
    to_ty: &str,
    opts: &Options,
) -> Result<Plan, ConvertError> {
    let (a, b) = (graph(from), graph(to));
    Plan::new(
        &a,
        a.find_type(from_ty).unwrap(),
        &b,
        b.find_type(to_ty).unwrap(),
        opts,
    )
}

/// (bit offset, bits) of a member path in a struct of blob `i`, found with btf-rs
/// independently of the converter.
fn member(i: usize, ty: &str, path: &str) -> (u64, u32) {
    let btf = Btf::from_bytes(&blobs()[i]).unwrap();
    let mut id = graph(i).find_type(ty).unwrap();
    let mut bit = 0u64;
    let mut bits = 0u32;
    for part in path.split('.') {
        let t = resolve(&btf, id);
        let Type::Struct(s) = t else {
            panic!("{path}: {part} is not in a struct")
        };
        let m = s
            .members
            .iter()
            .find(|m| btf.resolve_name(*m).unwrap() == part)
            .unwrap_or_else(|| panic!("{ty} has no member {path}"));
        bit += u64::from(m.bit_offset());
        id = m.get_type_id().unwrap();
        bits = match m.bitfield_size() {
            Some(b) if b > 0 => b,
            _ => size(&btf, id) * 8,
        };
    }
    (bit, bits)
}

fn resolve(btf: &Btf, mut id: u32) -> Type {
    loop {
        let t = btf.resolve_type_by_id(id).unwrap();
        match &t {
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                id = t.as_btf_type().unwrap().get_type_id().unwrap()
            }
            _ => return t,
        }
    }
}

fn size(btf: &Btf, id: u32) -> u32 {
    match resolve(btf, id) {
        Type::Int(i) => i.size() as u32,
        Type::Enum(e) => e.size() as u32,
        Type::Struct(s) | Type::Union(s) => s.size() as u32,
        Type::Array(a) => a.len() as u32 * size(btf, a.get_type_id().unwrap()),
        other => panic!("size of {other:?}"),
    }
}

/// Write `value` into a little-endian entry at a member path (bitfields included).
fn put(buf: &mut [u8], at: (u64, u32), value: u64) {
    let (bit, bits) = at;
    for k in 0..u64::from(bits) {
        let pos = bit + k;
        let byte = &mut buf[(pos / 8) as usize];
        let v = ((value >> k) & 1) as u8;
        *byte = (*byte & !(1 << (pos % 8))) | (v << (pos % 8));
    }
}

/// Render bytes of a v2 type as JSON through btf_fmt (an independent reader).
fn render(i: usize, ty: &str, bytes: &[u8]) -> Value {
    let tb = TypedBtf::parse(&blobs()[i]).unwrap();
    tb.render(graph(i).find_type(ty).unwrap(), bytes).unwrap()
}

/// Sets one member of an entry by path.
type Setter<'a> = &'a mut dyn FnMut(&str, u64);

fn v1_entry(fill: &dyn Fn(Setter)) -> Vec<u8> {
    let g = graph(0);
    let mut buf = vec![0u8; g.size_of(g.find_type("struct conn").unwrap()).unwrap()];
    fill(&mut |path, v| put(&mut buf, member(0, "struct conn", path), v));
    buf
}

fn base_opts() -> Options {
    let mut o = Options::default();
    o.add_rename("rx_port=local_port").unwrap();
    o.add_default("zone=7").unwrap();
    o
}

fn typical(set: &mut dyn FnMut(&str, u64)) {
    set("packets", 4_000_000_000);
    set("bytes", 123_456_789_012);
    set("expires", 0);
    set("last_seen", 0);
    set("rx_port", 8080);
    set("legacy_flags", 0xdead);
    set("state", 2); // CS_ESTABLISHED in v1
    set("peer.addr", 0x0a00_0001);
    set("peer.port", 443);
    set("dir", 1);
    set("seen_reply", 0);
    set("retries", 13);
    set("delta", (-5i16) as u16 as u64);
    set("mtu", 1500);
    set("label", 0x1122_3344);
}

#[test]
fn plan_table_v1_to_v2() {
    let p = plan(0, "struct conn", 1, "struct conn", &base_opts()).unwrap();
    let table = p.to_string();
    println!("{table}");
    assert!(
        table.starts_with("struct conn (80 bytes) -> struct conn ("),
        "{table}"
    );
    let row = |new: &str| {
        p.rows()
            .iter()
            .find(|r| r.new_path == new)
            .unwrap_or_else(|| panic!("no row for {new} in\n{table}"))
            .clone()
    };
    let check = |new: &str, old: &str, action: &str| {
        let r = row(new);
        assert_eq!(r.old_path, old, "{new}");
        assert_eq!(r.action, action, "{new}");
    };
    check("packets", "packets", "widen __u32 -> __u64 (zero-extend)");
    check("bytes", "bytes", "copy __u64");
    check("local_port", "rx_port", "copy __u16");
    check("zone", "-", "new __u32: default 7");
    check("created", "-", "new __u64: zero");
    check("delta", "delta", "widen __s16 -> __s32 (sign-extend)");
    check(
        "mtu",
        "mtu",
        "narrow __u32 -> __u16 (checked: fails if a value does not fit)",
    );
    check(
        "state",
        "state",
        "enum by name enum conn_state -> enum conn_state (4 names); no counterpart for CS_OLD_ONLY (fails if present)",
    );
    check(
        "hist",
        "hist",
        "array __u32[4] -> __u32[8]: 4 new elements zero",
    );
    check("peer", "peer", "struct endpoint -> struct endpoint");
    check("peer.ifindex", "-", "new __u32: zero");
    check("retries", "retries", "widen __u8:4 -> __u8:6 (zero-extend)");
    check("dir", "dir", "copy __u8:1");
    check(
        "expires",
        "expires",
        "copy __u64; monotonic_ns timestamp, NOT rebased (no clocks)",
    );
    check(
        "last_seen",
        "last_seen",
        "copy boot_s_t; boottime_s timestamp, NOT rebased (no clocks)",
    );
    check("label", "label", "copy union (layout unchanged)");
    let removed: Vec<_> = p.rows().iter().filter(|r| r.new_path == "-").collect();
    assert_eq!(removed.len(), 1, "{table}");
    assert_eq!(removed[0].old_path, "legacy_flags");
    assert_eq!(removed[0].action, "removed: dropped");
    assert_eq!(p.removed(), ["legacy_flags"]);
    assert_eq!(p.rebase_members(), ["expires", "last_seen"]);
    assert!(!p.is_identity());
}

#[test]
fn entries_convert_field_by_field() {
    let p = plan(0, "struct conn", 1, "struct conn", &base_opts()).unwrap();
    let old = v1_entry(&|set| {
        typical(set);
    });
    // hist elements are array members, not named: fill them directly.
    let mut old = old;
    let (hist_bit, _) = member(0, "struct conn", "hist");
    for i in 0..4u64 {
        put(&mut old, (hist_bit + i * 32, 32), 100 + i);
    }
    let mut new = vec![0xaau8; p.dst_size()];
    let out = p.apply(&old, &mut new).unwrap();
    assert_eq!(out.lossy, 0);
    assert_eq!(out.rebased, 0);
    let v = render(1, "struct conn", &new);
    assert_eq!(
        v,
        json!({
            "bytes": 123_456_789_012u64,
            "packets": 4_000_000_000u64,
            "state": "CS_ESTABLISHED",
            "local_port": 8080,
            "retries": 13,
            "seen_reply": 0,
            "dir": 1,
            "hist": [100, 101, 102, 103, 0, 0, 0, 0],
            "peer": {"port": 443, "addr": 0x0a00_0001, "ifindex": 0},
            "expires": 0,
            "last_seen": 0,
            "zone": 7,
            "created": 0,
            "delta": -5,
            "mtu": 1500,
            "label": {"id": 0x1122_3344, "bytes": [0x44, 0x33, 0x22, 0x11]},
        }),
        "{p}"
    );

    // A second entry: other enum value and a maximal bitfield.
    let old2 = v1_entry(&|set| {
        typical(set);
        set("state", 1); // CS_SYN: 1 in v1, 2 in v2
        set("retries", 15);
        set("delta", 0x7fff);
    });
    p.apply(&old2, &mut new).unwrap();
    let v = render(1, "struct conn", &new);
    assert_eq!(v["state"], "CS_SYN");
    assert_eq!(v["retries"], 15);
    assert_eq!(v["delta"], 32767);
    assert_eq!(v["hist"], json!([0, 0, 0, 0, 0, 0, 0, 0]));
}

#[test]
fn keys_convert_with_new_member_default() {
    let mut o = Options::default();
    o.add_default("ifindex=3").unwrap();
    let p = plan(0, "struct conn_key", 1, "struct conn_key", &o).unwrap();
    let mut old = vec![0u8; p.src_size()];
    put(&mut old, member(0, "struct conn_key", "saddr"), 0x0102_0304);
    put(&mut old, member(0, "struct conn_key", "dport"), 53);
    put(&mut old, member(0, "struct conn_key", "proto"), 17);
    let mut new = vec![0u8; p.dst_size()];
    p.apply(&old, &mut new).unwrap();
    assert_eq!(
        render(1, "struct conn_key", &new),
        json!({"ifindex": 3, "saddr": 0x0102_0304, "daddr": 0, "sport": 0, "dport": 53, "proto": 17, "pad": [0, 0, 0]})
    );
    // The same key type on both sides is a plain copy.
    let same = plan(
        0,
        "struct conn_key",
        0,
        "struct conn_key",
        &Options::default(),
    )
    .unwrap();
    assert!(same.is_identity(), "{same}");
}

#[test]
fn kernel_managed_fields_left_zero() {
    let p = plan(
        0,
        "struct locked_s",
        1,
        "struct locked_s",
        &Options::default(),
    )
    .unwrap();
    let rows: Vec<_> = p
        .rows()
        .iter()
        .map(|r| format!("{} <- {}: {}", r.new_path, r.old_path, r.action))
        .collect();
    assert_eq!(
        rows,
        [
            "hits <- hits: widen __u32 -> __u64 (zero-extend)",
            "lock <- lock: struct bpf_spin_lock: left zero for the kernel",
        ]
    );
    // A held lock (non-zero) must not travel.
    let mut old = vec![0u8; p.src_size()];
    put(&mut old, member(0, "struct locked_s", "lock"), 1);
    put(&mut old, member(0, "struct locked_s", "hits"), 41);
    let mut new = vec![0xffu8; p.dst_size()];
    p.apply(&old, &mut new).unwrap();
    assert_eq!(
        render(1, "struct locked_s", &new),
        json!({"hits": 41, "lock": {"val": 0}})
    );
    assert!(!p.is_identity());
    // The same type on both sides is still not a plain copy: the lock stays zero.
    let same = plan(
        0,
        "struct locked_s",
        0,
        "struct locked_s",
        &Options::default(),
    )
    .unwrap();
    assert!(!same.is_identity());
}

#[test]
fn narrowing_that_does_not_fit() {
    let p = plan(0, "struct conn", 1, "struct conn", &base_opts()).unwrap();
    let old = v1_entry(&|set| {
        typical(set);
        set("mtu", 70_000);
    });
    let mut new = vec![0u8; p.dst_size()];
    let err = p.apply(&old, &mut new).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mtu: value 70000 does not fit an unsigned 16-bit integer"
    );
    let mut lossy = base_opts();
    lossy.lossy = true;
    let p = plan(0, "struct conn", 1, "struct conn", &lossy).unwrap();
    assert!(p.to_string().contains("lossy: clamps"));
    let out = p.apply(&old, &mut new).unwrap();
    assert_eq!(out.lossy, 1);
    assert_eq!(render(1, "struct conn", &new)["mtu"], 65535);
}

#[test]
fn enum_value_without_counterpart() {
    let p = plan(0, "struct conn", 1, "struct conn", &base_opts()).unwrap();
    let old = v1_entry(&|set| {
        typical(set);
        set("state", 4); // CS_OLD_ONLY
    });
    let mut new = vec![0u8; p.dst_size()];
    let err = p.apply(&old, &mut new).unwrap_err();
    assert_eq!(
        err.to_string(),
        "state: enum value 4 has no enumerator of the same name in the new type"
    );
    let mut lossy = base_opts();
    lossy.lossy = true;
    let p = plan(0, "struct conn", 1, "struct conn", &lossy).unwrap();
    let out = p.apply(&old, &mut new).unwrap();
    assert_eq!(out.lossy, 1);
    assert_eq!(render(1, "struct conn", &new)["state"], "CS_NONE");
}

#[test]
fn refusals_name_the_member() {
    let o = Options::default();
    let err = plan(0, "struct arr_s", 2, "struct arr_s", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot convert hist: array shrinks from 4 to 2 elements (allowed only when lossy)"
    );
    let err = plan(0, "struct un_s", 2, "struct un_s", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot convert label: a union converts only when its layout is unchanged: union conn_label has 4 bytes, union conn_label 8"
    );
    let err = plan(0, "struct kind_s", 2, "struct kind_s", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot convert x: __u64 (int) cannot become struct endpoint (struct)"
    );
    // A shorter array with lossy: the tail is dropped, counted when it held data.
    let lossy = Options {
        lossy: true,
        ..Options::default()
    };
    let p = plan(0, "struct arr_s", 2, "struct arr_s", &lossy).unwrap();
    let mut new = [0u8; 8];
    let old: Vec<u8> = [1u32, 2, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(p.apply(&old, &mut new).unwrap().lossy, 0);
    assert_eq!(new, [1, 0, 0, 0, 2, 0, 0, 0]);
    let old: Vec<u8> = [1u32, 2, 3, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(p.apply(&old, &mut new).unwrap().lossy, 1);

    // Options that match nothing refuse too.
    let mut o = Options::default();
    o.add_default("packets=1").unwrap();
    let err = plan(0, "struct conn", 1, "struct conn", &o).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("option \"packets=1\": no new integer or enum member packets"),
        "{err}"
    );
    let mut o = Options::default();
    o.add_rename("nosuch=zone").unwrap();
    let err = plan(0, "struct conn", 1, "struct conn", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "option \"nosuch=zone\": no member nosuch in the old type paired with zone in the new type"
    );
    let mut o = base_opts();
    o.defaults.insert("zone".into(), "70000000000".into());
    let err = plan(0, "struct conn", 1, "struct conn", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "option \"zone=70000000000\": 70000000000 does not fit a 32-bit member"
    );
    assert!(
        Options::default()
            .add_rebase("expires=monotonic_h")
            .is_err()
    );
    assert!(Options::default().add_default("novalue").is_err());
}

#[test]
fn no_btf_is_a_clear_error() {
    let err = btf_from_elf(&object("conn_v1", false)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the ELF object (no .BTF section: compile with clang -g) has no BTF: conversion needs the key and value types of both maps"
    );
    assert!(btf_from_elf(b"not an elf").is_err());
    assert!(BtfGraph::parse(b"\x9f\xeb\x01\x00").is_err());
    assert!(matches!(
        graph(0).find_type("struct nosuch"),
        Err(ConvertError::NoSuchType { .. })
    ));
}

fn sample(mono_s: u64, boot_s: u64, real_s: u64, jiffies: u64, hz: u32) -> ClockSample {
    const S: u64 = 1_000_000_000;
    ClockSample {
        monotonic_ns: mono_s * S,
        boottime_ns: boot_s * S,
        realtime_ns: real_s * S,
        tai_ns: (real_s + 37) * S,
        jiffies: Some(jiffies),
        hz: Some(hz),
        uncertainty_ns: 1000,
    }
}

#[test]
fn timestamps_rebased_by_tags() {
    const S: u64 = 1_000_000_000;
    // Source host up 10000 s; target host up 50 s, 600 s later in wall time.
    let from = sample(10_000, 10_100, 1_700_000_000, 0, 250);
    let to = sample(50, 60, 1_700_000_600, 0, 1000);
    let mut o = base_opts();
    o.clocks = Some(RebaseClocks {
        from,
        to,
        mode: RebaseMode::PreserveRemaining,
    });
    let p = plan(0, "struct conn", 1, "struct conn", &o).unwrap();
    assert!(
        p.to_string()
            .contains("copy __u64; rebase monotonic_ns (preserve-remaining)")
    );
    let old = v1_entry(&|set| {
        typical(set);
        set("expires", 10_030 * S); // 30 s left
        set("last_seen", 10_090); // 10 s ago on the boottime clock
    });
    let mut new = vec![0u8; p.dst_size()];
    let out = p.apply(&old, &mut new).unwrap();
    assert_eq!(out.rebased, 2);
    let v = render(1, "struct conn", &new);
    assert_eq!(v["expires"], 80 * S);
    assert_eq!(v["last_seen"], 50);
    assert_eq!(v["packets"], 4_000_000_000u64);

    // Elapsed: the 600 s in transit count, the flow expired long ago (saturates at 1).
    let mut o = base_opts();
    o.clocks = Some(RebaseClocks {
        from,
        to,
        mode: RebaseMode::Elapsed,
    });
    let p = plan(0, "struct conn", 1, "struct conn", &o).unwrap();
    p.apply(&old, &mut new).unwrap();
    let v = render(1, "struct conn", &new);
    assert_eq!(v["expires"], 1);
    assert_eq!(v["last_seen"], 1);

    // A string spec overrides tags, and an untagged member can be named.
    let mut o2 = base_opts();
    o2.add_rebase("bytes=monotonic_ns").unwrap();
    o2.clocks = Some(RebaseClocks {
        from,
        to,
        mode: RebaseMode::PreserveRemaining,
    });
    let p = plan(0, "struct conn", 1, "struct conn", &o2).unwrap();
    assert_eq!(p.rebase_members(), ["bytes", "expires", "last_seen"]);
    let old = v1_entry(&|set| {
        typical(set);
        set("bytes", 9_999 * S);
    });
    p.apply(&old, &mut new).unwrap();
    assert_eq!(render(1, "struct conn", &new)["bytes"], 49 * S);
    // `created` is new in v2: nothing to rebase, so the option refuses.
    let mut o3 = base_opts();
    o3.add_rebase("created=realtime_s").unwrap();
    let err = plan(0, "struct conn", 1, "struct conn", &o3).unwrap_err();
    assert!(
        err.to_string().contains("no integer member created"),
        "{err}"
    );
}

#[test]
fn percpu_values_convert_per_cpu() {
    let p = plan(0, "struct conn", 1, "struct conn", &base_opts()).unwrap();
    let (ss, ds) = (percpu_stride(p.src_size()), percpu_stride(p.dst_size()));
    assert_eq!(ss % 8, 0);
    assert_eq!(ds % 8, 0);
    let cpus = 3;
    let mut old = vec![0u8; ss * cpus];
    for cpu in 0..cpus {
        let e = v1_entry(&|set| {
            typical(set);
            set("packets", cpu as u64 + 10);
        });
        old[cpu * ss..cpu * ss + e.len()].copy_from_slice(&e);
    }
    let mut new = vec![0xffu8; ds * cpus];
    p.apply_percpu(&old, &mut new, cpus).unwrap();
    for cpu in 0..cpus {
        let slot = &new[cpu * ds..(cpu + 1) * ds];
        assert!(
            slot[p.dst_size()..].iter().all(|&b| b == 0),
            "padding zeroed"
        );
        let v = render(1, "struct conn", slot);
        assert_eq!(v["packets"], cpu as u64 + 10);
        assert_eq!(v["zone"], 7);
    }
    let err = p.apply_percpu(&old[..ss], &mut new, cpus).unwrap_err();
    assert!(matches!(err, ConvertError::ShortBuffer { .. }), "{err}");
}

#[test]
fn colliding_keys_name_both() {
    // Keep only the source address and port: keys that differ elsewhere collide.
    let mut o = Options::default();
    o.add_rename("saddr=addr").unwrap();
    o.add_rename("sport=port").unwrap();
    let p = plan(0, "struct conn_key", 1, "struct endpoint", &o).unwrap();
    assert_eq!(p.removed(), ["daddr", "dport", "proto", "pad"]);
    let key = |daddr: u64| {
        let mut k = vec![0u8; p.src_size()];
        put(&mut k, member(0, "struct conn_key", "saddr"), 0x0a000001);
        put(&mut k, member(0, "struct conn_key", "sport"), 80);
        put(&mut k, member(0, "struct conn_key", "daddr"), daddr);
        k
    };
    let mut seen = KeyCollisions::new();
    let mut new = vec![0u8; p.dst_size()];
    for (i, daddr) in [1u64, 1, 2].into_iter().enumerate() {
        let old = key(daddr);
        p.apply(&old, &mut new).unwrap();
        let r = seen.check(&old, &new);
        if i < 2 {
            r.unwrap(); // the same old key twice is no collision
        } else {
            assert_eq!(
                r.unwrap_err().to_string(),
                "old keys 0100000a010000005000000000000000 and 0100000a020000005000000000000000 both convert to key 500000000100000a00000000"
            );
        }
    }
}

#[test]
fn clock_sample_now() {
    let a = ClockSample::now().unwrap();
    let b = ClockSample::now().unwrap();
    assert!(a.monotonic_ns > 0 && a.monotonic_ns <= b.monotonic_ns);
    // Without a suspend both clocks run together; the bracket bounds the difference.
    assert!(a.boottime_ns + a.uncertainty_ns >= a.monotonic_ns, "{a:?}");
    assert!(a.realtime_ns > 1_600_000_000_000_000_000);
    assert!(a.uncertainty_ns < 50_000_000, "{a:?}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let hz = a.hz.expect("HZ from /proc/timer_list");
        assert!([100, 250, 300, 1000].contains(&hz), "{a:?}");
        let j = a.jiffies.unwrap();
        assert!(b.jiffies.unwrap() >= j);
        assert_eq!(clocks::hz_from_jiffies(j, a.monotonic_ns), Some(hz));
    }
    let text = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<ClockSample>(&text).unwrap(), a);
}

#[test]
fn jiffies_between_tick_rates() {
    // 100 ticks (1 s at HZ=100) left on the source become 1000 ticks at HZ=1000.
    let from = sample(1000, 1000, 1000, 5_000, 100);
    let to = sample(10, 10, 1000, 70_000, 1000);
    let spec: RebaseSpec = "jiffies".parse().unwrap();
    assert_eq!(
        clocks::rebase(
            5_100,
            spec.unit,
            spec.clock,
            &from,
            &to,
            RebaseMode::PreserveRemaining
        ),
        Some(71_000)
    );
    let mut no_jiffies = to;
    no_jiffies.jiffies = None;
    // A plan that would need the missing reading refuses up front.
    let mut o = Options::default();
    o.add_rebase("hits=jiffies").unwrap();
    o.clocks = Some(RebaseClocks {
        from,
        to: no_jiffies,
        mode: RebaseMode::PreserveRemaining,
    });
    let err = plan(0, "struct locked_s", 1, "struct locked_s", &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        "hits: cannot rebase jiffies: a clock sample lacks jiffies or HZ (jiffies need root on both hosts)"
    );
    assert_eq!(
        clocks::rebase(
            5_100,
            Unit::Jiffies,
            Clock::Jiffies,
            &from,
            &no_jiffies,
            RebaseMode::PreserveRemaining
        ),
        None
    );
}

fn any_sample() -> impl Strategy<Value = ClockSample> {
    (
        0u64..1 << 62,
        0u64..1 << 40,
        0u64..1 << 62,
        prop::sample::select(vec![100u32, 250, 300, 1000]),
    )
        .prop_map(|(mono, extra, real, hz)| ClockSample {
            monotonic_ns: mono,
            boottime_ns: mono + extra,
            realtime_ns: real,
            tai_ns: real + 37_000_000_000,
            jiffies: Some((1 << 32) + mono / (1_000_000_000 / u64::from(hz))),
            hz: Some(hz),
            uncertainty_ns: 0,
        })
}

fn any_unit() -> impl Strategy<Value = Unit> {
    prop::sample::select(vec![Unit::Ns, Unit::Us, Unit::Ms, Unit::S])
}

fn any_clock() -> impl Strategy<Value = Clock> {
    prop::sample::select(vec![
        Clock::Monotonic,
        Clock::Boottime,
        Clock::Realtime,
        Clock::Tai,
    ])
}

proptest! {
    #[test]
    fn zero_stays_zero(from in any_sample(), to in any_sample(), unit in any_unit(), clock in any_clock(), elapsed in any::<bool>()) {
        let mode = if elapsed { RebaseMode::Elapsed } else { RebaseMode::PreserveRemaining };
        prop_assert_eq!(clocks::rebase(0, unit, clock, &from, &to, mode), Some(0));
    }

    #[test]
    fn preserve_remaining_keeps_distance(from in any_sample(), to in any_sample(), unit in any_unit(), clock in any_clock(), offset in -(1i64 << 40)..(1i64 << 40)) {
        let then = from.reading(clock, unit).unwrap();
        let now = to.reading(clock, unit).unwrap();
        let value = then + i128::from(offset);
        prop_assume!(value > 0 && value <= i128::from(u64::MAX));
        let got = clocks::rebase(value as u64, unit, clock, &from, &to, RebaseMode::PreserveRemaining).unwrap();
        let want = (now + i128::from(offset)).clamp(1, i128::from(u64::MAX));
        prop_assert_eq!(i128::from(got), want);
        // And back again, when nothing saturated.
        if want > 1 && want < i128::from(u64::MAX) {
            let back = clocks::rebase(got, unit, clock, &to, &from, RebaseMode::PreserveRemaining).unwrap();
            prop_assert_eq!(i128::from(back), value);
        }
    }

    #[test]
    fn elapsed_subtracts_transit(from in any_sample(), to in any_sample(), offset in 0i64..(1i64 << 40)) {
        let then = i128::from(from.monotonic_ns);
        let value = then + i128::from(offset);
        prop_assume!(value > 0 && value <= i128::from(u64::MAX));
        let keep = clocks::rebase(value as u64, Unit::Ns, Clock::Monotonic, &from, &to, RebaseMode::PreserveRemaining).unwrap();
        let el = clocks::rebase(value as u64, Unit::Ns, Clock::Monotonic, &from, &to, RebaseMode::Elapsed).unwrap();
        let transit = (i128::from(to.realtime_ns) - i128::from(from.realtime_ns)).max(0);
        prop_assert_eq!(i128::from(el), (i128::from(keep) - transit).max(1));
    }

    #[test]
    fn saturates_at_field_max(from in any_sample(), to in any_sample(), value in 1u64.., bits in 8u32..64) {
        let spec = RebaseSpec { clock: Clock::Monotonic, unit: Unit::Ns };
        let max = (1u64 << bits) - 1;
        let got = clocks::rebase_between(value, spec, spec, &from, &to, RebaseMode::PreserveRemaining, max).unwrap();
        prop_assert!(got >= 1 && got <= max);
    }

    #[test]
    fn units_agree(from in any_sample(), to in any_sample(), secs in 1u64..1_000_000) {
        // A timestamp `secs` after the dump instant: the same in s and in ns.
        let at_s = from.reading(Clock::Boottime, Unit::S).unwrap() as u64 + secs;
        let at_ns = at_s * 1_000_000_000;
        let s = clocks::rebase(at_s, Unit::S, Clock::Boottime, &from, &to, RebaseMode::PreserveRemaining).unwrap();
        let ns = clocks::rebase(at_ns, Unit::Ns, Clock::Boottime, &from, &to, RebaseMode::PreserveRemaining).unwrap();
        // Whole seconds on the source lose its sub-second part: within one second.
        prop_assert!((i128::from(ns) - i128::from(s) * 1_000_000_000).abs() <= 1_000_000_000);
    }

    #[test]
    fn key_plan_round_trip_is_identity(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) {
        let p = plan(0, "struct conn_key", 1, "struct conn_key", &Options::default()).unwrap();
        let back = plan(1, "struct conn_key", 0, "struct conn_key", &Options::default()).unwrap();
        let mut old = vec![0u8; p.src_size()];
        for (path, v) in [("saddr", u64::from(saddr)), ("daddr", u64::from(daddr)), ("sport", u64::from(sport)), ("dport", u64::from(dport)), ("proto", u64::from(proto))] {
            put(&mut old, member(0, "struct conn_key", path), v);
        }
        let mut new = vec![0u8; p.dst_size()];
        p.apply(&old, &mut new).unwrap();
        let mut again = vec![0u8; back.dst_size()];
        back.apply(&new, &mut again).unwrap();
        prop_assert_eq!(again, old);
    }
}

/// A minimal BTF writer for random layouts: integers, arrays of integers and one struct.
#[derive(Default)]
struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl BtfBuilder {
    fn new() -> Self {
        Self {
            strings: vec![0],
            next_id: 1,
            ..Self::default()
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn words(&mut self, words: &[u32]) -> u32 {
        for w in words {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self, size: u32, signed: bool) -> u32 {
        let name = self.name(&format!(
            "{}int{}",
            if signed { "s" } else { "u" },
            size * 8
        ));
        self.words(&[name, 1 << 24, size, (u32::from(signed) << 24) | (size * 8)])
    }

    fn array(&mut self, elem: u32, index: u32, len: u32) -> u32 {
        self.words(&[0, 3 << 24, 0, elem, index, len])
    }

    fn structure(&mut self, name: &str, size: u32, members: &[(String, u32, u32)]) -> u32 {
        let name = self.name(name);
        let mut words = vec![name, (4 << 24) | members.len() as u32, size];
        for (n, ty, bit) in members {
            let n = self.name(n);
            words.extend([n, *ty, *bit]);
        }
        self.words(&words)
    }

    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            self.types.len() as u32,
            self.types.len() as u32,
            self.strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// One member of a random layout: integer size (bytes), signedness, array length (0 =
/// not an array).
type MemberSpec = (u32, bool, u32);

/// BTF with `struct s` made of the members in `order` (indexes into `members`), naturally
/// aligned; returns the blob and each member's byte offset (by member index).
fn layout(members: &[MemberSpec], order: &[usize]) -> (Vec<u8>, Vec<u32>) {
    let mut b = BtfBuilder::new();
    let index = b.int(4, false);
    let mut offsets = vec![0u32; members.len()];
    let mut list = Vec::new();
    let mut off = 0u32;
    let mut align = 1u32;
    for &i in order {
        let (size, signed, len) = members[i];
        let int = b.int(size, signed);
        let (ty, total) = if len > 0 {
            (b.array(int, index, len), size * len)
        } else {
            (int, size)
        };
        off = off.div_ceil(size) * size;
        align = align.max(size);
        offsets[i] = off;
        list.push((format!("m{i}"), ty, off * 8));
        off += total;
    }
    let size = off.div_ceil(align) * align;
    b.structure("s", size, &list);
    (b.finish(), offsets)
}

/// Plans between two random layouts (both ways) and one entry converted forwards.
struct TwoLayouts {
    there: Plan,
    back: Plan,
    /// An old entry: random member bytes, zero padding.
    old: Vec<u8>,
    /// `old` converted.
    mid: Vec<u8>,
    a_off: Vec<u32>,
    b_off: Vec<u32>,
}

impl TwoLayouts {
    fn new(a: (&[MemberSpec], &[usize]), b: (&[MemberSpec], &[usize]), bytes: &[u8]) -> Self {
        let (a_blob, a_off) = layout(a.0, a.1);
        let (b_blob, b_off) = layout(b.0, b.1);
        let (ga, gb) = (
            BtfGraph::parse(&a_blob).unwrap(),
            BtfGraph::parse(&b_blob).unwrap(),
        );
        let (ia, ib) = (
            ga.find_type("struct s").unwrap(),
            gb.find_type("s").unwrap(),
        );
        let there = Plan::new(&ga, ia, &gb, ib, &Options::default()).unwrap();
        let back = Plan::new(&gb, ib, &ga, ia, &Options::default()).unwrap();
        let mut old = vec![0u8; there.src_size()];
        for (i, &(size, _, len)) in a.0.iter().enumerate() {
            let total = (size * len.max(1)) as usize;
            let at = a_off[i] as usize;
            old[at..at + total].copy_from_slice(&bytes[at..at + total]);
        }
        let mut mid = vec![0u8; there.dst_size()];
        there.apply(&old, &mut mid).unwrap();
        Self {
            there,
            back,
            old,
            mid,
            a_off,
            b_off,
        }
    }
}

fn any_members() -> impl Strategy<Value = Vec<MemberSpec>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![1u32, 2, 4, 8]),
            any::<bool>(),
            0u32..4,
        ),
        1..8,
    )
}

proptest! {
    /// Reordering members (and so padding) and back is the identity, and each member's
    /// bytes land at its new offset.
    #[test]
    fn random_layout_reorder_round_trip(
        members in any_members(),
        seed in any::<u64>(),
        bytes in prop::collection::vec(any::<u8>(), 256),
    ) {
        let n = members.len();
        let a_order: Vec<usize> = (0..n).collect();
        let mut b_order = a_order.clone();
        // A seeded permutation (Fisher-Yates with an LCG).
        let mut x = seed | 1;
        for i in (1..n).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            b_order.swap(i, (x >> 33) as usize % (i + 1));
        }
        let t = TwoLayouts::new((&members, &a_order), (&members, &b_order), &bytes);
        let (there, back, old, mid, a_off, b_off) = (t.there, t.back, t.old, t.mid, t.a_off, t.b_off);
        for (i, &(size, _, len)) in members.iter().enumerate() {
            let total = (size * len.max(1)) as usize;
            prop_assert_eq!(&mid[b_off[i] as usize..][..total], &old[a_off[i] as usize..][..total]);
        }
        let mut again = vec![0u8; back.dst_size()];
        back.apply(&mid, &mut again).unwrap();
        prop_assert_eq!(&again, &old);
        if a_order == b_order {
            prop_assert!(there.is_identity());
        }
    }

    /// Widening every integer (same signedness) and narrowing back is the identity; the
    /// widened values are the sign- or zero-extended old ones.
    #[test]
    fn random_layout_widen_round_trip(
        members in any_members(),
        grow in prop::collection::vec(0u32..3, 8),
        bytes in prop::collection::vec(any::<u8>(), 256),
    ) {
        let wide: Vec<MemberSpec> = members
            .iter()
            .zip(&grow)
            .map(|(&(size, signed, len), &g)| ((size << g).min(8), signed, len))
            .collect();
        let order: Vec<usize> = (0..members.len()).collect();
        let t = TwoLayouts::new((&members, &order), (&wide, &order), &bytes);
        let (back, old, mid, a_off, b_off) = (t.back, t.old, t.mid, t.a_off, t.b_off);
        let read = |buf: &[u8], at: usize, size: u32, signed: bool| -> i128 {
            let mut v: u128 = 0;
            for k in (0..size as usize).rev() {
                v = (v << 8) | u128::from(buf[at + k]);
            }
            let bits = size * 8;
            if signed && (v >> (bits - 1)) & 1 == 1 { v as i128 - (1i128 << bits) } else { v as i128 }
        };
        for (i, (&(size, signed, len), &(wsize, _, _))) in members.iter().zip(&wide).enumerate() {
            for e in 0..len.max(1) {
                let a = read(&old, (a_off[i] + e * size) as usize, size, signed);
                let b = read(&mid, (b_off[i] + e * wsize) as usize, wsize, signed);
                prop_assert_eq!(a, b, "member m{} element {}", i, e);
            }
        }
        let mut again = vec![0u8; back.dst_size()];
        back.apply(&mid, &mut again).unwrap();
        prop_assert_eq!(&again, &old);
    }
}

/// The `conns` map of a fixture object, created in the kernel by aya (with its BTF), as a
/// mapsnap map. The `Ebpf` keeps the object alive.
/// Key of flow `n` in v1 (`version` 0) or v2 (1, with ifindex 3): 10.0.0.n, port 443.
fn flow_key(version: usize, n: u64) -> Vec<u8> {
    let g = graph(version);
    let mut key = vec![0u8; g.size_of(g.find_type("struct conn_key").unwrap()).unwrap()];
    if version == 1 {
        put(&mut key, member(1, "struct conn_key", "ifindex"), 3);
    }
    put(
        &mut key,
        member(version, "struct conn_key", "saddr"),
        0x0a00_0000 + n,
    );
    put(&mut key, member(version, "struct conn_key", "dport"), 443);
    key
}

fn kernel_map(name: &str) -> (aya::Ebpf, mapsnap::sys::Map) {
    use std::os::fd::AsFd;
    let mut ebpf = aya::EbpfLoader::new()
        .load(&object(name, true))
        .unwrap_or_else(|e| panic!("aya could not create the maps of {name}: {e} ({e:?})"));
    let map = match ebpf.take_map("conns") {
        Some(aya::maps::Map::HashMap(data)) => {
            let fd = data.fd().as_fd().try_clone_to_owned().unwrap();
            mapsnap::sys::Map::from_fd(fd).unwrap()
        }
        other => panic!("{name}: conns is {other:?}"),
    };
    (ebpf, map)
}

/// Real kernel maps: v1's map filled, its BTF read back from the kernel, every entry
/// converted (keys and values, with a clock shift) into v2's map, and v2's entries read
/// back from the kernel and checked.
#[test]
fn kernel_maps_v1_to_v2_with_rebase() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates BPF maps: run it as root"
    );
    const S: u64 = 1_000_000_000;
    let (_keep1, v1) = kernel_map("conn_v1");
    let (_keep2, v2) = kernel_map("conn_v2");
    let (i1, i2) = (v1.info().unwrap(), v2.info().unwrap());
    assert!(i1.btf_id != 0 && i2.btf_id != 0, "maps without BTF");
    let g1 = BtfGraph::parse(&mapsnap::sys::btf_raw_by_id(i1.btf_id).unwrap()).unwrap();
    let b2 = mapsnap::sys::btf_raw_by_id(i2.btf_id).unwrap();
    let g2 = BtfGraph::parse(&b2).unwrap();

    // The source host's clocks: 1000 s ahead of ours (another host, up for longer).
    let now = ClockSample::now().unwrap();
    let mut from = now;
    from.monotonic_ns += 1000 * S;
    from.boottime_ns += 1000 * S;
    let mut vopts = base_opts();
    vopts.add_default("peer.ifindex=2").unwrap();
    vopts.clocks = Some(RebaseClocks {
        from,
        to: now,
        mode: RebaseMode::PreserveRemaining,
    });
    let vplan = Plan::new(&g1, i1.btf_value_type_id, &g2, i2.btf_value_type_id, &vopts).unwrap();
    let mut kopts = Options::default();
    kopts.add_default("ifindex=3").unwrap();
    let kplan = Plan::new(&g1, i1.btf_key_type_id, &g2, i2.btf_key_type_id, &kopts).unwrap();
    assert_eq!(
        vplan.rebase_members(),
        ["expires", "last_seen"],
        "decl tags survive the kernel\n{vplan}"
    );
    assert_eq!(vplan.src_size(), i1.value_size as usize);
    assert_eq!(vplan.dst_size(), i2.value_size as usize);

    // v1 entries: expires 30 s after the source's "now", last seen 5 s before it.
    for n in 1..=3u64 {
        let key = flow_key(0, n);
        let value = v1_entry(&|set| {
            typical(set);
            set("packets", n * 1000);
            set("expires", from.monotonic_ns + 30 * S);
            set("last_seen", from.boottime_ns / S - 5);
        });
        v1.update(Some(&key), &value, 0).unwrap();
    }

    // Convert every entry of v1 into v2, as a restore with --convert will.
    let mut seen = KeyCollisions::new();
    let (mut key, mut next) = (
        vec![0u8; i1.key_size as usize],
        vec![0u8; i1.key_size as usize],
    );
    let mut value = vec![0u8; i1.value_size as usize];
    let (mut nkey, mut nvalue) = (vec![0u8; kplan.dst_size()], vec![0u8; vplan.dst_size()]);
    let mut total = mapsnap::convert::Outcome::default();
    let mut count = 0;
    let mut cursor: Option<Vec<u8>> = None;
    while v1.next_key(cursor.as_deref(), &mut next).unwrap() {
        key.copy_from_slice(&next);
        assert!(v1.lookup(Some(&key), &mut value, 0).unwrap());
        kplan.apply(&key, &mut nkey).unwrap();
        seen.check(&key, &nkey).unwrap();
        total.add(vplan.apply(&value, &mut nvalue).unwrap());
        v2.update(Some(&nkey), &nvalue, 0).unwrap();
        cursor = Some(key.clone());
        count += 1;
    }
    assert_eq!(count, 3);
    assert_eq!(total.rebased, 6);
    assert_eq!(total.lossy, 0);

    // Read v2 back from the kernel, by the new keys.
    let tb = TypedBtf::parse(&b2).unwrap();
    for n in 1..=3u64 {
        let k2 = flow_key(1, n);
        let mut got = vec![0u8; i2.value_size as usize];
        assert!(
            v2.lookup(Some(&k2), &mut got, 0).unwrap(),
            "flow {n} under its new key"
        );
        let v = tb.render(i2.btf_value_type_id, &got).unwrap();
        assert_eq!(v["packets"], n * 1000);
        assert_eq!(v["bytes"], 123_456_789_012u64);
        assert_eq!(v["local_port"], 8080);
        assert_eq!(v["state"], "CS_ESTABLISHED");
        assert_eq!(v["zone"], 7);
        assert_eq!(
            v["peer"],
            json!({"port": 443, "addr": 0x0a00_0001, "ifindex": 2})
        );
        assert_eq!(
            v["expires"],
            now.monotonic_ns + 30 * S,
            "30 s left, on our clock"
        );
        assert_eq!(v["last_seen"], now.boottime_ns / S - 5);
    }
}

/// The library restore path: v1's map dumped (clocks recorded by the dump), the recorded
/// clocks moved 1000 s ahead with the entries' timestamps (another host, up for longer),
/// restored into v2's map with conversion and rebasing; entries are found under their new
/// keys with their remaining lifetimes.
#[test]
fn kernel_restore_into_v2_converts_and_rebases() {
    use mapsnap::{
        convert::RestoreConversion,
        format::verify,
        progress::NoProgress,
        restore::{Destination, IntoTarget, RestoreOptions, restore},
    };
    const S: u64 = 1_000_000_000;
    let (_keep1, v1) = kernel_map("conn_v1");
    let (_keep2, v2) = kernel_map("conn_v2");
    let i2 = v2.info().unwrap();
    let real = ClockSample::now().unwrap();
    for n in 1..=3u64 {
        let key = flow_key(0, n);
        let value = v1_entry(&|set| {
            typical(set);
            set("packets", n * 1000);
            // Flow 3 never set a lifetime: zero stays zero.
            set(
                "expires",
                if n == 3 {
                    0
                } else {
                    real.monotonic_ns + n * 30 * S
                },
            );
        });
        v1.update(Some(&key), &value, 0).unwrap();
    }
    let snap = convert_common::dump_maps(&[&v1]);
    let dumped = convert_common::recorded_clocks(&snap).expect("dump records clocks");
    assert!(dumped.monotonic_ns >= real.monotonic_ns && dumped.uncertainty_ns < 10_000_000);
    let expires = member(0, "struct conn", "expires");
    let shifted = convert_common::rewrite(&snap, &|c| c.monotonic_ns += 1000 * S, &|_, v| {
        let off = (expires.0 / 8) as usize;
        let old = u64::from_le_bytes(v[off..off + 8].try_into().unwrap());
        if old != 0 {
            v[off..off + 8].copy_from_slice(&(old + 1000 * S).to_le_bytes());
        }
    });
    let summary = verify(shifted.as_slice()).unwrap();
    let mut conv = RestoreConversion {
        convert: true,
        ..RestoreConversion::default()
    };
    conv.add_rename("rx_port=local_port").unwrap();
    conv.add_default("value.zone=7").unwrap();
    conv.add_default("key.ifindex=3").unwrap();
    let now = ClockSample::now().unwrap();
    conv.now = Some(now);
    let opts = RestoreOptions {
        convert: Some(conv),
        ..RestoreOptions::default()
    };
    let report = restore(
        shifted.as_slice(),
        Some(&summary),
        &Destination::Into(vec![IntoTarget {
            select: None,
            map: v2.try_clone().unwrap(),
        }]),
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.maps[0].entries, 3);

    let b2 = mapsnap::sys::btf_raw_by_id(i2.btf_id).unwrap();
    let tb = TypedBtf::parse(&b2).unwrap();
    for n in 1..=3u64 {
        let k2 = flow_key(1, n);
        let mut got = vec![0u8; i2.value_size as usize];
        assert!(v2.lookup(Some(&k2), &mut got, 0).unwrap(), "flow {n}");
        let v = tb.render(i2.btf_value_type_id, &got).unwrap();
        assert_eq!(v["packets"], n * 1000);
        assert_eq!(v["local_port"], 8080);
        assert_eq!(v["zone"], 7);
        let remaining_at_dump =
            (real.monotonic_ns + n * 30 * S) as i128 - dumped.monotonic_ns as i128;
        let want = if n == 3 {
            0
        } else {
            (now.monotonic_ns as i128 + remaining_at_dump) as u64
        };
        assert_eq!(
            v["expires"], want,
            "flow {n}: the lifetime left at dump time, on our clock"
        );
    }

    // A restore that refuses plans before writing: a default that matches nothing.
    let mut bad = RestoreConversion {
        convert: true,
        ..RestoreConversion::default()
    };
    bad.add_default("value.no_such=1").unwrap();
    let err = restore(
        shifted.as_slice(),
        Some(&summary),
        &Destination::Into(vec![IntoTarget {
            select: None,
            map: v2.try_clone().unwrap(),
        }]),
        &RestoreOptions {
            convert: Some(bad),
            ..RestoreOptions::default()
        },
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no_such"), "{err}");
    let mut still = vec![0u8; i2.value_size as usize];
    let k2 = flow_key(1, 1);
    assert!(
        v2.lookup(Some(&k2), &mut still, 0).unwrap(),
        "a refused plan writes nothing"
    );
}
