"""The op's fast paths equal a naive per-token oracle: outputs and the gradients of x, A, B and w."""

from __future__ import annotations

import pytest
import torch

from moe_peft.ops import apply_lora_experts, choose_torch_path
from moe_peft.ops.reference import dense_gated, per_expert_loop


def oracle(x, a, b, idx, w, scaling):
    """y[t] = scaling * sum_j w[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), one token at a time."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(b.shape[1])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= 0:
                y = y + w[t, j] * (b[e] @ (a[e] @ x[t]))
        rows.append(y * scaling)
    return torch.stack(rows)


def make_inputs(T, d_in, d_out, E, r, k, null_frac=0.0, seed=0, unused_expert=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(E, r, d_in, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(E, d_out, r, generator=g, dtype=torch.float64) * 0.3
    hi = E - 1 if unused_expert and E > k else E  # the last expert receives no token
    idx = torch.stack([torch.randperm(hi, generator=g)[:k] for _ in range(T)])
    if null_frac:
        idx[torch.rand(T, k, generator=g) < null_frac] = -1
    w = torch.rand(T, k, generator=g, dtype=torch.float64)
    return x, a, b, idx, w


def _backend(name):
    return lambda x, a, b, idx, w, s: apply_lora_experts(x, a, b, idx, w, s, backend=name)


# the public op's torch Functions (float64 here), the autograd reference, and the loop baseline
PATHS = {"dense": _backend("dense"), "grouped": _backend("grouped"), "reference": dense_gated, "loop": per_expert_loop}


@pytest.mark.parametrize("path", ["dense", "grouped", "reference", "loop"])
@pytest.mark.parametrize(
    "T,d_in,d_out,E,r,k,null_frac",
    [
        (13, 7, 5, 4, 3, 1, 0.0),
        (17, 6, 9, 5, 2, 2, 0.0),
        (11, 8, 8, 6, 1, 3, 0.0),  # rank-1 experts (SMoRA)
        (9, 5, 7, 4, 3, 2, 0.4),  # null experts
        (1, 4, 4, 3, 2, 1, 0.0),  # a single token
    ],
)
def test_paths_match_oracle_outputs_and_grads(path, T, d_in, d_out, E, r, k, null_frac):
    x, a, b, idx, w = make_inputs(T, d_in, d_out, E, r, k, null_frac)
    fn = PATHS[path]
    leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
    y = fn(leaves[0], leaves[1], leaves[2], idx, leaves[3], 1.7)
    y_ref = oracle(ref_leaves[0], ref_leaves[1], ref_leaves[2], idx, ref_leaves[3], 1.7)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for got, want, name in zip(leaves, ref_leaves, "xABw"):
        torch.testing.assert_close(got.grad, want.grad, msg=f"grad of {name}")


def test_unused_expert_still_gets_a_gradient_tensor():
    # DDP must not need find_unused_parameters: every expert takes part in the graph
    x, a, b, idx, w = make_inputs(10, 6, 6, 5, 2, 1, unused_expert=True)
    for fn in (PATHS["dense"], PATHS["grouped"]):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        fn(x, a_, b_, idx, w, 1.0).sum().backward()
        assert a_.grad is not None and b_.grad is not None
        assert torch.count_nonzero(a_.grad[-1]) == 0  # the unused expert's gradient is exactly zero


def test_null_slots_contribute_exactly_zero():
    x, a, b, idx, w = make_inputs(6, 4, 4, 3, 2, 2)
    idx[:] = -1
    for fn in PATHS.values():
        assert torch.count_nonzero(fn(x, a, b, idx, w, 1.0)) == 0


@pytest.mark.parametrize("backend", ["auto", "torch", "dense", "grouped"])
def test_public_op_backends_agree(backend):
    x, a, b, idx, w = make_inputs(12, 8, 6, 4, 3, 2)
    x, a, b, w = x.float(), a.float(), b.float(), w.float()
    y = apply_lora_experts(x, a, b, idx, w, 0.5, backend=backend)
    torch.testing.assert_close(y, oracle(x, a, b, idx, w, 0.5), rtol=1e-5, atol=1e-5)


def test_public_op_empty_and_dtype():
    a, b = torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    y = apply_lora_experts(torch.randn(0, 4), a, b, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), 1.0)
    assert y.shape == (0, 5)
    # bf16 activations with fp32 adapter weights: computed in the weights' dtype, as PEFT's LoRA does
    y = apply_lora_experts(
        torch.randn(4, 4, dtype=torch.bfloat16), a, b, torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), 1.0
    )
    assert y.dtype == torch.float32


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(x=torch.randn(2, 3, 4)), "x must be"),
        (dict(lora_B=torch.randn(3, 5, 7)), "does not match"),
        (dict(expert_idx=torch.zeros(3, 1, dtype=torch.long)), "expert_idx must be"),
        (dict(expert_weights=torch.ones(4, 2)), "must have the shape"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_public_op_errors_name_the_argument(bad, match):
    args = dict(
        x=torch.randn(4, 4),
        lora_A=torch.randn(3, 2, 4),
        lora_B=torch.randn(3, 5, 2),
        expert_idx=torch.zeros(4, 1, dtype=torch.long),
        expert_weights=torch.ones(4, 1),
        scaling=1.0,
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        apply_lora_experts(**args)


def test_path_choice_follows_the_cpu_measurement():
    # benchmarks/cpu_paths.py, 2-core CPU: grouped was faster at these shapes, dense at the others
    for e, r, k in [(8, 8, 1), (8, 16, 2), (16, 16, 1), (64, 8, 2), (4, 64, 1), (8, 64, 2)]:
        assert choose_torch_path(num_experts=e, rank=r, k=k) == "grouped", (e, r, k)
    assert choose_torch_path(num_experts=64, rank=1, k=8) == "dense"  # SMoRA rank-1 experts: dense 3x faster
    assert choose_torch_path(num_experts=8, rank=1, k=2) == "dense"
    assert choose_torch_path(num_experts=4, rank=8, k=4) == "dense"  # dense routing (LoRAMoE, k = E)


# -- per-sample adapter selection (a mixed batch of fine-tunes): ops/per_sample.py and its dispatch ------------------


def per_sample_oracle(x, weight, bias, a, b, sample_adapter, scale):
    """y[b, s] = W x + bias + scale[b] * B[a_b] A[a_b] x, one sample at a time (a_b = -1: the base only)."""
    rows = []
    for i, adapter in enumerate(sample_adapter.tolist()):
        y = x[i] @ weight.t() + (0 if bias is None else bias)
        if adapter >= 0:
            y = y + scale[i] * (x[i] @ a[adapter].t() @ b[adapter].t())
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["bmm", "dense", "grouped"])
@pytest.mark.parametrize("with_base", [True, False])
def test_per_sample_paths_match_oracle(path, with_base):
    from moe_peft.ops import apply_lora_per_sample, linear_lora_per_sample

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    a = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    b = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 7, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    sample_adapter = torch.tensor([2, 0, -1, 2, 0])  # adapter 1 unused, one sample without adapter
    scale = torch.tensor([0.5, 2.0, 3.0, 0.5, 2.0], dtype=torch.float64)  # each sample's adapter scaling
    leaves = [t.clone().requires_grad_() for t in (x, a, b, weight, bias)]
    if with_base:
        got = linear_lora_per_sample(leaves[0], leaves[3], leaves[4], leaves[1], leaves[2], sample_adapter, scale, path)
    else:  # add into a base output computed outside, in place
        base_out = leaves[0] @ leaves[3].t() + leaves[4]
        got = apply_lora_per_sample(leaves[0], leaves[1], leaves[2], sample_adapter, scale, path, out=base_out)
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, a, b, weight, bias)]
    want = per_sample_oracle(
        ref_leaves[0], ref_leaves[3], ref_leaves[4], ref_leaves[1], ref_leaves[2], sample_adapter, scale
    )
    want_grads = torch.autograd.grad(want, ref_leaves, dy)
    torch.testing.assert_close(got, want)
    for name, p, q in zip(("x", "A", "B", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(p, q, msg=name)
    assert got_grads[1][1].abs().sum() == 0 and got_grads[2][1].abs().sum() == 0  # the unused adapter: exactly 0


def test_per_sample_float_scaling_empty_batch_and_dispatch():
    from moe_peft.ops import apply_lora_per_sample, choose_per_sample_path

    x = torch.randn(3, 2, 4, dtype=torch.float64)
    a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    idx = torch.tensor([1, -1, 0])
    by_float = apply_lora_per_sample(x, a, b, idx, 0.5)
    by_tensor = apply_lora_per_sample(x, a, b, idx, torch.full((3,), 0.5))
    torch.testing.assert_close(by_float, by_tensor)
    assert by_float[1].abs().sum() == 0  # -1: no adapter, exactly zero
    assert apply_lora_per_sample(x[:0], a, b, idx[:0], 1.0).shape == (0, 2, 5)
    # the torch path: dense-gated while S * (N - 1) < 8 (decode, few adapters), else the batched matmuls
    many = torch.randn(9, 3, 4)  # 9 adapters
    assert choose_per_sample_path(x, a) == "dense" and choose_per_sample_path(x[:, :1], many, "torch") == "bmm"
    assert choose_per_sample_path(torch.randn(3, 8, 4), a) == "bmm"
    assert choose_per_sample_path(x, a, "grouped") == "grouped"  # the routed paths stay reachable by name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(6, 4)), r"x must be \[B, S, in\]"),
        (dict(sample_adapter=torch.tensor([0, 1])), r"sample_adapter must be a \[B\]=\[3\] integer tensor"),
        (dict(scaling=torch.ones(2)), r"scaling must be a float or a \[B\]=\[3\] tensor"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(a=torch.randn(2, 3, 5)), "lora_A expects in=5"),
    ],
)
def test_per_sample_errors_name_the_argument(kwargs, match):
    from moe_peft.ops import apply_lora_per_sample

    args = dict(
        x=torch.randn(3, 2, 4), a=torch.randn(2, 3, 4), b=torch.randn(2, 5, 3), sample_adapter=torch.tensor([0, 1, -1])
    )
    args.update(scaling=1.0, backend="auto")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        apply_lora_per_sample(args["x"], args["a"], args["b"], args["sample_adapter"], args["scaling"], args["backend"])
