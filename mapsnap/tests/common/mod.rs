//! Helpers shared by mapsnap's kernel integration tests.
//!
//! Use from a test file with `mod common;`. These tests need root (CAP_BPF and
//! CAP_SYS_ADMIN), a bpffs at /sys/fs/bpf and clang; `make deps` (scripts/install-deps.sh)
//! installs and mounts all of that.
//!
//! - [`ensure_bpffs`]: checks root and mounts bpffs if needed (once per process).
//! - [`bpf_object`]: compiles `tests/bpf/test_maps.bpf.c` with clang (once per process).
//! - [`fresh_pin_dir`]: a unique, empty bpffs directory, removed with everything pinned
//!   in it when the returned [`PinDir`] guard drops.
//! - [`load_test_object`]: loads the object with aya; every map is pinned by name
//!   (`LIBBPF_PIN_BY_NAME` in the C file) under the given directory.
//! - [`bpftool_json`]: runs `bpftool -j ...` and parses its output.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    fs,
    io::ErrorKind,
    ops::Deref,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

/// Where bpffs is (and must be) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Parent of every directory made by [`fresh_pin_dir`].
pub const TEST_PIN_ROOT: &str = "/sys/fs/bpf/mapsnap-test";
/// The C source of the test object.
pub const BPF_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bpf/test_maps.bpf.c");

/// Every map in the test object: (name, kernel type, carries key/value BTF).
///
/// QUEUE/STACK (keyless: the kernel refuses value BTF on them) and the map-in-map outer maps
/// are created without key/value BTF by aya, like libbpf, so their `btf_id` is 0.
pub const TEST_MAPS: &[(&str, aya::maps::MapType, bool)] = {
    use aya::maps::MapType as T;
    &[
        ("flows", T::Hash, true),
        ("locked", T::Hash, true),
        ("lru", T::LruHash, true),
        ("pcpu", T::PerCpuHash, true),
        ("arr", T::Array, true),
        ("pcpu_arr", T::PerCpuArray, true),
        ("trie", T::LpmTrie, true),
        ("outer_hash", T::HashOfMaps, false),
        ("outer_arr", T::ArrayOfMaps, false),
        ("fifo", T::Queue, false),
        ("lifo", T::Stack, false),
    ]
};

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|mounts| {
            mounts.lines().any(|line| {
                let mut f = line.split_whitespace();
                let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some(BPFFS) && fstype == Some("bpf")
            })
        })
        .unwrap_or(false)
}

/// Panics with a clear message unless running as root with bpffs mounted at /sys/fs/bpf
/// (mounting it first when it is missing).
pub fn ensure_bpffs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "mapsnap kernel tests must run as root (euid is {euid}): they create, pin and load BPF objects"
        );
        if bpffs_mounted() {
            return;
        }
        let _ = fs::create_dir_all(BPFFS);
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", BPFFS])
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()) && bpffs_mounted(),
            "bpffs is not mounted at {BPFFS} and `mount -t bpf bpf {BPFFS}` failed ({status:?}): run `make deps`"
        );
    });
}

/// Compiles `tests/bpf/test_maps.bpf.c` with clang (once per test process) into
/// `CARGO_TARGET_TMPDIR` and returns the object's path.
///
/// `CLANG` overrides the compiler. Safe to call from parallel processes (nextest): each
/// compiles to its own temporary file and renames it into place.
pub fn bpf_object() -> PathBuf {
    static OBJECT: OnceLock<PathBuf> = OnceLock::new();
    OBJECT.get_or_init(compile_bpf_object).clone()
}

fn compile_bpf_object() -> PathBuf {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(out_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", out_dir.display()));
    let out = out_dir.join("test_maps.bpf.o");
    let tmp = out_dir.join(format!("test_maps.bpf.o.{}.tmp", std::process::id()));
    let clang = std::env::var_os("CLANG").unwrap_or_else(|| "clang".into());
    // <linux/bpf.h> pulls <asm/types.h> from Debian's multiarch include dir, which
    // clang -target bpf does not search on its own.
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);

    let output = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(&multiarch)
        .args(["-c", BPF_SOURCE, "-o"])
        .arg(&tmp)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "{} not found: run `make deps` (scripts/install-deps.sh installs clang, llvm and libbpf-dev)",
            Path::new(&clang).display()
        ),
        Err(e) => panic!("cannot run {}: {e}", Path::new(&clang).display()),
    };
    if !output.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "clang failed to compile {BPF_SOURCE} ({}); if headers are missing run `make deps`:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::rename(&tmp, &out)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), out.display()));
    out
}

/// A unique, empty directory under [`TEST_PIN_ROOT`]; on drop it is removed together with
/// everything pinned in it (which releases those maps once nothing else holds them).
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for PinDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for PinDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for PinDir {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != ErrorKind::NotFound
        {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Creates `/sys/fs/bpf/mapsnap-test/<name>-<pid>-<n>`, empty (a stale one left by a
/// crashed run with the same pid is removed first). Mounts bpffs if needed.
pub fn fresh_pin_dir(name: &str) -> PinDir {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    ensure_bpffs();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = Path::new(TEST_PIN_ROOT).join(format!("{name}-{}-{n}", std::process::id()));
    match fs::remove_dir_all(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove stale {}: {e}", path.display()),
    }
    fs::create_dir_all(&path)
        .unwrap_or_else(|e| panic!("cannot create pin dir {}: {e}", path.display()));
    PinDir { path }
}

/// Loads the test object with aya. Every map is created and pinned as `<pin_dir>/<name>`
/// (or reused, if a map is already pinned there: aya's behaviour for `LIBBPF_PIN_BY_NAME`).
/// Programs are parsed but not loaded into the kernel.
pub fn load_test_object(pin_dir: &Path) -> aya::Ebpf {
    ensure_bpffs();
    let object = bpf_object();
    aya::EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load_file(&object)
        .unwrap_or_else(|e| {
            panic!(
                "aya could not load {} with maps pinned in {}: {e} ({e:?})",
                object.display(),
                pin_dir.display()
            )
        })
}

/// Runs `bpftool -j <args>` and returns its parsed JSON output; panics with bpftool's
/// stderr on failure.
pub fn bpftool_json<I, S>(args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    let output = match Command::new("bpftool").arg("-j").args(&args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("bpftool not found: run `make deps` (scripts/install-deps.sh)")
        }
        Err(e) => panic!("cannot run bpftool: {e}"),
    };
    assert!(
        output.status.success(),
        "`bpftool -j {}` failed ({}): {}",
        shown.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool -j {}` printed invalid JSON ({e}): {}",
            shown.join(" "),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// `bpftool -j map show pinned <path>`.
pub fn bpftool_map_show(path: &Path) -> serde_json::Value {
    bpftool_json([
        OsStr::new("map"),
        OsStr::new("show"),
        OsStr::new("pinned"),
        path.as_os_str(),
    ])
}
