#!/usr/bin/env bash
# The device tests (pytest -m device: tests/test_device.py) on Mesa's lavapipe, a conformant Vulkan device
# that runs on the CPU: the GPU code path (weights, LoRA tensors, gradients and AdamW state in device
# buffers, host/device copies, the scheduler's placement) on any machine. Builds libggml_lora with
# -DGGML_VULKAN=ON into build/vulkan (the installed package keeps its CPU build) and runs the tests with it.
#
# Needs Debian/Ubuntu's Vulkan headers, shader compiler, SPIR-V headers and Mesa's drivers; as root it
# installs them, otherwise it says what to install. Under CI (CI=true) a missing piece is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libvulkan-dev glslc spirv-headers mesa-vulkan-drivers)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
        echo "== installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
    elif [[ "${CI:-}" == "true" ]]; then
        echo "error: the Vulkan device tests need: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
        exit 1
    else
        echo "== NOT RUN: the Vulkan device tests need ${missing[*]}: sudo apt-get install -y ${missing[*]}" >&2
        exit 0
    fi
fi

start=$(date +%s)
python3 vendor/fetch_llama_cpp.py
cmake -S . -B build/vulkan -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON > build-vulkan.log
cmake --build build/vulkan -j"$(nproc)" --target ggml_lora >> build-vulkan.log
echo "== Vulkan build: $(( $(date +%s) - start )) s"

export GGML_LORA_LIBRARY="$PWD/build/vulkan/libggml_lora.so" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# lavapipe's driver alone: the other Mesa drivers of the package look for hardware that is not there
export VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.$(uname -m).json
# ggml-vulkan skips devices of type CPU (lavapipe is one) unless they are listed
export GGML_VK_VISIBLE_DEVICES=0
python3 -c "import ggml_lora; print('== devices:', ', '.join(f'{d.name} ({d.description})' for d in ggml_lora.devices()))"
python3 -m pytest -q -p no:cacheprovider -m device tests/test_device.py
