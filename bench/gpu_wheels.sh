#!/usr/bin/env bash
# The wheels `python -m bench.gpu` needs on a GPU machine that has its own Python 3.12 and PyTorch but not
# this project's pure-Python dependencies, and no network (docs/benchmarks.md#gpu-check).
#
#   bash bench/gpu_wheels.sh download [PYTHON]   # here, with a package index: into .whl/ (git ignores it)
#   bash bench/gpu_wheels.sh install             # there: into /tmp/site, then export PYTHONPATH=/tmp/site
#
# The list: what the check imports (the model, generation, evaluation, the loader, the planner) that the
# machine's image lacks, at requirements.txt's versions (ftfy, wcwidth and einops-exts at the versions pip
# resolves with them). timm is in the image at another version: 0.6.13 travels, as torchscale pins it.
# torch, torchvision, numpy, pillow, accelerate, sentencepiece, safetensors, einops, regex, pyyaml, tqdm and
# huggingface_hub are the image's own (torch 2.11 there, 2.14.1 here).
set -euo pipefail
WHEELS=(
    torchscale==0.3.0 timm==0.6.13 fairscale==0.4.0 flamingo-pytorch==0.1.2 einops-exts==0.0.4
    open_clip_torch==2.32.0 ftfy==6.3.1 wcwidth==0.9.4 bitsandbytes==0.50.2
)
cd "$(dirname "$0")/.."
case "${1:-}" in
download)
    py="${2:-python3}"
    # fairscale 0.4.0 is a source distribution only: built into a wheel here (pure Python, no extension)
    for w in "${WHEELS[@]}"; do
        if [ "$w" = fairscale==0.4.0 ]; then
            "$py" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$w"
        else
            "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
                --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
        fi
    done
    du -sh .whl
    ls .whl
    ;;
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    echo "installed into /tmp/site: export PYTHONPATH=/tmp/site"
    ;;
*)
    echo "usage: bash bench/gpu_wheels.sh download [PYTHON] | install" >&2
    exit 2
    ;;
esac
