//! One open BPF map and the element operations on it, with runtime-sized keys and values.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use aya::maps::MapData;
use aya_obj::generated::bpf_map_info;

use super::bpf::{attr, bpf_cmd, call, call_fd, ptr, ptr_mut};
use super::{Result, SysError};

/// Everything `bpf_map_info` reports about a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub name: String,
    /// Non-zero for maps offloaded to a device.
    pub ifindex: u32,
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub btf_vmlinux_value_type_id: u32,
    pub map_extra: u64,
}

/// Attributes of a map to create; mirrors `BPF_MAP_CREATE`.
#[derive(Debug, Clone, Default)]
pub struct CreateAttrs<'a> {
    pub map_type: u32,
    pub name: &'a str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub map_extra: u64,
    pub numa_node: Option<u32>,
    pub btf_fd: Option<BorrowedFd<'a>>,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
    pub inner_map_fd: Option<BorrowedFd<'a>>,
}

/// How a batch read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRead {
    /// Entries copied by this call (valid even when the walk ended).
    pub count: u32,
    /// The kernel reported ENOENT: there are no entries after these.
    pub done: bool,
}

/// An open map: an fd plus a label for error messages.
#[derive(Debug)]
pub struct Map {
    data: MapData,
    label: String,
    sizes: Sizes,
}

/// The buffer sizes the kernel reads or writes for one element of a map, taken from
/// `BPF_OBJ_GET_INFO_BY_FD` when the map is opened. Every element and batch call checks the
/// caller's slices against them first: a short slice would make the kernel read past it
/// (copying our heap into the map) or write past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub map_type: u32,
    /// Bytes of one key (0 for queues, stacks, bloom filters).
    pub key: usize,
    /// Bytes of one value as user space sees it: `round_up(value_size, 8) * possible CPUs`
    /// for per-CPU maps, 4 (an fd or id) for maps of maps, else `value_size`.
    pub value: usize,
    /// Bytes of a batch cursor (`in_batch`/`out_batch`): a u32 bucket index for the hash
    /// family, a whole key for the generic batch walk.
    pub cursor: usize,
}

impl Sizes {
    /// Sizes from a map's info; per-CPU maps need the possible-CPU count.
    pub fn of(map_type: u32, key_size: u32, value_size: u32) -> Result<Self> {
        const HASH: u32 = 1;
        const ARRAY_OF_MAPS: u32 = 12;
        const PERCPU_HASH: u32 = 5;
        const PERCPU_ARRAY: u32 = 6;
        const LRU_HASH: u32 = 9;
        const LRU_PERCPU_HASH: u32 = 10;
        const HASH_OF_MAPS: u32 = 13;
        const PERCPU_CGROUP_STORAGE: u32 = 21;
        let key = key_size as usize;
        let value = match map_type {
            PERCPU_HASH | PERCPU_ARRAY | LRU_PERCPU_HASH | PERCPU_CGROUP_STORAGE => {
                (value_size as usize).div_ceil(8) * 8 * super::possible_cpus()? as usize
            }
            ARRAY_OF_MAPS | HASH_OF_MAPS => 4,
            _ => value_size as usize,
        };
        let cursor = match map_type {
            HASH | PERCPU_HASH | LRU_HASH | LRU_PERCPU_HASH | HASH_OF_MAPS => 4,
            _ => key,
        };
        Ok(Self {
            map_type,
            key,
            value,
            cursor,
        })
    }
}

/// Ids of every map loaded in the kernel.
pub fn loaded_map_ids() -> Result<Vec<u32>> {
    aya::maps::loaded_maps()
        .map(|m| m.map(|m| m.id()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            SysError::new(
                "BPF_MAP_GET_NEXT_ID",
                "the kernel's maps",
                io::Error::other(e),
            )
        })
}

fn aya_err(op: &'static str, target: String, e: impl std::error::Error + 'static) -> SysError {
    // aya wraps the io::Error; keep its errno when it has one so callers can match on it.
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && let Some(errno) = io.raw_os_error()
        {
            return SysError::new(op, target, io::Error::from_raw_os_error(errno));
        }
        source = s.source();
    }
    SysError::new(op, target, io::Error::other(e.to_string()))
}

impl Map {
    fn wrap(data: MapData, what: String) -> Result<Self> {
        let mut map = Self {
            data,
            label: what,
            sizes: Sizes {
                map_type: 0,
                key: 0,
                value: 0,
                cursor: 0,
            },
        };
        let info = map.info()?;
        map.label = format!("map {} {:?}", info.id, info.name);
        map.sizes = Sizes::of(info.map_type, info.key_size, info.value_size)?;
        Ok(map)
    }

    /// The element sizes checked before every element and batch call.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// Refuses a slice shorter than the kernel will read or write, before the call.
    fn check_len(&self, op: &'static str, what: &str, got: usize, need: usize) -> Result<()> {
        if got >= need {
            return Ok(());
        }
        Err(self.err(
            op,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the {what} buffer is {got} bytes but the map needs {need}; refused before \
                     the call (the kernel would access bytes past its end)"
                ),
            ),
        ))
    }

    fn check_key(&self, op: &'static str, key: Option<&[u8]>) -> Result<()> {
        match key {
            Some(k) => self.check_len(op, "key", k.len(), self.sizes.key),
            // A NULL key is how queues and stacks are used (and the first key for next_key);
            // the kernel refuses it (EFAULT/EINVAL) on maps with keys, reading nothing of ours.
            None => Ok(()),
        }
    }

    /// `count` elements of `each` bytes, without overflow.
    fn check_batch(
        &self,
        op: &'static str,
        what: &str,
        got: usize,
        count: u32,
        each: usize,
    ) -> Result<()> {
        let need = (count as usize).checked_mul(each).ok_or_else(|| {
            self.err(
                op,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{count} entries of {each} bytes overflow"),
                ),
            )
        })?;
        self.check_len(op, what, got, need)
    }

    /// Opens the map with this kernel id.
    pub fn from_id(id: u32) -> Result<Self> {
        let data = MapData::from_id(id)
            .map_err(|e| aya_err("BPF_MAP_GET_FD_BY_ID", format!("map {id}"), e))?;
        Self::wrap(data, format!("map {id}"))
    }

    /// Opens the map with this kernel id with access flags (`BPF_F_RDONLY` = 1 << 3,
    /// `BPF_F_WRONLY` = 1 << 4): a read-only or write-only fd, as processes may hold.
    pub fn from_id_with_flags(id: u32, open_flags: u32) -> Result<Self> {
        let mut at = attr();
        at.__bindgen_anon_6.__bindgen_anon_1.map_id = id;
        at.__bindgen_anon_6.open_flags = open_flags;
        let fd = call_fd(bpf_cmd::BPF_MAP_GET_FD_BY_ID, &mut at)
            .map_err(|e| SysError::new("BPF_MAP_GET_FD_BY_ID", format!("map {id}"), e))?;
        Self::from_fd(fd)
    }

    /// Opens the map pinned at `path`; a pinned program or link is refused by name.
    ///
    /// Not aya's `MapData::from_pin`: it would read a program's info as if it were a map's.
    pub fn from_pin(path: &Path) -> Result<Self> {
        Self::from_obj_fd(obj_get(path)?, path.display().to_string())
    }

    /// Wraps an fd from `BPF_OBJ_GET`, refusing a pinned program or link by name.
    pub(crate) fn from_obj_fd(fd: OwnedFd, target: String) -> Result<Self> {
        match fd_kind(fd.as_fd()) {
            ObjKind::Map => {
                let data = MapData::from_fd(fd)
                    .map_err(|e| aya_err("BPF_OBJ_GET_INFO_BY_FD", target.clone(), e))?;
                Self::wrap(data, target)
            }
            other => Err(SysError::new(
                "BPF_OBJ_GET",
                target,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the pinned object is a {other:?}, not a BPF map"),
                ),
            )),
        }
    }

    /// Takes ownership of an fd that refers to a map.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let raw = fd.as_raw_fd();
        let data = MapData::from_fd(fd)
            .map_err(|e| aya_err("BPF_OBJ_GET_INFO_BY_FD", format!("fd {raw}"), e))?;
        Self::wrap(data, format!("fd {raw}"))
    }

    /// Creates a map with exactly these attributes.
    pub fn create(a: &CreateAttrs<'_>) -> Result<Self> {
        let mut at = attr();
        let name = sanitize_name(a.name);
        // SAFETY: writing plain integer fields of the map-create member of the union.
        let c = unsafe { &mut at.__bindgen_anon_1 };
        c.map_type = a.map_type;
        c.key_size = a.key_size;
        c.value_size = a.value_size;
        c.max_entries = a.max_entries;
        c.map_flags = a.flags;
        c.map_extra = a.map_extra;
        if let Some(node) = a.numa_node {
            c.numa_node = node;
        }
        for (dst, src) in c.map_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        if let Some(fd) = a.btf_fd {
            c.btf_fd = fd.as_raw_fd() as u32;
            c.btf_key_type_id = a.btf_key_type_id;
            c.btf_value_type_id = a.btf_value_type_id;
        }
        if let Some(fd) = a.inner_map_fd {
            c.inner_map_fd = fd.as_raw_fd() as u32;
        }
        let fd = call_fd(bpf_cmd::BPF_MAP_CREATE, &mut at)
            .map_err(|e| SysError::new("BPF_MAP_CREATE", format!("new map {:?}", a.name), e))?;
        Self::from_fd(fd)
    }

    /// A name for messages: `map <id> "<name>"`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    fn err(&self, op: &'static str, e: io::Error) -> SysError {
        SysError::new(op, self.label.clone(), e)
    }

    /// The kernel's full `bpf_map_info`.
    pub fn info(&self) -> Result<MapInfo> {
        let mut info: bpf_map_info = unsafe_zeroed_info();
        let mut at = attr();
        at.info.bpf_fd = self.fd().as_raw_fd() as u32;
        at.info.info_len = std::mem::size_of::<bpf_map_info>() as u32;
        at.info.info = &mut info as *mut bpf_map_info as u64;
        call(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut at)
            .map_err(|e| self.err("BPF_OBJ_GET_INFO_BY_FD", e))?;
        let name_bytes: Vec<u8> = info
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        Ok(MapInfo {
            map_type: info.type_,
            id: info.id,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            flags: info.map_flags,
            name: String::from_utf8_lossy(&name_bytes).into_owned(),
            ifindex: info.ifindex,
            btf_id: info.btf_id,
            btf_key_type_id: info.btf_key_type_id,
            btf_value_type_id: info.btf_value_type_id,
            btf_vmlinux_value_type_id: info.btf_vmlinux_value_type_id,
            map_extra: info.map_extra,
        })
    }

    /// Whether the map is frozen: only `/proc/self/fdinfo` tells.
    pub fn frozen(&self) -> Result<bool> {
        let path = format!("/proc/self/fdinfo/{}", self.fd().as_raw_fd());
        let text = std::fs::read_to_string(&path).map_err(|e| self.err("read fdinfo", e))?;
        Ok(fdinfo_field(&text, "frozen").is_some_and(|v| v != "0"))
    }

    /// Looks up `key` (None for queues/stacks: peek). Ok(false) when there is no such entry.
    pub fn lookup(&self, key: Option<&[u8]>, value: &mut [u8], flags: u64) -> Result<bool> {
        self.elem(
            bpf_cmd::BPF_MAP_LOOKUP_ELEM,
            "BPF_MAP_LOOKUP_ELEM",
            key,
            value,
            flags,
        )
    }

    /// Looks up and deletes `key` (None for queues/stacks: pop). Ok(false) when empty.
    pub fn lookup_and_delete(&self, key: Option<&[u8]>, value: &mut [u8]) -> Result<bool> {
        let op = "BPF_MAP_LOOKUP_AND_DELETE_ELEM";
        self.elem(bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM, op, key, value, 0)
    }

    fn elem(
        &self,
        cmd: bpf_cmd,
        op: &'static str,
        key: Option<&[u8]>,
        value: &mut [u8],
        flags: u64,
    ) -> Result<bool> {
        self.check_key(op, key)?;
        self.check_len(op, "value", value.len(), self.sizes.value)?;
        let mut at = attr();
        // SAFETY: writing plain integer fields of the element member of the union.
        let e = unsafe { &mut at.__bindgen_anon_2 };
        e.map_fd = self.fd().as_raw_fd() as u32;
        e.key = ptr(key);
        e.__bindgen_anon_1.value = ptr_mut(value);
        e.flags = flags;
        match call(cmd, &mut at) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err(op, e)),
        }
    }

    /// Inserts or replaces one element (`key` None for queue/stack push).
    pub fn update(&self, key: Option<&[u8]>, value: &[u8], flags: u64) -> Result<()> {
        let op = "BPF_MAP_UPDATE_ELEM";
        self.check_key(op, key)?;
        self.check_len(op, "value", value.len(), self.sizes.value)?;
        let mut at = attr();
        // SAFETY: writing plain integer fields of the element member of the union.
        let e = unsafe { &mut at.__bindgen_anon_2 };
        e.map_fd = self.fd().as_raw_fd() as u32;
        e.key = ptr(key);
        e.__bindgen_anon_1.value = value.as_ptr() as u64;
        e.flags = flags;
        call(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut at)
            .map(drop)
            .map_err(|e| self.err("BPF_MAP_UPDATE_ELEM", e))
    }

    /// Deletes one element. Ok(false) when it was not there.
    pub fn delete(&self, key: &[u8]) -> Result<bool> {
        self.check_key("BPF_MAP_DELETE_ELEM", Some(key))?;
        let mut at = attr();
        // SAFETY: writing plain integer fields of the element member of the union.
        let e = unsafe { &mut at.__bindgen_anon_2 };
        e.map_fd = self.fd().as_raw_fd() as u32;
        e.key = key.as_ptr() as u64;
        match call(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut at) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err("BPF_MAP_DELETE_ELEM", e)),
        }
    }

    /// Writes the key after `key` (the first key when None) into `next`; Ok(false) at the end.
    pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> Result<bool> {
        let op = "BPF_MAP_GET_NEXT_KEY";
        self.check_key(op, key)?;
        self.check_len(op, "next key", next.len(), self.sizes.key)?;
        let mut at = attr();
        // SAFETY: writing plain integer fields of the element member of the union.
        let e = unsafe { &mut at.__bindgen_anon_2 };
        e.map_fd = self.fd().as_raw_fd() as u32;
        e.key = ptr(key);
        e.__bindgen_anon_1.next_key = ptr_mut(next);
        match call(bpf_cmd::BPF_MAP_GET_NEXT_KEY, &mut at) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(self.err("BPF_MAP_GET_NEXT_KEY", e)),
        }
    }

    /// One `BPF_MAP_LOOKUP_BATCH` call: up to `max` entries after cursor `in_batch` (None: from
    /// the start) into `keys`/`values`; the next cursor goes to `out_batch`.
    ///
    /// ENOENT is the end of the walk and still carries entries; ENOSPC (nothing fitted) and
    /// ENOTSUPP (no batch support) are returned as errors for the caller to act on.
    pub fn lookup_batch(
        &self,
        in_batch: Option<&[u8]>,
        out_batch: &mut [u8],
        keys: &mut [u8],
        values: &mut [u8],
        max: u32,
    ) -> Result<BatchRead> {
        let op = "BPF_MAP_LOOKUP_BATCH";
        if let Some(c) = in_batch {
            self.check_len(op, "in_batch cursor", c.len(), self.sizes.cursor)?;
        }
        self.check_len(op, "out_batch cursor", out_batch.len(), self.sizes.cursor)?;
        self.check_batch(op, "keys", keys.len(), max, self.sizes.key)?;
        self.check_batch(op, "values", values.len(), max, self.sizes.value)?;
        let mut at = attr();
        at.batch.in_batch = ptr(in_batch);
        at.batch.out_batch = ptr_mut(out_batch);
        at.batch.keys = ptr_mut(keys);
        at.batch.values = ptr_mut(values);
        at.batch.count = max;
        at.batch.map_fd = self.fd().as_raw_fd() as u32;
        let res = call(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut at);
        // SAFETY: reading the integer the kernel wrote back into the batch member.
        let count = unsafe { at.batch.count };
        match res {
            Ok(_) => Ok(BatchRead { count, done: false }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(BatchRead { count, done: true }),
            Err(e) => Err(self.err("BPF_MAP_LOOKUP_BATCH", e)),
        }
    }

    /// One `BPF_MAP_UPDATE_BATCH` call for `count` entries; returns how many were written
    /// (the kernel stops at the first failing element and reports it as the error).
    pub fn update_batch(
        &self,
        keys: &[u8],
        values: &[u8],
        count: u32,
        elem_flags: u64,
    ) -> std::result::Result<u32, (u32, SysError)> {
        let op = "BPF_MAP_UPDATE_BATCH";
        self.check_batch(op, "keys", keys.len(), count, self.sizes.key)
            .and_then(|_| self.check_batch(op, "values", values.len(), count, self.sizes.value))
            .map_err(|e| (0, e))?;
        let mut at = attr();
        at.batch.keys = keys.as_ptr() as u64;
        at.batch.values = values.as_ptr() as u64;
        at.batch.count = count;
        at.batch.map_fd = self.fd().as_raw_fd() as u32;
        at.batch.elem_flags = elem_flags;
        let res = call(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut at);
        // SAFETY: reading the integer the kernel wrote back into the batch member.
        let done = unsafe { at.batch.count };
        res.map(|_| done)
            .map_err(|e| (done, self.err("BPF_MAP_UPDATE_BATCH", e)))
    }

    /// Makes the map read-only for user space from now on.
    pub fn freeze(&self) -> Result<()> {
        let mut at = attr();
        at.__bindgen_anon_2.map_fd = self.fd().as_raw_fd() as u32;
        call(bpf_cmd::BPF_MAP_FREEZE, &mut at)
            .map(drop)
            .map_err(|e| self.err("BPF_MAP_FREEZE", e))
    }

    /// Pins the map at `path` (which must not exist; bpffs only).
    pub fn pin(&self, path: &Path) -> Result<()> {
        self.data
            .pin(path)
            .map_err(|e| aya_err("BPF_OBJ_PIN", path.display().to_string(), e))
    }

    /// A second fd for the same map (e.g. to keep it alive in another owner).
    pub fn try_clone(&self) -> Result<Self> {
        let fd = self
            .fd()
            .try_clone_to_owned()
            .map_err(|e| self.err("dup", e))?;
        let data = MapData::from_fd(fd)
            .map_err(|e| aya_err("BPF_OBJ_GET_INFO_BY_FD", self.label.clone(), e))?;
        Ok(Self {
            data,
            label: self.label.clone(),
            sizes: self.sizes,
        })
    }
}

/// What kind of BPF object an fd refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjKind {
    Map,
    Program,
    Link,
    Btf,
    Other,
}

/// The kind of BPF object behind `fd`, from its anon-inode name.
pub fn fd_kind(fd: BorrowedFd<'_>) -> ObjKind {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    kind_from_link(
        &link
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// Classifies a `/proc/PID/fd/N` link target such as `anon_inode:bpf-map`.
pub fn kind_from_link(target: &str) -> ObjKind {
    match target {
        "anon_inode:bpf-map" => ObjKind::Map,
        "anon_inode:bpf-prog" => ObjKind::Program,
        "anon_inode:bpf_link" | "anon_inode:bpf-link" => ObjKind::Link,
        "anon_inode:btf" => ObjKind::Btf,
        _ => ObjKind::Other,
    }
}

/// `BPF_OBJ_GET` of the pin that `opath` (an `O_PATH` fd opened without following links)
/// refers to. `BPF_OBJ_GET` always follows a final symlink, even with `BPF_F_PATH_FD`, and
/// takes no empty path; pointing it at `/proc/self/fd/N` makes the kernel jump to exactly the
/// inode the fd holds, so nothing swapped in after the open can redirect it.
pub fn obj_get_opath(opath: BorrowedFd<'_>) -> Result<OwnedFd> {
    obj_get(Path::new(&format!("/proc/self/fd/{}", opath.as_raw_fd())))
}

/// `BPF_OBJ_PIN` of `map` as the leaf `name` in the directory `dir`: `BPF_F_PATH_FD`
/// (Linux >= 6.5), else the same through `/proc/self/fd/DIR/name`. Pinning never follows a
/// link at the leaf: an existing name fails with EEXIST.
pub fn obj_pin_at(map: &Map, dir: BorrowedFd<'_>, name: &str) -> Result<()> {
    let target = || format!("pin {name:?}");
    let c = std::ffi::CString::new(name).map_err(|_| {
        SysError::new(
            "BPF_OBJ_PIN",
            target(),
            io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"),
        )
    })?;
    let mut at = attr();
    at.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    at.__bindgen_anon_4.bpf_fd = map.fd().as_raw_fd() as u32;
    at.__bindgen_anon_4.file_flags = aya_obj::generated::BPF_F_PATH_FD;
    at.__bindgen_anon_4.path_fd = dir.as_raw_fd();
    match call(bpf_cmd::BPF_OBJ_PIN, &mut at) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Older kernel without BPF_F_PATH_FD: the same directory, named through its fd.
            let path = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
            let c = std::ffi::CString::new(path).map_err(|_| {
                SysError::new(
                    "BPF_OBJ_PIN",
                    target(),
                    io::Error::from_raw_os_error(libc::EINVAL),
                )
            })?;
            let mut at = attr();
            at.__bindgen_anon_4.pathname = c.as_ptr() as u64;
            at.__bindgen_anon_4.bpf_fd = map.fd().as_raw_fd() as u32;
            call(bpf_cmd::BPF_OBJ_PIN, &mut at)
                .map(drop)
                .map_err(|e| SysError::new("BPF_OBJ_PIN", target(), e))
        }
        Err(e) => Err(SysError::new("BPF_OBJ_PIN", target(), e)),
    }
}

/// `BPF_OBJ_GET`: opens whatever BPF object is pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let target = || path.display().to_string();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        SysError::new(
            "BPF_OBJ_GET",
            target(),
            io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })?;
    let mut at = attr();
    at.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    call_fd(bpf_cmd::BPF_OBJ_GET, &mut at).map_err(|e| SysError::new("BPF_OBJ_GET", target(), e))
}

fn unsafe_zeroed_info() -> bpf_map_info {
    // SAFETY: bpf_map_info is plain-old-data made of integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// The value of `field:` in an fdinfo text (`/proc/PID/fdinfo/FD`).
pub fn fdinfo_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == field).then(|| v.trim())
    })
}

/// Map names are at most 15 bytes of `[A-Za-z0-9_.]`; the kernel refuses anything else.
fn sanitize_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .take(15)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_parsing() {
        let t = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nmap_id:\t42\nfrozen:\t1\n";
        assert_eq!(fdinfo_field(t, "map_id"), Some("42"));
        assert_eq!(fdinfo_field(t, "frozen"), Some("1"));
        assert_eq!(fdinfo_field(t, "missing"), None);
    }

    #[test]
    fn names_are_kernel_safe() {
        assert_eq!(sanitize_name("my-map/with spaces"), "mymapwithspaces");
        assert_eq!(
            sanitize_name("a_very_long_map_name_indeed"),
            "a_very_long_map"
        );
    }
}
