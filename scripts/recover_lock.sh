#!/usr/bin/env bash
# Remove a stale Snakemake lock of the current directory, safely. Sourced by demo.sh; also runs alone:
#   bash scripts/recover_lock.sh
# Snakemake locks the working directory (.snakemake/locks/) while it runs and removes the lock when it
# ends, even on a failed job. Only when snakemake itself dies (kill -9, a crashed machine) the lock stays,
# and every later `snakemake` stops with "Directory cannot be locked" until `snakemake --unlock`. Unlocking
# under a live run would let two runs write the same files, so this unlocks only when no snakemake and no
# dfakd job runs in this directory; otherwise it says which process holds it and leaves the lock alone.

recover_stale_lock() {
  local here proc pid cwd args
  [ -n "$(ls -A .snakemake/locks 2>/dev/null)" ] || return 0
  here="$(pwd -P)"
  for proc in /proc/[0-9]*; do
    pid="${proc#/proc/}"
    [ "$pid" = "$$" ] && continue
    cwd="$(readlink "$proc/cwd" 2>/dev/null)" || continue
    [ "$cwd" = "$here" ] || continue
    # one argv word per line: `snakemake`, `-m snakemake`, `.venv/bin/dfakd`, `-m dfakd`
    args="$(tr '\0' '\n' <"$proc/cmdline" 2>/dev/null)" || continue
    if grep -qxE '(.*/)?(snakemake|dfakd)' <<<"$args"; then
      echo "[lock] $here is locked by a running process ($pid: ${args//$'\n'/ }); not unlocking" >&2
      return 0
    fi
  done
  echo "[lock] stale Snakemake lock in $here/.snakemake/locks (no snakemake runs here): snakemake --unlock"
  snakemake --unlock --quiet all >/dev/null
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  recover_stale_lock
fi
