#!/usr/bin/env bash
# The local node's containerd, run as a plain background process (the machine has no
# systemd as PID 1) with its own root, state and socket, so it never meets a system
# containerd. `make image` imports the image into it; the kubelet node runs pods on it.
#   hack/containerd.sh start     start it unless it answers already; prints the socket
#   hack/containerd.sh stop      stop the one started here (its pid file)
#   hack/containerd.sh status    exit 0 when it answers; prints the socket
#   hack/containerd.sh ctr ARGS  ctr against it, in the k8s.io namespace the kubelet uses
# Its directory: TELERAD_CONTAINERD_DIR, else ~/.cache/telerad/node/containerd.
set -euo pipefail
cache="${TELERAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telerad}"
dir="${TELERAD_CONTAINERD_DIR:-$cache/node/containerd}"
sock="$dir/containerd.sock"
pidfile="$dir/containerd.pid"

# A socket left by a killed containerd would make ctr wait its default 10 s to dial.
answers() { [[ -S $sock ]] && ctr --address "$sock" --connect-timeout 2s version >/dev/null 2>&1; }

write_config() {
  mkdir -p "$dir/cni"
  # restrict_oom_score_adj: this VM refuses a negative oom_score_adj even to root, and
  # runc then fails every container ("can't get final child's PID from pipe: EOF").
  # runc, not crun: crun refuses the host's hybrid cgroups. cgroupfs: no systemd here.
  cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$dir/cni"
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  BinaryName = "/usr/sbin/runc"
  SystemdCgroup = false
EOF
}

start() {
  if answers; then
    echo "$sock"
    return
  fi
  [[ $(id -u) -eq 0 ]] || { echo "containerd.sh: containerd needs root" >&2; exit 2; }
  command -v containerd >/dev/null || { echo "containerd.sh: no containerd (make debs)" >&2; exit 2; }
  write_config
  # setsid: the daemon outlives the make or pytest process that started it.
  setsid containerd --config "$dir/config.toml" >>"$dir/containerd.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  for _ in $(seq 100); do
    if answers; then
      echo "$sock"
      return
    fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || break
    sleep 0.2
  done
  echo "containerd.sh: containerd did not answer on $sock; its log:" >&2
  tail -20 "$dir/containerd.log" >&2
  exit 1
}

stop() {
  [[ -f $pidfile ]] || return 0
  pid="$(cat "$pidfile")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) answers && echo "$sock" ;;
  ctr) shift; start >/dev/null; exec ctr --address "$sock" --namespace k8s.io "$@" ;;
  *) echo "usage: hack/containerd.sh start|stop|status|ctr ARGS" >&2; exit 2 ;;
esac
