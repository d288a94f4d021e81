//! The syscall layer: the only module that calls `bpf(2)`.
//!
//! aya covers opening maps by id or pin, pinning and listing maps; what it keeps private
//! (runtime-sized element access, batch calls, full `bpf_map_info`, BTF by id, map creation
//! with every attribute, freeze) is written here once, over aya-obj's generated `bpf_attr`.

mod bpf;
mod btf;
mod cpus;
mod map;

pub use btf::{Btf, btf_raw_by_id};
pub use cpus::possible_cpus;
pub use map::fdinfo_field;
pub use map::{
    BatchRead, CreateAttrs, Map, MapInfo, ObjKind, Sizes, fd_kind, kind_from_link, loaded_map_ids,
    obj_get, obj_get_opath, obj_pin_at,
};

use std::io;

/// A failed kernel operation, naming the object and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on {target} failed: {source}{}", hint(.source))]
pub struct SysError {
    /// The bpf(2) command or file operation, e.g. `BPF_MAP_LOOKUP_BATCH`.
    pub op: &'static str,
    /// What it was applied to, e.g. `map 42 "counters"` or a path.
    pub target: String,
    #[source]
    pub source: io::Error,
}

impl SysError {
    pub fn new(op: &'static str, target: impl Into<String>, source: io::Error) -> Self {
        Self {
            op,
            target: target.into(),
            source,
        }
    }

    /// The raw errno, when the failure came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// The kernel's ENOTSUPP (524), which libc does not name: the map type lacks the operation.
pub const ENOTSUPP: i32 = 524;

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (run as root, or with CAP_BPF and CAP_SYS_ADMIN)"
        }
        Some(ENOTSUPP) => " (the kernel does not support this operation on this map type)",
        _ => "",
    }
}

pub type Result<T> = std::result::Result<T, SysError>;
