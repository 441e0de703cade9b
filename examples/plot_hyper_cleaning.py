r"""
Data hyper-cleaning on digits with ``bilevel.solve``
====================================================

Half of the training labels are wrong. Which ones? *Data hyper-cleaning*
(Franceschi et al., 2017) learns one weight per training example. A classifier
trained on the weighted data should do well on a small clean validation set.
The weights of the corrupted examples are then driven towards zero:

.. math::

    \min_x \; F(x, y^\star(x)) = \frac{1}{n_{val}} \sum_{i \in \text{val}} \operatorname{CE}(W a_i + b, c_i),
    \qquad
    y^\star(x) = \arg\min_{y = (W, b)} \frac{1}{n} \sum_{i=1}^{n} \sigma(x_i)\, \operatorname{CE}(W a_i + b, \tilde c_i)
    + \frac{\mu}{2} \|y\|^2 ,

with :math:`\tilde c` the corrupted training labels, :math:`\sigma` the
logistic function and :math:`\operatorname{CE}` the cross-entropy. The inner
problem is strongly convex (:math:`\mu > 0`), so the implicit function theorem
applies. This is the problem of ``python -m bilevel``, here with fewer steps.
"""

# %%
# The problem
# -----------
# :func:`bilevel.problems.hyper_cleaning_digits` builds it from
# scikit-learn's 8x8 digits: 600 training examples (300 of them with a wrong
# label), 600 clean validation examples and the rest for testing. ``x`` holds
# one logit per training example. ``y`` holds the weights of a linear softmax
# classifier, as a dict ``{"weight": (10, 64), "bias": (10,)}``.
import time
import warnings

import matplotlib.pyplot as plt
import torch

import bilevel
from bilevel.implicit import CG
from bilevel.problems import hyper_cleaning_digits
from bilevel.solvers import LBFGS

problem = hyper_cleaning_digits(corruption=0.5)
data = problem.data
corrupted = data["corrupted"]
print(f"{len(data['labels_train'])} training examples, {int(corrupted.sum())} with a wrong label; "
      f"{len(data['labels_val'])} validation, {len(data['labels_test'])} test")

# %%
# The baseline is a classifier trained on all the corrupted labels with equal
# weights, i.e. the inner problem solved once at the start point :math:`x = 0`.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", bilevel.BilevelWarning)
    unweighted, _ = LBFGS(maxiter=500).run(lambda y, x: problem.inner(x, y), problem.y0, problem.x0)
print(f"unweighted: test accuracy {data['accuracy'](unweighted):.3f}")

# %%
# Three methods, one call each
# ----------------------------
# :func:`bilevel.solve` runs the outer loop (Adam on ``x``) with the
# hypergradient of the chosen method:
#
# * ``"implicit"``: 20 warm-started L-BFGS steps on the inner problem, then
#   the implicit function theorem with 30 CG steps;
# * ``"unrolled"``: reverse mode through 30 warm-started gradient steps;
# * ``"one_step"``: the DARTS-style one-step approximation, which is cheap and biased.
#
# The truncated inner and CG solves are part of each method's design. They
# warn when they stop short of their tolerance, so we silence those warnings
# here; ``result.history`` keeps the residuals of every step.
methods = {
    "implicit": dict(method="implicit", inner_solver=LBFGS(maxiter=20), solve=CG(maxiter=30)),
    "unrolled": dict(method="unrolled", steps=30, warm_start=True),
    "one_step": dict(method="one_step"),
}
steps = 100
results, seconds = {}, {}
for name, options in methods.items():
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.BilevelWarning)
        results[name] = bilevel.solve(problem, lr=0.1, max_steps=steps, progress=False, **options)
    seconds[name] = time.perf_counter() - start

print(f"{'method':10s} {'val. loss':>9s} {'test acc.':>9s} {'cleaning F1':>11s} {'time (s)':>8s}")
print(f"{'unweighted':10s} {float(problem.outer(problem.x0, unweighted)):9.4f} "
      f"{data['accuracy'](unweighted):9.3f} {'-':>11s} {'-':>8s}")
for name, result in results.items():
    print(f"{name:10s} {result.history['outer'][-1]:9.4f} {data['accuracy'](result.y):9.3f} "
          f"{data['cleaning_f1'](result.x):11.3f} {seconds[name]:8.1f}")

# %%
# "Cleaning F1" scores the learned weights as a detector of the wrong labels:
# an example is flagged when its weight :math:`\sigma(x_i)` is below 1/2.
#
# Convergence and the learned weights
# -----------------------------------
# The left panel shows the validation loss over the outer steps. The right
# panel shows the weights learned by the implicit method, separately for the
# examples whose label is right and those whose label is wrong.
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name, result in results.items():
    axes[0].plot(result.history["step"], result.history["outer"], label=name)
axes[0].set_yscale("log")
axes[0].set_xlabel("outer step")
axes[0].set_ylabel("validation loss")
axes[0].legend()
weights = torch.sigmoid(results["implicit"].x)
bins = torch.linspace(0, 1, 26).tolist()
axes[1].hist(weights[~corrupted].tolist(), bins=bins, alpha=0.7, label="right label")
axes[1].hist(weights[corrupted].tolist(), bins=bins, alpha=0.7, label="wrong label")
axes[1].set_xlabel(r"learned weight $\sigma(x_i)$ (implicit)")
axes[1].set_ylabel("training examples")
axes[1].legend()
fig.tight_layout()

# %%
# The certificate of the last implicit step gives the inner gradient norm
# where the implicit function theorem was applied, and the relative residual
# of the CG solve:
history = results["implicit"].history
print(f"last implicit step: inner residual {history['inner_residual'][-1]:.1e}, "
      f"linear-solve residual {history['linear_residual'][-1]:.1e}")
print(f"mean weight: right labels {float(weights[~corrupted].mean()):.2f}, "
      f"wrong labels {float(weights[corrupted].mean()):.2f}")

# %%
# References: Franceschi, Donini, Frasconi and Pontil, `Forward and reverse
# gradient-based hyperparameter optimization <https://arxiv.org/abs/1703.01785>`_,
# ICML 2017. Shaban, Cheng, Hatch and Boots, `Truncated back-propagation for
# bilevel optimization <https://arxiv.org/abs/1810.10667>`_, AISTATS 2019.
