"""The oneDNN InnerProduct path of the trainer's Gemm against torch.addmm autograd (seeded; float32, atol 1e-5, rtol 1e-5)."""
from __future__ import annotations

import pytest
import torch

from caffeonnx.trainer.ops import NodeSpec, linear
from tests.helpers import assert_close, rng

pytestmark = pytest.mark.skipif(
    linear._ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available(), reason="torch has no oneDNN here"
)


def tensor(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    """Seeded float32 data (scaled so products stay O(1))."""
    t = torch.from_numpy(rng(seed).normal(size=shape).astype("float32") / shape[-1] ** 0.5)
    return t.requires_grad_(grad)


def gemm(trans_b: int) -> linear.Kernel:
    """The trainer's Gemm kernel for an InnerProduct node (transB=1: weight [out, in]; 0: [in, out])."""
    return linear.gemm(NodeSpec("Gemm", "ip", ["x", "w", "b"], ["y"], {"transB": trans_b}, 21))


def close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert_close(got.detach().numpy(), want.detach().numpy(), name, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("batch", "n_in", "n_out"), [(100, 784, 1000), (32, 1000, 250), (64, 500, 784)])
@pytest.mark.parametrize("trans_b", [1, 0])
@pytest.mark.parametrize("x_grad", [True, False])
def test_onednn_gemm_matches_addmm(batch: int, n_in: int, n_out: int, trans_b: int, x_grad: bool) -> None:
    x = tensor(batch, n_in, seed=0, grad=x_grad)
    w = tensor(*((n_out, n_in) if trans_b else (n_in, n_out)), seed=1)
    b = tensor(n_out, seed=2)
    up = tensor(batch, n_out, seed=3, grad=False)  # the gradient flowing back into y
    y = gemm(trans_b)(x, w, b)
    assert type(y.grad_fn).__name__ == "OneDnnLinearBackward", f"{batch}x{n_in}x{n_out} did not take the oneDNN path"
    (y * up).sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b))
    want = torch.addmm(b2, x2, w2.t() if trans_b else w2)
    (want * up).sum().backward()
    close(y, want, f"y {batch}x{n_in}->{n_out} transB={trans_b}")
    close(w.grad, w2.grad, f"dW {tuple(w.shape)}")
    close(b.grad, b2.grad, f"db {tuple(b.shape)}")
    if x_grad:
        close(x.grad, x2.grad, f"dX {tuple(x.shape)}")
    else:
        assert x.grad is None, "no gradient for an input that does not ask for one"


def test_a_tied_weight_sums_the_gradients_of_both_users() -> None:
    """Encoder (transB=1) and tied decoder (transB=0) read one Parameter: its gradient is the sum, as Caffe's shared diff."""
    x = tensor(100, 784, seed=4, grad=False)
    w = tensor(500, 784, seed=5)
    b_enc, b_dec = tensor(500, seed=6), tensor(784, seed=7)
    y = gemm(0)(torch.sigmoid(gemm(1)(x, w, b_enc)), w, b_dec)
    y.square().sum().backward()
    w2, e2, d2 = (t.detach().clone().requires_grad_() for t in (w, b_enc, b_dec))
    torch.addmm(d2, torch.sigmoid(torch.addmm(e2, x, w2.t())), w2).square().sum().backward()
    close(w.grad, w2.grad, "tied weight 500x784")


@pytest.mark.parametrize(("why", "x", "w", "b"), [
    ("small product", torch.ones(4, 8), torch.ones(3, 8), torch.ones(3)),
    ("float64", torch.ones(100, 784, dtype=torch.float64), torch.ones(1000, 784, dtype=torch.float64), None),
    ("2-D bias", torch.ones(100, 784), torch.ones(1000, 784), torch.ones(100, 1000)),
])
def test_other_gemms_keep_torch_addmm(why: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    assert not linear.onednn_linear_usable(x, w, b), why
    y = gemm(1)(x, w.requires_grad_(), b)
    assert type(y.grad_fn).__name__ in ("AddmmBackward0", "MmBackward0"), f"{why}: {type(y.grad_fn).__name__}"
