#!/usr/bin/env bash
# Start a real, local Slurm 22.05 cluster (Debian/Ubuntu) for the project's Slurm path:
# one slurmctld plus N emulated compute nodes (one `slurmd -N nodeI` each, all on this machine),
# with fake GPUs (gres gpu backed by /dev/null symlinks) so jobs see CUDA_VISIBLE_DEVICES.
#
#   tests/slurm/start.sh          # install if missing, (re)configure, start, wait until idle
#   tests/slurm/stop.sh [--purge] # stop the daemons; --purge also removes state dir and config
#
# Idempotent: a second run with the same settings leaves running daemons alone (jobs survive),
# starts whatever is missing and resumes drained/down nodes. Changed settings rewrite the config
# and restart slurmctld/slurmd (running jobs' steps keep running, like a real slurmd restart).
#
# Environment:
#   SCALING_SLURM_DIR      state dir (logs, spool, pid files, job completion file) [/tmp/scaling-slurm]
#   SCALING_SLURM_NODES    emulated nodes node1..nodeN                            [2]
#   SCALING_SLURM_CPUS     CPUs per emulated node (oversubscribing real cores is fine) [2]
#   SCALING_SLURM_GPUS     fake GPUs per node (0: no gres)                        [4]
#   SCALING_SLURM_TIMEOUT  seconds to wait for the nodes to become idle           [90]
#   SCALING_SLURM_NETNS    auto|1|0: each node in its own network namespace with its own
#                          address (10.78.0.1I on bridge scalbr0, slurmctld at 10.78.0.1), so a
#                          task that binds loopback cannot reach the other nodes; 0: all nodes
#                          on 127.0.0.1; auto: namespaces when `ip netns` works     [auto]
#
# Writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf (the place sinfo, sbatch and Hydra's
# submitit look without extra environment); a pre-existing file not written by this script is
# kept as <file>.scaling-backup.<timestamp> (stop.sh --purge puts it back).
# Needs root: re-runs itself with sudo when started by a user.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_lib.sh source-path=SCRIPTDIR
. "$HERE/_lib.sh"

case "${1:-}" in
  -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) printf '[slurm] ERROR: unknown argument %s (try --help)\n' "$1" >&2; exit 2 ;;
esac

need_root "$@"

NODES=${SCALING_SLURM_NODES:-2}
CPUS=${SCALING_SLURM_CPUS:-2}
GPUS=${SCALING_SLURM_GPUS:-4}
WAIT=${SCALING_SLURM_TIMEOUT:-90}
NETNS=${SCALING_SLURM_NETNS:-auto}
case "$NETNS" in auto | 0 | 1) ;; *) printf '[slurm] ERROR: SCALING_SLURM_NETNS=%s is not auto, 0 or 1\n' "$NETNS" >&2; exit 2 ;; esac
for v in NODES CPUS GPUS WAIT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { printf '[slurm] ERROR: SCALING_SLURM_%s=%s is not a number\n' "$v" "${!v}" >&2; exit 2; }
done
[ "$NODES" -ge 1 ] && [ "$CPUS" -ge 1 ] || { printf '[slurm] ERROR: need >= 1 node and >= 1 CPU\n' >&2; exit 2; }

T0=${EPOCHREALTIME/[.,]/}  # microseconds
CONFIGURED=0  # once set, failures also print the daemons' log tails
fail() {
  printf '[slurm] ERROR: %s\n' "$*" >&2
  [ "$CONFIGURED" -eq 1 ] && log_tails
  exit 1
}
trap 'fail "line $LINENO: \"$BASH_COMMAND\" exited with $?"' ERR

take_lock
mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE/ctld" "$STATE/spool" "$STATE/dev"
chmod 0755 "$STATE"

# ---- 1. packages -------------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
missing=()
for c in slurmctld slurmd sinfo sbatch munged munge; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get: install ${PKGS[*]} yourself"
  log "installing ${PKGS[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  t=$SECONDS
  APT_OPTS=(-o DPkg::Lock::Timeout=300)  # wait for another apt/dpkg instead of failing
  apt_install() { apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${PKGS[@]}" >>"$LOG_DIR/apt.log" 2>&1; }
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || ! apt_install; then
    log "apt-get update"
    apt-get "${APT_OPTS[@]}" update >>"$LOG_DIR/apt.log" 2>&1 || { tail -n 20 "$LOG_DIR/apt.log" >&2; fail "apt-get update failed"; }
    apt_install || { tail -n 20 "$LOG_DIR/apt.log" >&2; fail "apt-get install ${PKGS[*]} failed"; }
  fi
  log "installed in $((SECONDS - t))s ($(sinfo -V 2>/dev/null || dpkg-query -W -f='slurm ${Version}' slurmctld))"
  # On a systemd machine the packages' own units would fight ours for the ports (and start with
  # this config after a reboot): this script owns slurmctld/slurmd. munge.service is reused.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now slurmctld.service slurmd.service >/dev/null 2>&1 || true
  fi
else
  log "packages present ($(dpkg-query -W -f='slurm ${Version}' slurmctld 2>/dev/null || echo slurm))"
fi

# ---- 2. foreign daemons ------------------------------------------------------------------------
ours=" $(pid_of "$RUN_DIR/slurmctld.pid" slurmctld || true) "
for pid in $(live_pids slurmctld); do
  [[ $ours == *" $pid "* ]] && continue
  other=$(sed -n "s|^$MARK ||p" "$CONF_DIR/slurm.conf" 2>/dev/null | head -n1)
  fail "a slurmctld not started with this state dir ($STATE) is running (pid $pid${other:+, started by start.sh with SCALING_SLURM_DIR=$other}); stop it first (${other:+SCALING_SLURM_DIR=$other tests/slurm/stop.sh, or }systemctl stop slurmctld)"
done

# ---- 3. network: one namespace per node (optional) ---------------------------------------------
CTLD_ADDR=127.0.0.1
if [ "$NETNS" != 0 ]; then
  if netns_up "$NODES"; then
    NETNS=1
    CTLD_ADDR=$NETNS_HOST
    log "network: node I at ${NETNS_NET}.1I in namespace ${NETNS_PREFIX}I, slurmctld at $CTLD_ADDR (bridge $NETNS_BRIDGE)"
  elif [ "$NETNS" = 1 ]; then
    fail "SCALING_SLURM_NETNS=1 but network namespaces cannot be made here (see above)"
  else
    NETNS=0
    log "network: namespaces unavailable, all nodes on 127.0.0.1"
  fi
fi
node_addr() { if [ "$NETNS" = 0 ]; then echo 127.0.0.1; else echo "${NETNS_NET}.$((10 + $1))"; fi; }

# ---- 3b. config ---------------------------------------------------------------------------------
mem_total=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
[ -n "$mem_total" ] || mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MEM=$((mem_total * 9 / 10 / NODES))
[ "$MEM" -ge 1 ] || MEM=1
GRES=""
[ "$GPUS" -gt 0 ] && GRES=" Gres=gpu:$GPUS"
if [ "$GPUS" -eq 1 ]; then GPU_RANGE=0; else GPU_RANGE="[0-$((GPUS - 1))]"; fi

new_conf=$STATE/slurm.conf.new
{
  echo "$MARK $STATE"
  echo "# nodes=$NODES cpus/node=$CPUS gpus/node=$GPUS netns=$NETNS; regenerate with tests/slurm/start.sh"
  cat <<EOF
ClusterName=scaling
SlurmctldHost=localhost($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
MailProg=/bin/true
MinJobAge=3600
KillWait=5
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=60
SlurmctldTimeout=30
ReturnToService=2
SlurmdParameters=config_overrides
EOF
  [ "$GPUS" -gt 0 ] && echo "GresTypes=gpu"
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=$(node_addr "$i") Port=$((6820 + i)) CPUs=$CPUS RealMemory=$MEM$GRES State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$new_conf"

new_gres=$STATE/gres.conf.new
{
  echo "$MARK $STATE"
  echo "AutoDetect=off"
  if [ "$GPUS" -gt 0 ]; then
    for ((i = 1; i <= NODES; i++)); do
      # File= must name character devices (a count without File drains the node); one /dev/null
      # symlink per fake GPU, so each node has its own paths.
      for ((g = 0; g < GPUS; g++)); do ln -sfn /dev/null "$STATE/dev/node$i-nvidia$g"; done
      echo "NodeName=node$i Name=gpu File=$STATE/dev/node$i-nvidia$GPU_RANGE"
    done
  fi
} >"$new_gres"

changed=0
install -d -m 0755 "$CONF_DIR"
for name in slurm.conf gres.conf; do
  target=$CONF_DIR/$name
  if [ -e "$target" ] && cmp -s "$STATE/$name.new" "$target"; then
    rm -f "$STATE/$name.new"
    continue
  fi
  if [ -e "$target" ] && ! grep -qF "$MARK" "$target"; then
    backup=$target.scaling-backup.$(date +%Y%m%d-%H%M%S)
    cp -p "$target" "$backup"
    log "kept the existing $target as $backup"
  fi
  cp "$STATE/$name.new" "$STATE/$name"
  install -m 0644 "$STATE/$name.new" "$target"
  rm -f "$STATE/$name.new"
  changed=1
done
if [ "$changed" -eq 1 ]; then
  log "wrote $CONF_DIR/slurm.conf and gres.conf ($NODES nodes x $CPUS CPUs, ${MEM} MB, $GPUS fake GPUs; state in $STATE)"
else
  log "config unchanged ($CONF_DIR/slurm.conf, state in $STATE)"
fi
CONFIGURED=1

if [ "$changed" -eq 1 ] && { pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null || compgen -G "$RUN_DIR/slurmd-*.pid" >/dev/null; }; then
  log "config changed: restarting slurmctld and slurmd"
  stop_slurm_daemons
fi

# ---- 4. munge ----------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  log "munged: running"
else
  install -d -o munge -g munge -m 0700 /etc/munge
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    log "creating $key"
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$key" --force
    else
      dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
  else
    chown munge:munge "$key"
    chmod go-rwx "$key"
  fi
  log "munged: starting"
  # 9>&-: munged keeps inherited descriptors, and would hold the start/stop lock forever.
  runuser -u munge -- munged 2>>"$LOG_DIR/munged.stderr" 9>&- \
    || runuser -u munge -- munged --force 2>>"$LOG_DIR/munged.stderr" 9>&- \
    || fail "munged did not start"
  for ((t = 0; t < 50; t++)); do munge_ok && break; sleep 0.2; done
  munge_ok || fail "munged started but munge -n | unmunge fails"
  if pid=$(pid_of /run/munge/munged.pid munged); then echo "$pid" >"$RUN_DIR/munged.pid"; fi
fi

# ---- 5. slurmctld ------------------------------------------------------------------------------
ctld_up() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }
if pid=$(pid_of "$RUN_DIR/slurmctld.pid" slurmctld); then
  log "slurmctld: running (pid $pid)"
else
  log "slurmctld: starting"
  slurmctld 2>>"$LOG_DIR/slurmctld.stderr" 9>&- || fail "slurmctld exited with $?"
fi
for ((t = 0; t < 150; t++)); do
  ctld_up && break
  if [ "$t" -gt 10 ] && ! pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then fail "slurmctld died"; fi
  sleep 0.2
done
ctld_up || fail "slurmctld does not answer scontrol ping after 30 s"

# ---- 6. slurmd per emulated node --------------------------------------------------------------
for ((i = 1; i <= NODES; i++)); do
  node=node$i
  mkdir -p "$STATE/spool/$node"
  if pid=$(pid_of "$RUN_DIR/slurmd-$node.pid" slurmd); then
    log "slurmd $node: running (pid $pid)"
  else
    log "slurmd $node: starting ($(node_addr "$i") port $((6820 + i)))"
    in_node "$i" slurmd -N "$node" 2>>"$LOG_DIR/slurmd-$node.stderr" 9>&- || fail "slurmd -N $node exited with $?"
  fi
done

T_SLURMD=$SECONDS
# ---- 7. wait until every node is usable --------------------------------------------------------
declare -A resumed=()
ready=0
deadline=$((SECONDS + WAIT))
while [ "$SECONDS" -lt "$deadline" ]; do
  states=$(timeout 10 sinfo -h -N -p debug -o '%N %T' 2>/dev/null || true)
  ok=0
  while read -r node st; do
    [ -n "${node:-}" ] || continue
    case "$st" in
      idle | mixed | allocated | completing | planned) ok=$((ok + 1)) ;;
      *'*') ;;  # not responding (yet): slurmd still registering
      drain* | down | fail* | inval | *drain)
        if [ -z "${resumed[$node]:-}" ]; then
          log "$node is $st ($(timeout 10 sinfo -h -n "$node" -o '%E' 2>/dev/null | head -n1)): resuming"
          timeout 10 scontrol update nodename="$node" state=resume 2>/dev/null || true
          resumed[$node]=1
        fi ;;
    esac
  done <<<"$states"
  if [ "$ok" -ge "$NODES" ]; then ready=1; break; fi
  for ((i = 1; i <= NODES; i++)); do  # a slurmd that exited (port taken, bad config) never registers
    pid_of "$RUN_DIR/slurmd-node$i.pid" slurmd >/dev/null || [ $((SECONDS - T_SLURMD)) -lt 3 ] \
      || fail "slurmd -N node$i is not running (see $LOG_DIR/slurmd-node$i.log below)"
  done
  pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null || fail "slurmctld is not running any more"
  sleep 0.5
done
if [ "$ready" -ne 1 ]; then
  printf '%s\n' "$states" >&2
  timeout 10 sinfo -R >&2 || true
  fail "nodes not idle after ${WAIT}s (log tails below)"
fi

T1=${EPOCHREALTIME/[.,]/}
log "ready in $(((T1 - T0) / 1000000)).$(( (T1 - T0) / 100000 % 10 ))s: $NODES nodes, partition debug (default); config $CONF_DIR/slurm.conf, logs $LOG_DIR"
log "sinfo:"
timeout 10 sinfo
