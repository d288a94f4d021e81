//! Progress reporting hooks, so the library stays silent and the CLI can draw bars.

/// Receives progress of a dump or restore. Every method has a no-op default.
pub trait Progress {
    /// A map is being read or written; `expected` entries when known up front.
    fn map_started(&self, _name: &str, _expected: Option<u64>) {}
    /// `n` more entries were processed.
    fn entries(&self, _n: u64) {}
    fn map_done(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
