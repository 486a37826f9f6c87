#!/bin/bash
# usage: smoke_cmp.sh TREE OUT — one fixed-seed single-task run per prototype from TREE's code into OUT
tree=$1; out=$2; rm -rf $out; mkdir -p $out
for proto in lora adapter prefix; do
  (cd /tmp && PYTHONPATH=$tree HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m propetl.train task=rte prototype=$proto \
     data.dir=/work/shared/data/glue data.max_train_examples=64 trainer.max_steps=8 trainer.batch_size=8 trainer.eval_batch_size=64 \
     trainer.threads=1 logger.mode=disabled trainer.progress=false hydra.run.dir=$out/$proto > $out/$proto.log 2>&1) || echo "FAIL $proto"
done
