//! Render raw BPF map key/value bytes as typed values using the map's BTF, the way
//! bpftool's `btf_dumper` does for the `"formatted"` field of `bpftool -j map dump`.
//!
//! BTF parsing is done by `btf-rs`; this module only walks values.
//!
//! Output rules (bpftool's unless listed under "Differences"):
//! - integers of 1/2/4/8 bytes are JSON numbers, signed when BTF says so; 128-bit (and
//!   other odd-width) integers are hex strings such as `"0x1000000000000000a"`;
//! - `bool` is a JSON bool; a `char`-encoded int is a one-character string;
//! - arrays are JSON arrays, except arrays of `char` (through const/volatile, not through
//!   typedefs) whose bytes hold a NUL-terminated printable string: those are strings;
//! - structs and unions are objects keyed by member name, in declaration order;
//! - enums render as the enumerator name, or as a number when no enumerator matches;
//! - typedef/const/volatile/restrict/type_tag are looked through;
//! - `VAR` renders as `{name: value}`, `DATASEC` as `{section: [var, var, ...]}` (global
//!   data maps such as `.data`/`.bss`);
//! - special kernel structs (`bpf_spin_lock`, `bpf_timer`, ...) are plain structs.
//!
//! Differences from bpftool, chosen on purpose:
//! - anonymous struct/union members are flattened into the enclosing object (C access
//!   syntax: `s.x` for `struct { int x; };`); bpftool writes them under the key `""`,
//!   which repeats for several such members. A flattened name that would clash, or an
//!   anonymous member of another kind, is keyed `(anon#N)` (N = member index);
//! - bitfields are numbers typed like the field (signed ints sign-extended, bool as
//!   bool, enums as enumerator names); bpftool prints every bitfield as a hex string;
//! - pointers are hex strings (`"0xffff888012345678"`): bpftool -j prints decimal
//!   numbers, which lose precision for kernel addresses in JavaScript-style consumers;
//! - floats are numbers (non-finite ones the strings `"nan"`, `"inf"`, `"-inf"`);
//!   bpftool rejects the FLOAT kind;
//! - an enum value with no matching enumerator is printed signed only when BTF marks
//!   the enum signed (kind_flag); bpftool always prints it as a signed 64-bit number;
//! - `bool` is true when any of its bytes is non-zero (bpftool reads 4 bytes for it);
//! - values are decoded in the byte order of the BTF blob (big-endian BTF from s390x
//!   renders correctly on x86), where bpftool always uses the host's;
//! - legacy INT types narrower than their size or with a bit offset (pre-kind_flag
//!   bitfield encoding, not produced by clang or current pahole) are read at full
//!   width: `btf-rs` does not expose those INT fields;
//! - bpftool's struct_ops "prog id as function pointer" mode is not reproduced.

use std::fmt;

use btf_rs::{Btf, BtfType, Type};
use serde_json::{Map, Number, Value};

#[cfg(test)]
mod tests;

/// BPF programs are 64-bit: a pointer in a map value takes 8 bytes whatever the host.
const PTR_SIZE: usize = 8;
/// Deepest type nesting (and longest typedef/modifier chain) followed. Real BTF stays
/// far below; the cap turns reference cycles in corrupt BTF into errors.
const MAX_DEPTH: usize = 64;
/// Size of `struct btf_header`.
const BTF_HEADER_LEN: u64 = 24;
/// JSON nodes allowed per input byte (plus a constant), so that corrupt BTF (say, an
/// array of 2^32 empty structs) cannot make one small value expand without bound.
const NODES_PER_BYTE: usize = 16;
const NODES_SLACK: usize = 1 << 16;

/// Errors from parsing BTF or rendering a value with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BtfFmtError {
    /// The blob is not parsable BTF.
    #[error("invalid BTF blob ({len} bytes): {reason}")]
    InvalidBlob { len: usize, reason: String },
    /// No type with this id in the BTF.
    #[error("unknown BTF type id {id} (the BTF has ids 0..={max_id})")]
    UnknownType { id: u32, max_id: u32 },
    /// The bytes are shorter than the type they should hold.
    #[error("BTF type id {id} ({name}) needs {need} bytes, got {got}")]
    ShortValue {
        id: u32,
        name: String,
        need: usize,
        got: usize,
    },
    /// The type is of a kind that has no value (void, fwd, func, func_proto, decl_tag).
    #[error("BTF type id {id} ({name}) is a {kind}, which has no value representation")]
    Unsupported {
        id: u32,
        name: String,
        kind: &'static str,
    },
    /// The BTF is inconsistent (cycles, overflowing sizes, members out of bounds, ...).
    #[error("BTF type id {id} ({name}): {reason}")]
    Malformed {
        id: u32,
        name: String,
        reason: String,
    },
}

type Result<T> = std::result::Result<T, BtfFmtError>;

/// A parsed BTF blob, ready to render values of its types.
pub struct TypedBtf {
    btf: Btf,
    /// Byte order of the blob, which is that of the machine the maps came from.
    big_endian: bool,
    /// Highest valid type id, for error messages.
    max_id: u32,
}

impl fmt::Debug for TypedBtf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedBtf")
            .field("big_endian", &self.big_endian)
            .field("max_id", &self.max_id)
            .finish_non_exhaustive()
    }
}

impl TypedBtf {
    /// Parse a raw BTF blob (a `.BTF` section, or what `BPF_BTF_GET_FD_BY_ID` returns).
    pub fn parse(blob: &[u8]) -> Result<Self> {
        let bad = |reason: String| BtfFmtError::InvalidBlob {
            len: blob.len(),
            reason,
        };
        let big_endian = match blob.get(..2) {
            Some([0x9f, 0xeb]) => false,
            Some([0xeb, 0x9f]) => true,
            _ => return Err(bad("no BTF magic 0xeb9f".to_string())),
        };
        let word = |off: usize| -> Option<u64> {
            let b: [u8; 4] = blob.get(off..off + 4)?.try_into().ok()?;
            Some(u64::from(if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }))
        };
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (word(4), word(8), word(12), word(16), word(20))
        else {
            return Err(bad("truncated header".to_string()));
        };
        // btf-rs trusts these offsets; a string section running past the end would make
        // it loop forever, so bound them here.
        let types_end = hdr_len + type_off + type_len;
        let strings_end = hdr_len + str_off + str_len;
        let len = blob.len() as u64;
        if hdr_len < BTF_HEADER_LEN {
            return Err(bad(format!("header length {hdr_len} < {BTF_HEADER_LEN}")));
        }
        if types_end > len || strings_end > len {
            return Err(bad(format!(
                "sections end past the blob (types at {types_end}, strings at {strings_end})"
            )));
        }
        let btf = Btf::from_bytes(blob).map_err(|e| bad(e.to_string()))?;
        let max_id = btf.base().type_id_range().1;
        Ok(Self {
            btf,
            big_endian,
            max_id,
        })
    }

    /// Render `bytes` as a value of type `type_id`, as JSON shaped like bpftool's
    /// `"formatted"` output (see the module docs). Extra trailing bytes are ignored
    /// (per-CPU slots are padded to 8 bytes).
    pub fn render(&self, type_id: u32, bytes: &[u8]) -> Result<Value> {
        let need = self.type_size(type_id)?;
        if bytes.len() < need {
            return Err(self.short(type_id, need, bytes.len()));
        }
        let mut walker = Walker {
            tb: self,
            budget: bytes
                .len()
                .saturating_mul(NODES_PER_BYTE)
                .saturating_add(NODES_SLACK),
        };
        walker.value(type_id, bytes, 0)
    }

    /// C-like name of a type: `struct flow_key`, `__u32`, `char[16]`, `void *`.
    pub fn type_name(&self, type_id: u32) -> Result<String> {
        self.name_of(type_id, 0)
    }

    /// Size in bytes of a value of the type (pointers count 8, as in BPF).
    pub fn type_size(&self, type_id: u32) -> Result<usize> {
        self.size_of(type_id, 0)
    }

    fn ty(&self, id: u32) -> Result<Type> {
        self.btf
            .resolve_type_by_id(id)
            .map_err(|_| BtfFmtError::UnknownType {
                id,
                max_id: self.max_id,
            })
    }

    /// Name of a named BTF object; empty for anonymous ones.
    fn name(&self, t: &dyn BtfType) -> String {
        self.btf.resolve_name(t).unwrap_or_default()
    }

    /// Type name for error messages, never failing.
    fn label(&self, id: u32) -> String {
        self.name_of(id, 0).unwrap_or_else(|_| "?".to_string())
    }

    fn short(&self, id: u32, need: usize, got: usize) -> BtfFmtError {
        BtfFmtError::ShortValue {
            id,
            name: self.label(id),
            need,
            got,
        }
    }

    fn malformed(&self, id: u32, reason: impl Into<String>) -> BtfFmtError {
        BtfFmtError::Malformed {
            id,
            name: self.label(id),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, id: u32, t: &Type) -> BtfFmtError {
        BtfFmtError::Unsupported {
            id,
            name: self.label(id),
            kind: t.name(),
        }
    }

    fn too_deep(&self, id: u32) -> BtfFmtError {
        // No label(): naming a type this deep would recurse just as deep.
        BtfFmtError::Malformed {
            id,
            name: "?".to_string(),
            reason: format!("types nest deeper than {MAX_DEPTH} levels (reference cycle?)"),
        }
    }

    fn size_of(&self, id: u32, depth: usize) -> Result<usize> {
        if depth > MAX_DEPTH {
            return Err(self.too_deep(id));
        }
        let t = self.ty(id)?;
        Ok(match &t {
            Type::Int(i) => i.size(),
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Float(f) => f.size(),
            Type::Datasec(d) => d.size(),
            Type::Ptr(_) => PTR_SIZE,
            Type::Array(a) => {
                let elem = self.size_of(chained(&t), depth + 1)?;
                elem.checked_mul(a.len()).ok_or_else(|| {
                    self.malformed(id, format!("{} elements of {elem} bytes overflow", a.len()))
                })?
            }
            Type::Typedef(_)
            | Type::Const(_)
            | Type::Volatile(_)
            | Type::Restrict(_)
            | Type::TypeTag(_)
            | Type::Var(_) => self.size_of(chained(&t), depth + 1)?,
            _ => return Err(self.unsupported(id, &t)),
        })
    }

    fn name_of(&self, id: u32, depth: usize) -> Result<String> {
        if depth > MAX_DEPTH {
            return Err(self.too_deep(id));
        }
        let t = self.ty(id)?;
        let named = |prefix: &str, b: &dyn BtfType| {
            let name = self.name(b);
            let name = if name.is_empty() { "(anon)" } else { &name };
            format!("{prefix}{name}")
        };
        Ok(match &t {
            Type::Void => "void".to_string(),
            Type::Int(b) => named("", b),
            Type::Float(b) => named("", b),
            Type::Typedef(b) => named("", b),
            Type::Func(b) => named("", b),
            Type::Var(b) => named("", b),
            Type::Datasec(b) => named("", b),
            Type::Struct(b) => named("struct ", b),
            Type::Union(b) => named("union ", b),
            Type::Enum(b) => named("enum ", b),
            Type::Enum64(b) => named("enum ", b),
            Type::Fwd(f) if f.is_union() => named("union ", f),
            Type::Fwd(f) => named("struct ", f),
            Type::FuncProto(_) => "func_proto".to_string(),
            Type::Ptr(_) => format!("{} *", self.name_of(chained(&t), depth + 1)?),
            Type::Const(_) => format!("const {}", self.name_of(chained(&t), depth + 1)?),
            Type::Volatile(_) => format!("volatile {}", self.name_of(chained(&t), depth + 1)?),
            Type::Restrict(_) => format!("{} restrict", self.name_of(chained(&t), depth + 1)?),
            Type::TypeTag(_) | Type::DeclTag(_) => self.name_of(chained(&t), depth + 1)?,
            Type::Array(a) => {
                // Outer dimension first, as C writes `int m[2][3]`.
                let mut dims = format!("[{}]", a.len());
                let mut elem = chained(&t);
                for _ in 0..MAX_DEPTH {
                    let inner = self.ty(elem)?;
                    let Type::Array(a) = &inner else { break };
                    dims.push_str(&format!("[{}]", a.len()));
                    elem = chained(&inner);
                }
                format!("{}{dims}", self.name_of(elem, depth + 1)?)
            }
            _ => t.name().to_string(),
        })
    }

    /// Follow const/volatile/restrict/type_tag (not typedefs) to the underlying type,
    /// as bpftool does when deciding whether an array holds chars.
    fn skip_mods(&self, mut id: u32) -> Result<Type> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t {
                Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                    id = chained(&t);
                }
                _ => return Ok(t),
            }
        }
        Err(self.too_deep(id))
    }

    /// Follow modifiers and typedefs to the type that decides how bits are read.
    fn resolve(&self, mut id: u32) -> Result<Type> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => id = chained(&t),
                _ => return Ok(t),
            }
        }
        Err(self.too_deep(id))
    }

    /// Unsigned integer from up to 16 bytes in the BTF's byte order.
    fn uint(&self, b: &[u8]) -> u128 {
        let fold = |acc: u128, &x: &u8| (acc << 8) | u128::from(x);
        if self.big_endian {
            b.iter().fold(0, fold)
        } else {
            b.iter().rev().fold(0, fold)
        }
    }

    /// Hex string of an integer of any width, most significant digit first, no leading
    /// zeros: bpftool's format for 128-bit integers.
    fn hex(&self, b: &[u8]) -> Value {
        let msb_first: Vec<u8> = if self.big_endian {
            b.to_vec()
        } else {
            b.iter().rev().copied().collect()
        };
        let mut s = String::from("0x");
        match msb_first.iter().position(|&x| x != 0) {
            None => s.push('0'),
            Some(first) => {
                let mut digits = msb_first.iter().skip(first);
                if let Some(top) = digits.next() {
                    s.push_str(&format!("{top:x}"));
                }
                for x in digits {
                    s.push_str(&format!("{x:02x}"));
                }
            }
        }
        Value::String(s)
    }

    /// `nbits` bits starting `bit` bits into `b`. Little-endian numbers bits from the
    /// least significant bit of byte 0, big-endian from the most significant one.
    fn bits(&self, b: &[u8], bit: u32, nbits: u32) -> u128 {
        let mut v = 0u128;
        for k in 0..nbits.min(128) {
            let pos = (bit + k) as usize;
            let byte = b.get(pos / 8).copied().unwrap_or(0);
            if self.big_endian {
                v = (v << 1) | u128::from((byte >> (7 - pos % 8)) & 1);
            } else {
                v |= u128::from((byte >> (pos % 8)) & 1) << k;
            }
        }
        v
    }
}

/// The type a BTF type refers to (element, target, aliased type); 0 (void) if none.
fn chained(t: &Type) -> u32 {
    t.as_btf_type().and_then(|b| b.get_type_id()).unwrap_or(0)
}

/// Two's-complement value of the low `bits` bits of `v`.
fn sign_extend(v: u128, bits: u32) -> i128 {
    match bits {
        0 => 0,
        128.. => v as i128,
        _ => {
            let shift = 128 - bits;
            ((v << shift) as i128) >> shift
        }
    }
}

/// An integer of `bits` bits as JSON: a number up to 64 bits, else a hex string.
fn int_value(raw: u128, bits: u32, signed: bool) -> Value {
    if bits > 64 {
        Value::String(format!("{raw:#x}"))
    } else if signed {
        Value::Number(Number::from(sign_extend(raw, bits) as i64))
    } else {
        Value::Number(Number::from(raw as u64))
    }
}

/// A float as a JSON number; JSON has no NaN or infinities, so those become strings.
fn float_value(v: f64) -> Value {
    match Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None if v.is_nan() => Value::String("nan".to_string()),
        None if v > 0.0 => Value::String("inf".to_string()),
        None => Value::String("-inf".to_string()),
    }
}

/// IEEE 754 binary16 (`_Float16`), widened exactly to f64.
fn half_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// C `isprint` in the C locale.
fn is_print(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// The bytes as a string when they hold a NUL-terminated printable string within the
/// first `n` bytes (bpftool's `is_str_array`).
fn c_string(data: &[u8], n: usize) -> Option<String> {
    let mut s = String::new();
    for &b in data.iter().take(n) {
        if b == 0 {
            return Some(s);
        }
        if !is_print(b) {
            return None;
        }
        s.push(char::from(b));
    }
    None
}

/// One rendering pass: the BTF plus the remaining node budget.
struct Walker<'a> {
    tb: &'a TypedBtf,
    budget: usize,
}

impl Walker<'_> {
    fn spend(&mut self, id: u32) -> Result<()> {
        match self.budget.checked_sub(1) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(self
                .tb
                .malformed(id, "value expands to too many JSON nodes for its size")),
        }
    }

    /// `len` bytes at `off`, or a ShortValue error naming type `id`.
    fn bytes<'d>(&self, id: u32, data: &'d [u8], off: usize, len: usize) -> Result<&'d [u8]> {
        off.checked_add(len)
            .and_then(|end| data.get(off..end))
            .ok_or_else(|| self.tb.short(id, off.saturating_add(len), data.len()))
    }

    fn value(&mut self, id: u32, data: &[u8], depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(self.tb.too_deep(id));
        }
        let tb = self.tb;
        let t = tb.ty(id)?;
        match &t {
            Type::Typedef(_)
            | Type::Const(_)
            | Type::Volatile(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => return self.value(chained(&t), data, depth + 1),
            _ => self.spend(id)?,
        }
        match &t {
            Type::Int(i) => {
                let size = i.size();
                let b = self.bytes(id, data, 0, size)?;
                Ok(if i.is_bool() {
                    Value::Bool(b.iter().any(|&x| x != 0))
                } else if let (true, [c]) = (i.is_char(), b) {
                    // bpftool: the character if printable, else "\u00XX".
                    Value::String(char::from(*c).to_string())
                } else if matches!(size, 1 | 2 | 4 | 8) {
                    int_value(tb.uint(b), size as u32 * 8, i.is_signed())
                } else {
                    tb.hex(b)
                })
            }
            Type::Float(f) => {
                let b = self.bytes(id, data, 0, f.size())?;
                let raw = tb.uint(b);
                Ok(match b.len() {
                    2 => float_value(half_to_f64(raw as u16)),
                    4 => {
                        // Via the shortest decimal form, so 0.1f shows as 0.1 and not
                        // as the f64 nearest to the f32 value.
                        let v = f32::from_bits(raw as u32);
                        float_value(v.to_string().parse().unwrap_or(f64::from(v)))
                    }
                    8 => float_value(f64::from_bits(raw as u64)),
                    _ => tb.hex(b),
                })
            }
            Type::Ptr(_) => {
                let b = self.bytes(id, data, 0, PTR_SIZE)?;
                Ok(Value::String(format!("{:#x}", tb.uint(b))))
            }
            Type::Enum(e) => {
                let (raw, bits) = self.enum_raw(id, e.size(), data)?;
                Ok(self.enum32(e, raw, bits))
            }
            Type::Enum64(e) => {
                let (raw, bits) = self.enum_raw(id, e.size(), data)?;
                Ok(self.enum64(e, raw, bits))
            }
            Type::Array(a) => self.array(id, a, chained(&t), data, depth),
            Type::Struct(s) | Type::Union(s) => self.record(id, s, data, depth),
            Type::Var(v) => {
                let mut obj = Map::new();
                obj.insert(tb.name(v), self.value(chained(&t), data, depth + 1)?);
                Ok(Value::Object(obj))
            }
            Type::Datasec(d) => {
                let mut vars = Vec::with_capacity(d.variables.len().min(self.budget));
                for v in &d.variables {
                    let var = chained_of(v);
                    let off = v.offset() as usize;
                    let sub = data
                        .get(off..)
                        .ok_or_else(|| tb.short(var, off, data.len()))?;
                    vars.push(self.value(var, sub, depth + 1)?);
                }
                let mut obj = Map::new();
                obj.insert(tb.name(d), Value::Array(vars));
                Ok(Value::Object(obj))
            }
            _ => Err(tb.unsupported(id, &t)),
        }
    }

    fn enum_raw(&self, id: u32, size: usize, data: &[u8]) -> Result<(u128, u32)> {
        if !(1..=8).contains(&size) {
            return Err(self.tb.malformed(id, format!("enum of {size} bytes")));
        }
        let b = self.bytes(id, data, 0, size)?;
        Ok((self.tb.uint(b), size as u32 * 8))
    }

    /// Enumerator name for `raw` (`bits` wide), else the number. A match is accepted
    /// either zero- or sign-extended, since BTF from older compilers does not say
    /// whether an enum is signed (bpftool compares sign-extended).
    fn enum32(&self, e: &btf_rs::Enum, raw: u128, bits: u32) -> Value {
        let zext = raw as u64;
        let sext = sign_extend(raw, bits) as i64;
        e.members
            .iter()
            .find(|m| u64::from(m.val()) == zext || i64::from(m.val() as i32) == sext)
            .map(|m| Value::String(self.tb.name(m)))
            .unwrap_or_else(|| int_value(raw, bits, e.is_signed()))
    }

    fn enum64(&self, e: &btf_rs::Enum64, raw: u128, bits: u32) -> Value {
        let zext = raw as u64;
        let sext = sign_extend(raw, bits) as i64;
        e.members
            .iter()
            .find(|m| m.val() == zext || m.val() as i64 == sext)
            .map(|m| Value::String(self.tb.name(m)))
            .unwrap_or_else(|| int_value(raw, bits, e.is_signed()))
    }

    fn array(
        &mut self,
        id: u32,
        a: &btf_rs::Array,
        elem: u32,
        data: &[u8],
        depth: usize,
    ) -> Result<Value> {
        let tb = self.tb;
        let n = a.len();
        if n > 0 {
            let is_char = match tb.skip_mods(elem)? {
                Type::Int(i) => i.size() == 1 && (i.is_char() || tb.name(&i) == "char"),
                _ => false,
            };
            if is_char && let Some(s) = c_string(data, n) {
                return Ok(Value::String(s));
            }
        }
        let elem_size = tb.size_of(elem, depth + 1)?;
        let total = elem_size.checked_mul(n).ok_or_else(|| {
            tb.malformed(id, format!("{n} elements of {elem_size} bytes overflow"))
        })?;
        let data = self.bytes(id, data, 0, total)?;
        let mut out = Vec::with_capacity(n.min(self.budget));
        for i in 0..n {
            // In bounds: i * elem_size <= total <= data.len().
            let sub = data.get(i * elem_size..).unwrap_or_default();
            out.push(self.value(elem, sub, depth + 1)?);
        }
        Ok(Value::Array(out))
    }

    fn record(&mut self, id: u32, s: &btf_rs::Struct, data: &[u8], depth: usize) -> Result<Value> {
        let tb = self.tb;
        let mut obj = Map::new();
        for (idx, m) in s.members.iter().enumerate() {
            let name = tb.name(m);
            let mid = chained_of(m);
            let bit_off = m.bit_offset();
            let byte_off = (bit_off / 8) as usize;
            let sub = data.get(byte_off..).ok_or_else(|| {
                tb.malformed(
                    id,
                    format!(
                        "member {idx} ({name}) starts at byte {byte_off}, past the {} bytes available",
                        data.len()
                    ),
                )
            })?;
            let value = match m.bitfield_size().filter(|&n| n > 0) {
                Some(nbits) => self.bitfield(mid, sub, bit_off % 8, nbits)?,
                // kind_flag 0 with a member off a byte boundary: an int read from that
                // bit, as bpftool does.
                None if bit_off % 8 != 0 => {
                    let nbits = tb.size_of(mid, depth + 1)?.saturating_mul(8);
                    self.bitfield(mid, sub, bit_off % 8, nbits.try_into().unwrap_or(u32::MAX))?
                }
                None => self.value(mid, sub, depth + 1)?,
            };
            insert_member(&mut obj, idx, name, value);
        }
        Ok(Value::Object(obj))
    }

    /// A bitfield of `nbits` bits starting `bit` (< 8) bits into `data`, read like a
    /// full-width field of its type.
    fn bitfield(&mut self, id: u32, data: &[u8], bit: u32, nbits: u32) -> Result<Value> {
        let tb = self.tb;
        self.spend(id)?;
        if nbits > 128 {
            return Err(tb.malformed(id, format!("bitfield of {nbits} bits (max 128)")));
        }
        let b = self.bytes(id, data, 0, (bit + nbits).div_ceil(8) as usize)?;
        let raw = tb.bits(b, bit, nbits);
        Ok(match tb.resolve(id)? {
            Type::Int(i) if i.is_bool() => Value::Bool(raw != 0),
            Type::Int(i) => int_value(raw, nbits, i.is_signed()),
            Type::Enum(e) => self.enum32(&e, raw, nbits),
            Type::Enum64(e) => self.enum64(&e, raw, nbits),
            _ => int_value(raw, nbits, false),
        })
    }
}

fn chained_of(b: &dyn BtfType) -> u32 {
    b.get_type_id().unwrap_or(0)
}

/// Add a struct member; anonymous struct/union members are flattened (see module docs).
fn insert_member(obj: &mut Map<String, Value>, idx: usize, name: String, value: Value) {
    if !name.is_empty() {
        obj.insert(name, value);
        return;
    }
    match value {
        Value::Object(inner) if inner.keys().all(|k| !obj.contains_key(k)) => obj.extend(inner),
        other => {
            obj.insert(format!("(anon#{idx})"), other);
        }
    }
}

/// Untyped fallback: one `"0x.."` string per byte, like bpftool's raw `key`/`value`.
pub fn render_hex(bytes: &[u8]) -> Value {
    Value::Array(
        bytes
            .iter()
            .map(|b| Value::String(format!("{b:#04x}")))
            .collect(),
    )
}

/// Compact one-line text for humans: `{src: 10, dst: 20, name: "abc"}`. Keys that are
/// C identifiers are bare, others quoted; strings are quoted with JSON escapes.
pub fn to_text(value: &Value) -> String {
    let mut out = String::new();
    write_text(&mut out, value);
    out
}

fn write_text(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&quote(s)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_text(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                if is_ident(k) {
                    out.push_str(k);
                } else {
                    out.push_str(&quote(k));
                }
                out.push_str(": ");
                write_text(out, v);
            }
            out.push('}');
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
