//! The digests of a signed stream, computed on a helper thread so that signing and verifying
//! overlap with the work that produces or consumes the stream (snapshot encoding, map reads
//! and writes) instead of adding to it.

use std::sync::mpsc;
use std::thread;

use sha2::Digest as _;

use super::{Result, TrustError};

/// Bytes handed to the helper thread at once: large enough that the channel costs nothing,
/// small enough that little memory is in flight.
const BATCH: usize = 256 * 1024;
/// Batches queued for the helper thread; bounds memory (about 1 MiB) and makes the writer
/// wait when hashing falls behind.
const IN_FLIGHT: usize = 4;

/// Which digests a [`StreamHasher`] computes: each costs a pass over the data, so callers
/// ask only for those nobody else computes already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Want {
    pub blake2b: bool,
    pub sha256: bool,
}

impl Want {
    pub(crate) const BOTH: Want = Want {
        blake2b: true,
        sha256: true,
    };
}

struct Digests {
    blake2b: Option<blake2b_simd::State>,
    sha256: Option<sha2::Sha256>,
}

impl Digests {
    fn new(want: Want) -> Self {
        Self {
            blake2b: want.blake2b.then(blake2b_simd::State::new),
            sha256: want.sha256.then(sha2::Sha256::new),
        }
    }

    fn update(&mut self, buf: &[u8]) {
        if let Some(h) = &mut self.blake2b {
            h.update(buf);
        }
        if let Some(h) = &mut self.sha256 {
            h.update(buf);
        }
    }
}

/// What [`StreamHasher::finish`] returns; a digest not asked for is `None`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamDigests {
    pub blake2b: Option<[u8; 64]>,
    pub sha256: Option<[u8; 32]>,
    pub size: u64,
}

impl StreamDigests {
    /// (BLAKE2b-512, SHA-256, size) of a hasher made with [`Want::BOTH`].
    pub(crate) fn both(self) -> Result<([u8; 64], [u8; 32], u64)> {
        match (self.blake2b, self.sha256) {
            (Some(b), Some(s)) => Ok((b, s, self.size)),
            _ => Err(TrustError::Crypto(
                "internal: a digest was not computed".to_string(),
            )),
        }
    }
}

struct Worker {
    tx: mpsc::SyncSender<Vec<u8>>,
    /// Emptied buffers coming back for reuse.
    back: mpsc::Receiver<Vec<u8>>,
    handle: thread::JoinHandle<Digests>,
}

/// BLAKE2b-512 (what a minisign signature covers) and/or SHA-256, and the size of a stream,
/// in one pass.
pub(crate) struct StreamHasher {
    size: u64,
    pending: Vec<u8>,
    worker: Option<Worker>,
    /// Used when no thread could be started, and after the thread is gone.
    inline: Digests,
    /// The helper thread stopped taking data: the digests are incomplete.
    broken: bool,
}

impl StreamHasher {
    pub(crate) fn new(want: Want) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (back_tx, back) = mpsc::channel::<Vec<u8>>();
        let worker = thread::Builder::new()
            .name("mapsnap-hash".into())
            .spawn(move || {
                let mut d = Digests::new(want);
                for mut buf in rx {
                    d.update(&buf);
                    buf.clear();
                    // The writer may be gone already; then the buffer is simply dropped.
                    let _ = back_tx.send(buf);
                }
                d
            })
            .ok()
            .map(|handle| Worker { tx, back, handle });
        Self {
            size: 0,
            pending: Vec::new(),
            worker,
            inline: Digests::new(want),
            broken: false,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn update(&mut self, buf: &[u8]) {
        self.size += buf.len() as u64;
        if self.worker.is_none() {
            self.inline.update(buf);
            return;
        }
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= BATCH {
            self.send();
        }
    }

    fn send(&mut self) {
        let Some(w) = &self.worker else { return };
        let next = w
            .back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH * 2));
        let full = std::mem::replace(&mut self.pending, next);
        if w.tx.send(full).is_err() {
            self.broken = true;
        }
    }

    pub(crate) fn finish(mut self) -> Result<StreamDigests> {
        let digests = match self.worker.take() {
            None => self.inline,
            Some(w) => {
                if !self.pending.is_empty() && w.tx.send(std::mem::take(&mut self.pending)).is_err()
                {
                    self.broken = true;
                }
                drop(w.tx);
                match w.handle.join() {
                    Ok(d) if !self.broken => d,
                    _ => {
                        return Err(TrustError::Crypto(
                            "the hashing thread stopped before the end of the stream".to_string(),
                        ));
                    }
                }
            }
        };
        Ok(StreamDigests {
            blake2b: digests.blake2b.map(|h| *h.finalize().as_array()),
            sha256: digests.sha256.map(|h| h.finalize().into()),
            size: self.size,
        })
    }
}
