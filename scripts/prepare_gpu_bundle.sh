#!/usr/bin/env bash
# Run on the CPU machine before scripts/gpu_check.sh: puts what the GPU machine lacks where the device
# tool carries it. The GPU image has Python 3.12, numpy, pytest, CMake, Ninja and nvcc, but no cffi, gguf
# or llama-cpp-python, and no network.
#   .whl/            cffi (cp312 wheel), gguf, and llama-cpp-python's wheel from pip's cache (py3-none)
#   vendor/llama.cpp the pinned tree (only ggml/ and the vocab files are needed there)
# Carry: .whl and vendor/llama.cpp/ggml and vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 vendor/fetch_llama_cpp.py
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl cffi==2.0.0 pycparser gguf==0.19.0 \
    jinja2 markupsafe pyyaml tqdm
wheel=$(find ~/.cache/pip/wheels -name 'llama_cpp_python-0.3.36-*.whl' | head -n 1)
if [ -n "$wheel" ]; then cp "$wheel" .whl/; else echo "no cached llama-cpp-python wheel: parity checks will skip" >&2; fi
du -sh .whl vendor/llama.cpp/ggml
