"""Preference training with TRL itself (DPOTrainer, ORPOTrainer): per-step loss and TRL's metrics from
given token ids and a given initial LoRA A, the reference for ggml-lora's DPO and ORPO.

    python benchmarks/trl_reference.py [--model PATH] [--method dpo|orpo] [--loss-type sigmoid|ipo|hinge]
                                       [--steps 3] [--beta 0.1] [--lr 1e-3] [--rank 4] [--targets q_proj,v_proj]
                                       [--max-grad-norm 0] [--f16] [--threads 2]

The CLI tokenizes a few (prompt, chosen, rejected) strings with the tokenizer transformers builds from
the GGUF, draws lora_A Kaiming-uniform like PEFT (seeded), and prints one JSON line per optimizer step.

``trl_reference`` runs the real trainers (trl 1.16) on the GGUF dequantized to float32 by transformers,
wrapped in PEFT LoRA (dropout 0, lora_B zero, lora_A from the caller), with one optimizer step per
``step`` over all pairs at once (batch = every pair in the given order, no accumulation), AdamW (torch,
betas 0.9/0.999, eps 1e-8, no weight decay), a constant learning rate, clipping at ``max_grad_norm``
(0: none), float32 on the CPU, seed 0.

lora_a: {PEFT module name: lora_A}. The names are the transformers model's own module names,
``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``model.layers.{i}.mlp.{gate,up,down}_proj``
(``ggml_lora.arch.hf_module`` of the GGUF name), one for every module that ``target_modules`` selects,
no more and no fewer. Each value is PEFT's ``lora_A.weight``: (r, n_in) float32 (ggml ``ne = [n_in, r]``),
the same matrix as ggml-lora's A (``Adapter.get(name)[0]``): A multiplies the input, which llama's
HF -> GGUF conversion does not permute (it permutes q/k's output rows, which live in B, zero here).

The ids reach the model exactly as given: chosen = prompt_ids + chosen_ids, rejected = prompt_ids +
rejected_ids. Left to itself TRL would not do that, so two preprocessing methods are replaced:
- DPOTrainer._prepare_dataset (trl/trainer/dpo_trainer.py:1036-1142) expects text: it appends the EOS
  *text* to chosen and rejected (1056-1068), tokenizes prompt and prompt+completion with the tokenizer's
  special tokens (1096-1102, so a BOS where the tokenizer adds one), splits at their common prefix
  (1104-1125) and drops rows whose prompt fills max_length (1134-1140). Here it returns the id columns
  untouched, and max_length=None keeps the collator (153-166) from truncating.
- ORPOTrainer.tokenize_row (trl/experimental/orpo/orpo_trainer.py:458-603) tokenizes text, prepends BOS
  when the prompt lacks it (516-525), appends EOS when a completion lacks it (527-530) and truncates to
  max_length (532-543). Here it builds the same columns from the ids (prompt labels -100).
Both are checked: the processed dataset and every collated batch must hold exactly these ids (padding
right, attention 0 there). The tokenizer's pad token (its EOS when it has none) only fills padding.

Conventions of TRL 1.16 (file:line under trl/):
DPO (trainer/dpo_trainer.py)
- The batch is [chosen rows; rejected rows], right-padded; completion_mask marks the completion
  tokens (146-150, 168-203). labels = input_ids where completion_mask else -100 (1298); the fused LM head
  scores position t+1 from position t and gives 0 where the label is -100 (trainer/utils.py:1617-1627,
  1660). So logps = the SUM of log-probs over the completion tokens, each predicted from everything
  before it (1302-1304); prompt tokens and padding contribute nothing.
- Reference: with a PEFT model and ref_model=None, the same forward under ``disable_adapter()``, i.e.
  the base model (1328-1336, trainer/utils.py:1442-1444), recomputed each step without grad.
- rewards/chosen, rewards/rejected = mean over pairs of beta * (logps - ref_logps) (1350-1351, 1582-1588);
  margins = mean(chosen - rejected reward); accuracies = mean(chosen reward > rejected reward, strict)
  (1590-1597). logps/chosen, logps/rejected = mean of the policy's summed logps (1600-1601).
- sigmoid: -logsigmoid(beta * delta) (1387-1388); hinge: relu(1 - beta * delta) (1390-1391), delta =
  (logp_c - ref_c) - (logp_r - ref_r); ipo: each side's log-ratio divided by its number of completion
  tokens (completion_mask.sum, clamp >= 1), then (delta_avg - 1/(2 beta))^2 (1393-1404). loss = mean over
  pairs (1528).
ORPO (experimental/orpo/orpo_trainer.py), no reference model:
- logps = the AVERAGE log-prob over the completion tokens (labels -100 on the prompt and padding,
  shifted by one; 730-741, 802-807).
- nll_loss = cross-entropy averaged over every non-padding token of the chosen rows, prompt included,
  position 0 excluded (it has no predecessor): labels = input_ids where attention_mask == 1 (796-798),
  shifted (782-783), nn.CrossEntropyLoss's mean over all those tokens of the batch together, i.e.
  weighted by token, not a mean of per-row means (785-790, 800). Padding is out through the attention
  mask, not the pad id, so a real EOS equal to the pad id still counts.
- log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr))) on the average logps (690-695);
  loss = nll_loss - mean(beta * logsigmoid(log_odds)) (696-697, 848).
- rewards/chosen, rewards/rejected = mean of beta * average logps (no reference; 699-700, 853-854);
  margins, accuracies as in DPO (850, 855-858); log_odds_ratio = mean(logsigmoid(log_odds)) and
  log_odds_chosen = mean(log_odds) (702, 868-869).
Both trainers average what they stored since the last log (dpo_trainer.py:1699-1708,
orpo_trainer.py:1023-1039); with logging_steps=1 and one batch per step that is one value, which is
asserted. The logged loss is that step's forward, before its update (transformers Trainer, no rounding).

f16=True rounds to float16 the weights that ggml-lora's f16_weights copies (blocks' q/k/v/o/gate/up/down
and the LM head, token_embd when tied) where the GGUF stores them quantized, as ggml-lora's F16 working
copies do; the embedding lookup keeps the dequantized values (the tied LM head is untied for that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")       # ORPO lives in trl.experimental

METHODS = ("dpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")
ORPO_METRICS = DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
# ggml-lora's copied_weights (native/glora_model.cpp): the matrices its F16 working copies replace
F16_STEMS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# (prompt, chosen, rejected) for the CLI
EXAMPLES = [
    ("The capital of France is", " Paris.", " Berlin."),
    ("Two plus two equals", " four.", " five, or so I was told."),
    ("On a clear day the sky is", " blue.", " green."),
    ("Water freezes at", " zero degrees Celsius.", " fifty."),
]


def trl_reference(gguf_path: str, pairs: list[dict], *, method: str, beta: float, learning_rate: float,
                  steps: int, rank: int, alpha: float, target_modules: list[str], lora_a: dict[str, np.ndarray],
                  loss_type: str = "sigmoid", max_grad_norm: float = 0.0, f16: bool = False) -> list[dict]:
    """TRL's DPO or ORPO on ``pairs`` ({"prompt_ids", "chosen_ids", "rejected_ids"}: lists of ints) from
    the initial ``lora_a`` (see the module docstring for names, shapes and conventions). Returns one dict
    per optimizer step: "step", "loss" (the forward before that step's update), "seconds" and TRL's
    metrics for that step (DPO_METRICS, ORPO_METRICS), and "grad_norm" (before clipping) as logged."""
    import datasets
    import peft
    import torch
    from transformers import AutoTokenizer, PrinterCallback

    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if method == "dpo" and loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    rows = [_checked_pair(i, p) for i, p in enumerate(pairs)]
    if not rows:
        raise ValueError("pairs is empty")

    path = Path(gguf_path)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:          # ORPO's collator needs one; it only fills masked padding
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_float32(path)
    if f16:
        _round_to_f16(model, path)
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM")

    records: list[dict] = []
    metric_keys = DPO_METRICS if method == "dpo" else ORPO_METRICS
    with tempfile.TemporaryDirectory(prefix="trl_reference.") as out:
        common = dict(output_dir=out, per_device_train_batch_size=len(rows), gradient_accumulation_steps=1,
                      max_steps=steps, learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                      optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                      max_grad_norm=max_grad_norm, beta=beta, logging_strategy="steps", logging_steps=1,
                      save_strategy="no", report_to="none", seed=0, data_seed=0, bf16=False, fp16=False,
                      use_cpu=True, gradient_checkpointing=False, disable_dropout=True, disable_tqdm=True,
                      train_sampling_strategy="sequential", dataloader_num_workers=0)
        dataset = datasets.Dataset.from_list(rows)
        if method == "dpo":
            from trl import DPOConfig

            args = DPOConfig(**common, loss_type=[loss_type], max_length=None, precompute_ref_log_probs=False)
        else:
            from trl.experimental.orpo import ORPOConfig

            longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
            args = ORPOConfig(**common, max_length=longest,      # max_length unused: tokenize_row is replaced
                              remove_unused_columns=False)       # what ORPO sets itself, with a warning
        trainer = _trainer_class(method)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                         peft_config=lora, callbacks=[_step_recorder(records, metric_keys)])
        trainer.remove_callback(PrinterCallback)    # its log dicts would interleave with the caller's stdout
        (_expect_dpo_dataset if method == "dpo" else _expect_orpo_dataset)(trainer.train_dataset, rows)
        trainer.expected_rows = rows
        _set_lora_a(trainer.model, lora_a)
        base = trainer.model.get_base_model()
        if f16 and base.lm_head.weight is base.get_input_embeddings().weight:
            raise AssertionError("the rounded LM head was tied back to the embeddings")
        trainer.train()
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        raise AssertionError(f"logged steps {[r['step'] for r in records]}, expected 1..{steps}")
    if trainer.n_forwards != steps:
        raise AssertionError(f"{trainer.n_forwards} training forwards for {steps} steps")
    return records


def _checked_pair(i: int, pair: dict) -> dict:
    row = {}
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = pair.get(key)
        if not ids:
            # an empty prompt leaves the first completion token unscored while IPO still counts it
            raise ValueError(f"pairs[{i}][{key!r}] must be a non-empty list of token ids, got {ids!r}")
        row[key] = [int(t) for t in ids]
    return row


def _set_lora_a(peft_model, lora_a: dict[str, np.ndarray]) -> None:
    """Copy lora_a into every LoRA layer's lora_A["default"]; lora_B stays PEFT's zero."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    missing, extra = sorted(set(layers) - set(lora_a)), sorted(set(lora_a) - set(layers))
    if missing or extra:
        raise KeyError(f"lora_a must name exactly the adapted modules: missing {missing}, not adapted {extra}")
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.lora_A["default"].weight                           # (r, n_in)
            a = np.asarray(lora_a[name], dtype=np.float32)
            if a.shape != tuple(weight.shape):
                raise ValueError(f"lora_a[{name!r}] has shape {a.shape}, expected (r, n_in) = {tuple(weight.shape)}")
            weight.copy_(torch.from_numpy(a))
            if layer.lora_B["default"].weight.abs().max() != 0:
                raise AssertionError(f"{name}: lora_B is not zero")


def _load_float32(path: Path):
    """The GGUF dequantized to float32 by transformers, as a plain trainable model."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    # dequantize=True: float32 nn.Linear even where the `kernels` package would keep GGUF blocks
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and (weight.dtype != torch.float32 or type(module).__name__.startswith("Gguf")):
            raise AssertionError(f"{name}: {type(module).__name__} {weight.dtype}, expected float32 weights")
    # Nothing quantized is left, but the GGUF quantizer stays attached and transformers' Trainer refuses
    # to train a model whose quantization method is not trainable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _round_to_f16(model, path: Path) -> None:
    """Round the matrices ggml-lora's f16_weights replaces by F16 copies (those stored quantized)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    quantized = {t.name for t in reader.tensors if t.tensor_type not in plain}
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[reader.get_field("general.architecture").contents()]
    gguf_names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)     # HF module -> 'blk.0.attn_q'
    head = "output.weight" if any(t.name == "output.weight" for t in reader.tensors) else "token_embd.weight"
    with torch.no_grad():
        if head in quantized:
            rounded = model.lm_head.weight.detach().to(torch.float16).to(torch.float32)
            model.lm_head.weight = torch.nn.Parameter(rounded, requires_grad=False)      # unties a tied head
            model.config.tie_word_embeddings = False                                     # and keeps it untied
        for name, module in model.named_modules():
            stem = gguf_names.get_name(name)
            if stem is not None and stem.rsplit(".", 1)[-1] in F16_STEMS and f"{stem}.weight" in quantized:
                module.weight.copy_(module.weight.to(torch.float16).to(torch.float32))


def _expect_rows(ids, mask, seqs, what: str) -> None:
    """ids[i] is seqs[i] right-padded; mask[i] is 1 on it and 0 on the padding."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.shape[0] != len(seqs):
        raise AssertionError(f"{what}: {ids.shape[0]} rows, expected {len(seqs)}")
    for i, s in enumerate(seqs):
        n = len(s)
        if ids[i, :n].tolist() != s or mask[i].tolist() != [1] * n + [0] * (mask.shape[1] - n):
            raise AssertionError(f"{what} row {i}: {ids[i].tolist()} (mask {mask[i].tolist()}), expected {s}")


def _expect_dpo_dataset(dataset, rows) -> None:
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if dataset[key] != [r[key] for r in rows]:
            raise AssertionError(f"DPO's processed {key} differ from the given ids")


def _expect_dpo_batch(inputs, rows) -> None:
    chosen = [r["prompt_ids"] + r["chosen_ids"] for r in rows]
    rejected = [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    _expect_rows(inputs["input_ids"], inputs["attention_mask"], chosen + rejected, "DPO batch")
    completion = [[0] * len(r["prompt_ids"]) + [1] * len(r[k]) for k in ("chosen_ids", "rejected_ids") for r in rows]
    got = np.asarray(inputs["completion_mask"])
    for i, m in enumerate(completion):
        if got[i].tolist() != m + [0] * (got.shape[1] - len(m)):
            raise AssertionError(f"DPO completion_mask row {i}: {got[i].tolist()}, expected {m}")


def _orpo_columns(row: dict) -> dict:
    """ORPOTrainer.tokenize_row's columns for one pair, from the ids as they are."""
    p = row["prompt_ids"]
    out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
    for side in ("chosen", "rejected"):
        c = row[f"{side}_ids"]
        out[f"{side}_input_ids"] = p + c
        out[f"{side}_attention_mask"] = [1] * (len(p) + len(c))
        out[f"{side}_labels"] = [-100] * len(p) + c
    return out


def _expect_orpo_dataset(dataset, rows) -> None:
    for key, want in _transpose([_orpo_columns(r) for r in rows]).items():
        if dataset[key] != want:
            raise AssertionError(f"ORPO's processed {key} differ from the given ids")


def _expect_orpo_batch(inputs, rows) -> None:
    for side in ("chosen", "rejected"):
        seqs = [r["prompt_ids"] + r[f"{side}_ids"] for r in rows]
        _expect_rows(inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"], seqs, f"ORPO {side} batch")
        labels = np.asarray(inputs[f"{side}_labels"])
        for i, r in enumerate(rows):
            want = [-100] * len(r["prompt_ids"]) + r[f"{side}_ids"]
            if labels[i].tolist() != want + [-100] * (labels.shape[1] - len(want)):
                raise AssertionError(f"ORPO {side}_labels row {i}: {labels[i].tolist()}, expected {want}")


def _transpose(dicts: list[dict]) -> dict:
    return {k: [d[k] for d in dicts] for k in dicts[0]}


def _one_value_each(stored: dict, skip: tuple[str, ...] = ()) -> None:
    """The trainers log the mean of what they stored since the last log: it must be this step's alone."""
    counts = {k: len(v) for k, v in stored.items() if k not in skip}
    if any(n != 1 for n in counts.values()):
        raise AssertionError(f"metrics stored since the last log: {counts}, expected one value each")


def _step_recorder(records: list, keys: tuple[str, ...]):
    """A TrainerCallback appending {"step", "loss", "seconds", the method's metrics} at each step's log."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" not in logs:                # the end-of-training summary (train_loss, train_runtime)
                return
            rec = {"step": state.global_step, "loss": logs["loss"], "seconds": self.seconds}
            rec |= {k: logs[k] for k in keys}
            if "grad_norm" in logs:
                rec["grad_norm"] = logs["grad_norm"]
            records.append(rec)

    return StepRecorder()


def _trainer_class(method: str):
    """TRL's trainer for ``method`` fed the given ids (see the module docstring), checking every training
    batch against ``expected_rows`` and every step's log for one stored value per metric."""
    if method == "dpo":
        from trl import DPOTrainer as Base
    else:
        from trl.experimental.orpo import ORPOTrainer as Base

    class ExactIds(Base):
        expected_rows: list[dict] = []
        n_forwards = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):      # DPO
            return dataset                          # ids as given: no EOS, no re-tokenizing, no filter

        def tokenize_row(self, feature, model=None):                                     # ORPO
            return _orpo_columns(feature)           # no BOS, no EOS, no truncation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training:
                (_expect_dpo_batch if method == "dpo" else _expect_orpo_batch)(inputs, self.expected_rows)
                self.n_forwards += 1
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, start_time=None):
            if "loss" in logs:
                if method == "dpo":
                    _one_value_each(self._metrics["train"], skip=("num_tokens",))   # num_tokens: a running total
                else:
                    _one_value_each(self._stored_metrics["train"])
            return super().log(logs, start_time)

    return ExactIds


def kaiming_uniform_a(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """PEFT's lora_A init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(n_in), 1/sqrt(n_in)), shape (r, n_in)."""
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-1.0, 1.0, shape).astype(np.float32) / np.float32(math.sqrt(shape[1]))
            for name, shape in sorted(shapes.items())}


def example_pairs(tokenizer) -> list[dict]:
    """EXAMPLES as ids: the prompt as the tokenizer encodes it (its BOS included), each completion as the
    rest of the encoded prompt + completion (which must start with the prompt's ids)."""
    pairs = []
    for prompt, chosen, rejected in EXAMPLES:
        p = tokenizer(prompt).input_ids
        pair = {"prompt_ids": p}
        for key, text in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            full = tokenizer(prompt + text).input_ids
            if full[:len(p)] != p:
                raise ValueError(f"{prompt!r} + {text!r}: the prompt's ids are not a prefix of the whole")
            pair[key] = full[len(p):]
        pairs.append(pair)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--method", choices=METHODS, default="dpo")
    ap.add_argument("--loss-type", choices=DPO_LOSS_TYPES, default="sigmoid", help="DPO only")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--max-grad-norm", type=float, default=0.0, help="0: no clipping")
    ap.add_argument("--f16", action="store_true", help="round the quantized matrices to float16 (ggml-lora's "
                                                         "f16_weights)")
    ap.add_argument("--seed", type=int, default=0, help="of lora_A")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; 1 where another process keeps a core busy (2 OpenMP threads on one "
                         "free core made a SmolLM2 step over 10x slower)")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.model is None:
        from bench_train import default_model

        args.model = default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model.parent), gguf_file=args.model.name)
    pairs = example_pairs(tokenizer)
    targets = args.targets.split(",")
    with torch.device("meta"):                  # module names and n_in, without weights
        skeleton = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(str(args.model.parent), gguf_file=args.model.name))
    shapes = {name: (args.rank, m.in_features) for name, m in skeleton.named_modules()
              if name.rsplit(".", 1)[-1] in targets}
    t0 = time.perf_counter()
    records = trl_reference(str(args.model), pairs, method=args.method, beta=args.beta, learning_rate=args.lr,
                            steps=args.steps, rank=args.rank, alpha=args.alpha or 2.0 * args.rank,
                            target_modules=targets, lora_a=kaiming_uniform_a(shapes, args.seed),
                            loss_type=args.loss_type, max_grad_norm=args.max_grad_norm, f16=args.f16)
    print(json.dumps({"model": str(args.model), "method": args.method,
                      "loss_type": args.loss_type if args.method == "dpo" else None, "beta": args.beta,
                      "learning_rate": args.lr, "rank": args.rank, "targets": targets, "f16": args.f16,
                      "pairs": [[len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])] for p in pairs],
                      "total_s": round(time.perf_counter() - t0, 2)}))
    for rec in records:
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
