//! The Helm chart with a real helm (v4, installed by scripts/install-helm.sh): `helm lint` and
//! `helm template --include-crds` for several value sets, every rendered object validated
//! against the Kubernetes OpenAPI schemas by `kubernetes-validate --strict` (1.30 and the
//! newest version it knows), and the BpfMapCheckpoint examples validated against the CRD's
//! schema by a JSON Schema validator (python's jsonschema), independent of our own checker.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> PathBuf {
    let p = std::env::var_os("MAPSNAP_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/mapsnap-tools/helm"));
    assert!(
        p.exists(),
        "{} missing: run scripts/install-helm.sh (make deps)",
        p.display()
    );
    p
}

fn python() -> String {
    std::env::var("MAPSNAP_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest Kubernetes version kubernetes-validate has schemas for.
fn newest_kubernetes() -> String {
    run(Command::new(python()).args([
        "-c",
        "import kubernetes_validate.utils as u; print(u.latest_version())",
    ]))
    .trim()
    .to_string()
}

/// Lints and renders the chart with `sets`; validates every object; returns them.
fn render(name: &str, sets: &[&str], dir: &Path) -> Vec<Value> {
    let chart = root().join("charts/mapsnap");
    let mut args: Vec<String> = Vec::new();
    for s in sets {
        args.push("--set".into());
        args.push((*s).into());
    }
    run(Command::new(helm()).arg("lint").arg(&chart).args(&args));
    let text = run(Command::new(helm())
        .args([
            "template",
            "mapsnap",
            "--include-crds",
            "-n",
            "mapsnap-system",
        ])
        .arg(&chart)
        .args(&args));
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, &text).expect("write");
    for version in ["1.30.0".to_string(), newest_kubernetes()] {
        run(Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", &version])
            .arg(&file));
    }
    let mut objs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).expect("yaml");
        if !v.is_null() {
            objs.push(v);
        }
    }
    objs
}

fn find<'a>(objs: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    objs.iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
}

fn args_of(deploy: &Value, container: &str) -> Vec<String> {
    let spec = &deploy["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("no container {container}"));
    serde_json::from_value(c["args"].clone()).expect("args")
}

fn rules(objs: &[Value], role: &str) -> String {
    find(objs, "ClusterRole", role)["rules"].to_string()
}

#[test]
fn chart_renders_valid_objects_for_each_value_set() {
    let dir = tempfile::tempdir().expect("tmp");

    // Defaults: the agent calls the kubelet; nobody gets nodes/proxy; a least-privilege agent.
    let objs = render("defaults", &[], dir.path());
    assert!(objs.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
    assert!(!rules(&objs, "-controller").contains("nodes/proxy"));
    assert!(rules(&objs, "-agent").contains("nodes/checkpoint"));
    assert!(!rules(&objs, "-controller").contains("nodes/checkpoint"));
    let ds = find(&objs, "DaemonSet", "-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_ne!(pod["hostPID"], true, "no host PID namespace by default");
    let agent = pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .expect("agent");
    assert_ne!(agent["securityContext"]["privileged"], true);
    assert_eq!(agent["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        agent["securityContext"]["capabilities"]["add"],
        serde_json::json!(["DAC_OVERRIDE"])
    );
    assert!(
        !pod.to_string().contains("/sys/fs/bpf"),
        "the agent does not touch BPF maps: no bpffs mount"
    );
    let a = args_of(ds, "agent");
    assert!(a.contains(&"--kubelet-access=agent".to_string()), "{a:?}");
    assert!(
        a.contains(&"--allowed-location=s3://mapsnap-snapshots/mapsnap".to_string()),
        "{a:?}"
    );
    // The hook table allows restores from the operator's storage.
    let hook = find(&objs, "ConfigMap", "-hook");
    let table = hook["data"]["hook.toml"].as_str().expect("hook.toml");
    let parsed: toml::Table = table.parse().expect("hook.toml is TOML");
    assert_eq!(
        parsed["hook"]["allowed_locations"][0].as_str(),
        Some("s3://mapsnap-snapshots/mapsnap")
    );
    assert_eq!(
        parsed["hook"]["require_restore_request"].as_bool(),
        Some(true)
    );
    // The CRIU plugin goes into CRIU's default plugin directory, not through `libdir`.
    let hook_args = args_of(ds, "install-hook");
    assert!(
        hook_args.iter().any(|a| a.starts_with("--criu-plugin=")),
        "{hook_args:?}"
    );
    assert!(!hook_args.iter().any(|a| a.starts_with("--criu-libdir")));
    // Hooks go where CRI-O and Podman read them by default.
    assert!(
        ds.to_string().contains("/usr/share/containers/oci/hooks.d"),
        "hooks dir"
    );

    // No keys by default: nothing signed, nothing checked, no key Secret mounted.
    assert!(!table.contains("trust_keys") && !table.contains("signing_key"));
    assert!(!ds.to_string().contains("/keys/"));

    // Trust keys, the signing key, the identity and the recipients come from Secrets: the
    // install container mirrors each onto the node, and the hook's and the CRIU plugin's
    // configs name the host files (never anything from a pod or a BpfMapCheckpoint).
    let objs = render(
        "trust",
        &[
            "trust.trustedKeysSecret=mapsnap-trusted",
            "trust.signingKeySecret=mapsnap-signing",
            "trust.identitySecret=mapsnap-identity",
            "trust.recipientsSecret=mapsnap-recipients",
        ],
        dir.path(),
    );
    let hook = find(&objs, "ConfigMap", "-hook");
    let parsed: toml::Table = hook["data"]["hook.toml"]
        .as_str()
        .expect("hook.toml")
        .parse()
        .expect("hook.toml is TOML");
    let h = &parsed["hook"];
    assert_eq!(h["trust_keys"][0].as_str(), Some("/etc/mapsnap/trust"));
    assert_eq!(
        h["signing_key"].as_str(),
        Some("/etc/mapsnap/signing/mapsnap.key")
    );
    assert_eq!(
        h["identities"][0].as_str(),
        Some("/etc/mapsnap/identities/identity.txt")
    );
    assert_eq!(
        h["recipients"][0].as_str(),
        Some("/etc/mapsnap/recipients/recipients.txt")
    );
    let plugin: toml::Table = hook["data"]["criu-plugin.toml"]
        .as_str()
        .expect("criu-plugin.toml")
        .parse()
        .expect("criu-plugin.toml is TOML");
    assert_eq!(plugin["trust_keys"][0].as_str(), Some("/etc/mapsnap/trust"));
    assert_eq!(
        plugin["signing_key"].as_str(),
        Some("/etc/mapsnap/signing/mapsnap.key")
    );
    let ds = find(&objs, "DaemonSet", "-agent");
    let install = args_of(ds, "install-files");
    for dir in ["trust", "signing", "identities", "recipients"] {
        let want = format!("--key-dir=/keys/{dir}=/host/etc/mapsnap/{dir}");
        assert!(install.contains(&want), "{want} in {install:?}");
    }
    let volumes = ds["spec"]["template"]["spec"]["volumes"].to_string();
    for secret in [
        "mapsnap-trusted",
        "mapsnap-signing",
        "mapsnap-identity",
        "mapsnap-recipients",
    ] {
        assert!(volumes.contains(secret), "{secret} mounted: {volumes}");
    }
    let agent_mounts = args_of(ds, "agent");
    assert!(
        !agent_mounts.iter().any(|a| a.contains("/keys/")),
        "the agent container itself holds no keys"
    );

    // file:// storage is mounted into the agent at the same path.
    let objs = render(
        "file-storage",
        &["storage.location=file:///srv/mapsnap"],
        dir.path(),
    );
    let ds = find(&objs, "DaemonSet", "-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["hostPath"]["path"] == "/srv/mapsnap"),
        "{pod}"
    );
    assert!(
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/srv/mapsnap")
    );

    // containerd: its config is what the agent reads.
    let objs = render("containerd", &["runtime=containerd"], dir.path());
    let ds = find(&objs, "DaemonSet", "-agent");
    assert!(ds.to_string().contains("/host/etc/containerd"));

    // The API-server proxy opt-in: nodes/proxy for the controller, the API server's
    // kubelet-client user bound to nodes/checkpoint, nothing for the agent.
    let objs = render(
        "proxy",
        &[
            "kubelet.access=apiserver-proxy",
            "kubelet.apiServerUser=kube-apiserver-kubelet-client",
        ],
        dir.path(),
    );
    assert!(rules(&objs, "-controller").contains("nodes/proxy"));
    assert!(!rules(&objs, "-agent").contains("nodes/checkpoint"));
    let b = find(&objs, "ClusterRoleBinding", "-apiserver-checkpoint");
    assert_eq!(b["subjects"][0]["kind"], "User");
    assert_eq!(b["subjects"][0]["name"], "kube-apiserver-kubelet-client");

    // Registry credentials: mounted into the agent, the pull secret named to the controller.
    let objs = render(
        "registry",
        &[
            "restore.registry.repository=registry.example:5000/mapsnap/ckpt",
            "restore.registry.credentialsSecret=mapsnap-registry",
            "restore.registry.pullSecretName=mapsnap-pull",
            "kubelet.caHostPath=/etc/kubernetes/pki/ca.crt",
        ],
        dir.path(),
    );
    let a = args_of(find(&objs, "DaemonSet", "-agent"), "agent");
    assert!(a.contains(&"--registry-repository=registry.example:5000/mapsnap/ckpt".to_string()));
    assert!(
        a.contains(&"--registry-auth-file=/etc/mapsnap-registry/.dockerconfigjson".to_string())
    );
    assert!(a.contains(&"--kubelet-ca=/etc/mapsnap-kubelet/ca.crt".to_string()));
    let c = args_of(find(&objs, "Deployment", "-controller"), "controller");
    assert!(
        c.contains(&"--image-pull-secret=mapsnap-pull".to_string()),
        "{c:?}"
    );
}

#[test]
fn examples_validate_against_the_crd_with_jsonschema() {
    let script = r#"
import sys, glob, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
n = 0
for f in sorted(glob.glob(sys.argv[2] + "/*.yaml")):
    obj = yaml.safe_load(open(f))
    jsonschema.validate(obj, schema)
    n += 1
bad = yaml.safe_load(open(sorted(glob.glob(sys.argv[2] + "/*.yaml"))[-1]))
bad["spec"]["target"] = None
try:
    jsonschema.validate(bad, schema)
    print("target: null passed")
    sys.exit(1)
except jsonschema.ValidationError:
    pass
print(n)
"#;
    let out = run(Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(root().join("crds/bpfmapcheckpoints.yaml"))
        .arg(root().join("examples")));
    assert_eq!(out.trim(), "3", "examples validated: {out}");
}
