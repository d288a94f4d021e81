//! Paths resolved from a directory fd: the one way mapsnap touches a path that came from
//! outside (a container, an annotation, a snapshot, a manifest, a request file, a task).
//!
//! An [`Anchor`] is an open directory. Every path below it is resolved by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`,
//! and every later operation (open, mkdir, rename, unlink, `BPF_OBJ_GET`, `BPF_OBJ_PIN`) takes
//! an fd plus one leaf name. There is no "check a path, then use it by name" anywhere: a
//! process that swaps a component for a symlink, or a directory for a link to `/etc`, makes
//! the operation fail (`ELOOP`, `EXDEV`) instead of redirecting it.
//!
//! Written over rustix (safe wrappers for openat2, renameat2, mkdirat, unlinkat, fstatfs);
//! no crate offers the "resolve once, then use through fds" API with bpffs pins in it.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};

use crate::sys::{self, Map, SysError};

/// `statfs.f_type` of a bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The most components a relative path may have: deeper trees are refused, not walked.
pub const MAX_DEPTH: usize = 32;

/// The longest relative path accepted (bytes), as the kernel's PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;

/// The most entries [`Anchor::entries`] lists in one directory.
pub const MAX_DIR_ENTRIES: usize = 65_536;

/// The resolution every lookup below an anchor uses.
fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

/// A failed operation below an anchor, naming the relative path (never a host path) and the
/// operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path:?} under {anchor}: {}{}", reason(.source), hint(.source))]
pub struct AnchorError {
    pub op: &'static str,
    /// The anchor's label, as its owner named it (e.g. `the container's bpffs mount`).
    pub anchor: String,
    /// The path relative to the anchor.
    pub path: String,
    #[source]
    pub source: io::Error,
}

impl AnchorError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The path (or its leaf) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }

    /// The name already exists.
    pub fn is_exists(&self) -> bool {
        self.source.kind() == io::ErrorKind::AlreadyExists
    }
}

fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "a component is a symbolic link".into(),
        Some(libc::EXDEV) => "the path leaves the directory or crosses a mount".into(),
        _ => e.to_string(),
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) => {
            " (refused: paths from outside must stay below their directory without links; \
             replace the link by a real directory or file)"
        }
        _ => "",
    }
}

pub type Result<T> = std::result::Result<T, AnchorError>;

/// A relative path checked for shape: no `..`, `.`, empty or absolute components, valid
/// UTF-8 (names are never converted lossily), bounded length and depth. Resolution rules are
/// the kernel's (openat2); this only makes errors clear and early.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath {
    parts: Vec<String>,
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_string())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_string())
    }
}

/// Why a relative path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path {path:?} is refused: {reason}")]
pub struct RelPathError {
    pub path: String,
    pub reason: &'static str,
}

impl RelPath {
    /// The empty path: the anchor itself.
    pub fn root() -> Self {
        Self { parts: Vec::new() }
    }

    /// Parses `a/b/c`. Repeated and trailing slashes are tolerated; `.`/`..`, a leading `/`,
    /// NUL bytes and over-long paths are refused.
    pub fn parse(path: &str) -> std::result::Result<Self, RelPathError> {
        let err = |reason| RelPathError {
            path: path.chars().take(256).collect(),
            reason,
        };
        if path.len() > MAX_PATH_LEN {
            return Err(err("it is longer than 4096 bytes"));
        }
        if path.contains('\0') {
            return Err(err("it contains a NUL byte"));
        }
        if path.starts_with('/') {
            return Err(err("it is absolute"));
        }
        let mut parts = Vec::new();
        for c in path.split('/') {
            match c {
                "" => continue,
                "." | ".." => return Err(err("it contains '.' or '..'")),
                c if c.len() > 255 => return Err(err("a component is longer than 255 bytes")),
                c => parts.push(c.to_owned()),
            }
        }
        if parts.len() > MAX_DEPTH {
            return Err(err("it is nested more than 32 levels deep"));
        }
        Ok(Self { parts })
    }

    /// Parses a path given as an OS string; non-UTF-8 names are refused.
    pub fn from_os(path: &OsStr) -> std::result::Result<Self, RelPathError> {
        match path.to_str() {
            Some(s) => Self::parse(s),
            None => Err(RelPathError {
                path: path.to_string_lossy().chars().take(256).collect(),
                reason: "it is not valid UTF-8",
            }),
        }
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    pub fn components(&self) -> &[String] {
        &self.parts
    }

    /// `a/b/c`.
    pub fn as_string(&self) -> String {
        self.parts.join("/")
    }

    /// This path with one more component (itself checked).
    pub fn join(&self, name: &str) -> std::result::Result<Self, RelPathError> {
        let mut s = self.as_string();
        if !s.is_empty() {
            s.push('/');
        }
        s.push_str(name);
        Self::parse(&s)
    }

    /// The parent directory and the leaf name; `None` for the root.
    pub fn split_leaf(&self) -> Option<(RelPath, &str)> {
        let (leaf, parent) = self.parts.split_last()?;
        Some((
            RelPath {
                parts: parent.to_vec(),
            },
            leaf.as_str(),
        ))
    }

    /// Whether `self` starts with `prefix`, component by component.
    pub fn starts_with(&self, prefix: &RelPath) -> bool {
        self.parts.starts_with(&prefix.parts)
    }

    /// The rest of `self` after `prefix`.
    pub fn strip_prefix(&self, prefix: &RelPath) -> Option<RelPath> {
        self.parts
            .strip_prefix(prefix.parts.as_slice())
            .map(|p| RelPath { parts: p.to_vec() })
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Other,
}

/// One directory entry, with a name that is valid UTF-8 (others are reported as refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
}

/// An open directory that paths from outside are resolved beneath.
#[derive(Debug)]
pub struct Anchor {
    fd: OwnedFd,
    label: String,
}

impl Anchor {
    /// Opens a directory named by trusted configuration (the node's config file, a flag of
    /// the administrator): the path itself may contain links; everything below is anchored.
    /// `label` is how errors name it (say what it is, not where it is on the host).
    pub fn open_trusted(path: &Path, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let fd = rfs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AnchorError {
            op: "open directory",
            anchor: label.clone(),
            path: String::new(),
            source: e.into(),
        })?;
        Ok(Self { fd, label })
    }

    /// Opens a directory given by an absolute path or one relative to the working directory,
    /// refusing a symbolic link at **any** component (`RESOLVE_NO_SYMLINKS`; mounts may be
    /// crossed). For paths that are configuration but may sit in a directory others can write
    /// (a snapshot location on a shared volume): a component swapped for a link fails instead
    /// of redirecting the operation.
    pub fn open_dir_nolinks(path: &Path, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let p = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let fd = rfs::openat2(
            rfs::CWD,
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| AnchorError {
            op: "open directory",
            anchor: label.clone(),
            path: String::new(),
            source: e.into(),
        })?;
        Ok(Self { fd, label })
    }

    /// Flushes the directory itself (after a rename into it) to stable storage.
    pub fn sync(&self) -> Result<()> {
        let root = RelPath::root();
        let fd = self
            .open_raw(&root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| self.err("open directory", &root, e))?;
        rfs::fsync(&fd).map_err(|e| self.err("fsync", &root, e.into()))
    }

    /// Adopts an fd that must refer to a directory (e.g. the image directory CRIU hands out).
    pub fn from_fd(fd: OwnedFd, label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let st = rfs::fstat(&fd).map_err(|e| AnchorError {
            op: "stat directory",
            anchor: label.clone(),
            path: String::new(),
            source: e.into(),
        })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(AnchorError {
                op: "open directory",
                anchor: label,
                path: String::new(),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(Self { fd, label })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn try_clone(&self) -> Result<Self> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| self.err("dup", &RelPath::root(), e))?;
        Ok(Self {
            fd,
            label: self.label.clone(),
        })
    }

    fn err(&self, op: &'static str, path: &RelPath, source: io::Error) -> AnchorError {
        AnchorError {
            op,
            anchor: self.label.clone(),
            path: path.as_string(),
            source,
        }
    }

    fn err_leaf(&self, op: &'static str, leaf: &str, source: io::Error) -> AnchorError {
        AnchorError {
            op,
            anchor: self.label.clone(),
            path: leaf.to_owned(),
            source,
        }
    }

    /// openat2 beneath this anchor. An empty path opens the anchor itself.
    fn open_raw(&self, path: &RelPath, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let p = if path.is_root() {
            ".".to_owned()
        } else {
            path.as_string()
        };
        // RESOLVE_NO_SYMLINKS refuses a trailing link with ELOOP, except with O_PATH |
        // O_NOFOLLOW, which would hand out an fd of the link itself: no O_NOFOLLOW then.
        let nofollow = if flags.contains(OFlags::PATH) {
            OFlags::empty()
        } else {
            OFlags::NOFOLLOW
        };
        Ok(rfs::openat2(
            &self.fd,
            p.as_str(),
            flags | OFlags::CLOEXEC | nofollow,
            mode,
            resolve(),
        )?)
    }

    /// Opens the directory at `path` below this anchor as a new anchor.
    pub fn open_dir(&self, path: &RelPath) -> Result<Anchor> {
        let fd = self
            .open_raw(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| self.err("open directory", path, e))?;
        Ok(Anchor {
            fd,
            label: self.label.clone(),
        })
    }

    /// Opens (creating what is missing, with `mode`) every directory of `path` in turn, each
    /// relative to the one before: a component that is or becomes a link is refused.
    pub fn create_dir_all(&self, path: &RelPath, mode: u32) -> Result<Anchor> {
        let mut cur = self.try_clone()?;
        // The components of a RelPath are already checked: prefixes and single components
        // of it need no second parse.
        for (i, part) in path.components().iter().enumerate() {
            let done = RelPath {
                parts: path.components()[..=i].to_vec(),
            };
            match rfs::mkdirat(&cur.fd, part.as_str(), Mode::from_raw_mode(mode)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(self.err("create directory", &done, e.into())),
            }
            let one = RelPath {
                parts: vec![part.clone()],
            };
            cur = cur
                .open_dir(&one)
                .map_err(|e| self.err("open directory", &done, e.source))?;
        }
        Ok(cur)
    }

    /// Opens a regular file for reading. FIFOs, devices, sockets and directories are refused
    /// without blocking (O_NONBLOCK), and so is a file larger than `max_size` bytes.
    pub fn open_file(&self, path: &RelPath, max_size: u64) -> Result<File> {
        let fd = self
            .open_raw(
                path,
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
                Mode::empty(),
            )
            .map_err(|e| self.err("open", path, e))?;
        let st = rfs::fstat(&fd).map_err(|e| self.err("stat", path, e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(self.err(
                "open",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        if size > max_size {
            return Err(self.err(
                "open",
                path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("it is {size} bytes, more than the limit of {max_size}"),
                ),
            ));
        }
        // Back to blocking reads for a regular file (O_NONBLOCK has no effect on them, but
        // clear it so nothing downstream is surprised).
        let flags = rfs::fcntl_getfl(&fd).map_err(|e| self.err("fcntl", path, e.into()))?;
        rfs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)
            .map_err(|e| self.err("fcntl", path, e.into()))?;
        Ok(File::from(fd))
    }

    /// Reads a whole regular file of at most `max_size` bytes (checked before allocating, and
    /// again while reading, since the file may grow).
    pub fn read_file(&self, path: &RelPath, max_size: u64) -> Result<Vec<u8>> {
        use std::io::Read;
        let f = self.open_file(path, max_size)?;
        let mut buf = Vec::new();
        f.take(max_size.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| self.err("read", path, e))?;
        if buf.len() as u64 > max_size {
            return Err(self.err(
                "read",
                path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("it grew past the limit of {max_size} bytes while being read"),
                ),
            ));
        }
        Ok(buf)
    }

    /// The file at `path` if it exists, without following a link at any component.
    pub fn exists(&self, path: &RelPath) -> Result<bool> {
        match self.open_raw(path, OFlags::PATH, Mode::empty()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("look up", path, e)),
        }
    }

    /// An `O_PATH` fd of whatever is at `path` (not following links): identifies one inode.
    pub fn open_path(&self, path: &RelPath) -> Result<OwnedFd> {
        self.open_raw(path, OFlags::PATH, Mode::empty())
            .map_err(|e| self.err("open", path, e))
    }

    /// Creates a new file named `leaf` in this directory, failing if the name exists.
    pub fn create_file(&self, leaf: &str, mode: u32) -> Result<File> {
        let path = leaf_path(leaf).map_err(|e| self.err_leaf("create", leaf, e))?;
        let fd = self
            .open_raw(
                &path,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(mode),
            )
            .map_err(|e| self.err("create", &path, e))?;
        Ok(File::from(fd))
    }

    /// Creates a uniquely named file `<prefix><random>` for writing; returns it and its name.
    pub fn create_temp(&self, prefix: &str, mode: u32) -> Result<(File, String)> {
        let mut last = None;
        for _ in 0..16 {
            let name = format!("{prefix}{:016x}", random_u64());
            match self.create_file(&name, mode) {
                Ok(f) => return Ok((f, name)),
                Err(e) if e.is_exists() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            self.err_leaf("create", prefix, io::Error::from_raw_os_error(libc::EEXIST))
        }))
    }

    /// Renames `from` to `to`, both leaves of this directory. With `replace` false the
    /// rename fails if `to` exists (renameat2 RENAME_NOREPLACE), so nothing is overwritten.
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> Result<()> {
        self.rename_into(from, self, to, replace)
    }

    /// Renames the leaf `from` of this directory to the leaf `to` of `dest` (same
    /// filesystem), without replacing an existing `to` unless `replace`.
    pub fn rename_into(&self, from: &str, dest: &Anchor, to: &str, replace: bool) -> Result<()> {
        leaf_path(from).map_err(|e| self.err_leaf("rename", from, e))?;
        leaf_path(to).map_err(|e| dest.err_leaf("rename", to, e))?;
        let flags = if replace {
            RenameFlags::empty()
        } else {
            RenameFlags::NOREPLACE
        };
        rfs::renameat_with(&self.fd, from, &dest.fd, to, flags)
            .map_err(|e| dest.err_leaf("rename", to, e.into()))
    }

    /// Removes the leaf `name` (not a directory); returns false when it was not there.
    pub fn unlink(&self, name: &str) -> Result<bool> {
        leaf_path(name).map_err(|e| self.err_leaf("unlink", name, e))?;
        match rfs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(self.err_leaf("unlink", name, e.into())),
        }
    }

    /// Removes the empty directory `name`; returns false when it was not there.
    pub fn remove_dir(&self, name: &str) -> Result<bool> {
        leaf_path(name).map_err(|e| self.err_leaf("rmdir", name, e))?;
        match rfs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(self.err_leaf("rmdir", name, e.into())),
        }
    }

    /// The entries of this directory (without `.` and `..`), at most [`MAX_DIR_ENTRIES`].
    /// Names that are not UTF-8 are refused rather than converted.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let root = RelPath::root();
        // Dir needs a readable fd: reopen the O_PATH anchor for reading.
        let fd = self
            .open_raw(
                &root,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| self.err("open directory", &root, e))?;
        let dir = rfs::Dir::new(fd).map_err(|e| self.err("read directory", &root, e.into()))?;
        let mut out = Vec::new();
        for ent in dir {
            let ent = ent.map_err(|e| self.err("read directory", &root, e.into()))?;
            let raw = ent.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(self.err(
                    "read directory",
                    &root,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("more than {MAX_DIR_ENTRIES} entries"),
                    ),
                ));
            }
            let name = std::str::from_utf8(raw).map_err(|_| {
                self.err_leaf(
                    "read directory",
                    &OsStr::from_bytes(raw).to_string_lossy(),
                    io::Error::new(io::ErrorKind::InvalidData, "a name is not valid UTF-8"),
                )
            })?;
            let kind = match ent.file_type() {
                FileType::Directory => EntryKind::Dir,
                FileType::RegularFile => EntryKind::File,
                FileType::Symlink => EntryKind::Symlink,
                _ => EntryKind::Other,
            };
            out.push(Entry {
                name: name.to_owned(),
                kind,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `statfs.f_type` of the filesystem this directory is on.
    pub fn fs_magic(&self) -> Result<i64> {
        let st =
            rfs::fstatfs(&self.fd).map_err(|e| self.err("statfs", &RelPath::root(), e.into()))?;
        #[allow(clippy::unnecessary_cast)]
        Ok(st.f_type as i64)
    }

    pub fn is_bpffs(&self) -> bool {
        self.fs_magic().is_ok_and(|m| m == BPF_FS_MAGIC)
    }

    /// Opens the BPF map pinned at `path` below this anchor. The pin is opened `O_PATH`
    /// without following links first, then `BPF_OBJ_GET` is pointed at that very inode, so a
    /// link swapped in at any moment cannot redirect it to another map.
    pub fn open_map(&self, path: &RelPath) -> std::result::Result<Map, SysError> {
        let target = || format!("{} {:?}", self.label, path.as_string());
        let pin = self
            .open_path(path)
            .map_err(|e| SysError::new("BPF_OBJ_GET", target(), e.source))?;
        let fd =
            sys::obj_get_opath(pin.as_fd()).map_err(|e| SysError::new(e.op, target(), e.source))?;
        Map::from_obj_fd(fd, target())
    }

    /// Pins `map` as the leaf `name` of this directory (bpffs). Fails if the name exists.
    pub fn pin_map(&self, map: &Map, name: &str) -> std::result::Result<(), SysError> {
        leaf_path(name)
            .map_err(|e| SysError::new("BPF_OBJ_PIN", format!("{} {name:?}", self.label), e))?;
        sys::obj_pin_at(map, self.fd.as_fd(), name)
            .map_err(|e| SysError::new(e.op, format!("{} {name:?}", self.label), e.source))
    }
}

/// A single checked name (no `/`).
fn leaf_path(leaf: &str) -> io::Result<RelPath> {
    if leaf.contains('/') || leaf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a leaf name must be one non-empty component",
        ));
    }
    RelPath::parse(leaf).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A random number for temporary names (collisions are retried; this is not a secret).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn relpath_shapes() {
        assert_eq!(RelPath::parse("a//b/").unwrap().as_string(), "a/b");
        assert!(RelPath::parse("").unwrap().is_root());
        for bad in ["/a", "a/../b", "./a", "a/.", "a\0b"] {
            assert!(RelPath::parse(bad).is_err(), "{bad}");
        }
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(RelPath::parse(&deep).is_err());
        let p = RelPath::parse("x/y/z").unwrap();
        let (parent, leaf) = p.split_leaf().unwrap();
        assert_eq!((parent.as_string().as_str(), leaf), ("x/y", "z"));
        assert!(p.starts_with(&RelPath::parse("x").unwrap()));
        assert!(!p.starts_with(&RelPath::parse("xy").unwrap()));
        assert_eq!(
            p.strip_prefix(&RelPath::parse("x").unwrap())
                .unwrap()
                .as_string(),
            "y/z"
        );
        assert!(RelPath::from_os(OsStr::from_bytes(b"a\xffb")).is_err());
    }

    #[test]
    fn links_and_escapes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host file").unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::write(tmp.path().join("d/f"), b"inside").unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), tmp.path().join("d/fl")).unwrap();
        let a = Anchor::open_trusted(tmp.path(), "test dir").unwrap();
        let p = |s| RelPath::parse(s).unwrap();
        assert_eq!(a.read_file(&p("d/f"), 100).unwrap(), b"inside");
        let e = a.read_file(&p("link/secret"), 100).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ELOOP), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!e.to_string().contains(outside.path().to_str().unwrap()));
        assert_eq!(
            a.read_file(&p("d/fl"), 100).unwrap_err().errno(),
            Some(libc::ELOOP)
        );
        // Limits are checked before reading.
        let e = a.read_file(&p("d/f"), 3).unwrap_err();
        assert!(e.to_string().contains("limit of 3"), "{e}");
        // mkdir through a link is refused; nothing appears outside.
        assert!(a.create_dir_all(&p("link/new"), 0o700).is_err());
        assert!(!outside.path().join("new").exists());
        // A FIFO is refused without blocking.
        rustix::fs::mknodat(
            a.fd(),
            "fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(a.open_file(&p("fifo"), 100).is_err());
    }

    #[test]
    fn create_rename_unlink() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Anchor::open_trusted(tmp.path(), "test dir").unwrap();
        let d = a
            .create_dir_all(&RelPath::parse("x/y").unwrap(), 0o700)
            .unwrap();
        let (mut f, name) = d.create_temp("tmp-", 0o600).unwrap();
        std::io::Write::write_all(&mut f, b"one").unwrap();
        d.rename(&name, "final", false).unwrap();
        let (mut f2, name2) = d.create_temp("tmp-", 0o600).unwrap();
        std::io::Write::write_all(&mut f2, b"two").unwrap();
        assert!(d.rename(&name2, "final", false).unwrap_err().is_exists());
        d.rename(&name2, "final", true).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("x/y/final")).unwrap(), b"two");
        let names: Vec<_> = d.entries().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["final"]);
        assert!(d.unlink("final").unwrap());
        assert!(!d.unlink("final").unwrap());
        assert!(d.rename("a/b", "c", false).is_err());
        // Across directories: no replace unless asked.
        let e = a
            .create_dir_all(&RelPath::parse("e").unwrap(), 0o700)
            .unwrap();
        std::fs::write(tmp.path().join("x/y/m"), b"m").unwrap();
        std::fs::write(tmp.path().join("e/m"), b"old").unwrap();
        assert!(d.rename_into("m", &e, "m", false).unwrap_err().is_exists());
        d.rename_into("m", &e, "m", true).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("e/m")).unwrap(), b"m");
        assert!(!tmp.path().join("x/y/m").exists());
        d.sync().unwrap();
    }

    #[test]
    fn nolinks_refuses_a_link_anywhere() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        assert!(Anchor::open_dir_nolinks(&tmp.path().join("real"), "d").is_ok());
        let e = Anchor::open_dir_nolinks(&tmp.path().join("link"), "d").unwrap_err();
        assert_eq!(e.errno(), Some(libc::ELOOP), "{e}");
    }

    fn hash_map(name: &str) -> Map {
        Map::create(&sys::CreateAttrs {
            map_type: 1, // BPF_MAP_TYPE_HASH
            name,
            key_size: 4,
            value_size: 8,
            max_entries: 16,
            flags: 0,
            map_extra: 0,
            numa_node: None,
            btf_fd: None,
            btf_key_type_id: 0,
            btf_value_type_id: 0,
            inner_map_fd: None,
        })
        .unwrap()
    }

    /// Runs as root on the real kernel's bpffs: a pin reached through a symlink (the
    /// container-controlled name swapped to another tenant's map) is refused, and pinning
    /// never follows a link or replaces a name.
    #[test]
    fn bpffs_pins_are_opened_without_links() {
        let base = Path::new("/sys/fs/bpf");
        let root = base.join(format!("mapsnap-anchor-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("tenant")).unwrap();
        std::fs::create_dir_all(root.join("victim")).unwrap();
        let victim = hash_map("victim");
        victim.pin(&root.join("victim/map")).unwrap();
        let own = hash_map("own");
        let a = Anchor::open_trusted(&root.join("tenant"), "tenant bpffs").unwrap();
        assert!(a.is_bpffs());
        a.pin_map(&own, "own").unwrap();
        assert!(
            a.pin_map(&own, "own").is_err(),
            "a pin never replaces a name"
        );
        let opened = a.open_map(&RelPath::parse("own").unwrap()).unwrap();
        assert_eq!(opened.info().unwrap().id, own.info().unwrap().id);
        std::os::unix::fs::symlink(root.join("victim/map"), root.join("tenant/x")).unwrap();
        let e = a.open_map(&RelPath::parse("x").unwrap()).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ELOOP), "{e}");
        // The plain path API would have followed it: that is what the anchor prevents.
        assert_eq!(
            Map::from_pin(&root.join("tenant/x"))
                .unwrap()
                .info()
                .unwrap()
                .id,
            victim.info().unwrap().id
        );
        // Pinning at a name that is a link fails instead of writing through it.
        assert!(a.pin_map(&own, "x").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
