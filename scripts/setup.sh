#!/usr/bin/env bash
# Installs what spindrift's builds, tests and demo need on a fresh Debian machine (run as root).
# Idempotent: packages already present are skipped quickly.
set -euo pipefail

packages=(
  iproute2     # netlab: ip netns, veth, bridge, tc
  nftables     # netlab: random loss on links
  iperf3       # netlab: a third-party tool that must see the lab as a real network
  udpcast      # bench vs-udpcast: udp-sender/udp-receiver, the eager multicast baseline
  iputils-ping # netio: the AF_XDP lab test pings across a host whose XDP program is attached
)
# The AF_XDP backend needs no compiler, libbpf or libxdp: its XDP program is emitted as eBPF
# bytecode by netio/src/xdp/program.rs and loaded with the bpf(2) system call.

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: need root to install: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "setup: ok" >&2
