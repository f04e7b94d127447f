#!/usr/bin/env bash
# Build .whl/ here for scripts/gpu_check.sh: the GPU machine (Python 3.12, torch 2.11, no network) lacks
# flash-linear-attention, bitsandbytes, deepspeed and pyrwkv-tokenizer (and perhaps their dependencies).
# ~50 MB; .whl/ (and .triton/, the Triton cache gpu_check.sh packs into triton_cache.tgz) are git-ignored:
# carry=[".whl", ".triton"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl \
  flash-linear-attention==0.6.0 fla-core==0.6.0 bitsandbytes==0.50.2 pyrwkv-tokenizer \
  hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions \
  einops msgpack py-cpuinfo psutil ninja  # fla's and deepspeed's own needs; ninja: --op cuda's build
# deepspeed ships as an sdist: build a pure-Python wheel (its CUDA ops stay JIT, none is needed here)
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
ls -la .whl
