#!/usr/bin/env bash
# Finds a folder of GLUE task files (RTE/, MRPC/, ... with the official TSVs) and links it to
# data/glue, where propetl looks by default. Order: $PROPETL_DATA_DIR, ../shared/data/glue beside
# this checkout, the same beside the checkout this one was cloned from. Never copies the data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
candidates=()
[ -n "${PROPETL_DATA_DIR:-}" ] && candidates+=("$PROPETL_DATA_DIR")
candidates+=("$root/../shared/data/glue")
origin=$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)
if [ -n "$origin" ] && [ -d "$origin" ]; then candidates+=("$origin/../shared/data/glue"); fi
for dir in "${candidates[@]}"; do
  if [ -f "$dir/RTE/train.tsv" ]; then
    target=$(cd "$dir" && pwd)
    mkdir -p "$root/data"
    ln -sfn "$target" "$root/data/glue"
    echo "data/glue -> $target"
    exit 0
  fi
done
echo "no local GLUE folder found (tried: ${candidates[*]}); set PROPETL_DATA_DIR or data.dir=PATH, or use the hub" >&2
exit 0
