//! The CRD and what is built on it: `crds/` and the chart's copy match the Rust types, the
//! examples pass the generated schema (structure and CEL rules, evaluated with kube-cel as
//! the API server would), invalid combinations are refused, and the chart's plain YAML parses
//! and its templates refer only to values and helpers that exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mapsnap_operator::crd::{BpfMapCheckpoint, CRD_FILES, crd_yaml};
use serde_json::{Value, json};

#[path = "../src/schema_check.rs"]
mod schema_check;
use schema_check::check;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("valid YAML")
}

#[test]
fn crd_files_are_generated_from_the_rust_types() {
    let want = crd_yaml().expect("crd yaml");
    for rel in CRD_FILES {
        assert!(
            read(rel) == want,
            "{rel} is stale: run `cargo run -p mapsnap-operator --bin crdgen -- --write`"
        );
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(mapsnap_operator::crd::crd()).expect("crd");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn crd_shape() {
    let crd = yaml(&read("crds/bpfmapcheckpoints.yaml"));
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "bpfmapcheckpoints.mapsnap.io");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "BpfMapCheckpoint");
    assert_eq!(spec["names"]["shortNames"], json!(["bmc"]));
    let v = &spec["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!(v["subresources"]["status"], json!({}));
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        cols,
        [
            "Action", "Pod", "Target", "Phase", "Maps", "Size", "Restored", "Age"
        ]
    );
    let rules = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
        .as_array()
        .expect("CEL rules");
    assert!(rules.iter().any(|r| r["rule"] == "self == oldSelf"));
    // Conditions merge by type (server-side apply), steps by name.
    let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        status["conditions"]["x-kubernetes-list-map-keys"],
        json!(["type"])
    );
    assert_eq!(
        status["steps"]["x-kubernetes-list-map-keys"],
        json!(["name"])
    );
}

/// Every error the API server would return for `obj` (created, or updated from `old`).
fn validate(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let schema = schema();
    let mut errs = Vec::new();
    for k in ["apiVersion", "kind", "metadata"] {
        if obj.get(k).is_none() {
            errs.push(format!("missing {k}"));
        }
    }
    if obj["apiVersion"] != "mapsnap.io/v1alpha1" || obj["kind"] != "BpfMapCheckpoint" {
        errs.push("wrong apiVersion/kind".into());
    }
    let body = json!({"spec": obj["spec"].clone()});
    let body_schema = json!({"type": "object", "properties": {"spec": schema["properties"]["spec"]}, "required": ["spec"]});
    check(&body_schema, &body, "", &mut errs);
    if errs.is_empty() {
        let old_body = old.map(|o| json!({"spec": o["spec"].clone()}));
        if let Err(e) = kube_cel::Validator::new().validate(&body_schema, &body, old_body.as_ref())
        {
            errs.extend(e.iter().map(|e| e.to_string()));
        }
    }
    errs
}

fn examples() -> Vec<(String, Value)> {
    let mut v: Vec<(String, Value)> = std::fs::read_dir(root().join("examples"))
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            (p.display().to_string(), yaml(&text))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn examples_pass_the_generated_schema() {
    let ex = examples();
    let actions: BTreeSet<String> = ex
        .iter()
        .map(|(_, v)| v["spec"]["action"].as_str().expect("action").to_string())
        .collect();
    assert_eq!(
        actions,
        ["Checkpoint", "Migrate", "Restore"]
            .map(String::from)
            .into(),
        "one example per action"
    );
    for (name, v) in &ex {
        let errs = validate(v, None);
        assert!(errs.is_empty(), "{name}: {errs:?}");
        // And the operator reads them.
        let cr: BpfMapCheckpoint = serde_json::from_value(v.clone()).expect("deserializes");
        assert!(
            cr.metadata.namespace.is_some(),
            "{name}: give examples a namespace"
        );
    }
}

fn base(action: &str, spec: Value) -> Value {
    let mut s = spec;
    s["action"] = json!(action);
    json!({"apiVersion": "mapsnap.io/v1alpha1", "kind": "BpfMapCheckpoint",
           "metadata": {"name": "x", "namespace": "ns"}, "spec": s})
}

#[test]
fn invalid_objects_are_refused_with_a_reason() {
    let pod = json!({"pod": "lb-0"});
    let reference = json!({"checkpointRef": {"name": "c"}});
    let target = json!({"node": "node-b"});
    let cases = [
        (
            "Checkpoint with a target",
            base("Checkpoint", json!({"source": pod, "target": target})),
            "target is required for Restore and Migrate, and not allowed",
        ),
        (
            "Migrate without a target",
            base("Migrate", json!({"source": pod})),
            "target is required",
        ),
        (
            // A null is not "no target": the schema has no nullable fields.
            "Migrate with target: null",
            base("Migrate", json!({"source": pod, "target": null})),
            "target",
        ),
        (
            "Restore with a pod",
            base(
                "Restore",
                json!({"source": {"pod": "p", "checkpointRef": {"name": "c"}}, "target": target}),
            ),
            "Restore takes source.checkpointRef only",
        ),
        (
            "Restore without a ref",
            base("Restore", json!({"source": {}, "target": target})),
            "Restore takes source.checkpointRef only",
        ),
        (
            "Checkpoint of a ref",
            base("Checkpoint", json!({"source": reference})),
            "Checkpoint and Migrate take source.pod",
        ),
        (
            "policy on a Checkpoint",
            base(
                "Checkpoint",
                json!({"source": pod, "sourcePodPolicy": "Delete"}),
            ),
            "sourcePodPolicy applies to Migrate only",
        ),
        (
            "storage on a Restore",
            base(
                "Restore",
                json!({"source": reference, "target": target, "storage": {"location": "s3://bucket/p"}}),
            ),
            "storage is not allowed",
        ),
        (
            "timeout on a Restore",
            base(
                "Restore",
                json!({"source": reference, "target": target, "checkpointTimeoutSeconds": 60}),
            ),
            "checkpointTimeoutSeconds applies",
        ),
        (
            "unknown action",
            base("Teleport", json!({"source": pod})),
            "is not one of",
        ),
        (
            "unknown field",
            base(
                "Checkpoint",
                json!({"source": pod, "credentials": {"key": "k"}}),
            ),
            "unknown field \"credentials\"",
        ),
        (
            "bad pod name",
            base("Checkpoint", json!({"source": {"pod": "LB_0"}})),
            "does not match",
        ),
        (
            "credentials in the location",
            base(
                "Checkpoint",
                json!({"source": pod, "storage": {"location": "s3://AKIA:secret@bucket/x"}}),
            ),
            "does not match",
        ),
        (
            "query in the location",
            base(
                "Checkpoint",
                json!({"source": pod, "storage": {"location": "s3://bucket/x?endpoint=http://evil"}}),
            ),
            "does not match",
        ),
        (
            "timeout too long",
            base(
                "Checkpoint",
                json!({"source": pod, "checkpointTimeoutSeconds": 99999}),
            ),
            "out of range",
        ),
        (
            "rebase on a Checkpoint",
            base(
                "Checkpoint",
                json!({"source": pod, "rebase": {"mode": "Elapsed"}}),
            ),
            "rebase applies to Restore and Migrate only",
        ),
        (
            "rebase with a bad clock",
            base(
                "Restore",
                json!({"source": reference, "target": target,
                       "rebase": {"members": [{"path": "value.expires", "clock": "monotonic_hours"}]}}),
            ),
            "does not match",
        ),
        (
            "rebase with a bad path",
            base(
                "Restore",
                json!({"source": reference, "target": target,
                       "rebase": {"members": [{"path": "value..x", "clock": "tai_ns"}]}}),
            ),
            "does not match",
        ),
        (
            "bad policy",
            base(
                "Migrate",
                json!({"source": pod, "target": target, "sourcePodPolicy": "Maybe"}),
            ),
            "is not one of",
        ),
    ];
    for (what, obj, expect) in cases {
        let errs = validate(&obj, None);
        assert!(
            errs.iter().any(|e| e.contains(expect)),
            "{what}: expected an error containing {expect:?}, got {errs:?}"
        );
    }
}

#[test]
fn the_spec_is_immutable() {
    let (_, migrate) = examples()
        .into_iter()
        .find(|(_, v)| v["spec"]["action"] == "Migrate")
        .expect("migrate example");
    assert!(
        validate(&migrate, Some(&migrate)).is_empty(),
        "an unchanged spec passes"
    );
    let mut changed = migrate.clone();
    changed["spec"]["target"]["node"] = json!("node-c");
    let errs = validate(&changed, Some(&migrate));
    assert!(
        errs.iter().any(|e| e.contains("spec is immutable")),
        "{errs:?}"
    );
}

#[test]
fn retention_defaults_to_delete() {
    let obj = base("Checkpoint", json!({"source": {"pod": "p"}}));
    let cr: BpfMapCheckpoint = serde_json::from_value(obj).expect("cr");
    assert_eq!(
        cr.spec.retention_policy,
        mapsnap_operator::crd::RetentionPolicy::Delete
    );
    assert_eq!(
        schema()["properties"]["spec"]["properties"]["retentionPolicy"]["default"],
        "Delete"
    );
}

#[test]
fn chart_plain_yaml_parses_and_carries_the_crd() {
    let chart = yaml(&read("charts/mapsnap/Chart.yaml"));
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "mapsnap");
    assert!(chart["version"].is_string() && chart["appVersion"].is_string());
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "appVersion follows the crate version"
    );
    let values = yaml(&read("charts/mapsnap/values.yaml"));
    for key in ["image", "storage", "runtime", "controller", "agent", "hook"] {
        assert!(values.get(key).is_some(), "values.yaml has no {key}");
    }
    assert!(["crio", "containerd"].contains(&values["runtime"].as_str().expect("runtime")));
    assert!(values["storage"]["credentials"]["existingSecret"].is_string());
    assert_eq!(
        read("charts/mapsnap/crds/bpfmapcheckpoints.yaml"),
        read("crds/bpfmapcheckpoints.yaml")
    );
}

/// Looks a dotted path up in values.yaml.
fn has_path(values: &Value, path: &str) -> bool {
    let mut v = values;
    for seg in path.split('.') {
        match v.get(seg) {
            Some(x) => v = x,
            None => return false,
        }
    }
    true
}

#[test]
fn chart_templates_refer_to_existing_values_and_helpers() {
    let values = yaml(&read("charts/mapsnap/values.yaml"));
    let dir = root().join("charts/mapsnap/templates");
    let helpers = std::fs::read_to_string(dir.join("_helpers.tpl")).expect("helpers");
    let define = regex::Regex::new(r#"\{\{-?\s*define\s+"([^"]+)""#).expect("re");
    let defined: BTreeSet<String> = define
        .captures_iter(&helpers)
        .map(|c| c[1].to_string())
        .collect();
    let include = regex::Regex::new(r#"include\s+"([^"]+)""#).expect("re");
    let value_ref = regex::Regex::new(r"\.Values\.([A-Za-z0-9_.]+)").expect("re");
    let creds_ref = regex::Regex::new(r"\$creds\.([A-Za-z0-9_]+)").expect("re");
    let action = regex::Regex::new(r"\{\{-?\s*(if|with|range|define|end)\b").expect("re");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("templates")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        let name = f.display();
        for c in include.captures_iter(&text) {
            assert!(
                defined.contains(&c[1]),
                "{name}: include of undefined {:?}",
                &c[1]
            );
        }
        for c in value_ref.captures_iter(&text) {
            let p = c[1].trim_end_matches('.');
            assert!(
                has_path(&values, p),
                "{name}: .Values.{p} is not in values.yaml"
            );
        }
        for c in creds_ref.captures_iter(&text) {
            assert!(
                has_path(&values, &format!("storage.credentials.{}", &c[1])),
                "{name}: $creds.{} is not in values.yaml",
                &c[1]
            );
        }
        // Every if/with/range/define is closed, and no end closes nothing.
        let mut depth = 0i32;
        for c in action.captures_iter(&text) {
            depth += if &c[1] == "end" { -1 } else { 1 };
            assert!(depth >= 0, "{name}: {{{{ end }}}} without an opening block");
        }
        assert_eq!(depth, 0, "{name}: unclosed template blocks");
        assert_eq!(
            text.matches("{{").count(),
            text.matches("}}").count(),
            "{name}: unbalanced braces"
        );
    }
    // The chart runs the binaries with the subcommands they have.
    let ds = std::fs::read_to_string(dir.join("agent-daemonset.yaml")).expect("ds");
    for needle in [
        "- agent",
        "- install-host-files",
        "- install",
        "mapsnap-hook",
    ] {
        assert!(ds.contains(needle), "agent DaemonSet lacks {needle}");
    }
    let rbac = std::fs::read_to_string(dir.join("rbac.yaml")).expect("rbac");
    for needle in [
        "nodes/proxy",
        "nodes/checkpoint",
        "bpfmapcheckpoints/status",
        "leases",
    ] {
        assert!(rbac.contains(needle), "RBAC lacks {needle}");
    }
    assert!(!rbac.contains("\"*\""), "no wildcard permissions");
}

#[test]
fn chart_passes_only_flags_the_operator_binary_has() {
    let bin = env!("CARGO_BIN_EXE_mapsnap-operator");
    let help = |sub: &str| {
        let out = std::process::Command::new(bin)
            .args([sub, "--help"])
            .output()
            .expect("run mapsnap-operator");
        assert!(out.status.success(), "{sub} --help failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let flag = regex::Regex::new(r"^\s*- (--[a-z-]+)").expect("re");
    let dir = root().join("charts/mapsnap/templates");
    for (file, sub, container) in [
        ("controller-deployment.yaml", "controller", "controller"),
        ("agent-daemonset.yaml", "agent", "agent"),
        (
            "agent-daemonset.yaml",
            "install-host-files",
            "install-files",
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).expect("template");
        // The args list of that container: from its name to the next container or volumes.
        let start = text
            .find(&format!("- name: {container}\n"))
            .unwrap_or_else(|| panic!("{file}: no container {container}"));
        let rest = &text[start + 1..];
        let end = rest
            .find("\n        - name:")
            .or_else(|| rest.find("\n      volumes:"))
            .unwrap_or(rest.len());
        let block = &rest[..end];
        assert!(
            block.contains(&format!("- {sub}\n")),
            "{file}: {container} does not run {sub}"
        );
        let h = help(sub);
        let mut n = 0;
        for line in block.lines() {
            if let Some(c) = flag.captures(line) {
                assert!(h.contains(&c[1]), "{file}: {sub} has no flag {}", &c[1]);
                n += 1;
            }
        }
        assert!(n > 0, "{file}: no flags found for {container}");
    }
}

/// The repository's documents stand on their own: none points at notes outside it.
#[test]
fn docs_point_at_nothing_outside_the_repository() {
    let mut files = vec![root().join("README.md")];
    for dir in [
        "docs",
        "tests/e2e",
        "charts/mapsnap",
        "charts/mapsnap/templates",
    ] {
        if let Ok(rd) = std::fs::read_dir(root().join(dir)) {
            files.extend(
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file()),
            );
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for bad in ["FIELD-NOTES", "shared/", "../shared"] {
            assert!(!text.contains(bad), "{} mentions {bad}", f.display());
        }
    }
}
