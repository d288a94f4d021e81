//! `mapsnap-hook`: OCI runtime hook (`oci STAGE`, state on stdin), CRIU action script
//! (`criu`, or no arguments with `CRTOOLS_SCRIPT_ACTION` set) and installer (`install`).
//!
//! Exit status: 0 on success and whenever failing would be wrong (poststop, best-effort
//! policy, CRIU actions other than post-dump); 1 when the runtime must fail the container start
//! or the checkpoint; 2 for a bad command line. One `mapsnap-hook: ...` line on stderr says
//! why; structured (JSON) logs go to the node's log file.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mapsnap_hook::annotations::{Policy, RestoreMode};
use mapsnap_hook::config::NodeConfig;
use mapsnap_hook::flows::{self, CriuEnv, Stage};
use mapsnap_hook::install::{self, InstallOptions, Runtime};
use mapsnap_hook::state::HookState;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Parser)]
#[command(
    name = "mapsnap-hook",
    version,
    about = "Save and restore a container's pinned BPF maps at checkpoint, stop and start"
)]
struct Cli {
    /// Node config file (default: $MAPSNAP_HOOK_CONFIG, else /etc/mapsnap/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run as an OCI hook for STAGE (createRuntime, prestart, poststart, poststop); the
    /// container state comes on stdin.
    Oci {
        #[arg(value_parser = parse_stage)]
        stage: Stage,
    },
    /// Run as CRIU's action script (CRTOOLS_SCRIPT_ACTION, CRTOOLS_INIT_PID,
    /// CRTOOLS_IMAGE_DIR): snapshot at post-dump, nothing at other actions.
    Criu,
    /// Internal: finishes a checkpoint's snapshot after CRIU's freeze (started by post-dump,
    /// detached; the job comes on stdin).
    #[command(name = "criu-finish", hide = true)]
    CriuFinish,
    /// Install the hooks.d files and CRIU config lines (or remove them).
    Install {
        #[arg(long, value_enum, default_value = "crio")]
        runtime: Runtime,
        /// Write everything under this directory instead of /.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The hook binary the runtime runs (default: this binary).
        #[arg(long)]
        hook_path: Option<PathBuf>,
        /// Directory holding the CRIU plugin (libmapsnap_criu.so), for CRIU's `libdir`.
        #[arg(long)]
        criu_libdir: Option<PathBuf>,
        /// The CRIU plugin to copy into /usr/lib/criu (CRIU's default plugin directory).
        #[arg(long)]
        criu_plugin: Option<PathBuf>,
        /// containerd: the NRI hook-injector binary to register as an NRI plugin.
        #[arg(long)]
        nri_plugin: Option<PathBuf>,
        /// Hook timeout in the hooks.d files, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Remove what install added.
        #[arg(long)]
        uninstall: bool,
    },
}

fn parse_stage(s: &str) -> Result<Stage, String> {
    s.parse()
}

/// Logs: JSON lines to the log file (when it can be opened), plain lines to stderr.
fn init_logging(cfg: &NodeConfig) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("MAPSNAP_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_filter(filter());
    let file = cfg.hook.log_file.as_ref().and_then(|p| {
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let file_layer = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::sync::Mutex::new(f))
            .with_filter(filter())
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
}

/// How a run ended, for the exit status.
enum End {
    Ok(String),
    /// Failed, but the runtime must not fail (poststop, best-effort, other CRIU actions).
    Tolerated(String),
    Fail(String),
}

/// Runs `work` on its own thread, from the first blocking step on; past `deadline` the run
/// ends: failed unless `tolerate` says the runtime must not fail (set by the work as soon as
/// it knows: poststop, best-effort, a container that did not opt in). A restore publishing at
/// that moment is told to roll back, and given a moment to do so.
fn with_deadline(
    deadline: Duration,
    tolerate: Arc<AtomicBool>,
    work: impl FnOnce() -> End + Send + 'static,
) -> End {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(deadline) {
        Ok(end) => end,
        Err(_) => {
            mapsnap_hook::snapshot::cancel();
            let late = rx.recv_timeout(Duration::from_secs(2)).ok();
            let msg = format!(
                "gave up after the {}s deadline ([hook] deadline){}",
                deadline.as_secs_f64(),
                match late {
                    Some(End::Fail(m)) | Some(End::Tolerated(m)) => format!("; {m}"),
                    _ => String::new(),
                }
            );
            if tolerate.load(Ordering::SeqCst) {
                End::Tolerated(msg)
            } else {
                End::Fail(msg)
            }
        }
    }
}

fn run_oci(stage: Stage, cfg: NodeConfig, config_path: Option<PathBuf>) -> End {
    let start = Instant::now();
    let what = stage.to_string();
    let background = std::env::var_os(BACKGROUND_ENV).is_some();
    let tolerate = Arc::new(AtomicBool::new(
        stage == Stage::Poststop || cfg.hook.policy == Policy::BestEffort,
    ));
    // Detached waiters live as long as the wait allows, plus the run's own budget.
    let budget = if background {
        cfg.hook.wait_timeout + cfg.hook.deadline
    } else {
        cfg.hook.deadline
    };
    let t2 = tolerate.clone();
    let end = with_deadline(budget, tolerate, move || {
        let state = match HookState::read(std::io::stdin().lock()) {
            Ok(s) => s,
            // Nothing can be decided without the state; poststop must still not fail.
            Err(e) => {
                let end = if stage == Stage::Poststop {
                    End::Tolerated(e.to_string())
                } else {
                    End::Fail(e.to_string())
                };
                log_end(&end, &what);
                return end;
            }
        };
        let span = tracing::info_span!("hook", stage = %stage, container = state.id, status = state.status);
        let _g = span.enter();
        let end = oci_in_span(stage, cfg, state, start, config_path, &t2);
        log_end(&end, &what);
        end
    });
    if let End::Fail(m) | End::Tolerated(m) = &end
        && m.contains("[hook] deadline")
    {
        tracing::error!("{stage}: {m}");
    }
    end
}

fn oci_in_span(
    stage: Stage,
    cfg: NodeConfig,
    state: HookState,
    start: Instant,
    config_path: Option<PathBuf>,
    tolerate_flag: &AtomicBool,
) -> End {
    let deadline = start + cfg.hook.deadline;
    let ctr = flows::load_container(&state.id, &state.bundle, Some(&state.annotations));
    let policy = flows::policy_of(ctr.as_ref().ok().map(|c| &c.annotations), &cfg);
    let tolerate = stage == Stage::Poststop || policy == Policy::BestEffort;
    tolerate_flag.store(tolerate, Ordering::SeqCst);
    let ctr = match ctr {
        Ok(c) => c,
        Err(e) if tolerate => return End::Tolerated(e.to_string()),
        Err(e) => return End::Fail(e.to_string()),
    };
    let background = std::env::var_os(BACKGROUND_ENV).is_some();
    if stage == Stage::Poststart
        && !background
        && ctr.annotations.restore_from.is_some()
        && ctr.annotations.restore_mode == RestoreMode::Wait
        && let Some(pid) = state.pid()
        && !mapsnap_hook::container::process_started(pid)
    {
        return match spawn_background(&state, config_path.as_deref()) {
            Ok(child) => End::Ok(format!(
                "the container's process has not started yet (runc runs poststart before it \
                 execs): waiting for its pins in the background (pid {child}, at most {}s)",
                cfg.hook.wait_timeout.as_secs_f64()
            )),
            Err(e) if tolerate => End::Tolerated(e),
            Err(e) => End::Fail(e),
        };
    }
    if background {
        // Detached from the runtime: bounded by the wait timeout (and the storage timeout).
        return match flows::oci(
            stage,
            &state,
            &ctr,
            &cfg,
            &[],
            Instant::now() + cfg.hook.wait_timeout,
        ) {
            Ok(msg) => End::Ok(msg),
            Err(e) if tolerate => End::Tolerated(e.to_string()),
            Err(e) => {
                // Strict: the app must not run without its state; stop the container as a
                // failed start would, through the pidfd taken while the runtime still held
                // the process (a pid number could have been reused by now).
                let killed = kill_through_pidfd();
                End::Fail(format!("{e}; {killed}"))
            }
        };
    }
    let ancestors = mapsnap_hook::container::ancestors();
    match flows::oci(stage, &state, &ctr, &cfg, &ancestors, deadline) {
        Ok(msg) => End::Ok(msg),
        Err(e) if tolerate => End::Tolerated(e.to_string()),
        Err(e) => End::Fail(e.to_string()),
    }
}

/// The fd number the background waiter finds the container init's pidfd at.
const PIDFD_ENV: &str = "MAPSNAP_HOOK_PIDFD";

/// Opens a pidfd for `pid` (pidfd_open(2)).
fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILLs the process the runtime handed us, through the inherited pidfd: a process that
/// already exited is never confused with a newer one holding the same pid.
fn kill_through_pidfd() -> String {
    let Some(fd) = std::env::var(PIDFD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return "no pidfd of the container's init: not killed".into();
    };
    // SAFETY: pidfd_send_signal with an fd, a signal, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        "killed the container's init process".into()
    } else {
        format!(
            "the container's init process is gone already ({})",
            std::io::Error::last_os_error()
        )
    }
}

/// Set in the environment of the background poststart waiter.
const BACKGROUND_ENV: &str = "MAPSNAP_HOOK_BACKGROUND";

/// Starts this binary again as a detached poststart waiter (own session, no stdio: the
/// runtime waits for the hook's output pipes to close), the state on its stdin.
fn spawn_background(state: &HookState, config: Option<&std::path::Path>) -> Result<u32, String> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["oci", "poststart"])
        .env(BACKGROUND_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // The init's pidfd, taken now while the runtime holds the process: the waiter kills
    // through it, never through a pid number it read long before.
    let pidfd = match state.pid() {
        Some(pid) => Some(pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?),
        None => None,
    };
    if let Some(fd) = &pidfd {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        cmd.env(PIDFD_ENV, "3");
        // SAFETY: dup2 is async-signal-safe; it puts the pidfd at fd 3 (without CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the background waiter: {e}"))?;
    drop(pidfd);
    let json = state_json(state);
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(json.as_bytes())
            .map_err(|e| format!("cannot hand the state to the background waiter: {e}"))?;
    }
    Ok(child.id())
}

fn state_json(s: &HookState) -> String {
    serde_json::json!({
        "ociVersion": s.oci_version,
        "id": s.id,
        "status": s.status,
        "pid": s.pid,
        "bundle": s.bundle,
        "annotations": s.annotations,
    })
    .to_string()
}

fn run_criu(cfg: NodeConfig) -> End {
    let env = CriuEnv::from_env();
    if env.action != "post-dump" {
        return End::Ok(String::new());
    }
    // Until the container is known to have opted in, a failure or the deadline must not
    // fail its checkpoint.
    let tolerate = Arc::new(AtomicBool::new(true));
    let t2 = tolerate.clone();
    with_deadline(cfg.hook.deadline, tolerate, move || {
        let span = tracing::info_span!("criu", action = env.action, init_pid = env.init_pid);
        let _g = span.enter();
        let end = criu_in_span(env, cfg, &t2);
        log_end(&end, "criu post-dump");
        end
    })
}

fn criu_in_span(env: CriuEnv, cfg: NodeConfig, tolerate_flag: &AtomicBool) -> End {
    // runc has CRIU run every action twice, inside the freeze: the second post-dump of a dump
    // that has its manifest returns before looking the container up.
    if flows::post_dump_done(&env) {
        return End::Ok("the manifest of this dump is already in the image directory".into());
    }
    let ancestors = mapsnap_hook::container::ancestors();
    let target = match flows::criu_container(&env, &cfg, &ancestors) {
        Ok(t) => t,
        // Without the container, whether it opted in is unknown: never fail its checkpoint.
        Err(e) => return End::Tolerated(e.to_string()),
    };
    let request = mapsnap_hook::manifest::Request::read(
        &cfg.hook.request_dir,
        &target.ctr.id,
        jiff::Timestamp::now(),
    )
    .ok()
    .flatten();
    let opted = flows::opted_in(&target.ctr, request.as_ref());
    let policy = flows::policy_of(Some(&target.ctr.annotations), &cfg);
    let tolerate = !opted || policy == Policy::BestEffort;
    tolerate_flag.store(tolerate, Ordering::SeqCst);
    let _g = tracing::info_span!("dump", container = target.ctr.id).entered();
    match flows::criu_post_dump(&env, &target, &cfg) {
        Ok(msg) => {
            // Only in the image directory of a container that asked for mapsnap: the others'
            // checkpoints stay exactly as CRIU wrote them.
            if opted {
                flows::mark_post_dump_done(&env);
            }
            End::Ok(msg)
        }
        Err(e) if tolerate => End::Tolerated(e.to_string()),
        Err(e) => End::Fail(e.to_string()),
    }
}

/// The detached finisher: bounded like a waiter (its own budget after the freeze).
fn run_finish(cfg: NodeConfig) -> End {
    let budget = cfg.hook.wait_timeout + cfg.hook.deadline;
    // The checkpoint itself succeeded long ago: nothing here can fail it any more.
    with_deadline(budget, Arc::new(AtomicBool::new(false)), move || {
        match mapsnap_hook::finish::read_job(std::io::stdin().lock()) {
            Ok(job) => {
                let span = tracing::info_span!("criu-finish", container = job.container_id);
                let _g = span.enter();
                let end = match mapsnap_hook::finish::run(&job, &cfg) {
                    Ok(msg) => End::Ok(msg),
                    Err(e) => End::Fail(e.to_string()),
                };
                log_end(&end, "criu finish");
                end
            }
            Err(e) => End::Fail(e.to_string()),
        }
    })
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<NodeConfig> {
    let mut cfg = NodeConfig::load(path)?;
    // Transfers must end before the hook's own deadline.
    cfg.storage.timeout = cfg.storage.timeout.min(cfg.hook.deadline);
    Ok(cfg)
}

/// VmHWM of this process in KiB (the benchmark reads it from the log).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Logs how the run ended (call it inside the run's span, so the line carries the stage and
/// container).
fn log_end(end: &End, what: &str) {
    let rss = peak_rss_kib();
    let ms = STARTED
        .get()
        .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    match end {
        End::Ok(msg) if !msg.is_empty() => {
            tracing::info!(peak_rss_kib = rss, elapsed_ms = ms, "{what}: {msg}")
        }
        End::Ok(_) => {}
        End::Tolerated(msg) => tracing::error!(
            peak_rss_kib = rss,
            elapsed_ms = ms,
            "{what}: {msg} (not failing the runtime)"
        ),
        End::Fail(msg) => tracing::error!(peak_rss_kib = rss, elapsed_ms = ms, "{what}: {msg}"),
    }
}

/// The exit status, and the one line on stderr the runtime shows.
fn finish(end: End, what: &str) -> std::process::ExitCode {
    match end {
        End::Ok(_) => std::process::ExitCode::SUCCESS,
        End::Tolerated(msg) => {
            eprintln!("mapsnap-hook: {what}: {msg} (ignored)");
            std::process::ExitCode::SUCCESS
        }
        End::Fail(msg) => {
            eprintln!("mapsnap-hook: {what}: {msg}");
            std::process::ExitCode::from(1)
        }
    }
}

/// When this process started its work (for the log's `elapsed_ms`).
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn main() -> std::process::ExitCode {
    let _ = STARTED.set(Instant::now());
    // CRIU runs `action-script PATH` through `sh -c PATH` with no arguments.
    let bare_criu =
        std::env::args_os().len() == 1 && std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some();
    let cli = if bare_criu {
        Cli {
            config: None,
            cmd: Cmd::Criu,
        }
    } else {
        Cli::parse()
    };
    match cli.cmd {
        Cmd::Oci { stage } => {
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mapsnap-hook: {stage}: {e:#}");
                    let tolerated = stage == Stage::Poststop;
                    return std::process::ExitCode::from(if tolerated { 0 } else { 1 });
                }
            };
            init_logging(&cfg);
            finish(run_oci(stage, cfg, cli.config), &stage.to_string())
        }
        Cmd::Criu => {
            let action = std::env::var("CRTOOLS_SCRIPT_ACTION").unwrap_or_default();
            if action != "post-dump" {
                return std::process::ExitCode::SUCCESS;
            }
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mapsnap-hook: criu {action}: {e:#}");
                    return std::process::ExitCode::from(1);
                }
            };
            init_logging(&cfg);
            finish(run_criu(cfg), &format!("criu {action}"))
        }
        Cmd::CriuFinish => {
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mapsnap-hook criu-finish: {e:#}");
                    return std::process::ExitCode::from(1);
                }
            };
            init_logging(&cfg);
            finish(run_finish(cfg), "criu finish")
        }
        Cmd::Install {
            runtime,
            root,
            hook_path,
            criu_libdir,
            criu_plugin,
            nri_plugin,
            timeout,
            uninstall,
        } => match install_cmd(InstallArgs {
            runtime,
            root,
            hook_path,
            criu_libdir,
            criu_plugin,
            nri_plugin,
            timeout,
            uninstall,
            config: cli.config,
        }) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mapsnap-hook install: {e:#}");
                std::process::ExitCode::from(1)
            }
        },
    }
}

struct InstallArgs {
    runtime: Runtime,
    root: PathBuf,
    hook_path: Option<PathBuf>,
    criu_libdir: Option<PathBuf>,
    criu_plugin: Option<PathBuf>,
    nri_plugin: Option<PathBuf>,
    timeout: u32,
    uninstall: bool,
    config: Option<PathBuf>,
}

fn install_cmd(a: InstallArgs) -> anyhow::Result<()> {
    let hook_path = match a.hook_path {
        Some(p) => p,
        None => {
            std::env::current_exe().context("cannot tell this binary's path: pass --hook-path")?
        }
    };
    let opts = InstallOptions {
        runtime: a.runtime,
        root: a.root,
        hook_path,
        config: a.config,
        criu_libdir: a.criu_libdir,
        criu_plugin: a.criu_plugin,
        nri_plugin: a.nri_plugin,
        timeout: a.timeout,
        uninstall: a.uninstall,
    };
    let changes = install::install(&opts)?;
    if changes.is_empty() {
        println!("nothing to change");
    }
    for c in changes {
        println!("{c}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_ends_a_stuck_run() {
        let t = Instant::now();
        let strict = || Arc::new(AtomicBool::new(false));
        let end = with_deadline(Duration::from_millis(100), strict(), || {
            std::thread::sleep(Duration::from_secs(30));
            End::Ok("late".into())
        });
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(matches!(end, End::Fail(m) if m.contains("deadline")));
        let end = with_deadline(
            Duration::from_millis(100),
            Arc::new(AtomicBool::new(true)),
            || {
                std::thread::sleep(Duration::from_secs(30));
                End::Ok("late".into())
            },
        );
        assert!(matches!(end, End::Tolerated(_)));
        let end = with_deadline(Duration::from_secs(5), strict(), || End::Ok("done".into()));
        assert!(matches!(end, End::Ok(m) if m == "done"));
    }
}
