#!/usr/bin/env bash
# Stop the local Slurm started by tests/slurm/start.sh: every slurmd, then slurmctld, then the
# munged that start.sh started (a munged it found running, e.g. munge.service, is left alone).
# SIGTERM via the pid files, SIGKILL after 15 s (SCALING_SLURM_STOP_GRACE). Idempotent.
#
#   tests/slurm/stop.sh           # stop; state dir (logs, job state, jobcomp file) is kept
#   tests/slurm/stop.sh --purge   # also cancel all jobs first, remove the state dir, the nodes'
#                                 # network namespaces and bridge, and the
#                                 # /etc/slurm/{slurm,gres}.conf start.sh wrote (restoring a backup)
#
# Environment: SCALING_SLURM_DIR (state dir, default /tmp/scaling-slurm).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_lib.sh source-path=SCRIPTDIR
. "$HERE/_lib.sh"

PURGE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf '[slurm] ERROR: unknown argument %s (try --help)\n' "$a" >&2; exit 2 ;;
  esac
done

need_root "$@"

if [ ! -d "$STATE" ]; then
  log "no state dir $STATE: nothing to stop"
else
  take_lock
  if [ "$PURGE" -eq 1 ] && pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    # Without slurmd the jobs' slurmstepd processes would outlive the cluster.
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | wc -l || true)
    if [ "${jobs:-0}" -gt 0 ]; then
      log "cancelling $jobs job(s)"
      # shellcheck disable=SC2046
      timeout 10 scancel --full $(timeout 10 squeue -h -o %A 2>/dev/null) 2>/dev/null || true
      for ((t = 0; t < 40; t++)); do
        [ "$(timeout 10 squeue -h -o %A 2>/dev/null | wc -l)" -eq 0 ] && break
        sleep 0.5
      done
    fi
  fi
  stop_slurm_daemons
  stop_munged
fi

if [ "$PURGE" -eq 1 ]; then
  netns_down
  for name in slurm.conf gres.conf; do
    target=$CONF_DIR/$name
    if [ -e "$target" ] && grep -qF "$MARK $STATE" "$target"; then
      rm -f "$target"
      backup=""
      for b in "$target".scaling-backup.*; do [ -e "$b" ] && backup=$b; done  # newest: sorts last
      if [ -n "$backup" ]; then
        mv "$backup" "$target"
        log "restored $target from $backup"
      else
        log "removed $target"
      fi
    fi
  done
  case "$STATE" in
    / | /tmp | /etc* | /usr* | /var | "$HOME") printf '[slurm] ERROR: refusing to remove %s\n' "$STATE" >&2; exit 1 ;;
  esac
  rm -rf "$STATE"
  log "removed $STATE"
fi
log "stopped"
