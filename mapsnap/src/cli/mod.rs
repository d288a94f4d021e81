//! Command-line arguments and the commands behind them. Exit codes are documented in the
//! README and returned by [`exit_code`].

mod bar;
mod convert;
mod inspect;
mod ls;
mod trust;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};

use mapsnap::diff::{self, Side};
use mapsnap::discover::{self, Source};
use mapsnap::dump::{self, DumpOptions};
use mapsnap::format::{self, WriterOptions};
use mapsnap::limits::{self, Limits};
use mapsnap::model::SnapshotInfo;
use mapsnap::restore::{self, CpuPolicy, Destination, FillMode, IntoTarget, RestoreOptions};
use mapsnap::storage::{
    self, DigestCheck, ErrorKind, Location, Manifest, ManifestSource, Storage, StorageConfig,
    StorageError,
};
use mapsnap::sys::Map;
use mapsnap::trust::{Admitted, KeyId, OpenPolicy, OpenReader, Sealed, TrustError, Verified};

/// Exit codes (also in the README).
pub mod code {
    pub const OK: u8 = 0;
    /// `diff` found differences.
    pub const DIFFERENT: u8 = 1;
    /// Bad command line: clap exits with it itself; listed so the table is whole.
    #[allow(dead_code)]
    pub const USAGE: u8 = 2;
    /// The snapshot is corrupt, truncated, of another version, or not a snapshot.
    pub const BAD_SNAPSHOT: u8 = 3;
    /// A map type mapsnap cannot carry.
    pub const UNSUPPORTED: u8 = 4;
    /// The restore target refused: incompatible map, existing pin, unsafe path, CPU mismatch.
    pub const REFUSED: u8 = 5;
    /// A kernel or system call failed (permissions, missing map or process).
    pub const SYSTEM: u8 = 6;
    /// Object storage or the snapshot location failed: no such object, access denied,
    /// endpoint unreachable, timeout.
    pub const STORAGE: u8 = 7;
    /// Refused by the trust set or the encryption: unsigned, signed by an untrusted key,
    /// altered (signature, manifest, data or ciphertext), no matching identity.
    pub const UNTRUSTED: u8 = 8;
    /// A key, identity, recipient or password could not be used (missing, malformed,
    /// wrong password, encrypted snapshot without --identity).
    pub const KEYS: u8 = 9;
    /// Anything else.
    pub const OTHER: u8 = 10;
}

#[derive(Debug, Parser)]
#[command(
    name = "mapsnap",
    version,
    about = "Snapshot and restore eBPF maps with their BTF"
)]
pub struct Args {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Storage config file (default /etc/mapsnap/config.toml when it exists).
    #[arg(long, global = true, value_name = "FILE", env = "MAPSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overall timeout of object-storage transfers, like 90s, 10m, 1h (default 30m).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Which maps to act on; none given means every map in the kernel (for `ls`).
#[derive(Debug, clap::Args, Default)]
pub struct Sources {
    /// A map by kernel id (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<u32>,
    /// A pinned map or a bpffs directory, searched recursively (repeatable).
    #[arg(long = "pin", value_name = "PATH")]
    pub pins: Vec<PathBuf>,
    /// The maps a process holds by fd (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// The maps held by every process of a container, given its init pid (repeatable).
    #[arg(long = "container-pid", value_name = "PID")]
    pub container_pids: Vec<u32>,
}

impl Sources {
    fn to_sources(&self) -> Vec<Source> {
        let mut s: Vec<Source> = self.ids.iter().map(|i| Source::Id(*i)).collect();
        s.extend(self.pins.iter().map(|p| Source::Pin(p.clone())));
        s.extend(self.pids.iter().map(|p| Source::Pid(*p)));
        s.extend(self.container_pids.iter().map(|p| Source::ContainerPid(*p)));
        s
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.ids.iter().map(|i| format!("id:{i}")).collect();
        parts.extend(self.pins.iter().map(|p| format!("pin:{}", p.display())));
        parts.extend(self.pids.iter().map(|p| format!("pid:{p}")));
        parts.extend(
            self.container_pids
                .iter()
                .map(|p| format!("container-pid:{p}")),
        );
        parts.join(",")
    }
}

/// Bounds on what a snapshot read from outside may make mapsnap allocate or create
/// (defaults in docs/FORMAT.md, "Limits").
#[derive(Debug, clap::Args, Default)]
pub struct LimitArgs {
    /// Most maps in a snapshot, inner maps included [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_maps: Option<u32>,
    /// Most bytes of one BTF blob [default: 16MiB].
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    pub max_btf_blob: Option<u64>,
    /// Most bytes of all BTF of a snapshot [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    pub max_btf_bytes: Option<u64>,
    /// Most estimated kernel memory of the maps a restore creates [default: 4GiB].
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    pub max_kernel_memory: Option<u64>,
    /// Deepest map-of-maps nesting [default: 1].
    #[arg(long, value_name = "N")]
    pub max_nesting: Option<u32>,
    /// Most bytes of one snapshot section, stored or decompressed [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_section)]
    pub max_section: Option<u32>,
    /// Most bytes of a local snapshot file [default: 64GiB].
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_size)]
    pub max_file_bytes: Option<u64>,
}

fn parse_section(s: &str) -> Result<u32, String> {
    let n = limits::parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?}: a section is at most 4GiB - 1"))
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_maps: self.max_maps.unwrap_or(d.max_maps),
            max_btf_blob: self.max_btf_blob.unwrap_or(d.max_btf_blob),
            max_btf_total: self.max_btf_bytes.unwrap_or(d.max_btf_total),
            max_kernel_memory: self.max_kernel_memory.unwrap_or(d.max_kernel_memory),
            max_nesting: self.max_nesting.unwrap_or(d.max_nesting),
            max_section: self.max_section.unwrap_or(d.max_section),
            max_manifest: d.max_manifest,
            max_file: self.max_file_bytes.unwrap_or(d.max_file),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Replace,
    Merge,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CpuArg {
    Error,
    Fit,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List maps: id, type, name, sizes, entries, bytes, frozen, pin path.
    Ls {
        #[command(flatten)]
        sources: Sources,
        #[arg(long)]
        json: bool,
    },
    /// Dump maps into a snapshot: a file, or an object (s3://, gs://, az://).
    Dump {
        #[command(flatten)]
        sources: Sources,
        /// Where to write: a path, file:///path, s3://bucket/key, gs://bucket/key,
        /// az://container/key, or "-" for standard output. A manifest is written beside it.
        #[arg(short, long, value_name = "LOCATION")]
        output: String,
        /// Skip maps of unsupported types with a warning instead of failing.
        #[arg(long)]
        skip_unsupported: bool,
        /// Replace an existing snapshot.
        #[arg(long)]
        overwrite: bool,
        /// Container id to record in the manifest (detected from --container-pid otherwise).
        #[arg(long, value_name = "ID")]
        container_id: Option<String>,
        /// Pod to record in the manifest, as NAMESPACE/NAME.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: Option<String>,
        /// zstd level for entry chunks (1 = fastest).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Reader threads for one big hash or array map (default: one per CPU).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        seal: trust::SealArgs,
    },
    /// Restore a snapshot: create and pin new maps, or fill existing ones.
    Restore {
        /// The snapshot: a path, file:///path, s3://bucket/key, gs://bucket/key or az://container/key.
        snapshot: String,
        /// Create new maps and pin them under this bpffs directory.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["into", "into_root"])]
        pin_root: Option<PathBuf>,
        /// Fill an existing map: `PIN_OR_ID`, or `NAME=PIN_OR_ID` for a multi-map snapshot.
        #[arg(long, value_name = "[NAME=]PIN_OR_ID", conflicts_with = "into_root")]
        into: Vec<String>,
        /// Fill the existing maps pinned under this directory at the snapshot's pin paths.
        #[arg(long, value_name = "DIR")]
        into_root: Option<PathBuf>,
        /// For existing maps: replace their contents, or merge into them.
        #[arg(long, value_enum, default_value = "replace")]
        mode: ModeArg,
        /// Per-CPU maps from a machine with another possible-CPU count.
        #[arg(long, value_enum, default_value = "error")]
        cpu_mismatch: CpuArg,
        /// With --pin-root: replace existing pins (atomically).
        #[arg(long)]
        overwrite: bool,
        /// Give up after this long (like 30s, 5m), removing everything the restore created
        /// or pinned so far.
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        deadline: Option<Duration>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        conv: convert::ConvertArgs,
        /// Threads writing hash and array maps (default: one per CPU). Queues, stacks,
        /// merges and nearly full LRU maps are always written in snapshot order.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        #[command(flatten)]
        open: trust::OpenArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot converted to the key/value types of a newer program (docs/CONVERT.md).
    Convert {
        /// The snapshot (path or URL, as for restore).
        snapshot: String,
        /// The new types: a clang-compiled object (its .BTF), or a pinned map (or map id).
        #[arg(long, value_name = "OBJECT_OR_PIN")]
        to_btf: PathBuf,
        /// The converted snapshot (a new local file).
        #[arg(short, long, value_name = "NEW", required_unless_present = "dry_run")]
        output: Option<PathBuf>,
        /// With a pinned map as target and several maps in the snapshot: which one.
        #[arg(long, value_name = "NAME")]
        map: Option<String>,
        /// Print only the plans; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        members: convert::MemberArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        open: trust::OpenArgs,
    },
    /// Show a snapshot's metadata, and with --entries its entries typed by BTF.
    Inspect {
        /// The snapshot (path or URL, as for restore).
        snapshot: String,
        #[arg(long)]
        entries: bool,
        /// Show only the manifest stored beside the snapshot (no snapshot download).
        #[arg(long, conflicts_with = "entries")]
        manifest: bool,
        /// Entries shown per map with --entries.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        open: trust::OpenArgs,
        #[arg(long)]
        json: bool,
    },
    /// Compare a snapshot with another snapshot, or with live maps (--id/--pin/...).
    Diff {
        /// A snapshot (path or URL).
        old: String,
        /// A second snapshot (path or URL).
        new: Option<String>,
        #[command(flatten)]
        live: Sources,
        /// Differing entries shown per map.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        open: trust::OpenArgs,
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot's checksums and structure without touching any map.
    Verify {
        /// The snapshot (path or URL).
        snapshot: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        open: trust::OpenArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make a minisign key pair for `dump --sign` and `--trust`.
    Keygen(trust::KeygenArgs),
}

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAPSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Maps an error to the documented exit code.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use mapsnap::Error as E;
    // Trust refusals first: an altered download also fails the manifest's digest check, but
    // the signature's verdict is the one to report.
    if let Some(t) = e.chain().find_map(TrustError::find) {
        return if t.is_refusal() {
            code::UNTRUSTED
        } else if matches!(t, TrustError::Io { .. }) {
            code::SYSTEM
        } else {
            code::KEYS
        };
    }
    // Storage errors first: they may travel inside the codec's I/O errors.
    if let Some(se) = e.chain().find_map(StorageError::find) {
        return match se.kind {
            ErrorKind::AlreadyExists => code::OTHER,
            ErrorKind::Corrupt => code::BAD_SNAPSHOT,
            ErrorKind::BadLocation => code::USAGE,
            _ => code::STORAGE,
        };
    }
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<format::FormatError>() {
            return match f {
                format::FormatError::Limit(_) => code::REFUSED,
                _ => code::BAD_SNAPSHOT,
            };
        }
        if let Some(err) = cause.downcast_ref::<E>() {
            return match err {
                E::Format(_) => code::BAD_SNAPSHOT,
                E::Unsupported { .. } => code::UNSUPPORTED,
                E::Incompatible { .. }
                | E::CpuMismatch { .. }
                | E::PinExists { .. }
                | E::UnsafePinPath { .. }
                | E::Limit(_)
                | E::Deadline { .. }
                | E::Restore { .. } => code::REFUSED,
                E::Anchor(a) if matches!(a.errno(), Some(libc::ELOOP) | Some(libc::EXDEV)) => {
                    code::REFUSED
                }
                E::Sys(_) | E::Discover(_) | E::Io { .. } | E::Anchor(_) => code::SYSTEM,
                E::Trust(_) => code::KEYS,
            };
        }
        if cause.downcast_ref::<mapsnap::sys::SysError>().is_some()
            || cause.downcast_ref::<discover::DiscoverError>().is_some()
        {
            return code::SYSTEM;
        }
    }
    code::OTHER
}

/// Parses `--timeout`.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = storage::parse_duration(s)?;
    if d.is_zero() {
        return Err("the timeout must be more than 0".into());
    }
    Ok(d)
}

/// Opens snapshot locations with the storage settings of this invocation (the config file is
/// read only when a remote location is used).
struct Locations {
    config_file: Option<PathBuf>,
    timeout: Option<Duration>,
}

impl Locations {
    fn open(&self, location: &str) -> anyhow::Result<Storage> {
        let loc = Location::parse(location)?;
        let cfg = if loc.is_remote() {
            let mut c = StorageConfig::load(self.config_file.as_deref())?;
            if let Some(t) = self.timeout {
                c.timeout = t;
            }
            c
        } else {
            StorageConfig::default()
        };
        Ok(Storage::open(loc, &cfg)?)
    }
}

/// A reader of the snapshot that, when its manifest is known, fails before the last byte if
/// the bytes are not the ones the manifest describes.
fn checked_reader(
    st: &Storage,
    version: Option<&storage::ObjectInfo>,
    manifest: Option<&Manifest>,
) -> anyhow::Result<Box<dyn Read>> {
    if let Some(m) = manifest {
        let size = match version {
            Some(v) => Some(v.size),
            None => st.head()?.map(|i| i.size),
        };
        if let Some(size) = size
            && size != m.size
        {
            let why = if size < m.size {
                format!(
                    "the snapshot is truncated: it has {size} bytes, its manifest records {}",
                    m.size
                )
            } else {
                format!(
                    "the snapshot has {size} bytes but its manifest records {}: it was replaced \
                     or damaged after it was written",
                    m.size
                )
            };
            return Err(StorageError::new(ErrorKind::Corrupt, st.name(), why).into());
        }
    }
    let r = st.reader(version)?;
    Ok(
        match manifest.and_then(|m| m.sha256_bytes().map(|s| (s, m.size))) {
            Some((sha, size)) => Box::new(DigestCheck::new(r, st.name(), sha, size)),
            None => r,
        },
    )
}

/// Refuses a snapshot larger than `--max-file-bytes` before reading any of it.
fn check_size(st: &Storage, limits: &Limits) -> anyhow::Result<()> {
    if *st.location() == Location::Stdio {
        return Ok(());
    }
    if let Some(info) = st.head()? {
        Limits::check(
            || st.name().to_string(),
            "its size (bytes)",
            info.size,
            limits.max_file,
            "max-file-bytes",
        )
        .map_err(mapsnap::Error::from)?;
    }
    Ok(())
}

/// The manifest beside a snapshot, when there is one, and its exact bytes (a signature names
/// their digest); a broken manifest is reported and ignored (the snapshot's own checksums
/// still protect it).
type ManifestRead = (Option<Manifest>, Option<Vec<u8>>);

/// A snapshot opened for reading: its size checked against the limits, its manifest read,
/// and admitted by the trust policy (signature, manifest digest, size) before any byte of it
/// is read.
fn open_admitted(
    locations: &Locations,
    snapshot: &str,
    limits: &Limits,
    policy: &OpenPolicy,
) -> anyhow::Result<(Storage, Option<Manifest>, Admitted)> {
    let src = locations.open(snapshot)?;
    check_size(&src, limits)?;
    let (manifest, manifest_bytes) = manifest_of(&src)?;
    let admitted = trust::admit(&src, policy, manifest_bytes.as_deref())?;
    Ok((src, manifest, admitted))
}

fn manifest_of(st: &Storage) -> anyhow::Result<ManifestRead> {
    let bytes = match st.read_manifest_bytes() {
        Ok(b) => b,
        Err(e) if e.kind == ErrorKind::Corrupt => {
            tracing::warn!("{e}; ignoring it");
            return Ok((None, None));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(bytes) = bytes else {
        if st.manifest_name().is_some() {
            tracing::info!(
                "{}: no manifest beside the snapshot; relying on its own checksums",
                st.name()
            );
        }
        return Ok((None, None));
    };
    match st.parse_manifest(&bytes) {
        Ok(m) => Ok((Some(m), Some(bytes))),
        Err(e) => {
            tracing::warn!("{e}; ignoring it");
            Ok((None, Some(bytes)))
        }
    }
}

/// Names the snapshot in codec errors ("s3://b/k: snapshot is corrupt: ...").
fn located<T>(r: mapsnap::Result<T>, st: &Storage) -> anyhow::Result<T> {
    match r {
        Err(e @ mapsnap::Error::Format(_)) => {
            Err(anyhow::Error::new(e).context(st.name().to_string()))
        }
        Err(e) => Err(e.into()),
        Ok(v) => Ok(v),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let locations = Locations {
        config_file: args.config,
        timeout: args.timeout,
    };
    run_cmd(args.cmd, &locations).map_err(|e| {
        // A storage failure is one line naming the location, however deep it was found.
        match e.chain().find_map(StorageError::find) {
            Some(se) => anyhow::Error::new(se.clone()),
            None => e,
        }
    })
}

fn run_cmd(cmd: Cmd, locations: &Locations) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Keygen(a) => trust::keygen(&a)?,
        Cmd::Ls { sources, json } => {
            let mut s = sources.to_sources();
            if s.is_empty() {
                s.push(Source::All);
            }
            let found = discover::find(&s)?;
            ls::print(&found, json)?;
        }
        Cmd::Dump {
            sources,
            output,
            skip_unsupported,
            overwrite,
            zstd_level,
            threads,
            json,
            container_id,
            pod,
            seal,
        } => {
            let s = sources.to_sources();
            if s.is_empty() {
                bail!("say which maps to dump: --id, --pin, --pid or --container-pid");
            }
            // A bad location or key fails before any map is read.
            let target = locations.open(&output)?;
            let seal = seal.policy()?;
            if seal.signs() && target.signature_name().is_none() {
                bail!("--sign needs a file or object location: the signature is stored beside it");
            }
            let found = discover::find(&s)?;
            if found.is_empty() {
                bail!("no maps found in {}", sources.describe());
            }
            let info = SnapshotInfo {
                tool: format!("mapsnap {}", env!("CARGO_PKG_VERSION")),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                hostname: hostname(),
                kernel: kernel_release(),
                possible_cpus: mapsnap::sys::possible_cpus()?,
                source: sources.describe(),
            };
            let opts = DumpOptions {
                skip_unsupported,
                writer: WriterOptions {
                    zstd_level,
                    ..WriterOptions::default()
                },
                threads: threads.map_or_else(|| DumpOptions::default().threads, usize::from),
            };
            // Refuses an existing snapshot now, before the maps are read (and again at commit).
            let writer = seal.seal(target.writer(overwrite)?)?;
            let bar = bar::Bar::new();
            // On error the writer is dropped: the temporary file or multipart upload goes away.
            let (writer, report) = dump::dump(&found, writer, &info, &opts, &bar)?;
            let (writer, sealed) = writer.finish(&report.digest)?;
            writer.commit()?;
            bar.finish();
            let stored = *sealed.stored();
            let mut manifest_written = None;
            let signature_written;
            if let Some(name) = target.manifest_name() {
                let (detected_id, pod_uid) = sources
                    .container_pids
                    .first()
                    .map(|p| storage::container_of_pid(*p))
                    .unwrap_or_default();
                let source = ManifestSource {
                    container_id: container_id.or(detected_id),
                    pod,
                    pod_uid,
                    ..ManifestSource::default()
                };
                let mut manifest = Manifest::new(target.name(), &info, &report, source);
                sealed.apply(&mut manifest);
                let json = manifest.to_json();
                // Signature before manifest: readers take the manifest as "complete".
                signature_written = sign_beside(&target, &sealed, Some(&json), overwrite)?;
                target.write_manifest_bytes(&json)?;
                manifest_written = Some(name);
            } else {
                signature_written = sign_beside(&target, &sealed, None, overwrite)?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "output": output,
                        "manifest": manifest_written,
                        "sha256": stored.sha256_hex(),
                        "bytes": stored.bytes,
                        "signature": signature_written.as_ref().map(|s| &s.0),
                        "signed_by": signature_written.as_ref().map(|s| s.1.to_string()),
                        "encrypted": sealed.encrypted(),
                        "maps": report.maps,
                        "skipped": report.skipped,
                    }))?
                );
            } else {
                for m in report.maps.iter().filter(|m| !m.inner) {
                    eprintln!(
                        "dumped {} ({}): {} entries, {} bytes",
                        m.name, m.map_type, m.entries, m.bytes
                    );
                }
                eprintln!(
                    "wrote {} ({} bytes, sha256 {}{})",
                    target.name(),
                    stored.bytes,
                    stored.sha256_hex(),
                    if sealed.encrypted() {
                        ", age-encrypted"
                    } else {
                        ""
                    }
                );
                if let Some((name, key_id)) = &signature_written {
                    eprintln!("wrote {name} (signed by key {key_id})");
                }
                if let Some(m) = &manifest_written {
                    eprintln!("wrote {m}");
                }
            }
        }
        Cmd::Restore {
            snapshot,
            pin_root,
            into,
            into_root,
            mode,
            cpu_mismatch,
            overwrite,
            deadline,
            limits,
            conv,
            threads,
            open,
            json,
        } => {
            let limits = limits.limits();
            let policy = open.policy()?;
            let dest = match (pin_root, into.is_empty(), into_root) {
                (Some(dir), true, None) => Destination::PinRoot { dir, overwrite },
                (None, false, None) => Destination::Into(
                    into.iter()
                        .map(|t| parse_into(t))
                        .collect::<anyhow::Result<_>>()?,
                ),
                (None, true, Some(dir)) => Destination::IntoRoot(dir),
                _ => bail!(
                    "say where to restore: --pin-root DIR, --into PIN_OR_ID or --into-root DIR"
                ),
            };
            let opts = RestoreOptions {
                mode: match mode {
                    ModeArg::Replace => FillMode::Replace,
                    ModeArg::Merge => FillMode::Merge,
                },
                cpu_policy: match cpu_mismatch {
                    CpuArg::Error => CpuPolicy::Error,
                    CpuArg::Fit => CpuPolicy::Fit,
                },
                deadline: deadline.map(|d| std::time::Instant::now() + d),
                limits,
                convert: conv.conversion()?,
                fill_threads: threads.map_or(0, usize::from),
            };
            let src = locations.open(&snapshot)?;
            check_size(&src, &limits)?;
            if *src.location() == Location::Stdio {
                bail!("restore reads the snapshot twice (verify, then apply): give a file, not -");
            }
            let (manifest, manifest_bytes) = manifest_of(&src)?;
            // Signature, manifest and size are checked before the snapshot is read.
            let admitted = trust::admit(&src, &policy, manifest_bytes.as_deref())?;
            let version = if src.is_remote() {
                Some(src.head()?.ok_or_else(|| {
                    StorageError::new(ErrorKind::NotFound, src.name(), "no such object")
                })?)
            } else {
                None
            };
            let bar = bar::Bar::new();
            // New maps from a remote snapshot: one pass. restore() fills them unpinned and
            // pins them only after the stream's SHA-256 (and the manifest's) matched, so a bad
            // download publishes nothing. Everything else: verify first, then apply (a second
            // read, pinned to the same object version), so existing maps are only changed by
            // a snapshot known to be whole.
            let one_pass = src.is_remote()
                && opts.convert.is_none()
                && matches!(dest, Destination::PinRoot { .. } | Destination::Detached);
            // With a signature or encryption the same holds: the first read verifies the
            // signature before its last byte, the second is held to the bytes it verified; in
            // one pass, the signature is checked before the last byte reaches restore(), so a
            // refusal publishes nothing.
            let summary = if one_pass {
                None
            } else {
                let mut r = open_snapshot(&src, version.as_ref(), manifest.as_ref(), &admitted)?;
                let s = format::verify_with_limits(&mut r, &limits)
                    .map_err(|e| anyhow::Error::new(e).context(src.name().to_string()))?;
                report_signer(r.finish()?.as_ref(), manifest.as_ref(), &src)?;
                Some(s)
            };
            let read = || -> anyhow::Result<Box<dyn Read>> {
                Ok(Box::new(open_snapshot(
                    &src,
                    version.as_ref(),
                    manifest.as_ref(),
                    &admitted,
                )?))
            };
            if convert::preflight(&conv, &opts, &dest, summary.as_ref(), read)? {
                return Ok(ExitCode::SUCCESS);
            }
            let report = located(
                restore::restore(
                    open_snapshot(&src, version.as_ref(), manifest.as_ref(), &admitted)?,
                    summary.as_ref(),
                    &dest,
                    &opts,
                    &bar,
                ),
                &src,
            )?;
            bar.finish();
            if one_pass {
                report_signer(admitted.verified().as_ref(), manifest.as_ref(), &src)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report.maps)?);
            } else {
                for m in &report.maps {
                    eprintln!(
                        "restored {} ({}): {} entries -> {} (map id {})",
                        m.name, m.map_type, m.entries, m.target, m.map_id
                    );
                }
            }
        }
        Cmd::Convert {
            snapshot,
            to_btf,
            output,
            map,
            dry_run,
            members,
            limits,
            open,
        } => {
            let limits = limits.limits();
            let policy = open.policy()?;
            let (src, manifest, admitted) = open_admitted(locations, &snapshot, &limits, &policy)?;
            let read = || -> anyhow::Result<Box<dyn Read>> {
                Ok(Box::new(open_snapshot(
                    &src,
                    None,
                    manifest.as_ref(),
                    &admitted,
                )?))
            };
            let out = output.unwrap_or_default();
            convert::run_convert(
                &read,
                &to_btf,
                &out,
                map.as_deref(),
                &members,
                dry_run,
                &limits,
            )?;
        }
        Cmd::Inspect {
            snapshot,
            entries,
            manifest: manifest_only,
            limit,
            limits,
            open,
            json,
        } => {
            let limits = limits.limits();
            let policy = open.policy()?;
            let (src, manifest, admitted) = open_admitted(locations, &snapshot, &limits, &policy)?;
            if manifest_only && policy.requires_signature() && !admitted.manifest_authenticated() {
                bail!(
                    "{}: the signature (key {}) does not name the manifest, so the manifest is \
                     not vouched for; inspect the snapshot itself",
                    src.name(),
                    admitted.signer().map(|k| k.to_string()).unwrap_or_default()
                );
            }
            if manifest_only {
                let Some(m) = manifest else {
                    bail!(
                        "{}: no manifest beside the snapshot ({})",
                        src.name(),
                        src.manifest_name().unwrap_or_default()
                    );
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&m)?);
                } else {
                    inspect::print_manifest(&m, src.manifest_name().as_deref());
                }
            } else {
                let r = open_snapshot(&src, None, manifest.as_ref(), &admitted)?;
                inspect::run(
                    Box::new(r),
                    entries,
                    limit,
                    json,
                    manifest.as_ref(),
                    src.manifest_name(),
                    &limits,
                )
                .map_err(|e| match e.downcast::<format::FormatError>() {
                    Ok(f) => anyhow::Error::new(f).context(src.name().to_string()),
                    Err(e) => e,
                })?
            }
        }
        Cmd::Diff {
            old,
            new,
            live,
            examples,
            limits,
            open,
            json,
        } => {
            let limits = limits.limits();
            let policy = open.policy()?;
            let old_src = locations.open(&old)?;
            let old_admitted = admit_for_diff(&old_src, &policy)?;
            let open_old =
                || -> mapsnap::Result<Box<dyn Read>> { open_for_diff(&old_src, &old_admitted) };
            let live_sources = live.to_sources();
            let found;
            let new_src;
            let new_admitted;
            let open_new;
            let new_side = match (&new, live_sources.is_empty()) {
                (Some(p), true) => {
                    new_src = locations.open(p)?;
                    new_admitted = admit_for_diff(&new_src, &policy)?;
                    let (src, admitted) = (&new_src, &new_admitted);
                    open_new =
                        move || -> mapsnap::Result<Box<dyn Read>> { open_for_diff(src, admitted) };
                    Side::Snapshot(&open_new)
                }
                (None, false) => {
                    found = discover::find(&live_sources)?;
                    Side::Live(&found)
                }
                _ => bail!(
                    "compare with one thing: a second snapshot, or live maps (--id/--pin/--pid)"
                ),
            };
            let diffs =
                diff::diff_with_limits(&Side::Snapshot(&open_old), &new_side, examples, &limits)?;
            let different = diffs.iter().any(|d| !d.is_empty());
            if json {
                println!("{}", serde_json::to_string_pretty(&diffs)?);
            } else {
                print_diff(&diffs);
            }
            if different {
                return Ok(ExitCode::from(code::DIFFERENT));
            }
        }
        Cmd::Verify {
            snapshot,
            limits,
            open,
            json,
        } => {
            let limits = limits.limits();
            let policy = open.policy()?;
            let (src, manifest, admitted) = open_admitted(locations, &snapshot, &limits, &policy)?;
            let mut r = open_snapshot(&src, None, manifest.as_ref(), &admitted)?;
            let encrypted = r.encrypted();
            let s = format::verify_with_limits(&mut r, &limits)
                .map_err(|e| anyhow::Error::new(e).context(src.name().to_string()))?;
            let verified = r.finish()?;
            report_signer(verified.as_ref(), manifest.as_ref(), &src)?;
            // An encrypted snapshot's manifest describes the ciphertext, checked as it was
            // read; the plaintext's digest is the snapshot's own.
            if let Some(why) = manifest
                .as_ref()
                .filter(|_| !encrypted)
                .and_then(|m| m.mismatch(&s.digest))
            {
                return Err(StorageError::new(ErrorKind::Corrupt, src.name(), why).into());
            }
            let manifest_state = if manifest.is_some() {
                "matches"
            } else {
                "absent"
            };
            if json {
                let maps: Vec<_> = s
                    .maps
                    .iter()
                    .map(|(m, n)| serde_json::json!({"name": m.name, "type": m.type_name(), "entries": n}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": true, "location": src.name(), "manifest": manifest_state,
                        "sha256": s.digest.sha256_hex(), "bytes": s.digest.bytes, "maps": maps,
                        "encrypted": encrypted,
                        "signed_by": verified.as_ref().map(|v| v.key_id.to_string()),
                    }))?
                );
            } else {
                println!(
                    "ok: {} maps, {} bytes, sha256 {} (manifest: {manifest_state}{}{})",
                    s.maps.len(),
                    s.digest.bytes,
                    s.digest.sha256_hex(),
                    if encrypted { ", age-encrypted" } else { "" },
                    match &verified {
                        Some(v) => format!(", signed by trusted key {}", v.key_id),
                        None => String::new(),
                    }
                );
            }
        }
    }
    Ok(ExitCode::from(code::OK))
}

fn admit_for_diff(src: &Storage, policy: &OpenPolicy) -> anyhow::Result<Admitted> {
    let bytes = if policy.requires_signature() {
        manifest_of(src)?.1
    } else {
        None
    };
    trust::admit(src, policy, bytes.as_deref())
}

fn open_for_diff(src: &Storage, admitted: &Admitted) -> mapsnap::Result<Box<dyn Read>> {
    let raw = src
        .reader(None)
        .map_err(|e| mapsnap::Error::io(src.name(), e.into_io()))?;
    Ok(Box::new(admitted.reader(raw)?))
}

/// The snapshot as plaintext, checked as the policy admitted it. With a signature to check,
/// the manifest's digest check is left out: the signature covers the same bytes.
fn open_snapshot(
    st: &Storage,
    version: Option<&storage::ObjectInfo>,
    manifest: Option<&Manifest>,
    admitted: &Admitted,
) -> anyhow::Result<OpenReader<Box<dyn Read>>> {
    let manifest = manifest.filter(|_| admitted.signer().is_none());
    Ok(admitted.reader(checked_reader(st, version, manifest)?)?)
}

/// Says which trusted key signed the snapshot, after checking that the manifest beside it
/// describes the bytes the signature covered.
fn report_signer(
    verified: Option<&Verified>,
    manifest: Option<&Manifest>,
    st: &Storage,
) -> anyhow::Result<()> {
    let Some(v) = verified else { return Ok(()) };
    if let Some(m) = manifest
        && (m.size != v.size || m.sha256 != hex::encode(v.sha256))
    {
        return Err(StorageError::new(
            ErrorKind::Corrupt,
            st.name(),
            format!(
                "the signed snapshot ({} bytes, sha256 {}) does not match its manifest ({} \
                 bytes, sha256 {})",
                v.size,
                hex::encode(v.sha256),
                m.size,
                m.sha256
            ),
        )
        .into());
    }
    tracing::info!(
        "{}: signature by trusted key {} verified",
        st.name(),
        v.key_id
    );
    eprintln!("{}: signed by trusted key {}", st.name(), v.key_id);
    Ok(())
}

/// Stores the signature beside the snapshot when signing; with `overwrite` and no signing,
/// removes a signature left from an earlier snapshot (it would not match this one).
fn sign_beside(
    target: &Storage,
    sealed: &Sealed,
    manifest: Option<&[u8]>,
    overwrite: bool,
) -> anyhow::Result<Option<(String, KeyId)>> {
    match sealed.sign(manifest)? {
        Some(signed) => {
            target.write_signature(&signed.signature)?;
            Ok(target.signature_name().map(|n| (n, signed.key_id)))
        }
        None => {
            // Best effort: a writer allowed to put but not to delete still dumps.
            if overwrite && let Err(e) = target.delete_signature() {
                tracing::warn!("could not remove an earlier signature: {e}");
            }
            Ok(None)
        }
    }
}

fn print_diff(diffs: &[diff::MapDiff]) {
    let mut any = false;
    for d in diffs {
        if d.is_empty() {
            continue;
        }
        any = true;
        if d.only_in_old {
            println!("{}: only in the old side", d.map);
        } else if d.only_in_new {
            println!("{}: only in the new side", d.map);
        }
        println!(
            "{}: {} added, {} removed, {} changed, {} unchanged",
            d.map, d.added, d.removed, d.changed, d.unchanged
        );
        for e in &d.examples {
            match (&e.old, &e.new) {
                (Some(o), Some(n)) => println!("  ~ key {}: {} -> {}", e.key, o, n),
                (None, Some(n)) => println!("  + key {}: {}", e.key, n),
                (Some(o), None) => println!("  - key {}: {}", e.key, o),
                (None, None) => {}
            }
        }
    }
    if !any {
        println!("no differences ({} maps compared)", diffs.len());
    }
}

/// `NAME=PIN_OR_ID` or `PIN_OR_ID`; a number is a map id, anything else a pin path.
fn parse_into(spec: &str) -> anyhow::Result<IntoTarget> {
    let (select, target) = match spec.split_once('=') {
        Some((n, t)) => (Some(n.to_string()), t),
        None => (None, spec),
    };
    let map = match target.parse::<u32>() {
        Ok(id) => Map::from_id(id)?,
        Err(_) => Map::from_pin(Path::new(target))?,
    };
    Ok(IntoTarget { select, map })
}

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
