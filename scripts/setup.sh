#!/usr/bin/env bash
# Installs what spindrift's builds, tests and demo need on a fresh Debian machine (run as root).
# Idempotent: packages already present are skipped quickly, huge pages already reserved are kept.
set -euo pipefail

packages=(
  iproute2     # netlab: ip netns, veth, bridge, tc
  nftables     # netlab: random loss on links
  iperf3       # netlab: a third-party tool that must see the lab as a real network
  udpcast      # bench vs-udpcast: udp-sender/udp-receiver, the eager multicast baseline
  uftp         # bench line-rate: uftp/uftpd, the paced NAK-based multicast baseline
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

# Huge pages: client/tests/faults.rs (huge_page_regions_are_served_whole) maps two 2 MiB hugetlbfs
# pages. Keep at least $huge_free_wanted of them free, raising vm.nr_hugepages (2 MiB pages) by what is
# missing; a machine that already has enough is left alone. Without root this only says what to run.
huge_free_wanted=8
huge_dir=/sys/kernel/mm/hugepages/hugepages-2048kB
if [[ ! -r $huge_dir/nr_hugepages ]]; then
  echo "setup: this kernel offers no 2 MiB huge pages ($huge_dir is missing): the huge-page test cannot run" >&2
else
  huge_total=$(<"$huge_dir/nr_hugepages")
  huge_free=$(<"$huge_dir/free_hugepages")
  if ((huge_free >= huge_free_wanted)); then
    echo "setup: huge pages: $huge_free of $huge_total 2 MiB pages free (want $huge_free_wanted), nothing to do" >&2
  else
    huge_target=$((huge_total + huge_free_wanted - huge_free))
    if [[ $(id -u) -ne 0 ]]; then
      echo "setup: not root, so not reserving huge pages: $huge_free of $huge_total 2 MiB pages free; the huge-page" \
        "test needs 2 (run: sudo sysctl -w vm.nr_hugepages=$huge_target)" >&2
    elif ! echo "$huge_target" 2>/dev/null >"$huge_dir/nr_hugepages"; then
      echo "setup: could not raise the 2 MiB huge pages to $huge_target ($huge_dir/nr_hugepages is not writable)" >&2
    else
      huge_now=$(<"$huge_dir/nr_hugepages")
      huge_free_now=$(<"$huge_dir/free_hugepages")
      echo "setup: huge pages: raised the 2 MiB pages from $huge_total to $huge_now (asked $huge_target):" \
        "$huge_free_now free (want $huge_free_wanted)" >&2
      if ((huge_free_now < 2)); then
        echo "setup: warning: the kernel found memory for only $huge_free_now free 2 MiB pages: the huge-page test" \
          "needs 2 (free some memory, or reserve them at boot with hugepages=8)" >&2
      fi
    fi
  fi
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "setup: ok" >&2
