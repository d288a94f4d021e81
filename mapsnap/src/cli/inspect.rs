//! `mapsnap inspect`: a snapshot's metadata and, on request, its entries typed by BTF.

use std::collections::HashMap;
use std::io::Read;

use mapsnap::btf_fmt::{TypedBtf, render_hex, to_text};
use mapsnap::format::{Event, SnapshotReader};
use mapsnap::model::{BtfRef, MapMeta};
use mapsnap::storage::Manifest;
use serde_json::{Value, json};

/// Renders one key or value: by BTF type when the map has BTF, else as hex bytes.
fn render(btfs: &HashMap<u32, TypedBtf>, btf: Option<&BtfRef>, key: bool, bytes: &[u8]) -> Value {
    let typed = btf.and_then(|b| {
        let id = if key { b.key_type_id } else { b.value_type_id };
        let t = btfs.get(&b.index)?;
        (id != 0).then(|| t.render(id, bytes).ok()).flatten()
    });
    typed.unwrap_or_else(|| render_hex(bytes))
}

/// Prints a manifest (`inspect --manifest`, and the head of `inspect`).
pub fn print_manifest(m: &Manifest, name: Option<&str>) {
    println!("manifest {}", name.unwrap_or(""));
    println!("  snapshot: {}", m.snapshot);
    println!("  format version: {}", m.format_version);
    println!("  sha256: {}", m.sha256);
    println!("  size: {} bytes", m.size);
    println!("  created: {}", m.created);
    println!("  tool: {}", m.tool);
    let src = &m.source;
    println!(
        "  source: host {:?}, kernel {:?}, {} possible CPUs, {}",
        src.host, src.kernel, src.possible_cpus, src.selection
    );
    if let Some(c) = &src.container_id {
        println!("  container id: {c}");
    }
    if let Some(p) = &src.pod {
        println!("  pod: {p}");
    }
    if let Some(u) = &src.pod_uid {
        println!("  pod uid: {u}");
    }
    for map in &m.maps {
        println!(
            "  map {:?} ({}{}): {} entries, {} bytes",
            map.name,
            map.map_type,
            if map.inner { ", inner" } else { "" },
            map.entries,
            map.bytes
        );
    }
    for s in &m.skipped {
        println!("  skipped: {s}");
    }
}

pub fn run(
    source: Box<dyn Read>,
    entries: bool,
    limit: usize,
    json: bool,
    manifest: Option<&Manifest>,
    manifest_name: Option<String>,
    limits: &mapsnap::limits::Limits,
) -> anyhow::Result<()> {
    let mut reader = SnapshotReader::with_limits(source, limits)?;
    let mut btfs: HashMap<u32, TypedBtf> = HashMap::new();
    let mut maps: Vec<Value> = Vec::new();
    let mut info_v = Value::Null;
    let mut current: Option<(MapMeta, Vec<Value>)> = None;
    let mut sha = String::new();
    while let Some(ev) = reader.next_event()? {
        match ev {
            Event::Info(i) => info_v = serde_json::to_value(&i)?,
            Event::Btf { index, blob } => {
                // Unparseable BTF only costs typed output: entries fall back to hex.
                if let Ok(t) = TypedBtf::parse(&blob) {
                    btfs.insert(index, t);
                }
            }
            Event::MapBegin { meta, .. } => current = Some((meta, Vec::new())),
            Event::Entries(chunk) => {
                let Some((meta, shown)) = current.as_mut() else {
                    continue;
                };
                if !entries {
                    continue;
                }
                for (k, v) in chunk.iter() {
                    if shown.len() >= limit {
                        break;
                    }
                    let mut e = serde_json::Map::new();
                    if meta.key_len() > 0 {
                        e.insert("key".into(), render(&btfs, meta.btf.as_ref(), true, k));
                    }
                    e.insert("value".into(), render(&btfs, meta.btf.as_ref(), false, v));
                    shown.push(Value::Object(e));
                }
            }
            Event::MapEnd { index, entries: n } => {
                if let Some((meta, shown)) = current.take() {
                    let btf_types = meta.btf.as_ref().and_then(|b| {
                        let t = btfs.get(&b.index)?;
                        Some(json!({
                            "key": t.type_name(b.key_type_id).ok(),
                            "value": t.type_name(b.value_type_id).ok(),
                        }))
                    });
                    let mut m = json!({
                        "index": index,
                        "entries": n,
                        "meta": meta,
                        "btf_types": btf_types,
                    });
                    if entries {
                        m["shown"] = Value::Array(shown);
                    }
                    maps.push(m);
                }
            }
            Event::End(d) => sha = d.sha256_hex(),
        }
    }
    // The source's clocks at dump time (absent in snapshots older than the record).
    let clocks = reader.clocks().copied();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "info": info_v,
                "clocks": clocks,
                "sha256": sha,
                "maps": maps,
                "manifest": manifest,
            }))?
        );
        return Ok(());
    }
    if let Some(m) = manifest {
        print_manifest(m, manifest_name.as_deref());
    }
    println!("snapshot sha256 {sha}");
    if let Some(o) = info_v.as_object() {
        for (k, v) in o {
            println!("  {k}: {v}");
        }
    }
    match clocks {
        Some(c) => println!(
            "  clocks at dump: monotonic {} ns, boottime {} ns, realtime {} ns, tai {} ns, \
             jiffies {}, HZ {} (read within {} ns)",
            c.monotonic_ns,
            c.boottime_ns,
            c.realtime_ns,
            c.tai_ns,
            c.jiffies.map_or("unknown".into(), |j| j.to_string()),
            c.hz.map_or("unknown".into(), |h| h.to_string()),
            c.uncertainty_ns
        ),
        None => println!("  clocks at dump: not recorded (timestamps cannot be rebased)"),
    }
    for m in &maps {
        let meta = &m["meta"];
        println!(
            "map {} {:?}: type {}, key {} value {} max {} flags {:#x}, {} entries{}{}{}",
            m["index"],
            meta["name"].as_str().unwrap_or(""),
            mapsnap::model::type_name(meta["map_type"].as_u64().unwrap_or(0) as u32),
            meta["key_size"],
            meta["value_size"],
            meta["max_entries"],
            meta["flags"].as_u64().unwrap_or(0),
            m["entries"],
            if meta["frozen"] == Value::Bool(true) {
                ", frozen"
            } else {
                ""
            },
            meta["pin_path"]
                .as_str()
                .map(|p| format!(", pin {p}"))
                .unwrap_or_default(),
            if meta["inner"] == Value::Bool(true) {
                ", inner map"
            } else {
                ""
            },
        );
        if let Some(t) = m["btf_types"].as_object() {
            println!("  btf: key {} value {}", t["key"], t["value"]);
        }
        if let Some(shown) = m["shown"].as_array() {
            for e in shown {
                match e.get("key") {
                    Some(k) => println!("  {} => {}", to_text(k), to_text(&e["value"])),
                    None => println!("  {}", to_text(&e["value"])),
                }
            }
        }
    }
    Ok(())
}
