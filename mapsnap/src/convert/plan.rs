//! Building a [`Plan`]: walk the old and the new type side by side and flatten what has to
//! happen into a list of byte- and bit-level steps, plus a table for humans.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use btf_rs::Type;

use super::{
    ConvertError, Options, RebaseClocks, Result,
    graph::{BtfGraph, MAX_DEPTH, Resolved, chained},
};
use crate::clocks::{DECL_TAG_PREFIX, RebaseSpec};

/// Most steps one plan may have: a bound on what corrupt or absurd BTF can cost.
const MAX_OPS: usize = 1 << 20;

/// A bit range inside an entry (whole integers are byte-aligned multiples of 8 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field {
    pub bit: u64,
    pub bits: u32,
}

impl Field {
    pub(crate) fn byte_aligned(&self) -> bool {
        self.bit.is_multiple_of(8) && self.bits.is_multiple_of(8)
    }
}

/// One conversion step. The destination starts zeroed, so new members, padding and
/// kernel-managed fields need no step.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// Same bytes on both sides.
    Copy { src: usize, dst: usize, len: usize },
    /// An integer (or enum read as a number, or a bitfield) to another width/sign.
    Int {
        src: Field,
        dst: Field,
        src_signed: bool,
        dst_signed: bool,
        path: u32,
        /// (old meaning, new meaning) of a timestamp.
        rebase: Option<(RebaseSpec, RebaseSpec)>,
    },
    /// An enum mapped by enumerator name: `enum_pairs[start..start + len]`.
    Enum {
        src: Field,
        dst: Field,
        start: u32,
        len: u32,
        path: u32,
    },
    /// A float to another width (4 <-> 8 bytes) or byte order.
    Float {
        src: usize,
        dst: usize,
        src_size: u8,
        dst_size: u8,
        path: u32,
    },
    /// A default value for a new member.
    Set { dst: Field, value: u128 },
    /// Lossy: old bytes that are dropped (a shorter array's tail); counted when non-zero.
    DropCheck { src: usize, len: usize },
}

/// One line of the plan table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Member path in the new type (`-` for a removed member).
    pub new_path: String,
    /// Member path in the old type (`-` for a new member).
    pub old_path: String,
    /// What happens, in words.
    pub action: String,
}

/// A conversion from one BTF type to another, checked and flattened.
///
/// Build it with [`Plan::new`], show it with `Display` (the `--dry-run` table), run it
/// with [`Plan::apply`] / [`Plan::apply_percpu`].
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) src_name: String,
    pub(crate) dst_name: String,
    pub(crate) src_size: usize,
    pub(crate) dst_size: usize,
    pub(crate) src_be: bool,
    pub(crate) dst_be: bool,
    pub(crate) ops: Vec<Op>,
    pub(crate) enum_pairs: Vec<(u128, u128)>,
    pub(crate) paths: Vec<String>,
    pub(crate) rows: Vec<Row>,
    pub(crate) removed: Vec<String>,
    pub(crate) lossy: bool,
    pub(crate) clocks: Option<RebaseClocks>,
    pub(crate) rebase_members: Vec<String>,
    /// Members added, removed or left to the kernel: not a plain copy even when every
    /// step copies in place.
    pub(crate) changed: bool,
    /// Option paths (default: new path, rename: old path, rebase: path) that matched.
    pub(crate) used: Vec<String>,
}

impl Plan {
    /// Plan the conversion of values of `from_id` (in `from`) into values of `to_id` (in
    /// `to`). Refuses, naming the member path, anything that cannot be converted, and any
    /// option (default, rename, rebase) that matches no member.
    pub fn new(
        from: &BtfGraph,
        from_id: u32,
        to: &BtfGraph,
        to_id: u32,
        opts: &Options,
    ) -> Result<Self> {
        let mut p = Planner {
            from,
            to,
            opts,
            renamed_from: opts
                .renames
                .iter()
                .map(|(old, new)| (new.clone(), old.clone()))
                .collect(),
            ops: Vec::new(),
            enum_pairs: Vec::new(),
            paths: Vec::new(),
            rows: Vec::new(),
            removed: Vec::new(),
            used_defaults: HashSet::new(),
            used_renames: HashSet::new(),
            used_rebase: HashSet::new(),
            rebase_members: Vec::new(),
            show: true,
            changed: false,
        };
        let root = |id| Side {
            id,
            bit: 0,
            bitfield: None,
            path: String::new(),
            tag: None,
        };
        p.node(&root(from_id), &root(to_id), 0)?;
        if !opts.unused_ok {
            p.check_unused()?;
        }
        let mut used: Vec<String> = p
            .used_defaults
            .iter()
            .chain(&p.used_renames)
            .chain(&p.used_rebase)
            .cloned()
            .collect();
        used.sort();
        used.dedup();
        let src_be = from.big_endian();
        let dst_be = to.big_endian();
        let ops = merge(p.ops, src_be == dst_be);
        Ok(Plan {
            src_name: from.type_name(from_id),
            dst_name: to.type_name(to_id),
            src_size: from.size_of(from_id)?,
            dst_size: to.size_of(to_id)?,
            src_be,
            dst_be,
            ops,
            enum_pairs: p.enum_pairs,
            paths: p.paths,
            rows: p.rows,
            removed: p.removed,
            lossy: opts.lossy,
            clocks: opts.clocks,
            rebase_members: p.rebase_members,
            changed: p.changed,
            used,
        })
    }

    /// Bytes an old entry has.
    pub fn src_size(&self) -> usize {
        self.src_size
    }

    /// Bytes a new entry has.
    pub fn dst_size(&self) -> usize {
        self.dst_size
    }

    /// The table rows (what `Display` prints).
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Old member paths that have no place in the new type.
    pub fn removed(&self) -> &[String] {
        &self.removed
    }

    /// New member paths that hold rebased timestamps.
    pub fn rebase_members(&self) -> &[String] {
        &self.rebase_members
    }

    /// True when the layouts are the same: every member keeps its bytes at the same
    /// offset, nothing is added, removed, left to the kernel or rebased. Entries can then
    /// be copied as they are (only padding would differ: `apply` zeroes it).
    pub fn is_identity(&self) -> bool {
        self.src_size == self.dst_size
            && !self.changed
            && self
                .ops
                .iter()
                .all(|op| matches!(op, Op::Copy { src, dst, .. } if src == dst))
            && (self.clocks.is_none() || self.rebase_members.is_empty())
    }

    /// Paths of the options that matched a member (a default's new path, a rename's old
    /// path, a rebase path).
    pub fn used_options(&self) -> Vec<String> {
        self.used.clone()
    }

    /// Set (or replace) the clock samples used for rebasing.
    pub fn set_clocks(&mut self, clocks: Option<RebaseClocks>) {
        self.clocks = clocks;
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({} bytes) -> {} ({} bytes){}",
            self.src_name,
            self.src_size,
            self.dst_name,
            self.dst_size,
            if self.lossy { ", lossy" } else { "" }
        )?;
        let width =
            |col: fn(&Row) -> &str| self.rows.iter().map(|r| col(r).len()).fold(3, usize::max);
        let w_new = width(|r| &r.new_path);
        let w_old = width(|r| &r.old_path);
        writeln!(f, "  {:w_new$}  {:w_old$}  ACTION", "NEW", "OLD")?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:w_new$}  {:w_old$}  {}",
                r.new_path, r.old_path, r.action
            )?;
        }
        Ok(())
    }
}

/// One side of a member pair being planned.
struct Side {
    id: u32,
    /// Absolute bit offset in the entry.
    bit: u64,
    bitfield: Option<u32>,
    path: String,
    /// Rebase tag from the member (or an enclosing array member).
    tag: Option<RebaseSpec>,
}

impl Side {
    fn byte(&self, what: &str) -> Result<usize> {
        if !self.bit.is_multiple_of(8) || self.bitfield.is_some() {
            return Err(refused(
                &self.path,
                format!("{what} at bit offset {} (not byte-aligned)", self.bit),
            ));
        }
        usize::try_from(self.bit / 8).map_err(|_| refused(&self.path, "offset too large"))
    }
}

/// A struct member with anonymous structs flattened into their parent.
struct Flat {
    name: String,
    id: u32,
    bit: u64,
    bitfield: Option<u32>,
    tag: Option<RebaseSpec>,
}

struct Planner<'a> {
    from: &'a BtfGraph,
    to: &'a BtfGraph,
    opts: &'a Options,
    /// new path -> old path
    renamed_from: HashMap<String, String>,
    ops: Vec<Op>,
    enum_pairs: Vec<(u128, u128)>,
    paths: Vec<String>,
    rows: Vec<Row>,
    removed: Vec<String>,
    used_defaults: HashSet<String>,
    used_renames: HashSet<String>,
    used_rebase: HashSet<String>,
    rebase_members: Vec<String>,
    /// Rows are recorded only for the first element of arrays.
    show: bool,
    changed: bool,
}

fn refused(path: &str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Refused {
        path: shown(path).to_string(),
        reason: reason.into(),
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() { "(root)" } else { path }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(p, _)| p)
}

fn mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

/// A scalar as the converter sees it.
struct Scalar {
    bits: u32,
    signed: bool,
    /// Enumerators (name, raw value masked to `bits`) for enums.
    names: Option<Vec<(String, u128)>>,
}

impl Planner<'_> {
    fn push(&mut self, op: Op, path: &str) -> Result<()> {
        if self.ops.len() >= MAX_OPS {
            return Err(ConvertError::TooComplex {
                path: shown(path).to_string(),
                max: MAX_OPS,
            });
        }
        self.ops.push(op);
        Ok(())
    }

    fn path_index(&mut self, path: &str) -> u32 {
        if self.paths.last().map(String::as_str) != Some(path) {
            self.paths.push(path.to_string());
        }
        u32::try_from(self.paths.len() - 1).unwrap_or(u32::MAX)
    }

    fn row(&mut self, new_path: &str, old_path: &str, action: impl Into<String>) {
        if self.show {
            self.rows.push(Row {
                new_path: shown(new_path).to_string(),
                old_path: shown(old_path).to_string(),
                action: action.into(),
            });
        }
    }

    /// Rebase tag of a typedef chain (`typedef __u64 mono_ns_t __attribute__((btf_decl_tag(..)))`).
    fn typedef_tag(g: &BtfGraph, r: &Resolved, path: &str) -> Result<Option<RebaseSpec>> {
        for &id in &r.typedefs {
            if let Some(spec) = tag_spec(g.tags(id, -1), path)? {
                return Ok(Some(spec));
            }
        }
        Ok(None)
    }

    fn node(&mut self, s: &Side, d: &Side, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(refused(&d.path, "types nest too deep (reference cycle?)"));
        }
        let sr = self.from.resolve(s.id)?;
        let dr = self.to.resolve(d.id)?;
        if let Some(what) = self.to.kernel_managed(&dr) {
            self.changed = true;
            self.row(
                &d.path,
                &s.path,
                format!("{what}: left zero for the kernel"),
            );
            return Ok(());
        }
        if let Some(what) = self.from.kernel_managed(&sr) {
            return Err(refused(
                &d.path,
                format!(
                    "was a {what} (kernel-managed), cannot become {}",
                    self.to.type_name(d.id)
                ),
            ));
        }
        let s_tag = s.tag.or(Self::typedef_tag(self.from, &sr, &s.path)?);
        let d_tag = d.tag.or(Self::typedef_tag(self.to, &dr, &d.path)?);
        match (&sr.ty, &dr.ty) {
            (
                Type::Int(_) | Type::Enum(_) | Type::Enum64(_),
                Type::Int(_) | Type::Enum(_) | Type::Enum64(_),
            ) => self.scalar(s, &sr, d, &dr, s_tag, d_tag),
            (Type::Float(a), Type::Float(b)) => {
                let (sb, db) = (s.byte("float")?, d.byte("float")?);
                let ok = |n| n == 4 || n == 8;
                if !ok(a.size()) || !ok(b.size()) {
                    return Err(refused(&d.path, "only 4- and 8-byte floats convert"));
                }
                let path = self.path_index(&d.path);
                self.push(
                    Op::Float {
                        src: sb,
                        dst: db,
                        src_size: a.size() as u8,
                        dst_size: b.size() as u8,
                        path,
                    },
                    &d.path,
                )?;
                let action = match a.size().cmp(&b.size()) {
                    std::cmp::Ordering::Equal => "copy".to_string(),
                    std::cmp::Ordering::Less => "widen float (exact)".to_string(),
                    std::cmp::Ordering::Greater => {
                        "narrow double -> float (checked: must round-trip)".to_string()
                    }
                };
                self.row(&d.path, &s.path, action);
                Ok(())
            }
            (Type::Ptr(_), Type::Ptr(_)) => {
                let int = |side: &Side| Field {
                    bit: side.bit,
                    bits: 64,
                };
                s.byte("pointer")?;
                d.byte("pointer")?;
                let path = self.path_index(&d.path);
                self.push(
                    Op::Int {
                        src: int(s),
                        dst: int(d),
                        src_signed: false,
                        dst_signed: false,
                        path,
                        rebase: None,
                    },
                    &d.path,
                )?;
                self.row(&d.path, &s.path, "copy pointer (8 bytes)");
                Ok(())
            }
            (Type::Array(a), Type::Array(b)) => self.array(
                s,
                (chained(&sr.ty), a.len()),
                d,
                (chained(&dr.ty), b.len()),
                depth,
            ),
            (Type::Struct(_), Type::Struct(_)) => self.record(s, &sr, d, &dr, depth),
            (Type::Union(_), Type::Union(_)) => {
                if let Err(why) = self.same_layout(sr.id, dr.id, 0) {
                    return Err(refused(
                        &d.path,
                        format!("a union converts only when its layout is unchanged: {why}"),
                    ));
                }
                let (sb, db) = (s.byte("union")?, d.byte("union")?);
                let len = self.to.size_of(dr.id)?;
                self.push(
                    Op::Copy {
                        src: sb,
                        dst: db,
                        len,
                    },
                    &d.path,
                )?;
                self.row(&d.path, &s.path, "copy union (layout unchanged)");
                Ok(())
            }
            _ => Err(refused(
                &d.path,
                format!(
                    "{} ({}) cannot become {} ({})",
                    self.from.type_name(s.id),
                    sr.ty.name(),
                    self.to.type_name(d.id),
                    dr.ty.name()
                ),
            )),
        }
    }

    fn scalar_of(g: &BtfGraph, r: &Resolved, bitfield: Option<u32>) -> Scalar {
        let (size, signed, names) = match &r.ty {
            Type::Int(i) => (i.size(), i.is_signed() && !i.is_bool(), None),
            Type::Enum(e) => (
                e.size(),
                e.is_signed(),
                Some(
                    e.members
                        .iter()
                        .map(|m| (g.name(m), u128::from(m.val())))
                        .collect::<Vec<_>>(),
                ),
            ),
            Type::Enum64(e) => (
                e.size(),
                e.is_signed(),
                Some(
                    e.members
                        .iter()
                        .map(|m| (g.name(m), u128::from(m.val())))
                        .collect(),
                ),
            ),
            _ => (0, false, None),
        };
        let bits = bitfield
            .filter(|&b| b > 0)
            .unwrap_or((size as u32).saturating_mul(8));
        let names = names.map(|v: Vec<(String, u128)>| {
            v.into_iter()
                .map(|(n, val)| (n, val & mask(bits)))
                .collect()
        });
        Scalar {
            bits,
            signed,
            names,
        }
    }

    fn scalar(
        &mut self,
        s: &Side,
        sr: &Resolved,
        d: &Side,
        dr: &Resolved,
        s_tag: Option<RebaseSpec>,
        d_tag: Option<RebaseSpec>,
    ) -> Result<()> {
        let a = Self::scalar_of(self.from, sr, s.bitfield);
        let b = Self::scalar_of(self.to, dr, d.bitfield);
        if a.bits == 0 || a.bits > 128 || b.bits == 0 || b.bits > 128 {
            return Err(refused(&d.path, "integers of 1 to 128 bits only"));
        }
        let src = Field {
            bit: s.bit,
            bits: a.bits,
        };
        let dst = Field {
            bit: d.bit,
            bits: b.bits,
        };
        let sname = bit_name(self.from.type_name(s.id), s.bitfield);
        let dname = bit_name(self.to.type_name(d.id), d.bitfield);
        let path = self.path_index(&d.path);
        // The same enumerators with the same numbers: a plain integer copy (which also
        // keeps values that name no enumerator).
        let same_enum = match (&a.names, &b.names) {
            (Some(sn), Some(dn)) => {
                let sorted = |v: &Vec<(String, u128)>| {
                    let mut v = v.clone();
                    v.sort();
                    v
                };
                a.bits == b.bits && a.signed == b.signed && sorted(sn) == sorted(dn)
            }
            _ => false,
        };
        if let (Some(sn), Some(dn), false) = (&a.names, &b.names, same_enum) {
            let start = u32::try_from(self.enum_pairs.len()).unwrap_or(u32::MAX);
            let mut missing = Vec::new();
            for (name, val) in sn {
                match dn.iter().find(|(n, _)| n == name) {
                    Some((_, new)) => self.enum_pairs.push((*val, *new)),
                    None => missing.push(name.clone()),
                }
            }
            // A zeroed member (never set) stays zero when 0 names no old enumerator.
            let zero_unnamed = !sn.iter().any(|(_, v)| *v == 0);
            if zero_unnamed {
                self.enum_pairs.push((0, 0));
            }
            let len = u32::try_from(self.enum_pairs.len()).unwrap_or(u32::MAX) - start;
            let names = len - u32::from(zero_unnamed);
            self.push(
                Op::Enum {
                    src,
                    dst,
                    start,
                    len,
                    path,
                },
                &d.path,
            )?;
            let mut action = format!("enum by name {sname} -> {dname} ({names} names)");
            if zero_unnamed {
                action.push_str("; 0 stays 0");
            }
            if !missing.is_empty() {
                action.push_str(&format!(
                    "; no counterpart for {} ({})",
                    missing.join(", "),
                    if self.opts.lossy {
                        "lossy: become 0"
                    } else {
                        "fails if present"
                    }
                ));
            }
            self.row(&d.path, &s.path, action);
            return Ok(());
        }
        let rebase = match self.opts.rebase.get(&d.path) {
            Some(spec) => {
                self.used_rebase.insert(d.path.clone());
                Some((*spec, *spec))
            }
            None => match (s_tag, d_tag) {
                (Some(x), Some(y)) => Some((x, y)),
                (Some(x), None) => Some((x, x)),
                (None, Some(y)) => Some((y, y)),
                (None, None) => None,
            },
        };
        if let (Some((x, y)), Some(c)) = (rebase, &self.opts.clocks) {
            // Refuse before the first write when a sample lacks what the spec needs.
            let probe = crate::clocks::rebase_between(1, x, y, &c.from, &c.to, c.mode, u64::MAX);
            if probe.is_none() {
                return Err(ConvertError::Rebase {
                    path: shown(&d.path).to_string(),
                    spec: if x == y {
                        x.to_string()
                    } else {
                        format!("{x} -> {y}")
                    },
                    reason: "a clock sample lacks jiffies or HZ (jiffies need root on both hosts)"
                        .to_string(),
                });
            }
        }
        if rebase.is_some() && self.show {
            self.rebase_members.push(shown(&d.path).to_string());
        }
        self.push(
            Op::Int {
                src,
                dst,
                src_signed: a.signed,
                dst_signed: b.signed,
                path,
                rebase,
            },
            &d.path,
        )?;
        let kind = if same_enum {
            " (same enum)"
        } else if a.names.is_some() || b.names.is_some() {
            " (enum as number)"
        } else {
            ""
        };
        let ext = if a.signed {
            "sign-extend"
        } else {
            "zero-extend"
        };
        let fits_always = if b.signed == a.signed {
            b.bits >= a.bits
        } else {
            b.signed && b.bits > a.bits
        };
        let mut action = if a.bits == b.bits && a.signed == b.signed {
            format!("copy {dname}{kind}")
        } else if fits_always {
            format!("widen {sname} -> {dname} ({ext}){kind}")
        } else if self.opts.lossy {
            format!("narrow {sname} -> {dname} (lossy: clamps values that do not fit){kind}")
        } else {
            format!("narrow {sname} -> {dname} (checked: fails if a value does not fit){kind}")
        };
        if let Some((x, y)) = rebase {
            let what = if x == y {
                x.to_string()
            } else {
                format!("{x} -> {y}")
            };
            match &self.opts.clocks {
                Some(c) => action.push_str(&format!("; rebase {what} ({})", c.mode.as_str())),
                None => action.push_str(&format!("; {what} timestamp, NOT rebased (no clocks)")),
            }
        }
        self.row(&d.path, &s.path, action);
        Ok(())
    }

    fn array(
        &mut self,
        s: &Side,
        (se, sn): (u32, usize),
        d: &Side,
        (de, dn): (u32, usize),
        depth: usize,
    ) -> Result<()> {
        let sb = s.byte("array")?;
        let db = d.byte("array")?;
        let ssz = self.from.size_of(se)?;
        let dsz = self.to.size_of(de)?;
        let n = sn.min(dn);
        let mut action = format!(
            "array {} -> {}",
            self.from.type_name(s.id),
            self.to.type_name(d.id)
        );
        if dn > sn {
            action.push_str(&format!(": {} new elements zero", dn - sn));
        } else if dn < sn {
            if !self.opts.lossy {
                return Err(refused(
                    &d.path,
                    format!("array shrinks from {sn} to {dn} elements (allowed only when lossy)"),
                ));
            }
            action.push_str(&format!(
                ": last {} elements dropped (lossy: counted when not zero)",
                sn - dn
            ));
        }
        self.row(&d.path, &s.path, action);
        // Scalar elements of one layout on both sides: one copy for the whole run.
        let plain = s.tag.is_none()
            && d.tag.is_none()
            && self.from.big_endian() == self.to.big_endian()
            && self.same_layout(se, de, 0).is_ok()
            && matches!(
                self.to.resolve(de)?.ty,
                Type::Int(_) | Type::Float(_) | Type::Ptr(_)
            );
        if plain {
            self.push(
                Op::Copy {
                    src: sb,
                    dst: db,
                    len: n * ssz,
                },
                &d.path,
            )?;
        } else {
            let s_path = format!("{}[]", s.path);
            let d_path = format!("{}[]", d.path);
            let show = self.show;
            for i in 0..n as u64 {
                self.show = show && i == 0;
                let side = |id, bit: u64, size: usize, path: &String, tag| Side {
                    id,
                    bit: bit + i * size as u64 * 8,
                    bitfield: None,
                    path: path.clone(),
                    tag,
                };
                let r = self.node(
                    &side(se, s.bit, ssz, &s_path, s.tag),
                    &side(de, d.bit, dsz, &d_path, d.tag),
                    depth + 1,
                );
                self.show = show;
                r?;
            }
        }
        if dn < sn {
            self.push(
                Op::DropCheck {
                    src: sb + n * ssz,
                    len: (sn - n) * ssz,
                },
                &d.path,
            )?;
        }
        Ok(())
    }

    fn flatten(
        &self,
        g: &BtfGraph,
        id: u32,
        base: u64,
        path: &str,
        out: &mut Vec<Flat>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(refused(path, "anonymous members nest too deep"));
        }
        let r = g.resolve(id)?;
        let (Type::Struct(st) | Type::Union(st)) = &r.ty else {
            return Ok(());
        };
        for (idx, m) in st.members.iter().enumerate() {
            let name = g.name(m);
            let mid = m.get_type_id_or_void();
            let bit = base + u64::from(m.bit_offset());
            if name.is_empty() {
                let inner = g.resolve(mid)?;
                if matches!(inner.ty, Type::Struct(_)) {
                    self.flatten(g, mid, bit, path, out, depth + 1)?;
                    continue;
                }
            }
            let name = if name.is_empty() {
                format!("(anon#{idx})")
            } else {
                name
            };
            let tag = tag_spec(g.tags(r.id, idx as i64), &join(path, &name))?;
            out.push(Flat {
                name,
                id: mid,
                bit,
                bitfield: m.bitfield_size().filter(|&b| b > 0),
                tag,
            });
        }
        Ok(())
    }

    fn record(
        &mut self,
        s: &Side,
        sr: &Resolved,
        d: &Side,
        dr: &Resolved,
        depth: usize,
    ) -> Result<()> {
        if s.bitfield.is_some() || d.bitfield.is_some() {
            return Err(refused(&d.path, "struct in a bitfield"));
        }
        if !d.path.is_empty() {
            self.row(
                &d.path,
                &s.path,
                format!(
                    "{} -> {}",
                    self.from.type_name(sr.id),
                    self.to.type_name(dr.id)
                ),
            );
        }
        let mut sm = Vec::new();
        self.flatten(self.from, sr.id, s.bit, &s.path, &mut sm, 0)?;
        let mut dm = Vec::new();
        self.flatten(self.to, dr.id, d.bit, &d.path, &mut dm, 0)?;
        let mut matched = vec![false; sm.len()];
        for m in &dm {
            let d_path = join(&d.path, &m.name);
            let old_name = match self.renamed_from.get(&d_path) {
                Some(old) if parent_of(old) == s.path => {
                    let name = old.rsplit('.').next().unwrap_or_default();
                    if !sm.iter().any(|x| x.name == name) {
                        return Err(ConvertError::BadOption {
                            option: format!("{old}={d_path}"),
                            reason: format!(
                                "no member {old} in the old type paired with {d_path} in the new type"
                            ),
                        });
                    }
                    self.used_renames.insert(old.clone());
                    Some(name.to_string())
                }
                _ => {
                    let own = join(&s.path, &m.name);
                    // A member renamed away does not match under its old name.
                    (!self.opts.renames.contains_key(&own)).then(|| m.name.clone())
                }
            };
            let found = old_name.and_then(|n| sm.iter().position(|x| x.name == n));
            let dside = Side {
                id: m.id,
                bit: m.bit,
                bitfield: m.bitfield,
                path: d_path.clone(),
                tag: m.tag,
            };
            match found {
                Some(i) => {
                    matched[i] = true;
                    let o = &sm[i];
                    let sside = Side {
                        id: o.id,
                        bit: o.bit,
                        bitfield: o.bitfield,
                        path: join(&s.path, &o.name),
                        tag: o.tag,
                    };
                    self.node(&sside, &dside, depth + 1)?;
                }
                None => self.new_member(&dside, depth + 1)?,
            }
        }
        for (o, _) in sm.iter().zip(&matched).filter(|(_, m)| !**m) {
            let path = join(&s.path, &o.name);
            self.changed = true;
            self.row("-", &path, "removed: dropped");
            if self.show {
                self.removed.push(path);
            }
        }
        Ok(())
    }

    fn new_member(&mut self, d: &Side, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(refused(&d.path, "types nest too deep"));
        }
        self.changed = true;
        let dr = self.to.resolve(d.id)?;
        if let Some(what) = self.to.kernel_managed(&dr) {
            self.row(
                &d.path,
                "-",
                format!("new {what}: left zero for the kernel"),
            );
            return Ok(());
        }
        let tname = self.to.type_name(d.id);
        if let Some(value) = self.opts.defaults.get(&d.path) {
            self.used_defaults.insert(d.path.clone());
            let opt = || format!("{}={value}", d.path);
            if !matches!(dr.ty, Type::Int(_) | Type::Enum(_) | Type::Enum64(_)) {
                return Err(ConvertError::BadOption {
                    option: opt(),
                    reason: format!("defaults are for integer and enum members, not {tname}"),
                });
            }
            let sc = Self::scalar_of(self.to, &dr, d.bitfield);
            let raw = parse_default(value, &sc).map_err(|reason| ConvertError::BadOption {
                option: opt(),
                reason,
            })?;
            self.push(
                Op::Set {
                    dst: Field {
                        bit: d.bit,
                        bits: sc.bits,
                    },
                    value: raw,
                },
                &d.path,
            )?;
            self.row(&d.path, "-", format!("new {tname}: default {value}"));
            return Ok(());
        }
        let prefix = format!("{}.", d.path);
        let nested = self.opts.defaults.keys().any(|k| k.starts_with(&prefix));
        if nested && matches!(dr.ty, Type::Struct(_)) {
            self.row(&d.path, "-", format!("new {tname}"));
            let mut dm = Vec::new();
            self.flatten(self.to, dr.id, d.bit, &d.path, &mut dm, 0)?;
            for m in dm {
                let side = Side {
                    id: m.id,
                    bit: m.bit,
                    bitfield: m.bitfield,
                    path: join(&d.path, &m.name),
                    tag: m.tag,
                };
                self.new_member(&side, depth + 1)?;
            }
            return Ok(());
        }
        self.row(&d.path, "-", format!("new {tname}: zero"));
        Ok(())
    }

    /// Whether two types have the same bytes for the same values: same kinds, sizes,
    /// member names and offsets. `Err` says where they differ.
    fn same_layout(&self, a: u32, b: u32, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("nests too deep".to_string());
        }
        let ra = self.from.resolve(a).map_err(|e| e.to_string())?;
        let rb = self.to.resolve(b).map_err(|e| e.to_string())?;
        let (na, nb) = (self.from.type_name(a), self.to.type_name(b));
        let differ = || Err(format!("{na} differs from {nb}"));
        match (&ra.ty, &rb.ty) {
            (Type::Int(x), Type::Int(y)) => {
                if x.size() != y.size() || x.is_signed() != y.is_signed() {
                    return differ();
                }
            }
            (Type::Float(x), Type::Float(y)) if x.size() == y.size() => {}
            (Type::Ptr(_), Type::Ptr(_)) => {}
            (Type::Enum(x), Type::Enum(y)) => {
                let vals = |g: &BtfGraph, e: &btf_rs::Enum| {
                    e.members
                        .iter()
                        .map(|m| (g.name(m), m.val()))
                        .collect::<Vec<_>>()
                };
                if x.size() != y.size() || vals(self.from, x) != vals(self.to, y) {
                    return differ();
                }
            }
            (Type::Array(x), Type::Array(y)) => {
                if x.len() != y.len() {
                    return Err(format!("{na} has {} elements, {nb} {}", x.len(), y.len()));
                }
                self.same_layout(chained(&ra.ty), chained(&rb.ty), depth + 1)?;
            }
            (Type::Struct(x), Type::Struct(y)) | (Type::Union(x), Type::Union(y)) => {
                if x.size() != y.size() {
                    return Err(format!("{na} has {} bytes, {nb} {}", x.size(), y.size()));
                }
                if x.members.len() != y.members.len() {
                    return Err(format!(
                        "{na} has {} members, {nb} {}",
                        x.members.len(),
                        y.members.len()
                    ));
                }
                for (p, q) in x.members.iter().zip(&y.members) {
                    let (pn, qn) = (self.from.name(p), self.to.name(q));
                    if pn != qn
                        || p.bit_offset() != q.bit_offset()
                        || p.bitfield_size() != q.bitfield_size()
                    {
                        return Err(format!(
                            "member {pn:?} of {na} (bit {}) differs from {qn:?} of {nb} (bit {})",
                            p.bit_offset(),
                            q.bit_offset()
                        ));
                    }
                    self.same_layout(p.get_type_id_or_void(), q.get_type_id_or_void(), depth + 1)
                        .map_err(|e| format!("member {pn}: {e}"))?;
                }
            }
            _ => return differ(),
        }
        if self.from.kernel_managed(&ra).is_some() || self.to.kernel_managed(&rb).is_some() {
            return Err(format!("{nb} is kernel-managed"));
        }
        Ok(())
    }

    fn check_unused(&self) -> Result<()> {
        let sorted = |m: &HashMap<String, String>| {
            let mut v: Vec<(String, String)> =
                m.iter().map(|(a, b)| (a.clone(), b.clone())).collect();
            v.sort();
            v
        };
        for (path, value) in sorted(&self.opts.defaults) {
            if !self.used_defaults.contains(&path) {
                return Err(ConvertError::BadOption {
                    option: format!("{path}={value}"),
                    reason: format!(
                        "no new integer or enum member {path} in the new type (defaults apply only to members the old type lacks)"
                    ),
                });
            }
        }
        for (old, new) in sorted(&self.opts.renames) {
            if !self.used_renames.contains(&old) {
                return Err(ConvertError::BadOption {
                    option: format!("{old}={new}"),
                    reason: format!(
                        "no member {old} in the old type paired with {new} in the new type"
                    ),
                });
            }
        }
        let mut rebase: Vec<_> = self.opts.rebase.iter().collect();
        rebase.sort_by(|a, b| a.0.cmp(b.0));
        for (path, spec) in rebase {
            if !self.used_rebase.contains(path) {
                return Err(ConvertError::BadOption {
                    option: format!("{path}={spec}"),
                    reason: format!(
                        "no integer member {path} present in both the old and the new type"
                    ),
                });
            }
        }
        Ok(())
    }
}

trait MemberType {
    fn get_type_id_or_void(&self) -> u32;
}

impl MemberType for btf_rs::Member {
    fn get_type_id_or_void(&self) -> u32 {
        btf_rs::BtfType::get_type_id(self).unwrap_or(0)
    }
}

fn bit_name(name: String, bitfield: Option<u32>) -> String {
    match bitfield {
        Some(b) => format!("{name}:{b}"),
        None => name,
    }
}

/// The rebase spec among a member's decl tags (`mapsnap:clock=...`).
fn tag_spec(tags: &[String], path: &str) -> Result<Option<RebaseSpec>> {
    for t in tags {
        if let Some(spec) = RebaseSpec::from_decl_tag(t) {
            return spec
                .map(Some)
                .map_err(|e| refused(path, format!("decl tag {t:?}: {e}")));
        }
    }
    if let Some(t) = tags.iter().find(|t| t.starts_with("mapsnap:")) {
        return Err(refused(
            path,
            format!("unknown mapsnap decl tag {t:?} (known: {DECL_TAG_PREFIX}CLOCK_UNIT)"),
        ));
    }
    Ok(None)
}

/// A default value as the raw bits of the member.
fn parse_default(value: &str, sc: &Scalar) -> Result<u128, String> {
    if let Some(names) = &sc.names
        && let Some((_, v)) = names.iter().find(|(n, _)| n == value)
    {
        return Ok(*v);
    }
    let v: i128 = match value {
        "true" => 1,
        "false" => 0,
        _ => {
            let (neg, digits) = match value.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, value),
            };
            let mag = match digits
                .strip_prefix("0x")
                .or_else(|| digits.strip_prefix("0X"))
            {
                Some(hex) => u128::from_str_radix(hex, 16),
                None => digits.parse::<u128>(),
            }
            .map_err(|_| {
                let names = sc
                    .names
                    .as_ref()
                    .map(|n| {
                        let list: Vec<&str> = n.iter().map(|(x, _)| x.as_str()).collect();
                        format!(" or one of {}", list.join(", "))
                    })
                    .unwrap_or_default();
                format!("not an integer{names}")
            })?;
            let mag = i128::try_from(mag).map_err(|_| "out of range".to_string())?;
            if neg { -mag } else { mag }
        }
    };
    let bits = sc.bits.min(127);
    let (lo, hi) = if sc.signed {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (
            0,
            if sc.bits >= 127 {
                i128::MAX
            } else {
                (1i128 << bits) - 1
            },
        )
    };
    if v < lo || v > hi {
        return Err(format!(
            "{value} does not fit a {}{}-bit member",
            if sc.signed { "signed " } else { "" },
            sc.bits
        ));
    }
    Ok((v as u128) & mask(sc.bits))
}

/// Byte-aligned integers of one width and sign become copies, and neighbouring copies
/// merge, so that an unchanged struct costs one `memcpy`.
fn merge(ops: Vec<Op>, same_order: bool) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops {
        let op = match op {
            Op::Int {
                src,
                dst,
                src_signed,
                dst_signed,
                rebase: None,
                ..
            } if src.bits == dst.bits
                && src_signed == dst_signed
                && src.byte_aligned()
                && dst.byte_aligned()
                && (same_order || src.bits == 8) =>
            {
                Op::Copy {
                    src: (src.bit / 8) as usize,
                    dst: (dst.bit / 8) as usize,
                    len: (src.bits / 8) as usize,
                }
            }
            Op::Float {
                src,
                dst,
                src_size,
                dst_size,
                ..
            } if src_size == dst_size && same_order => Op::Copy {
                src,
                dst,
                len: usize::from(src_size),
            },
            other => other,
        };
        if let (
            Some(Op::Copy { src, dst, len }),
            Op::Copy {
                src: s2,
                dst: d2,
                len: l2,
            },
        ) = (out.last_mut(), &op)
            && *src + *len == *s2
            && *dst + *len == *d2
        {
            *len += *l2;
            continue;
        }
        if matches!(op, Op::Copy { len: 0, .. }) {
            continue;
        }
        out.push(op);
    }
    out
}
