#!/usr/bin/env bash
# Install sidecar-shim on a node and point kubelet at it:
#   1. the binary              -> PREFIX/bin/sidecar-shim (PREFIX: /usr/local)
#   2. the config              -> /etc/sidecar-shim/config.toml (never overwritten)
#   3. the unit                -> /etc/systemd/system/sidecar-shim.service
#   4. systemctl daemon-reload; systemctl enable --now sidecar-shim
#   5. kubelet, whichever applies on the node:
#      - kubeadm-style (a kubelet.service.d/10-kubeadm.conf drop-in exists):
#        /etc/systemd/system/kubelet.service.d/10-sidecar-shim.conf, which
#        repeats that drop-in's ExecStart with the shim's endpoints last;
#      - otherwise, a KubeletConfiguration file (--kubelet-config, default
#        /var/lib/kubelet/config.yaml): containerRuntimeEndpoint and
#        imageServiceEndpoint set (previous values saved for uninstall.sh);
#      - neither: a warning saying what to set by hand.
#      Then systemctl restart kubelet.
# Idempotent: a second run finds every file in place and changes nothing
# (no reload, no restart). hack/uninstall.sh undoes it.
#
# Usage: hack/install.sh [--dry-run] [--binary PATH] [--prefix DIR] [--root DIR]
#                        [--kubelet-config FILE] [--no-kubelet]
#   --dry-run              print every action, change nothing
#   --binary PATH          the binary to install (default target/release/sidecar-shim)
#   --prefix DIR           install prefix of the binary (default /usr/local)
#   --root DIR             install into this directory tree instead of /
#                          (tests); systemctl is then only run when $SYSTEMCTL
#                          is set
#   --kubelet-config FILE  kubelet's config file, as seen on the node
#                          (default /var/lib/kubelet/config.yaml)
#   --no-kubelet           leave kubelet alone
# Environment: SYSTEMCTL  the systemctl command (default systemctl)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
endpoint=unix:///run/sidecar-shim/sidecar-shim.sock

dry=0
binary=$repo/target/release/sidecar-shim
prefix=/usr/local
root=/
kubelet_config=/var/lib/kubelet/config.yaml
kubelet=1

usage() { sed -n '/^# Usage:/,/^# Environment:/p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() {
    echo "install.sh: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --dry-run) dry=1 ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --root) root=${2:?--root needs a directory}; shift ;;
    --kubelet-config) kubelet_config=${2:?--kubelet-config needs a file}; shift ;;
    --no-kubelet) kubelet=0 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
    esac
    shift
done

[[ $prefix == /* ]] || die "--prefix must be absolute: $prefix"
[[ $kubelet_config == /* ]] || die "--kubelet-config must be absolute: $kubelet_config"
[[ -f $binary && -x $binary ]] || die "no executable at $binary (cargo build --release, or --binary PATH)"
root=${root%/}
if [[ -n $root ]]; then
    [[ -d $root ]] || die "--root $root is not a directory"
    root=$(cd "$root" && pwd)
    [[ $root == / ]] && root=""
fi

systemctl=()
if [[ -n ${SYSTEMCTL:-} ]]; then
    read -r -a systemctl <<<"$SYSTEMCTL"
elif [[ -z $root ]]; then
    systemctl=(systemctl)
fi

# Paths on the node (as kubelet and systemd see them) and in the tree we write.
bin_node=$prefix/bin/sidecar-shim
bin=$root$bin_node
conf=$root/etc/sidecar-shim/config.toml
unit=$root/etc/systemd/system/sidecar-shim.service
dropin=$root/etc/systemd/system/kubelet.service.d/10-sidecar-shim.conf
state=$root/var/lib/sidecar-shim
kubelet_saved=$state/kubelet-config.orig

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

note() { printf 'install.sh: %s\n' "$*"; }
# Print an action; run it unless --dry-run.
act() {
    printf '+ %s\n' "$*"
    if ((!dry)); then "$@"; fi
}
# sc ARGS: a systemctl action (skipped when there is no systemctl to run).
sc() {
    if ((${#systemctl[@]} == 0)); then
        printf '+ (skipped: no systemctl under --root) systemctl %s\n' "$*"
        return 0
    fi
    act "${systemctl[@]}" "$@"
}
# sc_query ARGS: a read-only systemctl query (also run in --dry-run);
# false when there is no systemctl.
sc_query() {
    ((${#systemctl[@]} > 0)) && "${systemctl[@]}" "$@" >/dev/null 2>&1
}
# put SRC DEST MODE: install SRC as DEST unless DEST already has that content
# and mode. Returns 0 when it changed something.
put() {
    local src=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$src" "$dest" && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
        note "unchanged: $dest"
        return 1
    fi
    act install -D -m "$mode" "$src" "$dest"
}

shim_changed=0
units_changed=0

# 1. binary
put "$binary" "$bin" 0755 && shim_changed=1

# 2. config: never overwrite an admin's file.
if [[ -e $conf ]]; then
    note "kept existing config: $conf"
else
    act install -D -m 0644 "$repo/systemd/config.toml" "$conf"
    shim_changed=1
fi

# 3. unit, with ExecStart following --prefix.
sed "s#/usr/local/bin/sidecar-shim#$bin_node#" "$repo/systemd/sidecar-shim.service" >"$tmp/unit"
if put "$tmp/unit" "$unit" 0644; then
    shim_changed=1
    units_changed=1
fi

# 5a. kubelet: work out what to change (applied after the shim runs).
kubelet_changed=0
kubelet_mode=none
kubeadm_dropin=""
if ((kubelet)); then
    for d in /etc/systemd/system /usr/lib/systemd/system /lib/systemd/system; do
        if [[ -f $root$d/kubelet.service.d/10-kubeadm.conf ]]; then
            kubeadm_dropin=$root$d/kubelet.service.d/10-kubeadm.conf
            break
        fi
    done
    if [[ -n $kubeadm_dropin ]]; then
        kubelet_mode=dropin
        # kubeadm's command line: its last non-empty ExecStart=.
        exec_line=$(sed -n 's/^[[:space:]]*ExecStart=\(..*\)$/\1/p' "$kubeadm_dropin" | tail -n 1)
        [[ -n $exec_line ]] || die "no ExecStart= in $kubeadm_dropin"
        # Our own flags are appended last; drop them if kubeadm's line already has them.
        exec_line=$(sed "s# --container-runtime-endpoint=$endpoint##; s# --image-service-endpoint=$endpoint##" <<<"$exec_line")
        awk -v line="$exec_line --container-runtime-endpoint=$endpoint --image-service-endpoint=$endpoint" \
            '/^ExecStart=./ { print "ExecStart=" line; next } { print }' \
            "$repo/systemd/kubelet.service.d/10-sidecar-shim.conf" >"$tmp/dropin"
    elif [[ -f $root$kubelet_config ]]; then
        kubelet_mode=config
    else
        note "WARNING: no kubeadm kubelet drop-in and no $kubelet_config: point kubelet at $endpoint yourself" \
            "(--container-runtime-endpoint and --image-service-endpoint, or systemd/kubelet-config-snippet.yaml)"
    fi
fi

# set_yaml_key FILE KEY VALUE: set a top-level "KEY: VALUE" line (appended if absent).
set_yaml_key() {
    local file=$1 key=$2 value=$3
    if grep -q "^$key:" "$file"; then
        sed -i "s#^$key:.*#$key: $value#" "$file"
    else
        printf '%s: %s\n' "$key" "$value" >>"$file"
    fi
}

# 4. systemd picks up the unit; the shim runs before kubelet is switched.
if ((units_changed)); then
    sc daemon-reload
fi
if ((shim_changed)) && sc_query is-active sidecar-shim.service; then
    sc restart sidecar-shim.service
fi
if ! sc_query is-enabled sidecar-shim.service || ! sc_query is-active sidecar-shim.service; then
    sc enable --now sidecar-shim.service
fi

# 5b. kubelet
case $kubelet_mode in
dropin)
    if put "$tmp/dropin" "$dropin" 0644; then
        kubelet_changed=1
        sc daemon-reload
    fi
    ;;
config)
    file=$root$kubelet_config
    cp "$file" "$tmp/kubelet.yaml"
    set_yaml_key "$tmp/kubelet.yaml" containerRuntimeEndpoint "$endpoint"
    set_yaml_key "$tmp/kubelet.yaml" imageServiceEndpoint "$endpoint"
    if cmp -s "$file" "$tmp/kubelet.yaml"; then
        note "unchanged: $file"
    else
        if [[ ! -e $kubelet_saved ]]; then
            # The lines we replace, for uninstall.sh ("KEY:" alone: was absent).
            for key in containerRuntimeEndpoint imageServiceEndpoint; do
                grep -m 1 "^$key:" "$file" || printf '%s:\n' "$key"
            done >"$tmp/saved"
            act install -D -m 0600 "$tmp/saved" "$kubelet_saved"
        fi
        act cp "$tmp/kubelet.yaml" "$file"
        kubelet_changed=1
    fi
    ;;
esac
if ((kubelet_changed)); then
    sc restart kubelet.service
fi

if ((dry)); then
    note "dry run: nothing was changed"
elif ((shim_changed || kubelet_changed)); then
    note "installed; kubelet: $kubelet_mode"
else
    note "nothing to change"
fi
