r"""
A convex optimization layer inside a model
==========================================

Some predictions must satisfy hard constraints: an allocation that sums to
one and respects a capacity limit for each item, a schedule within its
budgets, a control within its bounds. A network with an ordinary last layer
gets close to such constraints at best. A *convex optimization layer* makes
them hold by construction. Its output is the solution of a convex problem
whose data come from the layers before it. Here the layer is the Euclidean
projection of the network's raw output :math:`\hat z` onto the feasible set
:math:`P(c)`:

.. math::

    z^\star(\hat z, c) = \arg\min_z \; \tfrac12 \|z - \hat z\|^2
    \quad\text{s.t.}\quad z \ge 0, \quad \textstyle\sum_i z_i = 1, \quad z \le c ,

with capacities :math:`c` that change from one example to the next.
:class:`bilevel.layers.ConvexLayer` solves the problem for a whole batch at
once. Its backward pass applies the implicit function theorem to the
optimality (KKT) conditions at the solution, so the network trains end to
end with any ``torch.optim`` optimizer. This tutorial shows:

1. the layer, built from a `CVXPY <https://www.cvxpy.org>`_ problem;
2. training with the layer and without it: feasibility, loss, test error;
3. a check of the gradients against finite differences;
4. batching, and the two solver routes: ``ConvexLayer`` and
   :class:`~bilevel.layers.QPLayer`.
"""

# %%
# The layer
# ---------
# CVXPY describes the problem. The raw output and the capacities are
# ``cp.Parameter`` objects: their values are the layer's inputs. The problem
# must be DPP (disciplined parametrized programming), which means that the
# parameters enter it affinely. Then CVXPY compiles it once, and every call
# only fills in numbers.
#
# We write the objective as :math:`\tfrac12\|z\|^2 - \hat z^\top z`. It differs
# from :math:`\tfrac12\|z - \hat z\|^2` by a constant, so the solution is the
# same. But with ``sum_squares(z - raw)``, CVXPY adds an auxiliary variable for
# :math:`z - \hat z`, and the compiled problem has twice as many variables and
# runs up to three times slower.
import time
import warnings

import cvxpy as cp
import matplotlib.pyplot as plt
import torch

import bilevel
from bilevel.layers import ConvexLayer, QPLayer

torch.manual_seed(0)
dtype = torch.float64
k, d = 6, 6  # items to allocate, input features

z_var = cp.Variable(k, name="z")
raw_par = cp.Parameter(k, name="raw")
cap_par = cp.Parameter(k, name="cap")
projection = cp.Problem(
    cp.Minimize(0.5 * cp.sum_squares(z_var) - raw_par @ z_var),
    [z_var >= 0, cp.sum(z_var) == 1, z_var <= cap_par],
)
layer = ConvexLayer(projection, parameters=[raw_par, cap_par], variables=[z_var])
print(layer)

# %%
# The problem is a QP, so ``method="auto"`` sends it to the batched
# interior-point solver :func:`~bilevel.layers.qp_solve`, which runs in torch
# on the device and in the dtype of the inputs. We work in float64, so that
# the checks below can be tight.
#
# The data
# --------
# Each example has 6 features :math:`u` and 6 capacities :math:`c_i \in [0.15, 0.6]`.
# The target allocation comes from a rule that the model does not know: a
# random two-layer network of :math:`u`, projected onto :math:`P(c)` by the
# same problem. So every target is feasible, and many lie on the boundary of
# :math:`P(c)`: an item gets nothing, or exactly its capacity.
gen = torch.Generator().manual_seed(0)
W1 = torch.randn(d, 16, generator=gen, dtype=dtype)
W2 = torch.randn(16, k, generator=gen, dtype=dtype) / 4


def make_data(n):
    u = torch.randn(n, d, generator=gen, dtype=dtype)
    cap = 0.15 + 0.45 * torch.rand(n, k, generator=gen, dtype=dtype)
    (target,) = layer(torch.tanh(u @ W1) @ W2, cap)
    return u, cap, target


u_train, cap_train, t_train = make_data(256)
u_test, cap_test, t_test = make_data(256)
print(f"targets: {float((t_train < 1e-9).double().mean()):.0%} of the entries are 0, "
      f"{float((t_train > cap_train - 1e-9).double().mean()):.0%} are at their capacity")


def violation(z, cap):
    """Largest violation of z >= 0, sum(z) = 1 and z <= cap, per example."""
    return torch.stack([(-z).clamp_min(0).amax(-1), (z - cap).clamp_min(0).amax(-1),
                        (z.sum(-1) - 1).abs()]).amax(0)


# %%
# Two models
# ----------
# Both models start with the same small network. It sees the features and
# the capacities, and returns a raw allocation :math:`\hat z`. The constrained
# model passes :math:`\hat z` through the layer. The baseline returns
# :math:`\hat z` as it is. A softmax would give a non-negative output that sums
# to one, but it would not respect the capacities, and it never gives an exact
# zero.


class Allocator(torch.nn.Module):
    def __init__(self, project: bool):
        super().__init__()
        self.project = project
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + k, 64, dtype=dtype), torch.nn.Tanh(), torch.nn.Linear(64, k, dtype=dtype))

    def forward(self, u, cap):
        raw = self.net(torch.cat([u, cap], -1))
        if not self.project:
            return raw
        (z,) = layer(raw, cap)  # one call for the whole batch
        return z


def loss_fn(z, target):
    return ((z - target) ** 2).sum(-1).mean()


# %%
# Training
# --------
# Full-batch Adam, 200 steps, for both models. We record the loss and the
# largest constraint violation at every step.
#
# Where the raw output lies exactly where the set of active constraints
# changes (a coordinate that is just at 0 or just at its capacity), the
# projection has a kink and is not differentiable. The layer then returns a
# generalized gradient and warns with a :class:`~bilevel.status.CurvatureWarning`.
# The targets lie on such faces, so the network learns to put its raw outputs
# near them, and in many steps a few examples of the batch come within the
# warning's threshold. This is harmless here, so we count these warnings
# instead of printing each one.


def train(model, steps=200, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = {"loss": [], "violation": []}
    degenerate_steps = 0
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", bilevel.CurvatureWarning)
            z = model(u_train, cap_train)
            loss = loss_fn(z, t_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        degenerate_steps += any(issubclass(w.category, bilevel.CurvatureWarning) for w in caught)
        history["loss"].append(float(loss.detach()))
        history["violation"].append(float(violation(z.detach(), cap_train).max()))
    return history, degenerate_steps


models, histories, seconds = {}, {}, {}
for name, project in (("convex layer", True), ("unconstrained", False)):
    torch.manual_seed(1)  # the same initial network for both
    models[name] = Allocator(project)
    start = time.perf_counter()
    histories[name], degenerate = train(models[name])
    seconds[name] = time.perf_counter() - start
    if project:
        degenerate_steps = degenerate

results = {}
with torch.no_grad():
    for name, model in models.items():
        z = model(u_test, cap_test)
        v = violation(z, cap_test)
        results[name] = {"test_loss": float(loss_fn(z, t_test)), "test_violation": float(v.max()),
                         "infeasible": float((v > 1e-6).double().mean())}

print(f"{'model':14s} {'train loss: start':>17s} {'end':>8s} {'max violation, training':>23s} "
      f"{'test loss':>9s} {'test violation':>14s} {'infeasible':>10s} {'time (s)':>8s}")
for name, h in histories.items():
    r = results[name]
    print(f"{name:14s} {h['loss'][0]:17.4f} {h['loss'][-1]:8.4f} {max(h['violation']):23.1e} "
          f"{r['test_loss']:9.4f} {r['test_violation']:14.1e} {r['infeasible']:10.0%} {seconds[name]:8.1f}")
print(f"training steps with a degenerate batch element (CurvatureWarning): {degenerate_steps} of 200")

# %%
# The outputs of the convex layer are feasible at every step, to the
# solver's accuracy (its tolerance is about :math:`2 \cdot 10^{-12}` in
# float64, and the violations above are far smaller). The unconstrained
# network violates the constraints on almost every test example, and it also
# fits worse: the layer builds in structure that the network would otherwise
# have to learn. The layer costs time, though: one batched QP solve per
# forward pass and one batched linear solve per backward pass.
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
floor = torch.finfo(dtype).eps  # exact zeros drawn at machine precision
for name, h in histories.items():
    axes[0].semilogy(h["loss"], label=name)
    axes[1].semilogy([max(v, floor) for v in h["violation"]], label=name)
axes[0].set_ylabel("training loss")
axes[1].set_ylabel("largest constraint violation")
for ax in axes:
    ax.set_xlabel("Adam step")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
fig.tight_layout()

# %%
# One test example: the target, both predictions, and the capacities. The
# unconstrained prediction has negative entries, exceeds a capacity, or does
# not sum to one.
i = int(torch.argmax(violation(models["unconstrained"](u_test, cap_test).detach(), cap_test)[:20]))
with torch.no_grad():
    bars = {"target": t_test[i], "convex layer": models["convex layer"](u_test[i:i + 1], cap_test[i:i + 1])[0],
            "unconstrained": models["unconstrained"](u_test[i:i + 1], cap_test[i:i + 1])[0]}
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.27
items = range(k)
for j, (name, values) in enumerate(bars.items()):
    ax.bar([item + (j - 1) * width for item in items], values.tolist(), width,
           label=f"{name} (sum {float(values.sum()):.2f})")
ax.hlines(cap_test[i].tolist(), [item - 0.45 for item in items], [item + 0.45 for item in items],
          colors="k", label="capacity")
ax.axhline(0, color="gray", linewidth=0.8)
ax.set_xlabel("item")
ax.set_ylabel("allocation")
ax.set_title(f"test example {i}")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Checking the gradients
# ----------------------
# :func:`torch.autograd.gradcheck` compares the layer's Jacobian-vector
# products with finite differences, in float64, with respect to both
# inputs. We draw the inputs at random, so they are away from a kink.
raw0 = torch.randn(4, k, dtype=dtype, requires_grad=True)
cap0 = (0.15 + 0.45 * torch.rand(4, k, dtype=dtype)).requires_grad_()
gradcheck_ok = torch.autograd.gradcheck(lambda raw, cap: layer(raw, cap)[0], (raw0, cap0))
print(f"gradcheck of the layer (raw output and capacities): {gradcheck_ok}")

# %%
# The same check through the whole trained model: the derivative of the test
# loss along a random direction :math:`\delta` of all the network's weights
# :math:`w`, against the central difference
# :math:`(L(w + \epsilon\delta) - L(w - \epsilon\delta)) / 2\epsilon`.
model = models["convex layer"]
weights = list(model.parameters())
saved = [w.detach().clone() for w in weights]
direction = [torch.randn_like(w) for w in weights]


def test_loss():
    return loss_fn(model(u_test[:32], cap_test[:32]), t_test[:32])


grads = torch.autograd.grad(test_loss(), weights)
analytic = float(sum((g * delta).sum() for g, delta in zip(grads, direction)))
eps = 1e-6
values = []
with torch.no_grad():
    for sign in (1, -1):
        for w, w0, delta in zip(weights, saved, direction):
            w.copy_(w0 + sign * eps * delta)
        values.append(float(test_loss()))
    for w, w0 in zip(weights, saved):
        w.copy_(w0)
finite_difference = (values[0] - values[1]) / (2 * eps)
fd_relative_difference = abs(analytic - finite_difference) / abs(finite_difference)
print(f"directional derivative, implicit:           {analytic:.10f}")
print(f"directional derivative, finite differences: {finite_difference:.10f}")
print(f"relative difference: {fd_relative_difference:.1e}")

# %%
# Batching
# --------
# Every parameter tensor may carry a leading batch dimension, and those that
# do not are shared by all examples. One call then solves all the problems
# together: the interior point factorizes the whole batch of KKT systems at
# every iteration. Below, one call on 64 examples against 64 calls on one
# example each.
with torch.no_grad():
    raw_test = model.net(torch.cat([u_test, cap_test], -1))
start = time.perf_counter()
(batched,) = layer(raw_test[:64], cap_test[:64])
batched_ms = 1e3 * (time.perf_counter() - start)
start = time.perf_counter()
looped = torch.stack([layer(r, c)[0] for r, c in zip(raw_test[:64], cap_test[:64])])
looped_ms = 1e3 * (time.perf_counter() - start)
batch_difference = float((batched - looped).abs().max())
print(f"one batched call: {batched_ms:.0f} ms; 64 single calls: {looped_ms:.0f} ms; "
      f"largest difference {batch_difference:.1e}")
(shared,) = layer(raw_test, torch.full((k,), 0.3, dtype=dtype))  # one capacity vector for all
print(f"raw output {tuple(raw_test.shape)} with shared capacities {(k,)} -> output {tuple(shared.shape)}")

# %%
# Two routes to the same solution
# -------------------------------
# ``ConvexLayer`` picks its solver from the compiled problem:
#
# * ``method="auto"`` (the default) sends LPs and QPs to the batched
#   interior point in torch (``"qp"``), and other problems (second-order,
#   semidefinite, exponential and power cones) to Clarabel, one example at a
#   time, with the derivative
#   of the cone program's residual map (``"conic"``);
# * ``method="qp"`` requires the QP route, and ``method="conic"`` forces the
#   Clarabel route, for example to cross-check a result.
#
# When you already have the QP's matrices, :class:`~bilevel.layers.QPLayer`
# skips CVXPY altogether. It takes :math:`Q, q, A, b, G, h` of
# :math:`\min \tfrac12 z^\top Q z + q^\top z` s.t. :math:`Az = b`, :math:`Gz \le h`,
# and differentiates with respect to all six. Our projection is
# :math:`Q = I`, :math:`q = -\hat z`, :math:`A = \mathbf 1^\top`, :math:`b = 1`,
# :math:`G = \begin{pmatrix} -I \\ I \end{pmatrix}`, :math:`h = \begin{pmatrix} 0 \\ c \end{pmatrix}`.
conic_layer = ConvexLayer(projection, parameters=[raw_par, cap_par], variables=[z_var], method="conic")
qp_layer = QPLayer()
eye = torch.eye(k, dtype=dtype)
ones = torch.ones(1, k, dtype=dtype)
G = torch.cat([-eye, eye])


def with_qp_layer(raw, cap):
    return qp_layer(eye, -raw, ones, torch.ones(1, dtype=dtype), G, torch.cat([torch.zeros_like(cap), cap], -1))


routes = {"ConvexLayer, qp": lambda raw, cap: layer(raw, cap)[0],
          "ConvexLayer, conic": lambda raw, cap: conic_layer(raw, cap)[0],
          "QPLayer": with_qp_layer}
raw_b, cap_b = raw_test[:16].clone().requires_grad_(), cap_test[:16].clone().requires_grad_()
weights_b = torch.randn(16, k, dtype=dtype)
outputs = {}
for name, route in routes.items():
    start = time.perf_counter()
    z = route(raw_b, cap_b)
    grad_raw, grad_cap = torch.autograd.grad((z * weights_b).sum(), (raw_b, cap_b))
    outputs[name] = (z.detach(), grad_raw, grad_cap, 1e3 * (time.perf_counter() - start))
reference = outputs["ConvexLayer, qp"]
route_differences = {}
print(f"{'route':20s} {'forward + backward (ms)':>23s} {'diff. in z':>10s} {'diff. in gradients':>18s}")
for name, (z, grad_raw, grad_cap, ms) in outputs.items():
    route_differences[name] = (float((z - reference[0]).abs().max()),
                               max(float((grad_raw - reference[1]).abs().max()),
                                   float((grad_cap - reference[2]).abs().max())))
    print(f"{name:20s} {ms:23.1f} {route_differences[name][0]:10.1e} {route_differences[name][1]:18.1e}")

# %%
# The QP route of ``ConvexLayer`` and ``QPLayer`` solve the same QP with the
# same interior point, so they agree to rounding. The conic route agrees to about :math:`10^{-9}` in the
# solution and :math:`10^{-7}` in the gradients: it is a different solver,
# and a few of these trained raw outputs lie close to a kink. Which one to
# use:
#
# * **ConvexLayer** when the problem is easier to write in CVXPY than as
#   matrices, or when it is not a QP (norms, logarithms, entropies, powers:
#   second-order, semidefinite, exponential or power cones). CVXPY compiles it
#   once, when the layer is built.
# * **QPLayer** when you have the matrices, or want them to be outputs of the
#   network themselves (a learned cost :math:`Q, q` or learned constraints
#   :math:`G, h`). It needs no CVXPY and runs on a GPU.
# * ``method="conic"`` to cross-check the QP route, or for problems that it
#   does not cover. It solves one example at a time on the CPU, so it is
#   slower for large batches.
#
# The same pattern fits other uses: a QP whose cost or constraints the
# network predicts, a feasibility repair before a simulator, or sparse
# attention weights (sparsemax is the projection onto the simplex). One
# caution: the solution of an LP is piecewise constant in its cost, so its
# gradient with respect to the cost is zero almost everywhere. To learn the
# cost of an LP, add a small quadratic term to its objective.
#
# References: Amos and Kolter, `OptNet: differentiable optimization as a layer
# in neural networks <https://arxiv.org/abs/1703.00443>`_, ICML 2017.
# Agrawal, Amos, Barratt, Boyd, Diamond and Kolter, `Differentiable convex
# optimization layers <https://arxiv.org/abs/1910.12430>`_, NeurIPS 2019.
