//! The plugin as shipped (scripts/build-criu-plugin.sh: zig-linked against glibc 2.28, without
//! object storage) loads on old hosts: the highest `GLIBC_` symbol version its ELF needs
//! (`.gnu.version_r`) is at most 2.28, it needs no library beyond glibc's and libgcc_s, it is
//! small, and this host's dynamic loader loads it and finds `CR_PLUGIN_DESC`.
//!
//! CRIU loads every `.so` of its plugin directory and aborts every dump and restore when one
//! fails to load, so a plugin needing `GLIBC_2.34` breaks checkpointing on a RHEL 8 node.

mod common;

use std::process::Command;

use object::Endianness;
use object::elf::FileHeader64;
use object::read::elf::FileHeader;

/// The oldest glibc the shipped plugin supports.
const OLDEST_GLIBC: (u32, u32) = (2, 28);

/// Every (library, version) the ELF's `.gnu.version_r` needs.
fn needed_versions(data: &[u8]) -> Vec<(String, String)> {
    let header = FileHeader64::<Endianness>::parse(data).expect("a 64-bit ELF");
    let endian = header.endian().expect("endianness");
    let sections = header.sections(endian, data).expect("section table");
    let (mut needs, link) = sections
        .gnu_verneed(endian, data)
        .expect("valid .gnu.version_r")
        .expect("a .gnu.version_r section");
    let strings = sections.strings(endian, data, link).expect("its strings");
    let mut out = Vec::new();
    while let Some((need, mut aux)) = needs.next().expect("verneed entry") {
        let file = String::from_utf8_lossy(need.file(endian, strings).expect("file name"));
        while let Some(a) = aux.next().expect("vernaux entry") {
            let name = String::from_utf8_lossy(a.name(endian, strings).expect("version name"));
            out.push((file.to_string(), name.to_string()));
        }
    }
    out
}

/// `GLIBC_2.34` -> (2, 34); other names (`GLIBC_PRIVATE`, `GCC_3.0`) -> None.
fn glibc_version(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("GLIBC_")?;
    let mut parts = rest.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn highest_glibc(needs: &[(String, String)]) -> Option<(u32, u32)> {
    needs.iter().filter_map(|(_, v)| glibc_version(v)).max()
}

#[test]
fn version_names_parse() {
    assert_eq!(glibc_version("GLIBC_2.34"), Some((2, 34)));
    assert_eq!(glibc_version("GLIBC_2.2.5"), Some((2, 2)));
    assert_eq!(glibc_version("GLIBC_PRIVATE"), None);
    assert_eq!(glibc_version("GCC_3.0"), None);
    assert!(
        (2, 9) < (2, 28),
        "versions compare numerically, not as text"
    );
}

#[test]
fn shipped_plugin_needs_at_most_glibc_2_28_and_loads() {
    let so = common::shipped_plugin_so();
    let data = std::fs::read(&so).expect("read the shipped plugin");
    let needs = needed_versions(&data);
    eprintln!("{} needs: {needs:?}", so.display());
    let highest = highest_glibc(&needs).expect("it needs some GLIBC_ versions");
    assert!(
        highest <= OLDEST_GLIBC,
        "{} needs GLIBC_{}.{}: it would not load on glibc {}.{} hosts",
        so.display(),
        highest.0,
        highest.1,
        OLDEST_GLIBC.0,
        OLDEST_GLIBC.1
    );
    assert!(
        !needs.iter().any(|(_, v)| v == "GLIBC_PRIVATE"),
        "GLIBC_PRIVATE symbols are tied to one glibc build"
    );
    let allowed = [
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    for (lib, _) in &needs {
        assert!(
            allowed.contains(&lib.as_str()),
            "unexpected dependency {lib}"
        );
    }

    // Without object storage: small, and no HTTP/TLS stack inside.
    let size = data.len();
    eprintln!("shipped plugin: {size} bytes (stripped of debug info)");
    assert!(
        size < 8 << 20,
        "{size} bytes: the plugin is expected well under 8 MiB without object storage"
    );
    for crate_name in ["object_store", "reqwest", "hyper", "rustls", "tokio"] {
        let needle = format!("/{crate_name}-");
        assert!(
            !data.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the plugin contains code of {crate_name} (a path {needle:?} in its panic \
             locations): build it alone (-p mapsnap-criu) so mapsnap's `remote` feature stays off"
        );
    }

    // This host's loader takes it and finds the descriptor CRIU looks up.
    let out = common::run(Command::new("python3").arg("-c").arg(format!(
        "import ctypes; d = ctypes.CDLL({:?}); ctypes.c_void_p.in_dll(d, 'CR_PLUGIN_DESC'); \
         print('loaded')",
        so.display().to_string()
    )));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("loaded"),
        "dlopen of the shipped plugin failed"
    );
}

/// The parser reads what the linker wrote: the plugin cargo builds for this host (glibc of
/// this machine) needs GLIBC_ versions too, and the test above would catch a newer one.
#[test]
fn host_build_versions_are_read() {
    let data = std::fs::read(common::plugin_so()).expect("read the host build");
    let needs = needed_versions(&data);
    let highest = highest_glibc(&needs).expect("GLIBC_ versions found");
    eprintln!("host build needs up to GLIBC_{}.{}", highest.0, highest.1);
    assert!(highest >= (2, 2), "{needs:?}");
    assert!(needs.iter().any(|(lib, _)| lib == "libc.so.6"), "{needs:?}");
}
