//! `mapsnap-criu-testee`: a process holding BPF maps of every type the CRIU plugin carries,
//! for the checkpoint/restore tests (criu-plugin/tests/).
//!
//! ```text
//! mapsnap-criu-testee run --dir DIR
//! ```
//!
//! 1. Creates and fills: hash, percpu_hash, lru_hash, array, percpu_array, lpm_trie,
//!    hash_of_maps (two inner maps; the fd of one is kept), array_of_maps, queue, stack, a
//!    frozen array, a hash whose value holds a `bpf_spin_lock` (created with BTF), and a
//!    `shared` hash held through five fds: the creating fd, a `dup` of it, a second open by
//!    id, a read-only and a write-only open.
//! 2. Spawns a child process (`child`) that inherits the creating fd of `shared` and opens the
//!    map by id itself.
//! 3. Writes `DIR/state.json` (pid, fd numbers, map ids), `DIR/before.txt` (every map's
//!    metadata and contents) and `DIR/ready`, then waits for `DIR/go` (checkpoint and restore
//!    happen meanwhile).
//! 4. Checks every map through the fds it held before (same fd numbers): still a BPF map,
//!    same metadata, a new kernel map, same frozen state, same access mode, same contents
//!    (queues and stacks popped in order), fds of one map still sharing one map (also with the
//!    child), the kept inner map still the one inside its outer map. Writes `DIR/after.txt`
//!    and `DIR/result.json` and exits 0 when every check passed, 1 otherwise.
//!
//! Setup failures are written to `DIR/error.txt` (exit 2).

#![deny(unsafe_code)]

mod btf;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use mapsnap::model::{map_flags, map_type as T, round_up8, type_name};
use mapsnap::sys::{self, Btf, CreateAttrs, Map, MapInfo, ObjKind};
use mapsnap_criu::ffi;
use mapsnap_criu::images::{Access, fdinfo_field};
use serde::{Deserialize, Serialize};

type R<T> = Result<T, String>;

/// How long to wait for the test to say `go` (then give up, so nothing is left running).
const WAIT_GO: Duration = Duration::from_secs(600);
const CHILD_MARKER_KEY: u32 = 0xC1;
const CHILD_MARKER_VALUE: u64 = 0xC0FFEE;

fn err(what: &str) -> impl Fn(sys::SysError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let Some(dir) = arg("--dir").map(PathBuf::from) else {
        eprintln!("usage: mapsnap-criu-testee run --dir DIR");
        return ExitCode::from(2);
    };
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&dir),
        Some("child") => {
            let fd = arg("--fd").and_then(|v| v.parse().ok());
            let id = arg("--map-id").and_then(|v| v.parse().ok());
            match (fd, id) {
                (Some(fd), Some(id)) => child(&dir, fd, id).map(|()| true),
                _ => Err("child needs --fd N --map-id ID".into()),
            }
        }
        _ => Err("the first argument must be run or child".into()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = std::fs::write(dir.join("error.txt"), format!("{e}\n"));
            eprintln!("mapsnap-criu-testee: {e}");
            ExitCode::from(2)
        }
    }
}

// ---- maps and their contents -------------------------------------------------------------

type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// How a held map is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Keys and values; `value` is what a lookup returns (per-CPU values expanded).
    Keyed { key: usize, value: usize },
    /// Values are inner maps: compared by the inner maps' contents, not by their ids.
    OfMaps { key: usize },
    /// Values in pop order.
    Queue { value: usize },
    /// A write-only fd: nothing can be read through it.
    WriteOnly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Contents {
    Entries(Entries),
    /// (key, inner map contents) per entry.
    OfMaps(Vec<(Vec<u8>, Entries)>),
    /// Values as they will pop.
    Queue(Vec<Vec<u8>>),
    Unreadable,
}

struct Held {
    name: String,
    map: Map,
    fd: i32,
    shape: Shape,
    access: Access,
    info: MapInfo,
    frozen: bool,
    contents: Contents,
    /// Per-CPU value stride (values shown per CPU), when per-CPU.
    percpu_stride: Option<usize>,
}

fn read_entries(map: &Map, key: usize, value: usize) -> R<Entries> {
    let mut out = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key];
    while map
        .next_key(cur.as_deref(), &mut next)
        .map_err(err("get_next_key"))?
    {
        let mut v = vec![0u8; value];
        if map.lookup(Some(&next), &mut v, 0).map_err(err("lookup"))? {
            out.push((next.clone(), v));
        }
        cur = Some(next.clone());
    }
    out.sort();
    Ok(out)
}

fn read_of_maps(map: &Map, key: usize) -> R<Vec<(Vec<u8>, Entries)>> {
    let mut out = Vec::new();
    for (k, id) in read_entries(map, key, 4)? {
        let id = u32::from_ne_bytes([id[0], id[1], id[2], id[3]]);
        let inner = Map::from_id(id).map_err(err("opening an inner map"))?;
        let i = inner.info().map_err(err("inner map info"))?;
        out.push((
            k,
            read_entries(&inner, i.key_size as usize, i.value_size as usize)?,
        ));
    }
    Ok(out)
}

/// Reads a held map as its shape says (queues and stacks are popped: call once).
fn read(map: &Map, shape: Shape) -> R<Contents> {
    Ok(match shape {
        Shape::Keyed { key, value } => Contents::Entries(read_entries(map, key, value)?),
        Shape::OfMaps { key } => Contents::OfMaps(read_of_maps(map, key)?),
        Shape::Queue { value } => {
            let mut values = Vec::new();
            let mut v = vec![0u8; value];
            while map.lookup_and_delete(None, &mut v).map_err(err("pop"))? {
                values.push(v.clone());
            }
            Contents::Queue(values)
        }
        Shape::WriteOnly => Contents::Unreadable,
    })
}

fn fd_access(map: &Map) -> R<Access> {
    let path = format!("/proc/self/fdinfo/{}", map.fd().as_raw_fd());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let flags = fdinfo_field(&text, "flags")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .ok_or_else(|| format!("{path}: no flags line"))?;
    Ok(Access::from_open_flags(flags))
}

fn u32b(v: u32) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn u64b(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn create(name: &str, map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> R<Map> {
    Map::create(&CreateAttrs {
        map_type,
        name,
        key_size: key,
        value_size: value,
        max_entries: max,
        flags,
        ..Default::default()
    })
    .map_err(|e| format!("creating {name}: {e}"))
}

fn fill(map: &Map, entries: &Entries) -> R<()> {
    for (k, v) in entries {
        map.update(Some(k), v, 0)
            .map_err(|e| format!("filling {}: {e}", map.label()))?;
    }
    Ok(())
}

/// Builds the expected value of a per-CPU entry from one value per CPU.
fn percpu(cpus: u32, value_size: u32, f: impl Fn(u32) -> Vec<u8>) -> Vec<u8> {
    let stride = round_up8(value_size) as usize;
    let mut out = Vec::with_capacity(stride * cpus as usize);
    for c in 0..cpus {
        let mut v = f(c);
        v.resize(stride, 0);
        out.extend_from_slice(&v);
    }
    out
}

struct Setup {
    held: Vec<Held>,
    shared_id: u32,
}

impl Setup {
    /// Records a map held through `map` (its current metadata and contents); `expected`, when
    /// given, must equal what is read back.
    fn hold(&mut self, name: &str, map: Map, shape: Shape, expected: Option<Contents>) -> R<()> {
        let info = map.info().map_err(err("info"))?;
        let frozen = map.frozen().map_err(err("frozen"))?;
        let access = fd_access(&map)?;
        let contents = match (shape, expected) {
            // Reading would pop: trust what was pushed (checked after the restore).
            (Shape::Queue { .. }, Some(e)) => e,
            (_, expected) => {
                let got = read(&map, shape)?;
                if let Some(e) = expected
                    && e != got
                {
                    return Err(format!("{name}: read back {got:?}, wrote {e:?}"));
                }
                got
            }
        };
        let percpu_stride = matches!(info.map_type, T::PERCPU_HASH | T::PERCPU_ARRAY)
            .then(|| round_up8(info.value_size) as usize);
        self.held.push(Held {
            name: name.to_string(),
            fd: map.fd().as_raw_fd(),
            map,
            shape,
            access,
            info,
            frozen,
            contents,
            percpu_stride,
        });
        Ok(())
    }
}

fn sorted(mut e: Entries) -> Entries {
    e.sort();
    e
}

/// Creates, fills and records every map.
fn setup() -> R<Setup> {
    let cpus = sys::possible_cpus().map_err(err("possible CPUs"))?;
    let mut s = Setup {
        held: Vec::new(),
        shared_id: 0,
    };
    let keyed = |k: u32, v: usize| Shape::Keyed {
        key: k as usize,
        value: v,
    };

    let hash = create("hash", T::HASH, 4, 8, 64, 0)?;
    let e = sorted(
        (1..=10u32)
            .map(|k| (u32b(k), u64b(u64::from(k * k + 7))))
            .collect(),
    );
    fill(&hash, &e)?;
    s.hold("hash", hash, keyed(4, 8), Some(Contents::Entries(e)))?;

    let pcpu = create("percpu_hash", T::PERCPU_HASH, 4, 8, 16, 0)?;
    let e = sorted(
        (1..=4u32)
            .map(|k| {
                let v = percpu(cpus, 8, |c| u64b(u64::from(k * 1000 + c)));
                (u32b(k), v)
            })
            .collect(),
    );
    fill(&pcpu, &e)?;
    let vl = round_up8(8) as usize * cpus as usize;
    s.hold(
        "percpu_hash",
        pcpu,
        keyed(4, vl),
        Some(Contents::Entries(e)),
    )?;

    let lru = create("lru_hash", T::LRU_HASH, 8, 16, 32, 0)?;
    let e = sorted(
        (1..=5u64)
            .map(|k| {
                let mut v = u64b(k * 3);
                v.extend(u64b(k * 5));
                (u64b(0x1000 + k), v)
            })
            .collect(),
    );
    fill(&lru, &e)?;
    s.hold("lru_hash", lru, keyed(8, 16), Some(Contents::Entries(e)))?;

    let array = create("array", T::ARRAY, 4, 16, 8, 0)?;
    let e: Entries = (0..8u32)
        .map(|i| {
            let mut v = u32b(100 + i);
            v.extend(u32b(1 << i));
            v.extend(u64b(u64::from(i) * 1000));
            (u32b(i), v)
        })
        .collect();
    fill(&array, &e)?;
    s.hold(
        "array",
        array,
        keyed(4, 16),
        Some(Contents::Entries(sorted(e))),
    )?;

    let parr = create("percpu_array", T::PERCPU_ARRAY, 4, 4, 4, 0)?;
    let e: Entries = (0..4u32)
        .map(|i| (u32b(i), percpu(cpus, 4, |c| u32b(i * 10 + c))))
        .collect();
    fill(&parr, &e)?;
    let vl = round_up8(4) as usize * cpus as usize;
    s.hold(
        "percpu_array",
        parr,
        keyed(4, vl),
        Some(Contents::Entries(sorted(e))),
    )?;

    let trie = create("lpm_trie", T::LPM_TRIE, 8, 4, 16, map_flags::NO_PREALLOC)?;
    let prefix = |len: u32, a: [u8; 4]| {
        let mut k = u32b(len);
        k.extend(a);
        k
    };
    let e = sorted(vec![
        (prefix(8, [10, 0, 0, 0]), u32b(1)),
        (prefix(16, [10, 1, 0, 0]), u32b(2)),
        (prefix(24, [10, 1, 2, 0]), u32b(3)),
        (prefix(0, [0, 0, 0, 0]), u32b(9)),
    ]);
    fill(&trie, &e)?;
    s.hold("lpm_trie", trie, keyed(8, 4), Some(Contents::Entries(e)))?;

    // Maps of maps: inner1 stays held by fd, inner2 and inner3 only live inside their outer map.
    let inner = |name: &str, base: u64| -> R<(Map, Entries)> {
        let m = create(name, T::ARRAY, 4, 8, 4, 0)?;
        let e: Entries = (0..4u32)
            .map(|i| (u32b(i), u64b(base + u64::from(i))))
            .collect();
        fill(&m, &e)?;
        Ok((m, e))
    };
    let (inner1, e1) = inner("inner1", 500)?;
    let (inner2, e2) = inner("inner2", 600)?;
    let (inner3, e3) = inner("inner3", 700)?;
    let fd_value = |m: &Map| u32b(m.fd().as_raw_fd() as u32);
    let hom = Map::create(&CreateAttrs {
        map_type: T::HASH_OF_MAPS,
        name: "hash_of_maps",
        key_size: 4,
        value_size: 4,
        max_entries: 8,
        inner_map_fd: Some(inner1.fd()),
        ..Default::default()
    })
    .map_err(err("creating hash_of_maps"))?;
    fill(
        &hom,
        &vec![(u32b(1), fd_value(&inner1)), (u32b(2), fd_value(&inner2))],
    )?;
    s.hold(
        "hash_of_maps",
        hom,
        Shape::OfMaps { key: 4 },
        Some(Contents::OfMaps(vec![(u32b(1), e1.clone()), (u32b(2), e2)])),
    )?;
    s.hold(
        "hash_of_maps.inner1",
        inner1,
        keyed(4, 8),
        Some(Contents::Entries(e1)),
    )?;
    drop(inner2);
    let aom = Map::create(&CreateAttrs {
        map_type: T::ARRAY_OF_MAPS,
        name: "array_of_maps",
        key_size: 4,
        value_size: 4,
        max_entries: 2,
        inner_map_fd: Some(inner3.fd()),
        ..Default::default()
    })
    .map_err(err("creating array_of_maps"))?;
    fill(&aom, &vec![(u32b(0), fd_value(&inner3))])?;
    drop(inner3);
    s.hold(
        "array_of_maps",
        aom,
        Shape::OfMaps { key: 4 },
        Some(Contents::OfMaps(vec![(u32b(0), e3)])),
    )?;

    for (name, t, values, pops) in [
        ("queue", T::QUEUE, [11u64, 22, 33], [11u64, 22, 33]),
        ("stack", T::STACK, [44, 55, 66], [66, 55, 44]),
    ] {
        let m = create(name, t, 0, 8, 8, 0)?;
        for v in values {
            m.update(None, &u64b(v), 0).map_err(err("push"))?;
        }
        let expected = Contents::Queue(pops.iter().map(|v| u64b(*v)).collect());
        s.hold(name, m, Shape::Queue { value: 8 }, Some(expected))?;
    }

    let frozen = create("frozen_array", T::ARRAY, 4, 8, 4, 0)?;
    let e: Entries = (0..4u32)
        .map(|i| (u32b(i), u64b(900 + u64::from(i))))
        .collect();
    fill(&frozen, &e)?;
    frozen.freeze().map_err(err("freeze"))?;
    s.hold(
        "frozen_array",
        frozen,
        keyed(4, 8),
        Some(Contents::Entries(e)),
    )?;

    // The BTF object is only needed to create the map (which keeps its own reference): its fd
    // is closed before the checkpoint, since CRIU cannot carry BTF fds.
    let btf_obj = Btf::load(&btf::spin_lock_btf()).map_err(err("loading BTF"))?;
    let locked = Map::create(&CreateAttrs {
        map_type: T::HASH,
        name: "spin_lock",
        key_size: 4,
        value_size: btf::LOCKED_VALUE_SIZE,
        max_entries: 8,
        btf_fd: Some(btf_obj.fd()),
        btf_key_type_id: btf::U32_ID,
        btf_value_type_id: btf::LOCKED_VALUE_ID,
        ..Default::default()
    })
    .map_err(err(
        "creating spin_lock (a hash map with a bpf_spin_lock in its BTF value)",
    ))?;
    drop(btf_obj);
    let e = sorted(
        (1..=3u32)
            .map(|k| {
                let mut v = u32b(0); // the lock: always reads as zero
                v.extend(u32b(k * 2));
                v.extend(u64b(u64::from(k) * 100));
                v.extend(u64b(u64::from(k) * 1500));
                (u32b(k), v)
            })
            .collect(),
    );
    fill(&locked, &e)?;
    s.hold(
        "spin_lock",
        locked,
        keyed(4, btf::LOCKED_VALUE_SIZE as usize),
        Some(Contents::Entries(e)),
    )?;

    let shared = create("shared", T::HASH, 4, 8, 16, 0)?;
    let e = sorted(
        (1..=3u32)
            .map(|k| (u32b(k), u64b(u64::from(k) + 40)))
            .collect(),
    );
    fill(&shared, &e)?;
    s.shared_id = shared.info().map_err(err("info"))?.id;
    let dup = shared.try_clone().map_err(err("dup"))?;
    let second = Map::from_id(s.shared_id).map_err(err("second open"))?;
    let ro = Map::from_id_with_flags(s.shared_id, Access::ReadOnly.bpf_open_flags())
        .map_err(err("read-only open"))?;
    let wo = Map::from_id_with_flags(s.shared_id, Access::WriteOnly.bpf_open_flags())
        .map_err(err("write-only open"))?;
    let c = || Some(Contents::Entries(e.clone()));
    s.hold("shared", shared, keyed(4, 8), c())?;
    s.hold("shared.dup", dup, keyed(4, 8), c())?;
    s.hold("shared.second_open", second, keyed(4, 8), c())?;
    s.hold("shared.read_only", ro, keyed(4, 8), c())?;
    s.hold("shared.write_only", wo, Shape::WriteOnly, None)?;
    Ok(s)
}

// ---- reports --------------------------------------------------------------------------------

fn num(b: &[u8]) -> String {
    match b.len() {
        4 => u32::from_ne_bytes([b[0], b[1], b[2], b[3]]).to_string(),
        8 => u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).to_string(),
        _ => b.iter().fold(String::from("0x"), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        }),
    }
}

fn value_text(v: &[u8], stride: Option<usize>, value_size: usize) -> String {
    match stride {
        Some(st) => {
            let cpus: Vec<String> = v
                .chunks(st)
                .enumerate()
                .map(|(c, slot)| format!("cpu{c}={}", num(&slot[..value_size.min(slot.len())])))
                .collect();
            format!("[{}]", cpus.join(" "))
        }
        None => num(v),
    }
}

/// An LPM trie key `{ u32 prefixlen; u8 addr[4]; }` as `a.b.c.d/len`.
fn lpm_key(k: &[u8]) -> String {
    match k {
        [l0, l1, l2, l3, a, b, c, d] => {
            format!(
                "{a}.{b}.{c}.{d}/{}",
                u32::from_ne_bytes([*l0, *l1, *l2, *l3])
            )
        }
        _ => num(k),
    }
}

fn entries_text(out: &mut String, e: &Entries, info: &MapInfo, stride: Option<usize>) {
    for (k, v) in e {
        let key = if info.map_type == T::LPM_TRIE {
            lpm_key(k)
        } else {
            num(k)
        };
        let value = value_text(v, stride, info.value_size as usize);
        let _ = writeln!(out, "    {key} => {value}");
    }
}

fn render(h: &Held, info: &MapInfo, frozen: bool, access: Access, contents: &Contents) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (fd {}, {access}): map {} {:?} {} key {} value {} max {} flags {:#x}{}{}",
        h.name,
        h.fd,
        info.id,
        info.name,
        type_name(info.map_type),
        info.key_size,
        info.value_size,
        info.max_entries,
        info.flags,
        if info.btf_id != 0 {
            format!(" btf value type {}", info.btf_value_type_id)
        } else {
            String::new()
        },
        if frozen { " frozen" } else { "" },
    );
    match contents {
        Contents::Entries(e) => entries_text(&mut out, e, info, h.percpu_stride),
        Contents::OfMaps(m) => {
            for (k, inner) in m {
                let _ = writeln!(out, "    {} => inner map:", num(k));
                for (ik, iv) in inner {
                    let _ = writeln!(out, "        {} => {}", num(ik), num(iv));
                }
            }
        }
        Contents::Queue(values) => {
            let v: Vec<String> = values.iter().map(|v| num(v)).collect();
            let _ = writeln!(out, "    pops: {}", v.join(", "));
        }
        Contents::Unreadable => {
            let _ = writeln!(out, "    (write-only fd: not readable)");
        }
    }
    out
}

// ---- files shared with the test -------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
struct StateMap {
    name: String,
    fd: i32,
    map_id: u32,
    map_type: String,
    access: Access,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    pid: u32,
    child_pid: u32,
    maps: Vec<StateMap>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChildState {
    pid: u32,
    inherited_fd: i32,
    own_fd: i32,
    map_id: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChildResult {
    inherited_fd: i32,
    own_fd: i32,
    inherited_map_id: u32,
    own_map_id: u32,
    map_id_before: u32,
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    passed: usize,
    failed: Vec<String>,
    checks: Vec<Check>,
}

fn write_atomic(path: &Path, text: &str) -> R<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

fn write_json(path: &Path, v: &impl Serialize) -> R<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    write_atomic(path, &(text + "\n"))
}

/// Waits for `path` to exist; false on timeout.
fn wait_for(path: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

// ---- the child ------------------------------------------------------------------------------

fn child(dir: &Path, inherited_fd: i32, map_id: u32) -> R<()> {
    let id_of = |fd: i32| -> R<u32> {
        let owned = ffi::dup_raw(fd).map_err(|e| format!("fd {fd}: {e}"))?;
        let map = Map::from_fd(owned).map_err(err("inherited fd"))?;
        Ok(map.info().map_err(err("info"))?.id)
    };
    let got = id_of(inherited_fd)?;
    if got != map_id {
        return Err(format!(
            "inherited fd {inherited_fd} is map {got}, not {map_id}"
        ));
    }
    let own = Map::from_id(map_id).map_err(err("opening shared by id"))?;
    write_json(
        &dir.join("child-state.json"),
        &ChildState {
            pid: std::process::id(),
            inherited_fd,
            own_fd: own.fd().as_raw_fd(),
            map_id,
        },
    )?;
    if !wait_for(&dir.join("child-go"), WAIT_GO) {
        return Err("no child-go".into());
    }
    own.update(
        Some(&CHILD_MARKER_KEY.to_ne_bytes()),
        &CHILD_MARKER_VALUE.to_ne_bytes(),
        0,
    )
    .map_err(err("writing the marker through the child's own fd"))?;
    write_json(
        &dir.join("child-result.json"),
        &ChildResult {
            inherited_fd,
            own_fd: own.fd().as_raw_fd(),
            inherited_map_id: id_of(inherited_fd)?,
            own_map_id: own.info().map_err(err("info"))?.id,
            map_id_before: map_id,
        },
    )
}

// ---- the parent -----------------------------------------------------------------------------

fn spawn_child(dir: &Path, shared: &Map, id: u32) -> R<Child> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    ffi::set_cloexec(shared.fd(), false).map_err(|e| format!("fcntl: {e}"))?;
    let child = Command::new(exe)
        .arg("child")
        .arg("--dir")
        .arg(dir)
        .arg("--fd")
        .arg(shared.fd().as_raw_fd().to_string())
        .arg("--map-id")
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning the child: {e}"));
    ffi::set_cloexec(shared.fd(), true).map_err(|e| format!("fcntl: {e}"))?;
    child
}

struct Checker {
    checks: Vec<Check>,
}

impl Checker {
    fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.to_string(),
            ok,
            detail: detail.into(),
        });
    }

    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, before: T, after: T) {
        let ok = before == after;
        let detail = if ok {
            format!("{after:?}")
        } else {
            format!("before {before:?}, after {after:?}")
        };
        self.check(name, ok, detail);
    }

    fn result<T>(&mut self, name: &str, r: R<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.check(name, false, e);
                None
            }
        }
    }
}

fn errno_of(r: Result<impl Sized, sys::SysError>) -> Option<i32> {
    r.err().and_then(|e| e.errno())
}

fn run(dir: &Path) -> R<bool> {
    let s = setup()?;
    let shared = s
        .held
        .iter()
        .find(|h| h.name == "shared")
        .ok_or("no shared map")?;
    let mut child = spawn_child(dir, &shared.map, s.shared_id)?;
    if !wait_for(&dir.join("child-state.json"), Duration::from_secs(30)) {
        let _ = child.kill();
        return Err("the child did not start".into());
    }
    let before: String = s
        .held
        .iter()
        .map(|h| render(h, &h.info, h.frozen, h.access, &h.contents))
        .collect();
    write_atomic(&dir.join("before.txt"), &before)?;
    write_json(
        &dir.join("state.json"),
        &State {
            pid: std::process::id(),
            child_pid: child.id(),
            maps: s
                .held
                .iter()
                .map(|h| StateMap {
                    name: h.name.clone(),
                    fd: h.fd,
                    map_id: h.info.id,
                    map_type: type_name(h.info.map_type).into(),
                    access: h.access,
                })
                .collect(),
        },
    )?;
    write_atomic(&dir.join("ready"), "")?;

    // ---- checkpoint and restore happen here ----
    if !wait_for(&dir.join("go"), WAIT_GO) {
        let _ = child.kill();
        return Err("no go within the time limit".into());
    }

    let mut c = Checker { checks: Vec::new() };
    let mut after = String::new();
    for h in &s.held {
        let n = &h.name;
        let fd = h.map.fd();
        c.check(
            &format!("{n}: fd {} is still a BPF map", h.fd),
            fd.as_raw_fd() == h.fd && sys::fd_kind(fd.as_fd()) == ObjKind::Map,
            format!("{:?}", sys::fd_kind(fd.as_fd())),
        );
        let Some(info) = c.result(
            &format!("{n}: info"),
            h.map.info().map_err(|e| e.to_string()),
        ) else {
            continue;
        };
        let meta = |i: &MapInfo| {
            (
                type_name(i.map_type),
                i.key_size,
                i.value_size,
                i.max_entries,
                i.flags,
                i.name.clone(),
                i.map_extra,
                i.btf_id != 0,
                i.btf_key_type_id,
                i.btf_value_type_id,
            )
        };
        c.eq(&format!("{n}: metadata"), meta(&h.info), meta(&info));
        c.check(
            &format!("{n}: a new kernel map"),
            info.id != h.info.id,
            format!("id {} before, {} after", h.info.id, info.id),
        );
        let frozen = c
            .result(
                &format!("{n}: frozen"),
                h.map.frozen().map_err(|e| e.to_string()),
            )
            .unwrap_or(!h.frozen);
        c.eq(&format!("{n}: frozen state"), h.frozen, frozen);
        let access = c
            .result(&format!("{n}: access"), fd_access(&h.map))
            .unwrap_or(Access::ReadWrite);
        c.eq(&format!("{n}: fd access mode"), h.access, access);
        if let Some(contents) = c.result(&format!("{n}: read"), read(&h.map, h.shape)) {
            c.eq(&format!("{n}: contents"), &h.contents, &contents);
            after.push_str(&render(h, &info, frozen, access, &contents));
        }
    }

    let by_name: BTreeMap<&str, &Held> = s.held.iter().map(|h| (h.name.as_str(), h)).collect();
    let get = |n: &str| by_name.get(n).map(|h| &h.map).ok_or(format!("no map {n}"));
    let id = |m: &Map| m.info().map(|i| i.id).unwrap_or(0);

    // The frozen map refuses writes from user space.
    let frozen = get("frozen_array")?;
    c.eq(
        "frozen_array: update refused",
        Some(libc::EPERM),
        errno_of(frozen.update(Some(&u32b(0)), &u64b(1), 0)),
    );

    // The spin-lock map kept its BTF.
    let locked = get("spin_lock")?.info().map_err(err("info"))?;
    c.check(
        "spin_lock: created with BTF (value type locked_value)",
        locked.btf_id != 0 && locked.btf_value_type_id == btf::LOCKED_VALUE_ID,
        format!(
            "btf id {}, value type {}",
            locked.btf_id, locked.btf_value_type_id
        ),
    );

    // The kept inner map is the one inside its outer map.
    let outer = get("hash_of_maps")?;
    let mut inner_id = [0u8; 4];
    let found = outer
        .lookup(Some(&u32b(1)), &mut inner_id, 0)
        .map_err(err("lookup"))?;
    c.eq(
        "hash_of_maps.inner1: the fd and outer key 1 hold one map",
        id(get("hash_of_maps.inner1")?),
        if found {
            u32::from_ne_bytes(inner_id)
        } else {
            0
        },
    );

    // Every fd of `shared` reaches one map; access modes are enforced.
    let shared = get("shared")?;
    let sid = id(shared);
    for n in [
        "shared.dup",
        "shared.second_open",
        "shared.read_only",
        "shared.write_only",
    ] {
        c.eq(&format!("{n}: same map as shared"), sid, id(get(n)?));
    }
    get("shared.second_open")?
        .update(Some(&u32b(100)), &u64b(4242), 0)
        .map_err(err("write through the second open"))?;
    let mut v = [0u8; 8];
    let seen = shared
        .lookup(Some(&u32b(100)), &mut v, 0)
        .map_err(err("lookup"))?
        && u64::from_ne_bytes(v) == 4242;
    c.check(
        "shared: a write through the second open is seen through the first",
        seen,
        "",
    );
    c.eq(
        "shared.read_only: update refused",
        Some(libc::EPERM),
        errno_of(get("shared.read_only")?.update(Some(&u32b(1)), &u64b(1), 0)),
    );
    c.eq(
        "shared.write_only: lookup refused",
        Some(libc::EPERM),
        errno_of(get("shared.write_only")?.lookup(Some(&u32b(1)), &mut v, 0)),
    );
    c.check(
        "shared.write_only: update allowed",
        get("shared.write_only")?
            .update(Some(&u32b(101)), &u64b(1), 0)
            .is_ok(),
        "",
    );

    // The child process: its inherited fd and its own open are the parent's map.
    write_atomic(&dir.join("child-go"), "")?;
    let child_result = if wait_for(&dir.join("child-result.json"), Duration::from_secs(30)) {
        std::fs::read_to_string(dir.join("child-result.json"))
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<ChildResult>(&t).map_err(|e| e.to_string()))
    } else {
        Err("the child wrote no result".into())
    };
    if let Some(r) = c.result("child: result", child_result) {
        c.eq(
            "child: inherited fd is the shared map",
            sid,
            r.inherited_map_id,
        );
        c.eq("child: own open is the shared map", sid, r.own_map_id);
        let mut v = [0u8; 8];
        let seen = shared
            .lookup(Some(&CHILD_MARKER_KEY.to_ne_bytes()), &mut v, 0)
            .map_err(err("lookup"))?
            && u64::from_ne_bytes(v) == CHILD_MARKER_VALUE;
        c.check("shared: the child's write is seen by the parent", seen, "");
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the child: {e}"))?;
    c.check("child: exited 0", status.success(), format!("{status}"));

    write_atomic(&dir.join("after.txt"), &after)?;
    let failed: Vec<String> = c
        .checks
        .iter()
        .filter(|x| !x.ok)
        .map(|x| format!("{}: {}", x.name, x.detail))
        .collect();
    let report = Report {
        ok: failed.is_empty(),
        passed: c.checks.len() - failed.len(),
        failed,
        checks: c.checks,
    };
    write_json(&dir.join("result.json"), &report)?;
    Ok(report.ok)
}
