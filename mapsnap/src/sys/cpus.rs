//! Possible CPUs: the kernel sizes per-CPU values by them, not by online CPUs.

use std::sync::OnceLock;

use super::{Result, SysError};

const POSSIBLE: &str = "/sys/devices/system/cpu/possible";

/// Number of possible CPUs (highest possible CPU index + 1), read once.
pub fn possible_cpus() -> Result<u32> {
    static CACHE: OnceLock<u32> = OnceLock::new();
    if let Some(n) = CACHE.get() {
        return Ok(*n);
    }
    let text = std::fs::read_to_string(POSSIBLE).map_err(|e| SysError::new("read", POSSIBLE, e))?;
    let n = parse_cpu_list(&text).ok_or_else(|| {
        SysError::new(
            "parse",
            POSSIBLE,
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{text:?}")),
        )
    })?;
    Ok(*CACHE.get_or_init(|| n))
}

/// Parses a kernel CPU list such as `0-3,8-11` into highest index + 1.
fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut max = None;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let hi = match part.split_once('-') {
            Some((_, hi)) => hi.trim().parse::<u32>().ok()?,
            None => part.trim().parse::<u32>().ok()?,
        };
        max = Some(max.map_or(hi, |m: u32| m.max(hi)));
    }
    max.map(|m| m + 1)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(12));
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), None);
    }
}
