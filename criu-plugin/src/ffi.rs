//! Every `unsafe` line of this crate.
//!
//! - CRIU's plugin ABI (`criu-plugin.h`, plugin ABI 0.2.0 as in CRIU 4.1), mirrored by hand,
//!   and the exported [`CR_PLUGIN_DESC`] whose hooks call the safe code in [`crate::plugin`].
//! - The two functions the plugin takes from the `criu` binary that loaded it
//!   (`criu_get_image_dir`, `print_on_level`), looked up with `dlsym` so that the library also
//!   loads outside CRIU (tests) and in CRIU builds that lack one of them.
//! - Small fd and process helpers for the test helper binary and the tests (inherit an fd
//!   across exec, become a child subreaper, reap a pid).
//!
//! Newer CRIU releases keep this layout and only append hooks (their `max_hooks` is larger);
//! they read `hooks[i]` for `i < max_hooks` of *our* descriptor, so a 0.2.0 descriptor loads
//! there unchanged. Their `RESTORE_EXT_FILE` passes a second argument (`bool *retry_needed`),
//! which this hook ignores: with the C calling convention an extra argument is harmless, and
//! leaving it untouched means "no retry".

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use mapsnap::anchor::Anchor;

use crate::error::PluginError;

/// `CRIU_PLUGIN_GEN_VERSION(a, b, c)`.
pub const fn plugin_version(major: u32, minor: u32, sublevel: u32) -> u32 {
    (major << 16) + (minor << 8) + sublevel
}

/// `CRIU_PLUGIN_VERSION` of CRIU 4.1: plugin ABI 0.2.0.
pub const CRIU_PLUGIN_VERSION: c_uint = plugin_version(0, 2, 0);

/// Hook numbers (`CR_PLUGIN_HOOK__*`) as in CRIU 4.1's `criu-plugin.h`.
pub mod hook {
    pub const DUMP_UNIX_SK: usize = 0;
    pub const RESTORE_UNIX_SK: usize = 1;
    pub const DUMP_EXT_FILE: usize = 2;
    pub const RESTORE_EXT_FILE: usize = 3;
    pub const DUMP_EXT_MOUNT: usize = 4;
    pub const RESTORE_EXT_MOUNT: usize = 5;
    pub const DUMP_EXT_LINK: usize = 6;
    pub const HANDLE_DEVICE_VMA: usize = 7;
    pub const UPDATE_VMA_MAP: usize = 8;
    pub const RESUME_DEVICES_LATE: usize = 9;
    pub const PAUSE_DEVICES: usize = 10;
    pub const CHECKPOINT_DEVICES: usize = 11;
    /// `CR_PLUGIN_HOOK__MAX` of plugin ABI 0.2.0.
    pub const MAX: usize = 12;
}

/// Plugin stages (`CR_PLUGIN_STAGE__*`), the argument of `init` and `exit`.
pub mod stage {
    pub const DUMP: i32 = 0;
    pub const PRE_DUMP: i32 = 1;
    pub const RESTORE: i32 = 2;
}

/// `cr_plugin_desc_t`.
#[repr(C)]
#[derive(Debug)]
pub struct CrPluginDesc {
    pub name: *const c_char,
    pub init: Option<unsafe extern "C" fn(stage: c_int) -> c_int>,
    pub exit: Option<unsafe extern "C" fn(stage: c_int, ret: c_int)>,
    pub version: c_uint,
    pub max_hooks: c_uint,
    pub hooks: [*const c_void; hook::MAX],
}

// SAFETY: the descriptor is immutable after load (CRIU only reads it) and points at static
// data and functions, so sharing it between threads cannot race.
unsafe impl Sync for CrPluginDesc {}

/// The plugin's name in CRIU's logs.
pub const PLUGIN_NAME: &CStr = c"mapsnap";

const fn hooks() -> [*const c_void; hook::MAX] {
    let mut h = [std::ptr::null::<c_void>(); hook::MAX];
    h[hook::DUMP_EXT_FILE] = dump_ext_file as *const c_void;
    h[hook::RESTORE_EXT_FILE] = restore_ext_file as *const c_void;
    h
}

/// What CRIU looks up with `dlsym(handle, "CR_PLUGIN_DESC")`.
#[unsafe(no_mangle)]
pub static CR_PLUGIN_DESC: CrPluginDesc = CrPluginDesc {
    name: PLUGIN_NAME.as_ptr(),
    init: Some(plugin_init),
    exit: Some(plugin_exit),
    version: CRIU_PLUGIN_VERSION,
    max_hooks: hook::MAX as c_uint,
    hooks: hooks(),
};

/// Runs a hook body, turning a panic into an error return: unwinding into CRIU's C frames
/// would abort the whole dump or restore without a word in its log.
fn guarded(what: &str, on_panic: c_int, f: impl FnOnce() -> c_int) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(ret) => ret,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            log(LogLevel::Error, &format!("{what}: internal error: {msg}"));
            on_panic
        }
    }
}

extern "C" fn plugin_init(stage: c_int) -> c_int {
    guarded("init", -1, || crate::plugin::init(stage))
}

extern "C" fn plugin_exit(stage: c_int, ret: c_int) {
    guarded("exit", 0, || {
        crate::plugin::exit(stage, ret);
        0
    });
}

/// `DUMP_EXT_FILE(fd, id)`: 0 when the file was saved, `-ENOTSUP` when it is not ours.
extern "C" fn dump_ext_file(fd: c_int, id: c_int) -> c_int {
    guarded("dump", -libc::EIO, || {
        if fd < 0 {
            return -libc::EBADF;
        }
        // SAFETY: CRIU passes an fd it owns and keeps open until this hook returns; the
        // borrow does not outlive the call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        crate::plugin::dump_ext_file(fd, id as u32)
    })
}

/// `RESTORE_EXT_FILE(id)`: a new fd (CRIU installs it at the original number), `-ENOTSUP`
/// when the id is not ours, another negative errno on failure.
extern "C" fn restore_ext_file(id: c_int) -> c_int {
    guarded(
        "restore",
        -libc::EIO,
        || match crate::plugin::restore_ext_file(id as u32) {
            Ok(Some(fd)) => fd.into_raw_fd(),
            Ok(None) => -libc::ENOTSUP,
            Err(errno) => -errno,
        },
    )
}

/// CRIU's log levels (`criu-log.h` / `log.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    /// Printed whatever the log level.
    Msg = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

type PrintOnLevel = unsafe extern "C" fn(level: c_uint, format: *const c_char, ...);
type GetImageDir = unsafe extern "C" fn() -> c_int;

/// A symbol of the process (the `criu` binary exports its plugin API dynamically).
fn symbol(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name has no preconditions; a
    // missing symbol is a null return.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

fn print_on_level() -> Option<PrintOnLevel> {
    static F: OnceLock<Option<PrintOnLevel>> = OnceLock::new();
    *F.get_or_init(|| {
        let p = symbol(c"print_on_level");
        // SAFETY: when present, `print_on_level` is CRIU's
        // `void print_on_level(unsigned int loglevel, const char *format, ...)`.
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, PrintOnLevel>(p) })
    })
}

/// Writes one line to CRIU's log (`mapsnap: ...`), or to stderr outside CRIU.
pub fn log(level: LogLevel, msg: &str) {
    let prefix = match level {
        LogLevel::Error => "Error (mapsnap): ",
        LogLevel::Warn => "Warn  (mapsnap): ",
        _ => "mapsnap: ",
    };
    let line = format!("{prefix}{msg}\n").replace('\0', "\\0");
    match (print_on_level(), CString::new(line)) {
        (Some(f), Ok(c)) => {
            // SAFETY: a constant "%s" format with one valid NUL-terminated string argument.
            unsafe { f(level as c_uint, c"%s".as_ptr(), c.as_ptr()) }
        }
        (_, Ok(c)) => eprint!("{}", c.to_string_lossy()),
        (_, Err(_)) => {}
    }
}

/// CRIU's image directory (`criu_get_image_dir()`), as an anchor on a duplicate of CRIU's fd:
/// every file in it is then opened relative to that fd, never by a path (a worker thread
/// the deadline gave up on may outlive CRIU's own fd).
pub fn criu_image_dir() -> Result<Anchor, PluginError> {
    let p = symbol(c"criu_get_image_dir");
    if p.is_null() {
        return Err(PluginError::io(
            "finding CRIU's image directory",
            io::Error::new(
                io::ErrorKind::Unsupported,
                "criu_get_image_dir is not available: not running inside criu",
            ),
        ));
    }
    // SAFETY: CRIU's `int criu_get_image_dir(void)`, exported for plugins.
    let fd = unsafe { std::mem::transmute::<*mut c_void, GetImageDir>(p)() };
    if fd < 0 {
        return Err(PluginError::io(
            "finding CRIU's image directory",
            io::Error::other(format!("criu_get_image_dir() returned {fd}")),
        ));
    }
    let own = dup_raw(fd).map_err(|e| PluginError::io("dup of the image directory fd", e))?;
    Ok(Anchor::from_fd(own, "CRIU's image directory")?)
}

/// Keeps this library loaded until the process exits (`RTLD_NODELETE`): CRIU `dlclose`s
/// plugins after `exit`, and a worker thread that missed the deadline may still run our code.
pub fn keep_loaded() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
        // SAFETY: dladdr only reads the address (of our own static) and fills `info`.
        let found = unsafe {
            libc::dladdr(
                std::ptr::addr_of!(CR_PLUGIN_DESC).cast::<c_void>(),
                info.as_mut_ptr(),
            )
        };
        if found == 0 {
            return;
        }
        // SAFETY: dladdr succeeded, so `info` is initialised; dli_fname is a NUL-terminated
        // path owned by the loader (or null).
        let name = unsafe { info.assume_init() }.dli_fname;
        if name.is_null() {
            return;
        }
        // SAFETY: RTLD_NOLOAD only takes another reference on an already loaded object and
        // RTLD_NODELETE marks it never to be unloaded; the handle is deliberately leaked.
        unsafe {
            libc::dlopen(
                name,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            )
        };
    });
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sets or clears `FD_CLOEXEC`: a cleared fd is inherited by programs this process execs.
pub fn set_cloexec(fd: BorrowedFd<'_>, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on a live borrowed fd changes only its close-on-exec flag.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) }).map(drop)
}

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`), so
/// that processes killed by `criu dump` can be waited for and their pids freed for restore.
pub fn become_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }).map(drop)
}

/// Waits for child `pid` without blocking: Ok(true) when it was reaped (or is not our child).
pub fn try_reap(pid: u32) -> io::Result<bool> {
    let mut status: c_int = 0;
    // SAFETY: waitpid writes the exit status into a live c_int and nothing else.
    let ret = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    match ret {
        0 => Ok(false),
        r if r > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                Ok(true)
            } else {
                Err(e)
            }
        }
    }
}

/// A new fd (close-on-exec) for whatever open file fd number `n` refers to: for an fd
/// inherited from a parent or installed by CRIU, which no Rust object owns.
pub fn dup_raw(n: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads fd number `n` (EBADF when it is not open) and
    // returns a new fd that nothing else owns.
    let new = check(unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `new` was just created by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
