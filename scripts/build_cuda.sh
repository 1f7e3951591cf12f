#!/usr/bin/env bash
# Builds libggml_lora.so with ggml's CUDA backend on a machine whose CUDA toolkit lacks cuBLAS (this
# project's CPU machines: CUDA 13.0's nvcc, cudart and CCCL, no cuBLAS), taking cuBLAS from NVIDIA's
# own wheel. One architecture (CMAKE_CUDA_ARCHITECTURES, default 90: H100/H200), no flash-attention
# kernels (training does not use them; they dominate compile time), no VMM pool (it links the driver,
# libcuda.so, which only a machine with a GPU has).
#   scripts/build_cuda.sh [BUILD_DIR]          default build/cuda; prints the library's path at the end
# Environment: CUDA_ARCH (default 90), JOBS (default: the CPUs this process may use).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$nvcc" ] || { echo "build_cuda.sh: no nvcc (install the CUDA toolkit, or put nvcc on PATH)" >&2; exit 2; }
cuda_major=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
case "$cuda_major" in
    13) wheel="nvidia-cublas==13.*" ;;
    12) wheel="nvidia-cublas-cu12==12.*" ;;
    *) echo "build_cuda.sh: CUDA $cuda_major: only 12 and 13 are known here" >&2; exit 2 ;;
esac
mkdir -p "$build"
deps="$(cd "$build" && pwd)/deps"                       # absolute: compilers run in the build folder
if ! find "$deps" -name 'libcublas.so*' 2>/dev/null | grep -q .; then
    python3 -m pip install --quiet --no-deps --target "$deps" "$wheel"
fi
lib=$(dirname "$(find "$deps" -name 'libcublas.so*' | head -n 1)")
inc=$(dirname "$(find "$deps" -name 'cublas_v2.h' | head -n 1)")
[ -d "$lib" ] && [ -d "$inc" ] || { echo "build_cuda.sh: the cuBLAS wheel has no library or header" >&2; exit 1; }
cublas=$(ls "$lib"/libcublas.so* | head -n 1)
cublaslt=$(ls "$lib"/libcublasLt.so* | head -n 1)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_CUDA_FA=OFF -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DCUDA_cublas_LIBRARY="$cublas" -DCUDA_cublasLt_LIBRARY="$cublaslt" \
    -DCMAKE_CUDA_FLAGS="-I$inc" -DCMAKE_CXX_FLAGS="-I$inc" -DCMAKE_C_FLAGS="-I$inc" \
    -DCMAKE_BUILD_RPATH="$lib"
ninja -C "$build" -j "$jobs" ggml_lora
echo "$build/libggml_lora.so (cuBLAS from $lib)"
