//! What a snapshot records about a map, independent of how it is read or stored.

use serde::{Deserialize, Serialize};

/// Kernel `enum bpf_map_type` values mapsnap knows by name.
///
/// Kept as plain numbers in [`MapMeta`] so a snapshot from a newer kernel with a type this
/// build does not know still parses (and is then refused by name at restore).
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PROG_ARRAY: u32 = 3;
    pub const PERF_EVENT_ARRAY: u32 = 4;
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const STACK_TRACE: u32 = 7;
    pub const CGROUP_ARRAY: u32 = 8;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
    pub const LPM_TRIE: u32 = 11;
    pub const ARRAY_OF_MAPS: u32 = 12;
    pub const HASH_OF_MAPS: u32 = 13;
    pub const DEVMAP: u32 = 14;
    pub const SOCKMAP: u32 = 15;
    pub const CPUMAP: u32 = 16;
    pub const XSKMAP: u32 = 17;
    pub const SOCKHASH: u32 = 18;
    pub const CGROUP_STORAGE: u32 = 19;
    pub const REUSEPORT_SOCKARRAY: u32 = 20;
    pub const PERCPU_CGROUP_STORAGE: u32 = 21;
    pub const QUEUE: u32 = 22;
    pub const STACK: u32 = 23;
    pub const SK_STORAGE: u32 = 24;
    pub const DEVMAP_HASH: u32 = 25;
    pub const STRUCT_OPS: u32 = 26;
    pub const RINGBUF: u32 = 27;
    pub const INODE_STORAGE: u32 = 28;
    pub const TASK_STORAGE: u32 = 29;
    pub const BLOOM_FILTER: u32 = 30;
    pub const USER_RINGBUF: u32 = 31;
    pub const CGRP_STORAGE: u32 = 32;
    pub const ARENA: u32 = 33;
}

/// Map creation flags that matter to mapsnap (uapi `BPF_F_*`).
pub mod map_flags {
    pub const NO_PREALLOC: u32 = 1 << 0;
    pub const NO_COMMON_LRU: u32 = 1 << 1;
    pub const NUMA_NODE: u32 = 1 << 2;
    /// User space may only read the map (syscall side).
    pub const RDONLY: u32 = 1 << 3;
    /// User space may only write the map (syscall side).
    pub const WRONLY: u32 = 1 << 4;
    pub const ZERO_SEED: u32 = 1 << 6;
    pub const RDONLY_PROG: u32 = 1 << 7;
    pub const WRONLY_PROG: u32 = 1 << 8;
    pub const MMAPABLE: u32 = 1 << 10;
    pub const PRESERVE_ELEMS: u32 = 1 << 11;
    pub const INNER_MAP: u32 = 1 << 12;
}

/// Printable name of a map type, as bpftool spells it.
pub fn type_name(t: u32) -> &'static str {
    use map_type::*;
    match t {
        HASH => "hash",
        ARRAY => "array",
        PROG_ARRAY => "prog_array",
        PERF_EVENT_ARRAY => "perf_event_array",
        PERCPU_HASH => "percpu_hash",
        PERCPU_ARRAY => "percpu_array",
        STACK_TRACE => "stack_trace",
        CGROUP_ARRAY => "cgroup_array",
        LRU_HASH => "lru_hash",
        LRU_PERCPU_HASH => "lru_percpu_hash",
        LPM_TRIE => "lpm_trie",
        ARRAY_OF_MAPS => "array_of_maps",
        HASH_OF_MAPS => "hash_of_maps",
        DEVMAP => "devmap",
        SOCKMAP => "sockmap",
        CPUMAP => "cpumap",
        XSKMAP => "xskmap",
        SOCKHASH => "sockhash",
        CGROUP_STORAGE => "cgroup_storage",
        REUSEPORT_SOCKARRAY => "reuseport_sockarray",
        PERCPU_CGROUP_STORAGE => "percpu_cgroup_storage",
        QUEUE => "queue",
        STACK => "stack",
        SK_STORAGE => "sk_storage",
        DEVMAP_HASH => "devmap_hash",
        STRUCT_OPS => "struct_ops",
        RINGBUF => "ringbuf",
        INODE_STORAGE => "inode_storage",
        TASK_STORAGE => "task_storage",
        BLOOM_FILTER => "bloom_filter",
        USER_RINGBUF => "user_ringbuf",
        CGRP_STORAGE => "cgrp_storage",
        ARENA => "arena",
        _ => "unknown",
    }
}

/// How mapsnap reads and writes the data of one map type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Keys and values, read with batch lookup or `get_next_key`, written with (batch) update.
    Keyed,
    /// Per-CPU keyed map: each value is `round_up(value_size, 8) * possible_cpus` bytes.
    PerCpu,
    /// Map of maps: values are inner maps (ids when read, fds when written).
    MapOfMaps,
    /// Queue or stack: no keys; read by draining, written by pushing.
    Queue,
}

/// Whether mapsnap can snapshot a map type, and if not, why (shown to users and in the README).
pub fn access_of(t: u32) -> Result<Access, &'static str> {
    use map_type::*;
    match t {
        HASH | LRU_HASH | ARRAY | LPM_TRIE | DEVMAP | DEVMAP_HASH | CPUMAP => Ok(Access::Keyed),
        PERCPU_HASH | LRU_PERCPU_HASH | PERCPU_ARRAY => Ok(Access::PerCpu),
        HASH_OF_MAPS | ARRAY_OF_MAPS => Ok(Access::MapOfMaps),
        QUEUE | STACK => Ok(Access::Queue),
        BLOOM_FILTER => Err("a bloom filter cannot be enumerated: its bits are not readable"),
        RINGBUF | USER_RINGBUF => Err("a ring buffer holds transient events, not state"),
        PERF_EVENT_ARRAY => Err("holds perf event fds, which only live on this host"),
        PROG_ARRAY => Err("holds BPF program fds, which a snapshot cannot carry"),
        SOCKMAP | SOCKHASH | REUSEPORT_SOCKARRAY => {
            Err("holds sockets, which only live in this kernel")
        }
        XSKMAP => Err("holds AF_XDP sockets, which only live in this kernel"),
        CGROUP_ARRAY => Err("holds cgroup fds, which only live on this host"),
        STRUCT_OPS => Err("holds kernel struct_ops state owned by a loaded program"),
        CGROUP_STORAGE
        | PERCPU_CGROUP_STORAGE
        | SK_STORAGE
        | INODE_STORAGE
        | TASK_STORAGE
        | CGRP_STORAGE => Err("local storage is keyed by kernel objects (sockets, tasks, \
             inodes, cgroups) that do not exist after a move"),
        STACK_TRACE => Err("stack ids are kernel-generated and cannot be written from user space"),
        ARENA => Err("arena memory is mapped pages, not key/value data"),
        _ => Err("this map type is unknown to this mapsnap build"),
    }
}

/// Rounds `n` up to a multiple of 8, the kernel's per-CPU value stride.
pub fn round_up8(n: u32) -> u32 {
    n.div_ceil(8) * 8
}

/// BTF that describes a map's key and value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BtfRef {
    /// Index of the BTF section in the snapshot (BTF shared by several maps is stored once).
    pub index: u32,
    pub key_type_id: u32,
    pub value_type_id: u32,
}

/// Where a map came from and what it looked like: everything needed to create it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMeta {
    /// Kernel `bpf_map_type` number (see [`map_type`]).
    pub map_type: u32,
    pub name: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    #[serde(default)]
    pub map_extra: u64,
    /// NUMA node the map was created on, where known (the kernel does not report it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default)]
    pub frozen: bool,
    /// Possible CPUs on the dumping machine; set for per-CPU maps only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub possible_cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btf: Option<BtfRef>,
    /// Pin path relative to the dumped bpffs root (never absolute, never `..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_path: Option<String>,
    /// Kernel map id at dump time (informational: ids are not kept across restore).
    #[serde(default)]
    pub source_id: u32,
    /// For maps of maps: index in the snapshot of the map used as the inner-map template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_template: Option<u32>,
    /// Set on maps stored only as an inner map of a map of maps (never pinned on restore).
    #[serde(default)]
    pub inner: bool,
}

impl MapMeta {
    /// Bytes of one key in a snapshot entry (0 for queues and stacks).
    pub fn key_len(&self) -> usize {
        match access_of(self.map_type) {
            Ok(Access::Queue) => 0,
            _ => self.key_size as usize,
        }
    }

    /// Bytes of one value in a snapshot entry: per-CPU values carry one 8-byte-aligned slot per
    /// possible CPU, maps of maps carry the snapshot index (u32) of the inner map.
    pub fn value_len(&self) -> usize {
        match access_of(self.map_type) {
            Ok(Access::PerCpu) => {
                round_up8(self.value_size) as usize * self.possible_cpus.unwrap_or(1) as usize
            }
            Ok(Access::MapOfMaps) => 4,
            _ => self.value_size as usize,
        }
    }

    pub fn type_name(&self) -> &'static str {
        type_name(self.map_type)
    }
}

/// Facts about the whole snapshot, written first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotInfo {
    /// mapsnap version that wrote it.
    pub tool: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    #[serde(default)]
    pub hostname: String,
    /// Kernel release (`uname -r`) of the dumping machine.
    #[serde(default)]
    pub kernel: String,
    /// Possible CPUs of the dumping machine.
    pub possible_cpus: u32,
    /// What was dumped (e.g. `pin:/sys/fs/bpf/app`, `pid:1234`), informational.
    #[serde(default)]
    pub source: String,
}
