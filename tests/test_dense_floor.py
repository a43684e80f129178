"""benchmarks/dense_floor.py, the plain dense JumpReLU step that issue 23's fast step must beat:
its JumpReLU against a per-element loop, its straight-through gradients against the
rectangle-kernel formula worked out by hand (alone and through the whole loss), training on a
synthetic stream (reconstruction improves, L0 follows a moved target), bf16 autocast on the
CPU, and no host synchronisation in a step (the GPU timing relies on it). CPU, seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from dense_floor import DenseFloor, build, heaviside, jumprelu  # noqa: E402
from gpu_counters import SyncCounter  # noqa: E402
from streams import SMALL, stream  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Toy sizes: a second OpenMP thread on a busy host costs more than it gives."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _window(pre, theta, eps):
    return 1.0 if abs(pre - theta) < eps / 2 else 0.0


def test_jumprelu_and_step_forward_equal_a_per_element_loop():
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 9, generator=gen)
    theta = torch.rand(9, generator=gen)
    pre[2, 3] = theta[3]  # exactly at the threshold: inactive (strict >)
    out, step = jumprelu(pre, theta, 0.1), heaviside(pre, theta, 0.1)
    for i in range(6):
        for j in range(9):
            p, t = float(pre[i, j]), float(theta[j])
            assert float(out[i, j]) == (p if p > t else 0.0)
            assert float(step[i, j]) == (1.0 if p > t else 0.0)
    assert float(out[2, 3]) == 0.0 and step.dtype == theta.dtype


def test_straight_through_gradients_equal_the_rectangle_kernel_by_hand():
    eps = 0.2
    theta = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    # in the window (|pre - theta| < eps / 2) on both sides, outside it, and far above
    pre = torch.tensor([[0.55, 0.2, 0.25], [0.45, 1.09, 2.0], [0.9, 0.95, 0.39]],
                       dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [-0.5, 4.0, 2.0]],
                     dtype=torch.float64)
    (jumprelu(pre, theta, eps) * g).sum().backward()
    th, p = theta.detach().tolist(), pre.detach().tolist()
    want_theta = [sum(float(g[i, j]) * -(th[j] / eps) * _window(p[i][j], th[j], eps)
                      for i in range(3)) for j in range(3)]
    want_pre = [[float(g[i, j]) if p[i][j] > th[j] else 0.0 for j in range(3)] for i in range(3)]
    assert torch.allclose(theta.grad, torch.tensor(want_theta, dtype=torch.float64))
    assert pre.grad.tolist() == want_pre
    # worked by hand: column 0 has rows 0 (0.55) and 1 (0.45) in the window, row 2 not
    assert abs(want_theta[0] - (1.0 + 3.0) * -(0.5 / eps)) < 1e-12
    theta.grad = None
    pre.grad = None
    (heaviside(pre, theta, eps) * g).sum().backward()
    want_step = [sum(float(g[i, j]) * -(1 / eps) * _window(p[i][j], th[j], eps)
                     for i in range(3)) for j in range(3)]
    assert torch.allclose(theta.grad, torch.tensor(want_step, dtype=torch.float64))
    assert pre.grad is None


def test_the_loss_gradient_of_thresholds_and_encoder_by_hand():
    """One level, float64, every parameter random: the autograd gradients of MSE + lambda L0
    equal the chain rule through the rectangle kernel, written out as loops."""
    d, n, b, eps, lam = 3, 4, 5, 0.5, 0.7
    f = DenseFloor(d, (n,), target_l0=2.0, bandwidth=eps).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        f.lambdas.fill_(lam)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        pre = x @ f.W_enc[0].t() + f.b_enc[0]
        f.theta[0].copy_(pre[0] + torch.tensor([0.1, -0.1, 0.2, -0.2], dtype=torch.float64))
    (_, mse, l0), = f(x)
    (mse + f.lambdas[0] * l0).backward()

    We, be, th, Wd, bd = (t.detach().tolist() for t in (f.W_enc[0], f.b_enc[0], f.theta[0],
                                                         f.W_dec[0], f.b_dec[0]))
    X = x.tolist()
    P = [[be[j] + sum(X[i][k] * We[j][k] for k in range(d)) for j in range(n)] for i in range(b)]
    A = [[P[i][j] if P[i][j] > th[j] else 0.0 for j in range(n)] for i in range(b)]
    R = [[bd[k] + sum(A[i][j] * Wd[j][k] for j in range(n)) for k in range(d)] for i in range(b)]
    dA = [[2 / b * sum((R[i][k] - X[i][k]) * Wd[j][k] for k in range(d)) for j in range(n)]
          for i in range(b)]
    g_theta = [sum((dA[i][j] * -(th[j] / eps) + lam / b * -(1 / eps))
                   * _window(P[i][j], th[j], eps) for i in range(b)) for j in range(n)]
    g_wenc = [[sum(dA[i][j] * (P[i][j] > th[j]) * X[i][k] for i in range(b)) for k in range(d)]
              for j in range(n)]
    assert sum(_window(P[i][j], th[j], eps) for i in range(b) for j in range(n)) >= 4
    assert torch.allclose(f.theta[0].grad, torch.tensor(g_theta, dtype=torch.float64))
    assert torch.allclose(f.W_enc[0].grad, torch.tensor(g_wenc, dtype=torch.float64))


def _mse(f, x) -> list[float]:
    with torch.no_grad():
        return [float(o[1]) for o in f(x)]


def test_training_lowers_reconstruction_error_and_follows_a_moved_l0_target():
    """Thresholds start at L0 24 (the first batch's quantiles); the target then drops to 8:
    every level's L0 must come down to it and the held-out MSE must fall."""
    torch.manual_seed(0)
    sz = SMALL
    src = stream(sz, "cpu", seed=5)
    held = src.batch(512)
    f = build(sz["d"], sz["sizes"], sz["batch"], "cpu", target_l0=24.0, lr=3e-3)
    f.step(src.batch(sz["batch"]))
    with torch.no_grad():
        start_l0 = [float(o[2]) for o in f(held)]
    start_mse = _mse(f, held)
    assert all(16 < v < 32 for v in start_l0), start_l0
    f.target = 8.0
    tail = []
    for i in range(400):
        _, l0 = f.step(src.batch(sz["batch"]))
        if i >= 300:
            tail.append(l0)
    end_l0 = torch.stack(tail).mean(0).tolist()
    end_mse = _mse(f, held)
    assert all(abs(v / 8.0 - 1) < 0.10 for v in end_l0), end_l0
    assert all(e < 0.6 * s for e, s in zip(end_mse, start_mse)), (start_mse, end_mse)


def test_bf16_autocast_step_runs_on_the_cpu():
    sz = SMALL
    src = stream(sz, "cpu", seed=6)
    f = build(sz["d"], sz["sizes"], sz["batch"], "cpu", target_l0=sz["l0"], autocast="bf16")
    x = src.batch(sz["batch"])
    for _ in range(5):
        loss, l0 = f.step(x)
    assert torch.isfinite(loss) and l0.dtype == torch.float32 and (l0 > 0).all()
    recon, mse, l0 = f(x)[0]
    assert recon.dtype == torch.bfloat16 and mse.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in f.parameters())


def test_a_step_makes_no_host_synchronisation():
    sz = SMALL
    src = stream(sz, "cpu", seed=7)
    x = src.batch(sz["batch"])
    for autocast in ("fp32", "bf16"):
        f = build(sz["d"], sz["sizes"], sz["batch"], "cpu", target_l0=sz["l0"],
                  autocast=autocast)
        f.step(x)  # the first step initialises (reads the batch's quantiles)
        with SyncCounter() as c:
            f.step(x)
            f.step(x)
        assert c.total == 0, c.by_site()
