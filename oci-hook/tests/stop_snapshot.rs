//! A Migrate that stops the source after its checkpoint, with real runc, real CRIU 4.1, a real
//! XDP program and S3 (moto on 127.0.0.1): the node agent's request names the checkpoint's
//! snapshot and a stop snapshot beside it; CRIU's post-dump saves the pins at the checkpoint
//! (`runc checkpoint --leave-running`, as the kubelet's checkpoint leaves the container
//! running), the XDP program keeps counting after it, poststop (at `runc delete`) saves the
//! pins as they are when the source stops, and the restore (`runc restore` from the
//! checkpoint's images, on a wiped node) takes the pins from the stop snapshot because the
//! restored pod's `mapsnap.io/restore-from` and the agent's restore request both name it:
//! the restored counters are the post-checkpoint ones.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use mapsnap::storage::{Location, Storage};
use mapsnap_hook::config::NodeConfig;
use mapsnap_hook::manifest::CheckpointManifest;

fn store(cfg: &NodeConfig, url: &str) -> Storage {
    Storage::open(Location::parse(url).expect("location"), &cfg.storage).expect("open")
}

/// Rewrites the bundle's annotations (CRI-O gives a restored container its new pod's).
fn set_annotations(bundle: &Path, annotations: &[(&str, &str)]) {
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("read spec")).expect("json");
    let mut ann = serde_json::Map::new();
    for (k, v) in annotations {
        ann.insert(k.to_string(), serde_json::json!(v));
    }
    spec["annotations"] = serde_json::Value::Object(ann);
    fs::write(&path, serde_json::to_string_pretty(&spec).expect("json")).expect("write");
}

#[test]
fn restore_takes_the_pins_saved_at_stop_not_at_the_checkpoint() {
    let s3 = S3::start("snap");
    let b = Bench::new("stop");
    let restores = b.dir.path().join("restores");
    fs::create_dir_all(&restores).expect("mkdir");
    b.write_config(&format!(
        "allowed_locations = [\"s3://snap/\"]\nrequire_restore_request = true\n\
         restore_request_dir = \"{}\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n\
         region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
        restores.display(),
        s3.endpoint()
    ));
    let cfg = NodeConfig::load(Some(&b.config)).expect("config");
    let prefix = "s3://snap/mapsnap/default/mig/4f1c2d";
    let snapshot = format!("{prefix}/maps.mapsnap");
    let stop = format!("{prefix}/maps-stop.mapsnap");

    let conf = criu_conf(&b);
    let conf = conf.to_str().expect("utf-8");
    let source_ann = [
        ("org.criu.config", conf),
        ("io.kubernetes.pod.namespace", "default"),
        ("io.kubernetes.pod.name", "lb-0"),
        ("io.kubernetes.container.name", "lb"),
    ];
    let bundle = b.bundle("bundle", &source_ann);
    let id = format!("{}-ctr", b.tag);
    // The source agent's request (PrepareCheckpoint of a StopAfterCheckpoint Migrate).
    fs::write(
        b.requests.join(format!("{id}.json")),
        format!(
            r#"{{"checkpoint":"default/mig","snapshot":"{snapshot}","stopSnapshot":"{stop}","created":"2020-01-01T00:00:00Z","expires":"2999-01-01T00:00:00Z"}}"#
        ),
    )
    .expect("request");

    b.start_null_stdio(&bundle, &id);
    b.ping(3);
    let at_checkpoint = b.counters();
    assert_eq!(at_checkpoint[2], 3, "{at_checkpoint:?}");

    let images = b.dir.path().join("images");
    b.criu_checkpoint(&id, &images, &["--leave-running"]);
    let manifest = CheckpointManifest::read(&images)
        .expect("manifest readable")
        .unwrap_or_else(|| panic!("no manifest in the image dir:\n{}", b.log_text()));
    assert_eq!(manifest.snapshot, snapshot);
    assert!(
        store(&cfg, &stop).head().expect("head").is_none(),
        "no stop snapshot while the source runs:\n{}",
        b.log_text()
    );

    // The source keeps serving after the checkpoint: the XDP program counts on.
    assert_eq!(b.state_of(&id).map(|s| s.0).as_deref(), Some("running"));
    b.ping(2);
    let at_stop = b.counters();
    assert_eq!(at_stop[2], 5, "{at_stop:?}");

    // The source pod is deleted: poststop writes the stop snapshot and its manifest.
    b.stop(&id);
    let stop_store = store(&cfg, &stop);
    let stop_manifest = stop_store
        .read_manifest()
        .expect("read manifest")
        .unwrap_or_else(|| panic!("no stop snapshot manifest:\n{}", b.log_text()));
    assert_eq!(stop_manifest.source.container_id.as_deref(), Some(&*id));
    let names: Vec<&str> = stop_manifest.maps.iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&"pkt_count") && names.contains(&"src_count"),
        "{names:?}"
    );
    // The checkpoint's own snapshot is untouched (the state at the checkpoint).
    let ckpt_manifest = store(&cfg, &snapshot)
        .read_manifest()
        .expect("read")
        .expect("checkpoint snapshot manifest");
    assert_eq!(ckpt_manifest.sha256, manifest.sha256);
    assert_ne!(ckpt_manifest.sha256, stop_manifest.sha256);

    // "Another node": pins and program gone. The restored pod names the stop snapshot and
    // the target agent's restore request backs it.
    b.wipe_node();
    assert!(b.pins().is_empty());
    set_annotations(
        &bundle,
        &[
            ("org.criu.config", conf),
            ("io.kubernetes.pod.namespace", "default"),
            ("io.kubernetes.pod.name", "lb-0-3fa9c"),
            ("io.kubernetes.container.name", "lb"),
            ("mapsnap.io/restore-from", &stop),
        ],
    );
    fs::write(
        restores.join("default_lb-0-3fa9c.json"),
        format!(
            r#"{{"checkpoint":"default/mig","pod":"default/lb-0-3fa9c","snapshot":"{stop}","archive":"registry.example/ckpt@sha256:{}","created":"2020-01-01T00:00:00Z","expires":"2999-01-01T00:00:00Z"}}"#,
            "0".repeat(64)
        ),
    )
    .expect("restore request");
    let (_, old_pid) = b.state_of(&id).unwrap_or_default();
    if old_pid != 0 {
        wait_pid_free(old_pid, Duration::from_secs(10));
    }
    b.criu_restore(&id, &images, &bundle);
    let lines = b.log_lines_with("restored 2 pinned maps from");
    assert_eq!(lines.len(), 1, "{}", b.log_text());
    assert!(
        lines[0].to_string().contains("maps-stop.mapsnap"),
        "{}",
        lines[0]
    );
    let restored = b.counters();
    eprintln!(
        "COUNTERS [all, ipv4, icmp-echo]: at the checkpoint {at_checkpoint:?}; at stop \
         {at_stop:?}; restored {restored:?}"
    );
    assert_eq!(
        restored, at_stop,
        "the pins hold the post-checkpoint values"
    );
    assert_eq!(b.echo_from_host(), 5);

    // A second stop (the restored container here) never replaces the stop snapshot.
    fs::write(b.state.join("attach"), "").expect("trigger");
    b.wait_file("attached.1");
    b.ping(1);
    b.stop(&id);
    let again = stop_store
        .read_manifest()
        .expect("read")
        .expect("still there");
    assert_eq!(again.sha256, stop_manifest.sha256);
    assert!(
        b.log_text().contains("exists"),
        "the refusal is logged:\n{}",
        b.log_text()
    );
    drop(s3);
}
