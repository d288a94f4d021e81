//! `mapsnap ls`: one line per map.

use mapsnap::discover::Found;
use mapsnap::dump::{batch_entries, meta_of, read_entries, unsupported_reason};
use mapsnap::model::{Access, access_of, type_name};

#[derive(Debug, serde::Serialize)]
struct Row {
    id: u32,
    #[serde(rename = "type")]
    map_type: &'static str,
    name: String,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    /// None where counting would change the map (queues, stacks) or it cannot be read.
    entries: Option<u64>,
    bytes: Option<u64>,
    flags: u32,
    frozen: bool,
    pin: Option<String>,
    btf_id: u32,
    supported: bool,
}

/// Counts entries by reading them (batch where possible); None for queues and unsupported maps.
fn count(f: &Found) -> anyhow::Result<Option<(u64, u64)>> {
    if unsupported_reason(&f.info).is_some() {
        return Ok(None);
    }
    let meta = meta_of(&f.info, f.frozen, None)?;
    if access_of(meta.map_type) == Ok(Access::Queue) {
        return Ok(None);
    }
    let (kl, vl) = (meta.key_len(), meta.value_len());
    let n = read_entries(
        &f.map,
        kl,
        vl,
        batch_entries(1 << 20, kl + vl),
        &mut |_, _, _| Ok(()),
    )?;
    Ok(Some((n, n * (kl + vl) as u64)))
}

pub fn print(found: &[Found], json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for f in found {
        let counted = count(f)?;
        rows.push(Row {
            id: f.info.id,
            map_type: type_name(f.info.map_type),
            name: f.info.name.clone(),
            key_size: f.info.key_size,
            value_size: f.info.value_size,
            max_entries: f.info.max_entries,
            entries: counted.map(|c| c.0),
            bytes: counted.map(|c| c.1),
            flags: f.info.flags,
            frozen: f.frozen,
            pin: f.pin_abs.as_ref().map(|p| p.display().to_string()),
            btf_id: f.info.btf_id,
            supported: unsupported_reason(&f.info).is_none(),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>6}  {:<16} {:<16} {:>5} {:>6} {:>9} {:>9} {:>11}  {:<6} PIN",
        "ID", "TYPE", "NAME", "KEY", "VALUE", "MAX", "ENTRIES", "BYTES", "FROZEN"
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    for r in rows {
        println!(
            "{:>6}  {:<16} {:<16} {:>5} {:>6} {:>9} {:>9} {:>11}  {:<6} {}",
            r.id,
            r.map_type,
            r.name,
            r.key_size,
            r.value_size,
            r.max_entries,
            opt(r.entries),
            opt(r.bytes),
            if r.frozen { "yes" } else { "no" },
            r.pin.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}
