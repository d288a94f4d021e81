//! `libmapsnap_criu.so`: a CRIU plugin that checkpoints and restores BPF map fds inside
//! CRIU's own image directory, for every map type mapsnap supports.
//!
//! CRIU asks plugins about files it cannot handle itself (`DUMP_EXT_FILE`,
//! `RESTORE_EXT_FILE`); Debian's CRIU has no BPF support, so every BPF map fd reaches this
//! plugin. See `docs/CRIU.md` for how it works, how to install it and its limits.
//!
//! - [`ffi`]: the C ABI (every `unsafe` line of the crate), exporting `CR_PLUGIN_DESC`.
//! - [`plugin`]: dump and restore, done by the `mapsnap` library.
//! - [`images`]: the files the plugin adds to CRIU's image directory, read without trusting
//!   them.
//! - [`config`], [`deadline`]: limits and the deadline that bound the plugin's work.

#![deny(unsafe_code)]

pub mod config;
pub mod deadline;
pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub mod images;
pub mod plugin;

pub use error::PluginError;
