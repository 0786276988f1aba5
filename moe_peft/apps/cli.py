"""The `moe-peft` command."""

from __future__ import annotations

import argparse
import sys

REAL_BASE_NAMES = ("smollm2-135m",)  # moe_peft.bases.real.REAL_BASES, without importing torch for --help


def split_method_names(text: str, known) -> list[str]:
    """`--methods` is comma-separated, and some rows have a comma in their name ("MoLE top-1 block, equal active"):
    at each place take the longest run of comma-separated parts that is a row name; a part that starts no row name is
    kept as given, for the suite to refuse with its list of rows."""
    parts = [p.strip() for p in text.split(",")]
    out, i = [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i, -1) if ", ".join(parts[i:j]) in known), i + 1)
        out.append(", ".join(parts[i:j]))
        i = j
    return [name for name in out if name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-peft", description="Mixture-of-LoRA-experts fine-tuning on PEFT.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train MoLE on a built-in tiny model and bundled data, save, reload, generate")
    demo.add_argument(
        "--base", default="tiny", choices=["tiny", *REAL_BASE_NAMES],
        help="tiny: the built-in tiny Llama (default); smollm2-135m: a real chat model, instruction tasks through its "
        "chat template, facts it knew before and after (docs/real-base.md)",
    )  # fmt: skip
    demo.add_argument("--out", default=None, help="where the adapter is saved (default out/demo, out/demo_<base>)")
    demo.add_argument("--steps", type=int, default=None, help="default 2000 (tiny), 40 (smollm2-135m)")
    demo.add_argument("--batch-size", type=int, default=None, help="default 32 (tiny), 8 (smollm2-135m)")
    demo.add_argument("--lr", type=float, default=None, help="default 3e-3 (tiny), 2e-3 (smollm2-135m)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads", type=int, default=None, help="torch threads (default 1: the fastest for the tiny model and "
        "reproducible; for a real base on a shared machine a second thread can make a step 10x slower)",
    )  # fmt: skip
    bench = sub.add_parser("bench", help="benchmarks that print ratios against baselines run in the same process")
    bench.add_argument(
        "what",
        choices=["ops", "experts", "multi", "quality"],
        help="ops: the routed-LoRA op vs PEFT LoRA, loops and einsums; experts: LoRA on an MoE block's fused "
        "experts vs PEFT's target_parameters (time and peak memory); multi: many adapters in one batch vs PEFT's "
        "mixed batch and per-adapter sub-batches; quality: do the mixtures beat LoRA at the same trainable-parameter "
        "budget on conflicting tasks (docs/quality.md)",
    )
    bench.add_argument("--grid", choices=["default", "full"], default="default", help="ops only")
    bench.add_argument("--adapters", type=int, nargs="+", default=None, help="multi only: adapter counts (2 8 32)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--reps", type=int, default=None)
    bench.add_argument("--out", default="out/quality", help="quality only: results.jsonl, summary.csv/.md, quality.png")
    bench.add_argument("--quick", action="store_true", help="quality only: one seed, one lr, fewer steps (minutes)")
    bench.add_argument("--methods", default=None, help="quality only: comma-separated method names (default: all)")
    bench.add_argument("--cache", default=None, help="quality only: where the pre-trained base is cached")
    bench.add_argument("--fresh", action="store_true", help="quality only: rerun instead of reusing results.jsonl")
    bench.add_argument(
        "--suite", default="tiny", choices=["tiny", *REAL_BASE_NAMES],
        help="quality only: tiny (the tiny pre-trained Llama, default) or smollm2-135m (a real chat model; "
        "--device, --dtype, --workers apply)",
    )  # fmt: skip
    bench.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"],
        help="quality --suite smollm2-135m: bfloat16 autocast (default) or float32",
    )  # fmt: skip
    bench.add_argument(
        "--workers", type=int, default=None,
        help="quality --suite smollm2-135m: runs at a time, each in its own process (default 1; 2 on 2 cores)",
    )  # fmt: skip
    train = sub.add_parser(
        "train", help="train an adapter from a YAML config with MoESFTTrainer (TRL), save it and its plots"
    )
    train.add_argument("config", help="a training YAML (configs/*.yaml)")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a value: block.key=value (training.max_steps=20, model=/path, data.train=my.jsonl) or key=value",
    )  # fmt: skip
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's, 1)")
    train.add_argument(
        "--overwrite", action="store_true",
        help="train into an output_dir that holds a previous run, removing its adapter, stats and checkpoints first "
        "(training.overwrite_output_dir: true); to continue that run instead: --set training.resume_from_checkpoint=true",
    )  # fmt: skip
    stats = sub.add_parser("stats", help="routing statistics and plots of a trained adapter on a data file")
    stats.add_argument("adapter", help="the adapter directory (moe-peft train writes <output_dir>/adapter)")
    stats.add_argument("--data", required=True, help="a .json/.jsonl/.csv file, a datasets name/path, or 'bundled'")
    stats.add_argument("--out", required=True, help="where stats.json and the PNG plots go")
    stats.add_argument("--by", default="task", choices=["task", "sample_type", "none"])
    stats.add_argument("--samples", type=int, default=256, help="rows measured (the first N)")
    stats.add_argument("--batch-size", type=int, default=32)
    stats.add_argument("--base", default=None, help="the base model (default: the one the adapter records)")
    stats.add_argument("--threads", type=int, default=1)
    from ..export.cli import add_parser as add_merge_parser

    add_merge_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "merge":
        from ..export.cli import run as run_merge

        return run_merge(args)
    if args.command == "demo":
        given = {k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "lr", "threads") and v is not None}
        if args.base == "tiny":
            from .demo import run_demo

            run_demo(out_dir=args.out or "out/demo", seed=args.seed, **given)
        else:
            from .demo_real import run_real_demo

            run_real_demo(base=args.base, out_dir=args.out or f"out/demo_{args.base}", seed=args.seed, **given)
    elif args.command == "bench":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.what == "quality" and args.suite != "tiny":
            from ..bench.quality_real import REAL_METHODS, bench_quality_real

            bench_quality_real(
                out_dir=args.out if args.out != "out/quality" else f"out/quality_{args.suite}", quick=args.quick,
                methods=split_method_names(args.methods, REAL_METHODS) if args.methods else None, cache_dir=args.cache,
                fresh=args.fresh, threads=args.threads or 1, workers=args.workers or 1,
                device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=args.dtype,
            )  # fmt: skip
        elif args.what == "quality":
            from ..bench.quality import bench_quality
            from ..bench.quality_methods import method_table

            if args.dtype is not None or args.workers is not None:
                parser.error("--dtype and --workers apply to --suite smollm2-135m only (the tiny suite runs on CPU).")
            methods = split_method_names(args.methods, method_table(1, 1, 1)) if args.methods else None
            bench_quality(
                out_dir=args.out, quick=args.quick, methods=methods, cache_dir=args.cache, fresh=args.fresh,
                threads=args.threads or 1,
            )  # fmt: skip
        elif args.what == "experts":
            from ..bench import bench_experts

            bench_experts(device=args.device, reps=args.reps)
        elif args.what == "ops":
            from ..bench import bench_ops

            bench_ops(grid=args.grid, device=args.device, reps=args.reps)
        else:
            from ..bench import bench_multi

            bench_multi(device=args.device, reps=args.reps, adapters=args.adapters)
    elif args.command in ("train", "stats"):
        from ..data.user import DataError
        from ..train.config import ConfigError

        _quiet_library_warnings()
        try:
            _train_or_stats(args)
        except (ConfigError, DataError, FileNotFoundError) as error:  # the user's YAML or data: no traceback
            print(f"moe-peft {args.command}: {error}", file=sys.stderr)
            return 2
    return 0


# Notices of the libraries that a YAML user can do nothing about (docs/reliability.md, "Warnings you may see"),
# filtered by their message only: any other warning, a deprecated key of the user's YAML included, still shows.
UPSTREAM_NOTICES = (
    # PEFT's PeftModel reads the property transformers 5 renamed (is_activation_checkpointing); same value
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # TRL's SFTConfig sets the TrainingArguments field transformers renamed (activation_checkpointing) by default,
    # and the shipped configs write the old name, which every supported transformers reads
    (FutureWarning, r"`gradient_checkpointing(_kwargs)?` is deprecated"),
    (UserWarning, r".*pin_memory.*no accelerator"),  # torch's DataLoader on a CPU-only machine
)


def _quiet_library_warnings() -> None:
    import warnings

    for category, message in UPSTREAM_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


def _train_or_stats(args) -> None:
    if args.command == "train":
        from ..train.config import load_config
        from ..train.run import train_from_config

        config = load_config(args.config, args.overrides)
        if args.threads is not None:
            config.threads = args.threads
        if args.overwrite:
            config.overwrite_output_dir = True
        run = train_from_config(config)
        print(f"\ntrained {config.method} in {run.seconds:.1f} s; wrote:")
        paths = run.paths
    else:
        from ..train.run import stats_from_adapter

        paths = stats_from_adapter(
            args.adapter, args.data, args.out, by=None if args.by == "none" else args.by, samples=args.samples,
            batch_size=args.batch_size, base=args.base, threads=args.threads,
        )  # fmt: skip
    for what, path in paths.items():
        print(f"  {what:<18} {path}")


if __name__ == "__main__":
    sys.exit(main())
