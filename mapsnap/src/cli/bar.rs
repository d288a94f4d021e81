//! Progress bars on a terminal, nothing otherwise.

use std::cell::RefCell;

use indicatif::{ProgressBar, ProgressStyle};
use mapsnap::progress::Progress;

/// An indicatif bar per map, drawn only when stderr is a terminal.
#[derive(Debug)]
pub struct Bar {
    enabled: bool,
    current: RefCell<Option<ProgressBar>>,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            enabled: super::stderr_is_terminal(),
            current: RefCell::new(None),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = self.current.borrow_mut().take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn map_started(&self, name: &str, expected: Option<u64>) {
        if !self.enabled {
            return;
        }
        self.finish();
        let bar = match expected {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let template = if expected.is_some() {
            "{msg:>16} [{bar:30}] {pos}/{len} entries ({per_sec})"
        } else {
            "{msg:>16} {spinner} {pos} entries ({per_sec})"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(name.to_string());
        *self.current.borrow_mut() = Some(bar);
    }

    fn entries(&self, n: u64) {
        if let Some(b) = self.current.borrow().as_ref() {
            b.inc(n);
        }
    }

    fn map_done(&self) {
        self.finish();
    }
}
