//! Conversion of whole maps during a restore: the settings a caller gives
//! ([`RestoreConversion`], in [`crate::restore::RestoreOptions::convert`]) and the per-map
//! key and value plans ([`MapConversion`]) that turn each snapshot chunk into the target's
//! layout.

use std::collections::HashSet;
use std::fmt;

use super::{ConvertError, KeyCollisions, Options, Outcome, Plan, RebaseClocks, Result};
use crate::clocks::{ClockSample, RebaseMode};
use crate::format::EntryChunk;
use crate::model::{Access, MapMeta, access_of};

/// How a restore converts entries and rebases timestamps.
///
/// Set [`crate::restore::RestoreOptions::convert`] to enable it; `None` restores entries
/// byte for byte, as before. With it:
///
/// - members tagged `btf_decl_tag("mapsnap:clock=...")` in the snapshot's BTF, and the
///   members named with [`add_rebase`](Self::add_rebase), are rebased from the clocks the
///   snapshot recorded at dump time to this host's clocks (with [`mode`](Self::mode));
/// - with [`convert`](Self::convert), the existing maps a restore fills
///   ([`crate::restore::Destination::Into`], [`crate::restore::Destination::IntoRoot`]) may
///   have other key and value types than the snapshot's: entries are converted member by
///   member by name from the snapshot's BTF to the target map's BTF.
///
/// Member paths are dotted names from the value root (`peer.addr`); a `key.` prefix names
/// a key member, a `value.` prefix is optional. An option applies to every map that has
/// the member; one that matches no member of any restored map refuses the restore.
///
/// ```no_run
/// use mapsnap::convert::RestoreConversion;
/// use mapsnap::restore::{Destination, RestoreOptions, restore};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // What the hook reads from the `mapsnap.io/rebase` annotation (or the operator from
/// // its CRD): `value.expires=monotonic_ns,value.last_seen=boottime_s`, and a mode.
/// let mut conv = RestoreConversion::default();
/// for spec in "value.expires=monotonic_ns,value.last_seen=boottime_s".split(',') {
///     conv.add_rebase(spec)?;
/// }
/// conv.mode = "elapsed".parse()?;
/// let opts = RestoreOptions { convert: Some(conv), ..RestoreOptions::default() };
/// let file = std::fs::File::open("app.mapsnap")?;
/// let dest = Destination::PinRoot { dir: "/sys/fs/bpf/app".into(), overwrite: false };
/// restore(file, None, &dest, &opts, &mapsnap::progress::NoProgress)?;
/// # Ok(())
/// # }
/// ```
///
/// Into existing maps, a plan that cannot be made (a type change mapsnap cannot convert, an
/// option that matches nothing, a map without BTF) refuses before the first write. A value
/// that does not fit its narrower type, or two old keys that become one, is found while
/// converting: run [`crate::restore::check_conversion`] over the same bytes first (it
/// writes nothing and returns the plans to show), as `mapsnap restore --convert` does, to
/// refuse those before the first write too.
#[derive(Debug, Clone, Default)]
pub struct RestoreConversion {
    /// Target maps may have other key/value types (`--convert`). Without it, only
    /// timestamps are rebased and the target's layout must equal the snapshot's.
    pub convert: bool,
    /// Options for keys (paths given with the `key.` prefix, stored without it).
    pub key: Options,
    /// Options for values.
    pub value: Options,
    /// Whether the time between dump and restore counts (`--rebase-mode`).
    pub mode: RebaseMode,
    /// This host's clocks; `None` reads them when the restore starts.
    pub now: Option<ClockSample>,
}

impl RestoreConversion {
    /// Clamp instead of failing, drop shorter arrays' tails (`--lossy`).
    pub fn set_lossy(&mut self, lossy: bool) {
        self.key.lossy = lossy;
        self.value.lossy = lossy;
    }

    /// `[key.|value.]member.path=VALUE` (`--default`).
    pub fn add_default(&mut self, arg: &str) -> Result<()> {
        let (key, rest) = split_side(arg);
        self.side(key).add_default(rest)
    }

    /// `[key.|value.]old.path=[key.|value.]new.path` (`--rename`).
    pub fn add_rename(&mut self, arg: &str) -> Result<()> {
        let (key, rest) = split_side(arg);
        let rest = match rest.split_once('=') {
            Some((old, new)) => {
                let new = new.trim();
                let prefixed = new.starts_with("key.") || new.starts_with("value.");
                let (new_key, stripped) = split_side(new);
                if prefixed && new_key != key {
                    return Err(ConvertError::BadOption {
                        option: arg.to_string(),
                        reason: "a rename stays within the key or within the value".into(),
                    });
                }
                format!("{old}={stripped}")
            }
            None => rest.to_string(),
        };
        self.side(key).add_rename(&rest)
    }

    /// `[key.|value.]member.path=CLOCK_UNIT` (`--rebase`, e.g. `expires=monotonic_ns`).
    pub fn add_rebase(&mut self, arg: &str) -> Result<()> {
        let (key, rest) = split_side(arg);
        self.side(key).add_rebase(rest)
    }

    fn side(&mut self, key: bool) -> &mut Options {
        if key { &mut self.key } else { &mut self.value }
    }

    /// Every option given, as `(is_key, shown, path)`, for the check that each matched a
    /// member somewhere.
    fn all_options(&self) -> Vec<(bool, String, String)> {
        let mut out = Vec::new();
        for (key, o) in [(true, &self.key), (false, &self.value)] {
            for (p, v) in &o.defaults {
                out.push((key, format!("{p}={v}"), p.clone()));
            }
            for (p, v) in &o.renames {
                out.push((key, format!("{p}={v}"), p.clone()));
            }
            for (p, v) in &o.rebase {
                out.push((key, format!("{p}={v}"), p.clone()));
            }
        }
        out.sort();
        out
    }

    /// Refuses options that matched no member in any of the planned maps.
    pub fn check_used<'a>(&self, maps: impl IntoIterator<Item = &'a MapConversion>) -> Result<()> {
        let mut used: HashSet<(bool, String)> = HashSet::new();
        for m in maps {
            for (key, plan) in [(true, &m.key), (false, &m.value)] {
                if let Some(p) = plan {
                    used.extend(p.used_options().into_iter().map(|o| (key, o)));
                }
            }
        }
        for (key, option, path) in self.all_options() {
            if !used.contains(&(key, path.clone())) {
                let side = if key { "key" } else { "value" };
                return Err(ConvertError::BadOption {
                    option: if key { format!("key.{option}") } else { option },
                    reason: format!(
                        "no {side} member {path} of any restored map can take it (check the \
                         path against the plan)"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// `key.x` -> (true, "x"); `value.x` and `x` -> (false, "x").
fn split_side(arg: &str) -> (bool, &str) {
    let arg = arg.trim();
    if let Some(rest) = arg.strip_prefix("key.") {
        (true, rest)
    } else {
        (false, arg.strip_prefix("value.").unwrap_or(arg))
    }
}

/// The BTF of one side of a conversion: a blob and the key and value type ids in it.
#[derive(Debug, Clone, Copy)]
pub struct MapTypes<'a> {
    /// Raw BTF (a snapshot's BTF section, a map's BTF from the kernel, an object's `.BTF`).
    pub btf: &'a [u8],
    /// 0 when the map has no key type (queues, stacks, maps created without one).
    pub key_type_id: u32,
    pub value_type_id: u32,
}

/// The plans that convert one map's entries.
#[derive(Debug, Clone)]
pub struct MapConversion {
    /// `None`: keys are copied as they are (same layout, or a map without keys).
    pub key: Option<Plan>,
    /// `None`: values are copied as they are.
    pub value: Option<Plan>,
    /// Key and value bytes of one snapshot entry, and of one converted entry.
    old_kl: usize,
    old_vl: usize,
    new_kl: usize,
    new_vl: usize,
    new_key_size: u32,
    new_value_size: u32,
    /// Possible CPUs of per-CPU values (the snapshot's count).
    cpus: Option<usize>,
    collisions: KeyCollisions,
    /// What converting did so far.
    pub outcome: Outcome,
}

impl MapConversion {
    /// Plans the conversion of the snapshot map `meta` (types `from`) into a map of types
    /// `to` (`None`: the snapshot's own types, so only timestamps are rebased). Returns
    /// `None` when entries are copied unchanged. `strict` refuses options that match no
    /// member of this map (when it is the only map converted).
    pub fn plan(
        meta: &MapMeta,
        from: Option<MapTypes<'_>>,
        to: Option<MapTypes<'_>>,
        conv: &RestoreConversion,
        clocks: Option<RebaseClocks>,
        strict: bool,
    ) -> Result<Option<Self>> {
        let access = access_of(meta.map_type).unwrap_or(Access::Keyed);
        let what = || format!("map {:?}", meta.name);
        if access == Access::MapOfMaps {
            // Values are inner maps: there is nothing to convert in them.
            return Ok(None);
        }
        let Some(from) = from else {
            if conv.convert && to.is_some() {
                return Err(ConvertError::NoBtf {
                    what: format!("{} in the snapshot", what()),
                });
            }
            // No BTF: nothing can be tagged, and options are checked across maps.
            return Ok(None);
        };
        let to = match to {
            Some(t) => t,
            None => from,
        };
        let from_graph = super::BtfGraph::parse(from.btf)?;
        let same_btf = std::ptr::eq(from.btf, to.btf);
        let to_graph_own;
        let to_graph = if same_btf {
            &from_graph
        } else {
            to_graph_own = super::BtfGraph::parse(to.btf)?;
            &to_graph_own
        };
        let opts_for = |o: &Options| {
            let mut o = o.clone();
            o.clocks = clocks;
            o.unused_ok = !strict;
            o
        };
        let value_opts = opts_for(&conv.value);
        let key_opts = opts_for(&conv.key);
        if (!conv.value.rebase.is_empty() || !conv.key.rebase.is_empty()) && clocks.is_none() {
            return Err(ConvertError::BadOption {
                option: "--rebase".into(),
                reason: "the snapshot records no clocks (it was written before mapsnap \
                         recorded them): its timestamps cannot be rebased"
                    .into(),
            });
        }
        let need = |id: u32, side: &str| {
            if id == 0 {
                Err(ConvertError::NoBtf {
                    what: format!("the {side} type of {}", what()),
                })
            } else {
                Ok(id)
            }
        };
        let value = Plan::new(
            &from_graph,
            need(from.value_type_id, "snapshot's value")?,
            to_graph,
            need(to.value_type_id, "target's value")?,
            &value_opts,
        )?;
        let has_key = meta.key_len() > 0;
        let key = match (has_key, from.key_type_id, to.key_type_id) {
            (false, _, _) => None,
            (true, 0, 0) => None,
            (true, f, t) => Some(Plan::new(
                &from_graph,
                need(f, "snapshot's key")?,
                to_graph,
                need(t, "target's key")?,
                &key_opts,
            )?),
        };
        let cpus = (access == Access::PerCpu).then(|| meta.possible_cpus.unwrap_or(1) as usize);
        let size = |p: &Option<Plan>, old: u32, f: fn(&Plan) -> usize| {
            p.as_ref().map_or(Ok(old), |p| {
                u32::try_from(f(p)).map_err(|_| ConvertError::Btf("type too large".into()))
            })
        };
        let new_key_size = size(&key, meta.key_size, Plan::dst_size)?;
        let new_value_size = size(&Some(value.clone()), meta.value_size, Plan::dst_size)?;
        let mut new_meta = meta.clone();
        new_meta.key_size = new_key_size;
        new_meta.value_size = new_value_size;
        let this = Self {
            old_kl: meta.key_len(),
            old_vl: meta.value_len(),
            new_kl: new_meta.key_len(),
            new_vl: new_meta.value_len(),
            new_key_size,
            new_value_size,
            cpus,
            key: key.filter(|p| !p.is_identity()),
            value: Some(value).filter(|p| !p.is_identity()),
            collisions: KeyCollisions::new(),
            outcome: Outcome::default(),
        };
        if this.key.is_none() && this.value.is_none() && this.old_vl == this.new_vl {
            return Ok(None);
        }
        Ok(Some(this))
    }

    /// The snapshot metadata with the converted key and value sizes (what the target map
    /// has), for the restore's compatibility checks and writes.
    pub fn target_meta(&self, meta: &MapMeta) -> MapMeta {
        let mut m = meta.clone();
        m.key_size = self.new_key_size;
        m.value_size = self.new_value_size;
        m
    }

    /// Converts one chunk of snapshot entries into the target layout. Fails on a value
    /// that does not fit (without lossy) and on two old keys that become one new key.
    pub fn convert_chunk(&mut self, chunk: &EntryChunk) -> Result<EntryChunk> {
        let n = chunk.count;
        let mut keys = vec![0u8; n * self.new_kl];
        let mut values = vec![0u8; n * self.new_vl];
        for i in 0..n {
            let (ok, ov) = (chunk.key(i), chunk.value(i));
            let nk = &mut keys[i * self.new_kl..(i + 1) * self.new_kl];
            match &self.key {
                Some(p) => self.outcome.add(p.apply(ok, nk)?),
                None => nk.copy_from_slice(&ok[..self.old_kl.min(self.new_kl)]),
            }
            if self.key.is_some() {
                self.collisions.check(ok, nk)?;
            }
            let nv = &mut values[i * self.new_vl..(i + 1) * self.new_vl];
            match (&self.value, self.cpus) {
                (Some(p), Some(cpus)) => self.outcome.add(p.apply_percpu(ov, nv, cpus)?),
                (Some(p), None) => self.outcome.add(p.apply(ov, nv)?),
                (None, _) => nv.copy_from_slice(&ov[..self.old_vl.min(self.new_vl)]),
            }
        }
        EntryChunk::new(self.new_kl, self.new_vl, n, keys, values)
            .map_err(|e| ConvertError::Btf(e.to_string()))
    }
}

impl fmt::Display for MapConversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(p) => write!(f, "key: {p}")?,
            None => writeln!(f, "key: copied as it is")?,
        }
        match &self.value {
            Some(p) => write!(f, "value: {p}"),
            None => writeln!(f, "value: copied as it is"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn options_split_by_key_and_value_prefix() {
        let mut c = RestoreConversion::default();
        c.add_default("key.ifindex=3").unwrap();
        c.add_default("value.zone=7").unwrap();
        c.add_default("flags=1").unwrap();
        c.add_rename("key.port=key.dport").unwrap();
        c.add_rename("rx_port=value.local_port").unwrap();
        c.add_rebase("expires=monotonic_ns").unwrap();
        assert_eq!(c.key.defaults["ifindex"], "3");
        assert_eq!(c.value.defaults["zone"], "7");
        assert_eq!(c.value.defaults["flags"], "1");
        assert_eq!(c.key.renames["port"], "dport");
        assert_eq!(c.value.renames["rx_port"], "local_port");
        assert!(c.value.rebase.contains_key("expires"));
        let err = c.add_rename("key.port=value.port").unwrap_err().to_string();
        assert!(err.contains("within the key or within the value"), "{err}");
        assert!(c.add_rebase("expires=monotonic").is_err());
        assert!(c.add_default("novalue").is_err());
    }

    #[test]
    fn unused_options_are_named_with_their_side() {
        let mut c = RestoreConversion::default();
        c.add_default("key.ifindex=3").unwrap();
        let err = c.check_used([]).unwrap_err().to_string();
        assert!(err.contains("key.ifindex=3"), "{err}");
        assert!(err.contains("no key member ifindex"), "{err}");
        assert!(RestoreConversion::default().check_used([]).is_ok());
    }
}
