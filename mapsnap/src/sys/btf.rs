//! BTF objects: read a loaded BTF's raw bytes by id, load a raw blob back into the kernel.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya_obj::generated::bpf_btf_info;

use super::bpf::{attr, bpf_cmd, call, call_fd, ptr_mut};
use super::{Result, SysError};

/// A BTF object loaded in the kernel.
#[derive(Debug)]
pub struct Btf {
    fd: OwnedFd,
}

fn get_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut at = attr();
    at.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    call_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut at)
        .map_err(|e| SysError::new("BPF_BTF_GET_FD_BY_ID", format!("BTF {id}"), e))
}

fn info(fd: BorrowedFd<'_>, buf: &mut [u8], id: u32) -> Result<u32> {
    // SAFETY: bpf_btf_info is plain-old-data made of integers; all-zero is valid.
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    if !buf.is_empty() {
        info.btf = ptr_mut(buf);
        info.btf_size = buf.len() as u32;
    }
    let mut at = attr();
    at.info.bpf_fd = fd.as_raw_fd() as u32;
    at.info.info_len = std::mem::size_of::<bpf_btf_info>() as u32;
    at.info.info = &mut info as *mut bpf_btf_info as u64;
    call(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut at)
        .map_err(|e| SysError::new("BPF_OBJ_GET_INFO_BY_FD", format!("BTF {id}"), e))?;
    Ok(info.btf_size)
}

/// The raw bytes (header, types, strings) of the loaded BTF object `id`.
pub fn btf_raw_by_id(id: u32) -> Result<Vec<u8>> {
    let fd = get_fd_by_id(id)?;
    // First ask for the size, then copy; the kernel reports the full size either way.
    let size = info(fd.as_fd(), &mut [], id)?;
    let mut buf = vec![0u8; size as usize];
    let copied = info(fd.as_fd(), &mut buf, id)?;
    buf.truncate(copied.min(size) as usize);
    Ok(buf)
}

impl Btf {
    /// Loads a raw BTF blob; on refusal the error carries the verifier's log.
    pub fn load(blob: &[u8]) -> Result<Self> {
        let load = |log: &mut [u8]| {
            let mut at = attr();
            // SAFETY: taking the BTF-load member of a zeroed union to fill its integers.
            let b = unsafe { &mut at.__bindgen_anon_7 };
            b.btf = blob.as_ptr() as u64;
            b.btf_size = blob.len() as u32;
            if !log.is_empty() {
                b.btf_log_buf = ptr_mut(log);
                b.btf_log_size = log.len() as u32;
                b.btf_log_level = 1;
            }
            call_fd(bpf_cmd::BPF_BTF_LOAD, &mut at)
        };
        match load(&mut []) {
            Ok(fd) => Ok(Self { fd }),
            Err(first) => {
                // Retry with a log so the message says why the kernel refused it.
                let mut log = vec![0u8; 64 * 1024];
                let err = load(&mut log).err().unwrap_or(first);
                let text = String::from_utf8_lossy(&log);
                let text = text.trim_end_matches('\0').trim();
                let last = text.lines().last().unwrap_or("");
                Err(SysError::new(
                    "BPF_BTF_LOAD",
                    format!("BTF blob of {} bytes", blob.len()),
                    std::io::Error::new(err.kind(), format!("{err}; kernel log: {last}")),
                ))
            }
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
