//! The deadline of one dump or one restore.
//!
//! Started in `init`, before the plugin touches the image directory or a map. Work that may
//! block (files of the image directory, which can sit on a hung network mount; kernel map
//! reads) runs on a worker thread that the hook waits for only until the deadline: CRIU gets
//! an error naming what was being done and goes on (a dump fails and the tasks resume). The
//! late worker stops at its next read or write ([`DeadlineIo`]) and drops what it made, so
//! maps a restore created are released; the library stays loaded for it (`ffi::keep_loaded`).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::error::PluginError;

#[derive(Debug, Clone)]
pub struct Deadline {
    end: Instant,
    limit: Duration,
    /// What the work is doing now, for the error ("restoring map 42 ... from ...").
    during: Arc<Mutex<String>>,
}

impl Deadline {
    pub fn start(limit: Duration) -> Self {
        Self {
            end: Instant::now() + limit,
            limit,
            during: Arc::new(Mutex::new("starting".into())),
        }
    }

    /// Records what the work does next.
    pub fn set(&self, what: impl Into<String>) {
        *self.during.lock().unwrap_or_else(|p| p.into_inner()) = what.into();
    }

    pub fn during(&self) -> String {
        self.during
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> PluginError {
        PluginError::Deadline {
            limit: self.limit,
            during: self.during(),
        }
    }

    /// Err once the deadline has passed.
    pub fn check(&self) -> Result<(), PluginError> {
        if self.remaining().is_zero() {
            Err(self.expired())
        } else {
            Ok(())
        }
    }

    fn check_io(&self) -> io::Result<()> {
        if self.remaining().is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                self.expired().to_string(),
            ))
        } else {
            Ok(())
        }
    }

    /// Runs `work` on a worker thread and waits for it until the deadline. Past it, returns
    /// the deadline error and leaves the worker to finish alone: its result, and any map in
    /// it, is dropped when it does.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
    ) -> Result<T, PluginError> {
        self.check()?;
        crate::ffi::keep_loaded();
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("mapsnap-criu".into())
            .spawn(move || {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                // Nobody listens after the deadline: the result is dropped here.
                let _ = tx.send(out);
            })
            .map_err(|e| PluginError::io("starting a worker thread", e))?;
        match rx.recv_timeout(self.remaining()) {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.expired()),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(PluginError::io(
                "waiting for the worker thread",
                io::Error::other("it ended without a result"),
            )),
        }
    }
}

/// A reader or writer that fails with `TimedOut` once the deadline has passed, so that work
/// abandoned by [`Deadline::run`] stops at its next I/O call.
#[derive(Debug)]
pub struct DeadlineIo<T> {
    inner: T,
    deadline: Deadline,
}

impl<T> DeadlineIo<T> {
    pub fn new(inner: T, deadline: &Deadline) -> Self {
        Self {
            inner,
            deadline: deadline.clone(),
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for DeadlineIo<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.deadline.check_io()?;
        self.inner.read(buf)
    }
}

impl<W: Write> Write for DeadlineIo<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.deadline.check_io()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_the_result_before_the_deadline() {
        let d = Deadline::start(Duration::from_secs(10));
        assert_eq!(d.run(|| Ok(7)).expect("in time"), 7);
    }

    #[test]
    fn run_gives_up_at_the_deadline_and_names_the_step() {
        let d = Deadline::start(Duration::from_millis(200));
        d.set("restoring map 42 \"counters\" (hash)");
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        let e = d
            .run(move || {
                std::thread::sleep(Duration::from_millis(1500));
                let _ = tx.send(());
                Ok(())
            })
            .expect_err("past the deadline");
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "did not wait for the worker"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("deadline of 200ms") && msg.contains("map 42 \"counters\""),
            "{msg}"
        );
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        // The worker still finishes on its own.
        rx.recv_timeout(Duration::from_secs(5))
            .expect("worker done");
        assert!(d.run(|| Ok(())).is_err(), "no new work after the deadline");
    }

    #[test]
    fn io_stops_after_the_deadline() {
        let d = Deadline::start(Duration::from_millis(50));
        let mut r = DeadlineIo::new(&b"abc"[..], &d);
        let mut buf = [0u8; 1];
        assert_eq!(r.read(&mut buf).expect("read"), 1);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(
            r.read(&mut buf).expect_err("late").kind(),
            io::ErrorKind::TimedOut
        );
    }
}
