r"""
MoE hard constraints on a 1-D PDE
=================================

A small network proposes :math:`N` basis functions :math:`\phi_i(x, t)`; the
prediction is :math:`u = \sum_i \omega_i \phi_i`. How should the coefficients
:math:`\omega` respect the physics? We compare three answers on the heat
equation :math:`u_t = \nu u_{xx}` on :math:`[0, 1]^2`, with
:math:`u(x, 0) = \sin \pi x`, :math:`u(0, t) = u(1, t) = 0` and the exact
solution :math:`u = e^{-\nu\pi^2 t}\sin \pi x`:

1. **soft constraint**: :math:`\omega` is trained with the network, and the PDE
   residual is a penalty in the loss (a physics-informed network);
2. **hard constraint**: :math:`\omega^\star(\theta)` solves the PDE, its initial and
   boundary conditions in the least-squares sense at collocation points,
   :math:`\omega^\star = \operatorname{argmin}_\omega \tfrac12\|\mathcal R(u_\omega)\|^2`,
   and the network is trained *through* this solve (implicit function theorem);
3. **mixture of experts** (Chalapathi, Du and Krishnapriyan, ICLR 2024): the
   domain is split into :math:`K` pieces, and expert :math:`k` solves the
   hard constraint on its own collocation points with its own
   :math:`\omega^k`. The :math:`K` solves are one batched Gauss-Newton call,
   and the backward pass one batched linear solve.

All three are trained on the same loss, the misfit to 64 measurements of the
exact solution (plus the penalty for the soft constraint).
"""

# %%
# The problem and the basis
# -------------------------
# :func:`bilevel.problems.heat_1d` gives the exact solution and a pointwise
# residual ``residual(fields, points, kind)``. It is the PDE at interior points
# and :math:`u - u_{exact}` at initial and boundary points. ``fields`` holds
# :math:`u, u_x, u_t, u_{xx}`. :func:`bilevel.layers.evaluate_basis` computes
# these for every basis function with nested forward-mode derivatives of the
# network.
import time

import matplotlib.pyplot as plt
import torch

from bilevel.layers import (
    BoxPartition,
    HardConstraint,
    HardConstraintMoE,
    SoftConstraint,
    evaluate_basis,
)
from bilevel.problems import heat_1d
from bilevel.solvers import GaussNewton

torch.manual_seed(0)
dtype = torch.float64
problem = heat_1d(nu=0.1)
points, kind = problem.collocation(16, 16, dtype=dtype)  # 256 collocation points
measured = torch.rand(64, 2, dtype=dtype)  # where u is measured
u_measured = problem.exact(measured)
test = problem.grid(41, 41, dtype=dtype)
u_test = problem.exact(test)
FIELDS = {"u": (), "u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}  # name -> derivative (0 = x, 1 = t)
N, STEPS = 16, 100


def network():
    torch.manual_seed(1)  # the same initial network for every method
    return torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, N)
    ).to(dtype)


# %%
# The three layers
# ----------------
# The experts split the domain **in space**, as ``(K, 1)`` cells over
# :math:`(x, t)`. Each expert then holds its part of the initial condition.
# An expert that owns only a later time slab has no initial data: :math:`u = 0`
# would satisfy its PDE and boundary rows exactly. The heat equation is linear in
# :math:`\omega`, so Gauss-Newton solves each expert's least squares in one step.
# The default solver, Levenberg-Marquardt, is meant for nonlinear residuals.
K = 4
partition = BoxPartition(problem.lower, problem.upper, splits=(K, 1))
single = BoxPartition(problem.lower, problem.upper, splits=(1, 1))
layers = {
    "soft": (SoftConstraint(problem.residual, N, dtype=dtype), single),
    "hard": (HardConstraint(problem.residual, solver=GaussNewton()), single),
    f"MoE, K = {K}": (HardConstraintMoE(problem.residual, partition(points), solver=GaussNewton()), partition),
}

# %%
# Training
# --------
# The same loop trains each variant: basis at the collocation points, the
# layer's coefficients, the prediction at the measured points (each point uses
# its expert's coefficients), and Adam on the misfit.


def train(layer, part):
    net = network()
    optimizer = torch.optim.Adam([*net.parameters(), *layer.parameters()], lr=1e-2)
    experts_measured = part(measured)
    losses = []
    start = time.perf_counter()
    for _ in range(STEPS):
        basis = evaluate_basis(net, points, FIELDS)
        omega = layer(basis, points, kind)
        u = layer.fields(omega, net(measured), experts_measured)
        loss = ((u - u_measured) ** 2).mean()
        if isinstance(layer, SoftConstraint):
            loss = loss + layer.penalty(omega, basis, points, kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = (time.perf_counter() - start) / STEPS
    basis = evaluate_basis(net, points, FIELDS)
    omega = layer(basis, points, kind).detach()
    residual = layer.pde_residual(omega, basis, points, kind).detach()
    u = layer.fields(omega, net(test), part(test)).detach()
    return {
        "net": net, "omega": omega, "losses": losses, "ms_per_step": 1e3 * seconds,
        "residual_rms": float(residual.pow(2).mean().sqrt()),
        "error": float((u - u_test).norm() / u_test.norm()), "u": u,
    }


results = {name: train(layer, part) for name, (layer, part) in layers.items()}

# %%
# Results
# -------
# The relative error is :math:`\|u - u_{exact}\|/\|u_{exact}\|` on a
# :math:`41\times41` test grid. The PDE residual is the RMS of :math:`\mathcal R`
# at the 256 collocation points.
print("| method | ms / step | PDE residual (RMS) | relative error |")
print("|---|---|---|---|")
for name, r in results.items():
    print(f"| {name} | {r['ms_per_step']:.0f} | {r['residual_rms']:.1e} | {r['error']:.1e} |")
soft, hard, moe = results.values()
print(f"hard vs soft: PDE residual {soft['residual_rms'] / hard['residual_rms']:.0f}x smaller, "
      f"error {soft['error'] / hard['error']:.0f}x smaller")
print(f"MoE vs hard: PDE residual {hard['residual_rms'] / moe['residual_rms']:.0f}x smaller, "
      f"time per step x{moe['ms_per_step'] / hard['ms_per_step']:.1f}")
info = layers[f"MoE, K = {K}"][0].last_info
print(f"every expert converged: {bool(info.converged.all())}, Gauss-Newton iterations {info.iterations.tolist()}")

# %%
# The hard constraints make the residual small at every training step, so the
# training loss only has to fit the data. The soft constraint has to trade the
# penalty against the data, and after the same number of steps it is further
# from both. With the same :math:`N` per expert, the mixture has :math:`KN`
# coefficients and fits the PDE more closely on each subdomain. It does not
# fit the exact solution better here, though. Nothing ties the experts together at
# their interfaces, so the measurements near each interface are all that
# align neighbouring experts.
# In the paper, the mixture also saves time, because each expert's
# least-squares system is smaller than the global one. Here the systems are
# tiny. Forming and solving them costs little next to the network and its
# second derivatives, so the time per step barely changes.
#
# The left panel shows the training loss. The right panel shows the predictions
# at the final time, with the expert boundaries as dotted lines.
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name, r in results.items():
    axes[0].plot(r["losses"], label=name)
axes[0].set_yscale("log")
axes[0].set_xlabel("training step")
axes[0].set_ylabel("training loss")
axes[0].legend()
final = test[:, 1] == 1.0
x = test[final, 0]
axes[1].plot(x, u_test[final], "k-", lw=3, alpha=0.3, label="exact")
for name, r in results.items():
    axes[1].plot(x, r["u"][final], label=name)
for edge in torch.linspace(0, 1, K + 1)[1:-1].tolist():
    axes[1].axvline(edge, color="gray", ls=":")
axes[1].set_xlabel("x")
axes[1].set_ylabel("u(x, t = 1)")
axes[1].legend()
fig.tight_layout()

# %%
# References: Chalapathi, Du and Krishnapriyan, `Scaling physics-informed hard
# constraints with mixture-of-experts <https://arxiv.org/abs/2402.13412>`_,
# ICLR 2024. Négiar, Mahoney and Krishnapriyan, `Learning differentiable
# solvers for systems with hard constraints <https://arxiv.org/abs/2207.08675>`_,
# ICLR 2023.
