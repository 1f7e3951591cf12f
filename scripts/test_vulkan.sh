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

packages=(libvulkan-dev glslc spirv-headers mesa-vulkan-drivers ccache)
# Debian 12's own Mesa (22.3) has a lavapipe that now and then crashes in its queue thread on ggml-vulkan's
# command streams (a call through a NULL driver object; 1 run in 3-5 of the DPO device test, with or without
# descriptor reuse or serialized submissions). bookworm-backports' Mesa 25 runs them cleanly, so on
# Debian 12 lavapipe comes from there.
backports=""
if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then backports=bookworm-backports; fi
mesa_ok() {
    local v
    v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)
    [[ -n "$v" ]] && { [[ -z "$backports" ]] || dpkg --compare-versions "$v" ge 25; }
}
missing=()
for p in "${packages[@]}"; do
    if [[ $p == mesa-vulkan-drivers ]]; then mesa_ok || missing+=("$p"); continue; fi
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
        echo "== installing ${missing[*]}${backports:+ (Mesa from $backports)}"
        if [[ -n "$backports" ]] && ! grep -rqs "$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
                "$backports" /usr/share/keyrings/debian-archive-keyring.gpg > /etc/apt/sources.list.d/ggml-lora-backports.sources
        fi
        apt-get update -qq
        others=("${missing[@]/mesa-vulkan-drivers/}")
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${others[*]} > /dev/null
        if ! mesa_ok; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${backports:+-t $backports} mesa-vulkan-drivers > /dev/null
        fi
    elif [[ "${CI:-}" == "true" ]]; then
        echo "error: the Vulkan device tests need: ${missing[*]} (Mesa ${backports:+>= 25, from $backports})" >&2
        exit 1
    else
        echo "== NOT RUN: the Vulkan device tests need ${missing[*]}${backports:+ (mesa-vulkan-drivers from $backports)}" >&2
        exit 0
    fi
fi

start=$(date +%s)
python3 vendor/fetch_llama_cpp.py
# ccache keeps the compiled objects between runs (ggml-vulkan and its ~150 generated shader sources are
# most of the build); paths below the checkout count as relative, so another clone hits the same cache
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
cmake -S . -B build/vulkan -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON \
      -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache > build-vulkan.log
cmake --build build/vulkan -j"$(nproc)" --target ggml_lora >> build-vulkan.log
echo "== Vulkan build: $(( $(date +%s) - start )) s ($(ccache -s 2>/dev/null | grep -iE '^ *hits' | head -n 1 | xargs))"

export GGML_LORA_LIBRARY="$PWD/build/vulkan/libggml_lora.so" PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# lavapipe's driver alone: the other Mesa drivers of the package look for hardware that is not there
# (Mesa 22 names the file lvp_icd.x86_64.json, Mesa 25 lvp_icd.json)
VK_ICD_FILENAMES=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json | head -n 1)
export VK_ICD_FILENAMES
# ggml-vulkan skips devices of type CPU (lavapipe is one) unless they are listed
export GGML_VK_VISIBLE_DEVICES=0
# lavapipe compiles each of ggml's pipelines the first time a process runs it (measured: SmolLM2's first
# step 594 s against ~20 s for the next ones, on a loaded 2-core machine); Mesa keeps the compiled shaders
# in its disk cache, kept here in one place whatever HOME the run has
export MESA_SHADER_CACHE_DIR="${MESA_SHADER_CACHE_DIR:-/var/tmp/ggml-lora-mesa-shader-cache}"
python3 -c "import ggml_lora; print('== devices:', ', '.join(f'{d.name} ({d.description})' for d in ggml_lora.devices()))"
python3 -m pytest -q -p no:cacheprovider -m device tests/test_device.py
