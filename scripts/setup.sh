#!/usr/bin/env bash
# Installs what conn-tracer needs on a Debian 12 host, as root; safe to run again.
#   scripts/setup.sh          runtime: bcc, libbpf, a header tree bcc accepts, .venv
#   scripts/setup.sh --test   plus what the tests and benchmarks use
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (apt-get, /lib/modules links, BPF)" >&2
    exit 1
fi

kernel=$(uname -r)
build="/lib/modules/$kernel/build"

pkgs=(python3 python3-venv python3-bpfcc libbpfcc libbpf1 bpftool iproute2 make)
# A C compiler and Python headers build the optional hot-path helpers (app/_speedups.c).
pkgs+=(gcc python3-dev)
# bcc insists on a kernel header tree. Only when the host has none for its kernel do
# we add Debian's generic headers; tracer.c takes no struct layout from them.
[ -e "$build" ] || pkgs+=(linux-headers-amd64)
if [ "$want_test" -eq 1 ]; then
    pkgs+=(chromium bpfcc-tools iperf3 procps nftables)
    # The fleet tests start a real NATS JetStream server (nats-server -js) of their own.
    pkgs+=(nats-server)
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e "$build" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$hdr" ]; then
        echo "setup: no kernel header tree found under /usr/src; install linux-headers-amd64" >&2
        exit 1
    fi
    common="${hdr%-amd64}-common"
    mkdir -p "/lib/modules/$kernel"
    ln -s "$hdr" "$build"
    [ -e "/lib/modules/$kernel/source" ] || ln -s "$common" "/lib/modules/$kernel/source"
    echo "setup: no headers for kernel $kernel; linked $build -> $hdr and source -> $common (for bcc only)"
fi

# Debian's python3 with system site packages: bcc is not on PyPI.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
extra=""
[ "$want_test" -eq 1 ] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}"
echo "setup: done (.venv ready; try: .venv/bin/conn-tracer check)"
