//! The `mapsnap.io/` annotations a container carries (documented in docs/NODE.md).
//!
//! Unknown `mapsnap.io/` keys are kept in [`Annotations::unknown`] and logged as warnings
//! (other mapsnap parts, like the operator, add keys of their own); known keys with bad
//! values are refused.

use std::collections::BTreeMap;
use std::str::FromStr;

use mapsnap::clocks::{ClockError, RebaseMode, RebaseSpec};
use mapsnap::restore::FillMode;

use crate::error::{HookError, Result};

pub const PREFIX: &str = "mapsnap.io/";

pub const RESTORE_FROM: &str = "mapsnap.io/restore-from";
pub const RESTORE_MODE: &str = "mapsnap.io/restore-mode";
pub const FILL_MODE: &str = "mapsnap.io/fill-mode";
pub const EXISTING: &str = "mapsnap.io/existing";
pub const SNAPSHOT_ON_STOP: &str = "mapsnap.io/snapshot-on-stop";
pub const SNAPSHOT_TO: &str = "mapsnap.io/snapshot-to";
/// `false` opts a container out of post-dump snapshots.
pub const CHECKPOINT_MAPS: &str = "mapsnap.io/checkpoint-maps";
/// Set by the operator on restored pods: `<namespace>/<name>` of the BpfMapCheckpoint.
pub const CHECKPOINT: &str = "mapsnap.io/checkpoint";
pub const CHECKPOINT_TO: &str = "mapsnap.io/checkpoint-to";
pub const MAPS: &str = "mapsnap.io/maps";
pub const POLICY: &str = "mapsnap.io/policy";
/// Timestamp members to move to this host's clocks at restore:
/// `value.expires=monotonic_ns, value.last_seen=boottime_s` (the CLI's `--rebase`).
pub const REBASE: &str = "mapsnap.io/rebase";
/// `preserve-remaining` (default) or `elapsed` (the CLI's `--rebase-mode`).
pub const REBASE_MODE: &str = "mapsnap.io/rebase-mode";

/// Every key the hook understands.
pub const KNOWN: &[&str] = &[
    RESTORE_FROM,
    RESTORE_MODE,
    FILL_MODE,
    EXISTING,
    SNAPSHOT_ON_STOP,
    SNAPSHOT_TO,
    CHECKPOINT_MAPS,
    CHECKPOINT,
    CHECKPOINT_TO,
    MAPS,
    POLICY,
    REBASE,
    REBASE_MODE,
];

/// What happens when a restore or snapshot fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// A failed restore fails the container start (and a failed post-dump the checkpoint).
    #[default]
    Strict,
    /// Failures are logged; the container starts (the checkpoint completes) without the maps.
    BestEffort,
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "strict" => Ok(Self::Strict),
            "best-effort" => Ok(Self::BestEffort),
            other => Err(format!("{other:?} is not strict or best-effort")),
        }
    }
}

/// When a `restore-from` snapshot is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMode {
    /// createRuntime: new maps pinned in the container's bpffs mounts before the process runs.
    #[default]
    Pin,
    /// poststart: wait (bounded) for the app to pin its own maps, then fill them.
    Wait,
}

impl FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "pin" => Ok(Self::Pin),
            "wait" => Ok(Self::Wait),
            other => Err(format!("{other:?} is not pin or wait")),
        }
    }
}

/// What a `pin` restore does about pins that already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Refuse the restore, naming the pin.
    #[default]
    Fail,
    /// When every pin the snapshot would create exists, leave them (the live maps are at least
    /// as new); otherwise refuse.
    Keep,
    /// Replace them atomically (rename over).
    Overwrite,
}

impl FromStr for Existing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "fail" => Ok(Self::Fail),
            "keep" => Ok(Self::Keep),
            "overwrite" => Ok(Self::Overwrite),
            other => Err(format!("{other:?} is not fail, keep or overwrite")),
        }
    }
}

/// The container's `mapsnap.io/` annotations, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations {
    pub restore_from: Option<String>,
    pub restore_mode: RestoreMode,
    pub fill_mode: FillMode,
    pub existing: Existing,
    /// Whether `existing` was given (each flow has its own default otherwise).
    pub existing_set: bool,
    pub snapshot_on_stop: bool,
    pub snapshot_to: Option<String>,
    /// False when the container opts out of post-dump snapshots.
    pub checkpoint: bool,
    /// The operator's `mapsnap.io/checkpoint` (`namespace/name`), informational.
    pub checkpoint_ref: Option<String>,
    /// `mapsnap.io/` keys this hook does not know.
    pub unknown: Vec<String>,
    pub checkpoint_to: Option<String>,
    pub maps: MapFilter,
    /// None: the node's default.
    pub policy: Option<Policy>,
    /// Whether any `mapsnap.io/` key was present.
    pub any: bool,
    /// `mapsnap.io/rebase`: timestamp members named by the pod (besides BTF tags).
    pub rebase: Vec<RebaseRule>,
    /// `mapsnap.io/rebase-mode`; None: the library's default (preserve-remaining).
    pub rebase_mode: Option<RebaseMode>,
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.trim() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        other => Err(HookError::Annotation {
            key: key.into(),
            msg: format!("{other:?} is not true or false"),
        }),
    }
}

fn non_empty(key: &str, v: &str) -> Result<String> {
    let t = v.trim();
    if t.is_empty() {
        return Err(HookError::Annotation {
            key: key.into(),
            msg: "is empty".into(),
        });
    }
    Ok(t.to_string())
}

impl Annotations {
    /// Reads the `mapsnap.io/` keys of `all` (other keys are ignored).
    pub fn parse(all: &BTreeMap<String, String>) -> Result<Self> {
        let mut a = Annotations {
            checkpoint: true,
            ..Default::default()
        };
        for (key, value) in all.iter().filter(|(k, _)| k.starts_with(PREFIX)) {
            a.any = true;
            let bad = |msg: String| HookError::Annotation {
                key: key.clone(),
                msg,
            };
            match key.as_str() {
                RESTORE_FROM => a.restore_from = Some(non_empty(key, value)?),
                RESTORE_MODE => a.restore_mode = value.parse().map_err(bad)?,
                FILL_MODE => {
                    a.fill_mode = match value.trim() {
                        "replace" => FillMode::Replace,
                        "merge" => FillMode::Merge,
                        other => return Err(bad(format!("{other:?} is not replace or merge"))),
                    }
                }
                EXISTING => {
                    a.existing = value.parse().map_err(bad)?;
                    a.existing_set = true;
                }
                SNAPSHOT_ON_STOP => a.snapshot_on_stop = parse_bool(key, value)?,
                SNAPSHOT_TO => a.snapshot_to = Some(non_empty(key, value)?),
                CHECKPOINT_MAPS => a.checkpoint = parse_bool(key, value)?,
                CHECKPOINT => a.checkpoint_ref = Some(value.trim().to_string()),
                CHECKPOINT_TO => a.checkpoint_to = Some(non_empty(key, value)?),
                MAPS => a.maps = MapFilter::parse(value).map_err(bad)?,
                POLICY => a.policy = Some(value.parse().map_err(bad)?),
                REBASE => a.rebase = RebaseRule::parse_list(value).map_err(bad)?,
                REBASE_MODE => {
                    a.rebase_mode = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|e: ClockError| bad(e.to_string()))?,
                    )
                }
                _ => a.unknown.push(key.clone()),
            }
        }
        Ok(a)
    }
}

/// `mapsnap.io/maps`: which pinned maps a snapshot takes, as globs over their paths inside the
/// container (`/sys/fs/bpf/app/*`), separated by commas or spaces; `!` excludes. A pattern
/// without `/` matches the pin's file name. `*` and `?` stay within one path component, `**`
/// crosses them. No include pattern means every map; excludes win.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapFilter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl MapFilter {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.len() > MAX_FILTER_LEN {
            return Err(format!("it is longer than {MAX_FILTER_LEN} bytes"));
        }
        let mut f = MapFilter::default();
        for word in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            let (neg, pat) = match word.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, word),
            };
            if pat.is_empty() {
                return Err("an empty pattern".into());
            }
            if pat.split('/').any(|c| c == "..") {
                return Err(format!("pattern {pat:?} contains `..`"));
            }
            if pat.contains('/') && !pat.starts_with('/') {
                return Err(format!(
                    "pattern {pat:?} must be an absolute path inside the container, or a bare \
                     file name"
                ));
            }
            if f.include.len() + f.exclude.len() >= MAX_PATTERNS {
                return Err(format!("more than {MAX_PATTERNS} patterns"));
            }
            if neg {
                f.exclude.push(pat.to_string());
            } else {
                f.include.push(pat.to_string());
            }
        }
        Ok(f)
    }

    /// Absolute patterns: the part before the first wildcard (a directory or pin path), to be
    /// checked against the container's bpffs mounts.
    pub fn literal_prefixes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.include
            .iter()
            .chain(&self.exclude)
            .filter(|p| p.starts_with('/'))
            .map(|p| {
                let cut = p.find(['*', '?', '[']).unwrap_or(p.len());
                let lit = &p[..cut];
                // Back to the last full component.
                let lit = if cut < p.len() {
                    lit.rfind('/').map_or("/", |i| &p[..i.max(1)])
                } else {
                    lit
                };
                (p.as_str(), lit)
            })
    }

    /// Whether the map pinned at `container_path` (absolute, inside the container) is taken.
    pub fn matches(&self, container_path: &str) -> bool {
        let name = container_path.rsplit('/').next().unwrap_or(container_path);
        let hit = |p: &String| {
            if p.starts_with('/') {
                glob_match(p, container_path)
            } else {
                glob_match(p, name)
            }
        };
        let included = self.include.is_empty() || self.include.iter().any(hit);
        included && !self.exclude.iter().any(hit)
    }
}

/// Glob match: `*` any run of characters but `/`, `**` any run including `/`, `?` one
/// character but `/`; everything else literal. Dynamic programming over (pattern, text)
/// positions: time O(|pattern| * |text|), no backtracking blow-up whatever the pattern.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // ok[i][j]: p[i..] matches t[j..]; filled from the ends backwards.
    let (n, m) = (p.len(), t.len());
    let mut ok = vec![vec![false; m + 1]; n + 1];
    ok[n][m] = true;
    for i in (0..n).rev() {
        let double = p[i] == '*' && p.get(i + 1) == Some(&'*');
        let after = if double { i + 2 } else { i + 1 };
        for j in (0..=m).rev() {
            ok[i][j] = match p[i] {
                '*' if double => {
                    // `**/` also matches no directory at all.
                    (p.get(after) == Some(&'/') && ok[after + 1][j])
                        || ok[after][j]
                        || (j < m && ok[i][j + 1])
                }
                '*' => ok[after][j] || (j < m && t[j] != '/' && ok[i][j + 1]),
                '?' => j < m && t[j] != '/' && ok[i + 1][j + 1],
                c => j < m && t[j] == c && ok[i + 1][j + 1],
            };
        }
    }
    ok[0][0]
}

/// One `member.path=CLOCK_UNIT` of `mapsnap.io/rebase`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebaseRule {
    /// A member path as the CLI's `--rebase` takes it (`value.ct.expires`, `key.ts`).
    pub path: String,
    pub spec: RebaseSpec,
}

/// The longest `mapsnap.io/rebase` value, the most rules, the longest member path and its
/// most components: far beyond any real map type, small enough to bound the work.
pub const MAX_REBASE_LEN: usize = 4096;
pub const MAX_REBASE_RULES: usize = 64;
pub const MAX_REBASE_PATH: usize = 256;
pub const MAX_REBASE_DEPTH: usize = 16;

impl RebaseRule {
    /// Parses `path=spec` items separated by commas or white space.
    pub fn parse_list(text: &str) -> std::result::Result<Vec<Self>, String> {
        if text.len() > MAX_REBASE_LEN {
            return Err(format!("it is longer than {MAX_REBASE_LEN} bytes"));
        }
        let mut out: Vec<Self> = Vec::new();
        for item in text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            if out.len() == MAX_REBASE_RULES {
                return Err(format!("more than {MAX_REBASE_RULES} members"));
            }
            let r = Self::parse(item)?;
            if out.iter().any(|o| o.path == r.path) {
                return Err(format!("member {:?} is named twice", r.path));
            }
            out.push(r);
        }
        if out.is_empty() {
            return Err("names no member (expected member.path=CLOCK_UNIT, e.g. \
                        value.expires=monotonic_ns)"
                .into());
        }
        Ok(out)
    }

    /// Parses one `member.path=CLOCK_UNIT`.
    pub fn parse(item: &str) -> std::result::Result<Self, String> {
        let shown = crate::location::truncate(item, 64);
        let (path, spec) = item.split_once('=').ok_or_else(|| {
            format!("{shown:?} is not member.path=CLOCK_UNIT (e.g. value.expires=monotonic_ns)")
        })?;
        if path.is_empty() || path.len() > MAX_REBASE_PATH {
            return Err(format!(
                "{shown:?}: the member path must have 1 to {MAX_REBASE_PATH} bytes"
            ));
        }
        let parts: Vec<&str> = path.split('.').collect();
        if parts.len() > MAX_REBASE_DEPTH {
            return Err(format!(
                "{shown:?}: the member path has more than {MAX_REBASE_DEPTH} components"
            ));
        }
        if let Some(bad) = parts.iter().find(|c| {
            c.is_empty()
                || c.starts_with(|ch: char| ch.is_ascii_digit())
                || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        }) {
            return Err(format!(
                "{shown:?}: {bad:?} is not a member name (letters, digits, _; not starting \
                 with a digit)"
            ));
        }
        let spec = spec
            .parse::<RebaseSpec>()
            .map_err(|e| format!("{shown:?}: {e}"))?;
        Ok(Self {
            path: path.to_string(),
            spec,
        })
    }
}

impl std::fmt::Display for RebaseRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.path, self.spec)
    }
}

/// The longest `mapsnap.io/maps` value accepted, and the most patterns in it.
pub const MAX_FILTER_LEN: usize = 4096;
pub const MAX_PATTERNS: usize = 64;

/// Parses a container's annotations (the fuzzing entry point too): the same as
/// [`Annotations::parse`].
pub fn parse(all: &BTreeMap<String, String>) -> Result<Annotations> {
    Annotations::parse(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_key() {
        let a = Annotations::parse(&map(&[
            (RESTORE_FROM, " s3://b/k "),
            (RESTORE_MODE, "wait"),
            (FILL_MODE, "merge"),
            (EXISTING, "overwrite"),
            (SNAPSHOT_ON_STOP, "true"),
            (SNAPSHOT_TO, "/data/x.mapsnap"),
            (CHECKPOINT_MAPS, "false"),
            (CHECKPOINT, "edge/lb-to-node-b"),
            ("mapsnap.io/restore-form", "typo"),
            (CHECKPOINT_TO, "ckpt/x"),
            (MAPS, "/sys/fs/bpf/**, !tmp_*"),
            (POLICY, "best-effort"),
            ("io.kubernetes.other", "ignored"),
        ]))
        .expect("parses");
        assert_eq!(a.restore_from.as_deref(), Some("s3://b/k"));
        assert_eq!(a.restore_mode, RestoreMode::Wait);
        assert_eq!(a.fill_mode, FillMode::Merge);
        assert_eq!(a.existing, Existing::Overwrite);
        assert!(a.snapshot_on_stop && !a.checkpoint && a.any);
        assert_eq!(a.checkpoint_ref.as_deref(), Some("edge/lb-to-node-b"));
        assert_eq!(a.unknown, vec!["mapsnap.io/restore-form"]);
        assert_eq!(a.policy, Some(Policy::BestEffort));
        assert_eq!(a.maps.include, vec!["/sys/fs/bpf/**"]);
        assert_eq!(a.maps.exclude, vec!["tmp_*"]);
    }

    #[test]
    fn defaults_and_refusals() {
        let a = Annotations::parse(&map(&[("other", "x")])).expect("parses");
        assert!(!a.any && a.checkpoint && a.policy.is_none());
        for (k, v) in [
            (RESTORE_MODE, "later"),
            (EXISTING, "maybe"),
            (SNAPSHOT_ON_STOP, "sure"),
            (RESTORE_FROM, "  "),
            (MAPS, "/sys/fs/bpf/../../etc"),
            (MAPS, "sys/fs/bpf/x"),
            (POLICY, "lenient"),
        ] {
            let e = Annotations::parse(&map(&[(k, v)]))
                .expect_err(k)
                .to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn rebase_rules() {
        let a = Annotations::parse(&map(&[
            (
                REBASE,
                "value.ct.expires=monotonic_ns, value.last_seen=boottime_s\nkey.ts=jiffies",
            ),
            (REBASE_MODE, "elapsed"),
        ]))
        .expect("parses");
        let shown: Vec<String> = a.rebase.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "value.ct.expires=monotonic_ns",
                "value.last_seen=boottime_s",
                "key.ts=jiffies"
            ]
        );
        assert_eq!(a.rebase_mode, Some(RebaseMode::Elapsed));
        assert!(
            Annotations::parse(&map(&[]))
                .expect("parses")
                .rebase
                .is_empty()
        );
        let many = (0..65)
            .map(|i| format!("m{i}=tai_ns"))
            .collect::<Vec<_>>()
            .join(",");
        let deep = format!("{}=tai_ns", vec!["a"; 17].join("."));
        for (k, v, want) in [
            (REBASE, "expires", "member.path=CLOCK_UNIT"),
            (REBASE, "expires=monotonic", "expected CLOCK_UNIT"),
            (REBASE, "expires=cpu_ns", "clock must be"),
            (REBASE, "expires=monotonic_h", "unit must be"),
            (REBASE, "a..b=tai_ns", "not a member name"),
            (REBASE, "../x=tai_ns", "not a member name"),
            (REBASE, "1st=tai_ns", "not a member name"),
            (REBASE, "a=tai_ns,a=tai_s", "named twice"),
            (REBASE, " , ", "names no member"),
            (REBASE, many.as_str(), "more than 64"),
            (REBASE, deep.as_str(), "more than 16 components"),
            (REBASE_MODE, "sometimes", "preserve-remaining or elapsed"),
        ] {
            let e = Annotations::parse(&map(&[(k, v)]))
                .expect_err(v)
                .to_string();
            assert!(e.contains(k) && e.contains(want), "{v}: {e}");
        }
        let long = "a".repeat(MAX_REBASE_LEN + 1);
        assert!(RebaseRule::parse_list(&long).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("/sys/fs/bpf/*", "/sys/fs/bpf/counters"));
        assert!(!glob_match("/sys/fs/bpf/*", "/sys/fs/bpf/app/counters"));
        assert!(glob_match("/sys/fs/bpf/**", "/sys/fs/bpf/app/counters"));
        assert!(glob_match("/sys/fs/bpf/**/c*", "/sys/fs/bpf/counters"));
        assert!(glob_match("/sys/fs/bpf/**/c*", "/sys/fs/bpf/a/b/counters"));
        assert!(glob_match("pkt_?ount", "pkt_count"));
        assert!(!glob_match("pkt_?ount", "pkt_/ount"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", "ab"));
        assert!(glob_match("**", "a/b/c"));
        assert!(glob_match("a**", "a/b"));
        assert!(!glob_match("a*", "a/b"));
        // Patterns that make a backtracking matcher take exponential time end at once.
        let evil = "*a".repeat(60) + "b";
        let text = "a".repeat(200);
        let t = std::time::Instant::now();
        assert!(!glob_match(&evil, &text));
        assert!(!glob_match(&"**a".repeat(60), &"a/".repeat(100)));
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn filter() {
        let f = MapFilter::parse("/sys/fs/bpf/app/*, !*_tmp").expect("parses");
        assert!(f.matches("/sys/fs/bpf/app/counters"));
        assert!(!f.matches("/sys/fs/bpf/app/x_tmp"));
        assert!(!f.matches("/sys/fs/bpf/other/counters"));
        assert!(MapFilter::default().matches("/anything"));
        let lits: Vec<_> = f.literal_prefixes().map(|(_, l)| l).collect();
        assert_eq!(lits, vec!["/sys/fs/bpf/app"]);
        let f = MapFilter::parse("/etc/*").expect("parses");
        let lits: Vec<_> = f.literal_prefixes().map(|(_, l)| l).collect();
        assert_eq!(lits, vec!["/etc"]);
    }
}
