//! Comparing map contents: snapshot against snapshot, or snapshot against live maps.
//!
//! Memory stays small whatever the map size: one side is held as 64-bit hashes of keys and
//! values (16 bytes an entry), the other is streamed against it, and the few entries shown as
//! examples are fetched by reading the sides again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use xxhash_rust::xxh3::xxh3_64;

use crate::discover::Found;
use crate::dump::{batch_entries, drain_queue, meta_of, read_entries, unsupported_reason};
use crate::error::Result;
use crate::format::{Event, SnapshotReader};
use crate::limits::Limits;
use crate::model::{Access, MapMeta, access_of};
use crate::sys::Map;

/// One side of a comparison, readable as many times as needed.
pub enum Side<'a> {
    /// Opens the snapshot stream afresh on each call.
    Snapshot(&'a dyn Fn() -> Result<Box<dyn Read>>),
    Live(&'a [Found]),
}

impl std::fmt::Debug for Side<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Side::Snapshot(_) => f.write_str("Side::Snapshot"),
            Side::Live(m) => write!(f, "Side::Live({} maps)", m.len()),
        }
    }
}

/// One entry shown as an example of a difference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntryDiff {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// Differences of one map (matched by pin path, else name).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapDiff {
    pub map: String,
    pub only_in_old: bool,
    pub only_in_new: bool,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    pub unchanged: u64,
    pub examples: Vec<EntryDiff>,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        !self.only_in_old && !self.only_in_new && self.added + self.removed + self.changed == 0
    }
}

/// Name a map is matched by across the two sides.
fn match_name(meta: &MapMeta) -> String {
    meta.pin_path.clone().unwrap_or_else(|| meta.name.clone())
}

/// Calls `visit(map, key, value)` for every entry of every top-level map of a side; values of
/// maps of maps are replaced by an order-independent hash of the inner map's contents so that
/// both sides compare by content. Queue and stack entries are keyed by position.
/// Receives `(map, key, value)` for every entry.
type Visit<'a> = dyn FnMut(&str, &[u8], &[u8]) + 'a;

fn scan(side: &Side<'_>, limits: &Limits, visit: &mut Visit<'_>) -> Result<Vec<String>> {
    let mut names = Vec::new();
    match side {
        Side::Snapshot(open) => {
            let mut reader = SnapshotReader::with_limits(open()?, limits)?;
            let mut content: HashMap<u32, u64> = HashMap::new();
            let mut current: Option<(u32, MapMeta, u64)> = None;
            while let Some(ev) = reader.next_event()? {
                match ev {
                    Event::MapBegin { index, meta } => {
                        if !meta.inner {
                            names.push(match_name(&meta));
                        }
                        current = Some((index, meta, 0));
                    }
                    Event::Entries(chunk) => {
                        let Some((index, meta, pos)) = current.as_mut() else {
                            continue;
                        };
                        let index = *index;
                        for (k, v) in chunk.iter() {
                            let key = entry_key(meta, k, pos);
                            if meta.inner {
                                continue;
                            }
                            if access_of(meta.map_type) == Ok(Access::MapOfMaps) {
                                let i = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                                let h = content.get(&i).copied().unwrap_or(0);
                                visit(&match_name(meta), &key, &h.to_le_bytes());
                            } else {
                                visit(&match_name(meta), &key, v);
                            }
                        }
                        if meta.inner {
                            let sum = content.entry(index).or_insert(0);
                            for (k, v) in chunk.iter() {
                                *sum = sum.wrapping_add(entry_hash(k, v));
                            }
                        }
                    }
                    Event::MapEnd { .. } => current = None,
                    _ => {}
                }
            }
        }
        Side::Live(maps) => {
            for f in maps.iter() {
                if unsupported_reason(&f.info).is_some() {
                    continue;
                }
                let meta = meta_of(&f.info, f.frozen, f.pin_rel.clone())?;
                let name = match_name(&meta);
                names.push(name.clone());
                scan_live(&f.map, &meta, &mut |k, v| visit(&name, k, v))?;
            }
        }
    }
    Ok(names)
}

/// The comparison key of an entry: its key, or its position for queues and stacks.
fn entry_key(meta: &MapMeta, k: &[u8], pos: &mut u64) -> Vec<u8> {
    let key = if meta.key_len() == 0 {
        pos.to_le_bytes().to_vec()
    } else {
        k.to_vec()
    };
    *pos += 1;
    key
}

fn entry_hash(k: &[u8], v: &[u8]) -> u64 {
    xxh3_64(k) ^ xxh3_64(v).rotate_left(17)
}

fn scan_live(map: &Map, meta: &MapMeta, visit: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
    let (kl, vl) = (meta.key_len(), meta.value_len());
    match access_of(meta.map_type) {
        Ok(Access::Queue) => {
            let values = drain_queue(map, meta)?;
            for (i, v) in values.chunks_exact(vl.max(1)).enumerate() {
                visit(&(i as u64).to_le_bytes(), v);
            }
        }
        Ok(Access::MapOfMaps) => {
            read_entries(map, kl, 4, 1024, &mut |n, k, v| {
                for i in 0..n {
                    let id =
                        u32::from_ne_bytes([v[i * 4], v[i * 4 + 1], v[i * 4 + 2], v[i * 4 + 3]]);
                    let inner = Map::from_id(id)?;
                    let info = inner.info()?;
                    let imeta = meta_of(&info, false, None)?;
                    let mut sum = 0u64;
                    read_entries(
                        &inner,
                        imeta.key_len(),
                        imeta.value_len(),
                        1024,
                        &mut |n, k, v| {
                            let (ikl, ivl) = (k.len() / n.max(1), v.len() / n.max(1));
                            for j in 0..n {
                                sum = sum.wrapping_add(entry_hash(
                                    &k[j * ikl..(j + 1) * ikl],
                                    &v[j * ivl..(j + 1) * ivl],
                                ));
                            }
                            Ok(())
                        },
                    )?;
                    visit(&k[i * kl..(i + 1) * kl], &sum.to_le_bytes());
                }
                Ok(())
            })?;
        }
        _ => {
            read_entries(
                map,
                kl,
                vl,
                batch_entries(1 << 20, kl + vl),
                &mut |n, k, v| {
                    for i in 0..n {
                        visit(&k[i * kl..(i + 1) * kl], &v[i * vl..(i + 1) * vl]);
                    }
                    Ok(())
                },
            )?;
        }
    }
    Ok(())
}

/// Compares `old` with `new`; at most `examples` entries per map are shown.
pub fn diff(old: &Side<'_>, new: &Side<'_>, examples: usize) -> Result<Vec<MapDiff>> {
    diff_with_limits(old, new, examples, &Limits::default())
}

/// [`diff`], reading snapshots within these limits.
pub fn diff_with_limits(
    old: &Side<'_>,
    new: &Side<'_>,
    examples: usize,
    limits: &Limits,
) -> Result<Vec<MapDiff>> {
    // Side `old` as hashes: map -> key hash -> value hash.
    let mut table: HashMap<String, HashMap<u64, u64>> = HashMap::new();
    let old_names = scan(old, limits, &mut |m, k, v| {
        table
            .entry(m.to_string())
            .or_default()
            .insert(xxh3_64(k), xxh3_64(v));
    })?;
    let mut out: BTreeMap<String, MapDiff> = BTreeMap::new();
    // Keys (by hash) whose old value should be shown, per map.
    let mut want_old: HashMap<String, HashSet<u64>> = HashMap::new();
    let new_names = scan(new, limits, &mut |m, k, v| {
        let d = out.entry(m.to_string()).or_insert_with(|| MapDiff {
            map: m.to_string(),
            ..Default::default()
        });
        let (hk, hv) = (xxh3_64(k), xxh3_64(v));
        match table.get_mut(m).and_then(|t| t.remove(&hk)) {
            Some(old_hv) if old_hv == hv => d.unchanged += 1,
            Some(_) => {
                d.changed += 1;
                if d.examples.len() < examples {
                    d.examples.push(EntryDiff {
                        key: hex::encode(k),
                        old: None,
                        new: Some(hex::encode(v)),
                    });
                    want_old.entry(m.to_string()).or_default().insert(hk);
                }
            }
            None => {
                d.added += 1;
                if d.examples.len() < examples {
                    d.examples.push(EntryDiff {
                        key: hex::encode(k),
                        old: None,
                        new: Some(hex::encode(v)),
                    });
                }
            }
        }
    })?;
    let old_set: HashSet<&String> = old_names.iter().collect();
    let new_set: HashSet<&String> = new_names.iter().collect();
    for name in &new_names {
        let d = out.entry(name.clone()).or_insert_with(|| MapDiff {
            map: name.clone(),
            ..Default::default()
        });
        d.only_in_new = !old_set.contains(name);
    }
    for name in &old_names {
        let left = table.get(name).map_or(0, |t| t.len() as u64);
        let d = out.entry(name.clone()).or_insert_with(|| MapDiff {
            map: name.clone(),
            ..Default::default()
        });
        d.only_in_old = !new_set.contains(name);
        d.removed = left;
        if left > 0 {
            let room = examples.saturating_sub(d.examples.len());
            let set = want_old.entry(name.clone()).or_default();
            if let Some(t) = table.get(name) {
                set.extend(t.keys().take(room));
            }
        }
    }
    // Fetch the old values (and removed keys) of the examples by reading `old` again.
    if want_old.values().any(|s| !s.is_empty()) {
        scan(old, limits, &mut |m, k, v| {
            let hk = xxh3_64(k);
            let Some(set) = want_old.get(m) else { return };
            if !set.contains(&hk) {
                return;
            }
            let Some(d) = out.get_mut(m) else { return };
            let key = hex::encode(k);
            match d.examples.iter_mut().find(|e| e.key == key) {
                Some(e) => e.old = Some(hex::encode(v)),
                None => d.examples.push(EntryDiff {
                    key,
                    old: Some(hex::encode(v)),
                    new: None,
                }),
            }
        })?;
    }
    Ok(out.into_values().collect())
}
