#!/usr/bin/env bash
# Stop what tests/infra/slurm_up.sh started for STATE_DIR: cancel jobs, stop slurmd, slurmctld, munged.
#   bash tests/infra/slurm_down.sh [STATE_DIR] [--purge]     (--purge also deletes STATE_DIR)
set -uo pipefail

STATE=$(realpath -m "${1:?usage: slurm_down.sh STATE_DIR [--purge]}")
PURGE=${2:-}
export SLURM_CONF="$STATE/etc/slurm.conf"
log() { echo "[slurm_down] $*" >&2; }
running() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }

stop_pidfile() {   # stop_pidfile NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local f="$STATE/run/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if running "$pid"; then
        kill -TERM "$pid"
        for _ in $(seq 150); do running "$pid" || break; sleep 0.1; done
        if running "$pid"; then log "$1 ($pid) ignored SIGTERM, killing"; kill -KILL "$pid"; fi
        log "$1 ($pid) stopped"
    fi
    rm -f "$f"
}

if [ -f "$SLURM_CONF" ] && [ -s "$STATE/run/slurmctld.pid" ] && running "$(cat "$STATE/run/slurmctld.pid")"; then
    # cancel everything so job processes (and their slurmstepd) go away before slurmd does
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --full --quiet "--user=$(id -un)" 2>/dev/null || scancel --quiet -u root
        for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop_pidfile slurmd
# leftover slurmstepd processes of this state dir (e.g. slurmd killed hard)
for p in $(pgrep -x slurmstepd 2>/dev/null); do
    if tr '\0' ' ' 2>/dev/null < "/proc/$p/environ" | grep -q "SLURM_CONF=$SLURM_CONF" ||
       grep -qs "$STATE" "/proc/$p/cmdline"; then kill -KILL "$p" 2>/dev/null; fi
done
stop_pidfile slurmctld
if [ -S "$STATE/munge/munge.socket" ]; then
    munged --socket="$STATE/munge/munge.socket" --stop >/dev/null 2>&1 && log "munged stopped"
fi
stop_pidfile munged
rm -f "$STATE/munge/munge.socket" "$STATE/munge/munge.socket.lock"
if [ "$PURGE" = --purge ]; then rm -rf "$STATE"; log "removed $STATE"; fi
log "down"
