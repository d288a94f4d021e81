//! mapsnap-hook: carries a container's BPF maps **pinned in bpffs** across checkpoint/restore,
//! stop/start and moves between nodes, as an OCI runtime hook and a CRIU action script.
//!
//! Maps held by fd travel inside the CRIU image (the CRIU plugin); pinned maps live in a
//! bpffs directory bind-mounted from the host, outside what CRIU saves. This crate snapshots
//! them at CRIU's post-dump (tasks frozen) or at poststop, and restores them at createRuntime
//! (before the process runs; runc runs it during `runc restore` too) or fills the app's own
//! pins at poststart. See docs/NODE.md.
//!
//! - [`config`]: node settings (`[hook]` in /etc/mapsnap/config.toml).
//! - [`annotations`]: the `mapsnap.io/` annotations.
//! - [`state`]: the OCI state on stdin, parsed tolerantly.
//! - [`mounts`]: container bind mounts and every container/host path mapping, with refusals.
//! - [`location`]: where a snapshot named by an annotation, request or manifest is.
//! - [`container`]: finding a container from CRIU's init pid; the runtime running us.
//! - [`manifest`]: the checkpoint manifest, node agent requests, restore markers.
//! - [`snapshot`]: dump and restore through the mapsnap library.
//! - [`seal`]: signing, verification and encryption of snapshots with the node's keys.
//! - [`flows`]: the stages and the CRIU action.
//! - [`finish`]: what a detached process finishes after CRIU's freeze.
//! - [`install`]: hooks.d files and CRIU config lines.

pub mod annotations;
pub mod config;
pub mod container;
pub mod error;
pub mod finish;
pub mod flows;
pub mod install;
pub mod location;
pub mod manifest;
pub mod mounts;
pub mod seal;
pub mod snapshot;
pub mod state;

pub use error::{HookError, Result};
