//! The downtime benchmark's smoke run (`bench/downtime.py --quick`, docs/PERFORMANCE.md):
//! real Podman + runc + CRIU 4.1, with mapsnap's hook and CRIU plugin installed under a
//! private root, one run on 10K-entry hash maps pinned and held by fd. It asserts that every
//! row of the table carries measured figures (CRIU's frozen time, checkpoint and restore
//! times, peak RSS), and that the restored containers ran with their pins back (the script
//! stops with an error otherwise). The figures themselves are not judged: timing belongs to
//! the benchmark, not to a test.

mod podman;

use std::path::Path;
use std::process::Command;

use podman::*;
use serde_json::Value;

fn figure(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {row:#}"))
}

#[test]
fn downtime_benchmark_smoke_run_has_real_figures() {
    require_root();
    let art = artifacts();
    let dir = tempfile::Builder::new()
        .prefix("mapsnap-downtime.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let json = dir.path().join("downtime.json");
    let md = dir.path().join("downtime.md");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/downtime.py");
    // The CLI of this build, beside the hook (the workspace's test build has every binary).
    let cli = art.hook.with_file_name("mapsnap");
    assert!(cli.exists(), "{} is not built", cli.display());
    ok(Command::new("python3")
        .arg(&script)
        .arg("--quick")
        .arg("--hook")
        .arg(&art.hook)
        .arg("--plugin")
        .arg(&art.plugin)
        .arg("--cli")
        .arg(&cli)
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md));
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("JSON");
    let find = |kind: &str, variant: &str| {
        rows.iter()
            .find(|r| r["key"][0] == kind && r["key"][1] == variant)
            .unwrap_or_else(|| panic!("no {kind}/{variant} row in {rows:#?}"))
    };
    for (kind, variant) in [
        ("pinned", "plain"),
        ("fd", "plain"),
        ("pinned", "image"),
        ("pinned", "frozen"),
        ("pinned", "after"),
        ("fd", "plugin"),
    ] {
        let r = find(kind, variant);
        for key in [
            "ck_frozen",
            "wall_ckpt",
            "wall_restore",
            "rs_runtime_restore",
        ] {
            let v = figure(r, key);
            assert!(v > 0.0 && v < 600_000.0, "{kind}/{variant} {key} = {v}");
        }
    }
    for variant in ["image", "frozen", "after"] {
        let rss = figure(find("pinned", variant), "hook_rss_mib");
        assert!(
            rss > 0.0 && rss < 64.0,
            "{variant}: hook peak RSS {rss} MiB"
        );
    }
    for variant in ["frozen", "after"] {
        let rss = figure(find("pinned", variant), "finish_rss_mib");
        assert!(
            rss > 0.0 && rss < 64.0,
            "{variant}: finisher peak RSS {rss} MiB"
        );
    }
    let plugin = find("fd", "plugin");
    assert!(figure(plugin, "plugin_ms") > 0.0, "{plugin:#}");
    assert!(figure(plugin, "plugin_rss_mib") > 0.0, "{plugin:#}");
    // The restore inside `criu restore`, from the plugin's log line, and `mapsnap restore`
    // of the snapshot files taken out of the checkpoint archive.
    assert!(figure(plugin, "plugin_restore_ms") > 0.0, "{plugin:#}");
    assert!(figure(plugin, "cli_restore_ms") > 0.0, "{plugin:#}");
    let rss = figure(plugin, "plugin_restore_rss_mib");
    assert!(rss > 0.0 && rss < 64.0, "criu restore peak RSS {rss} MiB");
    let table = std::fs::read_to_string(&md).expect("markdown");
    eprintln!("{table}");
    for variant in ["image", "frozen", "after"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| pinned | {variant} | hash | 10,000 |")))
            .unwrap_or_else(|| panic!("no {variant} row:\n{table}"));
        let frozen: f64 = row
            .split('|')
            .nth(6)
            .map_or("", str::trim)
            .parse()
            .unwrap_or(-1.0);
        assert!(frozen > 0.0, "{row}");
    }
    assert!(
        table.contains("| by fd | plugin | hash | 10,000 |"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("| hash | 10,000 |") && l.contains("<= 1.1x:")),
        "no plugin restore row:\n{table}"
    );
}
