//! The container's bind mounts, and the only ways paths cross between the container's view
//! and the host: a pin path stored in a snapshot (relative to the container's root, e.g.
//! `sys/fs/bpf/app/counters`) or a container path from an annotation is mapped to the host
//! through the mount whose destination is its longest prefix. `..`, absolute pin paths, paths
//! outside every mount and symbolic links anywhere below the mount's host source are refused.
//!
//! Residual risk, documented in docs/NODE.md: the checks and the kernel's use of a path are
//! two steps, so a process that can write the mount's host directory at that very moment
//! could swap a component for a link. At createRuntime and poststop the container's own
//! processes are not running; at post-dump they are frozen.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{HookError, Result};

/// `statfs.f_type` of a bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem magic of the filesystem holding `path` (following links).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: `statfs` is plain data; the kernel fills it in; `c` is a valid C string.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(buf.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// One bind mount of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Destination inside the container, as normal components (`["sys", "fs", "bpf"]`).
    pub dest: Vec<String>,
    /// Host source, canonical.
    pub source: PathBuf,
    /// The source lies in a bpffs.
    pub bpf: bool,
}

impl Mount {
    /// Destination as an absolute container path.
    pub fn destination(&self) -> String {
        format!("/{}", self.dest.join("/"))
    }

    /// Destination relative to the container's root, as stored in snapshot pin paths.
    pub fn dest_rel(&self) -> String {
        self.dest.join("/")
    }
}

/// Splits a path into normal components; refuses `..`, empty and non-UTF-8 ones.
/// `absolute` says whether the path must start with `/` (container paths) or must not (pin
/// paths from snapshots).
pub fn components(path: &str, absolute: bool) -> std::result::Result<Vec<String>, &'static str> {
    if path.is_empty() {
        return Err("it is empty");
    }
    if path.contains('\0') {
        return Err("it contains a NUL byte");
    }
    let is_abs = path.starts_with('/');
    if absolute && !is_abs {
        return Err("it is not an absolute path");
    }
    if !absolute && is_abs {
        return Err("it is absolute");
    }
    let mut out = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => match n.to_str() {
                Some(s) => out.push(s.to_string()),
                None => return Err("it is not UTF-8"),
            },
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("it contains `..`"),
            Component::Prefix(_) => return Err("it has a prefix"),
        }
    }
    Ok(out)
}

/// A container's bind mounts (the only mounts whose host side the hook can name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerMounts {
    pub mounts: Vec<Mount>,
}

/// One mount as a runtime config describes it.
#[derive(Debug, Clone)]
pub struct RawMount<'a> {
    pub destination: &'a str,
    pub source: Option<&'a Path>,
    pub typ: Option<&'a str>,
    pub options: &'a [String],
}

impl ContainerMounts {
    /// Bind mounts from `raw` whose source exists; `bpf` is decided by the source's
    /// filesystem. Mounts with odd destinations are left out (they cannot be named).
    pub fn from_raw<'a>(raw: impl IntoIterator<Item = RawMount<'a>>) -> Self {
        let mut mounts = Vec::new();
        for m in raw {
            let bind =
                m.typ == Some("bind") || m.options.iter().any(|o| o == "bind" || o == "rbind");
            let Some(src) = m.source else { continue };
            if !bind || !src.is_absolute() {
                continue;
            }
            let Ok(dest) = components(m.destination, true) else {
                continue;
            };
            if dest.is_empty() {
                continue;
            }
            let Ok(source) = src.canonicalize() else {
                continue;
            };
            let bpf = source.is_dir() && is_bpffs(&source);
            mounts.push(Mount { dest, source, bpf });
        }
        Self { mounts }
    }

    /// From an OCI runtime spec (config.json).
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Self {
        let empty: Vec<String> = Vec::new();
        let list = spec.mounts().as_deref().unwrap_or_default();
        Self::from_raw(list.iter().map(|m| RawMount {
            destination: m.destination().to_str().unwrap_or(""),
            source: m.source().as_deref(),
            typ: m.typ().as_deref(),
            options: m.options().as_deref().unwrap_or(&empty),
        }))
    }

    pub fn bpf(&self) -> impl Iterator<Item = &Mount> {
        self.mounts.iter().filter(|m| m.bpf)
    }

    /// Container destinations of the bpffs mounts, for messages.
    pub fn bpf_destinations(&self) -> String {
        let v: Vec<String> = self.bpf().map(|m| m.destination()).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    /// The mount whose destination is the longest prefix of `comps`, and the rest.
    fn longest<'a, 'b>(&'a self, comps: &'b [String]) -> Option<(&'a Mount, &'b [String])> {
        self.mounts
            .iter()
            .filter(|m| comps.len() >= m.dest.len() && comps[..m.dest.len()] == m.dest[..])
            .max_by_key(|m| m.dest.len())
            .map(|m| (m, &comps[m.dest.len()..]))
    }

    /// Host path of a snapshot pin path (`sys/fs/bpf/app/counters`), which must fall in a
    /// bpffs mount of this container.
    pub fn pin_to_host(&self, pin: &str) -> Result<PathBuf> {
        let refuse = |reason: String| HookError::refused(format!("pin path {pin:?}"), reason);
        let comps = components(pin, false).map_err(|r| refuse(r.into()))?;
        let (m, rest) = self.longest(&comps).ok_or_else(|| {
            refuse(format!(
                "/{} is outside the container's bpffs mounts ({})",
                comps.join("/"),
                self.bpf_destinations()
            ))
        })?;
        if !m.bpf {
            return Err(refuse(format!(
                "it falls in the container's mount {} which is not a bpffs",
                m.destination()
            )));
        }
        if rest.is_empty() {
            return Err(refuse(format!(
                "it names the mount point {} itself",
                m.destination()
            )));
        }
        check_beneath(&m.source, rest, true).map_err(refuse)
    }

    /// Host path of a file named by an absolute container path (a snapshot location in an
    /// annotation), which must fall in a bind mount that is not a bpffs.
    pub fn file_to_host(&self, path: &str) -> Result<PathBuf> {
        let refuse =
            |reason: String| HookError::refused(format!("container path {path:?}"), reason);
        let comps = components(path, true).map_err(|r| refuse(r.into()))?;
        let (m, rest) = self.longest(&comps).ok_or_else(|| {
            refuse(
                "it is outside the container's bind mounts (only files in a volume the \
                 container mounts can be named)"
                    .into(),
            )
        })?;
        if m.bpf {
            return Err(refuse(format!(
                "it falls in the bpffs mount {}, which cannot hold files",
                m.destination()
            )));
        }
        if rest.is_empty() {
            return Err(refuse(format!(
                "it names the mount point {} itself",
                m.destination()
            )));
        }
        check_beneath(&m.source, rest, false).map_err(refuse)
    }

    /// Checks that an absolute container directory (a `maps` pattern's literal part) lies in,
    /// or contains, a bpffs mount.
    pub fn check_filter_dir(&self, pattern: &str, literal: &str) -> Result<()> {
        let refuse =
            |reason: String| HookError::refused(format!("maps pattern {pattern:?}"), reason);
        let comps = components(literal, true).map_err(|r| refuse(r.into()))?;
        let inside = self.longest(&comps).is_some_and(|(m, _)| m.bpf);
        let contains = self
            .bpf()
            .any(|m| m.dest.len() > comps.len() && m.dest[..comps.len()] == comps[..]);
        if inside || contains {
            Ok(())
        } else {
            Err(refuse(format!(
                "{literal} is outside the container's bpffs mounts ({}): only maps pinned \
                 there are ever taken",
                self.bpf_destinations()
            )))
        }
    }

    /// Creates the directories a pin path needs below its mount (bpffs allows mkdir), after
    /// [`Self::pin_to_host`] accepted it.
    pub fn make_parent_dirs(&self, host: &Path) -> Result<()> {
        let Some(parent) = host.parent() else {
            return Ok(());
        };
        let Some(m) = self.bpf().find(|m| parent.starts_with(&m.source)) else {
            return Err(HookError::refused(
                format!("{}", host.display()),
                "it is not below a bpffs mount source",
            ));
        };
        let mut cur = m.source.clone();
        for c in parent
            .strip_prefix(&m.source)
            .unwrap_or(Path::new(""))
            .components()
        {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => {
                    return Err(HookError::refused(
                        cur.display().to_string(),
                        "it exists and is not a directory",
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&cur)
                        .map_err(|e| HookError::io(format!("creating {}", cur.display()), e))?;
                }
                Err(e) => return Err(HookError::io(format!("checking {}", cur.display()), e)),
            }
        }
        Ok(())
    }
}

/// Joins `rest` under `source`, refusing symbolic links and non-directories on the way and a
/// link or directory at the end. With `bpf`, the deepest existing directory must be in a
/// bpffs (no other filesystem mounted over part of the tree).
fn check_beneath(
    source: &Path,
    rest: &[String],
    bpf: bool,
) -> std::result::Result<PathBuf, String> {
    match std::fs::symlink_metadata(source) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "the mount source {} is not a directory",
                source.display()
            ));
        }
        Err(e) => return Err(format!("the mount source {}: {e}", source.display())),
    }
    let mut cur = source.to_path_buf();
    let mut deepest_dir = source.to_path_buf();
    let mut missing = false;
    for (i, c) in rest.iter().enumerate() {
        cur.push(c);
        if missing {
            continue;
        }
        let last = i + 1 == rest.len();
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link (links are never followed out of a mount)",
                    cur.display()
                ));
            }
            Ok(md) if !last && !md.is_dir() => {
                return Err(format!("{} is not a directory", cur.display()));
            }
            Ok(md) if last && md.is_dir() => {
                return Err(format!("{} is a directory", cur.display()));
            }
            Ok(_) => {
                if !last {
                    deepest_dir = cur.clone();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing = true,
            Err(e) => return Err(format!("{}: {e}", cur.display())),
        }
    }
    if bpf && !is_bpffs(&deepest_dir) {
        return Err(format!("{} is not in a bpffs", deepest_dir.display()));
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(dir: &Path) -> ContainerMounts {
        // Without a bpffs at hand, mark the first mount as one by hand.
        let opts = vec!["rbind".to_string()];
        let a = dir.join("bpf");
        let b = dir.join("data");
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        let mut m = ContainerMounts::from_raw([
            RawMount {
                destination: "/sys/fs/bpf",
                source: Some(&a),
                typ: Some("bind"),
                options: &opts,
            },
            RawMount {
                destination: "/data",
                source: Some(&b),
                typ: None,
                options: &opts,
            },
            RawMount {
                destination: "/proc",
                source: Some(Path::new("proc")),
                typ: Some("proc"),
                options: &[],
            },
        ]);
        assert_eq!(m.mounts.len(), 2);
        m.mounts[0].bpf = true;
        m
    }

    #[test]
    fn component_rules() {
        assert_eq!(
            components("/a/./b/", true),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(components("a/b", false), Ok(vec!["a".into(), "b".into()]));
        assert!(components("a/../b", false).is_err());
        assert!(components("/a", false).is_err());
        assert!(components("a", true).is_err());
        assert!(components("", false).is_err());
    }

    #[test]
    fn files_map_through_bind_mounts_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let m = mounts(t.path());
        let data = t.path().join("data").canonicalize().expect("canon");
        assert_eq!(
            m.file_to_host("/data/snap/x.mapsnap").expect("inside"),
            data.join("snap/x.mapsnap")
        );
        for bad in [
            "/etc/passwd",
            "/data/../etc/passwd",
            "/data",
            "relative",
            "/sys/fs/bpf/x",
        ] {
            let e = m.file_to_host(bad).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        std::os::unix::fs::symlink("/etc", data.join("link")).expect("symlink");
        let e = m.file_to_host("/data/link/passwd").expect_err("link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::os::unix::fs::symlink("/etc/passwd", data.join("file-link")).expect("symlink");
        let e = m.file_to_host("/data/file-link").expect_err("link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn pins_map_through_bpf_mounts_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let m = mounts(t.path());
        for bad in [
            "../../etc/x",
            "/sys/fs/bpf/x",
            "sys/fs/bpf/../../../etc/x",
            "etc/x",
            "data/x",
            "sys/fs/bpf",
            "",
        ] {
            let e = m.pin_to_host(bad).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        // Not a real bpffs here: the mount is refused by the filesystem check.
        let e = m.pin_to_host("sys/fs/bpf/counters").expect_err("tmpfs");
        assert!(e.to_string().contains("not in a bpffs"), "{e}");
    }

    #[test]
    fn filter_dirs() {
        let t = tempfile::tempdir().expect("tempdir");
        let m = mounts(t.path());
        assert!(m.check_filter_dir("/sys/fs/bpf/*", "/sys/fs/bpf").is_ok());
        assert!(m.check_filter_dir("/sys/**", "/sys").is_ok());
        assert!(m.check_filter_dir("/etc/*", "/etc").is_err());
        assert!(m.check_filter_dir("/data/*", "/data").is_err());
    }
}
