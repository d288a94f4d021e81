//! A hand-built raw BTF blob describing a map value with a `bpf_spin_lock`, the same layout
//! as `struct locked_value` in mapsnap/tests/bpf/test_maps.bpf.c:
//!
//! ```c
//! struct bpf_spin_lock { int val; };   // the kernel recognises it by name and size
//! struct locked_value {
//!     struct bpf_spin_lock lock;
//!     __u32 hits;
//!     __u64 packets;
//!     __u64 bytes;
//! };
//! ```
//!
//! The kernel refuses a map whose values hold a spin lock unless it is created with such BTF,
//! so this is what makes the helper's spin-lock map a real one (no clang needed inside a
//! container).

/// Type ids in the blob.
pub const U32_ID: u32 = 1;
pub const LOCKED_VALUE_ID: u32 = 5;
/// `sizeof(struct locked_value)`.
pub const LOCKED_VALUE_SIZE: u32 = 24;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const INT_SIGNED: u32 = 1 << 0;

#[derive(Default)]
struct Builder {
    types: Vec<u8>,
    strings: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        Self {
            types: Vec::new(),
            strings: vec![0], // offset 0 is the empty name
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }

    fn u32s(&mut self, words: &[u32]) {
        for w in words {
            self.types.extend_from_slice(&w.to_ne_bytes());
        }
    }

    fn int(&mut self, name: &str, size: u32, signed: bool) {
        let n = self.name(name);
        let encoding = if signed { INT_SIGNED } else { 0 };
        self.u32s(&[n, KIND_INT << 24, size, (encoding << 24) | (size * 8)]);
    }

    /// A struct with members (name, type id, bit offset).
    fn structure(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) {
        let n = self.name(name);
        self.u32s(&[n, (KIND_STRUCT << 24) | members.len() as u32, size]);
        for (m, ty, bits) in members {
            let mn = self.name(m);
            self.u32s(&[mn, *ty, *bits]);
        }
    }

    fn finish(self) -> Vec<u8> {
        let hdr_len = 24u32;
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
        out.push(1); // version
        out.push(0); // flags
        for w in [
            hdr_len,
            0,
            self.types.len() as u32,
            self.types.len() as u32,
            self.strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// The raw BTF blob (native byte order).
pub fn spin_lock_btf() -> Vec<u8> {
    let mut b = Builder::new();
    b.int("unsigned int", 4, false); // 1
    b.int("long long unsigned int", 8, false); // 2
    b.int("int", 4, true); // 3
    b.structure("bpf_spin_lock", 4, &[("val", 3, 0)]); // 4
    b.structure(
        "locked_value",
        LOCKED_VALUE_SIZE,
        &[
            ("lock", 4, 0),
            ("hits", 1, 32),
            ("packets", 2, 64),
            ("bytes", 2, 128),
        ],
    ); // 5
    b.finish()
}
