//! Conversion and rebasing flags of `restore`, and the `convert` command (docs/CONVERT.md).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use mapsnap::clocks::RebaseMode;
use mapsnap::convert::{RestoreConversion, TargetBtf, btf_from_elf, convert_snapshot};
use mapsnap::format::VerifySummary;
use mapsnap::limits::Limits;
use mapsnap::restore::{self, Destination, RestoreOptions};
use mapsnap::sys::{self, Map};

/// How members are matched and filled (shared by `restore --convert` and `convert`).
#[derive(Debug, clap::Args, Default)]
pub struct MemberArgs {
    /// Clamp values that do not fit a narrower member (counted), drop the tail of a shorter
    /// array, turn enum values without counterpart into 0.
    #[arg(long)]
    pub lossy: bool,
    /// Value of a member new in the target type: `member.path=VALUE` (`key.` prefix for a
    /// key member; VALUE an integer, 0x.., true/false or an enumerator name). Repeatable.
    #[arg(long = "default", value_name = "MEMBER.PATH=VALUE")]
    pub defaults: Vec<String>,
    /// A renamed member: `old.path=new.path`. Repeatable.
    #[arg(long = "rename", value_name = "OLD.PATH=NEW.PATH")]
    pub renames: Vec<String>,
}

impl MemberArgs {
    fn given(&self) -> bool {
        self.lossy || !self.defaults.is_empty() || !self.renames.is_empty()
    }

    fn apply(&self, conv: &mut RestoreConversion) -> anyhow::Result<()> {
        conv.set_lossy(self.lossy);
        for d in &self.defaults {
            conv.add_default(d)?;
        }
        for r in &self.renames {
            conv.add_rename(r)?;
        }
        Ok(())
    }
}

/// `restore` flags for conversion by BTF and clock rebasing.
#[derive(Debug, clap::Args, Default)]
pub struct ConvertArgs {
    /// Fill existing maps (--into, --into-root) whose key/value types differ from the
    /// snapshot's: members matched by name through both maps' BTF.
    #[arg(long)]
    pub convert: bool,
    /// Print only the conversion plan, member by member, after checking every entry; write
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub members: MemberArgs,
    /// A member holding a timestamp: `member.path=CLOCK_UNIT` (monotonic_ns, boottime_s,
    /// tai_us, realtime_ms, jiffies, ...); adds to the `mapsnap:clock=` decl tags of the BTF.
    /// Repeatable.
    #[arg(long = "rebase", value_name = "MEMBER.PATH=CLOCK_UNIT")]
    pub rebase: Vec<String>,
    /// preserve-remaining: a timestamp keeps its distance to "now" from dump time;
    /// elapsed: the time the snapshot spent in transit counts too.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub rebase_mode: Option<RebaseMode>,
}

fn parse_mode(s: &str) -> Result<RebaseMode, String> {
    s.parse()
        .map_err(|e: mapsnap::clocks::ClockError| e.to_string())
}

impl ConvertArgs {
    /// The library settings, or `None` when no conversion or rebasing flag was given.
    pub fn conversion(&self) -> anyhow::Result<Option<RestoreConversion>> {
        let active = self.convert || !self.rebase.is_empty() || self.rebase_mode.is_some();
        if !active {
            if self.members.given() {
                bail!("--lossy, --default and --rename need --convert");
            }
            if self.dry_run {
                bail!("--dry-run prints a conversion plan: add --convert or --rebase");
            }
            return Ok(None);
        }
        let mut conv = RestoreConversion {
            convert: self.convert,
            mode: self.rebase_mode.unwrap_or_default(),
            ..RestoreConversion::default()
        };
        if self.members.given() && !self.convert {
            bail!("--lossy, --default and --rename need --convert");
        }
        self.members.apply(&mut conv)?;
        for r in &self.rebase {
            conv.add_rebase(r)?;
        }
        Ok(Some(conv))
    }
}

/// Before a restore with conversion: plans every map and converts every entry without
/// writing, and prints the plans. Returns true when the restore must stop here (dry run).
pub fn preflight(
    args: &ConvertArgs,
    opts: &RestoreOptions,
    dest: &Destination,
    summary: Option<&VerifySummary>,
    reader: impl FnOnce() -> anyhow::Result<Box<dyn Read>>,
) -> anyhow::Result<bool> {
    if opts.convert.is_none() {
        return Ok(false);
    }
    if args.convert && !matches!(dest, Destination::Into(_) | Destination::IntoRoot(_)) {
        bail!(
            "--convert fills existing maps of another layout: use it with --into or --into-root \
             (or write a converted snapshot with `mapsnap convert`)"
        );
    }
    let Some(summary) = summary else {
        bail!("a restore with conversion reads the snapshot more than once: give a file");
    };
    let checked = restore::check_conversion(reader()?, summary, dest, opts)?;
    for m in &checked {
        println!(
            "map {:?} (snapshot map {}) -> {}: {} entries",
            m.name, m.index, m.target, m.entries
        );
        match &m.conversion {
            Some(c) => {
                print!("{c}");
                if c.outcome.lossy > 0 || c.outcome.rebased > 0 {
                    println!(
                        "  {} values clamped or dropped (lossy), {} timestamps rebased",
                        c.outcome.lossy, c.outcome.rebased
                    );
                }
            }
            None => println!("same layout: entries copied as they are"),
        }
    }
    Ok(args.dry_run)
}

/// `mapsnap convert SNAPSHOT --to-btf OBJECT_OR_PIN -o NEW`.
pub fn run_convert(
    read: &dyn Fn() -> anyhow::Result<Box<dyn Read>>,
    to_btf: &Path,
    output: &Path,
    select: Option<&str>,
    members: &MemberArgs,
    dry_run: bool,
    limits: &Limits,
) -> anyhow::Result<()> {
    let target = target_btf(to_btf)?;
    let mut conv = RestoreConversion {
        convert: true,
        ..RestoreConversion::default()
    };
    members.apply(&mut conv)?;
    // A first pass into nothing: every refusal comes before the file is created.
    let (_, maps) = convert_snapshot(read()?, &target, select, &conv, std::io::sink(), limits)?;
    for m in &maps {
        println!("map {:?}: {} entries", m.name, m.entries);
        match &m.conversion {
            Some(c) => print!("{c}"),
            None => println!("copied as it is"),
        }
    }
    if dry_run {
        return Ok(());
    }
    if output.exists() {
        bail!(
            "{} already exists: remove it or choose another name",
            output.display()
        );
    }
    let tmp = tmp_beside(output)?;
    let file =
        std::fs::File::create_new(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = convert_snapshot(read()?, &target, select, &conv, file, limits)
        .map_err(anyhow::Error::from)
        .and_then(|(f, _)| f.sync_all().map_err(anyhow::Error::from));
    if let Err(e) = written.and_then(|()| {
        std::fs::rename(&tmp, output).with_context(|| format!("renaming to {}", output.display()))
    }) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn tmp_beside(output: &Path) -> anyhow::Result<PathBuf> {
    let name = output
        .file_name()
        .with_context(|| format!("{}: not a file name", output.display()))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp{}", std::process::id()));
    Ok(output.with_file_name(tmp))
}

/// The target types: a clang-compiled object (its `.BTF`), or a pinned map (its BTF from
/// the kernel).
fn target_btf(path: &Path) -> anyhow::Result<TargetBtf> {
    let id = path.to_str().and_then(|s| s.parse::<u32>().ok());
    // A pinned map first: BPF_OBJ_GET refuses anything that is not one, without reading it.
    let map = match id {
        Some(id) => Some(Map::from_id(id)?),
        None => Map::from_pin(path).ok(),
    };
    if let Some(map) = map {
        let info = map.info()?;
        if info.btf_id == 0 || info.btf_value_type_id == 0 {
            bail!(
                "{}: the map has no BTF, so nothing can be converted to it: create it from a \
                 program compiled with clang -g",
                path.display()
            );
        }
        return Ok(TargetBtf::Map {
            btf: sys::btf_raw_by_id(info.btf_id)?,
            key_type_id: info.btf_key_type_id,
            value_type_id: info.btf_value_type_id,
        });
    }
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "{}: neither a pinned map nor a readable object",
            path.display()
        )
    })?;
    Ok(TargetBtf::Object(
        btf_from_elf(&bytes)
            .with_context(|| path.display().to_string())?
            .to_vec(),
    ))
}
