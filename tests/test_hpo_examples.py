"""The HPO example scripts deliver what they claim: the tuned model beats the
untuned default on held-out test data (slow: 20-35 s each; run with -m slow)."""

import importlib.util
import pathlib

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # plots land here
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the scripts run as users run them (the tests default to float64)
    try:
        return module.main([])[0]
    finally:
        torch.set_default_dtype(previous)


def row(table: dict, prefix: str) -> dict:
    matches = [value for key, value in table.items() if key.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(table))
    return matches[0]


@pytest.mark.slow
@pytest.mark.parametrize("name, tuned", [
    ("hpo_weight_decay", "implicit HPO"),
    ("hpo_hyper_cleaning", "implicit HPO"),
    ("hpo_hypernetwork", "hypernetwork HPO"),
])
def test_tuned_model_beats_untuned_default(name, tuned, tmp_path, monkeypatch):
    table = run_example(name, tmp_path, monkeypatch)
    assert row(table, tuned)["test_acc"] > row(table, "untuned default")["test_acc"]
    assert list(tmp_path.glob("*.png")), "the script saves its hyper-parameter trajectory plot"
