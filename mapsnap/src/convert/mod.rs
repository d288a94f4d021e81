//! Convert map keys and values from one BTF type to another, member by member by name,
//! and rebase timestamps to another host's clocks.
//!
//! A [`Plan`] is built once per map from the two BTF graphs ([`BtfGraph`]) and the two
//! type ids (the snapshot's key or value type and the target map's); it refuses up front
//! what cannot be converted, naming the member path and why. [`Plan::apply`] then converts
//! one entry without allocating. The rules are in docs/CONVERT.md; in short:
//! - struct members match by name, recursively (renames by [`Options::renames`]);
//! - integers widen (sign- or zero-extended by the source's encoding) and narrow when the
//!   value fits (else an error at apply time, or a clamped value counted in
//!   [`Outcome::lossy`] with [`Options::lossy`]);
//! - enums map by enumerator name; arrays element-wise (longer pads with zeros, shorter
//!   needs `lossy`); unions only with an unchanged layout;
//! - new members are zero or [`Options::defaults`]; removed members are dropped and listed;
//! - `bpf_spin_lock`, `bpf_timer` and other kernel-managed fields stay zero;
//! - members tagged `btf_decl_tag("mapsnap:clock=...")` (or named in [`Options::rebase`])
//!   are rebased with [`crate::clocks`] when the plan has clock samples.

mod apply;
mod graph;
mod maps;
mod plan;
mod snapshot;

use std::collections::HashMap;

pub use apply::percpu_stride;
pub use graph::BtfGraph;
pub use maps::{MapConversion, MapTypes, RestoreConversion};
pub use plan::{Plan, Row};
pub use snapshot::{ConvertedMap, TargetBtf, convert_snapshot};

use crate::{
    btf_fmt::BtfFmtError,
    clocks::{ClockError, ClockSample, RebaseMode, RebaseSpec},
};

/// Errors from planning or applying a conversion.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The map (or object) has no BTF to convert by.
    #[error("{what} has no BTF: conversion needs the key and value types of both maps")]
    NoBtf { what: String },
    /// The BTF could not be parsed or is inconsistent.
    #[error("BTF: {0}")]
    Btf(String),
    /// No type with this name in the BTF.
    #[error("no struct, union, enum or typedef named {name:?} in the BTF")]
    NoSuchType { name: String },
    /// The conversion cannot be done (found while planning, before any write).
    #[error("cannot convert {path}: {reason}")]
    Refused { path: String, reason: String },
    /// A `--default`, `--rename` or `--rebase` option is malformed or matches nothing.
    #[error("option {option:?}: {reason}")]
    BadOption { option: String, reason: String },
    /// A value does not fit its new type (and the plan is not lossy).
    #[error("{path}: value {value} does not fit {target}")]
    DoesNotFit {
        path: String,
        value: String,
        target: String,
    },
    /// An enum value has no enumerator of the same name in the new type.
    #[error("{path}: enum value {value} {reason}")]
    EnumValue {
        path: String,
        value: String,
        reason: String,
    },
    /// A timestamp cannot be rebased (a clock sample lacks jiffies or HZ).
    #[error("{path}: cannot rebase {spec}: {reason}")]
    Rebase {
        path: String,
        spec: String,
        reason: String,
    },
    /// The entry buffer is shorter than the type.
    #[error("{what} buffer has {got} bytes, the conversion needs {need}")]
    ShortBuffer {
        what: &'static str,
        need: usize,
        got: usize,
    },
    /// Two different old keys become the same new key.
    #[error("old keys {first} and {second} both convert to key {new_key}")]
    KeyCollision {
        first: String,
        second: String,
        new_key: String,
    },
    /// The types expand to more conversion steps than allowed.
    #[error("conversion of {path} needs more than {max} steps")]
    TooComplex { path: String, max: usize },
}

impl From<BtfFmtError> for ConvertError {
    fn from(e: BtfFmtError) -> Self {
        ConvertError::Btf(e.to_string())
    }
}

impl From<ClockError> for ConvertError {
    fn from(e: ClockError) -> Self {
        ConvertError::BadOption {
            option: String::new(),
            reason: e.to_string(),
        }
    }
}

/// Result of this module.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

/// Clock samples for rebasing: the source host's at dump time, this host's now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebaseClocks {
    /// Taken at dump time (stored in the snapshot).
    pub from: ClockSample,
    /// Taken on the restoring host just before the restore.
    pub to: ClockSample,
    /// Whether the time in transit counts.
    pub mode: RebaseMode,
}

/// How to convert. Paths are dotted member paths from the key or value root (`a.b.c`;
/// array elements `arr[]`); one `Options` per plan (keys and values separately).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Narrowing that does not fit clamps (and counts) instead of failing; shorter arrays
    /// drop their tail (counted when it was not zero); unknown enum values become 0.
    pub lossy: bool,
    /// Values for members that are new in the target type: new path -> value (integer,
    /// `0x` hex, `true`/`false`, or an enumerator name).
    pub defaults: HashMap<String, String>,
    /// Renamed members: old path (old names) -> new path (new names). The member stays in
    /// the struct that corresponds to its old parent.
    pub renames: HashMap<String, String>,
    /// Timestamp members by new path: overrides decl tags on both sides.
    pub rebase: HashMap<String, RebaseSpec>,
    /// Clock samples; without them tagged members are copied unchanged (the plan says so).
    pub clocks: Option<RebaseClocks>,
    /// Do not refuse defaults, renames and rebase paths that match no member: the caller
    /// plans several maps with the same options and checks them across all
    /// ([`RestoreConversion::check_used`] with [`Plan::used_options`]).
    pub unused_ok: bool,
}

impl Options {
    /// Add `member.path=VALUE` (the `--default` syntax).
    pub fn add_default(&mut self, arg: &str) -> Result<()> {
        let (path, value) = split_option(arg, "member.path=VALUE")?;
        self.defaults.insert(path, value);
        Ok(())
    }

    /// Add `old.path=new.path` (the `--rename` syntax).
    pub fn add_rename(&mut self, arg: &str) -> Result<()> {
        let (old, new) = split_option(arg, "old.path=new.path")?;
        self.renames.insert(old, new);
        Ok(())
    }

    /// Add `member.path=CLOCK_UNIT` (the `--rebase` syntax, e.g. `expires=boottime_s`).
    pub fn add_rebase(&mut self, arg: &str) -> Result<()> {
        let (path, spec) = split_option(arg, "member.path=CLOCK_UNIT")?;
        let spec = spec
            .parse()
            .map_err(|e: ClockError| ConvertError::BadOption {
                option: arg.to_string(),
                reason: e.to_string(),
            })?;
        self.rebase.insert(path, spec);
        Ok(())
    }
}

fn split_option(arg: &str, syntax: &str) -> Result<(String, String)> {
    match arg.split_once('=') {
        Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => {
            Ok((a.trim().to_string(), b.trim().to_string()))
        }
        _ => Err(ConvertError::BadOption {
            option: arg.to_string(),
            reason: format!("expected {syntax}"),
        }),
    }
}

/// What one [`Plan::apply`] call did beyond a plain conversion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Values clamped, dropped array tails that were not zero, unknown enum values zeroed
    /// (only with [`Options::lossy`]).
    pub lossy: u64,
    /// Timestamps moved to the new clocks.
    pub rebased: u64,
}

impl Outcome {
    /// Sum of two outcomes (for totals over a map).
    pub fn add(&mut self, other: Outcome) {
        self.lossy += other.lossy;
        self.rebased += other.rebased;
    }
}

/// Finds two old keys that convert to the same new key. Feed every (old, new) pair.
#[derive(Debug, Clone, Default)]
pub struct KeyCollisions {
    seen: HashMap<Vec<u8>, Vec<u8>>,
}

impl KeyCollisions {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that `old` converts to `new`; an error names both old keys (hex) when
    /// another old key already converted to `new`.
    pub fn check(&mut self, old: &[u8], new: &[u8]) -> Result<()> {
        match self.seen.get(new) {
            Some(first) if first.as_slice() != old => Err(ConvertError::KeyCollision {
                first: hex::encode(first),
                second: hex::encode(old),
                new_key: hex::encode(new),
            }),
            Some(_) => Ok(()),
            None => {
                self.seen.insert(new.to_vec(), old.to_vec());
                Ok(())
            }
        }
    }
}

/// The `.BTF` section of an ELF object file (a clang-compiled BPF object), so that a
/// target type can come from an object that is not loaded yet.
pub fn btf_from_elf(elf: &[u8]) -> Result<&[u8]> {
    let bad = |reason: &str| ConvertError::Btf(format!("ELF object: {reason}"));
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(bad("no ELF magic"));
    }
    if elf.get(4) != Some(&2) {
        return Err(bad("not a 64-bit ELF file"));
    }
    let be = match elf.get(5) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(bad("unknown byte order")),
    };
    let num = |off: usize, len: usize| -> Option<u64> {
        let b = elf.get(off..off.checked_add(len)?)?;
        let fold = |acc: u64, x: &u8| (acc << 8) | u64::from(*x);
        Some(if be {
            b.iter().fold(0, fold)
        } else {
            b.iter().rev().fold(0, fold)
        })
    };
    let header = || -> Option<(usize, usize, usize, usize)> {
        Some((
            usize::try_from(num(0x28, 8)?).ok()?,
            usize::try_from(num(0x3a, 2)?).ok()?,
            usize::try_from(num(0x3c, 2)?).ok()?,
            usize::try_from(num(0x3e, 2)?).ok()?,
        ))
    };
    let (shoff, shentsize, shnum, shstrndx) = header().ok_or_else(|| bad("truncated header"))?;
    let section = |i: usize| -> Option<(u64, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            num(base, 4)?,
            usize::try_from(num(base + 0x18, 8)?).ok()?,
            usize::try_from(num(base + 0x20, 8)?).ok()?,
        ))
    };
    let (_, str_off, str_len) = section(shstrndx).ok_or_else(|| bad("bad section headers"))?;
    let names = elf
        .get(str_off..str_off.saturating_add(str_len))
        .ok_or_else(|| bad("section names past the end"))?;
    for i in 0..shnum {
        let (name, off, len) = section(i).ok_or_else(|| bad("bad section headers"))?;
        let name = usize::try_from(name).unwrap_or(usize::MAX);
        let is_btf = names
            .get(name..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .is_some_and(|n| n == b".BTF");
        if is_btf {
            return elf
                .get(off..off.saturating_add(len))
                .ok_or_else(|| bad(".BTF section past the end"));
        }
    }
    Err(ConvertError::NoBtf {
        what: "the ELF object (no .BTF section: compile with clang -g)".to_string(),
    })
}
