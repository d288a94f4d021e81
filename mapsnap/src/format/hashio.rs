//! Read/Write wrappers that hash and count every byte passing through, so the trailer digest
//! and error offsets come from the exact bytes on the wire, whatever path wrote or read them.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// Hashes and counts every byte read from `inner`.
#[derive(Debug)]
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes consumed so far: the offset of the next byte.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Hash state over everything read so far (cheap clone, ~100 bytes).
    pub(crate) fn hasher(&self) -> Sha256 {
        self.hasher.clone()
    }

    /// Reads until `buf` is full or the input ends; returns how many bytes were read.
    /// Unlike `read_exact`, tells the caller how far a truncated input went.
    pub(crate) fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // `n <= buf.len()` by the Read contract; `get` keeps a broken reader from panicking us.
        let got = buf.get(..n).unwrap_or(buf);
        self.hasher.update(got);
        self.count += got.len() as u64;
        Ok(got.len())
    }
}

/// Hashes and counts every byte accepted by `inner`.
#[derive(Debug)]
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn hasher(&self) -> Sha256 {
        self.hasher.clone()
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let done = buf.get(..n).unwrap_or(buf);
        self.hasher.update(done);
        self.count += done.len() as u64;
        Ok(done.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
