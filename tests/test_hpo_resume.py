"""Checkpoint and resume: k steps, save, restore into a fresh tuner, k more == 2k uninterrupted."""

import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bilevel._tree import tree_leaves
from bilevel.hpo import Hyper, HypernetworkHPO, ImplicitHPO, implicit_hpo, l2_penalty


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 4, generator=g)
    t = torch.tanh(X @ torch.randn(4, generator=g)) + 0.1 * torch.randn(64, generator=g)
    idx = torch.arange(48)
    train = TensorDataset(X[:48], t[:48], idx)
    val = TensorDataset(X[48:], t[48:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model, train, val


def _mse(m, batch):
    x, t = batch[0], batch[1]
    return 0.5 * ((m(x).squeeze(-1) - t) ** 2).mean()


def _noisy_train_loss(m, batch, hp):
    x, t, idx = batch
    x = x + hp["noise"] * torch.randn_like(x)  # global RNG: replayed by the checkpoint
    per_example = 0.5 * (m(x).squeeze(-1) - t) ** 2
    weights = hp["weights"][idx] if "weights" in hp else 1.0
    return (weights * per_example).mean() + l2_penalty(m, hp["decay"])


def _loaders(train, val):  # shuffling loaders without their own generator: order from the global RNG
    return DataLoader(train, batch_size=16, shuffle=True), DataLoader(val, batch_size=8, shuffle=True)


def _implicit(model, train, val):
    spec = {"decay": Hyper(1e-2, low=0.0, per_weight=True), "noise": Hyper(0.1, low=0.0, high=1.0),
            "weights": Hyper(0.5, low=0.0, high=1.0, per_example=True)}
    return ImplicitHPO(model, _noisy_train_loss, _mse, *_loaders(train, val), spec, inner_steps=3,
                       inner_optimizer="adam", inner_lr=1e-2, warmup_steps=2, progress=False)


def _hypernetwork(model, train, val):
    spec = {"decay": Hyper(1e-2, low=0.0), "noise": Hyper(0.1, low=0.0, high=1.0)}
    return HypernetworkHPO(model, _noisy_train_loss, _mse, *_loaders(train, val), spec, weight_steps=3,
                           learn_sigma=True, best_response="gated", warmup_steps=2, progress=False)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


def _on(device, model, train, val):
    if device == "cpu":
        return model, train, val
    move = lambda data: TensorDataset(*(t.to(device) for t in data.tensors))  # noqa: E731
    return model.to(device), move(train), move(val)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("build", [_implicit, _hypernetwork], ids=["implicit", "hypernetwork"])
def test_resumed_run_ends_where_the_uninterrupted_one_ends(build, device):
    """On CUDA the losses' noise comes from the CUDA generator (saved with the checkpoint), and
    the gated best response draws its gates with a generator on the model's device."""
    model, train, val = _on(device, *_setup())
    torch.manual_seed(1)
    full = build(model, train, val).run(6)

    torch.manual_seed(1)
    first = build(model, train, val)
    first.run(3)
    checkpoint = _roundtrip(first.state_dict())
    torch.manual_seed(123)  # whatever happened in between
    resumed = build(model, train, val).load_state_dict(checkpoint).run(6)

    for a, b in zip(tree_leaves(full.hparams), tree_leaves(resumed.hparams)):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    timeless = lambda history: {k: v for k, v in history.items() if k != "time"}
    assert timeless(full.history) == timeless(resumed.history)
    assert full.train_steps == resumed.train_steps == 2 + 6 * 3
    assert full.history["step"] == list(range(1, 7))


def test_resume_through_the_function_and_a_model_that_is_left_untouched():
    model, train, val = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    spec = {"decay": Hyper(1e-2, low=0.0, per_weight="0.weight")}
    loss = lambda m, b, hp: _mse(m, b) + l2_penalty(m, hp["decay"])
    data = [train.tensors[:2]], [val.tensors]
    full = implicit_hpo(model, loss, _mse, *data, spec, max_steps=4, progress=False)
    half = implicit_hpo(model, loss, _mse, *data, spec, max_steps=2, progress=False)
    rest = implicit_hpo(model, loss, _mse, *data, spec, max_steps=4, resume=half.state, progress=False)
    assert torch.equal(full.hparams["decay"]["0.weight"], rest.hparams["decay"]["0.weight"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(half.history["val_loss"]) == 2 and len(rest.history["val_loss"]) == 4
