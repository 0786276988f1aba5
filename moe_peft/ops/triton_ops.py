"""Host side of the Triton kernels: tile choices, launches, and the two implementations of fused.py's
Function (Path D `TritonDense`, Path S `TritonSorted`). Shapes only decide grids: no `.item()`, no host
sync, so the op can be captured in a CUDA graph.

On a CPU tensor the kernels run only under `TRITON_INTERPRET=1` (how the tests check them).
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

from . import triton_kernels as K

_DOT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Path D keeps the whole E*r in registers in the dy pass; beyond this it is the wrong algorithm anyway
# (docs/kernel.md: sorting pays beyond roughly 400-700 columns).
DENSE_TILE_MAX_R = 512


def check_available(x: torch.Tensor) -> None:
    """Raise a clear error when the Triton kernels cannot run on this tensor."""
    interpreted = not isinstance(K._expand, JITFunction)  # decided when triton_kernels was imported
    if x.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "apply_lora_experts(backend='triton') got CPU tensors: the Triton kernels run on CUDA, or on CPU only "
            "under Triton's interpreter (set TRITON_INTERPRET=1 before moe_peft first uses them, e.g. in the "
            "environment). Use backend='auto' or 'torch' on CPU."
        )
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"apply_lora_experts(backend='triton') supports CUDA tensors, got {x.device}.")


def dot_code(cdt: torch.dtype) -> int:
    if cdt not in _DOT:
        raise TypeError(
            f"apply_lora_experts(backend='triton') computes in float32, bfloat16 or float16, got {cdt}; "
            "use backend='torch' for other dtypes."
        )
    return _DOT[cdt]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def _num_splits(num_tokens: int, tiles: int, block_t: int, device: torch.device) -> int:
    """How many fixed token splits the weight-gradient reduction uses: enough programs to fill the GPU."""
    max_splits = max(1, num_tokens // (8 * block_t))  # each split loops over at least 8 token tiles
    if device.type != "cuda":
        return min(2, max(1, triton_cdiv(num_tokens, block_t)))  # exercise the split logic on the interpreter
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, target // max(1, tiles)))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _wgrad(lhs: torch.Tensor, mat: torch.Tensor, dot: int) -> torch.Tensor:
    """sum_t lhs[t, c] mat[t, d] -> fp32 [R, D], by fixed token splits summed in order (deterministic)."""
    num_tokens, num_cols = lhs.shape
    d = mat.shape[1]
    block_r, block_d, block_t = min(_pow2(num_cols), 64), 64, 32
    tiles = triton_cdiv(d, block_d) * triton_cdiv(num_cols, block_r)
    splits = _num_splits(num_tokens, tiles, block_t, lhs.device)
    per_split = triton_cdiv(triton_cdiv(num_tokens, splits), block_t) * block_t  # a multiple of the token tile
    part = torch.empty(splits, num_cols, d, device=lhs.device, dtype=torch.float32)  # [S, R, D]
    grid = (triton_cdiv(d, block_d), triton_cdiv(num_cols, block_r), splits)
    K._wgrad[grid](
        lhs, mat, part, num_tokens, d, num_cols, per_split, mat.stride(0), mat.stride(1),
        BR=block_r, BD=block_d, BT=block_t, DOT=dot,
    )  # fmt: skip
    return part.sum(0) if splits > 1 else part[0]  # [R, D]


def expand(lhs, weight, strides, out, idx, w, rank, scaling, gate: bool, accumulate: bool, dot: int):
    """out (+)= (scaling * lhs * G if gate else lhs) @ W, W[c, n] at weight + strides (expert, rank, n)."""
    num_tokens, num_cols = lhs.shape
    n = out.shape[1]
    block_m, block_n, block_r = 64, 64, min(_pow2(num_cols), 64)
    grid = (triton_cdiv(num_tokens, block_m), triton_cdiv(n, block_n))
    K._expand[grid](
        lhs, weight, out, idx, w, num_tokens, n, num_cols, rank, float(scaling), *strides,
        out.stride(0), out.stride(1),
        K=idx.shape[1], GATE=gate, ACCUMULATE=accumulate, BM=block_m, BN=block_n, BR=block_r, DOT=dot,
    )  # fmt: skip
    return out


def _routing_tensors(idx: torch.Tensor, w: torch.Tensor):
    return idx.to(torch.int32).contiguous(), w.to(torch.float32).contiguous()


class TritonDense:
    """Path D: shrink (u = x A_all^T, fp32), then gate+expand into the output; backward in one dy pass,
    one dx pass (accumulating into the base dx) and two token-reduction GEMMs for dA and dB."""

    name = "triton"

    @staticmethod
    def forward(x, lora_A, lora_B, idx, w, scaling, out, cdt):
        check_available(x)
        dot = dot_code(cdt)
        num_tokens, d_in = x.shape
        num_experts, rank, _ = lora_A.shape
        num_cols = num_experts * rank
        d_out = lora_B.shape[1]
        idx32, w32 = _routing_tensors(idx, w)
        u = torch.empty(num_tokens, num_cols, device=x.device, dtype=torch.float32)  # [T, R]
        block_m, block_r, block_k = 64, min(_pow2(num_cols), 256), 64
        grid = (triton_cdiv(num_tokens, block_m), triton_cdiv(num_cols, block_r))
        K._dense_shrink[grid](
            x, lora_A, u, num_tokens, d_in, num_cols, rank,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
            BM=block_m, BR=block_r, BK=block_k, DOT=dot,
        )  # fmt: skip
        accumulate = out is not None
        if out is None:
            out = torch.empty(num_tokens, d_out, device=x.device, dtype=cdt)
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # B_all^T[c, n] = B[c // r, n, c % r]
        expand(u, lora_B, b_strides, out, idx32, w32, rank, scaling, True, accumulate, dot)
        return out, (u,)

    @staticmethod
    def backward(dy, x, lora_A, lora_B, idx, w, scaling, saved, dx_base, needs, cdt):
        (u,) = saved
        dot = dot_code(cdt)
        num_tokens, d_in = x.shape
        num_experts, rank, _ = lora_A.shape
        num_cols = num_experts * rank
        d_out = lora_B.shape[1]
        if num_cols > DENSE_TILE_MAX_R:
            raise ValueError(f"Path D holds E*r={num_cols} columns in one tile; at most {DENSE_TILE_MAX_R}.")
        idx32, w32 = _routing_tensors(idx, w)
        du = torch.empty_like(u)  # [T, R] fp32
        h = torch.empty_like(u)  # [T, R] fp32
        dw = torch.empty(idx32.shape, device=x.device, dtype=torch.float32)  # [T, k]
        block_m, block_n = 32, 64
        K._dense_dy[(triton_cdiv(num_tokens, block_m),)](
            dy, lora_B, u, idx32, w32, du, h, dw, num_tokens, d_out, num_cols, rank, float(scaling),
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            K=idx32.shape[1], BM=block_m, BN=block_n, BR=_pow2(num_cols), DOT=dot,
        )  # fmt: skip
        dx = dA = dB = None
        if needs[0]:
            accumulate = dx_base is not None
            dx = dx_base if accumulate else torch.empty(num_tokens, d_in, device=x.device, dtype=cdt)
            a_strides = (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2))  # A_all[c, n] = A[c // r, c % r, n]
            expand(du, lora_A, a_strides, dx, idx32, w32, rank, 1.0, False, accumulate, dot)
        if needs[1]:
            dA = _wgrad(du, x, dot).view(num_experts, rank, d_in)  # du^T x: [R, in] -> [E, r, in]
        if needs[2]:
            dB = _wgrad(h, dy, dot).view(num_experts, rank, d_out).transpose(1, 2)  # h^T dy: [R, out] -> [E, out, r]
        return dx, dA, dB, dw


def align_pairs(idx: torch.Tensor, num_experts: int, block_m: int):
    """Sort the (token, slot) pairs by (slot, expert) and cut each segment into block_m-row tiles.

    Device ops only, sized by shapes (no sync). Returns a dict of int32 tensors:
      order [P]: pair id (t*k + j) at each sorted row; null pairs sort last and belong to no tile,
      seg_start/seg_end [k*E]: sorted rows of segment (slot, expert),
      tile_row0/tile_row1/tile_expert [max_tiles]: rows and expert of each tile (empty past the last),
      slot_tiles [k+1]: tiles of slot j are [slot_tiles[j], slot_tiles[j+1]).
    """
    num_tokens, k = idx.shape
    num_segments = k * num_experts
    device = idx.device
    flat = idx.reshape(-1)  # [P], pair p = t*k + j
    slot = torch.arange(flat.numel(), device=device) % k  # [P]
    key = torch.where(flat >= 0, slot * num_experts + flat, num_segments)  # [P]; null pairs -> sentinel
    order = torch.argsort(key, stable=True)  # [P]
    counts = torch.zeros(num_segments + 1, device=device, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))
    seg_end = counts.cumsum(0)[:num_segments]  # [kE]
    seg_start = seg_end - counts[:num_segments]  # [kE]
    tiles = (counts[:num_segments] + block_m - 1) // block_m  # [kE] tiles per segment
    tile_end = tiles.cumsum(0)  # [kE]
    tile_start = tile_end - tiles
    max_tiles = triton_cdiv(flat.numel(), block_m) + num_segments  # an upper bound on sum(tiles)
    tid = torch.arange(max_tiles, device=device)
    seg = torch.searchsorted(tile_end, tid, right=True).clamp_max(num_segments - 1)  # [max_tiles]
    used = tid < tile_end[-1]
    row0 = seg_start[seg] + (tid - tile_start[seg]) * block_m
    row1 = torch.minimum(row0 + block_m, seg_end[seg])
    row0, row1 = torch.where(used, row0, 0), torch.where(used, row1, 0)  # unused tiles are empty
    slot_tiles = torch.cat([tile_start[::num_experts], tile_end[-1:]])  # [k+1]
    i32 = torch.int32
    return {
        "order": order.to(i32),
        "seg_start": seg_start.to(i32),
        "seg_end": seg_end.to(i32),
        "tile_row0": row0.to(i32),
        "tile_row1": row1.to(i32),
        "tile_expert": (seg % num_experts).to(i32),
        "slot_tiles": slot_tiles.to(i32),
        "max_tiles_per_slot": triton_cdiv(num_tokens, block_m) + num_experts,
    }


_TABLES = ("order", "seg_start", "seg_end", "tile_row0", "tile_row1", "tile_expert", "slot_tiles")


class TritonSorted:
    """Path S: per single-expert tile, gather rows and run a rank-r GEMM; expand into the output slot by
    slot (a token is once per slot, so no atomics); weight gradients per expert. Costs grow with k*r, not
    E*r, so it is the path for large E*r; null experts cost nothing."""

    name = "triton_sorted"
    BLOCK_M = 64

    @staticmethod
    def forward(x, lora_A, lora_B, idx, w, scaling, out, cdt):
        check_available(x)
        dot = dot_code(cdt)
        num_tokens, d_in = x.shape
        num_experts, rank, _ = lora_A.shape
        d_out = lora_B.shape[1]
        _, w32 = _routing_tensors(idx, w)
        al = align_pairs(idx, num_experts, TritonSorted.BLOCK_M)
        u = torch.empty(idx.numel(), rank, device=x.device, dtype=torch.float32)  # [P, r] by sorted row
        _rowdot(x, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), al, u, None, w32, None, None,
                rank, scaling, idx.shape[1], False, dot)  # fmt: skip
        if out is None:
            out = torch.zeros(num_tokens, d_out, device=x.device, dtype=cdt)
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # W_e[j, n] = B[e, n, j]
        _slot_expand(u, lora_B, b_strides, out, al, w32, rank, scaling, idx.shape[1], True, dot)
        return out, (u,) + tuple(al[name] for name in _TABLES)

    @staticmethod
    def backward(dy, x, lora_A, lora_B, idx, w, scaling, saved, dx_base, needs, cdt):
        u, *tables = saved
        al = dict(zip(_TABLES, tables))
        num_tokens, d_in = x.shape
        num_experts, rank, _ = lora_A.shape
        k = idx.shape[1]
        al["max_tiles_per_slot"] = triton_cdiv(num_tokens, TritonSorted.BLOCK_M) + num_experts
        dot = dot_code(cdt)
        _, w32 = _routing_tensors(idx, w)
        du = torch.empty_like(u)  # [P, r]
        h = torch.empty_like(u)  # [P, r]
        dw = torch.zeros(idx.shape, device=x.device, dtype=torch.float32)  # [T, k]; null slots stay 0
        b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # W_e[n, j] = B[e, n, j]
        _rowdot(dy, lora_B, b_strides, al, u, du, w32, h, dw, rank, scaling, k, True, dot)
        dx = dA = dB = None
        if needs[0]:
            dx = dx_base if dx_base is not None else torch.zeros(num_tokens, d_in, device=x.device, dtype=cdt)
            a_strides = (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2))  # W_e[j, n] = A[e, j, n]
            _slot_expand(du, lora_A, a_strides, dx, al, w32, rank, 1.0, k, False, dot)
        if needs[1]:
            dA = _pairs_wgrad(du, x, al, num_experts, rank, k, dot)  # [E, r, in]
        if needs[2]:
            dB = _pairs_wgrad(h, dy, al, num_experts, rank, k, dot).transpose(1, 2)  # [E, r, out] -> [E, out, r]
        return dx, dA, dB, dw


def _rowdot(src, weight, strides, al, u, lhs_out, w32, h_out, dw, rank, scaling, k, dy_pass, dot):
    """Forward: u_pair = x_rows A_e^T (written into `u`). Backward: dh = dy_rows B_e and its epilogue."""
    s_we, s_wr, s_wd = strides
    max_tiles = al["tile_row0"].numel()
    target = lhs_out if dy_pass else u
    K._pairs_rowdot[(max_tiles,)](
        src, weight, al["order"], al["tile_row0"], al["tile_row1"], al["tile_expert"],
        u, w32, target, h_out if dy_pass else u, dw if dy_pass else w32,
        src.shape[1], rank, float(scaling), src.stride(0), src.stride(1), s_we, s_wr, s_wd,
        K=k, DY_PASS=dy_pass, BM=TritonSorted.BLOCK_M, BK=64, RP=_pow2(rank), DOT=dot,
    )  # fmt: skip


def _slot_expand(lhs, weight, strides, out, al, w32, rank, scaling, k, gate, dot):
    n = out.shape[1]
    block_n = 64
    grid = (al["max_tiles_per_slot"], triton_cdiv(n, block_n))
    for slot in range(k):  # one pass per slot: within a slot every token appears at most once
        K._pairs_expand[grid](
            lhs, weight, out, al["order"], al["tile_row0"], al["tile_row1"], al["tile_expert"], al["slot_tiles"], w32,
            n, rank, float(scaling), slot, *strides, out.stride(0), out.stride(1),
            K=k, GATE=gate, BM=TritonSorted.BLOCK_M, BN=block_n, RP=_pow2(rank), DOT=dot,
        )  # fmt: skip


def _pairs_wgrad(lhs, src, al, num_experts, rank, k, dot):
    d = src.shape[1]
    block_d = 64
    grad = torch.empty(num_experts, rank, d, device=src.device, dtype=torch.float32)  # [E, r, D]
    K._pairs_wgrad[(num_experts, triton_cdiv(d, block_d))](
        lhs, src, al["order"], al["seg_start"], al["seg_end"], grad, d, rank, num_experts,
        src.stride(0), src.stride(1), K=k, BT=32, BD=block_d, RP=_pow2(rank), DOT=dot,
    )  # fmt: skip
    return grad
