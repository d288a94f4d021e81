//! Reading one big map with several threads, overlapped with compression and writing.
//!
//! Hash maps are split by bucket index (the batch cursor of the hash family is a bucket
//! number), arrays by index. Each reader thread walks its range and sends filled buffers to the
//! caller's thread, which compresses and writes them while the readers go on.
//!
//! A hash batch returns whole buckets and cannot stop at an exact bucket: a thread's last
//! batch may run into the next thread's range. The overlap is found with one probe batch from
//! the next range's first bucket: its first key is where the overlap starts in our batch
//! (keys are unique, and both walks return buckets in index order).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use super::EntrySink;
use crate::error::Result;
use crate::model::{MapMeta, map_type};
use crate::sys::Map;

/// How a map's entries can be divided between threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Hash family: ranges of bucket indexes (`n_buckets` = max_entries rounded up to 2^k).
    Buckets(u32),
    /// Arrays: ranges of indexes.
    Indexes(u32),
}

/// Below this many entries one thread is as fast: thread start-up would dominate.
const MIN_PARALLEL_ENTRIES: u32 = 1 << 15;

fn split_of(meta: &MapMeta) -> Option<Split> {
    if meta.max_entries < MIN_PARALLEL_ENTRIES {
        return None;
    }
    match meta.map_type {
        map_type::HASH | map_type::LRU_HASH | map_type::PERCPU_HASH | map_type::LRU_PERCPU_HASH => {
            Some(Split::Buckets(
                meta.max_entries.checked_next_power_of_two()?,
            ))
        }
        map_type::ARRAY | map_type::PERCPU_ARRAY => Some(Split::Indexes(meta.max_entries)),
        _ => None,
    }
}

/// Whether [`read_entries_parallel`] would split this map.
pub fn can_split(meta: &MapMeta) -> bool {
    split_of(meta).is_some()
}

/// One filled buffer: `count` entries in column layout.
struct Batch {
    count: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

/// Buffers handed back by the writer, so readers do not allocate (and fault in) new ones.
type Pool = Arc<Mutex<Vec<Batch>>>;

fn take(pool: &Pool, max: usize, kl: usize, vl: usize) -> Batch {
    let mut b = pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or(Batch {
        count: 0,
        keys: Vec::new(),
        values: Vec::new(),
    });
    b.keys.resize(max * kl, 0);
    b.values.resize(max * vl, 0);
    b.count = 0;
    b
}

/// Reads every entry of `map` with `threads` reader threads (at least one); `sink` runs on
/// the calling thread, so compression and writing overlap the kernel reads.
pub fn read_entries_parallel(
    map: &Map,
    meta: &MapMeta,
    batch: usize,
    threads: usize,
    sink: &mut EntrySink<'_>,
) -> Result<u64> {
    let (kl, vl) = (meta.key_len(), meta.value_len());
    // Even one reader thread runs beside this one, so reading overlaps compression.
    let Some(split) = split_of(meta) else {
        return super::read_entries(map, kl, vl, batch, sink);
    };
    let n = match split {
        Split::Buckets(n) | Split::Indexes(n) => n,
    };
    let threads = threads.clamp(1, 8) as u32;
    let bounds: Vec<u32> = (0..=threads)
        .map(|i| (u64::from(n) * u64::from(i) / u64::from(threads)) as u32)
        .collect();
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = sync_channel::<Result<Batch>>(threads as usize * 2);
    std::thread::scope(|s| {
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            let last = hi == n;
            let tx = tx.clone();
            let pool = pool.clone();
            let map = map.try_clone()?;
            s.spawn(move || {
                let r = match split {
                    Split::Buckets(_) => {
                        read_buckets(&map, lo, (!last).then_some(hi), kl, vl, batch, &pool, &tx)
                    }
                    Split::Indexes(_) => read_indexes(&map, lo, hi, kl, vl, batch, &pool, &tx),
                };
                if let Err(e) = r {
                    let _ = tx.send(Err(e));
                }
            });
        }
        drop(tx);
        drain(rx, &pool, sink)
    })
}

/// Hands every batch to `sink` in arrival order; stops at the first error (dropping the
/// receiver makes the readers' sends fail, so they stop too).
fn drain(rx: Receiver<Result<Batch>>, pool: &Pool, sink: &mut EntrySink<'_>) -> Result<u64> {
    let mut total = 0u64;
    for msg in rx {
        let b = msg?;
        if b.count > 0 {
            sink(b.count, &b.keys, &b.values)?;
            total += b.count as u64;
        }
        if let Ok(mut p) = pool.lock() {
            p.push(b);
        }
    }
    Ok(total)
}

/// Walks buckets `[lo, hi)` (to the end when `hi` is None).
#[allow(clippy::too_many_arguments)]
fn read_buckets(
    map: &Map,
    lo: u32,
    hi: Option<u32>,
    kl: usize,
    vl: usize,
    batch: usize,
    pool: &Pool,
    tx: &SyncSender<Result<Batch>>,
) -> Result<()> {
    let mut max = batch;
    let mut cursor: Option<[u8; 4]> = (lo > 0).then(|| lo.to_ne_bytes());
    let mut out = vec![0u8; kl.max(4)];
    loop {
        let mut b = take(pool, max, kl, vl);
        let r = match map.lookup_batch(
            cursor.as_ref().map(|c| c.as_slice()),
            &mut out,
            &mut b.keys,
            &mut b.values,
            max as u32,
        ) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENOSPC) && max < (1 << 24) => {
                max *= 2;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let next = u32::from_ne_bytes([out[0], out[1], out[2], out[3]]);
        let mut count = r.count as usize;
        let mut stop = r.done;
        if let Some(hi) = hi
            && (r.done || next > hi)
        {
            count = trim_overlap(map, hi, &b, count, kl, vl)?;
            stop = true;
        } else if hi == Some(next) {
            stop = true;
        }
        b.count = count;
        b.keys.truncate(count * kl);
        b.values.truncate(count * vl);
        if tx.send(Ok(b)).is_err() || stop {
            return Ok(());
        }
        cursor = Some(next.to_ne_bytes());
    }
}

/// How many of the first `count` entries of `b` lie before bucket `hi`.
fn trim_overlap(
    map: &Map,
    hi: u32,
    b: &Batch,
    count: usize,
    kl: usize,
    vl: usize,
) -> Result<usize> {
    if count == 0 {
        return Ok(0);
    }
    let mut keys = vec![0u8; count * kl];
    let mut values = vec![0u8; count * vl];
    let mut out = vec![0u8; kl.max(4)];
    let probe = map.lookup_batch(
        Some(&hi.to_ne_bytes()),
        &mut out,
        &mut keys,
        &mut values,
        count as u32,
    );
    let first = match probe {
        Ok(r) if r.count > 0 => &keys[..kl],
        Ok(_) => return Ok(count),
        // The next range's first bucket is bigger than our whole batch: it is not in it.
        Err(e) if e.errno() == Some(libc::ENOSPC) => return Ok(count),
        Err(e) => return Err(e.into()),
    };
    Ok(b.keys[..count * kl]
        .chunks_exact(kl)
        .position(|k| k == first)
        .unwrap_or(count))
}

/// Walks array indexes `[lo, hi)`.
#[allow(clippy::too_many_arguments)]
fn read_indexes(
    map: &Map,
    lo: u32,
    hi: u32,
    kl: usize,
    vl: usize,
    batch: usize,
    pool: &Pool,
    tx: &SyncSender<Result<Batch>>,
) -> Result<()> {
    let mut pos = lo;
    let mut out = vec![0u8; kl.max(4)];
    // The generic batch walk starts after the cursor key.
    let mut cursor: Option<[u8; 4]> = (lo > 0).then(|| (lo - 1).to_ne_bytes());
    while pos < hi {
        let want = (hi - pos).min(batch as u32);
        let mut b = take(pool, want as usize, kl, vl);
        let r = map.lookup_batch(
            cursor.as_ref().map(|c| c.as_slice()),
            &mut out,
            &mut b.keys,
            &mut b.values,
            want,
        )?;
        b.count = r.count as usize;
        b.keys.truncate(b.count * kl);
        b.values.truncate(b.count * vl);
        pos += r.count;
        let done = r.done || r.count == 0;
        if tx.send(Ok(b)).is_err() || done {
            return Ok(());
        }
        cursor = Some((pos - 1).to_ne_bytes());
    }
    Ok(())
}
