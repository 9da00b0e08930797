#!/usr/bin/env bash
# Download the peers' wheels into .peer-wheels/ (ignored by git) for a GPU machine that cannot
# reach a package registry; benches/gpu_session.sh installs them there (pip --no-index --no-deps).
# Run it where pip can reach PyPI. All are pure-Python wheels, about 2.8 MB together.
#
# trl, liger-kernel and cut-cross-entropy are the peers measured. TRL's chunked log-prob
# function imports trl.trainer.utils in its backward, which imports `datasets`; the GPU image has
# TRL's other requirements (transformers, accelerate, pandas, pyarrow, huggingface-hub) but not
# datasets nor its dill and multiprocess. The versions are those tested together here;
# multiprocess's wheel is per Python version, and the GPU image's python3 is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --dest .peer-wheels \
    trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .peer-wheels
