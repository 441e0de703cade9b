"""Bad input gets a clear error naming the argument."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bilevel.hpo import Hyper, HypernetworkHPO, HyperSpec, ImplicitHPO, l2_penalty


def _mse(m, batch):
    return 0.5 * ((m(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()


def _train_loss(m, batch, hp):
    return _mse(m, batch) + l2_penalty(m, hp["decay"])


X = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
DATA = [(X, X.sum(-1))]
DECAY = {"decay": Hyper(0.1, low=0.0)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(init=0.5, low=1.0, high=0.0), r"`low` must be below `high`; got low=1.0, high=0.0"),
    (dict(init=0.5, low=0.5, high=0.5), r"`low` must be below `high`"),
    (dict(init=-1.0, low=0.0), r"`init` must lie strictly inside \(low, high\) = \(0.0, None\); got -1.0"),
    (dict(init=1.0, low=0.0, high=1.0), r"`init` must lie strictly inside"),
    (dict(init=torch.tensor([0.5, 2.0]), low=0.0, high=1.0, shape=(2,)), r"a tensor with entries outside"),
    (dict(init=0.5, low=float("-inf")), r"`low` must be a finite float or None"),
    (dict(init=0.5, low=0.0, high=1.0, transform="exp"), r"`transform` must be one of \('sigmoid',\)"),
    (dict(init=0.5, low=0.0, transform="tanh"), r"`transform` must be one of \('exp', 'softplus'\)"),
    (dict(init=0.5, low=-1.0, high=1.0, log=True), r"`log=True` needs two positive bounds"),
    (dict(init=0.5, shape=(3,), per_example=True), r"at most one of `shape`, `per_weight` and `per_example`"),
    (dict(init=float("nan")), r"`init` must be finite"),
])
def test_invalid_hyper_parameter_bounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hyper(**kwargs)


def test_spec_contents_are_checked():
    with pytest.raises(TypeError, match=r"'decay' must be a bilevel.hpo.Hyper; got float"):
        HyperSpec(decay=0.1)
    with pytest.raises(ValueError, match="no hyper-parameter given"):
        HyperSpec()
    with pytest.raises(TypeError, match="`spec` must be a HyperSpec or a dict of Hyper"):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, [Hyper(0.1)], progress=False)


@pytest.mark.parametrize("val_loader", [[], DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0)))],
                         ids=["list", "DataLoader"])
@pytest.mark.parametrize("tuner", [ImplicitHPO, HypernetworkHPO])
def test_empty_validation_loader(tuner, val_loader):
    with pytest.raises(ValueError, match=r"`val_loader` is empty: it yields no batch"):
        tuner(nn.Linear(3, 1), _train_loss, _mse, DATA, val_loader, DECAY, progress=False)


def test_one_shot_iterator_loader():
    with pytest.raises(TypeError, match=r"`train_loader` must be a re-iterable .* one-shot iterator"):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, iter(DATA), DATA, DECAY, progress=False)


def test_spec_naming_parameters_the_model_does_not_have():
    spec = {"decay": Hyper(0.1, low=0.0, per_weight=["0.weight", "fc.weight"])}
    with pytest.raises(ValueError, match=r"spec 'decay': `per_weight` names parameter\(s\) \['fc.weight'\] that the "
                                         r"model does not have .* its trainable parameters are \['0.weight', '0.bias'"):
        ImplicitHPO(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)), _train_loss, _mse, DATA, DATA, spec)


def test_per_weight_init_of_the_wrong_shape():
    spec = {"decay": Hyper(torch.full((2, 3), 0.1), low=0.0, per_weight="weight")}
    with pytest.raises(ValueError, match=r"'decay' has an `init` of shape \(2, 3\), but the shape of parameter "
                                         r"'weight' is \(1, 3\)"):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, spec)


def test_per_example_needs_a_sized_dataset():
    class Stream:
        def __iter__(self):
            return iter(DATA)

    spec = {"weights": Hyper(0.5, low=0.0, high=1.0, per_example=True)}
    with pytest.raises(ValueError, match=r"`per_example` needs the number of training examples"):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, Stream(), DATA, spec)


def test_hypernetwork_refuses_per_weight_hyper_parameters():
    spec = {"decay": Hyper(0.1, low=0.0, per_weight=True)}
    with pytest.raises(ValueError, match=r"spec 'decay': hypernetwork HPO tunes a few fixed-shape.*ImplicitHPO"):
        HypernetworkHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, spec)


def test_hypernetwork_whose_output_does_not_match_the_model():
    class Wrong(nn.Module):
        def forward(self, raw):
            return {"weight": torch.zeros(2, 3)}

    with pytest.raises(ValueError, match=r"missing \['bias'\], wrong shape \[\('weight', \(2, 3\), \(1, 3\)\)\]"):
        HypernetworkHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, best_response=Wrong())
    with pytest.raises(ValueError, match=r"`best_response` must be one of \['gated', 'linear'\]"):
        HypernetworkHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, best_response="mlp")


def test_losses_that_are_not_scalar_or_ask_for_an_unknown_hyper_parameter():
    vector_loss = lambda m, b, hp: (m(b[0]) - b[1]) ** 2
    with pytest.raises(ValueError, match=r"`train_loss\(model, batch, hparams\)` must return a scalar tensor; got "
                                         r"shape \(10, 10\)"):
        ImplicitHPO(nn.Linear(3, 1), vector_loss, _mse, DATA, DATA, DECAY, progress=False).run(1)
    unknown = lambda m, b, hp: _mse(m, b) + hp["dropout"]
    with pytest.raises(KeyError, match=r"asked for hyper-parameter 'dropout'.* it defines \['decay'\]"):
        ImplicitHPO(nn.Linear(3, 1), unknown, _mse, DATA, DATA, DECAY, progress=False).run(1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(inner_steps=0), r"`inner_steps` must be a positive int"),
    (dict(inner_lr=-1.0), r"`inner_optimizer` learning rate must be a positive float"),
    (dict(hyper_optimizer="adamm"), r"unknown `hyper_optimizer` 'adamm'; known names: .*adam"),
    (dict(solve="cg"), r"`solve` must be a bilevel.implicit linear solver"),
    (dict(damping=-1.0), r"`damping` must be a non-negative float"),
    (dict(warmup_steps=-1), r"`warmup_steps` must be a non-negative int"),
])
def test_bad_tuner_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, **kwargs)


def test_checkpoint_of_another_spec_is_refused():
    a = ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, progress=False)
    spec = {"decay": Hyper(0.1, low=0.0, per_weight=True)}
    b = ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, spec, progress=False)
    with pytest.raises(ValueError, match="do not match this tuner's spec"):
        b.load_state_dict(a.state_dict())


def test_divergence_is_a_floating_point_error_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"implicit HPO: hyper-step 1 \(training step \d+\): the training "
                                                 r"loss is (inf|nan); lower the training learning rate"):
        ImplicitHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, inner_lr=1e200, progress=False).run(2)
    with pytest.raises(FloatingPointError, match=r"hypernetwork HPO: hyper-step 1 \(training step \d+\)"):
        HypernetworkHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, weight_lr=1e200, weight_optimizer="sgd",
                        progress=False).run(2)


def test_values_outside_the_bounds_or_rounded_onto_one_are_named():
    """An out-of-bounds value gave NaN or inf weights from best_response_at / model_at, and an init
    that rounds onto a bound in the model's float32 failed only at the first hyper-step."""
    tuner = HypernetworkHPO(nn.Linear(3, 1), _train_loss, _mse, DATA, DATA, DECAY, progress=False)
    for bad in (-1.0, 0.0):
        with pytest.raises(ValueError, match=r"`hparams\['decay'\]`: .* strictly inside \(low, high\) = \(0.0, None\)"):
            tuner.best_response_at({"decay": bad})
        with pytest.raises(ValueError, match=r"`hparams\['decay'\]`"):
            tuner.model_at({"decay": bad})
    with pytest.raises(ValueError, match=r"`hparams\['decay'\]` must have shape \(\) .* got \(3,\)"):
        tuner.best_response_at({"decay": torch.ones(3)})
    assert all(torch.isfinite(w).all() for w in tuner.best_response_at({"decay": 0.5}).values())
    for hyper in (Hyper(1 - 1e-8, low=0.0, high=1.0), Hyper(1e-50, low=0.0)):  # inside in float64, not in float32
        with pytest.raises(ValueError, match=r"HyperSpec: the `init` of hyper-parameter 'r': .* in torch.float32"):
            data32 = [(X.float(), X.sum(-1).float())]
            ImplicitHPO(nn.Linear(3, 1, dtype=torch.float32), _train_loss, _mse, data32, data32,
                        {"r": hyper, **DECAY}, progress=False)
