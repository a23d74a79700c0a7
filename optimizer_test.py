"""Check our AdamW (optimizer.py) against independent references.

Setting (as in CS224N): seed 0, `torch.nn.Linear(3, 2, bias=False)`, lr 1e-3, weight decay 1e-4,
1000 steps, here full-batch on a fixed regression problem: X ~ N(0, 1) of shape (100, 3) drawn
with seed 0, target Y = X @ A.T with A = [[1, 1, 0], [0, 0, -1]] (y = [x0 + x1, -x2]), loss MSE.

Checks:
  1. our AdamW vs the handout algorithm re-derived in float64 numpy with the analytic MSE
     gradient, correct_bias=True and False. The model runs in float64 for these: in float32 the
     rounding of the weights alone (ulp ~1e-7 per step, 1000 steps) drifts ~3e-6 from the exact
     result, so the float32 model gets its own, looser check (atol 1e-5);
  2. our AdamW vs torch.optim.AdamW in float64 with eps = 0, where the two algorithms coincide
     (torch puts eps on sqrt(v_hat), the handout on sqrt(v)).

Run: python optimizer_test.py  (prints PASS/FAIL per check, exits 1 on any failure)
"""

import sys

import numpy as np
import torch

from optimizer import AdamW

LR = 1e-3
WEIGHT_DECAY = 1e-4
BETAS = (0.9, 0.999)
STEPS = 1000
A = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, -1.0]])  # (out, in)

FLOAT64_ATOL = 1e-10
FLOAT32_ATOL = 1e-5


def make_problem(dtype=torch.float32):
    """Seeded model and data: (model, X (100, 3), Y (100, 2))."""
    torch.manual_seed(0)
    X = torch.randn(100, 3)
    model = torch.nn.Linear(3, 2, bias=False)
    model.to(dtype)
    X = X.to(dtype)
    Y = X @ torch.as_tensor(A, dtype=dtype).T
    return model, X, Y


def train(model, X, Y, optimizer, steps=STEPS):
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        optimizer.step()
    return model.weight.detach().to(torch.float64).numpy()


def reference_adamw(W, X, Y, steps=STEPS, lr=LR, betas=BETAS, eps=1e-6,
                    weight_decay=WEIGHT_DECAY, correct_bias=True):
    """The handout's AdamW step in float64 numpy on the linear MSE problem; returns final W."""
    W, X, Y = (np.asarray(a, dtype=np.float64) for a in (W, X, Y))
    beta1, beta2 = betas
    m = np.zeros_like(W)
    v = np.zeros_like(W)
    for t in range(1, steps + 1):
        residual = X @ W.T - Y                        # (N, out)
        g = 2.0 / residual.size * residual.T @ X      # d mean(residual^2) / dW, (out, in)
        W = W - lr * weight_decay * W                 # decoupled decay on the pre-update W
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if correct_bias:
            alpha = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
        else:
            alpha = lr
        W = W - alpha * m / (np.sqrt(v) + eps)
    return W


def max_diff_vs_reference(dtype=torch.float64, correct_bias=True, steps=STEPS, foreach=None):
    """Max |W_ours - W_reference| after `steps` steps; our model in `dtype`, reference float64."""
    model, X, Y = make_problem(dtype)
    W0 = model.weight.detach().to(torch.float64).numpy().copy()
    expected = reference_adamw(W0, X.double().numpy(), Y.double().numpy(), steps=steps,
                               correct_bias=correct_bias)
    opt = AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, correct_bias=correct_bias,
                foreach=foreach)
    ours = train(model, X, Y, opt, steps)
    return float(np.abs(ours - expected).max())


def max_diff_vs_torch(steps=STEPS, weight_decay=WEIGHT_DECAY):
    """Max |W_ours - W_torch| in float64 with eps = 0 (where the two updates are the same)."""
    results = []
    for make_opt in (
        lambda ps: AdamW(ps, lr=LR, betas=BETAS, eps=0.0, weight_decay=weight_decay),
        lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=0.0, weight_decay=weight_decay),
    ):
        model, X, Y = make_problem(torch.float64)
        results.append(train(model, X, Y, make_opt(model.parameters()), steps))
    return float(np.abs(results[0] - results[1]).max())


CHECKS = [
    ("float64 model vs float64 handout reference", FLOAT64_ATOL,
     lambda: max_diff_vs_reference(torch.float64, correct_bias=True)),
    ("float64 model vs float64 handout reference, correct_bias=False", FLOAT64_ATOL,
     lambda: max_diff_vs_reference(torch.float64, correct_bias=False)),
    ("float32 model vs float64 handout reference", FLOAT32_ATOL,
     lambda: max_diff_vs_reference(torch.float32, correct_bias=True)),
    ("float64 vs torch.optim.AdamW (eps=0)", FLOAT64_ATOL, lambda: max_diff_vs_torch()),
]


def main() -> int:
    failed = 0
    for name, atol, check in CHECKS:
        diff = check()
        ok = diff <= atol
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {name}: max abs diff {diff:.3e} (atol {atol:.0e})")
    print("Optimizer test passed!" if not failed else f"{failed} optimizer check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
