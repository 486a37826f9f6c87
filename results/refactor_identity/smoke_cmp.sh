#!/bin/bash
# Fixed-seed smoke runs from one tree's code, reduced to a digest that two trees' runs can be compared by.
#
#   bash smoke_cmp.sh TREE OUT                 # every run below from TREE's code into OUT/, then OUT/digest.txt
#   diff reference.txt OUT/digest.txt          # the same results as the code this folder's reference came from
#
# A digest line per run: the metrics.json numbers that say what was learned (selection, test, storage figures,
# history without timings) and the sha256 of every checkpoint file. Runs: ProPETL on RTE for each prototype; plain
# PETL, fine-tuning and HF PEFT's LoRA; STS-B (regression); batches grouped by length; multi-task over RTE and
# STS-B. 64 training examples, 8 steps, batch 8, one thread, the embedded MiniLM: a check of sameness, not of
# learning (RTE is at chance after 8 steps).
set -uo pipefail
tree=$(cd "$1" && pwd); out=$2
rm -rf "$out"; mkdir -p "$out"; out=$(cd "$out" && pwd)
data=${PROPETL_DATA_DIR:-/work/shared/data/glue}
common=(data.dir=$data data.max_train_examples=64 trainer.max_steps=8 trainer.batch_size=8 trainer.eval_batch_size=64
        trainer.threads=1 logger.mode=disabled trainer.progress=false)
declare -A runs=(
  [propetl-lora]="task=rte prototype=lora"
  [propetl-adapter]="task=rte prototype=adapter"
  [propetl-prefix]="task=rte prototype=prefix"
  [petl-lora]="task=rte method=petl prototype=lora"
  [finetune]="task=rte method=finetune prototype=adapter trainer.save_weights=false"
  [peft-lora]="task=rte method=peft prototype=lora"
  [stsb-lora]="task=stsb prototype=lora"
  [grouped-adapter]="task=rte prototype=adapter data.group_by_length=true"
  [multitask-adapter]="mode=multitask tasks=[rte,stsb] prototype=adapter"
)
for name in $(printf '%s\n' "${!runs[@]}" | sort); do
  # shellcheck disable=SC2086
  (cd /tmp && PYTHONPATH=$tree PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m propetl ${runs[$name]} "${common[@]}" \
     hydra.run.dir=$out/$name > "$out/$name.log" 2>&1) || echo "FAIL $name (log: $out/$name.log)"
done
python - "$out" > "$out/digest.txt" <<'EOF'
import hashlib, json, sys
from pathlib import Path

TIMING = {"train_seconds", "wall_seconds", "epoch_seconds", "torch_threads", "host", "device"}

def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in sorted(value.items()) if k not in TIMING}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value

for run in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    metrics = run / "metrics.json"
    learned = strip(json.loads(metrics.read_text())) if metrics.is_file() else "no metrics.json"
    print(run.name, "metrics", hashlib.sha256(json.dumps(learned, sort_keys=True).encode()).hexdigest()[:16],
          json.dumps(learned.get("test", learned.get("mean_test_score")) if isinstance(learned, dict) else learned))
    for path in sorted((run / "checkpoint").rglob("*")) if (run / "checkpoint").is_dir() else []:
        if path.is_file():
            print(run.name, path.relative_to(run), hashlib.sha256(path.read_bytes()).hexdigest()[:16])
EOF
cat "$out/digest.txt"
