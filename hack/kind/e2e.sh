#!/usr/bin/env bash
# End-to-end tests in a kind cluster whose kubelet talks to sidecar-shim.
#
# Needs docker, kind, kubectl and cargo (with protoc); pulls busybox. Steps:
#   1. cargo build --release
#   2. kind create cluster with hack/kind/kind.yaml (the shim runs as the
#      systemd unit systemd/sidecar-shim.service inside the node)
#   3. make sure the unit is enabled and active, and that kubelet uses it
#   4. tag busybox as the image the manifests name
#      (localhost/sidecar-shim/busybox:test) and kind load it
#   5. apply the manifests tests/e2e_cluster.rs uses (hack/cluster-manifests/)
#      and check each outcome (with timeouts), from the API and from what the
#      containers record on the node (/var/log/sidecar-shim-e2e/POD_UID/):
#        sidecar-demo.yaml   the Job with a sidecar completes, its app reached
#                            the proxy on its first attempt
#        job-fails.yaml      the Job whose main exits 3 fails, its proxy
#                            stopped after main
#        app-first.yaml,     the app, listed before or after its slow
#        sidecar-first.yaml  sidecar, reaches it on its first try
#                            (restartCount 0)
#        init-containers.yaml  init containers first, in order, once each
#        shutdown.yaml       on deletion the app's last message reaches the
#                            proxy, whose exec preStop runs after the app
#                            exited
#        deployment.yaml     10 replicas rolled out to a new version and
#                            rolled back, no container restarted
#        deferred-app.yaml   the shim restarted (systemctl) while an app's
#                            start is deferred: the new shim lists the pod,
#                            the app starts once its proxy is ready and
#                            reaches it first time, nothing restarted
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
# The image the manifests name (hack/build-images makes it for hack/cluster).
test_image=localhost/sidecar-shim/busybox:test
socket=/run/sidecar-shim/sidecar-shim.sock
manifests=hack/cluster-manifests

step() { printf '\n==> %s\n' "$*" >&2; }
fail() {
    echo "e2e: FAIL: $*" >&2
    exit 1
}
k() { kubectl --context "$context" "$@"; }
on_node() { docker exec "$node" "$@"; }

# uid POD: the pod's uid (its record directory's name).
uid() { k get pod "$1" -o jsonpath='{.metadata.uid}'; }
# record UID CONTAINER: what the container recorded ("UPTIME EVENT" lines).
record() { on_node cat "/var/log/sidecar-shim-e2e/$1/$2" 2>/dev/null || true; }
# event_at UID CONTAINER EVENT: when the container first recorded EVENT.
event_at() { record "$1" "$2" | awk -v e="$3" '$2 == e { print $1; exit }'; }
# wait_event UID CONTAINER EVENT [FAIL_EVENT]: until the container records
# EVENT (fail at once if it records FAIL_EVENT), at most 180 s.
wait_event() {
    local i
    for ((i = 0; i < 900; i++)); do
        [[ -n $(event_at "$1" "$2" "$3") ]] && return 0
        if [[ -n ${4:-} && -n $(event_at "$1" "$2" "$4") ]]; then
            fail "pod $1: $2 recorded $4: $(record "$1" "$2")"
        fi
        sleep 0.2
    done
    fail "pod $1: $2 never recorded $3: $(record "$1" "$2")"
}
# before A B: the time A is not after B.
before() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && b != "" && a <= b) }'; }
# restarts POD: the pod's containers' restart counts, summed.
restarts() {
    k get pod "$1" -o jsonpath='{range .status.containerStatuses[*]}{.restartCount}{"\n"}{end}' |
        awk '{ n += $1 } END { print n + 0 }'
}

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

step "kind load docker-image $test_image (busybox $image)"
docker pull --quiet "$image"
docker tag "$image" "$test_image"
kind load docker-image "$test_image" --name "$cluster"

step "(a) Jobs: one completes, one whose main fails fails; both stop their proxy"
k apply -f "$manifests/sidecar-demo.yaml" -f "$manifests/job-fails.yaml"
k wait --for=condition=complete job/sidecar-demo --timeout=180s
grep -q "app: reached the proxy on attempt 1" <<<"$(k logs job/sidecar-demo -c app)" ||
    fail "the demo Job's app did not reach its proxy on the first attempt"
k wait --for=condition=failed job/sidecar-job-fails --timeout=180s
pod=$(k get pods -l job-name=sidecar-job-fails -o jsonpath='{.items[0].metadata.name}')
u=$(uid "$pod")
wait_event "$u" proxy sigterm
before "$(event_at "$u" main exit)" "$(event_at "$u" proxy sigterm)" ||
    fail "the failed Job's proxy got SIGTERM before main exited: $(record "$u" main) / $(record "$u" proxy)"

step "(b) the app, listed before or after its slow sidecar, reaches it on its first try"
k apply -f "$manifests/app-first.yaml" -f "$manifests/sidecar-first.yaml"
for pod in app-first sidecar-first; do
    k wait --for=condition=Ready "pod/$pod" --timeout=180s
    wait_event "$(uid "$pod")" app connected refused
    [[ $(restarts "$pod") == 0 ]] || fail "$pod: containers restarted"
done

step "(c) init containers run first, in order, once each"
k apply -f "$manifests/init-containers.yaml"
k wait --for=condition=Ready pod/init-order --timeout=180s
u=$(uid init-order)
wait_event "$u" app connected refused
if ! before "$(event_at "$u" init-a end)" "$(event_at "$u" init-b start)" ||
    ! before "$(event_at "$u" init-b end)" "$(event_at "$u" proxy start)"; then
    fail "init containers out of order: $(record "$u" init-a) / $(record "$u" init-b) / $(record "$u" proxy)"
fi
for c in init-a init-b; do
    [[ $(record "$u" "$c" | grep -c ' start$') == 1 ]] || fail "$c did not start exactly once"
done

step "(d) on deletion the app's last message reaches the proxy, whose preStop runs after the app"
k apply -f "$manifests/shutdown.yaml"
k wait --for=condition=Ready pod/shutdown --timeout=180s
u=$(uid shutdown)
wait_event "$u" app start
k delete pod shutdown --wait=true --timeout=120s
[[ -n $(event_at "$u" app sent) ]] || fail "the app's last message was not sent: $(record "$u" app)"
grep -q "url:/last-message" <<<"$(record "$u" proxy.log)" ||
    fail "the proxy never got the last message; its log: $(record "$u" proxy.log)"
before "$(event_at "$u" app exit)" "$(event_at "$u" proxy prestop)" ||
    fail "the proxy's preStop ran before the app exited: $(record "$u" app) / $(record "$u" proxy)"

step "(e) a 10-replica Deployment rolled out and rolled back"
k apply -f "$manifests/deployment.yaml"
k rollout status deployment/web --timeout=300s
k set env deployment/web -c app VERSION=2
k rollout status deployment/web --timeout=300s
k rollout undo deployment/web
k rollout status deployment/web --timeout=300s
for pod in $(k get pods -l app=web -o jsonpath='{.items[*].metadata.name}'); do
    [[ $(restarts "$pod") == 0 ]] || fail "$pod: containers restarted"
done

step "(f) the shim restarted while an app's start is deferred"
on_node sidecar-shim status || fail "sidecar-shim status: unhealthy or unreachable"
k apply -f "$manifests/deferred-app.yaml"
u=""
for _ in $(seq 90); do
    u=$(uid deferred-app)
    if [[ -n $u && -n $(event_at "$u" proxy start) ]] &&
        [[ $(k get pod deferred-app -o jsonpath='{.status.containerStatuses[?(@.name=="app")].state.running}') ]]; then
        break
    fi
    sleep 2
done
[[ -z $(record "$u" app) ]] || fail "the deferred app ran before its proxy was ready: $(record "$u" app)"
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
grep -q deferred-app <<<"$status_json" ||
    fail "the restarted shim does not list deferred-app: $status_json"
k exec deferred-app -c proxy -- touch /tmp/go
wait_event "$u" app connected refused
for pod in deferred-app app-first sidecar-first; do
    [[ $(restarts "$pod") == 0 ]] || fail "$pod: containers restarted after the shim's restart"
done

step "clean up workloads"
k delete -f "$manifests/" --ignore-not-found --wait=true --timeout=180s

echo "e2e: 6 passed, 0 failed" >&2
