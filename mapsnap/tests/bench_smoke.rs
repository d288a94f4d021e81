//! The benchmark command runs end to end on a small size (its full run is in
//! docs/PERFORMANCE.md; timings are never asserted here).

mod common;

use std::process::Command;

#[test]
fn bench_command_runs_on_a_small_size() {
    common::ensure_bpffs();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("python3")
        .current_dir(root)
        .args([
            "bench/bench.py",
            "--quick",
            "--mapsnap",
            env!("CARGO_BIN_EXE_mapsnap"),
        ])
        .output()
        .expect("run python3 bench/bench.py (python3 missing? run `make deps`)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in [
        "anchor lookup_batch",
        "anchor update_batch",
        "dump, 1 thread",
        "dump, parallel",
        "restore",
        "bpftool -j map dump",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.contains("| hash (") && l.contains(&format!("| {op} |")))
            .unwrap_or_else(|| panic!("no hash row for {op}:\n{stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let secs: f64 = cells[4]
            .parse()
            .unwrap_or_else(|_| panic!("seconds in {row}"));
        assert!(secs > 0.0, "{row}");
        if !op.starts_with("anchor") {
            let ratio: f64 = cells[5]
                .parse()
                .unwrap_or_else(|_| panic!("ratio in {row}"));
            assert!(ratio > 0.0, "{row}");
        }
    }
    assert!(stdout.contains("2 hash maps of 10000"), "{stdout}");
}
