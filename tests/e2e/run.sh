#!/usr/bin/env bash
# End-to-end test of the mapsnap operator on a real cluster (kubeadm + CRI-O >= 1.26 with
# restore enabled + CRIU >= 4.1 + a registry for checkpoint images).
# NOT RUN IN CI: these machines have no cluster. See tests/e2e/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

: "${IMAGE:?set IMAGE (registry/repository:tag)}"
: "${STORAGE_LOCATION:?set STORAGE_LOCATION (s3://bucket/prefix, ...)}"
: "${STORAGE_CONFIG:?set STORAGE_CONFIG (a mapsnap config.toml with credentials)}"
: "${CKPT_REPOSITORY:?set CKPT_REPOSITORY (host[:port]/path for checkpoint images)}"
REGISTRY_AUTH=${REGISTRY_AUTH:-}
KUBELET_INSECURE=${KUBELET_INSECURE:-0}
BUILD=${BUILD:-0}
KEEP=${KEEP:-0}
TIMEOUT=${TIMEOUT:-600}
OPNS=${OPNS:-mapsnap-system}
NS=${NS:-mapsnap-e2e}
RELEASE=${RELEASE:-mapsnap}
WORKLOAD_IMAGE=${WORKLOAD_IMAGE:-debian:bookworm-slim}

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
say() { echo "==> $*"; }

diagnose() {
    local name=$1
    kubectl -n "$NS" describe bmc "$name" || true
    kubectl -n "$NS" get events --field-selector "involvedObject.name=$name" || true
    kubectl -n "$OPNS" logs "deploy/$RELEASE-controller" --tail=100 || true
    kubectl -n "$OPNS" logs -l app.kubernetes.io/component=agent --tail=50 --prefix || true
}

cleanup() {
    if [[ "$KEEP" == 1 ]]; then
        say "KEEP=1: leaving namespace $NS and release $RELEASE"
        return
    fi
    kubectl delete namespace "$NS" --wait=true --timeout=120s >/dev/null 2>&1 || true
    helm -n "$OPNS" uninstall "$RELEASE" >/dev/null 2>&1 || true
}
trap 'echo "e2e: $passed passed, $failed failed"; cleanup' EXIT

say "preflight"
for tool in kubectl helm; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }
done
minor=$(kubectl version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -1)
[[ "${minor:-0}" -ge 30 ]] || { echo "Kubernetes >= 1.30 needed (server minor $minor)" >&2; exit 2; }
mapfile -t nodes < <(kubectl get nodes -o jsonpath='{range .items[?(@.spec.unschedulable!=true)]}{.metadata.name}{"\n"}{end}')
SOURCE_NODE=${SOURCE_NODE:-${nodes[0]:-}}
TARGET_NODE=${TARGET_NODE:-${nodes[1]:-}}
[[ -n "$SOURCE_NODE" && -n "$TARGET_NODE" ]] || { echo "two schedulable nodes needed" >&2; exit 2; }
for n in "$SOURCE_NODE" "$TARGET_NODE"; do
    rt=$(kubectl get node "$n" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}')
    [[ "$rt" == cri-o://* ]] || { echo "node $n runs $rt, not CRI-O" >&2; exit 2; }
done
say "source node $SOURCE_NODE, target node $TARGET_NODE"

if [[ "$BUILD" == 1 ]]; then
    say "building and pushing $IMAGE"
    docker build -t "$IMAGE" .
    docker push "$IMAGE"
fi

say "installing the chart"
kubectl create namespace "$OPNS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$OPNS" create secret generic mapsnap-storage --from-file=config.toml="$STORAGE_CONFIG" \
    --dry-run=client -o yaml | kubectl apply -f -
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
registry_args=(--set restore.registry.repository="$CKPT_REPOSITORY")
if [[ -n "$REGISTRY_AUTH" ]]; then
    for ns in "$OPNS" "$NS"; do
        kubectl -n "$ns" create secret generic mapsnap-registry --type=kubernetes.io/dockerconfigjson \
            --from-file=.dockerconfigjson="$REGISTRY_AUTH" --dry-run=client -o yaml | kubectl apply -f -
    done
    registry_args+=(--set restore.registry.credentialsSecret=mapsnap-registry
        --set restore.registry.pullSecretName=mapsnap-registry)
fi
[[ "$KUBELET_INSECURE" == 1 ]] && registry_args+=(--set kubelet.insecureSkipTLSVerify=true)
kubectl apply -f crds/bpfmapcheckpoints.yaml
helm -n "$OPNS" upgrade --install "$RELEASE" charts/mapsnap \
    --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
    --set storage.location="$STORAGE_LOCATION" \
    --set storage.credentials.existingSecret=mapsnap-storage \
    "${registry_args[@]}" \
    --set runtime=crio --wait --timeout "${TIMEOUT}s"
check "controller rolled out" kubectl -n "$OPNS" rollout status "deploy/$RELEASE-controller" --timeout="${TIMEOUT}s"
check "agents rolled out" kubectl -n "$OPNS" rollout status "ds/$RELEASE-agent" --timeout="${TIMEOUT}s"
for n in "$SOURCE_NODE" "$TARGET_NODE"; do
    check "agent lease of $n" kubectl -n "$OPNS" get lease "mapsnap-agent-$n"
    restore=$(kubectl -n "$OPNS" get lease "mapsnap-agent-$n" -o jsonpath='{.metadata.annotations.mapsnap\.io/restore}')
    why=$(kubectl -n "$OPNS" get lease "mapsnap-agent-$n" -o jsonpath='{.metadata.annotations.mapsnap\.io/restore-reason}')
    check "node $n can restore ($restore: $why)" test "$restore" != disabled
done

say "starting the workload on $SOURCE_NODE"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: counter
  labels: {app: mapsnap-e2e}
spec:
  nodeName: $SOURCE_NODE
  restartPolicy: Never
  containers:
    - name: app
      image: $WORKLOAD_IMAGE
      securityContext: {privileged: true}
      command: ["bash", "-c"]
      args:
        - |
          set -e
          command -v bpftool >/dev/null || { apt-get update -qq && apt-get install -y -qq bpftool >/dev/null; }
          [ -e /sys/fs/bpf/app/counters ] || bpftool map create /sys/fs/bpf/app/counters type hash key 4 value 8 entries 128 name counters
          i=0
          while true; do
            i=\$((i + 1))
            k=\$((i % 16))
            bpftool map update pinned /sys/fs/bpf/app/counters key \$k 0 0 0 value \$((i % 256)) 0 0 0 0 0 0 0 any
            echo \$i > /tmp/counter
            sleep 1
          done
      volumeMounts:
        - {name: bpf, mountPath: /sys/fs/bpf/app}
  volumes:
    - name: bpf
      hostPath: {path: /sys/fs/bpf/mapsnap-e2e, type: DirectoryOrCreate}
YAML
kubectl -n "$NS" wait --for=condition=Ready pod/counter --timeout="${TIMEOUT}s"
sleep 20
before=$(kubectl -n "$NS" exec counter -- cat /tmp/counter)
entries_before=$(kubectl -n "$NS" exec counter -- bpftool -j map dump pinned /sys/fs/bpf/app/counters | grep -o '"key"' | wc -l)
say "workload counter at $before, map has $entries_before entries"

wait_ready() {
    local name=$1
    if kubectl -n "$NS" wait --for=condition=Ready "bmc/$name" --timeout="${TIMEOUT}s"; then
        return 0
    fi
    diagnose "$name"
    return 1
}

say "Migrate counter to $TARGET_NODE"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: mapsnap.io/v1alpha1
kind: BpfMapCheckpoint
metadata: {name: migrate}
spec:
  action: Migrate
  source: {pod: counter, container: app}
  target: {node: $TARGET_NODE}
  sourcePodPolicy: Delete
YAML
if wait_ready migrate; then
    pass "Migrate reached Ready"
    restored=$(kubectl -n "$NS" get bmc migrate -o jsonpath='{.status.restore.pod}')
    node=$(kubectl -n "$NS" get pod "$restored" -o jsonpath='{.spec.nodeName}')
    check "restored pod $restored runs on $TARGET_NODE" test "$node" = "$TARGET_NODE"
    image=$(kubectl -n "$NS" get bmc migrate -o jsonpath='{.status.restore.image}')
    pod_image=$(kubectl -n "$NS" get pod "$restored" -o jsonpath='{.spec.containers[?(@.name=="app")].image}')
    check "restored pod runs the checkpoint image by digest ($image)" \
        bash -c "[[ '$image' == '$CKPT_REPOSITORY'@sha256:* && '$pod_image' == '$image' ]]"
    sleep 3
    after=$(kubectl -n "$NS" exec "$restored" -- cat /tmp/counter)
    check "process state continued (counter $before -> $after)" test "$after" -ge "$before"
    entries_after=$(kubectl -n "$NS" exec "$restored" -- bpftool -j map dump pinned /sys/fs/bpf/app/counters | grep -o '"key"' | wc -l)
    check "map restored ($entries_after entries, had $entries_before)" test "$entries_after" -ge "$entries_before"
    check "source pod deleted" bash -c "! kubectl -n $NS get pod counter >/dev/null 2>&1"
    maps=$(kubectl -n "$NS" get bmc migrate -o jsonpath='{.status.checkpoint.mapCount}')
    check "status records $maps maps" test "${maps:-0}" -ge 1
    snapshot=$(kubectl -n "$NS" get bmc migrate -o jsonpath='{.status.checkpoint.snapshot}')
    agent=$(kubectl -n "$OPNS" get pod -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
    check "snapshot verifies ($snapshot)" kubectl -n "$OPNS" exec "$agent" -- /usr/local/bin/mapsnap verify "$snapshot"
else
    fail "Migrate reached Ready"
    restored=""
fi

if [[ -n "$restored" ]]; then
    say "Checkpoint $restored (Retain), Restore it on $SOURCE_NODE"
    kubectl -n "$NS" apply -f - <<YAML
apiVersion: mapsnap.io/v1alpha1
kind: BpfMapCheckpoint
metadata: {name: ckpt}
spec:
  action: Checkpoint
  source: {pod: $restored, container: app}
  retentionPolicy: Retain
---
apiVersion: mapsnap.io/v1alpha1
kind: BpfMapCheckpoint
metadata: {name: back}
spec:
  action: Restore
  source: {checkpointRef: {name: ckpt}}
  target: {node: $SOURCE_NODE, podName: counter-back}
YAML
    if wait_ready ckpt && wait_ready back; then
        pass "Checkpoint and Restore reached Ready"
        check "restored-back pod on $SOURCE_NODE" test "$(kubectl -n "$NS" get pod counter-back -o jsonpath='{.spec.nodeName}')" = "$SOURCE_NODE"
    else
        fail "Checkpoint and Restore reached Ready"
    fi
fi

say "a Checkpoint of a missing pod fails"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: mapsnap.io/v1alpha1
kind: BpfMapCheckpoint
metadata: {name: missing}
spec:
  action: Checkpoint
  source: {pod: does-not-exist}
YAML
if kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Failed bmc/missing --timeout=120s; then
    reason=$(kubectl -n "$NS" get bmc missing -o jsonpath='{.status.conditions[?(@.type=="Failed")].reason}')
    check "missing pod fails with PodNotFound ($reason)" test "$reason" = PodNotFound
else
    fail "missing pod fails"
fi

say "the spec is immutable"
check "spec change refused" bash -c "! kubectl -n $NS patch bmc missing --type=merge -p '{\"spec\":{\"source\":{\"pod\":\"other\"}}}' 2>/dev/null"

say "deleting the objects (finalizer cleanup)"
for o in missing back ckpt migrate; do
    kubectl -n "$NS" delete bmc "$o" --ignore-not-found --wait=false
done
for o in missing back ckpt migrate; do
    check "bmc/$o deleted" kubectl -n "$NS" wait --for=delete "bmc/$o" --timeout=300s
done
