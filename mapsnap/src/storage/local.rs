//! Local files: written to a temporary file in the same directory, synced, then linked (no
//! overwrite) or renamed (overwrite) into place, so a failed dump never leaves a partial file
//! under the name and an existing snapshot is never replaced by accident.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::ObjectInfo;
use super::error::{ErrorKind, Result, StorageError};

fn io_error(path: &Path, what: &str, e: &std::io::Error) -> StorageError {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        std::io::ErrorKind::PermissionDenied => ErrorKind::Denied,
        _ => ErrorKind::Other,
    };
    let msg = match kind {
        ErrorKind::NotFound => format!("{what}: no such file ({e})"),
        ErrorKind::AlreadyExists => "already exists: pass --overwrite to replace it".into(),
        _ => format!("{what}: {e}"),
    };
    StorageError::new(kind, path.display().to_string(), msg)
}

pub(crate) fn head(path: &Path) -> Result<Option<ObjectInfo>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(ObjectInfo {
            size: m.len(),
            e_tag: None,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, "cannot look at the file", &e)),
    }
}

/// Removes a file; one that is not there is not an error.
pub(crate) fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path, "cannot delete it", &e)),
    }
}

pub(crate) fn reader(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).map_err(|e| io_error(path, "cannot open the snapshot", &e))?;
    Ok(BufReader::with_capacity(1 << 20, f))
}

pub(crate) fn read_all(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, "cannot read", &e)),
    }
}

/// A file being written under a temporary name beside its destination.
#[derive(Debug)]
pub(crate) struct LocalWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    overwrite: bool,
    written: u64,
}

impl LocalWriter {
    pub(crate) fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if !overwrite && head(dest)?.is_some() {
            return Err(io_error(
                dest,
                "",
                &std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        let dir = dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let tmp = dir.join(format!(
            ".{name}.{}.{}.partial",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_error(dest, &format!("cannot create {}", tmp.display()), &e))?;
        Ok(Self {
            dest: dest.to_path_buf(),
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
        if self.overwrite {
            std::fs::rename(&self.tmp, &self.dest)
                .map_err(|e| io_error(&self.dest, "cannot rename the temporary file", &e))?;
        } else {
            // link(2) fails with EEXIST when the name exists: an atomic "create only".
            match std::fs::hard_link(&self.tmp, &self.dest) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(io_error(&self.dest, "", &e));
                }
                // File systems without hard links: check, then rename (not atomic).
                Err(_) => {
                    if head(&self.dest)?.is_some() {
                        return Err(io_error(
                            &self.dest,
                            "",
                            &std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                        ));
                    }
                    std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
                        io_error(&self.dest, "cannot rename the temporary file", &e)
                    })?;
                }
            }
        }
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
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
        // Not committed (an error, or a panic): remove the temporary file. After a commit it
        // is gone already (renamed, or linked then removed).
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
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
