"""Routing over training on the quality suite (issue 23, items 3-4): why do MoLE top-1's seeds disagree?

    python benchmarks/routing_dynamics.py --seeds 0,1,2                       # "MoLE top-1 block, learned router"
    python benchmarks/routing_dynamics.py --seeds 0,1,2 --variant seq          # routing_level="sequence"
    python benchmarks/routing_dynamics.py --variant router_lr10                # routers at 10x the lr
    python benchmarks/routing_dynamics.py --list

Trains one variant exactly as `moe-peft bench quality` trains the row (its cached base, its batches in the seed's
order, its optimizer and schedule, lr 3e-3, expert rank 5 = the suite's fitted rank, torch seed = the seed), and every
`--every` steps runs a fixed probe batch (16 held-out prompts+answers per fine-tuning task, eval mode, no gradient)
through the model, hooking every router: per layer, the pick share of each expert over real tokens, dead experts
(share < 1%), the share of tokens still routed to their step-0 expert, the mean normalized routing entropy (entropy
of p / log E), the router logits' std and max |.|, and a task x expert matrix (each task's share of tokens per
expert). At the end: exact match per task on the suite's 64
test prompts per task. Writes out/routing_dynamics/<variant>-s<seed>.json and prints a compact trace.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from peft import LoraConfig

from moe_peft import MoLEConfig, SMoRAConfig
from moe_peft.bench.quality import (
    Suite,
    _model_inputs,
    eval_split,
    evaluate,
    load_base,
    make_batches,
    make_optimizer,
    pretrained_base,
    summarize,
    training_mixture,
)
from moe_peft.bench.quality_methods import TARGETS, Method
from moe_peft.data.bundled import CharTokenizer

E = 6
COMMON = dict(target_modules=TARGETS, task_type="CAUSAL_LM")


def _mole(rank=5, **kw):
    # routers at the experts' lr unless a variant says otherwise: the traces below were recorded so, before issue 23
    # made frozen routers MoLE top-1's default (router_lr_ratio=0); kept explicit so that a rerun traces the same thing
    kw.setdefault("router_lr_ratio", 1.0)
    return Method("x", "moe", lambda r: MoLEConfig(r=rank, lora_alpha=2 * rank, num_experts=E, top_k=1, **COMMON, **kw))


VARIANTS = {
    "top1": lambda: _mole(),  # the suite's "MoLE top-1 block, learned router" (rank 5 fitted to the budget)
    "seq": lambda: _mole(routing_level="sequence"),
    "prob": lambda: _mole(top1_weight="prob"),
    "bal0": lambda: _mole(router_aux_loss_coef=0.0),
    "bal10x": lambda: _mole(router_aux_loss_coef=0.1),
    "router_lr10": lambda: _mole(router_lr_ratio=10.0),
    "router_lr0": lambda: _mole(router_lr_ratio=0.0),  # routers frozen at init
    "router_lr0.1": lambda: _mole(router_lr_ratio=0.1),
    # the routers' initialisation (router_init_std, default 0.02), learned routers
    "init_x10": lambda: _mole(router_init_std=0.2),
    "init_x0.1": lambda: _mole(router_init_std=0.002),
    "init_zero": lambda: _mole(router_init_std=0.0),
    # LoRA at one expert's rank: MoLE top-1's active parameters per token (equal active, not equal trainable)
    "lora_r5": lambda: Method("x", "lora", lambda r: LoraConfig(r=5, lora_alpha=10, **COMMON)),
}
# SMoRA at the suite's fitted r=21 (its row: k=3, lr 1e-3); k and the bias update rate u vary
for _k in (1, 3, 7):
    for _u in (1e-5, 1e-3, 0.0):
        VARIANTS[f"smora_k{_k}_u{_u:g}"] = lambda k=_k, u=_u: Method(
            "x", "moe", lambda r: SMoRAConfig(r=21, lora_alpha=42, top_k=k, bias_update_rate=u, **COMMON)
        )
# k=1 at k=3's scale: SMoRA scales by lora_alpha / top_k, so alpha = 2r = 42 gives 42 at k=1 and 14 at k=3
VARIANTS["smora_k1_alpha14"] = lambda: Method("x", "moe", lambda r: SMoRAConfig(r=21, lora_alpha=14, top_k=1, **COMMON))
LR = {name: 1e-3 for name in VARIANTS if name.startswith("smora")}  # the suite's chosen rate per row; else 3e-3


def probe_batch(suite, tokenizer):
    split = eval_split(suite, "val")
    rows = [s for t in suite.tasks for s in split[t][:16]]
    batch = make_batches(dataclass_replace(suite, batch_size=len(rows)), rows_with_type(rows), tokenizer)[0]
    return batch


def dataclass_replace(suite, **kw):
    import dataclasses

    return dataclasses.replace(suite, **kw)


def rows_with_type(rows):
    return [{**r, "sample_type": 0} for r in rows]


class Recorder:
    """Forward hooks on every router: keeps the latest Routing per layer label."""

    def __init__(self, model):
        from moe_peft.tuners.routed.layer import MoELoraLinear

        self.out, self.handles = {}, []
        self.first_choice = {}  # label -> [N] each probe token's first pick at the first measurement (step 0)
        seen = set()
        for name, m in model.named_modules():
            if isinstance(m, MoELoraLinear):
                for adapter, router in m.routers.items():
                    if id(router) in seen:
                        continue
                    seen.add(id(router))
                    label = name.replace("base_model.model.model.", "").replace(".self_attn", ".attn")
                    cfg = m.configs[adapter]
                    if cfg.router_granularity == "block":
                        label = label.rpartition(".")[0]
                    self.handles.append(router.register_forward_hook(self._hook(label)))

    def _hook(self, label):
        def hook(module, inputs, routing):
            self.out[label] = routing

        return hook


@torch.no_grad()
def measure(model, rec, batch, n_tasks):
    rec.out.clear()
    was = model.training
    model.eval()
    model(**_model_inputs(batch, None))
    model.train(was)
    mask = batch["attention_mask"].bool()  # [B, S]
    B, S = mask.shape
    task_tok = batch["task_ids"][:, None].expand(B, S)  # [B, S]
    res = {}
    for label, r in rec.out.items():
        idx, probs, logits = r.idx, r.probs, r.logits
        if idx.shape[0] == B * S:  # token level
            m, t = mask.reshape(-1), task_tok.reshape(-1)
        elif idx.shape[0] == B:  # sequence level
            m, t = torch.ones(B, dtype=torch.bool), batch["task_ids"]
        else:
            continue
        idx, probs, logits, t = idx[m], probs[m].float(), logits[m].float(), t[m]
        C = probs.shape[-1]
        top = idx  # [N, k]: every slot counts (pick share)
        # how much of the step-0 partition survives: the share of probe tokens whose first pick is still the one
        # they got at step 0 (1 for a frozen router; ~1/E for a partition unrelated to the initial one)
        start = rec.first_choice.setdefault(label, top[:, 0].clone())  # [N]
        same_as_start = (top[:, 0] == start).float().mean().item()
        load = torch.bincount(top[top >= 0], minlength=C).float() / max(1, int((top >= 0).sum()))
        p = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item() / math.log(C)
        mat = torch.zeros(n_tasks, C)
        for k in range(n_tasks):
            sel = top[t == k]
            sel = sel[sel >= 0]
            if len(sel):
                mat[k] = torch.bincount(sel, minlength=C).float() / len(sel)
        res[label] = {
            "load": [round(x, 3) for x in load.tolist()],
            "dead": int((load < 0.01).sum()),
            "same_as_start": round(same_as_start, 3),
            "entropy": round(ent, 3),
            "logit_std": round(logits.std(-1).mean().item(), 3),
            "logit_absmax": round(logits.abs().max().item(), 3),
            "p_top_mean": round(probs.max(-1).values.mean().item(), 3),
            "task_expert": [[round(x, 2) for x in row] for row in mat.tolist()],
        }
    return res


def run(variant, seed, every, out_dir, threads=1):
    torch.set_num_threads(threads)
    suite = Suite()
    tok = CharTokenizer()
    base_dir = pretrained_base(suite, os.path.expanduser("~/.cache/moe_peft/bench_quality"), tok)
    splits = {"test": eval_split(suite, "test")}
    exclude = {s["prompt"] for sp in (splits["test"], eval_split(suite, "val")) for v in sp.values() for s in v}
    method = VARIANTS[variant]()
    samples = training_mixture(suite, seed, exclude)
    torch.manual_seed(seed)
    from peft import get_peft_model

    model = get_peft_model(load_base(base_dir), method.config(5))
    batches = make_batches(suite, samples, tok)
    pb = probe_batch(suite, tok)
    rec = Recorder(model)
    lr = LR.get(variant, 3e-3)
    opt, sched = make_optimizer(model, lr, len(batches))
    model.train()
    trace, losses, t0 = [], [], time.perf_counter()
    for step, batch in enumerate(batches):
        if step % every == 0:
            trace.append({"step": step, "loss": statistics.mean(losses[-every:]) if losses else None,
                          "layers": measure(model, rec, pb, len(suite.tasks))})  # fmt: skip
        loss = model(**_model_inputs(batch, method)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    trace.append({"step": len(batches), "loss": statistics.mean(losses[-every:]),
                  "layers": measure(model, rec, pb, len(suite.tasks))})  # fmt: skip
    model.eval()
    scores = evaluate(model, tok, splits["test"], suite, method)
    result = {"variant": variant, "seed": seed, "test": scores, "summary": summarize(scores, suite), "trace": trace,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{variant}-s{seed}.json"), "w") as f:
        json.dump(result, f)
    return result


def show(result, tasks):
    print(f"== {result['variant']} seed {result['seed']}: tasks {result['summary']['tasks_mean']:.2f} "
          f"knowledge {result['summary']['knowledge_mean']:.2f} "
          + " ".join(f"{t}={result['test'][t]:.2f}" for t in tasks) + f"  ({result['seconds']:.0f}s)")  # fmt: skip
    for snap in result["trace"]:
        parts = []
        for label, s in snap["layers"].items():
            kept = f" kept {s['same_as_start']:.2f}" if "same_as_start" in s else ""  # traces recorded before it
            parts.append(f"{label}: dead {s['dead']}{kept} H {s['entropy']:.2f} std {s['logit_std']:.2f} "
                         f"max {s['logit_absmax']:.1f} load {'/'.join(f'{x:.2f}' for x in s['load'])}")  # fmt: skip
        print(f"  step {snap['step']:4d} loss {snap['loss'] if snap['loss'] is None else round(snap['loss'], 3)}")
        for p in parts:
            print("     ", p)
    final = result["trace"][-1]["layers"]
    for label, s in final.items():
        argmax = [max(range(len(row)), key=row.__getitem__) for row in s["task_expert"]]
        purity = [max(row) for row in s["task_expert"]]
        print(
            f"  final {label}: task->expert " + " ".join(f"{t}:{a}({p:.2f})" for t, a, p in zip(tasks, argmax, purity))
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="top1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", default="out/routing_dynamics")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        print("\n".join(VARIANTS))
        return
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    for seed in [int(s) for s in a.seeds.split(",")]:
        path = os.path.join(a.out, f"{a.variant}-s{seed}.json")
        if os.path.exists(path):
            result = json.load(open(path))
        else:
            result = run(a.variant, seed, a.every, a.out)
        show(result, Suite().tasks)


if __name__ == "__main__":
    main()
