//! Running a [`Plan`] on one entry: no allocation, bounds checked once per entry.

use super::{
    ConvertError, Outcome, Result,
    plan::{Field, Op, Plan},
};
use crate::clocks;

/// Per-CPU values occupy `round_up(size, 8)` bytes per CPU.
pub fn percpu_stride(size: usize) -> usize {
    size.div_ceil(8) * 8
}

impl Plan {
    /// Convert one old entry (`src`, at least [`Plan::src_size`] bytes) into `dst` (at
    /// least [`Plan::dst_size`] bytes; its first `dst_size` bytes are overwritten, the
    /// rest untouched). Fails, without a partial result worth using, when a value does not
    /// fit and the plan is not lossy.
    pub fn apply(&self, src: &[u8], dst: &mut [u8]) -> Result<Outcome> {
        if src.len() < self.src_size {
            return Err(ConvertError::ShortBuffer {
                what: "old entry",
                need: self.src_size,
                got: src.len(),
            });
        }
        if dst.len() < self.dst_size {
            return Err(ConvertError::ShortBuffer {
                what: "new entry",
                need: self.dst_size,
                got: dst.len(),
            });
        }
        let src = &src[..self.src_size];
        let dst = &mut dst[..self.dst_size];
        dst.fill(0);
        let mut out = Outcome::default();
        for op in &self.ops {
            self.step(op, src, dst, &mut out)?;
        }
        Ok(out)
    }

    /// Convert a per-CPU value: `cpus` slots of `round_up(src_size, 8)` bytes into `cpus`
    /// slots of `round_up(dst_size, 8)` bytes (padding zeroed).
    pub fn apply_percpu(&self, src: &[u8], dst: &mut [u8], cpus: usize) -> Result<Outcome> {
        let (ss, ds) = (percpu_stride(self.src_size), percpu_stride(self.dst_size));
        let need = |stride: usize| stride.saturating_mul(cpus);
        if src.len() < need(ss) {
            return Err(ConvertError::ShortBuffer {
                what: "old per-CPU value",
                need: need(ss),
                got: src.len(),
            });
        }
        if dst.len() < need(ds) {
            return Err(ConvertError::ShortBuffer {
                what: "new per-CPU value",
                need: need(ds),
                got: dst.len(),
            });
        }
        let mut total = Outcome::default();
        for (s, d) in src
            .chunks_exact(ss.max(1))
            .zip(dst.chunks_exact_mut(ds.max(1)))
            .take(cpus)
        {
            d.fill(0);
            total.add(self.apply(s, d)?);
        }
        Ok(total)
    }

    fn path(&self, idx: u32) -> String {
        let p = self.paths.get(idx as usize).map_or("?", String::as_str);
        if p.is_empty() { "(root)" } else { p }.to_string()
    }

    fn step(&self, op: &Op, src: &[u8], dst: &mut [u8], out: &mut Outcome) -> Result<()> {
        match *op {
            Op::Copy {
                src: s,
                dst: d,
                len,
            } => {
                // In bounds: the plan's offsets come from the same types as the sizes.
                if let (Some(from), Some(to)) = (src.get(s..s + len), dst.get_mut(d..d + len)) {
                    to.copy_from_slice(from);
                }
            }
            Op::Set { dst: f, value } => write_bits(dst, f, value, self.dst_be),
            Op::DropCheck { src: s, len } => {
                if src
                    .get(s..s + len)
                    .is_some_and(|b| b.iter().any(|&x| x != 0))
                {
                    out.lossy += 1;
                }
            }
            Op::Int {
                src: sf,
                dst: df,
                src_signed,
                dst_signed,
                path,
                rebase,
            } => {
                let raw = read_bits(src, sf, self.src_be);
                let mut num = Num::new(raw, sf.bits, src_signed);
                if let (Some((from_spec, to_spec)), Some(c)) = (rebase, &self.clocks)
                    && let Num::Pos(v) = num
                {
                    let max = max_pos(df.bits, dst_signed);
                    let v64 = u64::try_from(v).unwrap_or(u64::MAX);
                    let max64 = u64::try_from(max).unwrap_or(u64::MAX);
                    let new = clocks::rebase_between(
                        v64, from_spec, to_spec, &c.from, &c.to, c.mode, max64,
                    )
                    .ok_or_else(|| ConvertError::Rebase {
                        path: self.path(path),
                        spec: from_spec.to_string(),
                        reason: "a clock sample lacks jiffies or HZ".to_string(),
                    })?;
                    if v64 != 0 {
                        out.rebased += 1;
                    }
                    num = Num::Pos(u128::from(new));
                }
                let value = match num.fit(df.bits, dst_signed) {
                    Some(v) => v,
                    None if self.lossy => {
                        out.lossy += 1;
                        num.clamp(df.bits, dst_signed)
                    }
                    None => {
                        return Err(ConvertError::DoesNotFit {
                            path: self.path(path),
                            value: num.to_string(),
                            target: format!(
                                "{} {}-bit integer",
                                if dst_signed {
                                    "a signed"
                                } else {
                                    "an unsigned"
                                },
                                df.bits
                            ),
                        });
                    }
                };
                write_bits(dst, df, value, self.dst_be);
            }
            Op::Enum {
                src: sf,
                dst: df,
                start,
                len,
                path,
            } => {
                let raw = read_bits(src, sf, self.src_be);
                let pairs = self
                    .enum_pairs
                    .get(start as usize..(start as usize + len as usize))
                    .unwrap_or_default();
                match pairs.iter().find(|(old, _)| *old == raw) {
                    Some(&(_, new)) if new <= max_pos(df.bits, false) => {
                        write_bits(dst, df, new, self.dst_be);
                    }
                    Some(&(_, new)) if !self.lossy => {
                        return Err(ConvertError::DoesNotFit {
                            path: self.path(path),
                            value: new.to_string(),
                            target: format!("a {}-bit enum field", df.bits),
                        });
                    }
                    _ if self.lossy => out.lossy += 1,
                    _ => {
                        return Err(ConvertError::EnumValue {
                            path: self.path(path),
                            value: raw.to_string(),
                            reason: "has no enumerator of the same name in the new type"
                                .to_string(),
                        });
                    }
                }
            }
            Op::Float {
                src: s,
                dst: d,
                src_size,
                dst_size,
                path,
            } => {
                let field = |at: usize, size: u8| Field {
                    bit: at as u64 * 8,
                    bits: u32::from(size) * 8,
                };
                let raw = read_bits(src, field(s, src_size), self.src_be);
                let v = if src_size == 4 {
                    f64::from(f32::from_bits(raw as u32))
                } else {
                    f64::from_bits(raw as u64)
                };
                let bits = if dst_size == 4 {
                    let narrow = v as f32;
                    if f64::from(narrow) != v && !v.is_nan() {
                        if !self.lossy {
                            return Err(ConvertError::DoesNotFit {
                                path: self.path(path),
                                value: v.to_string(),
                                target: "a float exactly".to_string(),
                            });
                        }
                        out.lossy += 1;
                    }
                    u128::from(narrow.to_bits())
                } else {
                    u128::from(v.to_bits())
                };
                write_bits(dst, field(d, dst_size), bits, self.dst_be);
            }
        }
        Ok(())
    }
}

fn mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn max_pos(bits: u32, signed: bool) -> u128 {
    if signed { mask(bits - 1) } else { mask(bits) }
}

/// An integer read from a field, by its encoding.
#[derive(Debug, Clone, Copy)]
enum Num {
    Pos(u128),
    Neg(i128),
}

impl Num {
    fn new(raw: u128, bits: u32, signed: bool) -> Self {
        if signed && bits > 0 && (raw >> (bits - 1)) & 1 == 1 {
            let v = if bits >= 128 {
                raw as i128
            } else {
                (raw | !mask(bits)) as i128
            };
            Num::Neg(v)
        } else {
            Num::Pos(raw)
        }
    }

    /// The raw bits of this value in a field of `bits` bits, if it fits.
    fn fit(self, bits: u32, signed: bool) -> Option<u128> {
        match self {
            Num::Pos(v) => (v <= max_pos(bits, signed)).then_some(v),
            Num::Neg(v) => {
                let min = if bits >= 128 {
                    i128::MIN
                } else {
                    -(1i128 << (bits - 1))
                };
                (signed && v >= min).then_some(v as u128 & mask(bits))
            }
        }
    }

    /// The nearest value a field of `bits` bits holds.
    fn clamp(self, bits: u32, signed: bool) -> u128 {
        match self {
            Num::Pos(_) => max_pos(bits, signed),
            Num::Neg(_) if signed => (1u128 << (bits - 1)) & mask(bits),
            Num::Neg(_) => 0,
        }
    }
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::Pos(v) => write!(f, "{v}"),
            Num::Neg(v) => write!(f, "{v}"),
        }
    }
}

/// `f.bits` bits at bit `f.bit`: little-endian numbers bits from the least significant
/// bit of byte 0, big-endian from the most significant one (as compilers lay out
/// bitfields), so whole integers read in their byte order too.
pub(crate) fn read_bits(data: &[u8], f: Field, be: bool) -> u128 {
    let start = (f.bit / 8) as usize;
    if f.byte_aligned() {
        let Some(b) = data.get(start..start + (f.bits / 8) as usize) else {
            return 0;
        };
        let fold = |acc: u128, x: &u8| (acc << 8) | u128::from(*x);
        return if be {
            b.iter().fold(0, fold)
        } else {
            b.iter().rev().fold(0, fold)
        };
    }
    let mut v = 0u128;
    for k in 0..u64::from(f.bits.min(128)) {
        let pos = f.bit + k;
        let byte = data.get((pos / 8) as usize).copied().unwrap_or(0);
        if be {
            v = (v << 1) | u128::from((byte >> (7 - pos % 8)) & 1);
        } else {
            v |= u128::from((byte >> (pos % 8)) & 1) << k;
        }
    }
    v
}

/// Write the low `f.bits` bits of `value` at bit `f.bit` (see [`read_bits`]).
pub(crate) fn write_bits(data: &mut [u8], f: Field, value: u128, be: bool) {
    let start = (f.bit / 8) as usize;
    if f.byte_aligned() {
        let n = (f.bits / 8) as usize;
        let Some(b) = data.get_mut(start..start + n) else {
            return;
        };
        for (i, byte) in b.iter_mut().enumerate() {
            let shift = if be { (n - 1 - i) * 8 } else { i * 8 };
            *byte = (value >> shift) as u8;
        }
        return;
    }
    let nbits = u64::from(f.bits.min(128));
    for k in 0..nbits {
        let pos = f.bit + k;
        let bit = if be {
            (value >> (nbits - 1 - k)) & 1
        } else {
            (value >> k) & 1
        } as u8;
        let shift = if be { 7 - pos % 8 } else { pos % 8 };
        if let Some(byte) = data.get_mut((pos / 8) as usize) {
            *byte = (*byte & !(1 << shift)) | (bit << shift);
        }
    }
}
