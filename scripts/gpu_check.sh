#!/usr/bin/env bash
# One prepared check for an NVIDIA H100/H200 machine: build for sm_90 only, then on CUDA0 run the device
# tests (pytest -m device: the subset CI runs on Vulkan/lavapipe), the parity, gradient and round-trip
# tests on tiny models, and the training benchmark on a 1B-class llama made on the spot, printing JSON.
# Prepare with scripts/prepare_gpu_bundle.sh; fits one 10-minute call.
set -euo pipefail
cd "$(dirname "$0")/.."
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
python3 -m pip install -q --no-index --find-links .whl cffi gguf pycparser jinja2 pyyaml tqdm $(ls .whl/llama_cpp_python-*.whl 2>/dev/null) || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

t0=$(date +%s)
cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DGGML_LORA_LLAMA_CPP="$PWD/vendor/llama.cpp" > build-cuda.log
ninja -C build/cuda ggml_lora >> build-cuda.log
echo "{\"build_s\": $(( $(date +%s) - t0 ))}"
export GGML_LORA_LIBRARY="$PWD/build/cuda/libggml_lora.so" PYTHONPATH="$PWD/src"
python3 -c "import ggml_lora, json; print(json.dumps([d.__dict__ for d in ggml_lora.devices()]))"

# tests run on device="auto", which is the GPU when the build has one
# the benchmark below runs even when a test fails (its numbers still help); the script's exit status is
# the tests' (a failing GPU test must not look like a pass)
tests_rc=0
python3 -m pytest -q -p no:cacheprovider -s -m device tests/test_device.py > build/gpu-device-tests.log 2>&1 || tests_rc=$?
{ grep -E "device |passed|failed|Error|placement" build/gpu-device-tests.log || true; } | tail -n 30
python3 -m pytest -q -p no:cacheprovider -s tests/test_training.py tests/test_checkpointing.py tests/test_trainer.py tests/test_parity.py tests/test_adapter_files.py \
    -k "not smollm2 and not round_trip" > build/gpu-tests.log 2>&1 || tests_rc=$(( tests_rc ? tests_rc : $? ))
{ grep -E "worst|parity|max relative|passed|failed|Error" build/gpu-tests.log || true; } | tail -n 40

# a 1B-class llama with random F16 weights (TinyLlama's shape), then throughput and GPU memory
python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
from tinymodels import write_tiny_model
write_tiny_model("build/llama-1b.gguf", "llama", "f16", n_layers=22, n_embd=2048, n_head=32, n_head_kv=4,
                 n_ff=5632, n_ctx_train=2048)
PY
python3 benchmarks/bench_train.py --model build/llama-1b.gguf --device CUDA0 --steps 3 \
    --config r8-qv-4x256 --config r16-all-4x256
nvidia-smi --query-gpu=memory.used --format=csv,noheader
echo "{\"tests_exit_status\": $tests_rc}"
exit $tests_rc
