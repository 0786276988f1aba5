"""Triton kernels of the routed-LoRA op (docs/kernel.md). Imported only when the Triton backend runs.

Notation: T tokens, E experts of rank r, R = E*r columns of the "one big LoRA", k routing slots.
Expert weights are addressed in place with three strides, so `A [E, r, in]` and `B [E, out, r]` are read
as `A_all [R, in]` and `B_all [out, R]` without copies: column c of the big LoRA is expert c // r, rank
row c % r. Every kernel accumulates in fp32; `DOT` picks the dtype of the `tl.dot` operands (0 fp32,
1 bf16, 2 fp16) so fp32 adapter weights feed bf16 tensor cores without a cast pass.

Path D (dense-gated, E*r small): `_dense_shrink`, `_expand`, `_dense_dy`, `_wgrad`.
Path S (sorted pairs, E*r large): `_pairs_rowdot`, `_pairs_expand`, `_pairs_wgrad`.
No kernel uses atomics, so every result is deterministic.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's CPU interpreter (numpy) has no bfloat16 matmul, and its fp32 -> bf16 cast truncates: under it,
# 16-bit dot operands are rounded to nearest-even by hand and multiplied in fp32, which gives the inputs
# the same rounding as the GPU's tensor cores.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _cast(v, DOT: tl.constexpr):
    if DOT == 1:
        return v.to(tl.bfloat16)
    elif DOT == 2:
        return v.to(tl.float16)
    else:
        return v.to(tl.float32)


@triton.jit
def _round(v, DOT: tl.constexpr):
    """v rounded to the 16-bit dot dtype, kept in fp32 (interpreter only)."""
    if DOT == 1:
        bits = v.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round to nearest even on the top 16 bits
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float16).to(tl.float32)


@triton.jit
def _out_cast(acc, out_ptr):
    """fp32 accumulator -> the output's dtype, rounding to nearest (by hand under the interpreter)."""
    if _INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        return _round(acc, 1).to(tl.bfloat16)
    else:
        return acc.to(out_ptr.dtype.element_ty)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    # fp32 operands use IEEE products so the op matches the fp32 torch reference (no silent TF32)
    if DOT == 0:
        return tl.dot(_cast(a, DOT), _cast(b, DOT), input_precision="ieee")
    elif _INTERPRET:
        return tl.dot(_round(a, DOT), _round(b, DOT), input_precision="ieee")
    else:
        return tl.dot(_cast(a, DOT), _cast(b, DOT))


@triton.jit
def _gate(idx_ptr, gw_ptr, rows, row_ok, cols, rank, K: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    """The block gate G[t, c] = sum_j w[t, j] * (idx[t, j] == c // r), built in registers ([BM, BR]).

    idx = -1 (null expert, padding) never matches a column, so it contributes exactly zero.
    """
    col_expert = cols // rank  # [BR]
    g = tl.zeros([BM, BR], dtype=tl.float32)
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=-1)  # [BM]
        w = tl.load(gw_ptr + rows * K + j, mask=row_ok, other=0.0)  # [BM] fp32
        g += tl.where(e[:, None] == col_expert[None, :], w[:, None], 0.0)  # [BM, BR]
    return g


# ---------------------------------------------------------------------------------------------------
# Path D: dense-gated
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _dense_shrink(
    x_ptr, a_ptr, u_ptr,
    T, D, R, rank,
    s_xt, s_xd, s_ae, s_ar, s_ad,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """u = x A_all^T -> fp32 [T, R]. The whole R sits in one tile, so x is read exactly once."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    cols = pid_r * BR + tl.arange(0, BR)  # [BR]
    row_ok = rows < T
    col_ok = cols < R
    a_col = (cols // rank) * s_ae + (cols % rank) * s_ar  # [BR] address of A_all[c, 0]
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)  # [BK]
        k_ok = ks < D
        xt = tl.load(x_ptr + rows[:, None] * s_xt + ks[None, :] * s_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + a_col[None, :] + ks[:, None] * s_ad, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(xt, at, DOT)  # [BM, BK] @ [BK, BR] -> [BM, BR]
    tl.store(u_ptr + rows[:, None] * R + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _expand(
    l_ptr, w_ptr, out_ptr, idx_ptr, gw_ptr,
    T, N, R, rank, scaling,
    s_we, s_wr, s_wn, s_ot, s_on,
    K: tl.constexpr, GATE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """out[t, n] (+)= sum_c L'[t, c] W[c, n], with L' = scaling * L * G when GATE, else L.

    Forward: L = u, W = B_all^T (the gate is rebuilt here from (idx, w), never stored). Backward: L = du,
    W = A_all, out = dx (ACCUMULATE adds into the base layer's dx). L is fp32 [T, R], contiguous.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    ns = pid_n * BN + tl.arange(0, BN)  # [BN]
    row_ok = rows < T
    n_ok = ns < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for c0 in range(0, R, BR):
        cols = c0 + tl.arange(0, BR)  # [BR]
        col_ok = cols < R
        lt = tl.load(l_ptr + rows[:, None] * R + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if GATE:
            lt = lt * _gate(idx_ptr, gw_ptr, rows, row_ok, cols, rank, K, BM, BR) * scaling  # [BM, BR]
        w_col = (cols // rank) * s_we + (cols % rank) * s_wr  # [BR]
        wt = tl.load(w_ptr + w_col[:, None] + ns[None, :] * s_wn, mask=col_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(lt, wt, DOT)  # [BM, BR] @ [BR, BN] -> [BM, BN]
    o_ptrs = out_ptr + rows[:, None] * s_ot + ns[None, :] * s_on
    o_mask = row_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, _out_cast(acc, out_ptr), mask=o_mask)


@triton.jit
def _dense_dy(
    dy_ptr, b_ptr, u_ptr, idx_ptr, gw_ptr, du_ptr, h_ptr, dw_ptr,
    T, N, R, rank, scaling,
    s_dt, s_dn, s_be, s_bn, s_br,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """One pass over dy: dh = dy B_all, then from (dh, u, G) in registers
    du = s dh*G (for dx and dA), h = s u*G (for dB), dw[t, j] = s sum_{c in block idx[t,j]} dh*u."""
    pid_m = tl.program_id(0)
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    cols = tl.arange(0, BR)  # [BR], the whole R (BR >= R)
    row_ok = rows < T
    col_ok = cols < R
    b_col = (cols // rank) * s_be + (cols % rank) * s_br  # [BR]
    dh = tl.zeros([BM, BR], dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)  # [BN]
        n_ok = ns < N
        dyt = tl.load(
            dy_ptr + rows[:, None] * s_dt + ns[None, :] * s_dn, mask=row_ok[:, None] & n_ok[None, :], other=0.0
        )
        bt = tl.load(b_ptr + b_col[None, :] + ns[:, None] * s_bn, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        dh += _dot(dyt, bt, DOT)  # [BM, BN] @ [BN, BR] -> [BM, BR]
    tile = rows[:, None] * R + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    u = tl.load(u_ptr + tile, mask=tile_ok, other=0.0)  # [BM, BR] fp32
    g = _gate(idx_ptr, gw_ptr, rows, row_ok, cols, rank, K, BM, BR)  # [BM, BR]
    tl.store(du_ptr + tile, scaling * dh * g, mask=tile_ok)
    tl.store(h_ptr + tile, scaling * u * g, mask=tile_ok)
    dg = scaling * dh * u  # [BM, BR] = dL/dG
    col_expert = cols // rank
    for j in tl.static_range(K):
        e = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=-1)  # [BM]
        dwj = tl.sum(tl.where(e[:, None] == col_expert[None, :], dg, 0.0), axis=1)  # [BM]
        tl.store(dw_ptr + rows * K + j, dwj, mask=row_ok)


@triton.jit
def _wgrad(
    l_ptr, m_ptr, part_ptr,
    T, D, R, t_per_split,
    s_mt, s_md,
    BR: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """part[s, c, d] = sum over the tokens of split s of L[t, c] M[t, d] (fp32 [S, R, D]).

    dA_all = du^T x and dB_all^T = h^T dy. Splits over T fill the GPU when D is small; their partials are
    summed in a fixed order by the caller, so the result is deterministic.
    """
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_r * BR + tl.arange(0, BR)  # [BR]
    ds = pid_d * BD + tl.arange(0, BD)  # [BD]
    col_ok = cols < R
    d_ok = ds < D
    t_start = pid_s * t_per_split
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for t0 in range(t_start, t_start + t_per_split, BT):
        ts = t0 + tl.arange(0, BT)  # [BT]
        t_ok = ts < T
        lt = tl.load(l_ptr + ts[None, :] * R + cols[:, None], mask=col_ok[:, None] & t_ok[None, :], other=0.0)
        mt = tl.load(m_ptr + ts[:, None] * s_mt + ds[None, :] * s_md, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _dot(lt, mt, DOT)  # [BR, BT] @ [BT, BD] -> [BR, BD]
    tl.store(part_ptr + pid_s * R * D + cols[:, None] * D + ds[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# Path S: sorted pairs. Pairs p = t*k + j are sorted by (slot j, expert e); `order` maps a sorted row to
# its pair, and a tile table cuts every (slot, expert) segment into BM-row tiles. Data are gathered
# inside the kernels (token = pair // k), never copied. Null pairs (idx = -1) have no tile: they cost
# nothing.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(tile, tile_row0_ptr, tile_row1_ptr, order_ptr, K: tl.constexpr, BM: tl.constexpr):
    row0 = tl.load(tile_row0_ptr + tile)
    row1 = tl.load(tile_row1_ptr + tile)
    rows = row0 + tl.arange(0, BM)  # [BM] sorted positions
    ok = rows < row1
    pair = tl.load(order_ptr + rows, mask=ok, other=0)  # [BM]
    return rows, ok, pair, pair // K


@triton.jit
def _pairs_rowdot(
    src_ptr, w_ptr, order_ptr, tile_row0_ptr, tile_row1_ptr, tile_expert_ptr,
    u_ptr, gw_ptr, lhs_out_ptr, h_out_ptr, dw_ptr,
    D, rank, scaling,
    s_st, s_sd, s_we, s_wr, s_wd,
    K: tl.constexpr, DY_PASS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """acc[row, j] = src[token(row)] . W_e[:, j] for the rows of one single-expert tile.

    Forward (DY_PASS=0): src = x, W_e = A_e^T, and acc is u_pair [P, r] (fp32, by sorted row).
    Backward (DY_PASS=1): src = dy, W_e = B_e, acc is dh; the epilogue writes
    du_pair = s w dh, h_pair = s w u and dw[pair] = s sum_j dh*u.
    """
    tile = tl.program_id(0)
    rows, ok, pair, tok = _tile_rows(tile, tile_row0_ptr, tile_row1_ptr, order_ptr, K, BM)
    e = tl.load(tile_expert_ptr + tile)
    js = tl.arange(0, RP)  # [RP] rank index
    j_ok = js < rank
    acc = tl.zeros([BM, RP], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)  # [BK]
        k_ok = ks < D
        st = tl.load(src_ptr + tok[:, None] * s_st + ks[None, :] * s_sd, mask=ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(
            w_ptr + e * s_we + js[None, :] * s_wr + ks[:, None] * s_wd, mask=k_ok[:, None] & j_ok[None, :], other=0.0
        )  # [BK, RP]
        acc += _dot(st, wt, DOT)  # [BM, BK] @ [BK, RP] -> [BM, RP]
    tile_ptrs = rows[:, None] * rank + js[None, :]  # rows of the [P, r] pair buffers
    tile_ok = ok[:, None] & j_ok[None, :]
    if DY_PASS:
        u = tl.load(u_ptr + tile_ptrs, mask=tile_ok, other=0.0)  # [BM, RP]
        w = tl.load(gw_ptr + pair, mask=ok, other=0.0)  # [BM]
        tl.store(lhs_out_ptr + tile_ptrs, scaling * w[:, None] * acc, mask=tile_ok)
        tl.store(h_out_ptr + tile_ptrs, scaling * w[:, None] * u, mask=tile_ok)
        tl.store(dw_ptr + pair, scaling * tl.sum(acc * u, axis=1), mask=ok)
    else:
        tl.store(lhs_out_ptr + tile_ptrs, acc, mask=tile_ok)


@triton.jit
def _pairs_expand(
    l_ptr, w_ptr, out_ptr, order_ptr, tile_row0_ptr, tile_row1_ptr, tile_expert_ptr, slot_tiles_ptr, gw_ptr,
    N, rank, scaling, slot,
    s_we, s_wr, s_wn, s_ot, s_on,
    K: tl.constexpr, GATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """out[token(row)] += L'[row] W_e for the tiles of ONE slot: a token appears once per slot, so the
    read-add-write needs no atomics. Forward: L' = s w u_pair, W_e = B_e^T. Backward: L = du_pair,
    W_e = A_e (dx)."""
    first = tl.load(slot_tiles_ptr + slot)
    last = tl.load(slot_tiles_ptr + slot + 1)
    tile = first + tl.program_id(0)
    if tile < last:
        pid_n = tl.program_id(1)
        rows, ok, pair, tok = _tile_rows(tile, tile_row0_ptr, tile_row1_ptr, order_ptr, K, BM)
        e = tl.load(tile_expert_ptr + tile)
        js = tl.arange(0, RP)
        j_ok = js < rank
        ns = pid_n * BN + tl.arange(0, BN)  # [BN]
        n_ok = ns < N
        lt = tl.load(l_ptr + rows[:, None] * rank + js[None, :], mask=ok[:, None] & j_ok[None, :], other=0.0)
        if GATE:
            lt = lt * (scaling * tl.load(gw_ptr + pair, mask=ok, other=0.0))[:, None]  # [BM, RP]
        wt = tl.load(
            w_ptr + e * s_we + js[:, None] * s_wr + ns[None, :] * s_wn, mask=j_ok[:, None] & n_ok[None, :], other=0.0
        )  # [RP, BN]
        acc = _dot(lt, wt, DOT)  # [BM, RP] @ [RP, BN] -> [BM, BN]
        o_ptrs = out_ptr + tok[:, None] * s_ot + ns[None, :] * s_on
        o_mask = ok[:, None] & n_ok[None, :]
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, _out_cast(acc, out_ptr), mask=o_mask)


@triton.jit
def _pairs_wgrad(
    l_ptr, src_ptr, order_ptr, seg_start_ptr, seg_end_ptr, out_ptr,
    D, rank, num_experts,
    s_st, s_sd,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """dW_e[j, d] = sum over the pairs routed to expert e of L[row, j] src[token(row), d] (fp32 [E, r, D]).

    dA: L = du_pair, src = x. dB^T: L = h_pair, src = dy. One program owns one (expert, d-block) and walks
    that expert's k segments in order: deterministic, no atomics; an expert with no token writes zeros.
    """
    e = tl.program_id(0)
    pid_d = tl.program_id(1)
    js = tl.arange(0, RP)
    j_ok = js < rank
    ds = pid_d * BD + tl.arange(0, BD)  # [BD]
    d_ok = ds < D
    acc = tl.zeros([RP, BD], dtype=tl.float32)
    for slot in tl.static_range(K):
        row0 = tl.load(seg_start_ptr + slot * num_experts + e)
        row1 = tl.load(seg_end_ptr + slot * num_experts + e)
        for t0 in range(row0, row1, BT):
            rows = t0 + tl.arange(0, BT)  # [BT] sorted positions
            ok = rows < row1
            tok = tl.load(order_ptr + rows, mask=ok, other=0) // K
            lt = tl.load(l_ptr + rows[None, :] * rank + js[:, None], mask=j_ok[:, None] & ok[None, :], other=0.0)
            st = tl.load(
                src_ptr + tok[:, None] * s_st + ds[None, :] * s_sd, mask=ok[:, None] & d_ok[None, :], other=0.0
            )
            acc += _dot(lt, st, DOT)  # [RP, BT] @ [BT, BD] -> [RP, BD]
    tl.store(out_ptr + e * rank * D + js[:, None] * D + ds[None, :], acc, mask=j_ok[:, None] & d_ok[None, :])
