"""Every Python snippet of the README and of docs/ runs as written, so none can rot.

Each ```python block runs in a fresh namespace, in the order of its page. A
snippet may use the stand-ins below where it says so (``make_model()``: "any
model with torch.nn.BatchNorm layers"); everything else it names, it defines.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def make_model() -> nn.Module:
    """A small stand-in for "any model": conv, batch norm, ReLU, a residual block, a classifier."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip


def _snippets():
    for page in PAGES:
        for index, match in enumerate(BLOCK.finditer(page.read_text())):
            line = page.read_text()[: match.start()].count("\n") + 2
            yield pytest.param(page, match.group(1), id=f"{page.relative_to(ROOT)}:{line}-{index}")


def test_every_page_with_code_is_found():
    pages = {p.name for p, *_ in (c.values for c in _snippets())}
    assert {"README.md", "layers.md", "fusion.md", "inference.md", "distributed.md", "demo.md"} <= pages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("page", "code"), list(_snippets()))
def test_snippet_runs(page, code, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    if "init_process_group" in code:  # one process, on loopback, as torchrun would set it up
        for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                            "WORLD_SIZE": "1"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
    namespace = {"__name__": f"snippet of {page.name}", "make_model": make_model}
    try:
        exec(compile(code, f"{page.name} snippet", "exec"), namespace)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
