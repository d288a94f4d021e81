//! Attack: crafted snapshots, written with the format writer, that would make a restore
//! allocate or create far more than the snapshot's size suggests: 64 MiB of zero BTF that
//! zstd stores in a few KB, a 2^31-entry array (16 GiB of kernel memory), 10,000 inner maps,
//! maps of maps nested deeper than the kernel allows. Each must be refused up front with a
//! message naming the map or section, the limit and its flag; memory stays bounded; and no
//! map is created in the kernel. Runs on the real kernel as root.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Mutex;

use mapsnap::format::{SnapshotWriter, WriterOptions, verify, verify_with_limits};
use mapsnap::limits::Limits;
use mapsnap::model::{MapMeta, SnapshotInfo, map_type};
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, RestoreOptions, restore};
use mapsnap::sys::{Map, loaded_map_ids};

/// The memory tests measure this process's peak RSS: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn info() -> SnapshotInfo {
    SnapshotInfo {
        tool: "attack test".into(),
        possible_cpus: 2,
        ..SnapshotInfo::default()
    }
}

fn meta(name: &str, map_type: u32, key: u32, value: u32, max: u32) -> MapMeta {
    MapMeta {
        map_type,
        name: name.into(),
        key_size: key,
        value_size: value,
        max_entries: max,
        flags: 0,
        map_extra: 0,
        numa_node: None,
        frozen: false,
        possible_cpus: None,
        btf: None,
        pin_path: None,
        source_id: 0,
        inner_template: None,
        inner: false,
    }
}

/// Kernel maps whose name starts with `prefix` (other tests create maps concurrently, so
/// counting all maps would be racy; the crafted names are unique).
fn maps_named(prefix: &str) -> usize {
    loaded_map_ids()
        .unwrap()
        .into_iter()
        .filter_map(|id| Map::from_id(id).ok())
        .filter_map(|m| m.info().ok())
        .filter(|i| i.name.starts_with(prefix))
        .count()
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Resets the peak RSS (VmHWM) to the current RSS (`clear_refs` value 5).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// Restores `snap` twice, as the CLI does for new maps (verified first, then one pass) and
/// as a remote one-pass restore (unverified), expecting a limit error both times.
fn refused(snap: &[u8], limits: &Limits) -> String {
    common::ensure_bpffs();
    let opts = RestoreOptions {
        limits: *limits,
        ..RestoreOptions::default()
    };
    let v = verify_with_limits(snap, limits).expect_err("verify must refuse");
    let one_pass = restore(snap, None, &Destination::Detached, &opts, &NoProgress)
        .expect_err("one-pass restore must refuse");
    let msg = one_pass.to_string();
    assert!(msg.contains("more than the limit"), "{msg}");
    assert!(v.to_string().contains("more than the limit"), "{v}");
    msg
}

#[test]
fn zstd_bomb_of_btf_is_refused_with_bounded_memory() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snap = {
        let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).unwrap();
        let zeros = vec![0u8; 64 << 20];
        w.add_btf(&zeros).unwrap();
        w.finish().unwrap().0
    };
    assert!(
        snap.len() < 64 << 10,
        "64 MiB of zeros compress to {} bytes",
        snap.len()
    );
    reset_peak();
    let before = status_kb("VmHWM:");
    let msg = refused(&snap, &Limits::default());
    let grew = status_kb("VmHWM:").saturating_sub(before);
    assert!(msg.contains("BTF section 0"), "{msg}");
    assert!(msg.contains("--max-btf-blob"), "{msg}");
    // The reader's own input buffer is 256 KiB; nothing near the 64 MiB the file claims.
    assert!(grew < 8 << 10, "peak RSS grew by {grew} KiB");

    // Many small blobs add up: the total is bounded too.
    let snap = {
        let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).unwrap();
        let blob = vec![0u8; 4 << 20];
        for _ in 0..20 {
            w.add_btf(&blob).unwrap();
        }
        w.finish().unwrap().0
    };
    let msg = refused(&snap, &Limits::default());
    assert!(msg.contains("--max-btf-bytes"), "{msg}");
    // A raised limit lets a trusted snapshot through.
    let big = Limits {
        max_btf_total: 128 << 20,
        ..Limits::default()
    };
    verify_with_limits(snap.as_slice(), &big).unwrap();
}

#[test]
fn huge_array_is_refused_before_any_map_is_created() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snap = {
        let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).unwrap();
        // A small map first: it must not be created either (all checked before the first).
        w.begin_map(&meta("atk_small", map_type::ARRAY, 4, 8, 4))
            .unwrap();
        w.end_map().unwrap();
        w.begin_map(&meta("atk_huge", map_type::ARRAY, 4, 8, 1 << 31))
            .unwrap();
        w.end_map().unwrap();
        w.finish().unwrap().0
    };
    // The file itself is fine: only what it asks of the kernel is too much.
    let summary = verify(snap.as_slice()).unwrap();
    common::ensure_bpffs();
    let opts = RestoreOptions::default();
    let before = maps_named("atk_");
    reset_peak();
    let rss0 = status_kb("VmHWM:");
    let e = restore(
        snap.as_slice(),
        Some(&summary),
        &Destination::Detached,
        &opts,
        &NoProgress,
    )
    .expect_err("16 GiB array");
    let msg = e.to_string();
    assert!(msg.contains("snapshot map 1 \"atk_huge\""), "{msg}");
    assert!(msg.contains("--max-kernel-memory"), "{msg}");
    assert_eq!(maps_named("atk_"), before, "a map was created");
    // Unverified (one pass, as for a remote snapshot): refused at its MAP_BEGIN, before
    // creation; the small map before it was created and is dropped with the failed restore.
    let e = restore(
        snap.as_slice(),
        None,
        &Destination::Detached,
        &opts,
        &NoProgress,
    )
    .expect_err("16 GiB array, one pass");
    assert!(e.to_string().contains("--max-kernel-memory"), "{e}");
    assert_eq!(maps_named("atk_huge"), 0);
    assert_eq!(
        maps_named("atk_"),
        before,
        "a map outlived the failed restore"
    );
    assert!(status_kb("VmHWM:") - rss0 < 8 << 10);
}

#[test]
fn ten_thousand_inner_maps_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 10_000u32;
    let snap = {
        let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).unwrap();
        for i in 0..n {
            let mut m = meta(&format!("atk_in{i}"), map_type::ARRAY, 4, 4, 1);
            m.inner = true;
            w.begin_map(&m).unwrap();
            w.end_map().unwrap();
        }
        let mut outer = meta("atk_outer", map_type::HASH_OF_MAPS, 4, 4, n);
        outer.inner_template = Some(0);
        w.begin_map(&outer).unwrap();
        let keys: Vec<u8> = (0..n).flat_map(|i| i.to_ne_bytes()).collect();
        let values: Vec<u8> = (0..n).flat_map(|i| i.to_le_bytes()).collect();
        w.write_entries(n as usize, &keys, &values).unwrap();
        w.end_map().unwrap();
        w.finish().unwrap().0
    };
    let before = maps_named("atk_in");
    let msg = refused(&snap, &Limits::default());
    assert!(msg.contains("snapshot map 4096"), "{msg}");
    assert!(msg.contains("--max-maps"), "{msg}");
    // Checked before the first inner map is created, whatever the order.
    assert_eq!(maps_named("atk_in"), before);
}

#[test]
fn nesting_deeper_than_allowed_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snap = {
        let mut w = SnapshotWriter::new(Vec::new(), &info(), WriterOptions::default()).unwrap();
        let mut leaf = meta("atk_leaf", map_type::ARRAY, 4, 4, 1);
        leaf.inner = true;
        w.begin_map(&leaf).unwrap();
        w.end_map().unwrap();
        let mut prev = 0;
        for d in 1..=3 {
            let mut m = meta(&format!("atk_nest{d}"), map_type::ARRAY_OF_MAPS, 4, 4, 1);
            m.inner = d < 3;
            m.inner_template = Some(prev);
            prev = w.begin_map(&m).unwrap();
            w.end_map().unwrap();
        }
        w.finish().unwrap().0
    };
    let before = maps_named("atk_");
    let msg = refused(&snap, &Limits::default());
    assert!(msg.contains("snapshot map 2 \"atk_nest2\""), "{msg}");
    assert!(msg.contains("--max-nesting"), "{msg}");
    assert_eq!(maps_named("atk_"), before);
}

#[test]
fn oversized_sections_are_refused_by_the_configured_limit() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snap = {
        let mut w = SnapshotWriter::new(
            Vec::new(),
            &info(),
            WriterOptions {
                chunk_bytes: 8 << 20,
                ..WriterOptions::default()
            },
        )
        .unwrap();
        w.begin_map(&meta("atk_chunk", map_type::HASH, 4, 1024, 8192))
            .unwrap();
        let keys: Vec<u8> = (0..8000u32).flat_map(|i| i.to_ne_bytes()).collect();
        let values = vec![0u8; 8000 * 1024];
        w.write_entries(8000, &keys, &values).unwrap();
        w.end_map().unwrap();
        w.finish().unwrap().0
    };
    let small = Limits {
        max_section: 1 << 20,
        ..Limits::default()
    };
    let msg = refused(&snap, &small);
    assert!(msg.contains("ENTRIES section"), "{msg}");
    assert!(msg.contains("--max-section"), "{msg}");
    verify(snap.as_slice()).unwrap();
}
