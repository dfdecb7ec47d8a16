"""The transformers part of the README's "Where you train" runs as written (the quick start: test_quickstart.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(after: str, containing: str) -> str:
    """The first ```python block of the README after the heading ``after`` that contains ``containing``."""
    text = README.read_text().split(after, 1)[1]
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if containing in block:
            return block
    raise AssertionError(f"no python block with {containing!r} after {after!r} in README.md")


def test_transformers_section_runs_as_written(tmp_path, monkeypatch, fresh_accelerate_state):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    code = python_block("## Where you train", "EMATrainer(")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)  # built from a config: nothing is downloaded
    ids = torch.randint(0, 64, (24, 12), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    monkeypatch.chdir(tmp_path)
    names = {"model": model, "train_ds": rows[:16], "eval_ds": rows[16:]}
    exec(compile(code, "README.md (Where you train: transformers)", "exec"), names)

    trainer, metrics = names["trainer"], names["metrics"]
    assert trainer.ema.num_steps == 10 and {"eval_loss", "eval_raw_loss"} <= set(metrics)
    final = GPT2LMHeadModel.from_pretrained(tmp_path / "runs" / "lm" / "final")
    with trainer.ema.ema_weights():
        for (name, p), q in zip(model.named_parameters(), final.parameters()):
            assert torch.equal(p, q), name
