//! `mapsnap-operator controller` (one Deployment, leader election) and
//! `mapsnap-operator agent` (a DaemonSet, one per node).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use mapsnap::storage::{StorageConfig, parse_duration};
use mapsnap_operator::config::{Config, Runtime};
use mapsnap_operator::controller::{self, Context};
use mapsnap_operator::http::{self, Health};
use mapsnap_operator::layout;
use mapsnap_operator::lease::LeaderElection;
use mapsnap_operator::node::{NodeAgent, NodePaths, StorageBlobs};
use mapsnap_operator::{agent, crd, hostinstall};

#[derive(Parser, Debug)]
#[command(
    name = "mapsnap-operator",
    version,
    about = "Kubernetes operator for mapsnap (BpfMapCheckpoint)"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[derive(Subcommand, Debug)]
enum Role {
    /// The controller: reconciles BpfMapCheckpoint objects (run one Deployment; replicas
    /// elect a leader).
    Controller(ControllerArgs),
    /// The node agent: hook request files, archive upload/download, cleanup (a DaemonSet).
    Agent(AgentArgs),
    /// Prints the CRD.
    Crd,
    /// Copies mapsnap-hook, mapsnap and the CRIU plugin (and optionally the storage config)
    /// from this image to host paths (the agent's init container).
    InstallHostFiles(InstallArgs),
}

#[derive(clap::Args, Debug)]
struct InstallArgs {
    /// Install directory on the host, as mounted (e.g. /host/opt/mapsnap).
    #[arg(long)]
    dest: PathBuf,
    /// Where this image keeps the binaries.
    #[arg(long, default_value = "/usr/local/bin")]
    image_bin: PathBuf,
    /// Where this image keeps the CRIU plugin.
    #[arg(long, default_value = "/usr/local/lib/mapsnap")]
    image_lib: PathBuf,
    /// A storage config file to copy too (mode 0600), to --config-dest.
    #[arg(long, requires = "config_dest")]
    config: Option<PathBuf>,
    #[arg(long)]
    config_dest: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// The operator's namespace (leases live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mapsnap-system")]
    namespace: String,
    /// This replica's identity for leader election.
    #[arg(long, env = "POD_NAME", default_value = "mapsnap-controller")]
    identity: String,
    /// Default storage prefix for snapshots and archives.
    #[arg(long, env = "MAPSNAP_STORAGE_LOCATION")]
    storage_location: String,
    /// Prefixes a BpfMapCheckpoint's spec.storage.location may use (repeatable).
    #[arg(long = "allowed-location")]
    allowed_locations: Vec<String>,
    /// The nodes' container runtime: crio or containerd.
    #[arg(long, default_value = "crio")]
    runtime: String,
    #[arg(long, default_value = "2m", value_parser = duration)]
    checkpoint_timeout: Duration,
    #[arg(long, default_value = "1m", value_parser = duration)]
    agent_timeout: Duration,
    #[arg(long, default_value = "30m", value_parser = duration)]
    transfer_timeout: Duration,
    #[arg(long, default_value = "5m", value_parser = duration)]
    wait_timeout: Duration,
    #[arg(long, default_value = "10m", value_parser = duration)]
    restore_timeout: Duration,
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// How long a hook request file stays valid.
    #[arg(long, default_value = "30m", value_parser = duration)]
    hook_request_ttl: Duration,
    /// Without leader election (a single replica, or local development).
    #[arg(long)]
    no_leader_election: bool,
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "mapsnap-system")]
    namespace: String,
    #[arg(long, env = "POD_NAME", default_value = "mapsnap-agent")]
    identity: String,
    #[arg(long, default_value = "crio")]
    runtime: String,
    #[arg(long, default_value = "/run/mapsnap/requests")]
    requests_dir: PathBuf,
    #[arg(long, default_value = "/run/mapsnap/restores")]
    restores_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/kubelet/checkpoints")]
    checkpoint_dir: PathBuf,
    /// Storage config file (default: MAPSNAP_CONFIG or /etc/mapsnap/config.toml if present).
    #[arg(long)]
    storage_config: Option<PathBuf>,
    #[arg(long, default_value = "10s", value_parser = duration)]
    heartbeat: Duration,
    #[arg(long, default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAPSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn runtime(s: &str) -> anyhow::Result<Runtime> {
    Runtime::parse(s).with_context(|| format!("unknown runtime {s:?} (crio or containerd)"))
}

async fn client(read_timeout: Option<Duration>) -> anyhow::Result<Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration")?;
    config.read_timeout = read_timeout;
    Client::try_from(config).context("cannot build the Kubernetes client")
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    let config = Config {
        namespace: args.namespace.clone(),
        storage_location: args.storage_location,
        allowed_locations: args.allowed_locations,
        runtime: runtime(&args.runtime)?,
        checkpoint_timeout: args.checkpoint_timeout,
        agent_timeout: args.agent_timeout,
        transfer_timeout: args.transfer_timeout,
        wait_timeout: args.wait_timeout,
        restore_timeout: args.restore_timeout,
        max_attempts: args.max_attempts,
        hook_request_ttl: args.hook_request_ttl,
        ..Config::default()
    };
    if let Err(e) = layout::check_location(&config.storage_location, &[]) {
        bail!("--storage-location: {e}");
    }
    let client = client(None).await?;
    let health = Arc::new(Health::default());
    let server = tokio::spawn(http::serve(args.metrics_addr, health.clone()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        health.clone(),
        &args.identity,
    ));
    if args.no_leader_election {
        health.metrics.leader.set(1);
        controller::run(ctx).await;
        server.abort();
        return Ok(());
    }
    let election = LeaderElection {
        api: Api::<Lease>::namespaced(client, &args.namespace),
        name: layout::LEADER_LEASE.into(),
        namespace: args.namespace,
        identity: args.identity,
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    // Not leading is still healthy and ready (a standby replica).
    health
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("waiting for the leader lease ({election:?})");
    election.acquire().await?;
    tracing::info!("leading");
    health.metrics.leader.set(1);
    tokio::select! {
        () = controller::run(ctx) => Ok(()),
        lost = election.hold() => {
            health.metrics.leader.set(0);
            Err(lost).context("stopping: leadership lost")
        }
        r = server => bail!("metrics server stopped: {r:?}"),
    }
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let storage = StorageConfig::load(args.storage_config.as_deref())
        .context("cannot load the storage configuration")?;
    runtime(&args.runtime)?;
    let node_agent = NodeAgent::new(
        NodePaths {
            requests: args.requests_dir,
            restores: args.restores_dir,
            checkpoints: args.checkpoint_dir,
        },
        Arc::new(StorageBlobs::new(storage)),
    );
    let client = client(None).await?;
    let health = Arc::new(Health::default());
    let server = tokio::spawn(http::serve(args.metrics_addr, health.clone()));
    let beat = tokio::spawn(agent::heartbeat(
        client.clone(),
        args.namespace,
        args.node_name.clone(),
        args.identity,
        args.runtime,
        health.clone(),
        args.heartbeat,
    ));
    let ctx = Arc::new(agent::AgentContext {
        client,
        node: args.node_name,
        node_agent: Arc::new(node_agent),
        health,
        clock: agent::system_clock(),
    });
    agent::run(ctx).await;
    beat.abort();
    server.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Role::Crd => {
            print!("{}", crd::crd_yaml()?);
            Ok(())
        }
        Role::Controller(a) => {
            init_logging();
            run_controller(a).await
        }
        Role::Agent(a) => {
            init_logging();
            run_agent(a).await
        }
        Role::InstallHostFiles(a) => {
            let mut files = hostinstall::plan(&a.image_bin, &a.image_lib, &a.dest);
            if let (Some(from), Some(to)) = (a.config, a.config_dest) {
                files.push(hostinstall::HostFile {
                    from,
                    to,
                    mode: 0o600,
                    optional: false,
                });
            }
            for line in hostinstall::install(&files).context("install-host-files")? {
                println!("{line}");
            }
            Ok(())
        }
    }
}
