"""The `moe-peft` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-peft", description="Mixture-of-LoRA-experts fine-tuning on PEFT.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train MoLE on a built-in tiny model and bundled data, save, reload, generate")
    demo.add_argument("--out", default="out/demo", help="where the base model and adapter are saved")
    demo.add_argument("--steps", type=int, default=2000)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the fastest for a tiny model, reproducible)"
    )
    bench = sub.add_parser("bench", help="benchmarks that print ratios against baselines run in the same process")
    bench.add_argument("what", choices=["ops"], help="ops: the routed-LoRA op vs PEFT LoRA, loops and einsums")
    bench.add_argument("--grid", choices=["default", "full"], default="default")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            threads=args.threads,
        )  # fmt: skip
    elif args.command == "bench":
        from .bench import bench_ops

        bench_ops(grid=args.grid, device=args.device, reps=args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
