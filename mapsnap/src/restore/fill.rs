//! Filling maps from several threads while the calling thread goes on decoding.
//!
//! The restore's calling thread reads, decompresses and checks the snapshot; chunks of maps
//! whose entries may go in in any order are handed to a few filler threads through a bounded
//! queue, so decoding overlaps the kernel's writes, one big map is written by several threads
//! at once (the hash family takes per-bucket locks, arrays none), and the next map is created
//! while the previous one is still being filled. Maps whose order matters (queues, stacks,
//! merges into live maps, nearly full LRU maps, maps of maps) are filled on the calling thread
//! in stream order, as before.
//!
//! Memory stays bounded whatever the map size: at most `threads` chunks wait in the queue and
//! `threads` are being written, beside the one being decoded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{MapMeta, map_type};
use crate::sys::{ENOTSUPP, Map};

/// Filler threads when the caller does not say: one per CPU, at most this many (the kernel
/// side gains little beyond, and each holds a chunk).
const MAX_DEFAULT_THREADS: usize = 8;

/// The filler threads a restore uses by default.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, MAX_DEFAULT_THREADS)
}

/// Whether the entries of `meta` may be written by several threads in any order.
///
/// `known` is the entry count from the verified snapshot (None in a one-pass restore),
/// `merge` whether entries go into a live map whose own entries stay.
///
/// Keys in a snapshot map are unique, so for hash maps and arrays the final state does not
/// depend on the order of the writes. Not so for queues and stacks (order is the content),
/// maps of maps and device maps (few entries, checked one by one), LPM tries (one lock for
/// the whole trie: threads would only queue on it), merges into a live map (kept in stream
/// order, as a user reading the map meanwhile would see it), and LRU maps that the snapshot
/// fills to more than three quarters: there, the order of inserts decides what the kernel
/// evicts (its free list is shared between CPUs through per-CPU caches).
pub fn can_split(meta: &MapMeta, known: Option<u64>, merge: bool) -> bool {
    splits(meta.map_type, meta.max_entries, known, merge)
}

fn splits(map_type: u32, max_entries: u32, known: Option<u64>, merge: bool) -> bool {
    if merge {
        return false;
    }
    match map_type {
        map_type::HASH | map_type::PERCPU_HASH | map_type::ARRAY | map_type::PERCPU_ARRAY => true,
        map_type::LRU_HASH | map_type::LRU_PERCPU_HASH => {
            known.is_some_and(|n| n <= u64::from(max_entries) / 4 * 3)
        }
        _ => false,
    }
}

/// Writes one chunk into a keyed map: batch update, or element by element where the map
/// type has no batch update. `batch_ok` is cleared once the kernel says it has none; `fresh`
/// says nothing was written to the map yet; `first` is the chunk's first entry number (for
/// messages).
#[allow(clippy::too_many_arguments)]
pub fn fill_chunk(
    map: &Map,
    batch_ok: &mut bool,
    fresh: bool,
    first: u64,
    keys: &[u8],
    values: &[u8],
    (kl, vl): (usize, usize),
    count: usize,
) -> Result<()> {
    let mut done = 0usize;
    while *batch_ok && done < count {
        let n = (count - done) as u32;
        match map.update_batch(&keys[done * kl..], &values[done * vl..], n, 0) {
            Ok(w) => done += w as usize,
            // The kernel leaves `count` as given when the type has no batch update, and
            // element-wise updates are idempotent, so starting over element by element is safe.
            Err((_, e))
                if done == 0
                    && fresh
                    && matches!(
                        e.errno(),
                        Some(libc::EINVAL) | Some(ENOTSUPP) | Some(libc::EOPNOTSUPP)
                    ) =>
            {
                *batch_ok = false;
            }
            Err((w, e)) => {
                return Err(Error::Restore {
                    map: map.label().to_string(),
                    reason: format!(
                        "writing entry {} failed: {e}",
                        first + (done + w as usize) as u64
                    ),
                });
            }
        }
    }
    for i in done..count {
        map.update(
            Some(&keys[i * kl..(i + 1) * kl]),
            &values[i * vl..(i + 1) * vl],
            0,
        )
        .map_err(|e| Error::Restore {
            map: map.label().to_string(),
            reason: format!("writing entry {} failed: {e}", first + i as u64),
        })?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One map filled by the filler threads (through its own fd: the restore keeps the map).
#[derive(Debug)]
pub struct Target {
    map: Map,
    batch_ok: AtomicBool,
    /// Entries written so far (for the batch fallback, which is only safe on an empty map).
    written: AtomicU64,
    /// Chunks queued or being written.
    pending: Mutex<usize>,
    idle: Condvar,
}

impl Target {
    pub fn new(map: &Map) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            map: map.try_clone()?,
            batch_ok: AtomicBool::new(true),
            written: AtomicU64::new(0),
            pending: Mutex::new(0),
            idle: Condvar::new(),
        }))
    }

    fn write(&self, job: &Job) -> Result<()> {
        let mut batch_ok = self.batch_ok.load(Ordering::Relaxed);
        let fresh = self.written.load(Ordering::Relaxed) == 0;
        let r = fill_chunk(
            &self.map,
            &mut batch_ok,
            fresh,
            job.first,
            &job.keys,
            &job.values,
            job.sizes,
            job.count,
        );
        if !batch_ok {
            self.batch_ok.store(false, Ordering::Relaxed);
        }
        if r.is_ok() {
            self.written.fetch_add(job.count as u64, Ordering::Relaxed);
        }
        r
    }

    fn done_one(&self) {
        let mut p = lock(&self.pending);
        *p = p.saturating_sub(1);
        if *p == 0 {
            self.idle.notify_all();
        }
    }
}

/// One chunk to write: `count` keys and values of `sizes` (key, value) bytes each, the first
/// being entry number `first` of its map.
pub struct Job {
    keys: Vec<u8>,
    values: Vec<u8>,
    sizes: (usize, usize),
    count: usize,
    first: u64,
}

impl Job {
    pub fn new(
        keys: Vec<u8>,
        values: Vec<u8>,
        sizes: (usize, usize),
        count: usize,
        first: u64,
    ) -> Self {
        Self {
            keys,
            values,
            sizes,
            count,
            first,
        }
    }
}

struct Queued {
    target: Arc<Target>,
    job: Job,
}

#[derive(Default)]
struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::Release);
    }

    fn error(&self) -> Error {
        lock(&self.error).take().unwrap_or_else(|| Error::Restore {
            map: "restore".into(),
            reason: "a filler thread failed (its error was already reported)".into(),
        })
    }
}

/// The filler threads of one restore. Dropping it (on an error path) stops them and waits
/// for them, so no thread outlives the restore's maps.
pub struct Fillers {
    tx: Option<SyncSender<Queued>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Fillers {
    pub fn start(threads: usize, deadline: Option<Instant>) -> Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel::<Queued>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared::default());
        let mut out = Self {
            tx: Some(tx),
            threads: Vec::with_capacity(threads),
            shared: shared.clone(),
        };
        for i in 0..threads {
            let (rx, shared) = (rx.clone(), shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("mapsnap-fill-{i}"))
                .spawn(move || work(&rx, &shared, deadline))
                .map_err(|e| Error::Restore {
                    map: "restore".into(),
                    reason: format!("starting a filler thread failed: {e}"),
                })?;
            out.threads.push(h);
        }
        Ok(out)
    }

    /// Queues one chunk of `target` (blocks while the queue is full). Fails with the first
    /// error a filler met, if any.
    pub fn submit(&self, target: &Arc<Target>, job: Job) -> Result<()> {
        self.check()?;
        *lock(&target.pending) += 1;
        let job = Queued {
            target: target.clone(),
            job,
        };
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            target.done_one();
            return Err(Error::Restore {
                map: target.map.label().to_string(),
                reason: "the filler threads stopped".into(),
            });
        }
        Ok(())
    }

    /// Fails with the first error a filler met, if any.
    pub fn check(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.error());
        }
        Ok(())
    }

    /// Waits until every chunk of `target` queued so far is written.
    pub fn wait(&self, target: &Target) -> Result<()> {
        let mut p = lock(&target.pending);
        while *p > 0 {
            p = target
                .idle
                .wait(p)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(p);
        self.check()
    }

    /// Waits until everything queued is written; the first error of any filler.
    pub fn finish(mut self) -> Result<()> {
        self.stop();
        self.check()
    }

    fn stop(&mut self) {
        self.tx = None;
        for h in self.threads.drain(..) {
            if h.join().is_err() {
                self.shared.fail(Error::Restore {
                    map: "restore".into(),
                    reason: "a filler thread panicked".into(),
                });
            }
        }
    }
}

impl Drop for Fillers {
    fn drop(&mut self) {
        // Later chunks are skipped: the restore already failed.
        self.shared.failed.store(true, Ordering::Release);
        self.stop();
    }
}

fn work(rx: &Mutex<Receiver<Queued>>, shared: &Shared, deadline: Option<Instant>) {
    loop {
        let job = lock(rx).recv();
        let Ok(job) = job else { return };
        if !shared.failed.load(Ordering::Acquire) {
            let r = match deadline {
                Some(d) if Instant::now() >= d => Err(Error::Deadline {
                    what: job.target.map.label().to_string(),
                }),
                _ => job.target.write(&job.job),
            };
            if let Err(e) = r {
                shared.fail(e);
            }
        }
        let target = job.target.clone();
        // The chunk's buffers go before the count drops, so a waiter sees the memory freed.
        drop(job);
        target.done_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_order_free_fills_split() {
        assert!(splits(map_type::HASH, 10, None, false));
        assert!(splits(map_type::PERCPU_ARRAY, 10, None, false));
        assert!(!splits(map_type::HASH, 10, None, true));
        assert!(!splits(map_type::QUEUE, 10, Some(1), false));
        assert!(!splits(map_type::STACK, 10, Some(1), false));
        assert!(!splits(map_type::LPM_TRIE, 10, Some(1), false));
        assert!(!splits(map_type::HASH_OF_MAPS, 10, Some(1), false));
        // LRU: only well below capacity, and only with a known count.
        assert!(splits(map_type::LRU_HASH, 8, Some(6), false));
        assert!(!splits(map_type::LRU_HASH, 8, Some(7), false));
        assert!(!splits(map_type::LRU_HASH, 8, None, false));
    }
}
