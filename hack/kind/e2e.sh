#!/usr/bin/env bash
# End-to-end tests in a kind cluster whose kubelet talks to sidecar-shim.
#
# Needs docker, kind, kubectl and cargo (with protoc); pulls busybox. Steps:
#   1. cargo build --release
#   2. kind create cluster with hack/kind/kind.yaml (the shim runs as the
#      systemd unit systemd/sidecar-shim.service inside the node)
#   3. make sure the unit is enabled and active, and that kubelet uses it
#   4. kind load docker-image the test image
#   5. apply hack/kind/manifests/* and check each outcome (with timeouts):
#        job.yaml        the Job with a sidecar completes
#        app-first.yaml  the app listed before its sidecar reaches it on its
#                        first try (restartCount 0)
#        shutdown.yaml   on deletion the sidecar outlives the app and gets
#                        the app's final message
#   6. delete the cluster (always; KEEP_CLUSTER=1 keeps it for debugging)
# On failure it prints pods, events and the shim's journal first.
#
# Usage: hack/kind/e2e.sh
# Environment: CLUSTER_NAME (default sidecar-shim-e2e), KIND_NODE_IMAGE
# (default kindest/node:v1.29.14), KEEP_CLUSTER=1, SKIP_BUILD=1.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cluster=${CLUSTER_NAME:-sidecar-shim-e2e}
node_image=${KIND_NODE_IMAGE:-kindest/node:v1.29.14}
node=${cluster}-control-plane
context=kind-${cluster}
image=busybox:1.36
socket=/run/sidecar-shim/sidecar-shim.sock
manifests=hack/kind/manifests

step() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    echo "e2e: FAIL: $*" >&2
    exit 1
}
k() { kubectl --context "$context" "$@"; }
on_node() { docker exec "$node" "$@"; }

for tool in docker kind kubectl cargo; do
    command -v "$tool" >/dev/null || fail "$tool not found in PATH"
done

workdir=$(mktemp -d)
created=0
cleanup() {
    local rc=$?
    if ((rc != 0 && created)); then
        step "diagnostics (exit $rc)"
        k get pods -A -o wide || true
        k describe pods || true
        k get events --sort-by=.lastTimestamp || true
        on_node journalctl -u sidecar-shim --no-pager -n 300 || true
        on_node journalctl -u kubelet --no-pager -n 100 || true
    fi
    if ((created)); then
        if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
            echo "e2e: keeping cluster $cluster (kind delete cluster --name $cluster)" >&2
        else
            step "kind delete cluster --name $cluster"
            kind delete cluster --name "$cluster" || true
        fi
    fi
    rm -rf "$workdir"
    exit "$rc"
}
trap cleanup EXIT

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    step "cargo build --release"
    cargo build --release --locked
fi
[[ -x target/release/sidecar-shim ]] || fail "target/release/sidecar-shim missing"
for f in systemd/sidecar-shim.service systemd/config.toml systemd/kubelet.service.d/10-sidecar-shim.conf; do
    [[ -f $f ]] || fail "$f missing"
done

step "kind create cluster --name $cluster ($node_image)"
# kind.yaml's host paths are relative to the repository root; hand kind a
# copy with absolute ones.
sed "s|hostPath: \./|hostPath: $root/|" hack/kind/kind.yaml >"$workdir/kind.yaml"
created=1
kind create cluster --name "$cluster" --image "$node_image" \
    --config "$workdir/kind.yaml" --wait 180s

step "sidecar-shim unit in $node"
on_node systemctl daemon-reload
on_node systemctl enable sidecar-shim.service
on_node systemctl start sidecar-shim.service
on_node systemctl is-active --quiet sidecar-shim.service ||
    fail "sidecar-shim.service is not active"
on_node test -S "$socket" || fail "no socket at $socket"
kubelet_pid=$(on_node systemctl show -p MainPID --value kubelet.service)
kubelet_cmdline=$(on_node cat "/proc/$kubelet_pid/cmdline" | tr '\0' ' ')
[[ $kubelet_cmdline == *"--container-runtime-endpoint=unix://$socket"* ]] ||
    fail "kubelet does not use the shim: $kubelet_cmdline"
k wait --for=condition=Ready "node/$node" --timeout=120s

step "kind load docker-image $image"
docker pull --quiet "$image"
kind load docker-image "$image" --name "$cluster"

step "(a) Job with a sidecar completes"
k apply -f "$manifests/job.yaml"
k wait --for=condition=complete job/e2e-job --timeout=180s
grep -q "app: done" <<<"$(k logs job/e2e-job -c app)" || fail "Job app log lacks 'app: done'"

step "(b) app listed first reaches its sidecar on the first try"
k apply -f "$manifests/app-first.yaml"
k rollout status deployment/e2e-app-first --timeout=180s
pod=""
for _ in $(seq 60); do
    if grep -q "app: reached sidecar" <<<"$(k logs deployment/e2e-app-first -c app 2>/dev/null || true)"; then
        pod=$(k get pods -l app=e2e-app-first -o jsonpath='{.items[0].metadata.name}')
        break
    fi
    sleep 2
done
[[ -n $pod ]] || fail "app never logged 'app: reached sidecar'"
restarts=$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="app")].restartCount}')
[[ $restarts == 0 ]] || fail "app restarted $restarts times (expected 0)"

step "(c) on deletion the sidecar outlives the app and gets its final message"
on_node rm -f /var/tmp/sidecar-shim-e2e/sidecar.log
k apply -f "$manifests/shutdown.yaml"
k wait --for=condition=Ready pod/e2e-shutdown --timeout=180s
k delete pod e2e-shutdown --wait=true --timeout=120s
log=$(on_node cat /var/tmp/sidecar-shim-e2e/sidecar.log) || fail "no sidecar log on the node"
grep -q "url:/final-message" <<<"$log" || fail "sidecar never got the final message; its log: $log"

step "(d) sidecar-shim status on the node; the shim restarts and keeps its pods"
on_node sidecar-shim status || fail "sidecar-shim status: unhealthy or unreachable"
on_node systemctl restart sidecar-shim.service
on_node systemctl is-active --quiet sidecar-shim.service ||
    fail "sidecar-shim.service is not active after a restart"
status_json=""
for _ in $(seq 30); do
    if status_json=$(on_node sidecar-shim status --output json 2>/dev/null); then
        break
    fi
    sleep 1
done
grep -q "$pod" <<<"$status_json" ||
    fail "the restarted shim does not list $pod: $status_json"
restarts=$(k get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="app")].restartCount}')
[[ $restarts == 0 ]] || fail "app restarted $restarts times after the shim's restart"

step "clean up workloads"
k delete -f "$manifests/app-first.yaml" -f "$manifests/job.yaml" --wait=true --timeout=120s

echo "e2e: 4 passed, 0 failed" >&2
