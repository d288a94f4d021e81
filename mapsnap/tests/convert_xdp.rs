//! Conversion and rebasing with real programs and real traffic: the conntrack-style XDP
//! program of tests/bpf/convert/xdp_ct_v1.bpf.c counts UDP flows sent over a veth pair from
//! a network namespace the test creates; its map is dumped with `mapsnap dump`, restored
//! into version 2's map (xdp_ct_v2.bpf.c: new key member, entry members added, removed,
//! reordered and widened) with `mapsnap restore --convert`, and version 2, attached in its
//! place, carries on counting the same flows. The rebasing test moves the lifetimes the
//! program set with bpf_ktime_get_ns() to a snapshot that claims another host's clocks.
//!
//! Needs root, clang and iproute2 (`make deps`).

#![allow(clippy::unwrap_used)]

mod common;
mod convert_common;

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use mapsnap::{btf_fmt::TypedBtf, clocks::ClockSample, sys::Map};
use serde_json::Value;

const S: u64 = 1_000_000_000;
const LIFETIME_NS: u64 = 60 * S;
const PORT: u16 = 7777;
/// Frame bytes the program counts for a UDP datagram of `payload` bytes.
const fn frame(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

fn mapsnap(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mapsnap"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mapsnap {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with one end of a veth pair; the other end stays in ours. Removed
/// (with the pair) on drop.
struct Net {
    ns: String,
    host_if: String,
    host_addr: String,
    peer_addr: String,
}

impl Net {
    fn new(tag: &str) -> Self {
        let id = std::process::id();
        let net = Self {
            ns: format!("msct-{tag}-{id}"),
            host_if: format!("ms{tag}{}", id % 100_000),
            host_addr: format!("10.{}.{}.1", 100 + id % 100, id / 100 % 250),
            peer_addr: format!("10.{}.{}.2", 100 + id % 100, id / 100 % 250),
        };
        let peer_if = format!("{}p", net.host_if);
        let _ = Command::new("ip").args(["netns", "del", &net.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_if])
            .output();
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            &net.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host_addr),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        let nsx = |args: &[&str]| {
            let mut a = vec!["-n", net.ns.as_str()];
            a.extend_from_slice(args);
            ip(&a);
        };
        nsx(&[
            "addr",
            "add",
            &format!("{}/24", net.peer_addr),
            "dev",
            &peer_if,
        ]);
        nsx(&["link", "set", &peer_if, "up"]);
        nsx(&["link", "set", "lo", "up"]);
        net
    }

    fn ifindex(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends UDP datagrams of these payload sizes from the namespace (source port `sport`)
    /// to our end's port 7777: they arrive on our veth, where the XDP program sees them.
    fn send(&self, sport: u16, payloads: &[usize]) {
        let (ns, from, to) = (
            self.ns.clone(),
            self.peer_addr.clone(),
            self.host_addr.clone(),
        );
        let payloads = payloads.to_vec();
        std::thread::spawn(move || {
            let f = File::open(format!("/var/run/netns/{ns}")).unwrap();
            // SAFETY: setns on a valid namespace fd moves only this thread.
            assert_eq!(
                unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let sock = UdpSocket::bind((from.as_str(), sport)).unwrap();
            let to: SocketAddr = format!("{to}:{PORT}").parse().unwrap();
            for n in payloads {
                sock.send_to(&vec![0x5a; n], to).unwrap();
            }
        })
        .join()
        .unwrap();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A loaded version of the program, attached to the veth, and its `ct` map.
struct Program {
    _ebpf: aya::Ebpf,
    map: Map,
}

impl Program {
    fn attach(version: &str, net: &Net) -> Self {
        let object = convert_common::object(&format!("xdp_ct_{version}"), true);
        let mut ebpf = aya::EbpfLoader::new().load(&object).unwrap();
        let prog: &mut Xdp = ebpf.program_mut("xdp_ct").unwrap().try_into().unwrap();
        prog.load().unwrap();
        prog.attach(&net.host_if, XdpMode::Skb).unwrap();
        let map = match ebpf.map("ct") {
            Some(aya::maps::Map::HashMap(data)) => {
                Map::from_fd(data.fd().as_fd().try_clone_to_owned().unwrap()).unwrap()
            }
            other => panic!("ct is {other:?}"),
        };
        Self { _ebpf: ebpf, map }
    }

    fn id(&self) -> String {
        self.map.info().unwrap().id.to_string()
    }
}

/// Every entry of a map as (key, value) JSON, typed by the map's BTF from the kernel.
fn entries(map: &Map) -> Vec<(Value, Value)> {
    let info = map.info().unwrap();
    let btf = TypedBtf::parse(&mapsnap::sys::btf_raw_by_id(info.btf_id).unwrap()).unwrap();
    let mut out = Vec::new();
    let mut key = vec![0u8; info.key_size as usize];
    let mut next = key.clone();
    let mut value = vec![0u8; info.value_size as usize];
    let mut first = true;
    while map
        .next_key((!first).then_some(&key[..]), &mut next)
        .unwrap()
    {
        key.copy_from_slice(&next);
        first = false;
        if map.lookup(Some(&key), &mut value, 0).unwrap() {
            out.push((
                btf.render(info.btf_key_type_id, &key).unwrap(),
                btf.render(info.btf_value_type_id, &value).unwrap(),
            ));
        }
    }
    out.sort_by_key(|(k, _)| k["sport"].as_u64());
    out
}

/// Waits until the map's total packet count reaches `packets` (the stack delivers the
/// datagrams asynchronously), then returns its entries.
fn settled(map: &Map, packets: u64) -> Vec<(Value, Value)> {
    let start = Instant::now();
    loop {
        let e = entries(map);
        let total: u64 = e.iter().map(|(_, v)| v["packets"].as_u64().unwrap()).sum();
        if total >= packets || start.elapsed() > Duration::from_secs(10) {
            assert_eq!(total, packets, "packets counted by the program: {e:?}");
            return e;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Flow `i` (source port 40001 + i) sends `i + 2` datagrams of 100 + i bytes.
const FLOWS: [(u16, usize, usize); 3] = [(40001, 2, 100), (40002, 3, 101), (40003, 4, 102)];

#[test]
fn xdp_v1_to_v2_upgrade_keeps_flows() {
    common::ensure_bpffs();
    let net = Net::new("u");
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("ct.mapsnap");
    let snap = snap.to_str().unwrap();

    let v1 = Program::attach("v1", &net);
    for (sport, n, len) in FLOWS {
        net.send(sport, &vec![len; n]);
    }
    let before = settled(&v1.map, 9);
    assert_eq!(before.len(), 3);
    for ((k, v), (sport, n, len)) in before.iter().zip(FLOWS) {
        assert_eq!(k["sport"], sport);
        assert_eq!(v["packets"], n as u64);
        assert_eq!(v["bytes"], n as u64 * frame(len));
        assert_eq!(v["state"], "CT_ESTABLISHED");
    }
    mapsnap(&["dump", "--id", &v1.id(), "-o", snap]);
    drop(v1);

    let v2 = Program::attach("v2", &net);
    let ifindex = net.ifindex();
    let key_default = format!("key.ifindex={ifindex}");
    let restore_args = [
        "restore",
        snap,
        "--into",
        &v2.id(),
        "--convert",
        "--default",
        &key_default,
        "--default",
        "zone=1",
    ];
    let mut dry = restore_args.to_vec();
    dry.push("--dry-run");
    let plan = String::from_utf8(mapsnap(&dry).stdout).unwrap();
    println!("$ mapsnap {}\n{plan}", dry.join(" "));
    for line in [
        "key: struct ct_key (16 bytes) -> struct ct_key (20 bytes)",
        "value: struct ct_entry (40 bytes) -> struct ct_entry (48 bytes)",
        "packets",
        "widen __u32 -> __u64 (zero-extend)",
        "removed: dropped",
        "enum by name",
    ] {
        assert!(
            plan.contains(line),
            "{line:?} missing from the plan:\n{plan}"
        );
    }
    assert!(entries(&v2.map).is_empty(), "--dry-run writes nothing");

    let dumped = convert_common::recorded_clocks(&std::fs::read(snap).unwrap()).unwrap();
    let t0 = ClockSample::now().unwrap().monotonic_ns;
    let out = mapsnap(&restore_args);
    let t1 = ClockSample::now().unwrap().monotonic_ns;
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 entries"));
    let converted = entries(&v2.map);
    assert_eq!(converted.len(), 3);
    for ((k, v), ((_, old), (sport, n, len))) in converted.iter().zip(before.iter().zip(FLOWS)) {
        assert_eq!(k["ifindex"], ifindex);
        assert_eq!(k["sport"], sport);
        assert_eq!(v["packets"], n as u64);
        assert_eq!(v["bytes"], old["bytes"]);
        assert_eq!(v["last_len"], frame(len));
        assert_eq!(
            v["state"], "CT_ESTABLISHED",
            "enum by name: 2 in v1, 5 in v2"
        );
        assert_eq!(v["zone"], 1);
        assert_eq!(v["created"], 0, "new member without a default: zero");
        // `expires` is tagged mapsnap:clock=monotonic_ns: with --convert the lifetime left
        // at dump time is kept (the restore read our clock between t0 and t1).
        let left = old["expires"].as_u64().unwrap() - dumped.monotonic_ns;
        let e = v["expires"].as_u64().unwrap();
        assert!(
            (t0 + left..=t1 + left).contains(&e),
            "{e} vs [{}, {}]",
            t0 + left,
            t1 + left
        );
    }

    // More traffic: version 2 finds the old flows under its new key and counts on.
    for (sport, _, len) in FLOWS {
        net.send(sport, &[len, len]);
    }
    let after = settled(&v2.map, 9 + 6);
    assert_eq!(after.len(), 3, "no flow started over: {after:?}");
    for ((_, v), (_, n, len)) in after.iter().zip(FLOWS) {
        assert_eq!(v["packets"], n as u64 + 2);
        assert_eq!(v["bytes"], (n as u64 + 2) * frame(len));
        assert_eq!(v["zone"], 1);
        assert_eq!(v["created"], 0);
    }

    // --into-root: the target is found by the snapshot's pin path (here its name) under a
    // directory where version 2's map is pinned.
    let root = common::fresh_pin_dir("convert-root");
    let pin = root.join("ct");
    let out = Command::new("bpftool")
        .args(["map", "pin", "id", &v2.id(), pin.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_root = vec!["restore", snap, "--into-root", root.to_str().unwrap()];
    by_root.extend_from_slice(&restore_args[4..]);
    mapsnap(&by_root);
    let rooted = entries(&v2.map);
    assert_eq!(rooted.len(), 3);
    for ((k, v), (kc, vc)) in rooted.iter().zip(&converted) {
        assert_eq!(k, kc);
        assert_eq!((&v["packets"], &v["bytes"]), (&vc["packets"], &vc["bytes"]));
        assert_eq!((&v["zone"], &v["state"]), (&vc["zone"], &vc["state"]));
    }

    // The same conversion as a converted snapshot, restored without --convert.
    let new = dir.path().join("ct-v2.mapsnap");
    let object = dir.path().join("xdp_ct_v2.o");
    std::fs::write(&object, convert_common::object("xdp_ct_v2", true)).unwrap();
    mapsnap(&[
        "convert",
        snap,
        "--to-btf",
        object.to_str().unwrap(),
        "-o",
        new.to_str().unwrap(),
        "--default",
        &key_default,
        "--default",
        "zone=1",
    ]);
    mapsnap(&["restore", new.to_str().unwrap(), "--into", &v2.id()]);
    // Equal to the restore with --convert, but for the timestamps: a converted snapshot is
    // rebased when it is restored with rebasing, and this restore asked for none.
    let replaced = entries(&v2.map);
    assert_eq!(replaced.len(), 3);
    for (((k, v), (kc, vc)), (_, old)) in replaced.iter().zip(&converted).zip(&before) {
        assert_eq!(k, kc);
        for (name, value) in v.as_object().unwrap() {
            let want = if name == "expires" {
                &old[name]
            } else {
                &vc[name]
            };
            assert_eq!(value, want, "{name}");
        }
    }
}

/// The v1 value's `expires` (bytes 16..24 of struct ct_entry, see xdp_ct_v1.bpf.c).
fn expires_of(value: &mut [u8]) -> &mut [u8; 8] {
    (&mut value[16..24]).try_into().unwrap()
}

#[test]
fn rebasing_keeps_the_lifetimes_the_program_set() {
    common::ensure_bpffs();
    let net = Net::new("r");
    let dir = tempfile::tempdir().unwrap();
    let v1 = Program::attach("v1", &net);
    for (sport, n, len) in FLOWS {
        net.send(sport, &vec![len; n]);
    }
    settled(&v1.map, 9);
    // Two entries the program did not write: one never set (0), one "forever" (near max).
    let info = v1.map.info().unwrap();
    for (sport, expires) in [(50001u16, 0u64), (50002, u64::MAX - 10)] {
        let mut key = vec![0u8; info.key_size as usize];
        key[8..10].copy_from_slice(&sport.to_ne_bytes());
        let mut value = vec![0u8; info.value_size as usize];
        *expires_of(&mut value) = expires.to_le_bytes();
        v1.map.update(Some(&key), &value, 0).unwrap();
    }
    let snap = dir.path().join("ct.mapsnap");
    mapsnap(&["dump", "--id", &v1.id(), "-o", snap.to_str().unwrap()]);
    let original = std::fs::read(&snap).unwrap();
    let dumped = convert_common::recorded_clocks(&original).expect("the dump records clocks");
    let remaining: Vec<(u64, i128)> = entries(&v1.map)
        .iter()
        .map(|(k, v)| {
            let e = v["expires"].as_u64().unwrap();
            (
                k["sport"].as_u64().unwrap(),
                i128::from(e) - i128::from(dumped.monotonic_ns),
            )
        })
        .collect();
    drop(v1);
    let shown = String::from_utf8(mapsnap(&["inspect", snap.to_str().unwrap()]).stdout).unwrap();
    assert!(
        shown.contains(&format!(
            "clocks at dump: monotonic {} ns",
            dumped.monotonic_ns
        )),
        "{shown}"
    );
    for (sport, left) in &remaining {
        if *sport < 50000 {
            assert!(
                (0..=LIFETIME_NS as i128).contains(left),
                "the program set lifetimes of 60 s: {left}"
            );
        }
    }

    // Another host, booted later: its CLOCK_MONOTONIC read D less when it dumped, and so
    // did the timestamps its program stored; its wall clock said 5 s earlier.
    let d = dumped.monotonic_ns / 2;
    let other = convert_common::rewrite(
        &original,
        &|c| {
            c.monotonic_ns -= d;
            c.realtime_ns -= 5 * S;
        },
        &|_, v| {
            let e = u64::from_le_bytes(*expires_of(v));
            if e != 0 && e != u64::MAX - 10 {
                *expires_of(v) = (e - d).to_le_bytes();
            }
        },
    );
    let other_path = dir.path().join("other.mapsnap");
    std::fs::write(&other_path, &other).unwrap();

    let restore = |mode: &str| {
        let pins = common::fresh_pin_dir(&format!("rebase-{mode}"));
        let t0 = ClockSample::now().unwrap();
        mapsnap(&[
            "restore",
            other_path.to_str().unwrap(),
            "--pin-root",
            pins.to_str().unwrap(),
            "--rebase-mode",
            mode,
        ]);
        let t1 = ClockSample::now().unwrap();
        let map = Map::from_pin(&pins.join("ct")).unwrap();
        (entries(&map), t0, t1, pins)
    };

    // preserve-remaining: each lifetime left is what it was at dump time, to within the
    // restore's own duration (the instant it read our clocks lies between t0 and t1).
    let (got, t0, t1, _pins) = restore("preserve-remaining");
    for (k, v) in &got {
        let sport = k["sport"].as_u64().unwrap();
        let e = v["expires"].as_u64().unwrap();
        let left = remaining.iter().find(|(s, _)| *s == sport).unwrap().1;
        match sport {
            50001 => assert_eq!(e, 0, "zero (unset) stays zero"),
            50002 => assert_eq!(e, u64::MAX, "saturates instead of wrapping"),
            _ => {
                let lo = i128::from(t0.monotonic_ns) + left;
                let hi = i128::from(t1.monotonic_ns) + left;
                assert!(
                    (lo..=hi).contains(&i128::from(e)),
                    "flow {sport}: {e} not in [{lo}, {hi}] ({} ms window)",
                    (hi - lo) / 1_000_000
                );
                assert!(hi - lo < i128::from(5 * S), "the bound is tight");
            }
        }
    }

    // elapsed: the time in transit (5 s by the recorded wall clock, plus the real time
    // since the dump) is taken off.
    let (got, t0, t1, _pins) = restore("elapsed");
    for (k, v) in &got {
        let sport = k["sport"].as_u64().unwrap();
        if sport >= 50000 {
            continue;
        }
        let e = i128::from(v["expires"].as_u64().unwrap());
        let left = remaining.iter().find(|(s, _)| *s == sport).unwrap().1;
        let transit = |t: &ClockSample| i128::from(t.realtime_ns - (dumped.realtime_ns - 5 * S));
        let lo = i128::from(t0.monotonic_ns) + left - transit(&t1);
        let hi = i128::from(t1.monotonic_ns) + left - transit(&t0);
        assert!(
            (lo..=hi).contains(&e),
            "flow {sport}: {e} not in [{lo}, {hi}]"
        );
    }

    // Restored without rebasing, the other host's timestamps would stay D in our past.
    let pins = common::fresh_pin_dir("rebase-none");
    mapsnap(&[
        "restore",
        other_path.to_str().unwrap(),
        "--pin-root",
        pins.to_str().unwrap(),
    ]);
    let plain = entries(&Map::from_pin(&pins.join("ct")).unwrap());
    for (k, v) in &plain {
        let sport = k["sport"].as_u64().unwrap();
        if sport < 50000 {
            let left = remaining.iter().find(|(s, _)| *s == sport).unwrap().1;
            let e = i128::from(v["expires"].as_u64().unwrap());
            assert_eq!(e, i128::from(dumped.monotonic_ns) + left - i128::from(d));
        }
    }
}

#[test]
fn maps_without_btf_are_refused_clearly() {
    common::ensure_bpffs();
    let net = Net::new("n");
    let v1 = Program::attach("v1", &net);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("ct.mapsnap");
    mapsnap(&["dump", "--id", &v1.id(), "-o", snap.to_str().unwrap()]);
    // A hash map of the same sizes but created without BTF.
    let info = v1.map.info().unwrap();
    let bare = Map::create(&mapsnap::sys::CreateAttrs {
        map_type: info.map_type,
        name: "bare",
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: 1024,
        flags: 0,
        map_extra: 0,
        numa_node: None,
        btf_fd: None,
        btf_key_type_id: 0,
        btf_value_type_id: 0,
        inner_map_fd: None,
    })
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mapsnap"))
        .args([
            "restore",
            snap.to_str().unwrap(),
            "--into",
            &bare.info().unwrap().id.to_string(),
            "--convert",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has no BTF"), "{err}");
    assert!(Path::new(&snap).exists());
}
