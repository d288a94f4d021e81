//! One pass over a checkpoint archive: every byte is hashed (the layer digest), handed to the
//! uploader, and, decompressed, hashed again (the layer's diff ID) and walked as a tar to check
//! that it is a container checkpoint and to read its `config.dump`. Nothing but one read block
//! and the small metadata files is held in memory, whatever the archive's size.

use std::io::{self, Read};
use std::path::{Component, Path};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::ImageError;

/// Read block: also the unit handed to the uploader.
const BLOCK: usize = 1 << 20;
/// `config.dump` / `spec.dump` larger than this are refused before they are read.
pub const MAX_METADATA_FILE: u64 = 4 << 20;

/// How the archive is compressed; the layer keeps the archive's bytes, so its media type
/// follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What the pass found.
#[derive(Debug)]
pub struct Scan {
    /// `sha256:<hex>` of the archive's bytes: the layer blob's digest.
    pub digest: String,
    /// `sha256:<hex>` of the uncompressed tar: the config's `rootfs.diff_ids` entry.
    pub diff_id: String,
    pub size: u64,
    pub compression: Compression,
    /// `config.dump` as JSON (the engine's container config: image, runtime, names).
    pub config_dump: serde_json::Value,
    pub entries: u64,
}

/// Reads the file in blocks, hashing each block and sending it to the uploader.
struct Tee<'a> {
    file: std::fs::File,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    hash: Sha256,
    size: u64,
    tx: &'a mpsc::Sender<Result<Bytes, String>>,
}

impl Tee<'_> {
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos < self.len {
            return Ok(self.len - self.pos);
        }
        let n = loop {
            match self.file.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n > 0 {
            self.hash.update(&self.buf[..n]);
            self.size += n as u64;
            self.tx
                .blocking_send(Ok(Bytes::copy_from_slice(&self.buf[..n])))
                .map_err(|_| io::Error::other("the upload stopped"))?;
        }
        self.pos = 0;
        self.len = n;
        Ok(n)
    }
}

impl Read for Tee<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.fill()? == 0 {
            return Ok(0);
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hash.update(&out[..n]);
        Ok(n)
    }
}

fn hex_digest(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// A tar entry name as a path inside the layer, or why it cannot be one.
fn entry_name(path: &Path) -> Result<String, String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("absolute path {}", path.display()));
            }
            Component::ParentDir => {
                return Err(format!("path {} leaves the layer", path.display()));
            }
        }
    }
    Ok(parts.join("/"))
}

/// Walks the tar, checking names and reading `config.dump`.
fn walk<R: Read>(tar: R, archive: &str) -> Result<(serde_json::Value, u64), ImageError> {
    let bad = |why: String| ImageError::Archive(format!("{archive}: {why}"));
    let mut ar = tar::Archive::new(tar);
    let mut config = None;
    let (mut spec, mut images, mut entries) = (false, false, 0u64);
    for entry in ar
        .entries()
        .map_err(|e| bad(format!("not a tar archive ({e})")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("unreadable tar entry ({e})")))?;
        entries += 1;
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad entry name ({e})")))?
            .into_owned();
        let name = entry_name(&path).map_err(|why| {
            bad(format!(
                "{why}: a checkpoint archive holds relative paths only"
            ))
        })?;
        match name.as_str() {
            "config.dump" | "spec.dump" => {
                let size = entry.header().size().unwrap_or(u64::MAX);
                if size > MAX_METADATA_FILE {
                    return Err(bad(format!(
                        "{name} is {size} bytes, more than the {MAX_METADATA_FILE} allowed"
                    )));
                }
                let mut text = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut text)
                    .map_err(|e| bad(format!("reading {name} ({e})")))?;
                let v: serde_json::Value = serde_json::from_slice(&text)
                    .map_err(|e| bad(format!("{name} is not JSON ({e})")))?;
                if name == "config.dump" {
                    config = Some(v);
                } else {
                    spec = true;
                }
            }
            n if n == "checkpoint" || n.starts_with("checkpoint/") => images = true,
            _ => {}
        }
    }
    match (config, spec, images) {
        (Some(c), true, true) => Ok((c, entries)),
        (c, s, i) => {
            let missing: Vec<&str> = [
                (c.is_none(), "config.dump"),
                (!s, "spec.dump"),
                (!i, "checkpoint/"),
            ]
            .into_iter()
            .filter_map(|(m, n)| m.then_some(n))
            .collect();
            Err(bad(format!(
                "not a container checkpoint archive (no {}): pass the archive written by the \
                 kubelet checkpoint API or `podman container checkpoint --export`",
                missing.join(", ")
            )))
        }
    }
}

/// The pass. Runs on a blocking thread; `tx` receives the archive's bytes in order. On error
/// the uploader is sent the error, so the upload is abandoned rather than completed short.
pub fn scan(
    file: std::fs::File,
    archive: &str,
    tx: mpsc::Sender<Result<Bytes, String>>,
) -> Result<Scan, ImageError> {
    let result = scan_inner(file, archive, &tx);
    if let Err(e) = &result {
        let _ = tx.blocking_send(Err(e.to_string()));
    }
    result
}

fn scan_inner(
    file: std::fs::File,
    archive: &str,
    tx: &mpsc::Sender<Result<Bytes, String>>,
) -> Result<Scan, ImageError> {
    let io_err = |e: io::Error| ImageError::Io {
        context: format!("reading {archive}"),
        source: e,
    };
    let mut tee = Tee {
        file,
        buf: vec![0; BLOCK],
        pos: 0,
        len: 0,
        hash: Sha256::new(),
        size: 0,
        tx,
    };
    tee.fill().map_err(io_err)?;
    let compression = Compression::sniff(&tee.buf[..tee.len]);
    let (config_dump, entries, diff) = match compression {
        Compression::None => {
            let mut h = Hashing {
                inner: &mut tee,
                hash: Sha256::new(),
            };
            let (c, n) = walk(&mut h, archive)?;
            io::copy(&mut h, &mut io::sink()).map_err(io_err)?;
            (c, n, h.hash)
        }
        Compression::Gzip => {
            let mut h = Hashing {
                inner: flate2::read::MultiGzDecoder::new(&mut tee),
                hash: Sha256::new(),
            };
            let (c, n) = walk(&mut h, archive)?;
            io::copy(&mut h, &mut io::sink()).map_err(io_err)?;
            (c, n, h.hash)
        }
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(&mut tee).map_err(io_err)?;
            let mut h = Hashing {
                inner: dec,
                hash: Sha256::new(),
            };
            let (c, n) = walk(&mut h, archive)?;
            io::copy(&mut h, &mut io::sink()).map_err(io_err)?;
            (c, n, h.hash)
        }
    };
    // Whatever follows the compressed stream is part of the blob too.
    io::copy(&mut tee, &mut io::sink()).map_err(io_err)?;
    Ok(Scan {
        // For an uncompressed archive both hashes saw the same bytes.
        diff_id: hex_digest(diff),
        digest: hex_digest(tee.hash.clone()),
        size: tee.size,
        compression,
        config_dump,
        entries,
    })
}
