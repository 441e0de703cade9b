"""Ctrl-C during ``bilevel.solve`` and the HPO tuners: the run stops after the step in
progress and returns a result whose state resumes it exactly; a second Ctrl-C raises."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

import bilevel
from bilevel._interrupt import StopRequest
from bilevel.problems import quadratic

pytestmark = [
    pytest.mark.filterwarnings("ignore::bilevel.BilevelWarning"),
    pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals"),
]


def _interrupt_at(step: int, times: int = 1):
    """A callback that sends this process SIGINT ``times`` times after ``step``."""
    def callback(state, record):
        if state.iteration == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return False
    return callback


@pytest.mark.parametrize("method", ["implicit", "penalty"])
def test_ctrl_c_stops_after_the_step_and_the_state_resumes_the_run(method):
    problem = quadratic()
    full = bilevel.solve(problem, method=method, max_steps=40, progress=False, callback=lambda s, r: False)
    part = bilevel.solve(problem, method=method, max_steps=40, progress=False, callback=_interrupt_at(12))
    assert part.state.iteration == 12 and len(part.history["outer"]) == 12
    assert "Ctrl-C after step 12" in part.message and not part.converged
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    rest = bilevel.solve(problem, method=method, max_steps=40, progress=False, resume=part.state)
    torch.testing.assert_close(rest.x, full.x, rtol=0, atol=0)
    torch.testing.assert_close(part.history["outer"] + rest.history["outer"], full.history["outer"], rtol=0, atol=0)


def test_a_second_ctrl_c_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt):
        bilevel.solve(quadratic(), max_steps=40, progress=False, callback=_interrupt_at(3, times=2))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_set_by_the_user_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        result = bilevel.solve(quadratic(), max_steps=20, progress=False, callback=_interrupt_at(5))
        assert seen == [signal.SIGINT] and result.state.iteration == 20
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_is_installed():
    found = []

    def work():
        with StopRequest() as stop:
            found.append((stop._previous, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert found == [(None, signal.default_int_handler)]


def test_the_tuner_stops_after_the_hyper_step_and_its_state_resumes_the_run():
    from torch import nn

    from bilevel.hpo import Hyper, implicit_hpo, l2_penalty

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g)
    t = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(40, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    mse = lambda m, batch: 0.5 * ((m(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()  # noqa: E731
    loss = lambda m, batch, hp: mse(m, batch) + l2_penalty(m, hp["decay"])  # noqa: E731
    data = [(X[:30], t[:30])], [(X[30:], t[30:])]
    spec = {"decay": Hyper(1e-2, low=0.0, per_weight=True)}
    run = lambda **kw: implicit_hpo(model, loss, mse, *data, spec, max_steps=6, progress=False, **kw)  # noqa: E731

    def interrupt(tuner, record):
        if tuner.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    full = run()
    part = run(callback=interrupt)
    assert "Ctrl-C after hyper-step 2" in part.message and len(part.history["val_loss"]) == 2
    rest = run(resume=part.state)
    for a, b in zip(full.hparams["decay"].values(), rest.hparams["decay"].values()):
        assert torch.equal(a, b)


def test_a_nested_solve_runs_to_its_end_and_the_outer_run_stops_after_its_step():
    """Ctrl-C while a solve runs inside the outer run's callback: cutting the inner run short
    would corrupt the outer step in progress, so the inner one installs nothing and ends
    normally; the outer run stops after that step."""
    inner_runs = []

    def outer_callback(state, record):
        if state.iteration == 3:
            inner_runs.append(bilevel.solve(quadratic(), max_steps=10, progress=False, callback=_interrupt_at(2)))
        return False

    result = bilevel.solve(quadratic(), max_steps=40, progress=False, callback=outer_callback)
    assert inner_runs[0].state.iteration == 10 and inner_runs[0].message.startswith("reached max_steps")
    assert result.state.iteration == 3 and "Ctrl-C after step 3 of 40" in result.message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_the_last_step_is_no_interruption():
    result = bilevel.solve(quadratic(), max_steps=5, progress=False, callback=_interrupt_at(5))
    assert result.state.iteration == 5 and result.message == "reached max_steps=5"


def test_the_interruption_warns():
    with pytest.warns(bilevel.BilevelWarning, match=r"stopped by Ctrl-C after step 4 of 30"):
        bilevel.solve(quadratic(), max_steps=30, progress=False, callback=_interrupt_at(4))
