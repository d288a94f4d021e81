//! Command-line arguments and the commands behind them. Exit codes are documented in the
//! README and returned by [`exit_code`].

mod bar;
mod inspect;
mod ls;

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use mapsnap::diff::{self, Side};
use mapsnap::discover::{self, Source};
use mapsnap::dump::{self, DumpOptions};
use mapsnap::format::{self, WriterOptions};
use mapsnap::model::SnapshotInfo;
use mapsnap::restore::{self, CpuPolicy, Destination, FillMode, IntoTarget, RestoreOptions};
use mapsnap::sys::Map;

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
    /// Dump maps into a snapshot file.
    Dump {
        #[command(flatten)]
        sources: Sources,
        /// Snapshot file to write ("-" for standard output).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Skip maps of unsupported types with a warning instead of failing.
        #[arg(long)]
        skip_unsupported: bool,
        /// Replace an existing snapshot file.
        #[arg(long)]
        overwrite: bool,
        /// zstd level for entry chunks (1 = fastest).
        #[arg(long, default_value_t = 1)]
        zstd_level: i32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot: create and pin new maps, or fill existing ones.
    Restore {
        snapshot: PathBuf,
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
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot's metadata, and with --entries its entries typed by BTF.
    Inspect {
        snapshot: PathBuf,
        #[arg(long)]
        entries: bool,
        /// Entries shown per map with --entries.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Compare a snapshot with another snapshot, or with live maps (--id/--pin/...).
    Diff {
        old: PathBuf,
        new: Option<PathBuf>,
        #[command(flatten)]
        live: Sources,
        /// Differing entries shown per map.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        #[arg(long)]
        json: bool,
    },
    /// Check a snapshot's checksums and structure without touching any map.
    Verify {
        snapshot: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    for cause in e.chain() {
        if cause.downcast_ref::<format::FormatError>().is_some() {
            return code::BAD_SNAPSHOT;
        }
        if let Some(err) = cause.downcast_ref::<E>() {
            return match err {
                E::Format(_) => code::BAD_SNAPSHOT,
                E::Unsupported { .. } => code::UNSUPPORTED,
                E::Incompatible { .. }
                | E::CpuMismatch { .. }
                | E::PinExists { .. }
                | E::UnsafePinPath { .. }
                | E::Restore { .. } => code::REFUSED,
                E::Sys(_) | E::Discover(_) | E::Io { .. } => code::SYSTEM,
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

fn open_snapshot(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = File::open(path).with_context(|| format!("cannot open snapshot {}", path.display()))?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
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
    match args.cmd {
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
            json,
        } => {
            let s = sources.to_sources();
            if s.is_empty() {
                bail!("say which maps to dump: --id, --pin, --pid or --container-pid");
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
                ..DumpOptions::default()
            };
            let bar = bar::Bar::new();
            let report = if output == Path::new("-") {
                let out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
                let (mut out, report) = dump::dump(&found, out, &info, &opts, &bar)?;
                out.flush()?;
                report
            } else {
                write_atomically(&output, overwrite, |f| {
                    let (out, report) = dump::dump(&found, f, &info, &opts, &bar)?;
                    Ok((out, report))
                })?
            };
            bar.finish();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "output": output,
                        "sha256": report.digest.sha256_hex(),
                        "bytes": report.digest.bytes,
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
                    "wrote {} ({} bytes, sha256 {})",
                    output.display(),
                    report.digest.bytes,
                    report.digest.sha256_hex()
                );
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
            json,
        } => {
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
            };
            if snapshot == Path::new("-") {
                bail!("restore reads the snapshot twice (verify, then apply): give a file, not -");
            }
            // Everything is checked before any map is created or changed.
            let summary = format::verify(open_snapshot(&snapshot)?)?;
            let bar = bar::Bar::new();
            let report = restore::restore(
                open_snapshot(&snapshot)?,
                Some(&summary),
                &dest,
                &opts,
                &bar,
            )?;
            bar.finish();
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
        Cmd::Inspect {
            snapshot,
            entries,
            limit,
            json,
        } => inspect::run(open_snapshot(&snapshot)?, entries, limit, json)?,
        Cmd::Diff {
            old,
            new,
            live,
            examples,
            json,
        } => {
            let open_old = || -> mapsnap::Result<Box<dyn Read>> { open_for_diff(&old) };
            let live_sources = live.to_sources();
            let found;
            let open_new;
            let new_side = match (&new, live_sources.is_empty()) {
                (Some(p), true) => {
                    open_new = move || -> mapsnap::Result<Box<dyn Read>> { open_for_diff(p) };
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
            let diffs = diff::diff(&Side::Snapshot(&open_old), &new_side, examples)?;
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
        Cmd::Verify { snapshot, json } => {
            let s = format::verify(open_snapshot(&snapshot)?)?;
            if json {
                let maps: Vec<_> = s
                    .maps
                    .iter()
                    .map(|(m, n)| serde_json::json!({"name": m.name, "type": m.type_name(), "entries": n}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "ok": true, "sha256": s.digest.sha256_hex(), "bytes": s.digest.bytes, "maps": maps
                    }))?
                );
            } else {
                println!(
                    "ok: {} maps, {} bytes, sha256 {}",
                    s.maps.len(),
                    s.digest.bytes,
                    s.digest.sha256_hex()
                );
            }
        }
    }
    Ok(ExitCode::from(code::OK))
}

fn open_for_diff(p: &Path) -> mapsnap::Result<Box<dyn Read>> {
    let f = File::open(p)
        .map_err(|e| mapsnap::Error::io(format!("cannot open snapshot {}", p.display()), e))?;
    Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
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

/// Writes `path` through a temporary file renamed into place, so a failed dump never leaves
/// a partial snapshot under the name.
fn write_atomically<T>(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(BufWriter<File>) -> anyhow::Result<(BufWriter<File>, T)>,
) -> anyhow::Result<T> {
    if !overwrite && path.exists() {
        bail!(
            "{} already exists: pass --overwrite to replace it",
            path.display()
        );
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile_in(dir, path)?;
    let result = (|| {
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let (out, value) = write(BufWriter::with_capacity(1 << 20, f))?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tempfile_in(dir: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    Ok(dir.join(format!(".{name}.{}.partial", std::process::id())))
}

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
