//! mapsnap-hook writes a container's maps to `gs://` and `az://` at stop and restores them
//! from there at the next start, against real protocol servers (fake-gcs-server and Azurite
//! on loopback ports; scripts/install-gcs.sh and scripts/install-azurite.sh install them).

mod common;
#[path = "../../mapsnap/tests/storage_common/emulators.rs"]
mod emulators;

use common::attack::*;
use emulators::{Emu, Emulator};
use mapsnap::sys::Map;

/// Stop with `snapshot-to` a bucket URL, then a new start with `restore-from` the same URL:
/// the object holds the map, and the restored map has every value it had.
fn round_trip(kind: Emu) {
    let emu = Emulator::start(kind);
    let scheme = emu.scheme();
    let w = World::new(&format!("{scheme}-trip"));
    w.write_config(&format!(
        "allowed_locations = [\"{scheme}://snap/tenant-a/\"]\n{}",
        emu.toml()
    ));
    let pod = [
        ("io.kubernetes.pod.namespace", "a"),
        ("io.kubernetes.pod.name", "a-0"),
    ];
    let url = format!("{scheme}://snap/tenant-a/a/mine.mapsnap");
    let values = [11, 22, 33, 44];
    array("amap", values).pin(&w.bpf.join("amap")).expect("pin");
    let before = contents(&Map::from_pin(&w.bpf.join("amap")).expect("pin"));

    let out = w.hook(
        "poststop",
        &w.bundle(
            "stop",
            &[
                pod[0],
                pod[1],
                ("mapsnap.io/snapshot-on-stop", "true"),
                ("mapsnap.io/snapshot-to", &url),
            ],
        ),
        "stop",
        None,
    );
    assert!(did(&out), "{}", stderr(&out));

    // The object and its manifest are in the bucket, read back through the same settings.
    let cfg = mapsnap_hook::config::NodeConfig::load(Some(&w.config)).expect("config");
    let st = mapsnap::storage::Storage::open(
        mapsnap::storage::Location::parse(&url).expect("url"),
        &cfg.storage,
    )
    .expect("open");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut st.reader(None).expect("reader"), &mut bytes).expect("read");
    assert_eq!(names_in(&bytes), vec!["amap"]);
    let manifest = st.read_manifest().expect("manifest").expect("a manifest");
    assert_eq!(manifest.size, bytes.len() as u64);
    assert_eq!(manifest.maps[0].name, "amap");

    // A new start: the pin is gone (a new node), the hook restores it from the bucket.
    std::fs::remove_file(w.bpf.join("amap")).expect("unpin");
    let out = w.hook(
        "createRuntime",
        &w.bundle(
            "start",
            &[pod[0], pod[1], ("mapsnap.io/restore-from", &url)],
        ),
        "start",
        None,
    );
    assert!(did(&out), "{}", stderr(&out));
    let restored = Map::from_pin(&w.bpf.join("amap")).expect("restored pin");
    assert_eq!(contents(&restored), before, "{scheme}: values differ");
}

#[test]
fn hook_round_trip_through_gcs() {
    round_trip(Emu::FakeGcs);
}

#[test]
fn hook_round_trip_through_azure() {
    round_trip(Emu::Azurite);
}
