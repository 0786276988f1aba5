"""Compile every Triton kernel of moe_peft for an H100 (sm90) down to a cubin, with no GPU present.

    python tests/compile_kernels.py        # run WITHOUT TRITON_INTERPRET (tests/test_kernels.py does)

The interpreter runs the kernels' logic on CPU but skips the GPU compiler's checks (tl.dot shapes and
dtypes, layouts, register limits); this makes CI catch what would otherwise fail only on a GPU.
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import moe_peft.ops.triton_kernels as K

target = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types, consts):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        else:
            sig[n] = types(n)
    src = ASTSource(fn=fn, signature=sig, constexprs={n: v for n, v in consts.items()})
    return triton.compile(src, target=target)


def typer(ptr_types):
    def t(n):
        if n in ptr_types:
            return ptr_types[n]
        if n == "scaling":
            return "fp32"
        return "i32"

    return t


def main():
    for DOT, act in ((1, "bf16"), (0, "fp32")):
        P = {"x_ptr": f"*{act}", "a_ptr": "*fp32", "u_ptr": "*fp32"}
        compile_kernel(K._dense_shrink, typer(P), dict(BM=64, BR=256, BK=64, DOT=DOT))
        P = {"l_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": f"*{act}", "idx_ptr": "*i32", "gw_ptr": "*fp32"}
        for gate, acc in ((True, True), (False, False)):
            compile_kernel(K._expand, typer(P), dict(K=2, GATE=gate, ACCUMULATE=acc, BM=64, BN=64, BR=64, DOT=DOT))
        P = {
            "dy_ptr": f"*{act}",
            "b_ptr": "*fp32",
            "u_ptr": "*fp32",
            "idx_ptr": "*i32",
            "gw_ptr": "*fp32",
            "du_ptr": "*fp32",
            "h_ptr": "*fp32",
            "dw_ptr": "*fp32",
        }
        for br in (16, 256):  # the smallest tile and DENSE_MAX_R (the whole E*r in registers)
            compile_kernel(K._dense_dy, typer(P), dict(K=2, BM=32, BN=64, BR=br, DOT=DOT))
        P = {"l_ptr": "*fp32", "m_ptr": f"*{act}", "part_ptr": "*fp32"}
        compile_kernel(K._wgrad, typer(P), dict(BR=64, BD=64, BT=32, DOT=DOT))
        P = {
            "src_ptr": f"*{act}",
            "w_ptr": "*fp32",
            "order_ptr": "*i32",
            "tile_row0_ptr": "*i32",
            "tile_row1_ptr": "*i32",
            "tile_expert_ptr": "*i32",
            "u_ptr": "*fp32",
            "gw_ptr": "*fp32",
            "lhs_out_ptr": "*fp32",
            "h_out_ptr": "*fp32",
            "dw_ptr": "*fp32",
        }
        for dyp in (False, True):
            compile_kernel(K._pairs_rowdot, typer(P), dict(K=2, DY_PASS=dyp, BM=64, BK=64, RP=64, DOT=DOT))
        P = {
            "l_ptr": "*fp32",
            "w_ptr": "*fp32",
            "out_ptr": f"*{act}",
            "order_ptr": "*i32",
            "tile_row0_ptr": "*i32",
            "tile_row1_ptr": "*i32",
            "tile_expert_ptr": "*i32",
            "slot_tiles_ptr": "*i32",
            "gw_ptr": "*fp32",
        }
        for gate in (True, False):
            compile_kernel(K._pairs_expand, typer(P), dict(K=2, GATE=gate, BM=64, BN=64, RP=16, DOT=DOT))
        P = {
            "l_ptr": "*fp32",
            "src_ptr": f"*{act}",
            "order_ptr": "*i32",
            "seg_start_ptr": "*i32",
            "seg_end_ptr": "*i32",
            "out_ptr": "*fp32",
        }
        compile_kernel(K._pairs_wgrad, typer(P), dict(K=2, BT=32, BD=64, RP=16, DOT=DOT))
        print("compiled all kernels for sm90, DOT", DOT)


if __name__ == "__main__":
    main()
