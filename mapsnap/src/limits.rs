//! Bounds on what a snapshot, a manifest or a file read from outside may make mapsnap
//! allocate, decode or ask the kernel for.
//!
//! A snapshot is input from whoever could write its location. Without bounds, zstd turns a
//! few KB into 64 MiB of BTF kept per blob, a map of maps brings any number of inner maps,
//! and `max_entries` = 2^31 on an array asks the kernel for 16 GiB. Every limit here is
//! checked before the allocation or map creation it guards, and a violation names what
//! exceeded it, the limit, and the command-line flag that raises it.

use crate::model::{Access, MapMeta, access_of, map_flags, map_type, round_up8};

/// The bounds, with defaults that fit real workloads with room to spare (see
/// `docs/FORMAT.md`, "Limits"). Callers with other needs (the OCI hook, the CRIU plugin)
/// set their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maps in one snapshot, inner maps of maps of maps included. `--max-maps`.
    pub max_maps: u32,
    /// Bytes of one BTF blob. `--max-btf-blob`.
    pub max_btf_blob: u64,
    /// Bytes of all BTF blobs of one snapshot together (all are kept until the end of a
    /// restore). `--max-btf-bytes`.
    pub max_btf_total: u64,
    /// Estimated kernel memory of the maps a restore creates (see [`kernel_memory`]).
    /// `--max-kernel-memory`.
    pub max_kernel_memory: u64,
    /// Map-of-maps nesting: 1 allows a map of maps holding plain maps (all the kernel
    /// supports today). `--max-nesting`.
    pub max_nesting: u32,
    /// Stored and decoded bytes of one section (a zstd frame is decompressed into at most
    /// this). `--max-section`.
    pub max_section: u32,
    /// Bytes of a manifest. `--max-manifest-bytes`.
    pub max_manifest: u64,
    /// Bytes of a snapshot file read from a local path. `--max-file-bytes`.
    pub max_file: u64,
}

/// One GiB.
const GIB: u64 = 1 << 30;
/// One MiB.
const MIB: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_maps: 4096,
            max_btf_blob: 16 * MIB,
            max_btf_total: 64 * MIB,
            max_kernel_memory: 4 * GIB,
            max_nesting: 1,
            max_section: crate::format::MAX_SECTION_LEN,
            max_manifest: MIB,
            max_file: 64 * GIB,
        }
    }
}

/// A limit was exceeded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what}: {quantity} is {value}, more than the limit of {max}; refused before anything was \
     allocated or created (raise it with --{flag} if this input is trusted)"
)]
pub struct LimitError {
    /// The map, section or file, e.g. `snapshot map 3 "flows"` or `BTF section 2`.
    pub what: String,
    /// What was measured, e.g. `estimated kernel memory (bytes)`.
    pub quantity: &'static str,
    pub value: u64,
    pub max: u64,
    /// The command-line flag that raises it (without `--`).
    pub flag: &'static str,
}

impl Limits {
    /// `Err` when `value > max`.
    pub fn check(
        what: impl FnOnce() -> String,
        quantity: &'static str,
        value: u64,
        max: u64,
        flag: &'static str,
    ) -> Result<(), LimitError> {
        if value <= max {
            return Ok(());
        }
        Err(LimitError {
            what: what(),
            quantity,
            value,
            max,
            flag,
        })
    }
}

/// Parses a byte size: a number with an optional `K`, `M`, `G`, `T` (powers of 1024,
/// `KiB`/`MiB`/... and a trailing `B` accepted), e.g. `64MiB`, `4G`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 1048576, 64MiB or 4G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Rough per-element bookkeeping of the kernel's hash table (`struct htab_elem` without
/// key and value, plus allocator slack).
const HTAB_ELEM_OVERHEAD: u64 = 64;
/// One hash bucket (`struct bucket`).
const HTAB_BUCKET: u64 = 16;
/// One LPM trie node without key and value.
const LPM_NODE_OVERHEAD: u64 = 48;

/// Estimated kernel memory (bytes) of a restored map: what creating it allocates
/// (`fixed`), and what each of `entries` entries adds on top (0 for preallocated maps).
///
/// Preallocated maps (arrays, hash maps without `BPF_F_NO_PREALLOC`, LRU maps, queues)
/// pay for `max_entries` at creation; per-CPU maps pay each value once per possible CPU.
/// The figures follow the kernel's own layouts closely enough to stop a hostile
/// `max_entries` (2^31 entries of an array is 16 GiB); they are not an exact account.
pub fn kernel_memory(meta: &MapMeta, cpus: u32) -> (u64, u64) {
    let max = u64::from(meta.max_entries);
    let key = u64::from(round_up8(meta.key_size.min(u32::MAX - 7)));
    let value = u64::from(round_up8(meta.value_size.min(u32::MAX - 7)));
    let cpus = u64::from(cpus.max(1));
    let per_cpu = matches!(access_of(meta.map_type), Ok(Access::PerCpu));
    // Per-CPU values live in per-CPU allocations; the element holds a pointer to them.
    let value_cost = if per_cpu {
        value.saturating_mul(cpus).saturating_add(8)
    } else {
        value
    };
    match meta.map_type {
        map_type::ARRAY
        | map_type::PERCPU_ARRAY
        | map_type::ARRAY_OF_MAPS
        | map_type::PROG_ARRAY
        | map_type::CGROUP_ARRAY
        | map_type::PERF_EVENT_ARRAY
        | map_type::DEVMAP
        | map_type::CPUMAP
        | map_type::XSKMAP => (max.saturating_mul(value_cost), 0),
        map_type::HASH
        | map_type::PERCPU_HASH
        | map_type::LRU_HASH
        | map_type::LRU_PERCPU_HASH
        | map_type::HASH_OF_MAPS
        | map_type::DEVMAP_HASH => {
            let buckets = max
                .checked_next_power_of_two()
                .unwrap_or(u64::MAX)
                .saturating_mul(HTAB_BUCKET);
            let elem = HTAB_ELEM_OVERHEAD
                .saturating_add(key)
                .saturating_add(value_cost);
            let lru = matches!(
                meta.map_type,
                map_type::LRU_HASH | map_type::LRU_PERCPU_HASH
            );
            if lru || meta.flags & map_flags::NO_PREALLOC == 0 {
                (buckets.saturating_add(max.saturating_mul(elem)), 0)
            } else {
                (buckets, elem)
            }
        }
        map_type::LPM_TRIE => (
            0,
            LPM_NODE_OVERHEAD.saturating_add(key).saturating_add(value),
        ),
        map_type::QUEUE | map_type::STACK => (max.saturating_add(1).saturating_mul(value), 0),
        _ => (max.saturating_mul(key.saturating_add(value_cost)), 0),
    }
}

/// A running total of estimated kernel memory, checked against [`Limits::max_kernel_memory`]
/// before each map is created and before each chunk of entries is written.
#[derive(Debug, Clone)]
pub struct KernelBudget {
    used: u64,
    max: u64,
    cpus: u32,
}

impl KernelBudget {
    pub fn new(limits: &Limits, cpus: u32) -> Self {
        Self {
            used: 0,
            max: limits.max_kernel_memory,
            cpus,
        }
    }

    /// Estimated bytes so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    fn add(&mut self, what: impl FnOnce() -> String, bytes: u64) -> Result<(), LimitError> {
        let total = self.used.saturating_add(bytes);
        Limits::check(
            what,
            "the estimated kernel memory of the restored maps (bytes)",
            total,
            self.max,
            "max-kernel-memory",
        )?;
        self.used = total;
        Ok(())
    }

    /// Accounts for creating `meta` (and, when known, its `entries`).
    pub fn map(
        &mut self,
        what: impl Fn() -> String,
        meta: &MapMeta,
        entries: u64,
    ) -> Result<(), LimitError> {
        let (fixed, _) = kernel_memory(meta, self.cpus);
        self.add(&what, fixed)?;
        self.entries(what, meta, entries)
    }

    /// Accounts for `n` more entries written into `meta`.
    pub fn entries(
        &mut self,
        what: impl FnOnce() -> String,
        meta: &MapMeta,
        n: u64,
    ) -> Result<(), LimitError> {
        let (_, each) = kernel_memory(meta, self.cpus);
        self.add(what, each.saturating_mul(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(map_type: u32, key: u32, value: u32, max: u32, flags: u32) -> MapMeta {
        MapMeta {
            map_type,
            name: "m".into(),
            key_size: key,
            value_size: value,
            max_entries: max,
            flags,
            map_extra: 0,
            numa_node: None,
            frozen: false,
            possible_cpus: None,
            btf: None,
            pin_path: None,
            source_id: 0,
            inner_template: None,
            inner: false,
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("10B"), Ok(10));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn estimates_follow_allocation() {
        // 2^31 entries of an 8-byte array: 16 GiB at creation.
        let (fixed, each) = kernel_memory(&meta(map_type::ARRAY, 4, 8, 1 << 31, 0), 2);
        assert_eq!((fixed, each), (16 << 30, 0));
        // Per-CPU: once per CPU, plus the pointer.
        let (fixed, _) = kernel_memory(&meta(map_type::PERCPU_ARRAY, 4, 12, 10, 0), 4);
        assert_eq!(fixed, 10 * (16 * 4 + 8));
        // A sparse hash without preallocation pays buckets up front, elements as written.
        let (fixed, each) =
            kernel_memory(&meta(map_type::HASH, 8, 8, 1000, map_flags::NO_PREALLOC), 2);
        assert_eq!(fixed, 1024 * HTAB_BUCKET);
        assert_eq!(each, HTAB_ELEM_OVERHEAD + 16);
        // The same map preallocated pays every element at creation.
        let (fixed, each) = kernel_memory(&meta(map_type::HASH, 8, 8, 1000, 0), 2);
        assert_eq!(
            (fixed, each),
            (1024 * HTAB_BUCKET + 1000 * (HTAB_ELEM_OVERHEAD + 16), 0)
        );
    }

    #[test]
    fn budget_names_the_flag() {
        let l = Limits {
            max_kernel_memory: 1 << 20,
            ..Limits::default()
        };
        let mut b = KernelBudget::new(&l, 2);
        b.map(|| "small".into(), &meta(map_type::ARRAY, 4, 8, 1000, 0), 0)
            .expect("fits");
        let e = b
            .map(
                || "snapshot map 1 \"big\"".into(),
                &meta(map_type::ARRAY, 4, 8, 1 << 31, 0),
                0,
            )
            .expect_err("too big");
        let msg = e.to_string();
        assert!(msg.contains("snapshot map 1 \"big\""), "{msg}");
        assert!(msg.contains("--max-kernel-memory"), "{msg}");
        assert_eq!(b.used(), 8000);
    }
}
