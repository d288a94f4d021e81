//! The container's bind mounts, and the only ways paths cross between the container's view
//! and the host: a pin path stored in a snapshot (relative to the container's root, e.g.
//! `sys/fs/bpf/app/counters`) or a container path from an annotation is mapped to a
//! directory fd plus a checked relative path, through the mount whose destination is its
//! longest prefix.
//!
//! Each mount's host source (named by the runtime's config, trusted) is opened once, as an
//! [`Anchor`]; everything below it is resolved by the kernel beneath that fd without following
//! any link and without crossing into another mount, at the moment of use. A container (or a
//! sibling sharing the volume) that swaps a directory for a link to a host directory makes
//! the operation fail instead of redirecting it. No host path is ever built from container
//! input, and messages name container paths only.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use mapsnap::anchor::{Anchor, RelPath};

use crate::error::{HookError, Result};

/// One bind mount of the container.
#[derive(Debug, Clone)]
pub struct Mount {
    /// Destination inside the container, as normal components (`["sys", "fs", "bpf"]`).
    pub dest: Vec<String>,
    /// Host source as the runtime's config names it (for logs on the node only).
    pub source: PathBuf,
    /// The source lies in a bpffs.
    pub bpf: bool,
    /// The source directory, opened once.
    pub anchor: Arc<Anchor>,
}

impl PartialEq for Mount {
    fn eq(&self, other: &Self) -> bool {
        self.dest == other.dest && self.source == other.source && self.bpf == other.bpf
    }
}

impl Eq for Mount {}

impl Mount {
    /// Destination as an absolute container path.
    pub fn destination(&self) -> String {
        format!("/{}", self.dest.join("/"))
    }

    /// Destination relative to the container's root, as stored in snapshot pin paths.
    pub fn dest_rel(&self) -> String {
        self.dest.join("/")
    }

    /// The container path of `rel` below this mount.
    pub fn container_path(&self, rel: &RelPath) -> String {
        if rel.is_root() {
            self.destination()
        } else {
            format!("{}/{rel}", self.destination())
        }
    }
}

/// A file or pin below a mount: the mount's directory fd and the checked path below it.
#[derive(Debug, Clone)]
pub struct Target {
    pub mount: Mount,
    pub rel: RelPath,
}

impl Target {
    /// The path inside the container (for messages).
    pub fn container_path(&self) -> String {
        self.mount.container_path(&self.rel)
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
    if path.len() > mapsnap::anchor::MAX_PATH_LEN {
        return Err("it is longer than 4096 bytes");
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
    if out.len() > mapsnap::anchor::MAX_DEPTH {
        return Err("it is nested more than 32 levels deep");
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

/// The most bind mounts of one container the hook opens.
pub const MAX_MOUNTS: usize = 256;

impl ContainerMounts {
    /// Bind mounts from `raw` whose source is a directory, each opened once; `bpf` is decided
    /// by the opened directory's filesystem. Mounts with odd destinations, file mounts and
    /// sources that cannot be opened are left out (they cannot be named).
    pub fn from_raw<'a>(raw: impl IntoIterator<Item = RawMount<'a>>) -> Self {
        let mut mounts = Vec::new();
        for m in raw.into_iter().take(MAX_MOUNTS) {
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
            let label = format!(
                "the container's mount {}",
                format_args!("/{}", dest.join("/"))
            );
            // The source comes from the runtime's config (trusted); the directory it names is
            // opened once here and everything below it is resolved from this fd.
            let Ok(anchor) = Anchor::open_trusted(src, label) else {
                continue;
            };
            let bpf = anchor.is_bpffs();
            mounts.push(Mount {
                dest,
                source: src.to_path_buf(),
                bpf,
                anchor: Arc::new(anchor),
            });
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

    /// Where a snapshot pin path (`sys/fs/bpf/app/counters`) goes: below a bpffs mount of
    /// this container. Only the shape is checked here; the kernel resolves it at use.
    pub fn pin_target(&self, pin: &str) -> Result<Target> {
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
        let rel = RelPath::parse(&rest.join("/")).map_err(|e| refuse(e.reason.into()))?;
        Ok(Target {
            mount: m.clone(),
            rel,
        })
    }

    /// Where a file named by an absolute container path (a snapshot location in an
    /// annotation) is: below a bind mount that is not a bpffs.
    pub fn file_target(&self, path: &str) -> Result<Target> {
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
        let rel = RelPath::parse(&rest.join("/")).map_err(|e| refuse(e.reason.into()))?;
        Ok(Target {
            mount: m.clone(),
            rel,
        })
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
        let target = m.file_target("/data/snap/x.mapsnap").expect("inside");
        assert_eq!(target.rel.as_string(), "snap/x.mapsnap");
        assert_eq!(target.container_path(), "/data/snap/x.mapsnap");
        for bad in [
            "/etc/passwd",
            "/data/../etc/passwd",
            "/data",
            "relative",
            "/sys/fs/bpf/x",
        ] {
            let e = m.file_target(bad).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
            assert!(!e.to_string().contains(t.path().to_str().expect("utf-8")));
        }
        // A link below the mount is refused when the file is opened (by the kernel).
        let data = t.path().join("data");
        std::os::unix::fs::symlink("/etc", data.join("link")).expect("symlink");
        let target = m.file_target("/data/link/passwd").expect("shape is fine");
        let e = target
            .mount
            .anchor
            .read_file(&target.rel, 1 << 20)
            .expect_err("link");
        assert_eq!(e.errno(), Some(libc::ELOOP), "{e}");
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
            let e = m.pin_target(bad).expect_err(bad);
            assert!(e.is_refusal(), "{bad}: {e}");
        }
        let p = m.pin_target("sys/fs/bpf/app/counters").expect("inside");
        assert_eq!(p.rel.as_string(), "app/counters");
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
