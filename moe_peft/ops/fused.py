"""One autograd Function for the routed-LoRA op, with interchangeable implementations.

    y = [x W^T + b] + scaling * ((x A_all^T) * G) B_all^T           (docs/kernel.md, "the key fact")

E experts of rank r are one LoRA of rank R = E*r with a per-token block gate G [T, R] rebuilt from the
routing (idx [T, k], w [T, k]). The Function owns the adapter math, forward and backward, so that:

* the delta is added in place into the base layer's output (`out=`), never as a separate `[T, out]` sum;
* when it also owns the frozen base linear (`weight=`), the LoRA part of dx is accumulated into the base
  dx buffer (docs/kernel.md "Fusing with the base layer");
* the only activation it saves beyond x is u = x A_all^T (fp32 on the Triton path): O(T*E*r), never
  O(T*E*out);
* the router trains through it: it returns dL/dw.

Implementations: `TorchDense` (any device; the reference algorithm), `TritonDense` (Path D) and
`TritonSorted` (Path S) in triton_ops.py. All take and return the same tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype:
    """The dtype the adapter math runs in: the autocast dtype under autocast, else that of x and A promoted
    (PEFT casts x to the adapter dtype; fp32 adapters on bf16 activations therefore run in fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, lora_A.dtype)


class TorchDense:
    """Path D in plain torch: two GEMMs each way, `addmm` into the base output and the base dx."""

    name = "torch"

    @staticmethod
    def forward(x, lora_A, lora_B, idx, w, scaling, out, cdt):
        num_tokens = x.shape[0]
        num_experts, rank, d_in = lora_A.shape
        a_all = lora_A.to(cdt).reshape(num_experts * rank, d_in)  # [E, r, in] -> [R, in], a view
        u = x.to(cdt) @ a_all.t()  # [T, in] @ [in, R] -> [T, R]
        gate = _gate(idx, w.to(cdt), num_experts)  # [T, E]
        h = (u.view(num_tokens, num_experts, rank) * gate.unsqueeze(-1)).view(num_tokens, -1)  # [T, R]
        b_all = _b_all(lora_B, cdt)  # [out, R]
        if out is None:
            return torch.mm(h, b_all.t()).mul_(scaling), (u, gate)  # [T, R] @ [R, out] -> [T, out]
        out.addmm_(h.to(out.dtype), b_all.t().to(out.dtype), alpha=scaling)  # out += s h B_all^T
        return out, (u, gate)

    @staticmethod
    def backward(dy, x, lora_A, lora_B, idx, w, scaling, saved, dx_base, needs, cdt):
        u, gate = saved
        num_tokens = x.shape[0]
        num_experts, rank, d_in = lora_A.shape
        dy = dy.to(cdt)
        b_all = _b_all(lora_B, cdt)  # [out, R]
        u3 = u.view(num_tokens, num_experts, rank)  # [T, E, r]
        dh = (dy @ b_all).view(num_tokens, num_experts, rank)  # [T, out] @ [out, R] -> [T, E, r], unscaled
        du = (dh * (gate * scaling).unsqueeze(-1)).view(num_tokens, -1)  # [T, R]
        dx = dA = dB = dw = None
        if needs[0]:
            a_all = lora_A.to(cdt).reshape(num_experts * rank, d_in)  # [R, in]
            # dx = dx_base + du A_all, one pass over the dx buffer
            dx = torch.mm(du, a_all) if dx_base is None else torch.addmm(dx_base.to(cdt), du, a_all)
        if needs[1]:
            dA = (du.t() @ x.to(cdt)).view(num_experts, rank, d_in)  # [R, T] @ [T, in] -> [E, r, in]
        if needs[2]:
            h = (u3 * gate.unsqueeze(-1)).view(num_tokens, -1)  # [T, R]
            d_b_all = (dy.t() @ h).mul_(scaling)  # [out, T] @ [T, R] -> [out, R]
            dB = d_b_all.view(-1, num_experts, rank).permute(1, 0, 2)  # [out, E, r] -> [E, out, r]
        if needs[3]:
            d_gate = (dh * u3).sum(-1) * scaling  # [T, E]: dL/dG summed over each expert's rank block
            # slot j gets dL/dG[t, idx[t, j]]; a null slot (idx = -1) gets exactly zero
            dw = torch.where(idx >= 0, d_gate.gather(1, idx.clamp_min(0)), 0.0)  # [T, k]
        return dx, dA, dB, dw


class TorchSorted:
    """Path S in plain torch, for CPU when E*r is large: pairs sorted by expert, one GEMM pair per expert on
    gathered rows, results added back with `index_add_`. Cost grows with k*r, not E*r. The backward is
    written out (not left to autograd), so no expert allocates a full-size gradient of the gathered rows."""

    name = "grouped"

    @staticmethod
    def forward(x, lora_A, lora_B, idx, w, scaling, out, cdt):
        num_tokens, k = idx.shape
        rank = lora_A.shape[1]
        pairs, counts = _sort_pairs(idx, lora_A.shape[0])  # [P] pair ids grouped by expert, [E] on the host
        tok = pairs // k  # [P]
        w_pair = w.reshape(-1).index_select(0, pairs).to(cdt)  # [P]
        xc = x.to(cdt)
        u = xc.new_empty(pairs.numel(), rank)  # [P, r]
        y = out if out is not None else xc.new_zeros(num_tokens, lora_B.shape[1])  # [T, out]
        for e, rows in _segments(counts):
            t = tok[rows]  # [n]
            u[rows] = xc.index_select(0, t) @ lora_A[e].to(cdt).t()  # [n, in] @ [in, r] -> [n, r]
            y_e = (u[rows] * w_pair[rows, None]) @ lora_B[e].to(cdt).t()  # [n, r] @ [r, out] -> [n, out]
            y.index_add_(0, t, y_e.to(y.dtype), alpha=scaling)
        return y, (u, pairs, torch.tensor(counts))

    @staticmethod
    def backward(dy, x, lora_A, lora_B, idx, w, scaling, saved, dx_base, needs, cdt):
        u, pairs, counts = saved
        num_tokens, k = idx.shape
        tok = pairs // k
        w_pair = w.reshape(-1).index_select(0, pairs).to(cdt)  # [P]
        xc, dy = x.to(cdt), dy.to(cdt)
        dx = None
        if needs[0]:
            dx = xc.new_zeros(x.shape) if dx_base is None else dx_base.to(cdt)  # [T, in]
        dA = torch.zeros(lora_A.shape, device=x.device, dtype=cdt)  # experts with no token keep exactly 0
        dB = torch.zeros(lora_B.shape, device=x.device, dtype=cdt)
        dw = xc.new_zeros(idx.numel())  # [T*k]; null slots stay 0
        for e, rows in _segments(counts.tolist()):
            t = tok[rows]
            a_e, b_e = lora_A[e].to(cdt), lora_B[e].to(cdt)
            dy_e = dy.index_select(0, t)  # [n, out]
            dh = dy_e @ b_e  # [n, out] @ [out, r] -> [n, r], unscaled
            u_e, w_e = u[rows], w_pair[rows, None]  # [n, r], [n, 1]
            du = dh * (w_e * scaling)  # [n, r]
            dw[pairs[rows]] = (dh * u_e).sum(-1) * scaling  # [n]
            dB[e] = (dy_e.t() @ (u_e * w_e)).mul_(scaling)  # [out, n] @ [n, r] -> [out, r]
            dA[e] = du.t() @ xc.index_select(0, t)  # [r, n] @ [n, in] -> [r, in]
            if dx is not None:
                dx.index_add_(0, t, du @ a_e)  # [n, r] @ [r, in] -> [n, in] added at the token rows
        return dx, dA, dB, dw.view(num_tokens, k)


def _sort_pairs(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Pair ids (t*k + j) of the non-null slots, grouped by expert, and the count per expert (one sync)."""
    flat = idx.reshape(-1)  # [T*k]
    pairs = torch.nonzero(flat >= 0).squeeze(1)  # [P] null experts cost nothing
    experts = flat.index_select(0, pairs)
    order = torch.argsort(experts, stable=True)
    return pairs.index_select(0, order), torch.bincount(experts, minlength=num_experts).tolist()


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _gate(idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> torch.Tensor:
    """G [T, E]: w scattered at the selected experts (summed if one is picked twice); -1 adds nothing."""
    w = torch.where(idx >= 0, w, 0.0)  # [T, k]
    return w.new_zeros(idx.shape[0], num_experts).scatter_add_(1, idx.clamp_min(0), w)  # [T, E]


def _b_all(lora_B: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """[E, out, r] -> [out, E*r]: PEFT's LoRA-B layout at rank E*r (a small copy of the weights only)."""
    num_experts, d_out, rank = lora_B.shape
    return lora_B.to(cdt).permute(1, 0, 2).reshape(d_out, num_experts * rank)


class RoutedLoRAFunction(torch.autograd.Function):
    """Inputs: out ([T, out] base output to add into, in place) or None, x [T, in], A [E, r, in],
    B [E, out, r], w [T, k], idx [T, k] (long, -1 = none), scaling, weight/bias of a frozen base linear to
    run inside (then x is also its input and dx gets both parts in one buffer), and the implementation.

    `out` comes first because autograd, when the tensor modified in place is a view, routes the gradient
    of the Function's first input to it (CopySlices)."""

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, w, idx, scaling, weight, bias, impl):
        cdt = compute_dtype(x, lora_A)
        if weight is not None:
            out = F.linear(x, weight, bias)  # the base layer: its output is ours to add into
        y, saved = impl.forward(x, lora_A, lora_B, idx, w, scaling, out, cdt)
        if out is not None and weight is None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_A, lora_B, idx, w, weight, *saved)
        ctx.scaling, ctx.impl, ctx.cdt = scaling, impl, cdt
        ctx.has_out, ctx.has_bias = out is not None and weight is None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, idx, w, weight, *saved = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_a, need_b, need_w = ctx.needs_input_grad[1:5]
        dx_base = None
        if weight is not None and need_x:
            dx_base = dy.to(weight.dtype) @ weight  # [T, out] @ [out, in] -> [T, in], the base layer's dx
        dx, dA, dB, dw = ctx.impl.backward(
            dy, x, lora_A, lora_B, idx, w, ctx.scaling, saved, dx_base, (need_x, need_a, need_b, need_w), ctx.cdt
        )
        d_weight = d_bias = None
        if weight is not None and ctx.needs_input_grad[7]:
            d_weight = dy.t().to(weight.dtype) @ x.to(weight.dtype)  # [out, T] @ [T, in]
        if ctx.has_bias and ctx.needs_input_grad[8]:
            d_bias = dy.sum(0).to(weight.dtype)
        return (
            dy if ctx.has_out else None,
            _cast(dx, x),
            _cast(dA, lora_A),
            _cast(dB, lora_B),
            _cast(dw, w),
            None,
            None,
            d_weight,
            d_bias,
            None,
        )


def _cast(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if grad is None else grad.to(like.dtype)
