"""What the gradient probes share: a model's parameters and buffers kept to put back, and one
loss-and-gradient evaluation that leaves the running statistics as they were."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class Snapshot:
    """A model's parameters ``params`` and buffers as they are now, to put back after probing."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.model, self.live = model, params
        self.params = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers, strict=True):
                b.copy_(saved)

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.live, self.params, strict=True):
                p.copy_(saved)
        self.restore_buffers()


def loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot: Snapshot) -> tuple[float, tuple]:
    """The loss on the batch and its gradient w.r.t. ``params`` (zeros for unused ones); the
    buffers a training-mode forward moved (running statistics) are put back."""
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    snapshot.restore_buffers()
    return loss.item(), tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True))
