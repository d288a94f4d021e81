//! The `mapsnap` binary end to end on real maps: dump, verify, inspect, restore, diff, ls,
//! and the documented exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use mapsnap::model::map_type as mt;
use mapsnap::sys::{CreateAttrs, Map};

fn mapsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mapsnap"))
        .args(args)
        .output()
        .expect("run mapsnap")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn counters(dir: &Path, n: u32) -> Map {
    let m = Map::create(&CreateAttrs {
        map_type: mt::HASH,
        name: "counters",
        key_size: 4,
        value_size: 8,
        max_entries: 1024,
        ..Default::default()
    })
    .expect("create");
    for i in 0..n {
        m.update(
            Some(&i.to_ne_bytes()),
            &(u64::from(i) * 10).to_ne_bytes(),
            0,
        )
        .expect("update");
    }
    m.pin(&dir.join("counters")).expect("pin");
    m
}

#[test]
fn dump_restore_diff_and_exit_codes() {
    let src = common::fresh_pin_dir("cli-src");
    let dst = common::fresh_pin_dir("cli-dst");
    let work = tempfile::tempdir().expect("tempdir");
    let snap = work.path().join("s.mapsnap");
    let snap_s = snap.to_str().expect("utf8");
    let m = counters(&src, 100);

    let o = mapsnap(&["dump", "--pin", src.to_str().expect("utf8"), "-o", snap_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("100 entries"), "{}", text(&o));
    // No silent overwrite.
    let o = mapsnap(&["dump", "--pin", src.to_str().expect("utf8"), "-o", snap_s]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(text(&o).contains("--overwrite"));

    let o = mapsnap(&["verify", snap_s]);
    assert!(
        o.status.success() && text(&o).starts_with("ok: 1 maps"),
        "{}",
        text(&o)
    );

    let o = mapsnap(&["inspect", snap_s, "--entries", "--limit", "3", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["maps"][0]["entries"], 100);
    assert_eq!(v["maps"][0]["meta"]["name"], "counters");
    assert_eq!(v["maps"][0]["shown"].as_array().map(Vec::len), Some(3));

    let o = mapsnap(&["restore", snap_s, "--pin-root", dst.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let restored = dst.join("counters");
    let o = mapsnap(&["diff", snap_s, "--pin", restored.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no differences"));

    // Change the live source: diff reports exactly what changed and exits 1.
    m.update(Some(&5u32.to_ne_bytes()), &7u64.to_ne_bytes(), 0)
        .expect("update");
    m.delete(&6u32.to_ne_bytes()).expect("delete");
    m.update(Some(&500u32.to_ne_bytes()), &1u64.to_ne_bytes(), 0)
        .expect("update");
    let o = mapsnap(&[
        "diff",
        snap_s,
        "--pin",
        src.join("counters").to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(d[0]["added"], 1);
    assert_eq!(d[0]["removed"], 1);
    assert_eq!(d[0]["changed"], 1);
    assert_eq!(d[0]["unchanged"], 98);
    let changed = d[0]["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .find(|e| e["key"] == "05000000")
        .expect("key 5 shown");
    assert_eq!(changed["old"], "3200000000000000");
    assert_eq!(changed["new"], "0700000000000000");

    // Restoring over existing pins needs --overwrite (exit 5), a corrupt file is exit 3.
    let o = mapsnap(&["restore", snap_s, "--pin-root", dst.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let mut bytes = std::fs::read(&snap).expect("read");
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    let bad = work.path().join("bad.mapsnap");
    std::fs::write(&bad, &bytes).expect("write");
    let o = mapsnap(&["verify", bad.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = mapsnap(&[
        "restore",
        bad.to_str().expect("utf8"),
        "--pin-root",
        dst.to_str().expect("utf8"),
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    // ls shows the map with its entry count and pin path.
    let o = mapsnap(&["ls", "--pin", src.to_str().expect("utf8"), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(rows[0]["name"], "counters");
    assert_eq!(rows[0]["entries"], 100);
    assert_eq!(rows[0]["bytes"], 1200);
    assert_eq!(rows[0]["frozen"], false);
    assert!(rows[0]["pin"].as_str().expect("pin").ends_with("/counters"));

    // A missing map is a system error with its name.
    let o = mapsnap(&[
        "dump",
        "--pin",
        "/sys/fs/bpf/does-not-exist",
        "-o",
        "/tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(text(&o).contains("/sys/fs/bpf/does-not-exist"));
}

#[test]
fn inspect_prints_btf_typed_entries() {
    let dir = common::fresh_pin_dir("cli-btf");
    let _obj = common::load_test_object(&dir);
    let flows = Map::from_pin(&dir.join("flows")).expect("flows");
    // struct flow_key { u32 saddr, daddr; u16 sport, dport; u8 proto; u8 pad[3]; }
    let mut key = Vec::new();
    key.extend_from_slice(&0x0a000001u32.to_ne_bytes());
    key.extend_from_slice(&0x0a000002u32.to_ne_bytes());
    key.extend_from_slice(&443u16.to_ne_bytes());
    key.extend_from_slice(&8080u16.to_ne_bytes());
    key.extend_from_slice(&[6, 0, 0, 0]);
    // struct flow_stats { u64 packets, bytes, first_seen_ns, last_seen_ns; u32 flags, ifindex; }
    let mut value = Vec::new();
    for v in [12u64, 3400, 1, 2] {
        value.extend_from_slice(&v.to_ne_bytes());
    }
    value.extend_from_slice(&5u32.to_ne_bytes());
    value.extend_from_slice(&1u32.to_ne_bytes());
    flows.update(Some(&key), &value, 0).expect("update");

    let work = tempfile::tempdir().expect("tempdir");
    let snap = work.path().join("btf.mapsnap");
    let snap_s = snap.to_str().expect("utf8");
    let flows_pin = dir.join("flows");
    let o = mapsnap(&[
        "dump",
        "--pin",
        flows_pin.to_str().expect("utf8"),
        "-o",
        snap_s,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = mapsnap(&["inspect", snap_s, "--entries", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let m = &v["maps"][0];
    assert_eq!(m["btf_types"]["key"], "struct flow_key");
    assert_eq!(m["btf_types"]["value"], "struct flow_stats");
    let e = &m["shown"][0];
    assert_eq!(e["key"]["saddr"], 0x0a000001);
    assert_eq!(e["key"]["dport"], 8080);
    assert_eq!(e["key"]["proto"], 6);
    assert_eq!(e["value"]["packets"], 12);
    assert_eq!(e["value"]["bytes"], 3400);
    assert_eq!(e["value"]["ifindex"], 1);
    // The text form shows the same fields.
    let o = mapsnap(&["inspect", snap_s, "--entries"]);
    assert!(text(&o).contains("dport: 8080"), "{}", text(&o));
}
