"""The Triton kernels (Path D dense-gated, Path S sorted pairs) and the torch Function against a naive
per-token oracle and each other: outputs and the gradients of x, A, B and the routing weights.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) at small odd
shapes; `gpu`-marked tests repeat the comparison at real sizes in bf16 on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moe_peft.ops as ops
from moe_peft.ops import apply_lora_experts, apply_lora_per_sample, linear_lora_experts

from .conftest import CASES, VOCAB, make_config, randomize_experts
from .test_ops import make_inputs, oracle

triton = pytest.importorskip("triton")
interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter tests (with a GPU the gpu-marked tests cover the kernels)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KERNEL_PATHS = ["triton_dense", "triton_sorted", "dense", "grouped"]
SHAPES = [
    # T, d_in, d_out, E, r, k, null_frac
    pytest.param(70, 33, 29, 5, 3, 1, 0.0, id="T70-odd-r3-k1"),  # T crosses a 64-row tile, r not a power of 2
    pytest.param(37, 20, 27, 6, 5, 2, 0.0, id="T37-r5-k2"),
    pytest.param(23, 16, 40, 7, 4, 3, 0.0, id="T23-k3"),
    pytest.param(19, 24, 18, 4, 3, 2, 0.4, id="null-experts"),
    pytest.param(29, 17, 13, 24, 1, 4, 0.0, id="smora-rank1-E24-k4"),
    pytest.param(15, 12, 10, 3, 4, 3, 0.0, id="dense-k=E"),
    pytest.param(1, 8, 8, 3, 2, 1, 0.0, id="one-token"),
]


def run(fn, x, a, b, idx, w, seed=0):
    leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
    y = fn(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    g = torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(seed), device=y.device).to(y.dtype)
    (y * g).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


def assert_all_close(got, want, **tol):
    for g, w_, name in zip(got, want, ("y", "dx", "dA", "dB", "dw")):
        torch.testing.assert_close(g, w_, msg=lambda m, name=name: f"{name}: {m}", **tol)


@interpreter
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("T,d_in,d_out,E,r,k,null_frac", SHAPES)
def test_kernels_match_oracle_and_torch_path(path, T, d_in, d_out, E, r, k, null_frac):
    x, a, b, idx, w = (
        t.float() if t.is_floating_point() else t for t in make_inputs(T, d_in, d_out, E, r, k, null_frac)
    )
    if k == E:  # dense routing (LoRAMoE): every expert in every token's slots
        idx = torch.arange(E).expand(T, E).clone()
    got = run(lambda *t: apply_lora_experts(*t, 1.3, backend=path), x, a, b, idx, w)
    want = run(lambda *t: oracle(*t, 1.3), x, a, b, idx, w)
    assert_all_close(got, want, rtol=1e-4, atol=1e-4)
    if k < E and null_frac == 0 and T > 1:  # the last expert received no token: its gradients are exactly 0
        assert torch.count_nonzero(got[2][-1]) == 0 and torch.count_nonzero(got[3][-1]) == 0


@interpreter
@pytest.mark.parametrize("path", ["triton_dense", "triton_sorted"])
def test_null_slots_contribute_exactly_zero_and_get_zero_weight_grad(path):
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(9, 8, 8, 4, 3, 2))
    idx[:, 1] = -1
    y, dx, dA, dB, dw = run(lambda *t: apply_lora_experts(*t, 1.0, backend=path), x, a, b, idx, w)
    y1 = apply_lora_experts(x, a, b, idx[:, :1], w[:, :1], 1.0, backend=path)
    assert torch.equal(y, y1)  # the null slot adds exactly nothing
    assert torch.count_nonzero(dw[:, 1]) == 0


@interpreter
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_in_place_into_base_output_and_fused_base_linear(path):
    """out= adds into the base output in place; linear_lora_experts also puts the LoRA dx into the base dx."""
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(37, 20, 27, 6, 5, 2))
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(27, 20, generator=gen), torch.randn(27, generator=gen)

    def reference(x_, a_, b_, idx_, w_):
        return torch.nn.functional.linear(x_, weight, bias) + oracle(x_, a_, b_, idx_, w_, 0.7)

    def in_place(x_, a_, b_, idx_, w_):
        base = torch.nn.functional.linear(x_, weight, bias)
        ptr = base.data_ptr()
        y = apply_lora_experts(x_, a_, b_, idx_, w_, 0.7, backend=path, out=base)
        assert y.data_ptr() == ptr  # written into the base output, not a new tensor
        return y

    def in_place_view(x_, a_, b_, idx_, w_):
        base = torch.nn.functional.linear(x_.unsqueeze(0), weight, bias)  # [1, T, out]
        apply_lora_experts(x_, a_, b_, idx_, w_, 0.7, backend=path, out=base.view(x_.shape[0], -1))  # a view
        return base[0]

    def fused(x_, a_, b_, idx_, w_):
        return linear_lora_experts(x_, weight, bias, a_, b_, idx_, w_, 0.7, backend=path)

    want = run(reference, x, a, b, idx, w)
    assert_all_close(run(in_place, x, a, b, idx, w), want, rtol=1e-4, atol=1e-4)
    assert_all_close(run(fused, x, a, b, idx, w), want, rtol=1e-4, atol=1e-4)
    assert_all_close(run(in_place_view, x, a, b, idx, w), want, rtol=1e-4, atol=1e-4)


@interpreter
@pytest.mark.parametrize("path", ["triton_dense", "triton_sorted"])
def test_bf16_activations_with_fp32_adapters_under_autocast(path):
    """bf16 dot operands, fp32 accumulation: within bf16 rounding of the fp32 oracle (and no worse than the
    torch path, which rounds u to bf16 between its two GEMMs)."""
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(45, 32, 24, 4, 8, 2))
    want = run(lambda *t: oracle(*t, 2.0), x, a, b, idx, w)

    def bf16(backend):
        def fn(x_, a_, b_, idx_, w_):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return apply_lora_experts(x_.bfloat16(), a_, b_, idx_, w_, 2.0, backend=backend)

        return fn

    got = run(bf16(path), x, a, b, idx, w)
    torch_path = run(bf16("dense"), x, a, b, idx, w)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32  # adapter grads stay fp32
    for g, t, ref, name in zip(got, torch_path, want, ("y", "dx", "dA", "dB", "dw")):
        err = (g.float() - ref).abs().max() / ref.abs().max()
        err_torch = (t.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, (name, float(err))
        assert err <= err_torch * 1.5 + 1e-3, (name, float(err), float(err_torch))


@interpreter
@pytest.mark.parametrize("path", ["triton_dense", "triton_sorted"])
def test_deterministic(path):
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(70, 33, 29, 5, 3, 2))
    first = run(lambda *t: apply_lora_experts(*t, 1.0, backend=path), x, a, b, idx, w)
    second = run(lambda *t: apply_lora_experts(*t, 1.0, backend=path), x, a, b, idx, w)
    for p, q in zip(first, second):
        assert torch.equal(p, q)


@interpreter
def test_non_contiguous_input_and_multi_adapter_batch():
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(20, 16, 12, 3, 4, 1))
    wide = torch.randn(20, 32)
    wide[:, ::2] = x
    for path in ("triton_dense", "triton_sorted"):
        got = apply_lora_experts(wide[:, ::2], a, b, idx, w, 1.0, backend=path)  # stride-2 columns
        torch.testing.assert_close(got, oracle(x, a, b, idx, w, 1.0), rtol=1e-4, atol=1e-4)
    # per-sample adapters: sample b uses adapter sample_adapter[b] for all its tokens; -1 = none
    xs = torch.randn(4, 5, 16)
    sample_adapter = torch.tensor([2, 0, -1, 2])
    for path in KERNEL_PATHS:
        y = apply_lora_per_sample(xs, a, b, sample_adapter, 0.5, backend=path)
        for s, adapter in enumerate(sample_adapter.tolist()):
            want = torch.zeros(5, 12) if adapter < 0 else xs[s] @ a[adapter].t() @ b[adapter].t() * 0.5
            torch.testing.assert_close(y[s], want, rtol=1e-4, atol=1e-4)


@interpreter
def test_sorted_alignment_tables():
    """Every valid pair lands in exactly one single-expert tile of its slot; null pairs in none."""
    from moe_peft.ops.triton_ops import align_pairs

    idx = torch.tensor([[0, 2], [2, -1], [2, 0], [1, 2], [-1, -1]])
    al = align_pairs(idx, num_experts=3, block_m=2)
    seen = []
    for t in range(al["tile_row0"].numel()):
        rows = range(int(al["tile_row0"][t]), int(al["tile_row1"][t]))
        pairs = [int(al["order"][r]) for r in rows]
        assert all(int(idx.view(-1)[p]) == int(al["tile_expert"][t]) for p in pairs)
        slot_of_tile = [j for j in range(2) if al["slot_tiles"][j] <= t < al["slot_tiles"][j + 1]]
        assert all(p % 2 == slot_of_tile[0] for p in pairs)
        seen += pairs
    assert sorted(seen) == [p for p in range(10) if int(idx.view(-1)[p]) >= 0]


def test_triton_backend_errors_are_clear(monkeypatch):
    args = (torch.randn(2, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2), torch.zeros(2, 1, dtype=torch.long))
    # no Triton installed
    monkeypatch.setattr(ops, "_HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        apply_lora_experts(*args, torch.ones(2, 1), 1.0, backend="triton")
    assert apply_lora_experts(*args, torch.ones(2, 1), 1.0, backend="auto").shape == (2, 5)  # falls back silently
    monkeypatch.undo()
    # CPU tensors without the interpreter: a separate process, since the variable is read at import
    code = (
        "import torch; from moe_peft.ops import apply_lora_experts\n"
        "try:\n"
        "    apply_lora_experts(torch.randn(2, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2),"
        " torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 1.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_auto_backend_choice():
    x, a = torch.randn(64, 8), torch.randn(8, 4, 8)
    assert ops.choose_backend(x, a, k=2) == "dense"  # CPU: torch, E*r = 32 <= 2*k*(r+8) = 48
    assert ops.choose_backend(x, torch.randn(64, 16, 8), k=1) == "grouped"  # CPU, many rank-16 experts
    assert ops.choose_backend(x, a, k=2, backend="triton") == "triton_dense"  # E*r = 32 <= DENSE_MAX_R
    assert ops.choose_backend(x, torch.randn(32, 16, 8), k=2, backend="triton") == "triton_sorted"  # E*r = 512


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("path", ["dense", pytest.param("triton_dense", marks=interpreter)])
def test_under_gradient_checkpointing(path, reentrant):
    from torch.utils.checkpoint import checkpoint

    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(21, 12, 10, 4, 3, 2))
    weight = torch.randn(10, 12)

    def block(x_, a_, b_, idx_, w_):
        return torch.tanh(linear_lora_experts(x_, weight, None, a_, b_, idx_, w_, 1.0, backend=path))

    def checkpointed(x_, a_, b_, idx_, w_):
        return checkpoint(block, x_, a_, b_, idx_, w_, use_reentrant=reentrant)

    assert_all_close(run(checkpointed, x, a, b, idx, w), run(block, x, a, b, idx, w))


def test_torch_compile_does_not_break_on_the_op():
    """A graph break around the op is fine; a crash is not (inductor would need a C compiler: aot_eager)."""
    x, a, b, idx, w = (t.float() if t.is_floating_point() else t for t in make_inputs(16, 8, 6, 4, 2, 2))
    weight = torch.randn(6, 8)

    def layer(x_, a_, b_, idx_, w_):
        h = torch.relu(x_) * 2
        return linear_lora_experts(h, weight, None, a_, b_, idx_, w_, 1.0).square()

    compiled = torch.compile(layer, backend="aot_eager")
    assert_all_close(run(compiled, x, a, b, idx, w), run(layer, x, a, b, idx, w))


# ---------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16, compiled kernels
# ---------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton_dense", "triton_sorted"])
@pytest.mark.parametrize("T,d,E,r,k", [(8192, 4096, 8, 16, 2), (4099, 2048, 64, 8, 2), (2048, 1024, 4, 64, 1)])
def test_gpu_bf16_real_sizes(path, T, d, E, r, k):
    """Against the fp32 oracle (the torch dense path in fp32): relative max error below 2e-2 for y and every
    gradient (bf16 operands, fp32 accumulation; errors grow with sqrt(d))."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=gen)
    a = torch.randn(E, r, d, device="cuda", generator=gen) / d**0.5
    b = torch.randn(E, d, r, device="cuda", generator=gen) / r**0.5
    idx = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices
    w = torch.rand(T, k, device="cuda", generator=gen)
    want = run(lambda *t: apply_lora_experts(*t, 2.0, backend="dense"), x, a, b, idx, w)

    def bf16(x_, a_, b_, idx_, w_):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return apply_lora_experts(x_.bfloat16(), a_, b_, idx_, w_, 2.0, backend=path)

    got = run(bf16, x, a, b, idx, w)
    for g, ref, name in zip(got, want, ("y", "dx", "dA", "dB", "dw")):
        err = ((g.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, (name, err)


# ---------------------------------------------------------------------------------------------------
# Inside a model: every method through the Triton kernels equals the torch path
# ---------------------------------------------------------------------------------------------------


@interpreter
@pytest.mark.parametrize("case", CASES)
def test_every_method_through_triton_equals_torch_path(case, batch):
    import copy

    from peft import get_peft_model

    from moe_peft.bases import tiny_llama

    results = {}
    for backend in ("torch", "triton"):
        base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
        model = get_peft_model(base, make_config(case, kernel_backend=backend, init_lora_weights=True))
        randomize_experts(model)
        model.train()
        torch.manual_seed(0)  # the same dropout masks / router noise in both runs
        out = model(**copy.deepcopy(batch))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results[backend] = (out.logits.detach(), out.loss.item(), grads)
    logits_t, loss_t, grads_t = results["torch"]
    logits_k, loss_k, grads_k = results["triton"]
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-5)
    assert abs(loss_k - loss_t) < 1e-5
    assert grads_k.keys() == grads_t.keys() and any("router" in n for n in grads_t)
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-3, atol=1e-6, msg=name)


def test_bench_ops_prints_every_baseline_ratio():
    from moe_peft.bench import bench_grid, bench_multi_adapter

    lines = []
    rows = bench_grid([(64, 32, 4, 4, 2), (64, 32, 16, 16, 1)], torch.device("cpu"), torch.float32, 1, lines.append)
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"] * 2
    for row in rows:
        assert all(row[f"{n}_ms"] > 0 for n in ("ours", "base", "peft", "loop", "einsum"))
    assert {r["path"] for r in rows} == {"dense", "grouped"}
    multi = bench_multi_adapter([(3, 8, 32, 2, 4)], torch.device("cpu"), torch.float32, 1, lines.append)
    assert "max |ours - peft| = " in lines[-1] and multi[0]["peft_ms"] > 0
    diff = float(lines[-1].split("max |ours - peft| = ")[1].split(",")[0])
    assert diff < 1e-5  # per-sample adapters equal PEFT's mixed-batch forward


def test_layer_paths_with_dropout_and_several_adapters_agree(batch):
    """The layer runs base+experts as one op (no dropout, one adapter) or base then in-place adds (dropout in
    training, several active adapters); the routes give the same function."""
    from peft import get_peft_model

    from moe_peft.bases import tiny_llama

    def build(dropout):
        base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
        model = get_peft_model(base, make_config("mole_linear_top2", lora_dropout=dropout))
        randomize_experts(model)
        return model

    plain, dropped = build(0.0), build(0.3)
    plain.eval(), dropped.eval()  # dropout off in eval: the fused route vs the same weights
    with torch.no_grad():
        torch.testing.assert_close(dropped(**batch).logits, plain(**batch).logits)
    dropped.train()
    out = dropped(**batch)
    out.loss.backward()  # the in-place route trains: experts and routers get gradients
    assert all(p.grad is not None for n, p in dropped.named_parameters() if p.requires_grad and "mole_A" in n)
    # two active adapters: the in-place route applies both, which equals the sum of their deltas
    plain.add_adapter("other", make_config("mole_linear_top2"))
    randomize_experts(plain, seed=2)
    plain.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = plain(**batch).logits
        plain.base_model.set_adapter("default")
        one = plain(**batch).logits
    assert not torch.allclose(both, one)


def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter skips the GPU compiler: compile every kernel for sm90 to a cubin (bf16 and fp32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_kernels.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled all kernels") == 2, out.stdout
