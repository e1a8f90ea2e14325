"""examples/ddp_train.py: run as a user would, with torchrun on loopback, and without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).parents[1] / "examples" / "ddp_train.py"


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def test_without_torchrun_it_says_how_to_run_it():
    result = _run(str(EXAMPLE))
    assert result.returncode == 2 and "torchrun --standalone --nproc_per_node=2 examples/ddp_train.py" in result.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_one_and_two_processes_train_the_same_model(tmp_path):
    accuracies, states = [], []
    for procs in (1, 2):
        saved = tmp_path / f"model-{procs}.pt"
        result = _run("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(EXAMPLE),
                      "--epochs", "2", "--save", str(saved))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        accuracies.append(re.findall(r"epoch 2: test accuracy ([0-9.]+)", result.stdout))
        states.append(torch.load(saved))
        assert f"saved the model's state_dict to {saved}" in result.stdout
    assert accuracies[0] == accuracies[1] and accuracies[0]
    for key, value in states[0].items():  # float32 rounding of the sums over ranks, grown over ~40 SGD steps
        difference = (value.double() - states[1][key].double()).norm() / value.double().norm().clamp(min=1e-12)
        assert difference < 1e-3, (key, float(difference))
