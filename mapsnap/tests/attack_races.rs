//! Attack: a writer on a shared directory flips names into symbolic links while mapsnap works
//! there. On a shared bpffs it tries to slip another tenant's map into a dump, or to make a
//! restore's publish rename over another tenant's pin; on a shared volume it tries to make a
//! snapshot write land outside the volume. Each test races a flipping thread against many
//! runs and asserts that nothing outside the target changed and no foreign map was taken.
//! Runs on the real kernel's bpffs as root.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use mapsnap::discover::find_pinned;
use mapsnap::dump::{DumpOptions, dump};
use mapsnap::format::verify;
use mapsnap::model::SnapshotInfo;
use mapsnap::progress::NoProgress;
use mapsnap::restore::{Destination, RestoreOptions, restore};
use mapsnap::storage::{Location, Storage, StorageConfig};
use mapsnap::sys::{CreateAttrs, Map};

fn hash_map(name: &str, value: u64) -> Map {
    let m = Map::create(&CreateAttrs {
        map_type: 1,
        name,
        key_size: 4,
        value_size: 8,
        max_entries: 16,
        ..CreateAttrs::default()
    })
    .unwrap();
    m.update(Some(&1u32.to_ne_bytes()), &value.to_ne_bytes(), 0)
        .unwrap();
    m
}

fn value_of(m: &Map) -> u64 {
    let mut v = [0u8; 8];
    assert!(m.lookup(Some(&1u32.to_ne_bytes()), &mut v, 0).unwrap());
    u64::from_ne_bytes(v)
}

/// Flips `name` between the real directory (or pin) and a symlink to `target` until stopped.
/// Returns how many flips it made.
fn flipper(name: PathBuf, target: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let aside = name.with_file_name(format!(
            "{}_aside",
            name.file_name().unwrap().to_str().unwrap()
        ));
        let mut flips = 0;
        while !stop.load(Ordering::Relaxed) {
            if std::fs::rename(&name, &aside).is_ok() {
                if std::os::unix::fs::symlink(&target, &name).is_ok() {
                    flips += 1;
                    thread::yield_now();
                    let _ = std::fs::remove_file(&name);
                }
                let _ = std::fs::rename(&aside, &name);
            }
            thread::yield_now();
        }
        flips
    })
}

#[test]
fn walk_never_takes_a_foreign_map() {
    let root = common::fresh_pin_dir("walkrace");
    std::fs::create_dir_all(root.join("victim")).unwrap();
    std::fs::create_dir_all(root.join("tenant/sub")).unwrap();
    let victim = hash_map("victim", 0xDEAD);
    victim.pin(&root.join("victim/secret")).unwrap();
    let victim_id = victim.info().unwrap().id;
    let own = hash_map("own", 1);
    own.pin(&root.join("tenant/sub/own")).unwrap();
    let own2 = hash_map("own2", 2);
    own2.pin(&root.join("tenant/pin")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // A directory flipped to the victim's directory, and a pin flipped to the victim's pin.
    let t1 = flipper(root.join("tenant/sub"), root.join("victim"), stop.clone());
    let t2 = flipper(
        root.join("tenant/pin"),
        root.join("victim/secret"),
        stop.clone(),
    );
    let mut runs = 0;
    let mut dumped = 0;
    for i in 0..400 {
        runs += 1;
        // The walk may fail or skip an entry mid-flip; it must never return the victim.
        if let Ok(found) = find_pinned(&root.join("tenant")) {
            for f in &found {
                assert_ne!(f.info.id, victim_id, "foreign map found at {:?}", f.pin_rel);
            }
            if i % 20 == 0 && !found.is_empty() {
                let info = SnapshotInfo::default();
                let opts = DumpOptions {
                    threads: 1,
                    ..DumpOptions::default()
                };
                let (snap, _) = dump(&found, Vec::new(), &info, &opts, &NoProgress).unwrap();
                let s = verify(snap.as_slice()).unwrap();
                assert!(s.maps.iter().all(|(m, _)| m.name != "victim"));
                dumped += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = t1.join().unwrap() + t2.join().unwrap();
    eprintln!("{runs} walks, {dumped} dumps, {flips} flips");
    assert!(flips > 0, "the race never ran");
    assert_eq!(value_of(&victim), 0xDEAD);
}

fn snapshot_of(map: &Map, pin: &str) -> Vec<u8> {
    let found = vec![
        mapsnap::discover::Found::from_map(map.try_clone().unwrap(), Some(pin.into())).unwrap(),
    ];
    let opts = DumpOptions {
        threads: 1,
        ..DumpOptions::default()
    };
    dump(
        &found,
        Vec::new(),
        &SnapshotInfo::default(),
        &opts,
        &NoProgress,
    )
    .unwrap()
    .0
}

#[test]
fn publish_never_renames_over_a_foreign_pin() {
    let root = common::fresh_pin_dir("pubrace");
    std::fs::create_dir_all(root.join("victim")).unwrap();
    std::fs::create_dir_all(root.join("target/sub")).unwrap();
    let victim = hash_map("victim", 0xBEEF);
    victim.pin(&root.join("victim/m")).unwrap();
    let victim_id = victim.info().unwrap().id;
    let src = hash_map("src", 7);
    let snap = snapshot_of(&src, "sub/m");
    let summary = verify(snap.as_slice()).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // target/sub becomes a link to the victim's directory, where a pin named `m` exists.
    let t = flipper(root.join("target/sub"), root.join("victim"), stop.clone());
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..300 {
        let dest = Destination::PinRoot {
            dir: root.join("target"),
            overwrite: true,
        };
        match restore(
            snap.as_slice(),
            Some(&summary),
            &dest,
            &RestoreOptions::default(),
            &NoProgress,
        ) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
        let pinned = Map::from_pin(&root.join("victim/m")).unwrap();
        assert_eq!(
            pinned.info().unwrap().id,
            victim_id,
            "the victim's pin was replaced"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let flips = t.join().unwrap();
    eprintln!("{ok} restores published, {refused} refused, {flips} flips");
    assert!(flips > 0 && ok > 0);
    // Nothing else appeared in the victim's directory, and no temporaries stayed behind.
    let names: Vec<_> = std::fs::read_dir(root.join("victim"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["m"]);
    assert_eq!(value_of(&victim), 0xBEEF);
    let left: Vec<_> = std::fs::read_dir(root.join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("mapsnap_"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let restored = Map::from_pin(&root.join("target/sub/m")).unwrap();
    assert_eq!(value_of(&restored), 7);
}

#[test]
fn local_snapshot_write_never_lands_outside() {
    let vol = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(vol.path().join("d")).unwrap();
    let victim = outside.path().join("snap");
    std::fs::write(&victim, b"host file").unwrap();
    let loc = vol.path().join("d/snap");

    let stop = Arc::new(AtomicBool::new(false));
    let t = flipper(
        vol.path().join("d"),
        outside.path().to_path_buf(),
        stop.clone(),
    );
    let (mut ok, mut refused) = (0, 0);
    for i in 0..500 {
        let st = Storage::open(
            Location::parse(loc.to_str().unwrap()).unwrap(),
            &StorageConfig::default(),
        )
        .unwrap();
        let r = (|| -> Result<(), Box<dyn std::error::Error>> {
            let mut w = st.writer(true)?;
            std::io::Write::write_all(&mut w, format!("snapshot {i}").as_bytes())?;
            w.commit()?;
            Ok(())
        })();
        match r {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
        // Reads through a flipped directory fail too, instead of reading the host file.
        if let Ok(mut r) = st.reader(None) {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut r, &mut s).unwrap();
            assert!(s.starts_with("snapshot "), "read {s:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = t.join().unwrap();
    eprintln!("{ok} writes, {refused} refused, {flips} flips");
    assert!(flips > 0 && ok > 0);
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A symlinked directory in the location is refused outright, naming the reason.
    std::os::unix::fs::symlink(outside.path(), vol.path().join("link")).unwrap();
    let st = Storage::open(
        Location::parse(vol.path().join("link/snap").to_str().unwrap()).unwrap(),
        &StorageConfig::default(),
    )
    .unwrap();
    let e = st.writer(true).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"host file");
}
