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

/// Makes `to` hold exactly the key files of `from` (a mounted Secret: its visible regular
/// files, links followed, Kubernetes' `..data` bookkeeping skipped): each written atomically,
/// public keys (`*.pub`) and recipients mode 0644, everything else 0600, and files `to` held
/// that `from` no longer has removed, so a key taken out of the Secret stops being trusted
/// or used on the node.
pub fn install_key_dir(from: &Path, to: &Path) -> io::Result<Vec<String>> {
    let ctx = |what: &str, p: &Path| {
        let p = p.display().to_string();
        let what = what.to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
    };
    let mut names = Vec::new();
    for e in fs::read_dir(from).map_err(ctx("reading", from))? {
        let e = e.map_err(ctx("reading", from))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        names.push(name);
    }
    names.sort();
    fs::create_dir_all(to).map_err(ctx("creating", to))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).map_err(ctx("chmod", to))?;
    let files: Vec<HostFile> = names
        .iter()
        .map(|n| HostFile {
            from: from.join(n),
            to: to.join(n),
            mode: if n.ends_with(".pub") || n.contains("recipients") {
                0o644
            } else {
                0o600
            },
            optional: false,
        })
        .collect();
    let mut out = install(&files)?;
    for e in fs::read_dir(to).map_err(ctx("reading", to))? {
        let e = e.map_err(ctx("reading", to))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !names.contains(&name) && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            fs::remove_file(e.path()).map_err(ctx("removing", &e.path()))?;
            out.push(format!(
                "removed {} (no longer in the Secret)",
                e.path().display()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_dirs_mirror_the_secret_with_private_modes() {
        let d = tempfile::tempdir().expect("tempdir");
        let secret = d.path().join("secret");
        let data = secret.join("..2026_12_02");
        fs::create_dir_all(&data).expect("mkdir");
        fs::write(data.join("new.pub"), "pub").expect("write");
        fs::write(data.join("mapsnap.key"), "secret").expect("write");
        std::os::unix::fs::symlink("..2026_12_02", secret.join("..data")).expect("link");
        for n in ["new.pub", "mapsnap.key"] {
            std::os::unix::fs::symlink(format!("..data/{n}"), secret.join(n)).expect("link");
        }
        let to = d.path().join("host/etc/mapsnap/trust");
        fs::create_dir_all(&to).expect("mkdir");
        fs::write(to.join("old.pub"), "rotated out").expect("write");
        let lines = install_key_dir(&secret, &to).expect("install");
        assert_eq!(lines.len(), 3, "{lines:?}");
        let mut got: Vec<String> = fs::read_dir(&to)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, vec!["mapsnap.key", "new.pub"]);
        let mode = |n: &str| fs::metadata(to.join(n)).expect("meta").permissions().mode() & 0o777;
        assert_eq!((mode("new.pub"), mode("mapsnap.key")), (0o644, 0o600));
        assert!(
            !fs::symlink_metadata(to.join("new.pub"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
    }

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
