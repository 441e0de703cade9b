"""GPU (and CPU) benchmark: batched Hessian-vector products and CG hypergradients
through a realistic network, and batched against looped independent systems.

Runs on CUDA when a GPU is present, on the CPU otherwise (``--device``), and
prints which device it used.  Two tables:

1. **Network** (a ResNet with GroupNorm, ResNet-18-sized on CUDA, narrower on
   the CPU, and a small pre-norm transformer; synthetic data).  The inner
   problem is the training cross-entropy plus a weight decay with one
   hyper-parameter per weight, :math:`f(\\lambda, w) = \\mathrm{CE}_{train}(w) +
   \\tfrac12 \\sum_i e^{\\lambda_i} w_i^2`; the outer problem is the validation
   cross-entropy.  At the current weights it times

   * ``K`` Hessian-vector products in one batched call,
     ``bilevel.implicit.operators.batched(hessian_operator(...))``, against
     plain PyTorch: ``torch.autograd.grad(..., is_grads_batched=True)`` on a
     ``create_graph`` gradient, and a loop of ``K`` ``torch.autograd.grad``;
   * the CG hypergradient with exactly ``k`` iterations,
     ``bilevel.hypergrad(..., solve=CG(maxiter=k))``, against the floor
     (hand-written CG over ``torch.autograd.grad`` products, no host
     synchronization, plus the gradients the formula needs) and TorchOpt's
     ``custom_root`` with ``solve_cg(maxiter=k)`` (a column of ``n/a`` when
     TorchOpt does not import);

   with each method's peak memory: ``torch.cuda.max_memory_allocated`` above
   the start on CUDA; on the CPU the growth of the process's peak resident set
   (``VmHWM``, reset through ``/proc/self/clear_refs`` before each method).

2. **Batched vs looped** independent problems, for 64 and 1024 of them: a
   batched CG solve of SPD systems (``CG()(matvec, b, batch_dims=1)``) against
   a loop of single solves, and ``torch.func.vmap(bilevel.hypergrad)`` over
   ridge problems against a loop of ``bilevel.hypergrad``.

Usage::

    python benchmarks/gpu.py                  # full run on the best device
    python benchmarks/gpu.py --quick          # smoke test (tiny sizes), well under a minute
    python benchmarks/gpu.py --device cpu --models resnet --k 10 --tangents 8
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _machine import busy as _busy  # noqa: E402
from _machine import load_average as _load  # noqa: E402
from _machine import proc_status_kib as _status_kb  # noqa: E402
from _machine import reset_peak_rss  # noqa: E402

import bilevel  # noqa: E402
from bilevel.implicit import CG  # noqa: E402
from bilevel.implicit.hypergrad import estimate_lipschitz  # noqa: E402
from bilevel.implicit.operators import batched, hessian_operator  # noqa: E402

TIGHT = 1e-30  # a CG tolerance so small that exactly k iterations run


# ---------------------------------------------------------------------------
# Networks (GroupNorm, not BatchNorm: no batch statistics, so the objective is a
# pure function of the weights and Hessian-vector products are well defined)
# ---------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout // 2), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout // 2), cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(8, cout // 2), cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    """ResNet-18's layout (4 stages of 2 basic blocks) at a chosen width; width 64 is ResNet-18 (11 M weights)."""

    def __init__(self, width: int = 64, blocks: int = 2, classes: int = 10):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(min(8, width // 2), width),
                                  nn.ReLU())
        layers, cin = [], width
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(Block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention written out (softmax(QK^T / sqrt(d)) V): twice differentiable
    everywhere, unlike fused attention kernels."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class Transformer(nn.Module):
    """A small pre-norm transformer encoder classifying token sequences."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, vocab: int = 512, seq: int = 64,
                 classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim), "attn": Attention(dim, heads), "norm2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x).mean(1))


def build(model_name: str, size: dict, device, dtype, seed: int = 0):
    """The model, its weights as a dict, training / validation batches (synthetic)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = size["batch"]
    if model_name == "resnet":
        model = ResNet(width=size["width"], blocks=size["blocks"])
        data = [torch.randn(n, 3, size["image"], size["image"], generator=g) for _ in range(2)]
    else:
        model = Transformer(dim=size["dim"], depth=size["depth"], seq=size["seq"])
        data = [torch.randint(0, 512, (n, size["seq"]), generator=g) for _ in range(2)]
    labels = [torch.randint(0, 10, (n,), generator=g) for _ in range(2)]
    model = model.to(device=device, dtype=dtype)
    data = [d.to(device=device, dtype=dtype) if d.is_floating_point() else d.to(device) for d in data]
    labels = [t.to(device) for t in labels]
    weights = {k: p.detach() for k, p in model.named_parameters()}
    return model, weights, (data[0], labels[0]), (data[1], labels[1])


class Bench:
    """The bilevel problem on a network: ``inner(lam, w)``, ``outer(lam, w)`` with
    ``lam`` and ``w`` dicts of tensors of the same shapes (one decay per weight)."""

    def __init__(self, model: nn.Module, weights: dict, train, val, decay: Optional[float]):
        self.model, self.w, self.train, self.val = model, weights, train, val
        if decay is None:  # twice the largest |eigenvalue| of the loss Hessian: H + decay I is SPD
            self.lam = {k: torch.full_like(p, -30.0) for k, p in weights.items()}
            decay = 2.0 * float(estimate_lipschitz(self.inner, self.lam, self.w, iterations=15))
        self.decay = decay
        self.lam = {k: torch.full_like(p, math.log(decay)) for k, p in weights.items()}

    def inner(self, lam, w):
        X, t = self.train
        loss = F.cross_entropy(functional_call(self.model, w, (X,)), t)
        return loss + 0.5 * sum((lam[k].exp() * w[k] ** 2).sum() for k in w)

    def outer(self, lam, w):
        X, t = self.val
        return F.cross_entropy(functional_call(self.model, w, (X,)), t)

    def numel(self) -> int:
        return sum(p.numel() for p in self.w.values())


# ---------------------------------------------------------------------------
# The methods: each build returns a thunk computing a list of tensors
# ---------------------------------------------------------------------------
def _leaves(d: dict) -> list:
    return [d[k] for k in sorted(d)]


def _tangents(b: Bench, K: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn((K, *p.shape), generator=g, dtype=p.dtype).to(p.device) for k, p in b.w.items()}


def hvp_ours(b: Bench, K: int) -> Callable[[], list]:
    V = _tangents(b, K)

    def run():
        _, hvp = hessian_operator(lambda w, lam: b.inner(lam, w), b.w, b.lam)
        return _leaves(batched(hvp)(V))
    return run


def _graph(b: Bench):
    w = {k: p.detach().requires_grad_() for k, p in b.w.items()}
    lam = {k: p.detach().requires_grad_() for k, p in b.lam.items()}
    keys = sorted(w)
    g = torch.autograd.grad(b.inner(lam, w), [w[k] for k in keys], create_graph=True)
    return w, lam, keys, g


def hvp_floor_batched(b: Bench, K: int) -> Callable[[], list]:
    V = _tangents(b, K)

    def run():
        with torch.enable_grad():
            w, _, keys, g = _graph(b)
            return list(torch.autograd.grad(g, [w[k] for k in keys], [V[k] for k in keys], is_grads_batched=True))
    return run


def hvp_floor_loop(b: Bench, K: int) -> Callable[[], list]:
    V = _tangents(b, K)

    def run():
        with torch.enable_grad():
            w, _, keys, g = _graph(b)
            outs = [torch.autograd.grad(g, [w[k] for k in keys], [V[k][i] for k in keys], retain_graph=True)
                    for i in range(K)]
        return [torch.stack(parts) for parts in zip(*outs)]
    return run


def _cg_fixed(matvec, b: list, k: int) -> list:
    """Exactly ``k`` CG iterations on lists of tensors, no convergence test, no host sync."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = sum((t * t).sum() for t in r)
    for _ in range(k):
        Ap = matvec(p)
        alpha = rs / sum((a * c).sum() for a, c in zip(p, Ap))
        x = [a + alpha * c for a, c in zip(x, p)]
        r = [a - alpha * c for a, c in zip(r, Ap)]
        rs_new = sum((t * t).sum() for t in r)
        p = [a + (rs_new / rs) * c for a, c in zip(r, p)]
        rs = rs_new
    return x


def cg_floor(b: Bench, k: int) -> Callable[[], list]:
    def run():
        with torch.enable_grad():
            w, lam, keys, g = _graph(b)
            gy = torch.autograd.grad(b.outer(lam, w), [w[k] for k in keys])
            v = _cg_fixed(lambda u: torch.autograd.grad(g, [w[k] for k in keys], u, retain_graph=True), list(gy), k)
            cross = torch.autograd.grad(g, [lam[k] for k in keys], v)
        return [-c for c in cross]  # the outer objective does not depend on lam directly
    return run


def cg_ours(b: Bench, k: int) -> Callable[[], list]:
    solve = CG(maxiter=k, tol=TIGHT)

    def run():
        return _leaves(bilevel.hypergrad(b.outer, b.inner, b.lam, b.w, solve=solve, residual_tol=math.inf))
    return run


def _torchopt():
    try:
        import torchopt
        import torchopt.diff.implicit  # noqa: F401
        import torchopt.linear_solve  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        raise Unavailable(f"TorchOpt does not import ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    return torchopt


def cg_torchopt(b: Bench, k: int) -> Callable[[], list]:
    torchopt = _torchopt()
    # TorchOpt takes tensors or tuples of tensors: the weights as a tuple, one argument per hyper-parameter tensor
    keys = sorted(b.lam)
    stationarity = torch.func.grad(lambda w, *lams: b.inner(dict(zip(keys, lams)), dict(zip(keys, w))))
    solve = torchopt.linear_solve.solve_cg(maxiter=k, rtol=TIGHT)

    @torchopt.diff.implicit.custom_root(stationarity, argnums=tuple(range(1, len(keys) + 1)), solve=solve)
    def solver(w_init, *lams):
        return w_init  # the point is handed in: only the backward (the hypergradient) is timed

    w0 = tuple(b.w[key] for key in keys)

    def run():
        with torch.enable_grad():
            lams = [b.lam[key].detach().requires_grad_() for key in keys]
            w = solver(w0, *lams)
            return list(torch.autograd.grad(b.outer(dict(zip(keys, lams)), dict(zip(keys, w))), lams))
    return run


class Unavailable(Exception):
    """A method cannot run here; its cell shows n/a."""


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc), so that a method's
    peak resident set shows its own allocations rather than reusing freed ones."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak_reset() -> bool:
    gc.collect()
    _release_free_memory()
    return reset_peak_rss()


def peak_memory_mb(fn: Callable[[], Any], device) -> Optional[float]:
    """Memory one call needs above what is allocated before it (MB)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        del out
        return peak / 2 ** 20
    if not _rss_peak_reset():
        return None
    start = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return None if start is None or peak is None else max(peak - start, 0) / 1024


def time_methods(methods: dict[str, Callable[[], Any]], device, repeats: int, budget_s: float) -> dict[str, float]:
    """Median milliseconds per method, in interleaved rounds after one warm-up call each."""
    times: dict[str, list] = {name: [] for name in methods}
    start = time.perf_counter()
    for r in range(repeats):
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
        for name, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items() if ts}


def _rel(a: list, ref: list) -> float:
    num = math.sqrt(sum(float(((x - y).double() ** 2).sum()) for x, y in zip(a, ref)))
    den = math.sqrt(sum(float((y.double() ** 2).sum()) for y in ref))
    return num / max(den, 1e-300)


def run_group(builders: dict[str, Callable[[], Callable[[], list]]], device, repeats, budget_s):
    """Build, check, measure memory and time each method; ``{name: dict(ms, mb, out | note)}``."""
    live, res = {}, {}
    for name, build in builders.items():
        try:
            fn = build()
            out = fn()  # warm-up, and the result for the error column
            res[name] = {"out": out, "mb": peak_memory_mb(fn, device)}
            live[name] = fn
        except Unavailable as e:
            res[name] = {"note": str(e)}
        except Exception as e:  # report, keep the others
            res[name] = {"note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
    for name, ms in time_methods(live, device, repeats, budget_s).items():
        res[name]["ms"] = ms
    return res


# ---------------------------------------------------------------------------
# Table 2: batched against looped independent problems
# ---------------------------------------------------------------------------
def spd_batch(count: int, n: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(count, n, n, generator=g, dtype=torch.float64)
    A = Q @ Q.mT / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(count, n, generator=g, dtype=torch.float64)
    return A.to(device, dtype), b.to(device, dtype)


def ridge_batch(count: int, d: int, n: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(count, n + n // 2, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(count, d, 1, generator=g, dtype=torch.float64)
    t = (X @ w_true)[..., 0] + 0.5 * torch.randn(count, n + n // 2, generator=g, dtype=torch.float64)
    lam = 0.5 * torch.randn(count, d, generator=g, dtype=torch.float64)
    Xt, tt, Xv, tv = X[:, :n], t[:, :n], X[:, n:], t[:, n:]
    H = Xt.mT @ Xt + torch.diag_embed(lam.exp())
    w = torch.linalg.solve(H, (Xt.mT @ tt[..., None]))[..., 0]
    return [z.to(device, dtype) for z in (w, lam, Xt, tt, Xv, tv)]


def _one_ridge_hypergrad(w, lam, X, t, Xv, tv):
    inner = lambda lam_, s: 0.5 * ((X @ s - t) ** 2).sum() + 0.5 * (lam_.exp() * s ** 2).sum()  # noqa: E731
    outer = lambda lam_, s: 0.5 * ((Xv @ s - tv) ** 2).sum()  # noqa: E731
    return bilevel.hypergrad(outer, inner, lam, w, solve=CG())


def batched_table(counts, n: int, d: int, device, dtype, repeats: int, budget_s: float,
                  hypergrad_max: Optional[int] = None) -> list[dict]:
    """Rows of table 2; the hypergradient rows only up to ``hypergrad_max`` problems."""
    rows = []
    solver = CG()
    for count in counts:
        A, b = spd_batch(count, n, device, dtype)
        cases = {
            f"CG solve of {count} SPD systems (n = {n})": (
                lambda A=A, b=b: solver(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, batch_dims=1)[0],
                lambda A=A, b=b: torch.stack([solver(lambda v, a=A[i]: a @ v, b[i])[0] for i in range(len(b))])),
        }
        if hypergrad_max is None or count <= hypergrad_max:
            data = ridge_batch(count, d, 4 * d, device, dtype)
            cases[f"hypergradient of {count} ridge problems (d = {d})"] = (
                lambda data=data: torch.func.vmap(_one_ridge_hypergrad)(*data),
                lambda data=data: torch.stack([_one_ridge_hypergrad(*(z[i] for z in data))
                                               for i in range(len(data[0]))]))
        for label, (batched_fn, loop_fn) in cases.items():
            try:
                diff = _rel([batched_fn()], [loop_fn()])
                ms = time_methods({"batched": batched_fn, "loop": loop_fn}, device, repeats, budget_s)
                rows.append(dict(label=label, count=count, batched=ms["batched"], loop=ms["loop"], diff=diff))
            except Exception as e:  # noqa: BLE001 - report and go on
                note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(dict(label=label, count=count, note=note))
    return rows


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
SIZES = {  # per device kind; --quick overrides
    "cuda": {"resnet": dict(width=64, blocks=2, image=32, batch=128),
             "transformer": dict(dim=256, depth=4, seq=128, batch=64)},
    "cpu": {"resnet": dict(width=16, blocks=2, image=32, batch=32),
            "transformer": dict(dim=128, depth=2, seq=64, batch=32)},
    "quick": {"resnet": dict(width=4, blocks=1, image=8, batch=8),
              "transformer": dict(dim=16, depth=1, seq=8, batch=8)},
}


def _fmt(x: Optional[float], digits: str = ".1f") -> str:
    return "n/a" if x is None else format(x, digits)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def device_description(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda ({p.name}, {p.total_memory / 2 ** 30:.0f} GiB)"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def network_table(args, device, dtype) -> None:
    sizes = SIZES["quick" if args.quick else device.type if device.type in SIZES else "cpu"]
    K, k = args.tangents, args.k
    print(f"## Network: {K} Hessian-vector products in one call, and the CG hypergradient with k = {k}\n")
    print("| model | weights | operation | bilevel (ms) | floor (ms) | bilevel / floor | TorchOpt (ms) "
          "| TorchOpt / bilevel | peak MB: bilevel / floor / TorchOpt | rel. diff. vs floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in args.models:
        model, weights, train, val = build(name, sizes[name], device, dtype)
        b = Bench(model, weights, train, val, decay=args.decay)
        size = sizes[name]
        label = (f"ResNet (width {size['width']}, {size['blocks']} blocks/stage, {size['image']}px, "
                 f"batch {size['batch']})" if name == "resnet" else
                 f"transformer (dim {size['dim']}, depth {size['depth']}, seq {size['seq']}, batch {size['batch']})")
        label += f", decay {b.decay:.3g}"
        hv = run_group({"ours": lambda b=b: hvp_ours(b, K),
                        "floor (is_grads_batched)": lambda b=b: hvp_floor_batched(b, K),
                        "floor (loop)": lambda b=b: hvp_floor_loop(b, K)}, device, args.repeats, args.budget)
        cg = run_group({"ours": lambda b=b: cg_ours(b, k), "floor": lambda b=b: cg_floor(b, k),
                        "torchopt": lambda b=b: cg_torchopt(b, k)}, device, args.repeats, args.budget)
        rows = [(f"HVP x{K}, floor: autograd is_grads_batched", hv["ours"], hv["floor (is_grads_batched)"], None),
                (f"HVP x{K}, floor: loop of {K} autograd.grad", hv["ours"], hv["floor (loop)"], None),
                (f"CG hypergradient, k = {k}", cg["ours"], cg["floor"], cg["torchopt"])]
        for op, ours, floor, peer in rows:
            mem = " / ".join(_fmt(r.get("mb")) if r else "-" for r in (ours, floor, peer))
            diff = _rel(ours["out"], floor["out"]) if "out" in ours and "out" in floor else None
            peer_diff = _rel(peer["out"], floor["out"]) if peer and "out" in peer and "out" in floor else None
            print(f"| {label} | {b.numel():,} | {op} | {_fmt(ours.get('ms'))} | {_fmt(floor.get('ms'))} | "
                  f"{_ratio(ours.get('ms'), floor.get('ms'))} | {_fmt(peer.get('ms')) if peer else '-'} | "
                  f"{_ratio(peer.get('ms'), ours.get('ms')) if peer else '-'} | {mem} | {_fmt(diff, '.1e')}"
                  + (f" (TorchOpt {peer_diff:.1e})" if peer_diff is not None else "") + " |")
            floor_name = "floor (is_grads_batched)" if "is_grads" in op else "floor"
            for who, r in (("bilevel", ours), (floor_name, floor), ("TorchOpt", peer)):
                if r and "note" in r and f"{who}: {r['note']}" not in notes:
                    notes.append(f"{who}: {r['note']}")
    print()
    for note in notes:
        print(f"- {note}")
    if notes:
        print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (smoke test)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--models", nargs="+", default=["resnet", "transformer"], choices=["resnet", "transformer"])
    parser.add_argument("--k", type=int, default=None, help="CG iterations (default 10; 3 with --quick)")
    parser.add_argument("--tangents", type=int, default=None, help="HVPs per batched call (default 8; 4 --quick)")
    parser.add_argument("--decay", type=float, default=None,
                        help="weight decay e^lambda at which the hypergradient is taken (default: twice the loss "
                             "Hessian's largest |eigenvalue|, by power iteration, so that the inner Hessian is SPD "
                             "and CG runs its k iterations)")
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 1024], help="independent problems")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; 2 with --quick)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per group after which rounds stop")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    args.k = args.k or (3 if args.quick else 10)
    args.tangents = args.tangents or (4 if args.quick else 8)
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore", bilevel.BilevelWarning)  # k fixed below tolerance: MAX_ITERATIONS by design
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch calls
    busy = _busy()
    print(f"# bilevel GPU benchmark\n\ndevice: {device_description(device)}; dtype {args.dtype}; torch "
          f"{torch.__version__}; {'quick' if args.quick else 'full'} run; machine busy "
          f"{'n/a' if busy is None else f'{100 * busy:.0f}%'} (load {_load()})\n")
    network_table(args, device, dtype)
    n, d = (8, 8) if args.quick else (16, 20)
    print("## Batched vs looped independent problems (float64, CG at its default tolerance)\n")
    print("| problems | what | batched (ms) | loop (ms) | loop / batched | max rel. diff. |")
    print("|---|---|---|---|---|---|")
    rows = batched_table(args.counts, n, d, device, torch.float64, 1 if args.quick else max(2, args.repeats // 2),
                         args.budget, hypergrad_max=64 if args.quick else None)
    for row in rows:
        if "note" in row:
            print(f"| {row['count']} | {row['label']} | n/a | n/a | n/a | {row['note']} |")
        else:
            print(f"| {row['count']} | {row['label']} | {row['batched']:.1f} | {row['loop']:.1f} | "
                  f"{row['loop'] / row['batched']:.1f}x | {row['diff']:.1e} |")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
