//! The container state a runtime passes a hook on stdin. Parsed tolerantly: runtimes send
//! statuses the OCI spec (and oci-spec's closed enum) does not know, such as `paused`, and
//! runc says `stopped` with a pid while restoring.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{HookError, Result};

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HookState {
    #[serde(default)]
    pub oci_version: String,
    pub id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub pid: Option<i64>,
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The largest state accepted on stdin.
pub const MAX_STATE_SIZE: u64 = 1 << 20;

/// Parses the OCI state JSON (the fuzzing entry point too): the same as [`HookState::parse`].
pub fn parse(bytes: &[u8]) -> Result<HookState> {
    HookState::parse(bytes)
}

impl HookState {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let s: HookState = serde_json::from_slice(bytes).map_err(|e| {
            HookError::Other(format!("the container state on stdin is not valid: {e}"))
        })?;
        if s.id.is_empty() {
            return Err(HookError::Other(
                "the container state on stdin has an empty id".into(),
            ));
        }
        if s.id.len() > 1024 {
            return Err(HookError::Other(
                "the container state's id is longer than 1024 bytes".into(),
            ));
        }
        if !s.bundle.is_absolute() {
            return Err(HookError::Other(
                "the container state's bundle is not an absolute path".into(),
            ));
        }
        Ok(s)
    }

    /// Reads the state from `r` (stdin), at most 1 MiB.
    pub fn read(r: impl Read) -> Result<Self> {
        let mut buf = Vec::new();
        r.take(MAX_STATE_SIZE)
            .read_to_end(&mut buf)
            .map_err(|e| HookError::io("reading the container state from stdin", e))?;
        Self::parse(&buf)
    }

    /// The init pid, when the runtime gave a positive one.
    pub fn pid(&self) -> Option<u32> {
        self.pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant() {
        for status in [
            "creating",
            "created",
            "running",
            "stopped",
            "paused",
            "checkpointing",
        ] {
            let text = format!(
                r#"{{"ociVersion":"1.0.2-dev","id":"c1","status":"{status}","pid":42,
                   "bundle":"/b","annotations":{{"a":"b"}},"future":1}}"#
            );
            let s = HookState::parse(text.as_bytes()).expect(status);
            assert_eq!(s.status, status);
            assert_eq!(s.pid(), Some(42));
        }
        let s = HookState::parse(br#"{"id":"c","bundle":"/b","status":"stopped"}"#)
            .expect("no pid, no annotations");
        assert_eq!(s.pid(), None);
        assert!(HookState::parse(br#"{"id":"","bundle":"/b"}"#).is_err());
        assert!(HookState::parse(br#"{"id":"c","bundle":"rel"}"#).is_err());
        assert!(HookState::parse(b"not json").is_err());
    }
}
