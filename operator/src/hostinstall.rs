//! `mapsnap-operator install-host-files`: the agent's first init container copies the
//! binaries CRIU and the runtime run on the host (mapsnap-hook, mapsnap, the CRIU plugin)
//! and, when asked, the storage config, from the image to host paths. Each file is written
//! under a temporary name and renamed into place, so a hook that runs meanwhile sees the old
//! or the new binary, never a partial one.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// One file to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    pub from: PathBuf,
    pub to: PathBuf,
    pub mode: u32,
    /// Skip it (with a note) when `from` does not exist.
    pub optional: bool,
}

/// The files of an install into `dest` (e.g. `/host/opt/mapsnap`), from the image's paths.
pub fn plan(image_bin: &Path, image_lib: &Path, dest: &Path) -> Vec<HostFile> {
    let bin = |name: &str, optional| HostFile {
        from: image_bin.join(name),
        to: dest.join("bin").join(name),
        mode: 0o755,
        optional,
    };
    vec![
        bin("mapsnap-hook", false),
        bin("mapsnap", true),
        HostFile {
            from: image_lib.join("libmapsnap_criu.so"),
            to: dest.join("lib").join("libmapsnap_criu.so"),
            mode: 0o644,
            optional: true,
        },
    ]
}

/// Copies each file; returns one line per file.
pub fn install(files: &[HostFile]) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        if f.optional && !f.from.exists() {
            out.push(format!("skipped {} (not in this image)", f.from.display()));
            continue;
        }
        let dir =
            f.to.parent()
                .ok_or_else(|| io::Error::other(format!("{} has no directory", f.to.display())))?;
        fs::create_dir_all(dir)?;
        let name =
            f.to.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::copy(&f.from, &tmp).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("copying {} to {}: {e}", f.from.display(), tmp.display()),
            )
        })?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(f.mode))?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &f.to)?;
        out.push(format!("installed {} (mode {:o})", f.to.display(), f.mode));
    }
    Ok(out)
}

/// Writes the concatenation of `parts` (e.g. the storage config and the hook's `[hook]`
/// table) to `to`, atomically, with `mode`.
pub fn install_joined(parts: &[PathBuf], to: &Path, mode: u32) -> io::Result<String> {
    let mut text = Vec::new();
    for p in parts {
        let mut bytes = fs::read(p)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))?;
        if !bytes.ends_with(b"\n") && !bytes.is_empty() {
            bytes.push(b'\n');
        }
        text.extend_from_slice(&bytes);
    }
    let dir = to
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no directory", to.display())))?;
    fs::create_dir_all(dir)?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, &text)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, to)?;
    Ok(format!(
        "installed {} from {} part(s) (mode {mode:o})",
        to.display(),
        parts.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_atomically_with_modes_and_skips_optional_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let bin = d.path().join("image/bin");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::write(bin.join("mapsnap-hook"), b"hook").expect("hook");
        let dest = d.path().join("host/opt/mapsnap");
        let mut files = plan(&bin, &d.path().join("image/lib"), &dest);
        files.push(HostFile {
            from: bin.join("mapsnap-hook"),
            to: d.path().join("host/etc/mapsnap/config.toml"),
            mode: 0o600,
            optional: false,
        });
        let lines = install(&files).expect("install");
        assert_eq!(lines.len(), 4, "{lines:?}");
        let hook = dest.join("bin/mapsnap-hook");
        assert_eq!(fs::read(&hook).expect("hook"), b"hook");
        assert_eq!(
            fs::metadata(&hook).expect("m").permissions().mode() & 0o777,
            0o755
        );
        let cfg = d.path().join("host/etc/mapsnap/config.toml");
        assert_eq!(
            fs::metadata(&cfg).expect("m").permissions().mode() & 0o777,
            0o600
        );
        assert!(!dest.join("bin/mapsnap").exists());
        // The storage config and the hook table, joined into one file.
        let table = d.path().join("hook.toml");
        fs::write(&table, "[hook]\noperator = true").expect("table");
        let joined = d.path().join("host/etc/mapsnap/joined.toml");
        install_joined(&[bin.join("mapsnap-hook"), table], &joined, 0o600).expect("joined");
        assert_eq!(
            fs::read_to_string(&joined).expect("read"),
            "hook\n[hook]\noperator = true\n"
        );
        // Again: same result, no temporary files left.
        install(&files).expect("again");
        assert_eq!(fs::read_dir(dest.join("bin")).expect("dir").count(), 1);
        // A missing required file is an error.
        fs::remove_file(bin.join("mapsnap-hook")).expect("rm");
        assert!(install(&files).is_err());
    }
}
