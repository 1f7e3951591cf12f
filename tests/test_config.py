"""TrainingConfig validation, the learning-rate schedules against their closed forms, and the CLI's
derivation of flags and config-file keys from the dataclasses."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from ggml_lora import LoRAConfig, TrainingConfig
from ggml_lora.cli import main
from ggml_lora.cli_config import read_config_file, resolve_configs
from ggml_lora.cli_eval import parse_adapter_arg
from ggml_lora.config import learning_rate_at, warmup_steps
from ggml_lora.errors import InvalidArgumentError


@pytest.mark.parametrize("kwargs, field", [
    ({"epochs": 0}, "epochs"),
    ({"max_steps": -1}, "max_steps"),
    ({"batch_size": 1.5}, "batch_size"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": math.nan}, "learning_rate"),
    ({"lr_scheduler": "exp"}, "lr_scheduler"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"warmup_ratio": 0.1, "warmup_steps": 3}, "warmup_ratio"),
    ({"adam_beta2": 1.0}, "adam_beta2"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"max_seq_length": 0}, "max_seq_length"),
    ({"truncation": "cut"}, "truncation"),
    ({"nan_policy": "ignore"}, "nan_policy"),
    ({"eval_every": -1}, "eval_every"),
    ({"packing": "yes"}, "packing"),
    ({"output_dir": ""}, "output_dir"),
    ({"seed": True}, "seed"),
])
def test_training_config_rejects(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=f"TrainingConfig.{field}="):
        TrainingConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    c = TrainingConfig(epochs=3, batch_size=2, gradient_accumulation_steps=3, learning_rate=1e-4)
    assert TrainingConfig.from_dict(c.to_dict()) == c
    assert c.rows_per_step == 6
    with pytest.raises(InvalidArgumentError, match="unknown keys.*'epoch'"):
        TrainingConfig.from_dict({"epoch": 3})


# Closed forms (1-based step k, N total, W warmup, peak lr): k <= W: lr*k/W; after, p = (k-W-1)/(N-W);
# linear lr*(1-p), cosine lr*(1+cos(pi p))/2, constant lr.
@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_closed_forms(scheduler, warmup):
    lr, n = 0.5, 13
    c = TrainingConfig(learning_rate=lr, lr_scheduler=scheduler, warmup_steps=warmup)
    got = [learning_rate_at(c, k, n) for k in range(1, n + 1)]
    for k, value in enumerate(got, start=1):
        if k <= warmup:
            want = lr * k / warmup
        else:
            p = (k - warmup - 1) / (n - warmup)
            want = {"constant": lr, "linear": lr * (1 - p), "cosine": lr * (1 + math.cos(math.pi * p)) / 2}[scheduler]
        assert value == pytest.approx(want, rel=1e-12), (k, value, want)
    assert got[warmup] == pytest.approx(lr)              # the first step after warmup runs at the peak
    assert min(got) > 0                                  # no step is wasted at lr = 0
    if scheduler != "constant":
        assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))


def test_cosine_midpoint_and_warmup_ratio():
    c = TrainingConfig(learning_rate=1.0, lr_scheduler="cosine")
    assert learning_rate_at(c, 6, 10) == pytest.approx(0.5)   # p = 5/10: cos(pi/2) = 0
    r = TrainingConfig(learning_rate=1.0, warmup_ratio=0.1)
    assert warmup_steps(r, 95) == 10                            # ceil(9.5)
    assert learning_rate_at(r, 5, 95) == pytest.approx(0.5)


def test_config_file_and_command_line_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('rank = 4\nlearning_rate = 1e-3\nepochs = 2\ntarget_modules = ["q_proj", "k_proj"]\n'
                    '[training]\nbatch_size = 2\n[lora]\nseed = 7\n')
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("rank: 4\nlearning_rate: 1.0e-3\nepochs: 2\ntarget_modules: [q_proj, k_proj]\n"
                         "training:\n  batch_size: 2\nlora:\n  seed: 7\n")
    assert read_config_file(toml) == read_config_file(yaml_file)
    import argparse

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    from ggml_lora.cli_train import add_verb

    add_verb(sub)
    args = ap.parse_args(["train", "-c", str(toml), "--rank", "16", "--target-modules", "q_proj,v_proj,o_proj",
                          "--no-progress"])
    lora, training, run = resolve_configs(args)
    assert lora.rank == 16                                     # command line beats the file
    assert lora.target_modules == ("q_proj", "v_proj", "o_proj")
    assert lora.seed == 7 and training.seed == 0               # [lora] seed is the init seed
    assert training.learning_rate == 1e-3 and training.epochs == 2 and training.batch_size == 2
    assert training.progress is False
    assert training.max_seq_length == TrainingConfig().max_seq_length   # untouched: the dataclass default


def test_every_config_field_is_a_flag():
    from ggml_lora.cli_config import config_fields

    keys = set(config_fields())
    assert {f.name for f in fields(TrainingConfig)} <= keys
    assert {f.name for f in fields(LoRAConfig)} - {"seed"} <= keys and "init_seed" in keys


@pytest.mark.parametrize("text, message", [
    ("rank = 4\nranks = 3\n", "unknown keys \\['ranks'\\]"),
    ("rank = 0\n", "LoRAConfig.rank=0"),
    ("lr_scheduler = 'wavy'\n", "TrainingConfig.lr_scheduler"),
])
def test_bad_config_files(tmp_path, capsys, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert main(["train", "-c", str(f), "--data", str(tmp_path)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_config_file_errors_name_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("rank: [1, 2\n")
    with pytest.raises(InvalidArgumentError, match="broken.yaml"):
        read_config_file(f)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="use .yaml"):
        read_config_file(tmp_path / "x.json")
    with pytest.raises(InvalidArgumentError, match="missing.toml"):
        read_config_file(tmp_path / "missing.toml")


def test_adapter_argument_parsing(tmp_path):
    assert parse_adapter_arg("a.gguf") == ("a.gguf", 1.0)
    assert parse_adapter_arg("a.gguf:0.5") == ("a.gguf", 0.5)
    odd = tmp_path / "x:y.gguf"
    odd.write_bytes(b"")
    assert parse_adapter_arg(str(odd)) == (str(odd), 1.0)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "examples" / "configs").iterdir()))
def test_example_configs_resolve(name):
    """Every shipped config file is valid: known keys, values the dataclasses accept, data that exists."""
    import argparse

    from ggml_lora.cli_train import add_verb

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    add_verb(ap.add_subparsers())
    lora, training, run = resolve_configs(ap.parse_args(["train", "-c", str(root / "examples" / "configs" / name)]))
    assert (root / run["data"]).exists()
    assert lora.rank > 0 and training.output_dir
