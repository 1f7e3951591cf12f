"""AdaLoRA, ggml-lora against PEFT's AdaLoraModel, from the same triplets on the same rows.

    python benchmarks/adalora_peft.py [--model PATH] [--steps 20] [--init-r 8] [--target-r 4] [--tinit 4]
                                      [--tfinal 6] [--targets q_proj,v_proj] [--rows 8] [--lr 1e-3]

Both sides train the same rows of examples/data/facts (one batch of all --rows rows per step, so no
data order is involved), start from ggml-lora's seeded initial triplets (copied into PEFT's lora_A,
lora_E, lora_B), and use AdamW (torch's betas and eps), gradient clipping at 1.0 and a constant
learning rate; PEFT runs AdaLoraModel.forward (cross-entropy plus the orthogonal regulariser) and
update_and_allocate(step) after each optimizer step. PEFT's base is the GGUF dequantized to float32
by transformers; ggml-lora trains through the stored blocks, so the two differ by the quantized
arithmetic of the forward (llama.cpp's, whose int8 activations make the loss move by about their
rounding under any small change of the adapter), not by the method; --f16-weights takes that out.
Prints one JSON object: the per-step
losses, the kept ranks per module on both sides, and the validation loss after the last step.

``peft_adalora`` is also the reference loop of tests/test_adalora.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent


def padded(rows, torch):
    """(ids, labels) right-padded: causal attention keeps the pads out of every real position, and
    their labels are -100, as ggml-lora's collate leaves padding out of the loss."""
    n = max(len(r.tokens) for r in rows)
    ids = np.zeros((len(rows), n), np.int64)
    mask = np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r.tokens)], mask[i, :len(r.mask)] = r.tokens, r.mask
    ids = torch.from_numpy(ids)
    return ids, torch.where(torch.from_numpy(mask), ids, torch.tensor(-100))


def peft_adalora(model_file: Path, lora, init: dict, n_head: int, train_rows, valid_rows, steps: int,
                 learning_rate: float, max_grad_norm: float = 1.0) -> dict:
    """PEFT's AdaLoRA on ``model_file`` from the triplets ``init`` ({GGUF name: {"A", "E", "B"}}):
    per-step cross-entropy, regulariser and gradient norm, kept ranks per module, validation loss."""
    import peft
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ggml_lora.arch import hf_module
    from ggml_lora.peft import to_hf_rows

    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(str(model_file.parent), gguf_file=model_file.name, dtype=torch.float32)
    modules = sorted({hf_module(t).rsplit(".", 1)[1] for t in init})
    cfg = peft.AdaLoraConfig(init_r=lora.init_r, target_r=lora.target_r, tinit=lora.tinit, tfinal=lora.tfinal,
                             deltaT=lora.deltaT, beta1=lora.beta1, beta2=lora.beta2,
                             total_step=lora.total_step or steps, orth_reg_weight=lora.orth_reg_weight,
                             lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=modules,
                             task_type="CAUSAL_LM")        # PeftModelForCausalLM: AdaLoraModel.forward adds orth_reg
    pm = peft.get_peft_model(hf, cfg)
    named = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for t, p in init.items():
            layer = named[hf_module(t)]
            b = to_hf_rows(p["B"], n_head) if "attn_q" in t else p["B"]    # llama's converter permuted q's rows
            layer.lora_A["default"].copy_(torch.from_numpy(p["A"]))
            layer.lora_E["default"].copy_(torch.from_numpy(p["E"][:, None]))
            layer.lora_B["default"].copy_(torch.from_numpy(np.ascontiguousarray(b)))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids, labels = padded(train_rows, torch)
    out = {"losses": [], "orth_losses": [], "grad_norms": []}
    for step in range(1, steps + 1):
        res = pm(input_ids=ids, labels=labels)
        out["losses"].append(float(ce(res.logits, labels).detach()))
        out["orth_losses"].append(float(res.loss.detach()) - out["losses"][-1])
        res.loss.backward()
        out["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    out["ranks"] = {}
    for name, kept in (pm.peft_config["default"].rank_pattern or {}).items():
        out["ranks"][name.removeprefix("base_model.model.").rsplit(".lora_E", 1)[0]] = int(sum(kept))
    with torch.no_grad():
        vids, vlabels = padded(valid_rows, torch)
        out["val_loss"] = float(ce(pm(input_ids=vids).logits, vlabels))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--init-r", type=int, default=8)
    ap.add_argument("--target-r", type=int, default=4)
    ap.add_argument("--tinit", type=int, default=4)
    ap.add_argument("--tfinal", type=int, default=6)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--f16-weights", action="store_true",
                    help="ggml-lora's training forward and the validation through F16 copies of the weights: "
                         "no quantized activations, so closer to PEFT's float32 arithmetic")
    args = ap.parse_args()

    import torch

    from ggml_lora import BaseModel, LoRAConfig, LoRATrainer, TrainingConfig
    from ggml_lora.adalora import AdaLoRA
    from ggml_lora.arch import hf_module
    from ggml_lora.data import load_dataset

    torch.set_num_threads(args.threads)
    if args.model is None:
        from bench_train import default_model

        args.model = default_model()
    facts = ROOT / "examples" / "data" / "facts"
    lora = LoRAConfig(peft_type="adalora", init_r=args.init_r, target_r=args.target_r, tinit=args.tinit,
                      tfinal=args.tfinal, alpha=2.0 * args.init_r, target_modules=tuple(args.targets.split(",")))
    with BaseModel.load(args.model, n_threads=args.threads) as model:
        records = [json.loads(line) for line in (facts / "train.jsonl").read_text().splitlines()][:args.rows]
        train = load_dataset(records, model, max_seq_length=256)[0]
        valid = load_dataset(facts / "valid.jsonl", model, max_seq_length=256)[0]
        cfg = TrainingConfig(max_steps=args.steps, batch_size=len(train), learning_rate=args.lr,
                             lr_scheduler="constant", max_seq_length=256, eval_every=0, save_every=0,
                             progress=False, output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "adalora_peft"),
                             n_threads=args.threads, f16_weights=args.f16_weights)
        with LoRATrainer(model, lora, cfg) as trainer:
            init = {t: {k: v.copy() for k, v in p.items()} for t, p in AdaLoRA(trainer.adapter, lora, args.steps).params.items()}
            t0 = time.perf_counter()
            history = trainer.train(records)
            ours_s = time.perf_counter() - t0
            ours = {"losses": history.losses, "orth_losses": [r["orth_loss"] for r in history.steps],
                    "grad_norms": [r["grad_norm"] for r in history.steps],
                    "ranks": {hf_module(t): r for t, r in trainer.adalora.ranks().items()},
                    "val_loss": trainer.evaluate(valid, f16_weights=args.f16_weights)["val_loss"], "train_s": ours_s}
        n_head = model.hparams.n_head
    t0 = time.perf_counter()
    ref = peft_adalora(args.model, lora, init, n_head, train, valid, args.steps, args.lr)
    ref["train_s"] = time.perf_counter() - t0
    modules = sorted(ours["ranks"])
    rel = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], ref["losses"])]
    print(json.dumps({
        "model": str(args.model), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "config": {k: getattr(lora, k) for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "alpha",
                                                  "orth_reg_weight", "target_modules")},
        "steps": args.steps, "rows": len(train), "learning_rate": args.lr, "f16_weights": args.f16_weights,
        "ours": ours, "peft": ref,
        "loss_max_rel_diff": max(rel), "val_loss_rel_diff": abs(ours["val_loss"] - ref["val_loss"]) / ref["val_loss"],
        "modules_with_equal_rank": sum(ours["ranks"][m] == ref["ranks"].get(m) for m in modules),
        "modules": len(modules),
        "rank_l1_diff": sum(abs(ours["ranks"][m] - ref["ranks"].get(m, 0)) for m in modules),
    }, indent=1))


if __name__ == "__main__":
    main()
