#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for `equibench run ... --executor submitit` and
# tests/test_slurm.py (idempotent; needs root for apt-get and the daemons).
#
#   scripts/slurm-local.sh          install slurm-wlm + munge (Debian) if missing, write
#                                   /etc/slurm/slurm.conf for this host, start munged, slurmctld
#                                   and slurmd, wait until `sinfo` shows the node idle
#   scripts/slurm-local.sh stop     stop the daemons this script started (by their pid files)
#   scripts/slurm-local.sh status   exit 0 when the cluster answers and the node is up
#   scripts/slurm-local.sh scrontab build Slurm's `scrontab` client, which Debian's slurm-client 22.05
#                                   does not ship (slurmctld supports it), from Debian's source of the
#                                   installed version (apt-get source; gcc; ~30 s) into /usr/local/bin
#   scripts/slurm-local.sh cron     install (apt-get) and start Debian's cron, for crontab entries
#
# The cluster: one partition `debug` (default) with this host's cores and memory (`slurmd -C`),
# select/cons_tres with CR_Core_Memory (jobs ask for cores and memory, DefMemPerCPU = memory per
# core), no accounting database (no sacct), ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
# (no cgroups: a job's memory limit is enforced by jobacct_gather/linux sampling every second with
# JobAcctGatherParams=OverMemoryKill, and by equibench's own watcher), scrontab enabled.
# State, logs and pid files: $EQUIBENCH_SLURM_DIR (default /var/tmp/equibench-slurm); ports
# $EQUIBENCH_SLURMCTLD_PORT (6817) and $EQUIBENCH_SLURMD_PORT (6818). An /etc/slurm/slurm.conf
# this script did not write (a real cluster's) is never touched.
# Anything that cannot start prints one line `[slurm-local] error: ...` and exits non-zero.
set -euo pipefail

STATE=${EQUIBENCH_SLURM_DIR:-/var/tmp/equibench-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
CTLD_PORT=${EQUIBENCH_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${EQUIBENCH_SLURMD_PORT:-6818}
MARK="# written by equibench scripts/slurm-local.sh"
HOST=$(hostname -s)

say() { echo "[slurm-local] $*" >&2; }
die() { echo "[slurm-local] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the pid in it is a running process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local pid
  if alive "$2"; then
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

apt_source() {  # apt_source DIR PACKAGE=VERSION: download and unpack a Debian source package into DIR/src
  local dir=$1 pkg=$2 opts
  mkdir -p "$dir/lists/partial"
  # deb-src lines of their own (the machine's sources.list is left alone)
  printf 'deb-src http://deb.debian.org/debian %s main\ndeb-src http://deb.debian.org/debian-security %s-security main\n' \
    "$(. /etc/os-release && echo "$VERSION_CODENAME")" "$(. /etc/os-release && echo "$VERSION_CODENAME")" >"$dir/src.list"
  opts=(-o "Dir::Etc::SourceList=$dir/src.list" -o Dir::Etc::SourceParts=/nonexistent -o "Dir::State::Lists=$dir/lists")
  apt-get "${opts[@]}" update -qq >"$dir/apt.log" 2>&1 || die "apt-get update (deb-src) failed: $(tail -1 "$dir/apt.log")"
  (cd "$dir" && apt-get "${opts[@]}" source --download-only "$pkg" >>"$dir/apt.log" 2>&1) \
    || die "apt-get source $pkg failed: $(tail -1 "$dir/apt.log")"
  rm -rf "$dir/src"
  dpkg-source -x "$dir"/*.dsc "$dir/src" >>"$dir/apt.log" 2>&1 || die "dpkg-source could not unpack $pkg"
}

cmd_scrontab() {
  if command -v scrontab >/dev/null 2>&1; then echo "[slurm-local] scrontab: $(command -v scrontab)"; return 0; fi
  [ "$(id -u)" -eq 0 ] || die "building scrontab needs root (apt-get, /usr/local/bin)"
  command -v slurmctld >/dev/null 2>&1 || die "Slurm is not installed: run scripts/slurm-local.sh first"
  local missing=() version dir lib
  for c in gcc ld objcopy dpkg-source; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing gcc, binutils, dpkg-dev (apt-get) to build scrontab"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev binutils dpkg-dev \
      >"$STATE/apt-build.log" 2>&1 || die "apt-get install gcc binutils dpkg-dev failed: $(tail -1 "$STATE/apt-build.log")"
  fi
  version=$(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null) || die "slurm-client is not installed"
  dir="$STATE/scrontab-build"
  rm -rf "$dir"
  say "building scrontab from Debian's source of slurm-wlm $version"
  apt_source "$dir" "slurm-wlm=$version"
  (cd "$dir/src" && ./configure --prefix=/usr --sysconfdir=/etc/slurm --without-munge >"$dir/configure.log" 2>&1) \
    || die "configure failed: $(tail -1 "$dir/configure.log")"
  lib=/usr/lib/x86_64-linux-gnu/slurm-wlm
  [ -e "$lib/libslurmfull.so" ] || lib=$(dirname "$(find /usr/lib -name libslurmfull.so 2>/dev/null | head -1)")
  (
    cd "$dir/src/src/scrontab"
    for f in default_crontab usage; do  # the texts scrontab prints, linked in as data (as upstream's make does)
      ld -r -o "$f.bino" -z noexecstack --format=binary "$f.txt"
      objcopy --rename-section .data=.rodata,alloc,load,readonly,data,contents "$f.bino"
    done
    gcc -O2 -DHAVE_CONFIG_H -I../.. -I../../slurm -c env.c opt.c parse.c scrontab.c
    gcc -o scrontab env.o opt.o parse.o scrontab.o default_crontab.bino usage.bino -L"$lib" -lslurmfull \
      -Wl,-rpath="$lib" -lpthread -ldl
  ) >"$dir/build.log" 2>&1 || die "compiling scrontab failed: $(grep -m1 -i error "$dir/build.log" || tail -1 "$dir/build.log")"
  install -m 0755 "$dir/src/src/scrontab/scrontab" /usr/local/bin/scrontab
  rm -rf "$dir"
  echo "[slurm-local] scrontab: /usr/local/bin/scrontab (slurm-wlm $version)"
}

cmd_cron() {
  if ! command -v cron >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || die "cron is missing; installing it needs root"
    say "installing cron (apt-get)"
    mkdir -p "$STATE"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cron; } \
        >"$STATE/apt-cron.log" 2>&1; then
      die "apt-get install cron failed: $(grep -v '^\s*$' "$STATE/apt-cron.log" | tail -1)"
    fi
  fi
  if alive /run/crond.pid; then echo "[slurm-local] cron is running (pid $(cat /run/crond.pid))"; return 0; fi
  local out
  out=$(/usr/sbin/cron 2>&1) || die "cron could not start: $(echo "$out" | tail -1)"
  for _ in $(seq 25); do alive /run/crond.pid && break; sleep 0.2; done
  alive /run/crond.pid || die "cron exited at start"
  mkdir -p "$STATE" && cp /run/crond.pid "$STATE/cron.pid"
  echo "[slurm-local] cron started (pid $(cat /run/crond.pid))"
}

cmd_stop() {
  stop_pidfile cron "$STATE/cron.pid"
  stop_pidfile slurmd "$STATE/slurmd.pid"
  stop_pidfile slurmctld "$STATE/slurmctld.pid"
  stop_pidfile munged "$STATE/munged.pid"
}

node_state() {  # the node's state as sinfo reports it ("" when the controller does not answer)
  timeout 10 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -1 || true
}

cmd_status() {
  local st
  st=$(node_state)
  case "$st" in
    idle|mixed|allocated|completing) echo "[slurm-local] up: node $HOST $st"; return 0 ;;
    "") echo "[slurm-local] down: slurmctld does not answer" >&2; return 1 ;;
    *) echo "[slurm-local] node $HOST is $st" >&2; return 1 ;;
  esac
}

install_packages() {
  local missing=()
  for c in sbatch slurmctld slurmd munged; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; installing slurm-wlm and munge needs root"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install slurm-wlm and munge"
  say "installing slurm-wlm and munge (apt-get)"
  local log="$STATE/apt.log"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge; } >"$log" 2>&1; then
    die "apt-get install slurm-wlm munge failed: $(grep -v '^\s*$' "$log" | tail -1)"
  fi
}

port_owner() {  # port_owner PORT: the process listening on it ("" when free)
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -1 \
    | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/\1 (pid \2)/' || true
}

check_port() {  # check_port PORT DAEMON PIDFILE: free, or held by our own daemon
  local owner
  owner=$(port_owner "$1")
  [ -z "$owner" ] && return 0
  if alive "$3" && [[ "$owner" == *"pid $(cat "$3"))"* ]]; then return 0; fi
  die "port $1 needed by $2 is taken by $owner (set EQUIBENCH_SLURMCTLD_PORT / EQUIBENCH_SLURMD_PORT)"
}

start_munge() {
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    say "no munge key: creating $key"
    mkdir -p /etc/munge
    mungekey --create --keyfile="$key" >/dev/null 2>&1 || die "munge key $key missing and mungekey could not create it"
    chown munge:munge "$key" && chmod 0400 "$key"
  fi
  if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  # munged refuses a key, folder or socket it does not own; start it as its own user
  local out
  if ! out=$(runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 2>&1); then
    die "munged could not start: $(echo "$out" | tail -1)"
  fi
  cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
  for _ in $(seq 25); do
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_conf() {
  local node cpus mem per_cpu tmp
  node=$(slurmd -C | head -1) || die "slurmd -C could not describe this node"
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read CPUs / RealMemory from slurmd -C: $node"
  per_cpu=$(( mem / cpus ))
  if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script (a real cluster?); not touching it"
  fi
  mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d"
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARK
ClusterName=equibench
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$per_cpu
MaxArraySize=10001
MaxJobCount=100000
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmdTimeout=300
ReturnToService=2
ScronParameters=enable
MpiDefault=none
MailProg=/bin/true
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 1; fi
  install -m 0644 "$tmp" "$CONF"
  rm -f "$tmp"
  say "wrote $CONF ($HOST: $cpus CPUs, $mem MB, partition debug)"
  return 0
}

start_daemon() {  # start_daemon NAME PIDFILE LOG PORT
  local out
  alive "$2" && return 0
  check_port "$4" "$1" "$2"
  if ! out=$("/usr/sbin/$1" 2>&1); then
    die "$1 could not start: $(echo "$out" | tail -1) (log: $3)"
  fi
  for _ in $(seq 50); do alive "$2" && return 0; sleep 0.2; done
  die "$1 exited at start: $(grep -i 'error\|fatal' "$3" 2>/dev/null | tail -1) (log: $3)"
}

cmd_start() {
  mkdir -p "$STATE"
  install_packages
  [ "$(id -u)" -eq 0 ] || die "starting slurmctld and slurmd as configured here needs root"
  start_munge
  if write_conf && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; }; then
    say "configuration changed: restarting slurmctld and slurmd"
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
  fi
  start_daemon slurmctld "$STATE/slurmctld.pid" "$STATE/slurmctld.log" "$CTLD_PORT"
  start_daemon slurmd "$STATE/slurmd.pid" "$STATE/slurmd.log" "$SLURMD_PORT"
  local st=""
  for _ in $(seq 120); do
    st=$(node_state)
    case "$st" in
      idle|mixed|allocated|completing) echo "[slurm-local] up: node $HOST $st (partition debug; $CONF)"; return 0 ;;
      down*|drain*|drained*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $HOST not idle after 60 s (state: ${st:-no answer from slurmctld}; logs in $STATE)"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  cron) cmd_cron ;;
  scrontab) cmd_scrontab ;;
  *) die "unknown subcommand ${1} (start, stop, status, scrontab, cron)" ;;
esac
