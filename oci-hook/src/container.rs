//! Finding a container from outside: from its init pid (CRIU's `CRTOOLS_INIT_PID`) through
//! the runtime's state directories, and facts about the runtime process that runs us.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{HookError, Result};
use crate::mounts::{ContainerMounts, RawMount};

/// The command line of `pid`.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// The parent pid of `pid`.
pub fn ppid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Our ancestors (parent first), with their command lines, up to 16 levels or pid 1.
pub fn ancestors() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    let mut pid = std::process::id();
    for _ in 0..16 {
        match ppid(pid) {
            Some(p) if p > 1 => {
                out.push((p, cmdline(p).unwrap_or_default()));
                pid = p;
            }
            _ => break,
        }
    }
    out
}

/// The value of a global or command flag (`--root X` or `--root=X`).
pub fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_string());
        }
    }
    None
}

/// Whether the container's process has started (exec'd its own program): runc 1.1 runs
/// poststart hooks *before* the init process execs the container's program (seen here with
/// runc 1.1.5), so the init is still the runtime's: its `comm` is `runc:[2:INIT]`, its
/// executable runc's memfd copy (`/memfd:runc_cloned...`) or the runtime's own binary.
pub fn process_started(pid: u32) -> bool {
    let exe = |p: u32| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.starts_with("runc:[") {
        return false;
    }
    let Some(init_exe) = exe(pid) else {
        // Cannot tell: assume it runs (a blocking wait is then bounded by the timeout).
        return true;
    };
    if init_exe.to_string_lossy().contains("runc_cloned") {
        return false;
    }
    let runtime = ppid(std::process::id()).and_then(exe);
    runtime.is_none_or(|r| r != init_exe)
}

/// An absolute version of `p` as the process `pid` saw it (relative to its cwd).
fn absolute_for(pid: u32, p: &str) -> Option<PathBuf> {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        return Some(path);
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    Some(cwd.join(path))
}

/// Whether an OCI runtime's arguments are a `restore` command.
fn is_restore(args: &[String]) -> bool {
    args.iter().any(|a| a == "restore")
}

/// The CRIU image directory of the `runc restore` / `crun restore` that runs this hook (runc
/// runs the prestart and createRuntime hooks itself, while CRIU restores), from its
/// `--image-path`. None outside a restore.
pub fn restoring_image_dir(ancestors: &[(u32, Vec<String>)]) -> Option<PathBuf> {
    ancestors
        .iter()
        .find(|(_, args)| is_restore(args))
        .and_then(|(pid, args)| {
            let v = flag_value(args, "--image-path").or_else(|| flag_value(args, "--image-dir"))?;
            absolute_for(*pid, &v)
        })
}

/// `--root` values of the runtimes among our ancestors (a runtime started with a non-default
/// state directory, e.g. by CRI-O or a test).
pub fn runtime_roots_of(ancestors: &[(u32, Vec<String>)]) -> Vec<PathBuf> {
    ancestors
        .iter()
        .filter_map(|(pid, args)| absolute_for(*pid, &flag_value(args, "--root")?))
        .collect()
}

/// A container found in a runtime's state directory.
#[derive(Debug, Clone)]
pub struct RuntimeContainer {
    pub id: String,
    pub bundle: Option<PathBuf>,
    pub state_file: PathBuf,
    /// Mounts from the runtime's own state (used when the bundle's config.json is gone).
    pub state_mounts: ContainerMounts,
}

/// The start time of `pid` (field 22 of /proc/PID/stat), to tell a reused pid apart.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Parses one state file (runc's `state.json` or crun's `status`) and returns the container
/// when its init pid is `pid`.
pub fn match_state(dir_name: &str, path: &Path, text: &str, pid: u32) -> Option<RuntimeContainer> {
    let v: Value = serde_json::from_str(text).ok()?;
    let init = v
        .get("init_process_pid")
        .or_else(|| v.get("pid"))
        .and_then(Value::as_u64)?;
    if init != u64::from(pid) {
        return None;
    }
    if let Some(start) = v.get("init_process_start").and_then(Value::as_u64)
        && let Some(now) = start_time(pid)
        && now != start
    {
        return None; // the pid was reused
    }
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or(dir_name)
        .to_string();
    let labels = v
        .pointer("/config/labels")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let bundle = labels
        .iter()
        .filter_map(Value::as_str)
        .find_map(|l| l.strip_prefix("bundle="))
        .or_else(|| v.get("bundle").and_then(Value::as_str))
        .map(PathBuf::from);
    let empty = Vec::new();
    let mounts = v
        .pointer("/config/mounts")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let no_options: [String; 0] = [];
    let state_mounts = ContainerMounts::from_raw(mounts.iter().filter_map(|m| {
        Some(RawMount {
            destination: m.get("destination")?.as_str()?,
            source: m.get("source")?.as_str().map(Path::new),
            typ: m.get("device").and_then(Value::as_str),
            options: &no_options,
        })
    }));
    Some(RuntimeContainer {
        id,
        bundle,
        state_file: path.to_path_buf(),
        state_mounts,
    })
}

/// Finds the container whose init process is `pid` in the runtimes' state directories.
pub fn find_by_init_pid(pid: u32, roots: &[PathBuf]) -> Result<RuntimeContainer> {
    let mut looked = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        looked.push(root.display().to_string());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for file in ["state.json", "status"] {
                let path = e.path().join(file);
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                if let Some(c) = match_state(&name, &path, &text, pid) {
                    return Ok(c);
                }
            }
        }
    }
    let (cgroup_id, _) = mapsnap::storage::container_of_pid(pid);
    Err(HookError::Container(format!(
        "no runtime state names init pid {pid}{} (looked in {}); add the runtime's state \
         directory to [hook] runtime_roots",
        cgroup_id
            .map(|id| format!(" (its cgroup says container {id})"))
            .unwrap_or_default(),
        if looked.is_empty() {
            "no existing directory".to_string()
        } else {
            looked.join(", ")
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags() {
        let a = s(&["runc", "--root", "/r", "restore", "--image-path=/img", "id"]);
        assert_eq!(flag_value(&a, "--root").as_deref(), Some("/r"));
        assert_eq!(flag_value(&a, "--image-path").as_deref(), Some("/img"));
        assert_eq!(flag_value(&a, "--bundle"), None);
        let anc = vec![(1234, a)];
        assert_eq!(restoring_image_dir(&anc), Some(PathBuf::from("/img")));
        assert_eq!(runtime_roots_of(&anc), vec![PathBuf::from("/r")]);
        let run = vec![(1, s(&["runc", "run", "--image-path", "/x"]))];
        assert_eq!(restoring_image_dir(&run), None);
    }

    #[test]
    fn runc_state() {
        let me = std::process::id();
        let text = format!(
            r#"{{"id":"ctr1","init_process_pid":{me},
                "config":{{"labels":["bundle=/b/ctr1","x=y"],
                "mounts":[{{"source":"/tmp","destination":"/data","device":"bind"}},
                          {{"source":"proc","destination":"/proc","device":"proc"}}]}}}}"#
        );
        let c = match_state("dir", Path::new("/r/ctr1/state.json"), &text, me).expect("match");
        assert_eq!(c.id, "ctr1");
        assert_eq!(c.bundle, Some(PathBuf::from("/b/ctr1")));
        assert_eq!(c.state_mounts.mounts.len(), 1);
        assert!(match_state("dir", Path::new("x"), &text, me + 1).is_none());
        // A recorded start time that is not the process's: a reused pid.
        let reused = text.replace("\"id\"", "\"init_process_start\":1,\"id\"");
        assert!(match_state("dir", Path::new("x"), &reused, me).is_none());
        let crun = format!(r#"{{"pid":{me},"bundle":"/b/c2"}}"#);
        let c = match_state("c2", Path::new("x"), &crun, me).expect("crun");
        assert_eq!(
            (c.id.as_str(), c.bundle),
            ("c2", Some(PathBuf::from("/b/c2")))
        );
    }
}
