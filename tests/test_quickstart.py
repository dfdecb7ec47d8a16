"""The README's quick start runs as written, and what it says about torch.save and the torch pin holds."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    code = README.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "model=model" in code
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    loader = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(5)]
    seen = []
    scope = {"model": model, "loader": loader, "loss_fn": nn.functional.mse_loss, "evaluate": seen.append}
    exec(compile(code, "README quick start", "exec"), scope)
    assert seen == [model] and scope["opt"].num_steps == 5
    assert len(scope["opt"].ema_buffers()) == 3, "model= tracks the BatchNorm statistics"
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    fresh.load_state_dict(load_file(tmp_path / "ema.safetensors"), strict=True)


def test_torch_save_of_the_wrapper_loads_with_weights_only_false():
    """As the README says: the pickled wrapper needs weights_only=False; its state_dict() loads with the default."""
    assert "weights_only=False" in README
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).num_steps == 1
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf))


def test_readme_shows_the_cpu_build_of_the_pinned_torch():
    pins = set(re.findall(r"torch==([0-9.]+)", README))
    assert len(pins) == 1, pins
    assert f"pip install torch=={pins.pop()} --index-url https://download.pytorch.org/whl/cpu" in README
