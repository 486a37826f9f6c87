#!/usr/bin/env bash
# The wheel as a user gets it: build it from the checkout's tracked files, install it into a fresh virtual
# environment, and from a folder outside the checkout run `propetl-train --help`, a refused task (its
# choices must be listed: the configs ship in the wheel), a user's own task through --config-dir, and a
# smoke training (2 steps, the embedded MiniLM, W&B off). The venv reuses this Python's packages
# (--system-site-packages: torch, transformers, … from `make install`); propetl itself must come from the wheel.
# Data: data.dir = $PROPETL_DATA_DIR, else the checkout's data/glue (`make link-data`).
#   bash scripts/check_wheel.sh            (make check-wheel; exit 0 when every check passes)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
glue=${PROPETL_DATA_DIR:-$root/data/glue}
[ -f "$glue/RTE/train.tsv" ] || { echo "check_wheel: no GLUE data at $glue (make link-data, or PROPETL_DATA_DIR)" >&2; exit 1; }
glue=$(cd "$glue" && pwd -P)
work=$(mktemp -d "${TMPDIR:-/tmp}/propetl-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
started=$(date +%s)

# 1. the wheel, from a copy of the tracked files (no stale build/ of the checkout can leak into it)
mkdir -p "$work/src" "$work/dist" "$work/user/task" "$work/elsewhere"
git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && tar --null -T - -cf -) | tar -x -C "$work/src"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/propetl-*.whl)
echo "check_wheel: built $(basename "$wheel") ($("$PYTHON" -c "import sys, zipfile; print(sum(n.startswith('propetl/conf/') for n in zipfile.ZipFile(sys.argv[1]).namelist()))" "$wheel") config files)"

# 2. a fresh venv with the wheel (propetl from the wheel; its dependencies from this Python)
"$PYTHON" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-deps --ignore-installed "$wheel"
cd "$work/elsewhere"                                       # outside any checkout
location=$("$work/venv/bin/python" -c "import propetl; print(propetl.__file__)")
case "$location" in "$work/venv/"*) ;; *) fail "propetl imported from $location, not from the venv's wheel" ;; esac
train="$work/venv/bin/propetl-train"

# 3. propetl's help, the packaged configs' choices, a user's task through --config-dir
"$train" --help > help.txt || fail "propetl-train --help exited $?"
grep -q "^task: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb" help.txt || fail "--help lacks the packaged tasks: $(head -c 400 help.txt)"
if "$train" task=nope 2> refused.txt; then fail "task=nope was accepted"; fi
grep -q "choose one of: cola, mnli" refused.txt || fail "task=nope did not list the packaged tasks: $(cat refused.txt)"
sed 's/^name: rte$/name: mytask/' "$work/venv/lib/"python3*/site-packages/propetl/conf/task/rte.yaml > "$work/user/task/mytask.yaml"
"$train" --config-dir "$work/user" task=mytask --cfg job > mytask.yaml || fail "--config-dir did not add task=mytask"
grep -q "name: mytask" mytask.yaml || fail "--config-dir: task=mytask composed without its name"

# 4. a smoke training: 2 steps of the default (ProPETL-adapter on RTE, the embedded MiniLM)
"$train" trainer.max_steps=2 logger.mode=disabled trainer.progress=false "data.dir=$glue" \
    hydra.run.dir="$work/run" > train.out 2>&1 || { tail -20 train.out >&2; fail "the smoke training exited non-zero"; }
[ -f "$work/run/metrics.json" ] || fail "the smoke training wrote no metrics.json"
"$work/venv/bin/python" -c "import json, sys; m = json.load(open(sys.argv[1])); assert m['steps'] == 2 and m['task'] == 'rte', m" \
    "$work/run/metrics.json" || fail "metrics.json is not of a 2-step rte run"
# 5. hydra/launcher=fused from the wheel (its hydra_plugins package): two seeds of the default, trained fused
plugin=$("$work/venv/bin/python" -c "import hydra_plugins.propetl_fused_launcher as m; print(m.__file__)")
case "$plugin" in "$work/venv/"*) ;; *) fail "the fused launcher imported from $plugin, not from the venv's wheel" ;; esac
"$train" -m hydra/launcher=fused seed=1,2 trainer.max_steps=2 logger.mode=disabled trainer.progress=false \
    "data.dir=$glue" hydra.sweep.dir="$work/sweep" > fused.out 2>&1 || { tail -20 fused.out >&2; fail "the fused sweep exited non-zero"; }
grep -q "2 jobs train fused" fused.out || fail "the sweep's two seeds did not train fused: $(tail -5 fused.out)"
[ "$(ls "$work"/sweep/*/metrics.json | wc -l)" -eq 2 ] || fail "the fused sweep did not write two metrics.json"
echo "check_wheel: ok ($(( $(date +%s) - started )) s): the wheel's propetl-train finds its configs, takes --config-dir, trains, fuses a sweep"
