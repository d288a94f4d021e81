//! Finishing a checkpoint's snapshot after CRIU released the tasks (docs/ARCHITECTURE.md,
//! "Checkpoint freeze").
//!
//! Post-dump runs while the container is frozen, so it does only what must happen there and
//! hands the rest to a detached `mapsnap-hook criu-finish` process: copying the snapshot read
//! inside the freeze (the spool) to its destination, or, in the `after` mode, reading the maps
//! themselves through the fds post-dump opened. That process writes the storage manifest
//! beside the snapshot last; a restore waits for it ([`wait_finished`]) and takes the
//! snapshot only when its digest matches and its source names the checkpoint's nonce.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use mapsnap::anchor::{Anchor, RelPath};
use mapsnap::discover::Found;
use mapsnap::storage::{Location, MANIFEST_SUFFIX, Manifest, Storage, StorageConfig};
use mapsnap::sys::Map;
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::error::{HookError, Result};
use crate::location::{self, Resolved};
use crate::manifest::{FinishedLater, nonce_marker};
use crate::snapshot::{self, WriteMode};

/// The hidden subcommand the detached finisher runs as (its job comes on stdin).
pub const FINISH_SUBCOMMAND: &str = "criu-finish";

/// The largest job read from stdin.
const MAX_JOB: u64 = 1 << 20;

/// What the detached process finishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishJob {
    pub container_id: String,
    /// The destination as the node agent's request or the annotation named it (checked by
    /// post-dump; resolved again with [`location::from_request`]).
    pub dest: String,
    /// `frozen`: the snapshot file written inside the freeze, to copy to `dest`.
    #[serde(default)]
    pub spool: Option<SpoolFile>,
    /// `after`: the maps to read, as fds this process inherited.
    #[serde(default)]
    pub maps: Vec<JobMap>,
    /// The snapshot's INFO source (with the nonce).
    pub source: String,
    /// The criu process that ran post-dump: work starts once it is gone, so the finisher
    /// never competes with CRIU for the CPUs while the tasks are still frozen.
    #[serde(default)]
    pub wait_pid: Option<u32>,
}

/// The criu process running this action script: the parent, or the parent of the shell
/// that runs the wrapper script.
pub fn criu_pid() -> Option<u32> {
    let mut pid = std::os::unix::process::parent_id();
    for _ in 0..3 {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() == "criu" {
            return Some(pid);
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the last ')' of `pid (comm) state ppid ...`.
        pid = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
    }
    None
}

/// Waits (at most 30 s) until `pid` has exited.
fn wait_gone(pid: u32) {
    let until = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The spool handed over by fd: the finisher inherits the open, locked file, so a spool
/// stays locked exactly as long as a process that will copy it lives ([`sweep_spool`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolFile {
    pub fd: RawFd,
    /// Its name in the spool directory, removed once the copy is done.
    pub name: String,
}

/// One map handed over by fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMap {
    pub fd: RawFd,
    /// Kernel map id post-dump saw behind `fd` (checked again).
    pub id: u32,
    pub pin: Option<String>,
}

/// Where post-dump spools a snapshot read inside the freeze: a directory of the node's state
/// directory only root reads.
pub fn spool_dir(cfg: &NodeConfig) -> Result<Anchor> {
    let dir = cfg.hook.state_dir.join("spool");
    std::fs::create_dir_all(&dir).map_err(|e| HookError::io("creating the spool directory", e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(Anchor::open_trusted(&dir, "the spool directory")?)
}

/// The spool file's name for a checkpoint nonce (bpffs rules do not apply: a plain file).
pub fn spool_name(nonce: &str) -> String {
    format!("checkpoint-{nonce}.mapsnap")
}

/// A spool file no process has locked for this long has no finisher left.
pub const SPOOL_ORPHAN_AGE: Duration = Duration::from_secs(10 * 60);

/// Opens the spool just written and locks it for the finisher that will inherit the fd.
pub fn lock_spool(dir: &Anchor, name: &str) -> Result<std::fs::File> {
    let rel = RelPath::parse(name).map_err(|e| HookError::Other(e.to_string()))?;
    let file = dir.open_file(&rel, u64::MAX)?;
    file.try_lock()
        .map_err(|e| HookError::Other(format!("locking the spool {name}: {e}")))?;
    Ok(file)
}

/// Removes the spools of finishers that died (killed, or the node restarted): files older
/// than `min_age` that no process holds locked. A live finisher holds its spool's lock
/// through the fd it inherited, and a spool being written is younger than `min_age`.
/// Returns the names removed.
pub fn sweep_spool(dir: &Anchor, min_age: Duration) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for e in dir.entries()? {
        if e.kind != mapsnap::anchor::EntryKind::File {
            continue;
        }
        let Ok(rel) = RelPath::parse(&e.name) else {
            continue;
        };
        let Ok(file) = dir.open_file(&rel, u64::MAX) else {
            continue;
        };
        let age = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < min_age) || file.try_lock().is_err() {
            continue;
        }
        if dir.unlink(&e.name)? {
            removed.push(e.name);
        }
    }
    Ok(removed)
}

/// Starts `mapsnap-hook criu-finish` detached from CRIU (own session, no stdio: CRIU waits
/// for the action script only), with `keep` inherited (map fds of the `after` mode) and the
/// job on its stdin. Returns its pid.
pub fn spawn(job: &FinishJob, keep: &[RawFd], config: Option<&Path>) -> Result<u32> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()
        .map_err(|e| HookError::io("finding this binary for the finisher", e))?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg(FINISH_SUBCOMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let keep = keep.to_vec();
    // SAFETY: setsid and fcntl are async-signal-safe; the closure allocates nothing (the
    // vector was built before fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| HookError::io("starting the snapshot finisher", e))?;
    let text = serde_json::to_vec(job)
        .map_err(|e| HookError::Other(format!("encoding the finisher's job: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&text)
            .map_err(|e| HookError::io("handing the job to the snapshot finisher", e))?;
    }
    Ok(child.id())
}

/// Reads the job from stdin (bounded).
pub fn read_job(r: impl std::io::Read) -> Result<FinishJob> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    r.take(MAX_JOB + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| HookError::io("reading the finisher's job", e))?;
    if bytes.len() as u64 > MAX_JOB {
        return Err(HookError::Other("the finisher's job is too large".into()));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| HookError::Other(format!("the finisher's job is not valid: {e}")))
}

/// Does the job: copies the spool, or reads the inherited maps, to the destination.
pub fn run(job: &FinishJob, cfg: &NodeConfig) -> Result<String> {
    crate::manifest::check_id(&job.container_id)?;
    if let Some(pid) = job.wait_pid {
        wait_gone(pid);
    }
    let dest = location::from_request(&job.dest, &cfg.hook, true)?;
    if let Some(spool) = &job.spool {
        if spool.fd < 3 {
            return Err(HookError::Other(format!(
                "spool fd {} is not a file",
                spool.fd
            )));
        }
        // SAFETY: post-dump opened and locked this fd and cleared its close-on-exec flag for
        // this process only; nothing else here owns it.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(spool.fd) });
        let trust = crate::seal::NodeTrust::load(&cfg.hook.trust)?;
        let r = snapshot::copy_snapshot(file, &dest, true, &job.container_id, &cfg.storage, &trust);
        // The spool is only ever read once: a failed copy is not retried from it.
        // With it goes the storage manifest written beside it.
        if RelPath::parse(&spool.name).is_ok_and(|r| r.components().len() == 1)
            && let Ok(d) = spool_dir(cfg)
        {
            let _ = d.unlink(&spool.name);
            let _ = d.unlink(&format!("{}{MANIFEST_SUFFIX}", spool.name));
        }
        let w = r?;
        return Ok(format!(
            "copied the snapshot read inside the freeze to {} ({} bytes, sha256 {})",
            w.location, w.size, w.sha256
        ));
    }
    let mut maps = Vec::new();
    for m in &job.maps {
        if m.fd < 3 {
            return Err(HookError::Other(format!("map fd {} is not a map", m.fd)));
        }
        // SAFETY: post-dump opened this fd and cleared its close-on-exec flag for this
        // process only; nothing else here owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(m.fd) };
        let map = Map::from_fd(fd).map_err(mapsnap::Error::from)?;
        let f = Found::from_map(map, m.pin.clone()).map_err(mapsnap::Error::from)?;
        if f.info.id != m.id {
            return Err(HookError::Other(format!(
                "fd {} holds map {}, not map {}",
                m.fd, f.info.id, m.id
            )));
        }
        maps.push(f);
    }
    let mode = WriteMode {
        threads: cfg.hook.checkpoint_readers,
        sync: true,
    };
    let w = snapshot::write_snapshot(
        &maps,
        &dest,
        true,
        &job.source,
        &job.container_id,
        &cfg.storage,
        mode,
        &*crate::seal::NodeTrust::load(&cfg.hook.trust)?,
    )?;
    Ok(format!(
        "read {} pinned maps after the freeze into {} ({} bytes, sha256 {})",
        maps.len(),
        w.location,
        w.size,
        w.sha256
    ))
}

/// The storage manifest beside `res`, None while there is none.
fn storage_manifest(res: &Resolved, storage: &StorageConfig) -> Result<Option<Manifest>> {
    match res {
        Resolved::Remote(u) => Ok(Storage::open(Location::parse(u)?, storage)?.read_manifest()?),
        Resolved::File { dir, rel, .. } => {
            let name = format!("{rel}{MANIFEST_SUFFIX}");
            let mrel = RelPath::parse(&name).map_err(|e| HookError::Other(e.to_string()))?;
            match dir.read_file(&mrel, crate::manifest::MAX_MANIFEST_SIZE) {
                Ok(b) => Manifest::from_json(&b)
                    .map(Some)
                    .map_err(|e| HookError::Other(format!("{name}: {e}"))),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Waits (until `deadline`) for the snapshot a detached process finishes: its storage
/// manifest must name `later`'s nonce and, when the checkpoint manifest recorded them
/// (`frozen`), the same digest and size. Returns the SHA-256 and size to check the snapshot
/// against while it is read.
pub fn wait_finished(
    res: &Resolved,
    later: &FinishedLater,
    recorded: Option<([u8; 32], u64)>,
    storage: &StorageConfig,
    deadline: Instant,
) -> Result<([u8; 32], u64)> {
    let marker = nonce_marker(&later.nonce);
    let mut last = "its storage manifest is not there yet".to_string();
    loop {
        match storage_manifest(res, storage) {
            Ok(Some(m)) if m.source.selection.contains(&marker) => {
                let sha = crate::manifest::sha256_of_hex(&m.sha256).ok_or_else(|| {
                    HookError::refused(
                        format!("snapshot {res}"),
                        "its storage manifest has no valid sha256",
                    )
                })?;
                if let Some(r) = recorded
                    && r != (sha, m.size)
                {
                    return Err(HookError::refused(
                        format!("snapshot {res}"),
                        "its storage manifest and the checkpoint's disagree on its digest",
                    ));
                }
                return Ok((sha, m.size));
            }
            Ok(Some(_)) => last = "its storage manifest belongs to another checkpoint".into(),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(HookError::Other(format!(
                "the snapshot {res} of this checkpoint was not finished in time ({last}); it is \
                 written after the checkpoint by a detached process of the source node"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mapsnap::storage::{ManifestSource, StorageConfig};

    use super::*;

    fn storage_manifest_text(sha: &str, size: u64, selection: &str) -> String {
        let m = Manifest {
            manifest_version: 1,
            format_version: 1,
            snapshot: "/base/x.mapsnap".into(),
            sha256: sha.into(),
            size,
            created: "2026-01-01T00:00:00Z".into(),
            created_unix: 0,
            tool: "test".into(),
            source: ManifestSource {
                selection: selection.into(),
                ..ManifestSource::default()
            },
            maps: Vec::new(),
            skipped: Vec::new(),
        };
        String::from_utf8(m.to_json()).expect("utf-8")
    }

    fn later(nonce: &str) -> FinishedLater {
        FinishedLater {
            read: "frozen".into(),
            nonce: nonce.into(),
        }
    }

    #[test]
    fn a_restore_takes_only_the_finished_snapshot_of_its_own_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let res = Resolved::File {
            dir: Arc::new(Anchor::open_trusted(dir.path(), "test").expect("anchor")),
            rel: RelPath::parse("x.mapsnap").expect("rel"),
            shown: "/base/x.mapsnap".into(),
        };
        let st = StorageConfig::default();
        let soon = || Instant::now() + Duration::from_millis(300);
        let sha = "ab".repeat(32);
        let sha_bytes = [0xab; 32];
        // Not finished yet: no storage manifest.
        let e = wait_finished(&res, &later("n1"), None, &st, soon()).expect_err("missing");
        assert!(e.to_string().contains("not finished in time"), "{e}");
        // Another checkpoint's snapshot at the same place.
        let mpath = dir.path().join("x.mapsnap.manifest.json");
        std::fs::write(&mpath, storage_manifest_text(&sha, 10, "checkpoint n0")).expect("w");
        let e = wait_finished(&res, &later("n1"), None, &st, soon()).expect_err("other");
        assert!(e.to_string().contains("another checkpoint"), "{e}");
        // Finished, this checkpoint's: its digest and size.
        let sel = format!("container:c (checkpoint post-dump; {})", nonce_marker("n1"));
        std::fs::write(&mpath, storage_manifest_text(&sha, 10, &sel)).expect("w");
        let got = wait_finished(&res, &later("n1"), None, &st, soon()).expect("finished");
        assert_eq!(got, (sha_bytes, 10));
        // The digest recorded inside the freeze must agree.
        assert_eq!(
            wait_finished(&res, &later("n1"), Some((sha_bytes, 10)), &st, soon()).expect("same"),
            (sha_bytes, 10)
        );
        let e = wait_finished(&res, &later("n1"), Some(([0xcd; 32], 10)), &st, soon())
            .expect_err("differs");
        assert!(e.to_string().contains("disagree"), "{e}");
        // It appears while the restore waits.
        std::fs::remove_file(&mpath).expect("rm");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(250));
            std::fs::write(&mpath, storage_manifest_text(&sha, 10, &sel)).expect("w");
        });
        let got = wait_finished(
            &res,
            &later("n1"),
            None,
            &st,
            Instant::now() + Duration::from_secs(5),
        )
        .expect("finished while waiting");
        assert_eq!(got, (sha_bytes, 10));
        writer.join().expect("writer");
    }

    #[test]
    fn jobs_round_trip_and_oversized_ones_are_refused() {
        let job = FinishJob {
            container_id: "c1".into(),
            dest: "s3://b/k.mapsnap".into(),
            spool: None,
            maps: vec![JobMap {
                fd: 5,
                id: 42,
                pin: Some("sys/fs/bpf/m".into()),
            }],
            source: "container:c1".into(),
            wait_pid: Some(7),
        };
        let text = serde_json::to_vec(&job).expect("json");
        assert_eq!(read_job(&text[..]).expect("parses"), job);
        let big = vec![b' '; (MAX_JOB + 2) as usize];
        assert!(read_job(&big[..]).is_err());
        assert!(read_job(&b"{}"[..]).is_err());
    }

    #[test]
    fn the_sweep_removes_only_old_spools_no_finisher_holds() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = Anchor::open_trusted(tmp.path(), "spool").expect("anchor");
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        for name in ["orphan", "held", "young"] {
            std::fs::write(tmp.path().join(name), name).expect("write");
        }
        for name in ["orphan", "held"] {
            let f = std::fs::File::options()
                .write(true)
                .open(tmp.path().join(name))
                .expect("open");
            f.set_modified(old).expect("set mtime");
        }
        std::fs::create_dir(tmp.path().join("a-dir")).expect("mkdir");
        // A live finisher: the lock taken here, held through another open file.
        let held = lock_spool(&dir, "held").expect("lock");
        assert!(lock_spool(&dir, "held").is_err(), "the lock is exclusive");

        let gone = sweep_spool(&dir, SPOOL_ORPHAN_AGE).expect("sweep");
        assert_eq!(gone, vec!["orphan".to_string()]);
        let left: Vec<String> = dir
            .entries()
            .expect("ls")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(left, ["a-dir", "held", "young"]);

        // The finisher died: its lock went with it, and the next sweep takes the spool.
        drop(held);
        let gone = sweep_spool(&dir, SPOOL_ORPHAN_AGE).expect("sweep");
        assert_eq!(gone, vec!["held".to_string()]);
        assert_eq!(
            std::fs::read(tmp.path().join("young")).expect("young"),
            b"young",
            "a spool being written is never taken"
        );
    }
}
