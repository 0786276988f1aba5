"""Numerical probes of the routing fixes of issue 9 (the numbers quoted in its note and in docs/methods.md).

    python benchmarks/routing_probes.py      # one torch thread, ~20 s on a 2-core CPU

1. Router loss x gradient accumulation: the router-loss part of the router gradient (coefficient 0.5 minus
   coefficient 0) for the same four samples as batch 2 x accumulation 2 and 1 x 4, over batch 4 x 1, under
   transformers.Trainer with and without num_items_in_batch. 1.000 is right (it was 2.0 at GA 2).
2. A trainer that computes its own loss and runs an extra no_grad forward (TRL 1.16's pattern), adding
   router_loss(model) * accumulation_weight: max |router grad(coef 10) - router grad(coef 0)| (it was 0).
3. SMoRA: the selection bias of an under-loaded rank after 2000 updates at rate 1e-5 in a bf16 and an fp16
   model (0.02 is right; it was 0.0039 in bf16), and after 5 optimizer steps with a frozen router (was 0).
4. Top-p 0.5 with top_k unset: experts per token on a fresh (nearly flat) router (it was exactly 1).
5. Dense eval routing with null experts: the real experts' weights summed per token (min, max).
6. LoRAMoE's localized balancing, optimized directly: a type-1 sample's importances for each form.
7. Null experts with top_k=1: max |router grad| from the task loss alone (it was ~1e-9, rounding).
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.routing import TopKRouter
from moe_peft.routing.losses import localized_balance

MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny():
    return tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


def mole(coef: float):
    config = moe_peft.MoLEConfig(
        r=4, num_experts=4, top_k=2, target_modules=MLP, init_lora_weights=False,
        router_aux_loss_coef=coef, router_z_loss_coef=coef,
    )  # fmt: skip
    return get_peft_model(tiny(), config)


def samples(n: int = 4) -> list[dict]:
    ids = torch.randint(4, 64, (7,), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()} for _ in range(n)]


class RouterGrads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "router" in n])


class OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        ce = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
        )
        loss = ce / (num_items_in_batch if num_items_in_batch is not None else labels[:, 1:].numel())
        with torch.no_grad():
            model(**inputs)  # the extra metrics forward
        return loss + moe_peft.router_loss(model) * moe_peft.accumulation_weight(self, num_items_in_batch)


def router_grads(model, batch: int, steps: int, accepts: bool, cls=Trainer) -> torch.Tensor:
    probe = RouterGrads()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
            learning_rate=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
            remove_unused_columns=False, disable_tqdm=True,
        )  # fmt: skip
        trainer = cls(model=model, args=args, train_dataset=samples(), callbacks=[probe])
        trainer.model_accepts_loss_kwargs = accepts
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return probe.grads


def probe_accumulation() -> None:
    print("1. router-loss part of the router gradient, relative to batch 4 x GA 1")
    with_loss, without = mole(0.5), mole(0.0)
    for accepts in (True, False):
        parts = {}
        for batch, steps in [(4, 1), (2, 2), (1, 4)]:
            g = router_grads(copy.deepcopy(with_loss), batch, steps, accepts)
            g0 = router_grads(copy.deepcopy(without), batch, steps, accepts)
            parts[steps] = (g - g0).norm()
        path = "with num_items_in_batch   " if accepts else "without num_items_in_batch"
        print(f"   Trainer {path}: GA 2 {parts[2] / parts[1]:.4f}   GA 4 {parts[4] / parts[1]:.4f}")
    g10 = router_grads(mole(10.0), 2, 2, True, OwnLoss)
    g0 = router_grads(mole(0.0), 2, 2, True, OwnLoss)
    print(
        f"2. own-loss trainer + extra no_grad forward: max |grad(coef 10) - grad(coef 0)| = {(g10 - g0).abs().max():.4f}"
    )


def probe_smora() -> None:
    counts = torch.tensor([0.0, 5, 5, 5, 5, 5, 5, 5])
    line = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = tiny().to(dtype)
        model = get_peft_model(base, moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP))
        router = next(r for _, layer in model.base_model._moe_layers() for r in layer.routers.values())
        for _ in range(2000):
            router.update_bias(counts, 1e-5)
        line.append(
            f"{str(dtype).split('.')[-1]} {float(router.selection_bias[0]):.5f} ({router.selection_bias.dtype})"
        )
    print("3. SMoRA bias after 2000 updates of 1e-5: " + ", ".join(line))
    model = get_peft_model(tiny(), moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, init_lora_weights=False))
    routers = [r for _, layer in model.base_model._moe_layers() for r in layer.routers.values()]
    for r in routers:
        r.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    batch = samples(2)
    inputs = {k: torch.stack([s[k] for s in batch]) for k in batch[0]}
    model.train()
    for _ in range(5):
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = sum(float(r.selection_bias.abs().max()) for r in routers) / len(routers)
    print(f"   frozen router, 5 optimizer steps: mean max|bias| = {moved:.2e} (rate 1e-5: 5 steps -> <= 5e-05)")


def probe_routing() -> None:
    batch = samples(3)
    inputs = {k: torch.stack([s[k] for s in batch]) for k in ("input_ids", "attention_mask")}
    config = moe_peft.MoLEConfig(r=4, num_experts=4, top_p=0.5, target_modules=MLP)
    model = get_peft_model(tiny(), config).train()
    model(**inputs)
    per_token = [s["experts_per_token"] for s in moe_peft.routing_stats(model).values()]
    print(
        f"4. top_p=0.5, top_k unset (-> {config.top_k}): experts_per_token per layer {[round(e, 2) for e in per_token]}"
    )
    router = TopKRouter(32, num_experts=4, top_k=2, num_null_experts=4, eval_routing="dense").eval()
    out = router(torch.randn(256, 32))
    sums = out.weights.sum(-1)
    raw = out.probs[:, :4].sum(-1)
    print(
        f"5. dense eval with 4 null experts: real weights per token sum to {sums.min():.4f}..{sums.max():.4f} "
        f"(the raw softmax share: {raw.min():.3f}..{raw.max():.3f})"
    )
    types, mask = torch.tensor([1, 0]), torch.ones(2, 5, dtype=torch.bool)
    for form in ("intended", "released"):
        torch.manual_seed(0)
        logits = torch.zeros(2, 5, 4).normal_(std=0.1).requires_grad_()
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(600):
            opt.zero_grad()
            localized_balance(logits.softmax(-1), mask, types, 0.1, form).backward()
            opt.step()
        q = logits.softmax(-1).sum(1)[0].tolist()
        print(f"6. LoRAMoE LBC form={form!r}: type-1 sample importances {[round(v, 3) for v in q]}")
    config = moe_peft.MoLEConfig(r=4, num_experts=4, top_k=1, num_null_experts=2, target_modules=MLP,
                                 router_aux_loss_coef=0.0, init_lora_weights=False)  # fmt: skip
    model = get_peft_model(tiny(), config).train()
    model(**{k: torch.stack([s[k] for s in batch]) for k in batch[0]}).loss.backward()
    grad = max(float(p.grad.abs().max()) for n, p in model.named_parameters() if "router" in n and "null" not in n)
    print(f"7. null experts, top_k=1: max |router grad| from the task loss = {grad:.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    probe_accumulation()
    probe_smora()
    probe_routing()
