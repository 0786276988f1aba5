"""Per-sample adapter selection on the torch path: two batched matmuls over the samples.

    y[b, s] = scale[b] * B[a_b] @ (A[a_b] @ x[b, s])        a_b = -1: no adapter, y[b] = 0

Every token of sample b uses the sample's adapter a_b (a mixed batch of fine-tunes). The routed op's
torch paths do not know that structure: the dense-gated path computes all N*r columns for every token,
the grouped path gathers each adapter's rows of x and scatters its rows of y back, in a Python loop
over the adapters. Here the activations are never gathered: the adapters' weights are (`[B, r, in]` and
`[B, out, r]`, r/S the size of the activations), and `torch.bmm` runs every sample against its own
adapter in one call, whatever the number of adapters. The Triton kernels (CUDA) take the routed op with
k = 1 instead (`moe_peft.ops.apply_lora_per_sample`).

Like the routed op, the Function adds the delta into the base layer's output in place (`out=`), or owns
the frozen base linear (`weight=`) and then adds the adapters' dx into the base dx; it saves only x and
h = scale * x A^T ([B, S, r]); the gathered weights are gathered again in backward rather than kept. The per-sample scale (each sample's adapter scaling) is a constant: no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import compute_dtype


def _gather(lora_A, lora_B, sel, cdt):
    a_sel = lora_A.to(cdt).index_select(0, sel)  # [N, r, in] -> [B, r, in]
    b_sel = lora_B.to(cdt).index_select(0, sel)  # [N, out, r] -> [B, out, r]
    return a_sel, b_sel


class PerSampleLoRAFunction(torch.autograd.Function):
    """Inputs: out ([B, S, out] base output to add into, in place) or None, x [B, S, in], A [N, r, in],
    B [N, out, r], sample_adapter [B] long (-1: none), sample_scale [B] float, and the weight/bias of a
    frozen base linear to run inside (then x is its input too). `out` comes first for the same reason as
    in fused.RoutedLoRAFunction (autograd routes a modified view's gradient through the first input)."""

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, sample_adapter, sample_scale, weight, bias):
        cdt = compute_dtype(x, lora_A)
        if weight is not None:
            out = F.linear(x, weight, bias)  # the base layer: its output is ours to add into
        sel = sample_adapter.clamp_min(0)  # [B]; a sample without adapter reads adapter 0 with scale 0
        scale = torch.where(sample_adapter >= 0, sample_scale.to(cdt), 0.0)  # [B]
        a_sel, b_sel = _gather(lora_A, lora_B, sel, cdt)
        u = torch.bmm(x.to(cdt), a_sel.transpose(1, 2))  # [B, S, in] @ [B, in, r] -> [B, S, r]
        h = u * scale.view(-1, 1, 1)  # [B, S, r]
        if out is None:
            y = torch.bmm(h, b_sel.transpose(1, 2))  # [B, S, r] @ [B, r, out] -> [B, S, out]
        else:
            y = out.baddbmm_(h.to(out.dtype), b_sel.transpose(1, 2).to(out.dtype))  # out += h B_sel^T
            if weight is None:
                ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_A, lora_B, sel, scale, weight, h)
        ctx.cdt, ctx.has_out, ctx.has_bias = cdt, out is not None and weight is None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, sel, scale, weight, h = ctx.saved_tensors
        cdt = ctx.cdt
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        a_sel, b_sel = _gather(lora_A, lora_B, sel, cdt)
        dy_c = dy.to(cdt)
        dh = torch.bmm(dy_c, b_sel)  # [B, S, out] @ [B, out, r] -> [B, S, r]
        du = dh * scale.view(-1, 1, 1)  # [B, S, r]
        dx = dA = dB = d_weight = d_bias = None
        if need_x:
            if weight is not None:  # dx = dy W + du A_sel: the base dx and the adapters' in one buffer
                dx = (dy.to(weight.dtype) @ weight).to(cdt).baddbmm_(du, a_sel)  # [B, S, out] @ [out, in] + ...
            else:
                dx = torch.bmm(du, a_sel)  # [B, S, r] @ [B, r, in] -> [B, S, in]
            dx = dx.to(x.dtype)
        if need_a:
            d_a_sel = torch.bmm(du.transpose(1, 2), x.to(cdt))  # [B, r, S] @ [B, S, in] -> [B, r, in]
            # samples of one adapter add up; a sample without adapter adds exact zeros (its scale is 0)
            dA = torch.zeros(lora_A.shape, device=x.device, dtype=cdt).index_add_(0, sel, d_a_sel).to(lora_A.dtype)
        if need_b:
            d_b_sel = torch.bmm(dy_c.transpose(1, 2), h)  # [B, out, S] @ [B, S, r] -> [B, out, r]
            dB = torch.zeros(lora_B.shape, device=x.device, dtype=cdt).index_add_(0, sel, d_b_sel).to(lora_B.dtype)
        if weight is not None and ctx.needs_input_grad[6]:
            flat_dy = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)  # [B*S, out]
            d_weight = flat_dy.t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)  # [out, B*S] @ [B*S, in]
        if ctx.has_bias and ctx.needs_input_grad[7]:
            d_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return (dy if ctx.has_out else None), dx, dA, dB, None, None, d_weight, d_bias
