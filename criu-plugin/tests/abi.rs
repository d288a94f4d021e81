//! The Rust mirror of CRIU's plugin ABI against the real header: a tiny C program compiled
//! with CRIU 4.1's `criu-plugin.h` (libcriu-dev, unpacked by scripts/install-criu.sh) prints
//! the descriptor's layout and constants, then loads the built plugin the way CRIU does
//! (`dlopen`, `dlsym("CR_PLUGIN_DESC")`) and calls its hooks with files that are not BPF maps.

mod common;

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use mapsnap_criu::ffi::{self, CrPluginDesc, hook, stage};

const PROGRAM: &str = r#"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include "criu-plugin.h"

#define P(k, v) printf("%s %ld\n", k, (long)(v))

int main(int argc, char **argv)
{
	P("size", sizeof(cr_plugin_desc_t));
	P("off_name", offsetof(cr_plugin_desc_t, name));
	P("off_init", offsetof(cr_plugin_desc_t, init));
	P("off_exit", offsetof(cr_plugin_desc_t, exit));
	P("off_version", offsetof(cr_plugin_desc_t, version));
	P("off_max_hooks", offsetof(cr_plugin_desc_t, max_hooks));
	P("off_hooks", offsetof(cr_plugin_desc_t, hooks));
	P("hook_max", CR_PLUGIN_HOOK__MAX);
	P("hook_dump_ext_file", CR_PLUGIN_HOOK__DUMP_EXT_FILE);
	P("hook_restore_ext_file", CR_PLUGIN_HOOK__RESTORE_EXT_FILE);
	P("hook_checkpoint_devices", CR_PLUGIN_HOOK__CHECKPOINT_DEVICES);
	P("stage_dump", CR_PLUGIN_STAGE__DUMP);
	P("stage_pre_dump", CR_PLUGIN_STAGE__PRE_DUMP);
	P("stage_restore", CR_PLUGIN_STAGE__RESTORE);
	P("version", CRIU_PLUGIN_VERSION);

	void *h = dlopen(argv[1], RTLD_LAZY);
	if (!h) {
		printf("dlopen_error %s\n", dlerror());
		return 1;
	}
	cr_plugin_desc_t *d = dlsym(h, "CR_PLUGIN_DESC");
	if (!d)
		return 2;
	printf("desc_name %s\n", d->name);
	P("desc_version", d->version);
	P("desc_max_hooks", d->max_hooks);
	for (unsigned i = 0; i < d->max_hooks; i++)
		if (d->hooks[i])
			printf("desc_hook_%u 1\n", i);

	/* As CRIU: init, hooks, exit. Neither file is a BPF map, so both are refused. */
	P("init_dump", d->init(CR_PLUGIN_STAGE__DUMP));
	int fd = open("/proc/self/status", O_RDONLY);
	P("dump_regular_file",
	  ((CR_PLUGIN_HOOK__DUMP_EXT_FILE_t *)d->hooks[CR_PLUGIN_HOOK__DUMP_EXT_FILE])(fd, 1));
	d->exit(CR_PLUGIN_STAGE__DUMP, 0);
	P("restore_unknown_id",
	  ((CR_PLUGIN_HOOK__RESTORE_EXT_FILE_t *)d->hooks[CR_PLUGIN_HOOK__RESTORE_EXT_FILE])(7));
	P("enotsup", ENOTSUP);
	return 0;
}
"#;

fn criu_include() -> PathBuf {
    let prefix = std::env::var_os("MAPSNAP_CRIU_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mapsnap-criu"));
    let dir = prefix.join("usr/include/criu");
    assert!(
        dir.join("criu-plugin.h").exists(),
        "{}/criu-plugin.h not found: run `bash scripts/install-criu.sh` (make test does)",
        dir.display()
    );
    dir
}

#[test]
fn descriptor_matches_criu_plugin_h_and_loads_like_criu_loads_it() {
    let include = criu_include();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("abi.c");
    let exe = work.path().join("abi");
    std::fs::write(&src, PROGRAM).expect("write C");
    let out = common::run(
        Command::new("gcc")
            .arg("-Wall")
            .arg("-Werror")
            .arg("-I")
            .arg(&include)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .arg("-ldl"),
    );
    assert!(out.status.success(), "the C check does not compile");
    let out = common::run(Command::new(&exe).arg(common::plugin_so()));
    assert!(out.status.success(), "the C loader failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
    let num = |k: &str| -> i64 {
        v.get(k)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in:\n{text}"))
    };

    // Layout and constants. Exact against CRIU 4.1's header (plugin ABI 0.2.0, 12 hooks); a
    // newer CRIU's header (MAPSNAP_CRIU_PREFIX pointing at one) only appends hooks, and loads a
    // descriptor whose version and max_hooks are not above its own (CRIU's verify_plugin).
    assert_eq!(num("off_name"), offset_of!(CrPluginDesc, name) as i64);
    assert_eq!(num("off_init"), offset_of!(CrPluginDesc, init) as i64);
    assert_eq!(num("off_exit"), offset_of!(CrPluginDesc, exit) as i64);
    assert_eq!(num("off_version"), offset_of!(CrPluginDesc, version) as i64);
    assert_eq!(
        num("off_max_hooks"),
        offset_of!(CrPluginDesc, max_hooks) as i64
    );
    assert_eq!(num("off_hooks"), offset_of!(CrPluginDesc, hooks) as i64);
    assert_eq!(num("hook_dump_ext_file"), hook::DUMP_EXT_FILE as i64);
    assert_eq!(num("hook_restore_ext_file"), hook::RESTORE_EXT_FILE as i64);
    assert_eq!(
        num("hook_checkpoint_devices"),
        hook::CHECKPOINT_DEVICES as i64
    );
    assert_eq!(num("stage_dump"), i64::from(stage::DUMP));
    assert_eq!(num("stage_pre_dump"), i64::from(stage::PRE_DUMP));
    assert_eq!(num("stage_restore"), i64::from(stage::RESTORE));
    assert!(hook::MAX as i64 <= num("hook_max"));
    assert!(i64::from(ffi::CRIU_PLUGIN_VERSION) <= num("version"));
    if num("hook_max") == hook::MAX as i64 {
        assert_eq!(num("size"), size_of::<CrPluginDesc>() as i64);
        assert_eq!(num("version"), i64::from(ffi::CRIU_PLUGIN_VERSION));
    }

    // The exported descriptor, read by C.
    assert_eq!(v.get("desc_name"), Some(&"mapsnap"));
    assert_eq!(num("desc_version"), i64::from(ffi::CRIU_PLUGIN_VERSION));
    assert_eq!(num("desc_max_hooks"), hook::MAX as i64);
    let hooks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("desc_hook_"))
        .collect();
    assert_eq!(
        hooks,
        vec!["2 1", "3 1"],
        "exactly DUMP_EXT_FILE and RESTORE_EXT_FILE"
    );

    // Files that are not ours are refused with -ENOTSUP, so CRIU asks its other plugins.
    assert_eq!(num("init_dump"), 0);
    assert_eq!(num("dump_regular_file"), -num("enotsup"));
    assert_eq!(num("restore_unknown_id"), -num("enotsup"));
}
