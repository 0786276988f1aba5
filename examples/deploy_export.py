"""Deploy a MoLE adapter every way moe_peft.export offers, and measure what each way costs.

    python examples/deploy_export.py                  # the README "Deploy" table (native_moe rows); minutes on 2 cores
    python examples/deploy_export.py --quick          # a smoke run (seconds, meaningless numbers)
    python examples/deploy_export.py --router-bias    # a router bias that trains: native_moe refuses, says why

Scenario (one): the demo's tiny Llama and bundled tasks (moe-peft demo), adapted the way a native sparse-MoE
export needs: MoLE on the MLP blocks only (gate/up/down routed together, top-1, router_bias=False) plus a plain LoRA
on attention (a one-expert mixture, trained at the same time as a second active adapter). The demo's own adapter
routes attention, so `native_moe` refuses it, naming that. (Its router biases stay at their zero init: top-1 routers
are frozen by default; a bias that trained, --router-bias here, is refused too.) Then:

  * native_moe: a stock Mixtral checkpoint (router = the MoLE router, expert e = base MLP + expert e's deltas, the
    attention LoRA merged), loaded by a separate Python that never imports moe_peft, compared with the routed model;
  * average, routing_weighted, svd: one plain PEFT LoRA each, with the error moe_peft.export measures on held-out
    bundled prompts (mean KL, perplexity change, exact match).

Printed: one row per export with its size against the base and its measured error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import torch
from peft import get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama, train_on_tasks
from moe_peft.data import CharTokenizer

FRESH = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    probe = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        tokens = model.generate(**probe, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert "moe_peft" not in sys.modules
    torch.save({"logits": logits, "tokens": tokens, "class": type(model).__name__}, sys.argv[3])
    """
)


def fresh_check(path: str, out_dir: str, tokenizer) -> dict:
    """Load the native export in a Python without moe_peft; return its logits and greedy tokens on probe prompts."""
    prompts = ["rev abcd=", "srt dbca=", "sft abcz=", "cpy hij="]
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding, for generation
        ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1
    probe = {"input_ids": ids, "attention_mask": mask}
    script, data, result = (os.path.join(out_dir, n) for n in ("fresh.py", "probe.pt", "fresh.pt"))
    with open(script, "w") as f:
        f.write(FRESH)
    torch.save(probe, data)
    subprocess.run([sys.executable, script, path, data, result], check=True, capture_output=True, text=True)
    return {**torch.load(result), "probe": probe}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/deploy")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--calibration-rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the fastest for tiny matrices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 32 calibration rows")
    parser.add_argument(
        "--router-bias",
        action="store_true",
        help="router_bias=True with routers that train (router_lr_ratio=1): native_moe refuses the trained bias",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.calibration_rows = 20, 32
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = CharTokenizer()
    base = tiny_llama(vocab_size=tokenizer.vocab_size, seed=args.seed)
    config = moe_peft.MoLEConfig(
        r=8,
        lora_alpha=16,
        num_experts=4,
        top_k=1,
        target_modules=["gate_proj", "up_proj", "down_proj"],  # the MLP blocks only: one router per block
        router_bias=args.router_bias,  # False: a stock sparse-MoE router has no bias
        # top-1 routers are frozen by default (a bias then stays 0 and exports); --router-bias trains them
        router_lr_ratio=1.0 if args.router_bias else None,
        router_aux_loss_coef=0.01,
        modules_to_save=["embed_tokens", "lm_head"],  # the character vocabulary is new to the base (as in the demo)
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    attention = moe_peft.MoLEConfig(
        r=8, lora_alpha=16, num_experts=1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    model.add_adapter("attention", attention)  # one expert: a plain LoRA, merged exactly by every strategy
    model.base_model.set_adapter(["default", "attention"])  # both active and trainable
    losses = train_on_tasks(
        model, tokenizer, args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, shuffle_seed=args.seed
    )
    model.eval()
    print(
        f"trained MoLE on the MLP blocks and a LoRA on attention: loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}"
    )

    rows, refused = {}, None
    runs = [("native_moe", {}), ("average", {}), ("routing_weighted", {}), ("svd", {}), ("svd", {"rank": 32})]
    for strategy, options in runs:
        label = strategy + (f" rank {options['rank']}" if options else "")
        out = os.path.join(args.out, label.replace(" ", "-"))
        try:
            result = moe_peft.export(
                model,
                strategy,
                out,
                tokenizer=tokenizer,
                calibration_rows=args.calibration_rows,
                overwrite=True,
                verbose=False,
                **options,
            )
        except moe_peft.NativeMoEError as error:  # --router-bias: the trained bias has no place in Mixtral
            refused = str(error)
            continue
        rows[label] = result.record
    fresh = {}
    if refused is None:
        fresh = fresh_check(os.path.join(args.out, "native_moe"), args.out, tokenizer)
        with torch.no_grad():
            want = model(**fresh["probe"]).logits
            tokens = model.generate(**fresh["probe"], max_new_tokens=8, do_sample=False, pad_token_id=0)
        fresh["max_diff"] = float((fresh["logits"] - want).abs().max())
        fresh["same_tokens"] = bool(torch.equal(fresh["tokens"], tokens))

    print("\n| export | output | size / base | mean KL | perplexity routed -> export | exact match routed -> export |")
    print("|---|---|---|---|---|---|")
    for label, record in rows.items():
        e = record["measured_error"]
        em = e.get("exact_match", {})
        em_text = f"{em['routed']['mean']:.3f} -> {em['export']['mean']:.3f}" if em else "-"
        print(
            f"| {label} | {record['output']} | {record['size']['ratio_to_base']:.2f}x | {e['kl_mean']:.3g} | "
            f"{e['ppl_routed']:.4f} -> {e['ppl_export']:.4f} | {em_text} |"
        )
    if refused is not None:
        print(f"\n{refused}")
    else:
        print(
            f"\nnative_moe loaded by plain transformers in a fresh process as {fresh['class']}: max |logit difference| "
            f"{fresh['max_diff']:.2g}, same greedy tokens: {fresh['same_tokens']}"
        )
    print(f"records: {args.out}/*/moe_peft_export.json; wall time {time.perf_counter() - start:.0f}s")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({label: r["measured_error"] | {"size": r["size"]} for label, r in rows.items()}, f, indent=2)
    return {
        "rows": rows,
        "refused": refused,
        "fresh_max_diff": fresh.get("max_diff"),
        "fresh_same_tokens": fresh.get("same_tokens"),
        "fresh_class": fresh.get("class"),
    }


if __name__ == "__main__":
    main()
