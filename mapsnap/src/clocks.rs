//! Clock samples taken "together" and the arithmetic that moves a timestamp from one host's
//! clock to another's.
//!
//! BPF programs store times read with `bpf_ktime_get_ns()` (CLOCK_MONOTONIC),
//! `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME), `bpf_ktime_get_tai_ns()` (CLOCK_TAI),
//! wall-clock times written by user space (CLOCK_REALTIME) or `jiffies`/`bpf_jiffies64()`.
//! Such a value means something only relative to the clock of the host that wrote it. A
//! [`ClockSample`] records every clock at one moment; [`rebase`] shifts a stored value so
//! that its distance to "now" on the new host is what it was at dump time.
//!
//! Jiffies from user space: the kernel publishes the `jiffies` counter in
//! `/proc/timer_list` (`jiffies: N`, mode 0400, so root only), which also states the
//! CLOCK_MONOTONIC time at which it was generated (`now at N nsecs`). `/proc/stat` and
//! `/proc/PID/stat` count in USER_HZ (always 100), not in kernel ticks, and `/proc/schedstat`
//! (which has a jiffies `timestamp`) exists only with CONFIG_SCHEDSTATS. HZ itself is not
//! published; it is derived from that one reading: on 64-bit kernels jiffies starts at
//! `INITIAL_JIFFIES = 2^32 - 300 * HZ` and then advances HZ times per second of
//! CLOCK_MONOTONIC, so of the values Linux allows (100, 250, 300, 1000) the right one predicts
//! the reading within a fraction of a second. Near 300 s of uptime the candidates predict
//! the same count; then `/boot/config-$(uname -r)` (`CONFIG_HZ=`) is read, and failing that
//! HZ stays unknown. Without root, jiffies and HZ are `None` and jiffies fields cannot be
//! rebased.

use std::{fmt, fs, str::FromStr};

use serde::{Deserialize, Serialize};

const NS_PER_S: i128 = 1_000_000_000;
/// Tick rates a Linux kernel can be configured with (CONFIG_HZ).
const HZ_CANDIDATES: [u32; 4] = [100, 250, 300, 1000];
/// Bracketed reads attempted; the tightest bracket wins.
const SAMPLE_TRIES: usize = 5;

/// Errors from reading clocks or parsing clock specifications.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClockError {
    /// `clock_gettime` failed (the clock does not exist on this kernel).
    #[error("clock_gettime({clock}) failed: {source}")]
    Read {
        clock: &'static str,
        source: std::io::Error,
    },
    /// A clock specification such as `monotonic_ns` could not be parsed.
    #[error("invalid clock specification {spec:?}: {reason}")]
    BadSpec { spec: String, reason: String },
}

/// Every clock a stored timestamp can refer to, read at (nearly) the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSample {
    /// CLOCK_MONOTONIC in ns (`bpf_ktime_get_ns()`), middle of the bracket.
    pub monotonic_ns: u64,
    /// CLOCK_BOOTTIME in ns (`bpf_ktime_get_boot_ns()`).
    pub boottime_ns: u64,
    /// CLOCK_REALTIME in ns since the epoch.
    pub realtime_ns: u64,
    /// CLOCK_TAI in ns (`bpf_ktime_get_tai_ns()`).
    pub tai_ns: u64,
    /// The kernel's 64-bit `jiffies`, when readable (root: /proc/timer_list).
    pub jiffies: Option<u64>,
    /// The kernel's tick rate (CONFIG_HZ), when known.
    pub hz: Option<u32>,
    /// Width in ns of the CLOCK_MONOTONIC bracket around the reads: every value above was
    /// taken within this window (jiffies additionally has one tick of granularity).
    pub uncertainty_ns: u64,
}

impl ClockSample {
    /// Read every clock now. Tries a few times and keeps the tightest bracket.
    pub fn now() -> Result<Self, ClockError> {
        let timer_list = read_timer_list();
        let mut best: Option<Self> = None;
        for _ in 0..SAMPLE_TRIES {
            let before = read_clock(libc::CLOCK_MONOTONIC, "CLOCK_MONOTONIC")?;
            let boottime_ns = read_clock(libc::CLOCK_BOOTTIME, "CLOCK_BOOTTIME")?;
            let realtime_ns = read_clock(libc::CLOCK_REALTIME, "CLOCK_REALTIME")?;
            let tai_ns = read_clock(libc::CLOCK_TAI, "CLOCK_TAI")?;
            let after = read_clock(libc::CLOCK_MONOTONIC, "CLOCK_MONOTONIC")?;
            let width = after.saturating_sub(before);
            let sample = Self {
                monotonic_ns: before + width / 2,
                boottime_ns,
                realtime_ns,
                tai_ns,
                jiffies: None,
                hz: None,
                uncertainty_ns: width,
            };
            if best.is_none_or(|b| width < b.uncertainty_ns) {
                best = Some(sample);
            }
        }
        let mut sample = best.ok_or(ClockError::Read {
            clock: "CLOCK_MONOTONIC",
            source: std::io::Error::other("no sample"),
        })?;
        if let Some((jiffies, at_ns)) = timer_list {
            let hz = hz_from_jiffies(jiffies, at_ns).or_else(hz_from_boot_config);
            sample.hz = hz;
            // Carry the reading forward to the sample's instant (whole ticks only).
            sample.jiffies = Some(match hz {
                Some(hz) => {
                    let ticks = i128::from(sample.monotonic_ns) - i128::from(at_ns);
                    let ticks = ticks * i128::from(hz) / NS_PER_S;
                    (i128::from(jiffies) + ticks).clamp(0, i128::from(u64::MAX)) as u64
                }
                None => jiffies,
            });
        }
        Ok(sample)
    }

    /// The clock's reading in `unit`, or `None` when this sample lacks it (jiffies or HZ
    /// unknown).
    pub fn reading(&self, clock: Clock, unit: Unit) -> Option<i128> {
        let ns = match clock {
            Clock::Monotonic => i128::from(self.monotonic_ns),
            Clock::Boottime => i128::from(self.boottime_ns),
            Clock::Realtime => i128::from(self.realtime_ns),
            Clock::Tai => i128::from(self.tai_ns),
            Clock::Jiffies => {
                let j = i128::from(self.jiffies?);
                return match unit {
                    Unit::Jiffies => Some(j),
                    _ => Some(j * NS_PER_S / i128::from(self.hz?) / unit.ns_factor(None)?),
                };
            }
        };
        Some(ns / unit.ns_factor(self.hz)?)
    }
}

fn read_clock(id: libc::clockid_t, clock: &'static str) -> Result<u64, ClockError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; clock_gettime only writes into it.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Err(ClockError::Read {
            clock,
            source: std::io::Error::last_os_error(),
        });
    }
    let ns = i128::from(ts.tv_sec) * NS_PER_S + i128::from(ts.tv_nsec);
    Ok(ns.clamp(0, i128::from(u64::MAX)) as u64)
}

/// `(jiffies, CLOCK_MONOTONIC ns when the file was generated)` from /proc/timer_list.
fn read_timer_list() -> Option<(u64, u64)> {
    use std::io::BufRead;
    // Line by line: the file lists every CPU's timers and the two values come first.
    let file = fs::File::open("/proc/timer_list").ok()?;
    parse_timer_list(std::io::BufReader::new(file).lines().map_while(Result::ok))
}

fn parse_timer_list(lines: impl IntoIterator<Item = impl AsRef<str>>) -> Option<(u64, u64)> {
    let mut now = None;
    let mut jiffies = None;
    for line in lines {
        let line = line.as_ref().trim();
        if now.is_none()
            && let Some(rest) = line.strip_prefix("now at ")
        {
            now = rest.split_whitespace().next()?.parse().ok();
        } else if jiffies.is_none()
            && let Some(rest) = line.strip_prefix("jiffies:")
        {
            jiffies = rest.trim().parse().ok();
        }
        if let (Some(j), Some(n)) = (jiffies, now) {
            return Some((j, n));
        }
    }
    None
}

/// The tick rate that explains a jiffies reading taken at `monotonic_ns`, if exactly one
/// candidate does (within 2 s of ticks; the candidates are tens of seconds apart once the
/// machine has been up for a while).
pub fn hz_from_jiffies(jiffies: u64, monotonic_ns: u64) -> Option<u32> {
    let fits: Vec<u32> = HZ_CANDIDATES
        .into_iter()
        .filter(|&hz| {
            let hz_i = i128::from(hz);
            let initial = (1i128 << 32) - 300 * hz_i;
            let predicted = initial + i128::from(monotonic_ns) * hz_i / NS_PER_S;
            (predicted - i128::from(jiffies)).abs() <= 2 * hz_i
        })
        .collect();
    match fits.as_slice() {
        [hz] => Some(*hz),
        _ => None,
    }
}

fn hz_from_boot_config() -> Option<u32> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

/// The clock a timestamp was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`).
    Monotonic,
    /// CLOCK_BOOTTIME (`bpf_ktime_get_boot_ns`).
    Boottime,
    /// CLOCK_REALTIME (wall clock).
    Realtime,
    /// CLOCK_TAI (`bpf_ktime_get_tai_ns`).
    Tai,
    /// The kernel's `jiffies` counter (`bpf_jiffies64`).
    Jiffies,
}

impl Clock {
    /// Name used in specifications.
    pub fn as_str(self) -> &'static str {
        match self {
            Clock::Monotonic => "monotonic",
            Clock::Boottime => "boottime",
            Clock::Realtime => "realtime",
            Clock::Tai => "tai",
            Clock::Jiffies => "jiffies",
        }
    }
}

/// The unit a timestamp is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Nanoseconds.
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
    /// Kernel ticks (1/HZ s).
    Jiffies,
}

impl Unit {
    /// Name used in specifications.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "us",
            Unit::Ms => "ms",
            Unit::S => "s",
            Unit::Jiffies => "jiffies",
        }
    }

    /// Nanoseconds per unit (jiffies need HZ, and are exact only when HZ divides 10^9).
    fn ns_factor(self, hz: Option<u32>) -> Option<i128> {
        Some(match self {
            Unit::Ns => 1,
            Unit::Us => 1_000,
            Unit::Ms => 1_000_000,
            Unit::S => NS_PER_S,
            Unit::Jiffies => NS_PER_S / i128::from(hz.filter(|&h| h > 0)?),
        })
    }
}

/// What a timestamp field holds: a clock read in a unit. Written `monotonic_ns`,
/// `boottime_s`, `tai_us`, `realtime_ms`, `monotonic_jiffies` or just `jiffies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RebaseSpec {
    /// The clock.
    pub clock: Clock,
    /// The unit.
    pub unit: Unit,
}

/// Prefix of the BTF decl tag that marks a timestamp member:
/// `__attribute__((btf_decl_tag("mapsnap:clock=monotonic_ns")))`.
pub const DECL_TAG_PREFIX: &str = "mapsnap:clock=";

impl RebaseSpec {
    /// The spec carried by a BTF decl tag, `None` when the tag is not a mapsnap clock tag.
    pub fn from_decl_tag(tag: &str) -> Option<Result<Self, ClockError>> {
        tag.strip_prefix(DECL_TAG_PREFIX).map(str::parse)
    }
}

impl FromStr for RebaseSpec {
    type Err = ClockError;

    fn from_str(s: &str) -> Result<Self, ClockError> {
        let bad = |reason: &str| ClockError::BadSpec {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        if s == "jiffies" {
            return Ok(Self {
                clock: Clock::Jiffies,
                unit: Unit::Jiffies,
            });
        }
        let (clock, unit) = s
            .rsplit_once('_')
            .ok_or_else(|| bad("expected CLOCK_UNIT, e.g. monotonic_ns, or jiffies"))?;
        let clock = match clock {
            "monotonic" | "mono" | "ktime" => Clock::Monotonic,
            "boottime" | "boot" => Clock::Boottime,
            "realtime" | "real" | "wall" => Clock::Realtime,
            "tai" => Clock::Tai,
            "jiffies" => Clock::Jiffies,
            _ => {
                return Err(bad(
                    "clock must be monotonic, boottime, realtime, tai or jiffies",
                ));
            }
        };
        let unit = match unit {
            "ns" => Unit::Ns,
            "us" => Unit::Us,
            "ms" => Unit::Ms,
            "s" => Unit::S,
            "jiffies" => Unit::Jiffies,
            _ => return Err(bad("unit must be ns, us, ms, s or jiffies")),
        };
        Ok(Self { clock, unit })
    }
}

impl fmt::Display for RebaseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.clock == Clock::Jiffies && self.unit == Unit::Jiffies {
            f.write_str("jiffies")
        } else {
            write!(f, "{}_{}", self.clock.as_str(), self.unit.as_str())
        }
    }
}

/// How the time between dump and restore counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebaseMode {
    /// The distance to "now" is kept exactly: the snapshot's time in transit did not
    /// happen for the entries (a timeout has as long left as at dump time).
    #[default]
    PreserveRemaining,
    /// Time in transit counts: the distance shrinks (or an age grows) by the CLOCK_REALTIME
    /// difference between the samples (never negative), as if the source had kept running.
    Elapsed,
}

impl RebaseMode {
    /// Name used on the command line and in annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreserveRemaining => "preserve-remaining",
            Self::Elapsed => "elapsed",
        }
    }
}

impl FromStr for RebaseMode {
    type Err = ClockError;

    fn from_str(s: &str) -> Result<Self, ClockError> {
        match s {
            "preserve-remaining" => Ok(Self::PreserveRemaining),
            "elapsed" => Ok(Self::Elapsed),
            _ => Err(ClockError::BadSpec {
                spec: s.to_string(),
                reason: "rebase mode must be preserve-remaining or elapsed".to_string(),
            }),
        }
    }
}

/// [`rebase_between`] for a field whose clock and unit stay the same.
///
/// Returns `None` when a sample lacks what the spec needs (jiffies or HZ unknown).
pub fn rebase(
    value: u64,
    unit: Unit,
    clock: Clock,
    from: &ClockSample,
    to: &ClockSample,
    mode: RebaseMode,
) -> Option<u64> {
    let spec = RebaseSpec { clock, unit };
    rebase_between(value, spec, spec, from, to, mode, u64::MAX)
}

/// Move `value` (a reading of `src.clock` in `src.unit` on the host of `from`) to the host
/// of `to`, as a reading of `dst.clock` in `dst.unit`, keeping its distance to "now"
/// (minus the time in transit in [`RebaseMode::Elapsed`]).
///
/// Zero (unset) stays zero. The result saturates at `max` (the field's largest value)
/// and at 1: a set timestamp never turns into "unset". Returns `None` when a sample lacks
/// a reading the specs need.
pub fn rebase_between(
    value: u64,
    src: RebaseSpec,
    dst: RebaseSpec,
    from: &ClockSample,
    to: &ClockSample,
    mode: RebaseMode,
    max: u64,
) -> Option<u64> {
    if value == 0 {
        return Some(0);
    }
    let src_ns = src.unit.ns_factor(from.hz)?;
    let dst_ns = dst.unit.ns_factor(to.hz)?;
    let then = from.reading(src.clock, src.unit)?;
    let now = to.reading(dst.clock, dst.unit)?;
    // Signed distance from the dump instant, in ns.
    let mut delta_ns = (i128::from(value) - then) * src_ns;
    if mode == RebaseMode::Elapsed {
        let transit = i128::from(to.realtime_ns) - i128::from(from.realtime_ns);
        delta_ns -= transit.max(0);
    }
    let new = now + delta_ns.div_euclid(dst_ns);
    Some(new.clamp(1, i128::from(max.max(1))) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_list_parse() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 2593626592102 nsecs\n\ncpu: 0\n jiffies: 4295540601\n";
        assert_eq!(
            parse_timer_list(text.lines()),
            Some((4_295_540_601, 2_593_626_592_102))
        );
        assert_eq!(parse_timer_list(["nothing"]), None);
    }

    #[test]
    fn hz_detection() {
        // Seen on a HZ=250 kernel 2593 s after boot.
        assert_eq!(hz_from_jiffies(4_295_540_601, 2_593_626_592_102), Some(250));
        // 300 s after boot every candidate predicts 2^32: ambiguous.
        assert_eq!(hz_from_jiffies(1 << 32, 300_000_000_000), None);
    }

    #[test]
    fn spec_parse() {
        for s in [
            "monotonic_ns",
            "boottime_s",
            "tai_us",
            "realtime_ms",
            "jiffies",
            "monotonic_jiffies",
            "jiffies_ms",
        ] {
            let spec: RebaseSpec = s.parse().expect(s);
            assert_eq!(spec.to_string(), s);
        }
        assert!("monotonic".parse::<RebaseSpec>().is_err());
        assert!("cpu_ns".parse::<RebaseSpec>().is_err());
        assert!("monotonic_h".parse::<RebaseSpec>().is_err());
        assert_eq!(
            RebaseSpec::from_decl_tag("mapsnap:clock=boottime_ms").and_then(|r| r.ok()),
            Some(RebaseSpec {
                clock: Clock::Boottime,
                unit: Unit::Ms
            })
        );
        assert!(RebaseSpec::from_decl_tag("other").is_none());
    }
}
