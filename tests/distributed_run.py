"""One rank of a test launch: `mpiexec -n N python distributed_run.py MODEL DATA OUT [options]`.

Trains through the Python API (LoRATrainer) so a test can make one rank fail on purpose: --raise-at STEP
raises in that rank's step callback, --kill-at STEP kills that rank with SIGKILL, --signal-at STEP sends
it SIGTERM, --perturb-at STEP moves one value of its adapter by one float32 ulp, --data-per-rank reads DATA with RANK replaced by the rank (ranks that disagree on their data).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

from ggml_lora import BaseModel, LoRAConfig, LoRATrainer, TrainingConfig


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank-of-fault", type=int, default=1)
    p.add_argument("--raise-at", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--signal-at", type=int)
    p.add_argument("--perturb-at", type=int)
    p.add_argument("--data-per-rank", action="store_true")
    p.add_argument("--preference", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    with BaseModel.load(args.model, n_threads=1) as model:
        lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"), dropout=0.0 if args.preference else 0.1)
        cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=1e-3, save_every=5,
                             eval_every=0, output_dir=args.out, progress=False, save_total_limit=None)
        if args.preference:
            from ggml_lora import PreferenceConfig, PreferenceTrainer

            trainer = PreferenceTrainer(model, lora, cfg, PreferenceConfig(method="dpo"))
        else:
            trainer = LoRATrainer(model, lora, cfg)
        rank = trainer.comm.rank

        class Fault:
            def on_step(self, trainer, rec):
                if rank != args.rank_of_fault:
                    return
                if rec["step"] == args.raise_at:
                    raise RuntimeError(f"boom at step {rec['step']}")
                if rec["step"] == args.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if rec["step"] == args.signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                if rec["step"] == args.perturb_at:          # this rank's adapter leaves the others'
                    name = trainer.adapter.targets[0]
                    a, b = trainer.adapter.get(name)
                    a[0, 0] = np.nextafter(a[0, 0], np.float32(np.inf))
                    trainer.adapter.set(name, lora_a=a, lora_b=b)

        data = args.data.replace("RANK", str(rank)) if args.data_per_rank else args.data
        history = trainer.train(data, callbacks=[Fault()], resume_from=True if args.resume else None)
        print(json.dumps({"rank": rank, "size": trainer.comm.size, "losses": history.losses,
                          "interrupted": history.interrupted, "step": history.global_step,
                          "reduced_bytes": trainer.reduced_bytes}), flush=True)
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
