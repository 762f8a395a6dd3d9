# Sourced by the launchers that have --dry-run: `run CMD...` runs CMD, or with dry_run=1 prints it
# quoted so that it can be pasted into a shell as it is.
# shellcheck shell=bash

show() {
  local out="" word q="'"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=" $word"; else out+=" '${word//$q/$q\\$q$q}'"; fi
  done
  echo "${out# }"
}

run() { if ((${dry_run:-0})); then show "$@"; else "$@"; fi; }
