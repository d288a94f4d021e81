//! End to end with real runc, real CRIU 4.1 and live XDP traffic: the container's pinned maps
//! are saved by the CRIU action script at post-dump (tasks frozen), the node is wiped (XDP
//! program detached, pins removed: "another node"), `runc restore` runs the createRuntime hook,
//! which restores the pins before the tasks resume, and the restored app re-attaches its
//! program reusing them by name: counting continues from the checkpointed values.
//!
//! runc is given CRIU through `--criu` and the CRIU config through the container's
//! `org.criu.config` annotation: `action-script` runs mapsnap-hook through a two-line wrapper
//! (as `mapsnap-hook install --config` writes it), and `libdir` holds the mapsnap CRIU plugin
//! when the workspace built it.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mapsnap_hook::manifest::{CheckpointManifest, IMAGE_SNAPSHOT};

struct Run {
    before: [u64; 3],
    restored: [u64; 3],
    after: [u64; 3],
    manifest: CheckpointManifest,
    images: PathBuf,
}

/// Start, 3 pings, checkpoint, wipe, restore, re-attach, 2 pings.
fn checkpoint_and_restore(b: &Bench, extra_annotations: &[(&str, &str)]) -> Run {
    let conf = criu_conf(b);
    // Post-dump acts only on containers that opted in (any mapsnap.io/ annotation).
    let mut ann = vec![
        ("org.criu.config", conf.to_str().expect("utf-8")),
        ("mapsnap.io/policy", "strict"),
    ];
    ann.extend_from_slice(extra_annotations);
    let bundle = b.bundle("bundle", &ann);
    let id = format!("{}-ctr", b.tag);
    b.start_null_stdio(&bundle, &id);
    let (status, pid) = b.state_of(&id).expect("state");
    assert_eq!(status, "running");
    b.ping(3);
    let before = b.counters();
    assert_eq!(before[2], 3, "{before:?}");
    assert_eq!(b.echo_from_host(), 3);

    let images = b.dir.path().join("images");
    b.criu_checkpoint(&id, &images, &[]);
    wait_pid_free(pid, Duration::from_secs(10));
    let manifest = CheckpointManifest::read(&images)
        .expect("manifest readable")
        .unwrap_or_else(|| panic!("no manifest in the image dir:\n{}", b.log_text()));
    eprintln!("manifest: {manifest:#?}");
    assert_eq!(manifest.container_id, id);
    let pins: Vec<_> = manifest
        .maps
        .iter()
        .filter_map(|m| m.pin_path.clone())
        .collect();
    assert_eq!(pins, vec!["sys/fs/bpf/pkt_count", "sys/fs/bpf/src_count"]);
    // The action ran twice (CRIU under runc): one snapshot, the second run saw the manifest.
    // Into the image it is "saved" inside the freeze; to storage it is "read" into a spool
    // inside the freeze and copied out by the finisher afterwards.
    assert_eq!(
        b.log_lines_with("saved 2 pinned maps").len()
            + b.log_lines_with("read 2 pinned maps").len(),
        1,
        "{}",
        b.log_text()
    );
    // The installed wrapper ended the second post-dump in the shell: one hook run, and the
    // marker that made it so is newer than this dump's pstree.img.
    assert_eq!(
        b.log_lines_with("criu post-dump").len(),
        1,
        "{}",
        b.log_text()
    );
    let marker = fs::metadata(images.join(mapsnap_hook::flows::POST_DUMP_MARKER))
        .expect("post-dump marker")
        .modified()
        .expect("mtime");
    let pstree = fs::metadata(images.join("pstree.img"))
        .expect("pstree.img")
        .modified()
        .expect("mtime");
    assert!(marker > pstree, "{marker:?} <= {pstree:?}");

    b.wipe_node();
    assert!(b.pins().is_empty() && !b.xdp_attached());

    b.criu_restore(&id, &images, &bundle);
    assert_eq!(b.state_of(&id).map(|s| s.0).as_deref(), Some("running"));
    // Restored by the createRuntime hook, before the tasks resumed.
    let lines = b.log_lines_with("restored 2 pinned maps");
    assert_eq!(lines.len(), 1, "{}", b.log_text());
    assert_eq!(lines[0]["span"]["stage"], "createRuntime");
    let restored = b.counters();
    assert_eq!(restored, before, "the pins hold the checkpointed counters");
    assert!(!b.xdp_attached());

    // The restored app (the same process, resumed) re-attaches, reusing the pins by name.
    fs::write(b.state.join("attach"), "").expect("trigger");
    b.wait_file("attached.1");
    assert!(b.xdp_attached());
    b.ping(2);
    let after = b.counters();
    eprintln!(
        "COUNTERS [all, ipv4, icmp-echo]: before checkpoint {before:?}; after restore \
         {restored:?}; after 2 more pings {after:?}; echo requests from {} = {}",
        b.host_ip,
        b.echo_from_host()
    );
    assert_eq!(after[2], 5, "{after:?}");
    assert_eq!(b.echo_from_host(), 5);
    assert!(after[0] >= before[0] + 2 && after[1] >= before[1] + 2);
    b.stop(&id);
    Run {
        before,
        restored,
        after,
        manifest,
        images,
    }
}

#[test]
fn checkpoint_carries_pins_in_the_image_dir() {
    let b = Bench::new("ckpt");
    let r = checkpoint_and_restore(&b, &[]);
    assert_eq!(r.manifest.snapshot, format!("image:{IMAGE_SNAPSHOT}"));
    assert!(r.images.join(IMAGE_SNAPSHOT).exists());
    assert_eq!((r.before[2], r.restored[2], r.after[2]), (3, 3, 5));
}

#[test]
fn checkpoint_carries_pins_through_s3() {
    let s3 = S3::start("snap");
    let b = Bench::new("ckpt-s3");
    b.write_config(&format!(
        // A single-tenant node (no pods): the manifest's location needs no tenant prefix.
        "storage_base = \"s3://snap/nodes\"\ntenant_prefix = \"\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n\
         region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
        s3.endpoint()
    ));
    // The node agent's request for this container's coming checkpoint (docs/API.md).
    let id = format!("{}-ctr", b.tag);
    let key = format!("nodes/{id}/pins.mapsnap");
    fs::write(
        b.requests.join(format!("{id}.json")),
        format!(
            r#"{{"checkpoint":"default/ckpt-1","snapshot":"s3://snap/{key}","created":"2020-01-01T00:00:00Z","expires":"2999-01-01T00:00:00Z"}}"#
        ),
    )
    .expect("request");
    let r = checkpoint_and_restore(&b, &[]);
    // Read inside the freeze, uploaded by the detached finisher after it.
    assert_eq!(
        b.log_lines_with("inside the freeze (").len(),
        1,
        "{}",
        b.log_text()
    );
    b.wait_log("copied the snapshot read inside the freeze to s3://");
    // The finisher removed its spool: nothing is left for the next sweep.
    let spool: Vec<_> = fs::read_dir(b.hook_state.join("spool"))
        .expect("the spool directory")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(spool.is_empty(), "spool left behind: {spool:?}");
    assert_eq!(r.manifest.snapshot, format!("s3://snap/{key}"));
    assert_eq!(r.manifest.checkpoint.as_deref(), Some("default/ckpt-1"));
    assert!(
        !r.images.join(IMAGE_SNAPSHOT).exists(),
        "the maps went to S3, not the image"
    );
    // The object and the storage layer's manifest beside it, seen with the node's settings.
    let cfg = mapsnap_hook::config::NodeConfig::load(Some(&b.config)).expect("config");
    let store = mapsnap::storage::Storage::open(
        mapsnap::storage::Location::parse(&r.manifest.snapshot).expect("location"),
        &cfg.storage,
    )
    .expect("open");
    let head = store.head().expect("head").expect("the object exists");
    assert_eq!(head.size, r.manifest.size);
    let m = store
        .read_manifest()
        .expect("manifest")
        .expect("a manifest beside it");
    assert_eq!(m.sha256, r.manifest.sha256);
    drop(s3);
    assert_eq!((r.before[2], r.restored[2], r.after[2]), (3, 3, 5));
}
