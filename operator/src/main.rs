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
use mapsnap_operator::ckptimage::{self, CheckpointImageArgs, Registry, RegistryAuth};
use mapsnap_operator::config::{Config, KubeletAccess, Runtime};
use mapsnap_operator::controller::{self, Context};
use mapsnap_operator::http::{self, Health};
use mapsnap_operator::images::RegistryImages;
use mapsnap_operator::kubelet::{DirectKubelet, KUBELET_PORT, KubeletTls, SA_TOKEN};
use mapsnap_operator::layout;
use mapsnap_operator::lease::LeaderElection;
use mapsnap_operator::node::{NodeAgent, NodePaths, StorageBlobs};
use mapsnap_operator::{agent, capabilities, crd, hostinstall};

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
    /// Builds a checkpoint OCI image from a checkpoint archive, pushes it, and prints it by
    /// digest (`REF@sha256:...`).
    CheckpointImage(CheckpointImageArgs),
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
    /// The hook's [hook] table, appended to --config-dest after the storage config.
    #[arg(long, requires = "config_dest")]
    hook_config: Option<PathBuf>,
    #[arg(long)]
    config_dest: Option<PathBuf>,
    /// Key files to mirror onto the host, `FROM=TO` (a mounted Secret's directory and a host
    /// directory, e.g. `/keys/trust=/host/etc/mapsnap/trust`); repeatable.
    #[arg(long, value_parser = parse_key_dir)]
    key_dir: Vec<(PathBuf, PathBuf)>,
    /// The CRIU plugin's config file to install, to --criu-plugin-config-dest (mode 0600).
    #[arg(long, requires = "criu_plugin_config_dest")]
    criu_plugin_config: Option<PathBuf>,
    #[arg(long)]
    criu_plugin_config_dest: Option<PathBuf>,
}

fn parse_key_dir(v: &str) -> Result<(PathBuf, PathBuf), String> {
    match v.split_once('=') {
        Some((a, b)) if a.starts_with('/') && b.starts_with('/') => {
            Ok((PathBuf::from(a), PathBuf::from(b)))
        }
        _ => Err(format!("{v:?}: expected /FROM=/TO (absolute directories)")),
    }
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
    /// Who calls the kubelet checkpoint API: agent (the source node's agent, default) or
    /// apiserver-proxy (this controller, through the API server's node proxy).
    #[arg(long, default_value = "agent")]
    kubelet_access: String,
    /// Pull secret (in the restored pod's namespace) put on restored pods (repeatable).
    #[arg(long = "image-pull-secret")]
    image_pull_secrets: Vec<String>,
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
    /// The runtime's version, when known (reported in the lease).
    #[arg(long, env = "MAPSNAP_RUNTIME_VERSION")]
    runtime_version: Option<String>,
    /// Where the host's /etc is mounted (the runtime's config files are read there).
    #[arg(long, default_value = "/host")]
    host_root: PathBuf,
    /// Call this node's kubelet for checkpoints (off: the controller calls it through the API
    /// server).
    #[arg(long, default_value = "agent")]
    kubelet_access: String,
    /// The kubelet's address (the downward API's status.hostIP).
    #[arg(long, env = "HOST_IP")]
    kubelet_host: Option<std::net::IpAddr>,
    #[arg(long, default_value_t = KUBELET_PORT)]
    kubelet_port: u16,
    /// CA bundle that signed the kubelet's serving certificate (default: the cluster CA).
    #[arg(long)]
    kubelet_ca: Option<PathBuf>,
    /// Verify the kubelet's certificate for this name (e.g. the node name) instead of its IP.
    #[arg(long)]
    kubelet_server_name: Option<String>,
    /// Do not verify the kubelet's serving certificate (self-signed kubelet certificates).
    #[arg(long)]
    kubelet_insecure_skip_tls_verify: bool,
    #[arg(long, default_value = SA_TOKEN)]
    token_file: PathBuf,
    /// The storage prefixes tasks may name (the controller's --storage-location and
    /// --allowed-location values).
    #[arg(long = "allowed-location", required = true)]
    allowed_locations: Vec<String>,
    /// Repository checkpoint images are pushed to (host[:port]/path); none: no restores here.
    #[arg(long)]
    registry_repository: Option<String>,
    /// Docker config JSON with the registry's push credentials.
    #[arg(long)]
    registry_auth_file: Option<PathBuf>,
    #[arg(long)]
    registry_insecure_http: bool,
    #[arg(long)]
    registry_ca_file: Option<PathBuf>,
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

fn kubelet_access(s: &str) -> anyhow::Result<KubeletAccess> {
    KubeletAccess::parse(s)
        .with_context(|| format!("unknown kubelet access {s:?} (agent or apiserver-proxy)"))
}

fn registry(args: &AgentArgs) -> anyhow::Result<Option<Registry>> {
    let Some(repository) = args.registry_repository.clone().filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let auth = match &args.registry_auth_file {
        None => RegistryAuth::Anonymous,
        Some(f) => {
            let json = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let host = repository.split('/').next().unwrap_or(&repository);
            RegistryAuth::from_docker_config_json(&json, host)
                .with_context(|| format!("credentials in {}", f.display()))?
        }
    };
    Ok(Some(Registry {
        repository,
        auth,
        insecure_http: args.registry_insecure_http,
        ca_file: args.registry_ca_file.clone(),
    }))
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
        kubelet_access: kubelet_access(&args.kubelet_access)?,
        image_pull_secrets: args.image_pull_secrets,
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
        renew_every: Duration::from_secs(2),
        // client-go's defaults: stop 5 s before the lease could be taken over.
        renew_deadline: Duration::from_secs(10),
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
    let rt = runtime(&args.runtime)?;
    let caps = capabilities::probe(rt, &args.host_root, args.runtime_version.clone());
    tracing::info!(
        "runtime {}: restore {} ({})",
        rt.as_str(),
        caps.restore.as_str(),
        caps.reason
    );
    let kubelet = match kubelet_access(&args.kubelet_access)? {
        KubeletAccess::ApiServerProxy => None,
        KubeletAccess::Agent => {
            let host = args
                .kubelet_host
                .context("--kubelet-host (or HOST_IP) is required to call the kubelet")?;
            let tls = KubeletTls {
                ca_file: args.kubelet_ca.clone(),
                server_name: args.kubelet_server_name.clone(),
                insecure_skip_verify: args.kubelet_insecure_skip_tls_verify,
            };
            let k = DirectKubelet::new(host, args.kubelet_port, &tls, &args.token_file)
                .context("kubelet client")?;
            tracing::info!("calling the kubelet at {}", k.base());
            Some(Arc::new(k))
        }
    };
    let mut node_agent = NodeAgent::new(
        NodePaths {
            requests: args.requests_dir.clone(),
            restores: args.restores_dir.clone(),
            checkpoints: args.checkpoint_dir.clone(),
        },
        Arc::new(StorageBlobs::new(storage)),
    )
    .with_allowed_locations(args.allowed_locations.clone());
    if let Some(registry) = registry(&args)? {
        node_agent = node_agent.with_images(Arc::new(RegistryImages {
            registry,
            runtime: tokio::runtime::Handle::current(),
        }));
    }
    let client = client(None).await?;
    let health = Arc::new(Health::default());
    let server = tokio::spawn(http::serve(args.metrics_addr, health.clone()));
    let beat = tokio::spawn(agent::heartbeat(
        client.clone(),
        args.namespace,
        args.node_name.clone(),
        args.identity,
        caps.annotations(),
        health.clone(),
        args.heartbeat,
    ));
    let ctx = Arc::new(agent::AgentContext {
        client,
        node: args.node_name,
        node_agent: Arc::new(node_agent),
        kubelet,
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
            let files = hostinstall::plan(&a.image_bin, &a.image_lib, &a.dest);
            for line in hostinstall::install(&files).context("install-host-files")? {
                println!("{line}");
            }
            if let Some(to) = a.config_dest {
                let parts: Vec<PathBuf> = a.config.into_iter().chain(a.hook_config).collect();
                let line = hostinstall::install_joined(&parts, &to, 0o600)
                    .context("install-host-files")?;
                println!("{line}");
            }
            for (from, to) in &a.key_dir {
                for line in hostinstall::install_key_dir(from, to).context("install-host-files")? {
                    println!("{line}");
                }
            }
            if let (Some(from), Some(to)) = (a.criu_plugin_config, a.criu_plugin_config_dest) {
                let line = hostinstall::install_joined(&[from], &to, 0o600)
                    .context("install-host-files")?;
                println!("{line}");
            }
            Ok(())
        }
        Role::CheckpointImage(a) => {
            let pushed = ckptimage::run_cli(&a).await.context("checkpoint-image")?;
            println!("{}", pushed.reference);
            Ok(())
        }
    }
}
