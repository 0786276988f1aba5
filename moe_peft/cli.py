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
    bench = sub.add_parser("bench", help="benchmarks that compare against baselines run in the same process")
    benches = bench.add_subparsers(dest="what", required=True)
    ops = benches.add_parser("ops", help="the routed-LoRA op vs PEFT LoRA, loops and einsums")
    ops.add_argument("--grid", choices=["default", "full"], default="default")
    ops.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ops.add_argument("--reps", type=int, default=None)
    quality = benches.add_parser(
        "quality", help="do the mixtures beat LoRA at the same trainable-parameter budget? (docs/quality.md)"
    )
    quality.add_argument("--out", default="out/quality", help="results.jsonl, summary.csv/.md, quality.png")
    quality.add_argument("--quick", action="store_true", help="one seed, one lr, fewer steps: minutes")
    quality.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    quality.add_argument("--cache", default=None, help="where the pre-trained base is cached")
    quality.add_argument("--fresh", action="store_true", help="rerun every run instead of reusing results.jsonl")
    quality.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    elif args.command == "bench" and args.what == "ops":
        from .bench import bench_ops

        bench_ops(grid=args.grid, device=args.device, reps=args.reps)
    elif args.command == "bench" and args.what == "quality":
        from .bench.quality import bench_quality

        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        bench_quality(
            out_dir=args.out, quick=args.quick, methods=methods, cache_dir=args.cache, fresh=args.fresh,
            threads=args.threads,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
