#!/usr/bin/env bash
# Undo hack/install.sh:
#   1. kubelet back to containerd: remove the kubelet drop-in, or put the
#      KubeletConfiguration's previous endpoint lines back; restart kubelet
#   2. systemctl disable --now sidecar-shim
#   3. remove the unit (daemon-reload), the binary, and the config when it is
#      still the shipped default (an edited one is kept; --purge removes it)
#   4. with --purge only: the state directory /var/lib/sidecar-shim
# Idempotent: a second run finds nothing to remove.
#
# Usage: hack/uninstall.sh [--dry-run] [--purge] [--prefix DIR] [--root DIR]
#                          [--kubelet-config FILE]
#   --dry-run              print every action, change nothing
#   --purge                also remove an edited config and the state directory
#   --prefix DIR           install prefix used at install time (default /usr/local)
#   --root DIR             uninstall from this directory tree instead of /
#                          (tests); systemctl is then only run when $SYSTEMCTL
#                          is set
#   --kubelet-config FILE  kubelet's config file (default /var/lib/kubelet/config.yaml)
# Environment: SYSTEMCTL  the systemctl command (default systemctl)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

dry=0
purge=0
prefix=/usr/local
root=/
kubelet_config=/var/lib/kubelet/config.yaml

usage() { sed -n '/^# Usage:/,/^# Environment:/p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() {
    echo "uninstall.sh: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --dry-run) dry=1 ;;
    --purge) purge=1 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --root) root=${2:?--root needs a directory}; shift ;;
    --kubelet-config) kubelet_config=${2:?--kubelet-config needs a file}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument: $1" ;;
    esac
    shift
done

[[ $prefix == /* ]] || die "--prefix must be absolute: $prefix"
[[ $kubelet_config == /* ]] || die "--kubelet-config must be absolute: $kubelet_config"
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

bin=$root$prefix/bin/sidecar-shim
conf=$root/etc/sidecar-shim/config.toml
unit=$root/etc/systemd/system/sidecar-shim.service
dropin=$root/etc/systemd/system/kubelet.service.d/10-sidecar-shim.conf
state=$root/var/lib/sidecar-shim
kubelet_saved=$state/kubelet-config.orig

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

note() { printf 'uninstall.sh: %s\n' "$*"; }
act() {
    printf '+ %s\n' "$*"
    if ((!dry)); then "$@"; fi
}
sc() {
    if ((${#systemctl[@]} == 0)); then
        printf '+ (skipped: no systemctl under --root) systemctl %s\n' "$*"
        return 0
    fi
    act "${systemctl[@]}" "$@"
}
sc_query() {
    ((${#systemctl[@]} > 0)) && "${systemctl[@]}" "$@" >/dev/null 2>&1
}
# remove PATH: rm -f when it exists. Returns 0 when it removed something.
remove() {
    [[ -e $1 || -L $1 ]] || return 1
    act rm -f "$1"
}

changed=0

# 1. kubelet back to containerd (before the shim goes away).
kubelet_changed=0
if remove "$dropin"; then
    kubelet_changed=1
    sc daemon-reload
    d=$(dirname "$dropin")
    if ((!dry)) && [[ -d $d && -z $(ls -A "$d") ]]; then
        act rmdir "$d"
    fi
fi
if [[ -f $kubelet_saved ]]; then
    file=$root$kubelet_config
    if [[ -f $file ]]; then
        cp "$file" "$tmp/kubelet.yaml"
        while IFS= read -r line; do
            key=${line%%:*}
            if [[ $line == "$key:" ]]; then
                sed -i "/^$key:/d" "$tmp/kubelet.yaml"
            else
                # The saved line may hold any character but a newline: let awk place it.
                awk -v key="$key" -v line="$line" 'index($0, key ":") == 1 { print line; next } { print }' \
                    "$tmp/kubelet.yaml" >"$tmp/next" && mv "$tmp/next" "$tmp/kubelet.yaml"
            fi
        done <"$kubelet_saved"
        if ! cmp -s "$file" "$tmp/kubelet.yaml"; then
            act cp "$tmp/kubelet.yaml" "$file"
            kubelet_changed=1
        fi
    fi
    remove "$kubelet_saved" || true
fi
if ((kubelet_changed)); then
    changed=1
    sc restart kubelet.service
fi

# 2. stop the shim.
if [[ -e $unit ]] || sc_query is-enabled sidecar-shim.service || sc_query is-active sidecar-shim.service; then
    sc disable --now sidecar-shim.service
    changed=1
fi

# 3. files
if remove "$unit"; then
    changed=1
    sc daemon-reload
fi
remove "$bin" && changed=1
if [[ -e $conf ]]; then
    if ((purge)) || cmp -s "$conf" "$repo/systemd/config.toml"; then
        remove "$conf" && changed=1
    else
        note "kept edited config $conf (--purge removes it)"
    fi
fi
if [[ -d $(dirname "$conf") ]] && [[ -z $(ls -A "$(dirname "$conf")") ]]; then
    act rmdir "$(dirname "$conf")"
    changed=1
fi

# 4. state
if ((purge)) && [[ -d $state ]]; then
    act rm -rf "$state"
    changed=1
fi

if ((dry)); then
    note "dry run: nothing was changed"
elif ((changed)); then
    note "uninstalled"
else
    note "nothing to remove"
fi
