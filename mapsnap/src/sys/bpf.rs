//! The raw `bpf(2)` entry point. Every `unsafe` block of the crate that talks to the kernel is
//! in this directory; callers above see safe functions taking slices.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

pub(crate) use aya_obj::generated::{bpf_attr, bpf_cmd};

/// A zeroed `bpf_attr`: the kernel requires unused fields to be zero.
pub(crate) fn attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain-old-data union of integer fields; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Calls `bpf(cmd, attr)` and returns its non-negative result.
pub(crate) fn call(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable bpf_attr of the size we pass; the pointers inside it
    // were set by the safe callers from live slices that outlive this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Calls a bpf command that returns a new file descriptor.
pub(crate) fn call_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = call(cmd, attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned an invalid fd"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pointer to a slice as the u64 the kernel ABI wants (0 for an empty or absent slice).
pub(crate) fn ptr(s: Option<&[u8]>) -> u64 {
    s.map_or(0, |s| s.as_ptr() as u64)
}

pub(crate) fn ptr_mut(s: &mut [u8]) -> u64 {
    s.as_mut_ptr() as u64
}
