"""Data-parallel training of every method on CPU, for tests/test_distributed.py (not a test module itself).

    torchrun --nproc_per_node 2 tests/distributed_worker.py --out DIR [--engines ddp fsdp2] [--methods ...]

ddp: accelerate's `Accelerator(cpu=True)` (DDP over gloo); fsdp2: torch's `fully_shard` over gloo (accelerate runs
FSDP on GPUs only); zero3: DeepSpeed ZeRO-3 through `deepspeed.initialize` on DeepSpeed's CPU accelerator (needs
DS_ACCELERATOR=cpu and a C++ compiler for its shared-memory op). Each rank trains each method for STEPS optimizer steps on its half of a fixed global batch, then
writes DIR/<engine>/<method>/rank<r>/: the adapter as `save_pretrained` writes it, and `record.pt` (the losses, every rank's expert
counts per routed layer at the first step, the SMoRA selection biases). `reference(method)` trains the same model
in one process on the whole global batch, the two halves as two accumulated micro-batches, which is what data
parallelism computes: DDP averages the ranks' gradients, i.e. the gradient of the mean of the two halves' losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

STEPS = 3
WORLD = 2
ROWS, SEQ, VOCAB = 2, 6, 64  # per rank: 2 x 6 tokens, 12 per step for 8 experts (some get none on a rank)
MLP = ["gate_proj", "up_proj", "down_proj"]


def make_config(method: str):
    import moe_peft

    if method == "mole_top1":  # experts 6 and 7 unreachable (router bias -30, set in build): no rank ever uses them
        return moe_peft.MoLEConfig(r=4, num_experts=8, top_k=1, target_modules=MLP, router_z_loss_coef=1e-3)
    if method == "mole_null_top2":
        return moe_peft.MoLEConfig(
            r=4, num_experts=4, top_k=2, num_null_experts=2, router_granularity="linear", target_modules=MLP
        )
    if method == "loramoe":
        return moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP)
    if method == "smora":
        return moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, bias_update_rate=1e-2)
    if method == "mhr":
        return moe_peft.MHRConfig(r=4, n_tasks=4, n_skills=2, n_splits=2, target_modules=MLP)
    if method == "experts":  # LoRA on a Mixtral's fused experts (base routing) plus MoLE on attention
        return moe_peft.MoLEConfig(
            r=4,
            num_experts=4,
            target_modules=["q_proj", "v_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
    raise ValueError(method)


METHODS = ["mole_top1", "mole_null_top2", "loramoe", "smora", "mhr", "experts"]


def build(method: str):
    """The same initial model on every rank and in the reference (seeded)."""
    from peft import get_peft_model

    from moe_peft.tiny import tiny_llama, tiny_moe

    if method == "experts":
        base = tiny_moe("mixtral", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=4, seed=0)
    else:
        base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    torch.manual_seed(1)
    model = get_peft_model(base, make_config(method))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].endswith("_B") or "mhr_B" in name:
                p.normal_(std=0.05)  # a non-zero delta from the first step
            if method == "mole_top1" and name.endswith("mole_router.default.linear.bias"):
                p[6:] = -30.0  # unreachable experts
    return model


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(4, VOCAB, (WORLD * ROWS, SEQ), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "sample_types": torch.arange(WORLD * ROWS) % 2,
        "task_ids": torch.arange(WORLD * ROWS) % 4,
    }


def inputs_for(method: str, batch: dict, rank: int) -> dict:
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    keep = ["input_ids", "attention_mask", "labels"]
    keep += ["sample_types"] if method == "loramoe" else ["task_ids"] if method == "mhr" else []
    return {k: batch[k][rows] for k in keep}


def expert_counts(model) -> dict[str, list[int]]:
    import moe_peft

    if not hasattr(model, "base_model") or not isinstance(model.base_model, moe_peft.MoELoraModel):
        return {}
    counts = {}
    for name, layer in model.base_model._moe_layers():
        for adapter, record in layer.router_records.items():
            counts[f"{name}[{adapter}]"] = record.counts.tolist()
    return counts


def selection_biases(model) -> dict[str, torch.Tensor]:
    from moe_peft._state_dict import strip_wrapper_segments  # FSDP1 names carry its wrapper modules

    return {
        strip_wrapper_segments(n): b.detach().clone() for n, b in model.named_buffers() if n.endswith("selection_bias")
    }


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def reference(method: str) -> dict:
    """One process, the global batch as the ranks' halves accumulated (loss / WORLD each), same optimizer."""
    model = build(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        batch = global_batch(step)
        step_losses = []
        for rank in range(WORLD):
            torch.manual_seed(1000 * step + rank)  # the rank's random draws (MHR's relaxed Bernoulli routing)
            out = model(**inputs_for(method, batch, rank))
            (out.loss / WORLD).backward()
            step_losses.append(out.loss.item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_losses)
    return {"losses": losses, "state": adapter_state(model), "biases": selection_biases(model)}


def _ddp(method: str, rank: int):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # torchrun's environment: a gloo process group of WORLD processes
    model = build(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    assert accelerator.num_processes == WORLD and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    return wrapped, optimizer, accelerator.backward, lambda: accelerator.unwrap_model(wrapped), None


def _fsdp2(method: str, rank: int):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = build(method).train()
    for layer in model.base_model.model.model.layers:  # shard per decoder layer, then the rest, as accelerate does
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def full_state():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # gathered on every rank

    return model, optimizer, lambda loss: loss.backward(), lambda: model, full_state


def _fsdp1(method: str, rank: int):
    import functools

    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = build(method).train()
    layer_cls = {type(layer) for layer in model.base_model.model.model.layers}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
    # use_orig_params: frozen base and trainable adapter weights share flat parameters (accelerate's default too)
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)

    def full_state():
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            return {k: v.detach().clone() for k, v in wrapped.state_dict().items()}

    return wrapped, optimizer, lambda loss: loss.backward(), lambda: wrapped.module, full_state


class _EngineStep:
    """DeepSpeed steps (and zeroes the gradients) through its engine."""

    def __init__(self, engine):
        self.engine = engine

    def step(self):
        self.engine.step()

    def zero_grad(self):
        pass


def _zero3(method: str, rank: int):
    import deepspeed
    import deepspeed.ops

    # plain gloo collectives: DeepSpeed's CPU shared-memory op is a C++ build (a minute on a cold machine) that
    # speeds up communication only
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    model = build(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def full_state():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # every rank gets the full weights
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    return engine, _EngineStep(engine), engine.backward, lambda: engine.module, full_state


ENGINES = {"ddp": _ddp, "fsdp1": _fsdp1, "fsdp2": _fsdp2, "zero3": _zero3}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["ddp", "fsdp2"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    import moe_peft  # noqa: F401  (registers the methods)

    rank = int(os.environ["RANK"])
    start = time.perf_counter()
    for engine in args.engines:
        if not dist.is_initialized():
            dist.init_process_group("gloo")  # accelerate would start the same one
        for method in args.methods:
            model, optimizer, backward, unwrap, full_state = ENGINES[engine](method, rank)
            losses, counts = [], None
            for step in range(STEPS):
                torch.manual_seed(1000 * step + rank)
                out = model(**inputs_for(method, global_batch(step), rank))
                backward(out.loss)
                if step == 0:
                    counts = expert_counts(unwrap())
                optimizer.step()  # SMoRA: the step post-hook all-reduces the counts and updates the biases
                optimizer.zero_grad()
                losses.append(out.loss.item())
            out_dir = os.path.join(args.out, engine, method, f"rank{rank}")
            state = full_state() if full_state is not None else None
            unwrap().save_pretrained(out_dir, state_dict=state)  # every rank saves: the files must be identical
            torch.save(
                {"losses": losses, "counts": counts, "biases": selection_biases(unwrap())},
                os.path.join(out_dir, "record.pt"),
            )
            dist.barrier()
            if hasattr(model, "destroy"):
                model.destroy()  # DeepSpeed: remove the engine's hooks before the next method's engine
            if rank == 0:
                print(f"{engine} {method}: done at {time.perf_counter() - start:.1f} s", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
