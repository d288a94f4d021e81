//! The binary's command line without containers: exit statuses and messages for broken
//! input, CRIU actions other than post-dump, install/uninstall through the binary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const HOOK: &str = env!("CARGO_BIN_EXE_mapsnap-hook");

fn hook(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[hook]\nlog_file = \"{}\"\n",
            dir.path().join("log").display()
        ),
    )
    .expect("config");
    let mut cmd = Command::new(HOOK);
    cmd.env_remove("CRTOOLS_SCRIPT_ACTION")
        .env("MAPSNAP_HOOK_CONFIG", &cfg)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    child.wait_with_output().expect("wait")
}

#[test]
fn bad_state_fails_a_start_but_never_a_stop() {
    let out = hook(&["oci", "createRuntime"], b"not json", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mapsnap-hook: createRuntime: the container state"),
        "{err}"
    );
    let out = hook(&["oci", "poststop"], b"not json", &[]);
    assert_eq!(out.status.code(), Some(0));
    // A bundle without config.json: the start fails with the path in the message.
    let state = br#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"/nonexistent-bundle"}"#;
    let out = hook(&["oci", "createRuntime"], state, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-bundle/config.json"));
    // A status oci-spec does not know is fine (the failure is about the bundle, not the state).
    let paused = br#"{"id":"c1","status":"paused","bundle":"/nonexistent-bundle"}"#;
    let out = hook(&["oci", "poststop"], paused, &[]);
    assert_eq!(out.status.code(), Some(0));
    let out = hook(&["oci", "prestop"], b"{}", &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown stage is a usage error"
    );
}

#[test]
fn criu_actions_other_than_post_dump_return_at_once() {
    for action in [
        "pre-dump",
        "network-lock",
        "pre-restore",
        "post-restore",
        "post-resume",
    ] {
        // As CRIU runs it: no arguments, the action in the environment.
        let out = hook(&[], b"", &[("CRTOOLS_SCRIPT_ACTION", action)]);
        assert_eq!(out.status.code(), Some(0), "{action}");
        assert!(
            out.stderr.is_empty(),
            "{action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // post-dump for a pid no runtime knows: whether that container opted in cannot be told,
    // so its checkpoint is not failed (the line on stderr says why nothing was saved).
    let out = hook(
        &["criu"],
        b"",
        &[
            ("CRTOOLS_SCRIPT_ACTION", "post-dump"),
            ("CRTOOLS_INIT_PID", "999999999"),
            ("CRTOOLS_IMAGE_DIR", "/tmp"),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no runtime state names init pid"),
        "{stderr}"
    );
    assert!(stderr.contains("(ignored)"), "{stderr}");
}

#[test]
fn install_and_uninstall_through_the_binary() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path().to_str().expect("utf-8");
    let args = [
        "install",
        "--runtime",
        "containerd",
        "--root",
        r,
        "--hook-path",
        "/usr/local/bin/mapsnap-hook",
        "--criu-libdir",
        "/usr/lib/mapsnap/criu",
    ];
    let out = hook(&args, b"", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("hook-injector"), "containerd notes: {said}");
    let hooks = root.path().join("usr/share/containers/oci/hooks.d");
    for stage in ["createruntime", "poststart", "poststop"] {
        assert!(hooks.join(format!("mapsnap-hook-{stage}.json")).exists());
    }
    let conf = std::fs::read_to_string(root.path().join("etc/criu/runc.conf")).expect("conf");
    assert!(conf.contains("action-script /usr/local/bin/mapsnap-hook"));
    let again = hook(&args, b"", &[]);
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("wrote"),
        "idempotent"
    );
    let mut un = args.to_vec();
    un.push("--uninstall");
    let out = hook(&un, b"", &[]);
    assert!(out.status.success());
    assert!(!root.path().join("etc/criu/runc.conf").exists());
    assert_eq!(std::fs::read_dir(&hooks).expect("dir").count(), 0);
}
