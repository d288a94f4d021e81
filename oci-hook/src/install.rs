//! `mapsnap-hook install`: the hooks.d files CRI-O, Podman and containerd's NRI hook-injector
//! read, and the CRIU config lines runc and crun pass to CRIU. Idempotent; `--uninstall`
//! removes exactly what it adds.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{HookError, Result};

/// Which runtime the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Crio,
    Podman,
    Containerd,
}

#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub runtime: Runtime,
    /// Everything is written under this directory (default `/`).
    pub root: PathBuf,
    /// The hook binary as the runtime will run it.
    pub hook_path: PathBuf,
    /// A config file other than /etc/mapsnap/config.toml, passed to every hook run.
    pub config: Option<PathBuf>,
    /// Directory with the CRIU plugin (`libmapsnap_criu.so`), for CRIU's `libdir`.
    pub criu_libdir: Option<PathBuf>,
    /// The CRIU plugin to copy into CRIU's default plugin directory (`/usr/lib/criu`).
    pub criu_plugin: Option<PathBuf>,
    /// containerd: the NRI hook-injector binary to enable as a pre-registered plugin.
    pub nri_plugin: Option<PathBuf>,
    /// The hook timeout written into hooks.d (seconds); keep [hook] deadline below it.
    pub timeout: u32,
    pub uninstall: bool,
}

/// Where the hooks.d files go: the one directory CRI-O (`hooks_dir` default) and Podman
/// (containers.conf `hooks_dir` default) both read. `/etc/containers/oci/hooks.d` is read only
/// where a config names it (Podman 4.3 ignores it by default).
pub const HOOKS_DIR: &str = "usr/share/containers/oci/hooks.d";
/// Where earlier versions wrote them: install and uninstall remove our files from there.
pub const LEGACY_HOOKS_DIR: &str = "etc/containers/oci/hooks.d";
/// Configs that can replace the default hooks directories, and the key that does it.
const HOOKS_DIR_CONFIGS: &[(Runtime, &str)] = &[
    (Runtime::Crio, "etc/crio/crio.conf"),
    (Runtime::Crio, "etc/crio/crio.conf.d"),
    (Runtime::Podman, "etc/containers/containers.conf"),
    (Runtime::Podman, "etc/containers/containers.conf.d"),
    (Runtime::Podman, "usr/share/containers/containers.conf"),
];
pub const CRIU_CONFS: &[&str] = &["etc/criu/runc.conf", "etc/criu/crun.conf"];
pub const NRI_PLUGIN_LINK: &str = "opt/nri/plugins/10-hook-injector";
/// CRIU's default plugin directory (used when no `libdir` is configured).
pub const CRIU_PLUGIN_DEST: &str = "usr/lib/criu/libmapsnap_criu.so";
const MARK: &str = "# mapsnap-hook: pinned BPF maps at checkpoint (`mapsnap-hook install --uninstall` removes these lines)";

/// The stages installed, each in its own hooks.d file (a hook does not learn its stage from
/// the runtime, so each file passes it as an argument).
pub const STAGES: &[&str] = &["createRuntime", "poststart", "poststop"];

/// The `when` condition: any `mapsnap.io/` annotation (anchored: hooks.d regexes are not).
pub const WHEN_KEY: &str = r"^mapsnap\.io/[a-z0-9-]+$";

fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

fn hook_file(stage: &str) -> String {
    format!("mapsnap-hook-{}.json", stage.to_ascii_lowercase())
}

/// The hooks.d JSON for one stage.
pub fn hook_json(opts: &InstallOptions, stage: &str) -> String {
    let mut args = vec!["mapsnap-hook".to_string()];
    if let Some(c) = &opts.config {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    args.push("oci".into());
    args.push(stage.into());
    let v = json!({
        "version": "1.0.0",
        "hook": {
            "path": opts.hook_path.display().to_string(),
            "args": args,
            "timeout": opts.timeout,
        },
        "when": { "annotations": { WHEN_KEY: ".*" } },
        "stages": [stage],
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Where the CRIU action wrapper goes when the hook needs arguments (`--config`): CRIU's
/// config file takes no arguments after the script path (this CRIU refuses quoted values).
pub const CRIU_WRAPPER: &str = "usr/local/libexec/mapsnap-hook/criu-action";

/// The wrapper's text, when one is needed.
pub fn criu_wrapper(opts: &InstallOptions) -> Option<String> {
    let c = opts.config.as_ref()?;
    Some(criu_wrapper_text(&opts.hook_path, c))
}

/// The CRIU action wrapper that runs `hook` with `config`. Everything it ends in the shell
/// saves a start of the hook inside CRIU's freeze: every action but post-dump, and the second
/// post-dump of a dump (CRIU under runc runs each action twice) once the first one left
/// [`crate::flows::POST_DUMP_MARKER`] newer than this dump's `pstree.img`. A shell whose `-nt`
/// compares whole seconds only skips less; a marker of an earlier dump is never newer.
pub fn criu_wrapper_text(hook: &Path, config: &Path) -> String {
    format!(
        "#!/bin/sh\n# Written by `mapsnap-hook install`: CRIU's action script. Only post-dump has\n\
         # work; CRIU runs most actions inside its freeze, so the others end here, and so does\n\
         # the second post-dump of a dump once the first has marked it done.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
         [ \"$CRTOOLS_IMAGE_DIR/{marker}\" -nt \"$CRTOOLS_IMAGE_DIR/pstree.img\" ] && exit 0\n\
         exec {} --config {} criu\n",
        hook.display(),
        config.display(),
        marker = crate::flows::POST_DUMP_MARKER,
    )
}

/// The CRIU config lines this install owns.
pub fn criu_lines(opts: &InstallOptions) -> Vec<String> {
    // Without arguments, the binary knows it runs as CRIU's action script from
    // CRTOOLS_SCRIPT_ACTION.
    let script = match &opts.config {
        Some(_) => format!("action-script /{CRIU_WRAPPER}"),
        None => format!("action-script {}", opts.hook_path.display()),
    };
    let mut v = vec![script];
    if let Some(d) = &opts.criu_libdir {
        v.push(format!("libdir {}", d.display()));
    }
    v
}

fn norm(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Adds (or with `remove`, removes) `ours` in a CRIU config text, leaving every other line.
/// Returns the new text and what changed. An existing different `libdir` is kept (CRIU has
/// one plugin directory): that is reported, not overwritten.
pub fn edit_criu_conf(text: &str, ours: &[String], remove: bool) -> (String, Vec<String>) {
    let mut notes = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let ours_norm: Vec<String> = ours.iter().map(|l| norm(l)).collect();
    if remove {
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| {
                let n = norm(l);
                let drop = n == norm(MARK) || ours_norm.contains(&n);
                if drop {
                    notes.push(format!("removed `{}`", l.trim()));
                }
                !drop
            })
            .collect();
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        return (out, notes);
    }
    let present: Vec<String> = lines.iter().map(|l| norm(l)).collect();
    let mut add = Vec::new();
    for (line, n) in ours.iter().zip(&ours_norm) {
        if present.contains(n) {
            continue;
        }
        if n.starts_with("libdir ")
            && let Some(other) = present.iter().find(|p| p.starts_with("libdir "))
        {
            notes.push(format!(
                "kept the existing `{other}` (CRIU has one plugin directory): put \
                 libmapsnap_criu.so there, or change it by hand"
            ));
            continue;
        }
        add.push(line.clone());
    }
    if add.is_empty() {
        return (text.to_string(), notes);
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !present.contains(&norm(MARK)) {
        out.push_str(MARK);
        out.push('\n');
    }
    for l in add {
        notes.push(format!("added `{l}`"));
        out.push_str(&l);
        out.push('\n');
    }
    (out, notes)
}

fn write_if_changed(path: &Path, text: &str, changes: &mut Vec<String>) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| HookError::io(format!("creating {}", parent.display()), e))?;
    }
    crate::manifest::write_atomic(path, text.as_bytes())?;
    changes.push(format!("wrote {}", path.display()));
    Ok(())
}

fn remove_if_there(path: &Path, changes: &mut Vec<String>) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            changes.push(format!("removed {}", path.display()));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HookError::io(format!("removing {}", path.display()), e)),
    }
}

/// `hooks_dir = [...]` values set in a TOML text (CRI-O's `[crio.runtime]`, containers.conf's
/// `[engine]`), whatever the table: the key means the same in both.
fn hooks_dir_values(text: &str) -> Option<Vec<String>> {
    let v: toml::Table = toml::from_str(text).ok()?;
    fn find(t: &toml::Table) -> Option<Vec<String>> {
        if let Some(toml::Value::Array(a)) = t.get("hooks_dir") {
            return Some(
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            );
        }
        t.values().find_map(|v| v.as_table().and_then(find))
    }
    find(&v)
}

/// Warnings for configs that replace the default hooks directories without ours: the
/// runtime would never run the hook.
pub fn hooks_dir_overrides(opts: &InstallOptions) -> Vec<String> {
    let ours = format!("/{HOOKS_DIR}");
    let mut notes = Vec::new();
    for (runtime, rel) in HOOKS_DIR_CONFIGS {
        if *runtime != opts.runtime {
            continue;
        }
        let path = under(&opts.root, rel);
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut f: Vec<PathBuf> = std::fs::read_dir(&path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            f.retain(|p| p.extension().is_some_and(|x| x == "conf"));
            f.sort();
            f
        } else {
            vec![path]
        };
        for f in files {
            let Some(dirs) = std::fs::read_to_string(&f)
                .ok()
                .and_then(|t| hooks_dir_values(&t))
            else {
                continue;
            };
            if !dirs.iter().any(|d| d.trim_end_matches('/') == ours) {
                notes.push(format!(
                    "warning: {} sets hooks_dir = {dirs:?} without {ours}: the hook will not                      run until {ours} is added to that list (see docs/NODE.md)",
                    f.display()
                ));
            }
        }
    }
    notes
}

/// Installs (or uninstalls). Returns one line per change or note.
pub fn install(opts: &InstallOptions) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    if !opts.hook_path.is_absolute() {
        return Err(HookError::Other(format!(
            "the hook path {} must be absolute (the runtime runs it without a PATH)",
            opts.hook_path.display()
        )));
    }
    let hooks = under(&opts.root, HOOKS_DIR);
    let legacy = under(&opts.root, LEGACY_HOOKS_DIR);
    for stage in STAGES {
        let path = hooks.join(hook_file(stage));
        if opts.uninstall {
            remove_if_there(&path, &mut changes)?;
        } else {
            write_if_changed(&path, &hook_json(opts, stage), &mut changes)?;
        }
        // A node where both directories are read would run the hook twice.
        remove_if_there(&legacy.join(hook_file(stage)), &mut changes)?;
    }
    if !opts.uninstall {
        changes.extend(hooks_dir_overrides(opts));
    }
    let wrapper = under(&opts.root, CRIU_WRAPPER);
    match criu_wrapper(opts) {
        Some(text) if !opts.uninstall => {
            write_if_changed(&wrapper, &text, &mut changes)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| HookError::io(format!("chmod {}", wrapper.display()), e))?;
        }
        _ => {
            if opts.uninstall && wrapper.exists() {
                std::fs::remove_file(&wrapper)
                    .map_err(|e| HookError::io(format!("removing {}", wrapper.display()), e))?;
                changes.push(format!("removed {}", wrapper.display()));
            }
        }
    }
    let ours = criu_lines(opts);
    for rel in CRIU_CONFS {
        let path = under(&opts.root, rel);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(HookError::io(format!("reading {}", path.display()), e)),
        };
        if opts.uninstall && text.is_empty() {
            continue;
        }
        let (new, notes) = edit_criu_conf(&text, &ours, opts.uninstall);
        changes.extend(
            notes
                .into_iter()
                .map(|n| format!("{}: {n}", path.display())),
        );
        if new != text {
            if opts.uninstall && new.trim().is_empty() {
                std::fs::remove_file(&path)
                    .map_err(|e| HookError::io(format!("removing {}", path.display()), e))?;
                changes.push(format!(
                    "removed {} (it held only our lines)",
                    path.display()
                ));
            } else {
                write_if_changed(&path, &new, &mut changes)?;
            }
        }
    }
    let plugin = under(&opts.root, CRIU_PLUGIN_DEST);
    match &opts.criu_plugin {
        Some(src) if !opts.uninstall => {
            let same = std::fs::read(src).ok().zip(std::fs::read(&plugin).ok());
            if same.is_none_or(|(a, b)| a != b) {
                if let Some(parent) = plugin.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| HookError::io(format!("creating {}", parent.display()), e))?;
                }
                std::fs::copy(src, &plugin).map_err(|e| {
                    HookError::io(
                        format!("copying {} to {}", src.display(), plugin.display()),
                        e,
                    )
                })?;
                changes.push(format!("installed {}", plugin.display()));
            }
        }
        Some(_) if plugin.exists() => {
            std::fs::remove_file(&plugin)
                .map_err(|e| HookError::io(format!("removing {}", plugin.display()), e))?;
            changes.push(format!("removed {}", plugin.display()));
        }
        _ => {}
    }
    if opts.runtime == Runtime::Containerd {
        containerd(opts, &mut changes)?;
    }
    Ok(changes)
}

/// containerd has no hooks.d of its own: NRI's hook-injector plugin reads the same files. With
/// `--nri-plugin`, it is linked into NRI's plugin directory (started with the runtime).
fn containerd(opts: &InstallOptions, changes: &mut Vec<String>) -> Result<()> {
    let link = under(&opts.root, NRI_PLUGIN_LINK);
    if opts.uninstall {
        if std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&link)
                .map_err(|e| HookError::io(format!("removing {}", link.display()), e))?;
            changes.push(format!("removed {}", link.display()));
        }
        return Ok(());
    }
    match &opts.nri_plugin {
        Some(bin) => {
            if std::fs::read_link(&link).ok().as_deref() != Some(bin.as_path()) {
                if let Some(parent) = link.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| HookError::io(format!("creating {}", parent.display()), e))?;
                }
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(bin, &link)
                    .map_err(|e| HookError::io(format!("linking {}", link.display()), e))?;
                changes.push(format!("linked {} -> {}", link.display(), bin.display()));
            }
        }
        None => changes.push(format!(
            "containerd: run NRI's hook-injector (link it as {} or pass --nri-plugin) and \
             enable NRI in containerd (on by default from 2.0); see docs/NODE.md",
            link.display()
        )),
    }
    let cfg = under(&opts.root, "etc/containerd/config.toml");
    if let Ok(text) = std::fs::read_to_string(&cfg)
        && text.contains("io.containerd.nri.v1.nri")
        && text.contains("disable = true")
    {
        changes.push(format!(
            "warning: {} may disable NRI ([plugins.\"io.containerd.nri.v1.nri\"] disable = \
             true): hooks will not be injected until it is enabled",
            cfg.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(root: &Path) -> InstallOptions {
        InstallOptions {
            runtime: Runtime::Crio,
            root: root.to_path_buf(),
            hook_path: PathBuf::from("/usr/local/bin/mapsnap-hook"),
            config: None,
            criu_libdir: Some(PathBuf::from("/usr/lib/mapsnap/criu")),
            criu_plugin: None,
            nri_plugin: None,
            timeout: 30,
            uninstall: false,
        }
    }

    #[test]
    fn hook_files_are_anchored_and_per_stage() {
        let t = tempfile::tempdir().expect("tempdir");
        let o = opts(t.path());
        let v: serde_json::Value =
            serde_json::from_str(&hook_json(&o, "createRuntime")).expect("json");
        assert_eq!(v["version"], "1.0.0");
        assert_eq!(v["stages"], json!(["createRuntime"]));
        assert_eq!(
            v["hook"]["args"],
            json!(["mapsnap-hook", "oci", "createRuntime"])
        );
        let when = v["when"]["annotations"].as_object().expect("annotations");
        let key = when.keys().next().expect("one key");
        assert!(key.starts_with('^') && key.ends_with('$'), "{key}");
    }

    #[test]
    fn criu_conf_edits_keep_other_lines_and_are_idempotent() {
        let ours = criu_lines(&opts(Path::new("/")));
        let before = "tcp-established\nlog-file /var/log/criu.log\n";
        let (once, notes) = edit_criu_conf(before, &ours, false);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(once.starts_with(before));
        assert!(once.contains("action-script /usr/local/bin/mapsnap-hook\n"));
        assert!(once.contains("libdir /usr/lib/mapsnap/criu\n"));
        let (twice, notes) = edit_criu_conf(&once, &ours, false);
        assert_eq!(twice, once);
        assert!(notes.is_empty());
        let (back, _) = edit_criu_conf(&once, &ours, true);
        assert_eq!(back, before);
        // Someone else's libdir is kept and reported.
        let other = "libdir /opt/criu-plugins\n";
        let (t, notes) = edit_criu_conf(other, &ours, false);
        assert!(t.contains("libdir /opt/criu-plugins") && !t.contains("/usr/lib/mapsnap/criu"));
        assert!(
            notes.iter().any(|n| n.contains("kept the existing")),
            "{notes:?}"
        );
    }

    #[test]
    fn a_config_path_goes_through_a_wrapper() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut o = opts(t.path());
        o.config = Some(PathBuf::from("/etc/mapsnap/node.toml"));
        install(&o).expect("install");
        let w = std::fs::read_to_string(t.path().join(CRIU_WRAPPER)).expect("wrapper");
        assert!(
            w.contains("exec /usr/local/bin/mapsnap-hook --config /etc/mapsnap/node.toml criu")
        );
        let conf = std::fs::read_to_string(t.path().join("etc/criu/runc.conf")).expect("conf");
        assert!(
            conf.contains(&format!("action-script /{CRIU_WRAPPER}\n")),
            "{conf}"
        );
        o.uninstall = true;
        install(&o).expect("uninstall");
        assert!(!t.path().join(CRIU_WRAPPER).exists());
    }

    #[test]
    fn hooks_go_where_crio_and_podman_look_and_legacy_files_go_away() {
        let t = tempfile::tempdir().expect("tempdir");
        let legacy = t.path().join(LEGACY_HOOKS_DIR);
        std::fs::create_dir_all(&legacy).expect("mkdir");
        std::fs::write(legacy.join("mapsnap-hook-poststart.json"), "{}").expect("old file");
        std::fs::write(legacy.join("other-vendor.json"), "{}").expect("someone else's");
        let mut o = opts(t.path());
        o.runtime = Runtime::Podman;
        let changes = install(&o).expect("install");
        for stage in STAGES {
            let p = t
                .path()
                .join("usr/share/containers/oci/hooks.d")
                .join(hook_file(stage));
            assert!(p.exists(), "{}", p.display());
        }
        assert!(!legacy.join("mapsnap-hook-poststart.json").exists());
        assert!(
            legacy.join("other-vendor.json").exists(),
            "only our files are removed"
        );
        assert!(
            changes
                .iter()
                .any(|c| c.starts_with("removed") && c.contains("etc/containers")),
            "{changes:?}"
        );
    }

    #[test]
    fn a_hooks_dir_setting_without_ours_is_reported() {
        let t = tempfile::tempdir().expect("tempdir");
        let dropins = t.path().join("etc/crio/crio.conf.d");
        std::fs::create_dir_all(&dropins).expect("mkdir");
        std::fs::write(
            dropins.join("10-hooks.conf"),
            "[crio.runtime]\nhooks_dir = [\"/etc/containers/oci/hooks.d\"]\n",
        )
        .expect("drop-in");
        let o = opts(t.path());
        let notes = install(&o).expect("install");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("10-hooks.conf")
                    && n.contains("/usr/share/containers/oci/hooks.d")),
            "{notes:?}"
        );
        // Listing ours (with a trailing slash) is fine.
        std::fs::write(
            dropins.join("10-hooks.conf"),
            "[crio.runtime]\nhooks_dir = [\"/etc/x\", \"/usr/share/containers/oci/hooks.d/\"]\n",
        )
        .expect("drop-in");
        assert!(hooks_dir_overrides(&o).is_empty());
        // Podman's containers.conf is not CRI-O's business, and the other way round.
        let mut p = opts(t.path());
        p.runtime = Runtime::Podman;
        std::fs::create_dir_all(t.path().join("etc/containers")).expect("mkdir");
        std::fs::write(
            t.path().join("etc/containers/containers.conf"),
            "[engine]\nhooks_dir = [\"/opt/hooks\"]\n",
        )
        .expect("containers.conf");
        assert_eq!(hooks_dir_overrides(&p).len(), 1);
        assert!(hooks_dir_overrides(&o).is_empty());
    }

    #[test]
    fn install_then_uninstall_restores_the_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let conf = t.path().join("etc/criu/runc.conf");
        std::fs::create_dir_all(conf.parent().expect("parent")).expect("mkdir");
        std::fs::write(&conf, "tcp-established\n").expect("write");
        let mut o = opts(t.path());
        let so = t.path().join("libmapsnap_criu.so");
        std::fs::write(&so, b"\x7fELF").expect("fake plugin");
        o.criu_plugin = Some(so);
        let first = install(&o).expect("install");
        assert!(t.path().join(CRIU_PLUGIN_DEST).exists());
        assert!(!first.is_empty());
        assert!(
            t.path()
                .join(HOOKS_DIR)
                .join("mapsnap-hook-poststop.json")
                .exists()
        );
        assert!(install(&o).expect("again").is_empty(), "idempotent");
        o.uninstall = true;
        install(&o).expect("uninstall");
        assert_eq!(
            std::fs::read_to_string(&conf).expect("read"),
            "tcp-established\n"
        );
        assert!(!t.path().join("etc/criu/crun.conf").exists());
        assert!(!t.path().join(CRIU_PLUGIN_DEST).exists());
        assert_eq!(
            std::fs::read_dir(t.path().join(HOOKS_DIR))
                .expect("dir")
                .count(),
            0
        );
    }
}
