"""Models, training loops and inference measurements of the demo, on tiny networks and random data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.experiments import measure, models, training
from batchnorm.fold import FrozenBatchNorm


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def toy_data(gen, n_train=90, n_test=40, features=(1, 3, 4), classes=3):
    x_train = torch.rand(n_train, *features, generator=gen)
    x_test = torch.rand(n_test, *features, generator=gen)
    y_train = torch.randint(0, classes, (n_train,), generator=gen)
    y_test = torch.randint(0, classes, (n_test,), generator=gen)
    return x_train, y_train, x_test, y_test


def test_mlp_arms_share_their_initialization(seed):
    plain = models.mlp(12, 3, bn=False, hidden=(7, 5), init_std=0.3, seed=seed)
    bn = models.mlp(12, 3, bn=True, hidden=(7, 5), init_std=0.3, seed=seed)
    lin_p = [m for m in plain if isinstance(m, nn.Linear)]
    lin_b = [m for m in bn if isinstance(m, nn.Linear)]
    assert len(lin_p) == len(lin_b) == 3
    for a, b in zip(lin_p, lin_b, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, torch.zeros_like(a.bias))
    assert lin_p[0].weight.std().item() == pytest.approx(0.3, rel=0.3)
    norms = [m for m in bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(type(m) is batchnorm.BatchNorm1d for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    # one name per layer: a layer's nonlinearity is named after it
    assert list(models.activation_modules(bn)) == ["hidden1", "hidden2"]
    assert list(models.weight_layers(bn)) == ["hidden1", "hidden2", "output"]
    cnn = models.cnn((1, 8, 8), 10, bn=True, seed=seed)
    assert list(models.activation_modules(cnn)) == ["conv1", "conv2", "conv3"]
    assert list(models.weight_layers(cnn)) == ["conv1", "conv2", "conv3", "output"]
    other = models.mlp(12, 3, bn=False, hidden=(7, 5), init_std=0.3, seed=seed + 1)
    assert not torch.equal(other[1].weight, plain[1].weight)


def test_cnn_arms_share_their_initialization(seed):
    state = torch.random.get_rng_state()
    plain = models.cnn((3, 9, 9), 4, bn=False, channels=(4, 6), seed=seed)
    bn = models.cnn((3, 9, 9), 4, bn=True, channels=(4, 6), seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    convs_p = [m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs_b = [m for m in bn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for a, b in zip(convs_p, convs_b, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert [type(m) for m in bn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        batchnorm.BatchNorm2d
    ] * 2
    assert bn(torch.rand(5, 3, 9, 9)).shape == (5, 4)


def test_sampler_visits_every_example_once_per_epoch(seed):
    sampler = training.BatchSampler(10, 3, seed)
    epoch = torch.cat([sampler.next() for _ in range(3)])  # 9 of 10, the tail is dropped
    assert len(set(epoch.tolist())) == 9
    again = training.BatchSampler(10, 3, seed)
    assert torch.equal(torch.cat([again.next() for _ in range(3)]), epoch)
    with pytest.raises(ValueError, match="batch size"):
        training.BatchSampler(10, 11, seed)


def test_train_is_deterministic_and_learns(gen, seed):
    data = toy_data(gen)
    data = (data[0], data[0].flatten(1)[:, 0].gt(0.5).long(), data[2], data[2].flatten(1)[:, 0].gt(0.5).long())
    runs = []
    for _ in range(2):
        model = models.mlp(12, 2, bn=True, hidden=(8,), init_std=0.5, seed=seed)
        hist = training.train(model, *data, steps=60, lr=0.5, batch_size=15, seed=seed, eval_every=20)
        runs.append((hist, model))
    (h1, m1), (h2, m2) = runs
    assert h1.steps == [0, 20, 40, 60] and h1.test_acc == h2.test_acc and h1.train_loss[1:] == h2.train_loss[1:]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    assert h1.train_loss[-1] < h1.train_loss[1]
    assert h1.diverged_at is None
    assert h1.steps_to(0.0) == 0 and h1.steps_to(1.01) is None


def test_train_stops_on_divergence(gen, seed):
    model = models.mlp(12, 3, bn=False, hidden=(8,), init_std=1.0, seed=seed)
    hist = training.train(model, *toy_data(gen), steps=50, lr=1e30, batch_size=10, seed=seed, eval_every=10)
    assert hist.diverged_at is not None and hist.diverged_at <= 50
    assert hist.steps[-1] < hist.diverged_at


def test_train_calls_hooks_with_the_step_batch(gen, seed):
    x_train, y_train, x_test, y_test = toy_data(gen)
    seen, evals = [], []
    model = models.mlp(12, 3, bn=False, hidden=(4,), seed=seed)

    def before(step, xb, yb):
        seen.append((step, xb.shape, yb.shape))

    training.train(model, x_train, y_train, x_test, y_test, steps=5, lr=0.1, batch_size=10, seed=seed, eval_every=2,
                   before_step=before, after_eval=evals.append)  # fmt: skip
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5] and seen[0][1:] == ((10, 1, 3, 4), (10,))
    assert evals == [0, 2, 4, 5]


@pytest.mark.parametrize("bn", [False, True])
def test_ensemble_member_equals_single_run(gen, bn):
    x_train, y_train, x_test, y_test = toy_data(gen)
    seeds, lrs = [3, 4, 5], [0.2, 1.0, 0.5]
    ens = models.MLPEnsemble(12, 3, bn=bn, seeds=seeds, hidden=(6, 5), init_std=0.4)
    res = training.train_ensemble(ens, lrs, seeds, x_train, y_train, x_test, y_test, steps=12, batch_size=10,
                                  eval_every=4)  # fmt: skip
    assert res.steps == [0, 4, 8, 12] and res.diverged_at == [None] * 3
    for k, (s, lr) in enumerate(zip(seeds, lrs, strict=True)):
        single = models.mlp(12, 3, bn=bn, hidden=(6, 5), init_std=0.4, seed=s)
        hist = training.train(single, x_train, y_train, x_test, y_test, steps=12, lr=lr, batch_size=10, seed=s,
                              eval_every=4)  # fmt: skip
        linears = [m for m in single if isinstance(m, nn.Linear)]
        for j, lin in enumerate(linears):
            torch.testing.assert_close(ens.weights[j][k], lin.weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ens.biases[j][k], lin.bias, rtol=1e-4, atol=1e-5)
        if bn:
            norms = [m for m in single if isinstance(m, batchnorm.BatchNorm1d)]
            for j, norm in enumerate(norms):
                width = norm.num_features
                torch.testing.assert_close(ens.norms[j].running_mean.view(3, width)[k], norm.running_mean)
                torch.testing.assert_close(ens.norms[j].weight.view(3, width)[k], norm.weight)
        assert res.test_acc[k] == pytest.approx(hist.test_acc, abs=1.5 / len(x_test))


def test_ensemble_isolates_a_diverging_member(gen):
    x_train, y_train, x_test, y_test = toy_data(gen)
    seeds = [1, 2]
    common = dict(hidden=(6,), init_std=0.4)
    ens = models.MLPEnsemble(12, 3, bn=True, seeds=seeds, **common)
    res = training.train_ensemble(ens, [1e30, 0.3], seeds, x_train, y_train, x_test, y_test, steps=10, batch_size=10,
                                  eval_every=5)  # fmt: skip
    assert res.diverged_at[0] is not None and res.diverged_at[1] is None
    assert all(a != a for a in res.test_acc[0][1:])  # NaN once diverged
    single = models.mlp(12, 3, bn=True, seed=2, **common)
    training.train(single, x_train, y_train, x_test, y_test, steps=10, lr=0.3, batch_size=10, seed=2, eval_every=5)
    torch.testing.assert_close(ens.weights[0][1], single[1].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ens.norms[0].running_var.view(2, 6)[1], single[2].running_var, rtol=1e-4, atol=1e-5)


def trained_bn_model(gen, seed, conv: bool):
    x_train, y_train, x_test, y_test = toy_data(gen, n_train=60, n_test=20, features=(2, 5, 5))
    if conv:
        model = models.cnn((2, 5, 5), 3, bn=True, channels=(4, 5), seed=seed)
    else:
        model = models.mlp(50, 3, bn=True, hidden=(8, 6), init_std=0.3, seed=seed)
    training.train(model, x_train, y_train, x_test, y_test, steps=15, lr=0.3, batch_size=12, seed=seed, eval_every=15)
    return model, x_test


@pytest.mark.parametrize("conv", [False, True])
def test_folded_model_matches_eval(gen, seed, conv):
    model, x = trained_bn_model(gen, seed, conv)
    folded = measure.fold_batchnorm(model)
    assert model.training  # the original is left as it was
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert sum(isinstance(m, FrozenBatchNorm) for m in folded.modules()) == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_batch_stats_predictions_match_training_mode(gen, seed, conv):
    model, x = trained_bn_model(gen, seed, conv)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = torch.cat([reference(x[i : i + 5]).argmax(-1) for i in range(0, len(x), 5)])
    buffers = [b.clone() for b in model.buffers()]
    got = measure.batch_stats_predictions(model, x, batch_size=5)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # stats untouched
    assert model.training


def test_one_image_batch_stats_reduce_the_mlp_to_a_constant(gen, seed):
    model, x = trained_bn_model(gen, seed, conv=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, batchnorm.BatchNorm1d):
                m.bias.normal_(generator=gen)
    # one value per feature: x - mean = 0, so every image gets the same output (BN's shift)
    preds = measure.batch_stats_predictions(model, x, batch_size=1)
    assert preds.unique().numel() == 1
    pop = measure.predictions(model, x, batch_size=1)
    assert torch.equal(pop, measure.predictions(model, x))  # population statistics: batch size is irrelevant
