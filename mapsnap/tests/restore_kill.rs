//! All-or-nothing restore under faults: the `mapsnap` CLI restoring a multi-map snapshot is
//! killed with SIGKILL at random points, over and over. After each kill (and the cleanup the
//! next run does first, [`mapsnap::restore::recover`]) the target holds either the old state
//! or the complete new one, never a mix; the retry succeeds and matches the snapshot entry by
//! entry; no temporaries stay behind. A restore that hits its deadline removes everything it
//! created. Runs on the real kernel's bpffs as root.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mapsnap::anchor::Anchor;
use mapsnap::discover::Found;
use mapsnap::dump::{DumpOptions, dump};
use mapsnap::format::verify;
use mapsnap::model::SnapshotInfo;
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, RestoreOptions, recover, restore};
use mapsnap::sys::{CreateAttrs, Map};

const PINS: [&str; 4] = ["m0", "sub/m1", "sub/m2", "deep/er/m3"];
const ENTRIES: u32 = 30_000;
const VALUE: usize = 32;

/// The value of key `k` in map `m` of snapshot `generation`.
fn value(generation: u8, m: usize, k: u32) -> [u8; VALUE] {
    let mut v = [generation; VALUE];
    v[..4].copy_from_slice(&k.to_ne_bytes());
    v[4] = m as u8;
    v
}

/// Writes snapshot `generation` (4 hash maps, pinned at PINS) to `out`.
fn make_snapshot(generation: u8, out: &Path) {
    let mut found = Vec::new();
    for (m, pin) in PINS.iter().enumerate() {
        let map = Map::create(&CreateAttrs {
            map_type: 1,
            name: &format!("kill{m}"),
            key_size: 4,
            value_size: VALUE as u32,
            max_entries: ENTRIES,
            ..CreateAttrs::default()
        })
        .unwrap();
        let keys: Vec<u8> = (0..ENTRIES).flat_map(|k| k.to_ne_bytes()).collect();
        let values: Vec<u8> = (0..ENTRIES).flat_map(|k| value(generation, m, k)).collect();
        assert_eq!(
            map.update_batch(&keys, &values, ENTRIES, 0).unwrap(),
            ENTRIES
        );
        found.push(Found::from_map(map, Some((*pin).to_string())).unwrap());
    }
    let opts = DumpOptions {
        threads: 1,
        ..DumpOptions::default()
    };
    let f = std::fs::File::create(out).unwrap();
    dump(&found, f, &SnapshotInfo::default(), &opts, &NoProgress).unwrap();
}

/// Every entry of the map pinned at `path`.
fn read_map(path: &Path) -> HashMap<u32, Vec<u8>> {
    let m = Map::from_pin(path).unwrap();
    let mut out = HashMap::new();
    let (mut cur, mut next) = (None::<[u8; 4]>, [0u8; 4]);
    while m
        .next_key(cur.as_ref().map(|c| c.as_slice()), &mut next)
        .unwrap()
    {
        let mut v = vec![0u8; VALUE];
        if m.lookup(Some(&next), &mut v, 0).unwrap() {
            out.insert(u32::from_ne_bytes(next), v);
        }
        cur = Some(next);
    }
    out
}

/// Which snapshot generation the target holds: `None` for no pins at all; panics on a mix.
fn state(target: &Path) -> Option<u8> {
    let mut gens = Vec::new();
    for (m, pin) in PINS.iter().enumerate() {
        let p = target.join(pin);
        if !p.exists() {
            gens.push(None);
            continue;
        }
        let entries = read_map(&p);
        let g = entries.get(&0).map(|v| v[5]);
        assert_eq!(entries.len(), ENTRIES as usize, "{pin}: a half-filled map");
        assert_eq!(entries.get(&7).map(|v| v[4]), Some(m as u8));
        gens.push(g);
    }
    assert!(
        gens.windows(2).all(|w| w[0] == w[1]),
        "the target holds a mix of states: {gens:?}"
    );
    gens[0]
}

/// The target holds exactly snapshot `generation`, entry by entry.
fn matches(target: &Path, generation: u8) {
    for (m, pin) in PINS.iter().enumerate() {
        let entries = read_map(&target.join(pin));
        assert_eq!(entries.len(), ENTRIES as usize);
        for k in 0..ENTRIES {
            assert_eq!(
                entries.get(&k).map(Vec::as_slice),
                Some(&value(generation, m, k)[..]),
                "{pin} key {k}"
            );
        }
    }
}

/// Names of our temporaries anywhere below `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.starts_with("mapsnap_") {
            out.push(name);
        } else if e.file_type().unwrap().is_dir() {
            out.extend(leftovers(&e.path()));
        }
    }
    out
}

fn cli(snapshot: &Path, target: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mapsnap"));
    c.arg("restore")
        .arg(snapshot)
        .arg("--pin-root")
        .arg(target)
        .arg("--overwrite")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// xorshift64: random kill delays without a dependency.
fn next_rand(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn sigkill_at_random_points_leaves_old_or_new_and_retry_succeeds() {
    let root = common::fresh_pin_dir("killloop");
    let target = root.join("target");
    std::fs::create_dir(&target).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let snaps = [tmp.path().join("a.snap"), tmp.path().join("b.snap")];
    make_snapshot(0xA0, &snaps[0]);
    make_snapshot(0xB0, &snaps[1]);
    let generation = [0xA0u8, 0xB0];

    // A full run, timed: kills land anywhere from process start to just past its end.
    let t0 = Instant::now();
    assert!(cli(&snaps[0], &target).status().unwrap().success());
    let mut full = t0.elapsed();
    matches(&target, generation[0]);
    let mut current = 0usize;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    let mut outcomes: HashMap<&str, u32> = HashMap::new();
    let iterations = 32;
    for i in 0..iterations {
        let next = 1 - current;
        // Half the kills anywhere, half in the last fifth (staging, commit, rename).
        let span = full.as_micros() as u64;
        let r = next_rand(&mut seed) % (span * 3 / 10).max(1);
        let delay = Duration::from_micros(if i % 2 == 0 {
            next_rand(&mut seed) % (span * 11 / 10).max(1)
        } else {
            span * 8 / 10 + r
        });
        let mut child = cli(&snaps[next], &target).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        // What the next run finds first (it is what `restore` itself runs on start).
        let rec = recover(&Anchor::open_trusted(&target, "target").unwrap()).unwrap();
        let s = state(&target);
        let kind = if status.success() {
            "finished before the kill"
        } else if rec.rolled_forward > 0 {
            "killed after commit: completed by recovery"
        } else if rec.rolled_back > 0 {
            "killed while staging: undone by recovery"
        } else {
            "killed before publishing"
        };
        *outcomes.entry(kind).or_default() += 1;
        assert!(
            s == Some(generation[current]) || s == Some(generation[next]),
            "iteration {i} ({kind}, after {delay:?}): state {s:x?}"
        );
        assert!(leftovers(&target).is_empty(), "{:?}", leftovers(&target));
        // The retry succeeds and yields exactly the snapshot; its duration (warm caches)
        // sets the range of the next kill.
        let t = Instant::now();
        assert!(
            cli(&snaps[next], &target).status().unwrap().success(),
            "retry {i} failed"
        );
        full = full.min(t.elapsed());
        matches(&target, generation[next]);
        current = next;
    }
    eprintln!("{iterations} kills over a {full:?} restore: {outcomes:?}");
}

#[test]
fn a_leftover_temporary_of_a_dead_run_does_not_block_retries() {
    let root = common::fresh_pin_dir("stale");
    let target = root.join("target");
    std::fs::create_dir_all(target.join("sub")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("a.snap");
    make_snapshot(0xA0, &snap);
    // Debris in our naming, owned by a pid that cannot exist (pid_max is at most 2^22).
    let junk = Map::create(&CreateAttrs {
        map_type: 2,
        name: "junk",
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..CreateAttrs::default()
    })
    .unwrap();
    junk.pin(&target.join("mapsnap_tmp_99999999_0_0")).unwrap();
    std::fs::create_dir_all(target.join("mapsnap_stage_99999999_1/sub")).unwrap();
    junk.pin(&target.join("mapsnap_stage_99999999_1/sub/m1"))
        .unwrap();
    // A committed run killed before it moved its pins: completed.
    std::fs::create_dir_all(target.join("mapsnap_commit_r_99999999_2/sub")).unwrap();
    junk.pin(&target.join("mapsnap_commit_r_99999999_2/sub/m2"))
        .unwrap();
    // A foreign name that merely looks similar is left alone.
    junk.pin(&target.join("mapsnap_tmp_notours")).unwrap();
    let rec = recover(&Anchor::open_trusted(&target, "target").unwrap()).unwrap();
    assert_eq!(
        (rec.rolled_back, rec.rolled_forward, rec.temporaries),
        (1, 1, 1)
    );
    let moved = Map::from_pin(&target.join("sub/m2")).unwrap();
    assert_eq!(moved.info().unwrap().id, junk.info().unwrap().id);
    assert!(
        !target.join("sub/m1").exists(),
        "an uncommitted pin was published"
    );
    let summary = verify(std::fs::File::open(&snap).unwrap()).unwrap();
    restore(
        std::fs::File::open(&snap).unwrap(),
        Some(&summary),
        &Destination::PinRoot {
            dir: target.clone(),
            overwrite: true,
        },
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    matches(&target, 0xA0);
    assert_eq!(leftovers(&target), ["mapsnap_tmp_notours"]);
}

#[test]
fn deadline_removes_everything_and_a_retry_succeeds() {
    let root = common::fresh_pin_dir("deadline");
    let target = root.join("target");
    std::fs::create_dir(&target).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("a.snap");
    make_snapshot(0xA0, &snap);
    let summary = verify(std::fs::File::open(&snap).unwrap()).unwrap();
    let run = |deadline: Option<Instant>| {
        restore(
            std::fs::File::open(&snap).unwrap(),
            Some(&summary),
            &Destination::PinRoot {
                dir: target.clone(),
                overwrite: false,
            },
            &RestoreOptions {
                deadline,
                ..RestoreOptions::default()
            },
            &NoProgress,
        )
    };
    let ids_before = mapsnap::sys::loaded_map_ids().unwrap().len();
    for wait in [0u64, 1, 3] {
        let e = run(Some(Instant::now() + Duration::from_millis(wait))).unwrap_err();
        assert!(matches!(e, mapsnap::Error::Deadline { .. }), "{e}");
        assert!(e.to_string().contains("can be retried"), "{e}");
        assert_eq!(state(&target), None, "a pin was published");
        assert!(leftovers(&target).is_empty());
    }
    // The maps it created went with it (other tests may create maps meanwhile: allow some).
    let ids_after = mapsnap::sys::loaded_map_ids().unwrap().len();
    assert!(ids_after < ids_before + 4, "{ids_before} -> {ids_after}");
    run(None).unwrap();
    matches(&target, 0xA0);
}
