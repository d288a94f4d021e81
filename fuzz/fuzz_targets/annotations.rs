//! Any annotations a pod author can set: lines `key=value` become the annotation map the
//! hook parses; the first line is also tried as a map filter and as a glob against the
//! second. Refused or accepted, never a panic (and never slow: libFuzzer's timeout catches
//! a backtracking glob).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mapsnap_hook::annotations::{MapFilter, glob_match, parse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut all = BTreeMap::new();
    for line in text.lines().take(64) {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        all.insert(k.to_string(), v.to_string());
    }
    let _ = parse(&all);
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let second = lines.next().unwrap_or("");
    if let Ok(f) = MapFilter::parse(first) {
        let _ = f.matches(second);
        let _ = f.literal_prefixes().count();
    }
    let _ = glob_match(first, second);
});
