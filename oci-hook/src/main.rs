//! `mapsnap-hook`: OCI runtime hook (`oci STAGE`, state on stdin), CRIU action script
//! (`criu`, or no arguments with `CRTOOLS_SCRIPT_ACTION` set) and installer (`install`).
//!
//! Exit status: 0 on success and whenever failing would be wrong (poststop, best-effort
//! policy, CRIU actions other than post-dump); 1 when the runtime must fail the container start
//! or the checkpoint; 2 for a bad command line. One `mapsnap-hook: ...` line on stderr says
//! why; structured (JSON) logs go to the node's log file.

use std::path::PathBuf;
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

/// Runs `work` on its own thread; past `deadline` the run ends as `on_timeout` says.
fn with_deadline(
    deadline: Duration,
    fail_on_timeout: bool,
    work: impl FnOnce() -> End + Send + 'static,
) -> End {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(deadline) {
        Ok(end) => end,
        Err(_) => {
            let msg = format!(
                "gave up after the {}s deadline ([hook] deadline)",
                deadline.as_secs_f64()
            );
            if fail_on_timeout {
                End::Fail(msg)
            } else {
                End::Tolerated(msg)
            }
        }
    }
}

fn run_oci(stage: Stage, cfg: NodeConfig, config_path: Option<PathBuf>) -> End {
    let start = Instant::now();
    let what = stage.to_string();
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
    let span =
        tracing::info_span!("hook", stage = %stage, container = state.id, status = state.status);
    let _g = span.enter();
    let end = oci_in_span(stage, cfg, state, &span, start, config_path);
    log_end(&end, &what);
    end
}

fn oci_in_span(
    stage: Stage,
    cfg: NodeConfig,
    state: HookState,
    span: &tracing::Span,
    start: Instant,
    config_path: Option<PathBuf>,
) -> End {
    let deadline = start + cfg.hook.deadline;
    let ctr = flows::load_container(&state.id, &state.bundle, Some(&state.annotations));
    let policy = flows::policy_of(ctr.as_ref().ok().map(|c| &c.annotations), &cfg);
    let tolerate = stage == Stage::Poststop || policy == Policy::BestEffort;
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
        let end = match flows::oci(
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
                // failed start would.
                if let Some(pid) = state.pid() {
                    // SAFETY: kill(2) with a pid and a signal number.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                End::Fail(format!(
                    "{e}; killed the container's init process {:?}",
                    state.pid()
                ))
            }
        };
        return end;
    }
    let ancestors = mapsnap_hook::container::ancestors();
    let span2 = span.clone();
    let budget = cfg.hook.deadline.saturating_sub(start.elapsed());
    with_deadline(budget, !tolerate, move || {
        let _g = span2.enter();
        match flows::oci(stage, &state, &ctr, &cfg, &ancestors, deadline) {
            Ok(msg) => End::Ok(msg),
            Err(e) if tolerate => End::Tolerated(e.to_string()),
            Err(e) => End::Fail(e.to_string()),
        }
    })
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
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the background waiter: {e}"))?;
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
    let span = tracing::info_span!("criu", action = env.action, init_pid = env.init_pid);
    let _g = span.enter();
    let end = criu_in_span(env, cfg, &span);
    log_end(&end, "criu post-dump");
    end
}

fn criu_in_span(env: CriuEnv, cfg: NodeConfig, span: &tracing::Span) -> End {
    let ancestors = mapsnap_hook::container::ancestors();
    let target = match flows::criu_container(&env, &cfg, &ancestors) {
        Ok(t) => t,
        Err(e) if cfg.hook.policy == Policy::BestEffort => return End::Tolerated(e.to_string()),
        Err(e) => return End::Fail(e.to_string()),
    };
    let policy = flows::policy_of(Some(&target.ctr.annotations), &cfg);
    let tolerate = policy == Policy::BestEffort;
    let span2 = tracing::info_span!(parent: span, "dump", container = target.ctr.id);
    with_deadline(cfg.hook.deadline, !tolerate, move || {
        let _g = span2.enter();
        match flows::criu_post_dump(&env, &target, &cfg) {
            Ok(msg) => End::Ok(msg),
            Err(e) if tolerate => End::Tolerated(e.to_string()),
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

/// Logs how the run ended (call it inside the run's span, so the line carries the stage and
/// container).
fn log_end(end: &End, what: &str) {
    match end {
        End::Ok(msg) if !msg.is_empty() => tracing::info!("{what}: {msg}"),
        End::Ok(_) => {}
        End::Tolerated(msg) => tracing::error!("{what}: {msg} (not failing the runtime)"),
        End::Fail(msg) => tracing::error!("{what}: {msg}"),
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

fn main() -> std::process::ExitCode {
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
        let end = with_deadline(Duration::from_millis(100), true, || {
            std::thread::sleep(Duration::from_secs(30));
            End::Ok("late".into())
        });
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(matches!(end, End::Fail(m) if m.contains("deadline")));
        let end = with_deadline(Duration::from_millis(100), false, || {
            std::thread::sleep(Duration::from_secs(30));
            End::Ok("late".into())
        });
        assert!(matches!(end, End::Tolerated(_)));
        let end = with_deadline(Duration::from_secs(5), true, || End::Ok("done".into()));
        assert!(matches!(end, End::Ok(m) if m == "done"));
    }
}
