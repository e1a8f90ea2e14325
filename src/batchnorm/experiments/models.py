"""The demo's networks, each built with and without batch normalization from one seed.

``mlp``: the paper's network (Ioffe & Szegedy 2015, sec. 4.1), fully connected
hidden layers of sigmoid units, small Gaussian initialization, BN before every
nonlinearity. ``cnn``: three 3x3 conv layers with per-channel BN and ReLU.
``MLPEnsemble``: many copies of ``mlp`` (different seeds and learning rates)
trained as one batched network, which is what makes the learning-rate sweep
affordable on a CPU; member ``k`` computes exactly what ``mlp`` would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["MLPEnsemble", "activation_modules", "cnn", "mlp", "weight_layers"]


def _init_linear_weights(shapes: Sequence[tuple[int, int]], std: float, seed: int) -> list[torch.Tensor]:
    """Draw every layer's weight from N(0, std^2), in order, from one generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * std for shape in shapes]


def mlp(
    in_features: int,
    classes: int,
    *,
    bn: bool,
    hidden: Sequence[int] = (100, 100, 100),
    init_std: float = 0.05,
    seed: int = 0,
    norm: Callable[[int], nn.Module] = BatchNorm1d,
) -> nn.Sequential:
    """``Flatten, [Linear, (BatchNorm1d), Sigmoid] * len(hidden), Linear``.

    Weights ~ N(0, init_std^2), biases 0; the same ``seed`` gives both arms the
    same weights (BN's own gamma=1, beta=0 draw nothing). With ``bn``, ``norm(width)``
    builds each normalization layer (another batch norm: Batch Renorm, ghost batches).
    """
    sizes = [in_features, *hidden, classes]
    weights = _init_linear_weights([(o, i) for i, o in pairwise(sizes)], init_std, seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for k, (n_in, n_out) in enumerate(pairwise(sizes)):
        linear = nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(weights[k])
            linear.bias.zero_()
        layers.append(linear)
        if k < len(hidden):
            if bn:
                layers.append(norm(n_out))
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def cnn(
    image_shape: tuple[int, int, int],
    classes: int,
    *,
    bn: bool,
    channels: Sequence[int] = (16, 32, 32),
    seed: int = 0,
) -> nn.Sequential:
    """``[Conv3x3 (stride 1, then 2), (BatchNorm2d), ReLU] * 3, global average pool, Linear``.

    torch's default (Kaiming-uniform) initialization, drawn from ``seed``: both
    arms get the same conv and linear weights.
    """
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        c_in = image_shape[0]
        for k, c_out in enumerate(channels):
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=1 if k == 0 else 2, padding=1))
            if bn:
                layers.append(BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(g_state)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear/Conv layers by name (for the gradient ICS): ``hidden1, hidden2, ...`` (MLP) or
    ``conv1, conv2, ...`` (CNN), and ``output`` for the classifier. One name per layer everywhere."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    names = [f"{'conv' if isinstance(m, nn.Conv2d) else 'hidden'}{k + 1}" for k, m in enumerate(layers[:-1])]
    return dict(zip([*names, "output"], layers, strict=True))


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The nonlinearities, named after the layer they belong to (``hidden1``, ``conv1``, ...):
    their inputs are what the paper plots."""
    acts = [m for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.ReLU))]
    return dict(zip(list(weight_layers(model))[: len(acts)], acts, strict=True))


class MLPEnsemble(nn.Module):
    """``K`` independent :func:`mlp` networks run as one: weights ``K x out x in``.

    Input ``B x K x in_features`` (member ``k`` sees ``x[:, k]``), output
    ``B x K x classes``. Batch norm is one :class:`batchnorm.BatchNorm1d` over
    ``K * width`` features, which normalizes each member's features with that
    member's batch alone. :meth:`sgd_step` applies each member's own learning rate.
    """

    def __init__(
        self,
        in_features: int,
        classes: int,
        *,
        bn: bool,
        seeds: Sequence[int],
        hidden: Sequence[int] = (100, 100, 100),
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        k = len(seeds)
        sizes = [in_features, *hidden, classes]
        shapes = [(o, i) for i, o in pairwise(sizes)]
        per_seed = [_init_linear_weights(shapes, init_std, s) for s in seeds]
        self.members = k
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([w[j] for w in per_seed])) for j in range(len(shapes))]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(k, o)) for o, _ in shapes])
        # skip_nonfinite=False: a diverging member must not freeze the others' running statistics
        self.norms = nn.ModuleList([BatchNorm1d(k * h, skip_nonfinite=False) for h in hidden]) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)  # B,K,in
        last = len(self.weights) - 1
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.einsum("bki,koi->bko", h, w) + b  # B,K,out
            if j < last:
                if self.norms is not None:
                    h = self.norms[j](h.reshape(h.shape[0], -1)).reshape(h.shape)
                h = torch.sigmoid(h)
        return h

    @torch.no_grad()
    def sgd_step(self, lrs: torch.Tensor) -> None:
        """``p -= lr_k * grad`` for each member ``k``; a member with ``lr_k = 0`` stays put."""
        for p in self.parameters():
            if p.grad is None:
                continue
            view = p.view(self.members, -1)
            view -= lrs[:, None] * p.grad.view(self.members, -1).nan_to_num(0.0, 0.0, 0.0)
