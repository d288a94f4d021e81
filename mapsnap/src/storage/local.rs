//! Local files, through one open directory: the snapshot's directory is opened once (no
//! symbolic link at any component), and the temporary file, the publishing rename, reads and
//! deletes all go through that fd with a single leaf name. A directory swapped for a link
//! while we work makes the operation fail; it can never redirect a write or a read to another
//! place. The file is written under a temporary name, synced, then renamed into place without
//! replacing an existing one (`RENAME_NOREPLACE`) unless overwriting, so a failed dump never
//! leaves a partial file under the name.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use super::ObjectInfo;
use super::error::{ErrorKind, Result, StorageError};
use crate::anchor::{Anchor, AnchorError, RelPath};
use crate::limits::Limits;

fn kind_of(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
        _ if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)) => {
            ErrorKind::BadLocation
        }
        _ => ErrorKind::Other,
    }
}

fn io_error(path: &Path, what: &str, e: &std::io::Error) -> StorageError {
    let kind = kind_of(e);
    let msg = match kind {
        ErrorKind::NotFound => format!("{what}: no such file ({e})"),
        ErrorKind::AlreadyExists => "already exists: pass --overwrite to replace it".into(),
        _ => format!("{what}: {e}"),
    };
    StorageError::new(kind, path.display().to_string(), msg)
}

fn anchor_error(path: &Path, what: &str, e: &AnchorError) -> StorageError {
    let kind = kind_of(&e.source);
    let msg = match kind {
        ErrorKind::NotFound => format!("{what}: no such file or directory"),
        ErrorKind::AlreadyExists => "already exists: pass --overwrite to replace it".into(),
        // The anchor's message says which component and why.
        _ => format!("{what}: {e}"),
    };
    StorageError::new(kind, path.display().to_string(), msg)
}

/// The file's directory, opened once without following links, and its leaf name.
fn open_parent(path: &Path) -> Result<(Anchor, String)> {
    let bad =
        |why: &str| StorageError::new(ErrorKind::BadLocation, path.display().to_string(), why);
    let leaf = path
        .file_name()
        .ok_or_else(|| bad("the location names no file"))?
        .to_str()
        .ok_or_else(|| bad("the file name is not valid UTF-8"))?
        .to_string();
    let dir = path.parent().unwrap_or(Path::new(""));
    let anchor = Anchor::open_dir_nolinks(dir, "the snapshot's directory").map_err(|e| {
        let hint = if e.errno() == Some(libc::ELOOP) {
            " (a component of the directory is a symbolic link: give the real path)"
        } else {
            ""
        };
        anchor_error(path, &format!("cannot open its directory{hint}"), &e)
    })?;
    Ok((anchor, leaf))
}

fn leaf_rel(path: &Path, leaf: &str) -> Result<RelPath> {
    RelPath::parse(leaf).map_err(|e| {
        StorageError::new(
            ErrorKind::BadLocation,
            path.display().to_string(),
            e.to_string(),
        )
    })
}

pub(crate) fn head(path: &Path) -> Result<Option<ObjectInfo>> {
    let (dir, leaf) = match open_parent(path) {
        Ok(v) => v,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let fd = match dir.open_path(&leaf_rel(path, &leaf)?) {
        Ok(fd) => fd,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(anchor_error(path, "cannot look at the file", &e)),
    };
    let st =
        rustix::fs::fstat(&fd).map_err(|e| io_error(path, "cannot look at the file", &e.into()))?;
    Ok(Some(ObjectInfo {
        size: u64::try_from(st.st_size).unwrap_or(0),
        e_tag: None,
    }))
}

/// Removes a file; one that is not there is not an error.
pub(crate) fn remove(path: &Path) -> Result<()> {
    let (dir, leaf) = match open_parent(path) {
        Ok(v) => v,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    dir.unlink(&leaf)
        .map(drop)
        .map_err(|e| anchor_error(path, "cannot delete it", &e))
}

/// Opens a snapshot for reading: a regular file (no FIFO, device or link) of at most
/// `max_size` bytes.
pub(crate) fn reader_limited(path: &Path, max_size: u64) -> Result<BufReader<File>> {
    let (dir, leaf) = open_parent(path)?;
    let f = dir
        .open_file(&leaf_rel(path, &leaf)?, max_size)
        .map_err(|e| anchor_error(path, "cannot open the snapshot", &e))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

pub(crate) fn reader(path: &Path) -> Result<BufReader<File>> {
    reader_limited(path, Limits::default().max_file)
}

/// Reads a small file (a manifest) of at most `max_size` bytes; None when it is not there.
pub(crate) fn read_limited(path: &Path, max_size: u64) -> Result<Option<Vec<u8>>> {
    let (dir, leaf) = match open_parent(path) {
        Ok(v) => v,
        Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match dir.read_file(&leaf_rel(path, &leaf)?, max_size) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(anchor_error(path, "cannot read", &e)),
    }
}

/// A file being written under a temporary name in its destination's (open) directory.
#[derive(Debug)]
pub(crate) struct LocalWriter {
    dest: std::path::PathBuf,
    dir: Anchor,
    leaf: String,
    tmp: String,
    file: Option<BufWriter<File>>,
    overwrite: bool,
    written: u64,
}

impl LocalWriter {
    pub(crate) fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        let (dir, leaf) = open_parent(dest)?;
        let rel = leaf_rel(dest, &leaf)?;
        if !overwrite
            && dir
                .exists(&rel)
                .map_err(|e| anchor_error(dest, "cannot look at the file", &e))?
        {
            return Err(io_error(
                dest,
                "",
                &std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        // `.NAME.partial-<random>`, short enough for any leaf (names are at most 255 bytes).
        let mut short: String = leaf.chars().take(100).collect();
        while short.len() > 200 {
            short.pop();
        }
        let (f, tmp) = dir
            .create_temp(&format!(".{short}.partial-"), 0o600)
            .map_err(|e| anchor_error(dest, "cannot create the temporary file", &e))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            leaf,
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, f)),
            overwrite,
            written: 0,
        })
    }

    pub(crate) fn commit(mut self) -> Result<ObjectInfo> {
        let Some(w) = self.file.take() else {
            return Err(StorageError::new(
                ErrorKind::Other,
                self.dest.display().to_string(),
                "the writer was already finished",
            ));
        };
        let f = w
            .into_inner()
            .map_err(|e| io_error(&self.dest, "cannot write", e.error()))?;
        f.sync_all()
            .map_err(|e| io_error(&self.dest, "cannot sync", &e))?;
        drop(f);
        // Both names are leaves of the directory opened at create: nothing is resolved again.
        self.dir
            .rename(&self.tmp, &self.leaf, self.overwrite)
            .map_err(|e| {
                if e.is_exists() {
                    io_error(&self.dest, "", &e.source)
                } else {
                    anchor_error(&self.dest, "cannot rename the temporary file", &e)
                }
            })?;
        // Renamed: nothing for Drop to remove.
        self.tmp.clear();
        let _ = self.dir.sync();
        Ok(ObjectInfo {
            size: self.written,
            e_tag: None,
        })
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the snapshot writer was already finished"))?;
        let n = f.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Not committed (an error, or a panic): remove the temporary file, through the same
        // directory fd it was created in.
        self.file.take();
        if !self.tmp.is_empty() {
            let _ = self.dir.unlink(&self.tmp);
        }
    }
}

/// Writes a small file (a manifest) atomically, replacing what is there.
pub(crate) fn put_small(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut w = LocalWriter::create(dest, true)?;
    w.write_all(bytes)
        .map_err(|e| io_error(dest, "cannot write", &e))?;
    w.commit().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_overwrite_and_no_partial_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("s.snap");
        let mut w = LocalWriter::create(&dest, false).expect("create");
        w.write_all(b"one").expect("write");
        // Someone else creates the name meanwhile: the commit must not replace it.
        std::fs::write(&dest, b"other").expect("write other");
        let e = w.commit().expect_err("exists");
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&dest).expect("read"), b"other");
        // A writer dropped without commit leaves nothing behind.
        let w = LocalWriter::create(&dir.path().join("t.snap"), false).expect("create");
        drop(w);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.snap")]);
        // Overwrite replaces.
        let mut w = LocalWriter::create(&dest, true).expect("create");
        w.write_all(b"two").expect("write");
        assert_eq!(w.commit().expect("commit").size, 3);
        assert_eq!(std::fs::read(&dest).expect("read"), b"two");
    }
}
