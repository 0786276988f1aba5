"""Data-parallel training of every method on CPU, for tests/test_distributed.py (not a test module itself).

    torchrun --nproc_per_node 2 tests/distributed_worker.py --out DIR [--engines ddp fsdp2] [--methods ...]

ddp: accelerate's `Accelerator(cpu=True)` (DDP over gloo); fsdp2: torch's `fully_shard` over gloo (accelerate runs
FSDP on GPUs only); zero2, zero3: DeepSpeed ZeRO-2 / ZeRO-3 through `deepspeed.initialize` on DeepSpeed's CPU
accelerator (needs DS_ACCELERATOR=cpu). Each rank trains each method for STEPS optimizer steps on its half of a fixed global batch, then
writes DIR/<engine>/<method>/rank<r>/: the adapter as `save_pretrained` writes it, and `record.pt` (the losses, every rank's expert
counts per routed layer at the first step, the SMoRA selection biases, RoMA's alignment term per step).
PHATGOOSE is trained twice: a library (top-k routing; banks and gates train) and step 2, one LoRA expert's gates
(`gate_training`, everything else frozen; the gates are saved as `save_gates` writes them). `reference(method)` trains the same model
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
    if method == "phatgoose":  # a library of 4 experts, top-2; banks and gates filled in build
        return moe_peft.PhatgooseConfig(experts=["e0", "e1", "e2", "e3"], r=4, top_k=2, target_modules=MLP)
    if method == "phatgoose_gates":  # PHATGOOSE step 2: the LoRA expert whose gates train
        from peft import LoraConfig

        return LoraConfig(r=4, lora_alpha=8, target_modules=MLP)
    if method == "roma":  # every router of the Mixtral; lambda warms up over the steps (the step reaches the loss)
        return moe_peft.RoMAConfig(num_last_layers=None, num_neighbours=2, lambda_reg=20.0, lambda_warmup_steps=2)
    raise ValueError(method)


METHODS = ["mole_top1", "mole_null_top2", "loramoe", "smora", "mhr", "experts", "phatgoose", "phatgoose_gates", "roma"]
MOE_BASE = ("experts", "roma")  # on a tiny Mixtral


def build(method: str):
    """The same initial model on every rank and in the reference (seeded)."""
    from peft import get_peft_model

    from moe_peft.bases import tiny_llama, tiny_moe

    if method in MOE_BASE:
        base = tiny_moe("mixtral", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=4, seed=0)
    else:
        base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    torch.manual_seed(1)
    model = get_peft_model(base, make_config(method))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].endswith("_B") or "mhr_B" in name or "lora_B" in name:
                p.normal_(std=0.05)  # a non-zero delta from the first step
            if "phatgoose_A" in name or "phatgoose_gate" in name:
                p.normal_(std=0.5)  # assembled experts and their trained gates
            if method == "mole_top1" and name.endswith("mole_router.default.linear.bias"):
                p[6:] = -30.0  # unreachable experts
    if method == "phatgoose_gates":  # held open for the process's life: the engines wrap the model inside the block
        from moe_peft.phatgoose import gate_training

        block = gate_training(model)
        block.__enter__()
        model._gate_block = block
    return model


NEIGHBOURS = 2


def roma_reference():
    """A fixed RoMA reference set over every row of the STEPS global batches (row i of step s is sample
    s * WORLD * ROWS + i): random routing r_j [N, L, E] and each sample's neighbours with kernel weights."""
    from moe_peft.tuners.roma.reference import RoMAReference

    n, layers, experts = STEPS * WORLD * ROWS, 2, 4  # every MoE layer of the tiny Mixtral is tuned
    g = torch.Generator().manual_seed(7)
    weights = torch.rand(n, NEIGHBOURS, generator=g) + 0.1
    return RoMAReference(
        embeddings=torch.zeros(n, 1),
        success=torch.ones(n, dtype=torch.bool),
        routing=torch.randn(n, layers, experts, generator=g).softmax(-1),  # [N, L, E]
        neighbour_index=torch.randint(0, n, (n, NEIGHBOURS), generator=g),  # [N, k]
        neighbour_weight=weights / weights.sum(-1, keepdim=True),  # [N, k], rows sum to 1
    )


def aux_loss(method: str, model, step: int, rank: int):
    """RoMA's alignment term for the rank's rows (None for the others): lambda(step) * mean over the rank's samples
    of sum_j W_ij ||r_i - r_j||^2, added to the task loss. `model` is the unwrapped PeftModel."""
    if method != "roma":
        return None
    from moe_peft.roma import alignment_loss

    index = step * WORLD * ROWS + rank * ROWS + torch.arange(ROWS)  # [ROWS] rows of the reference
    return alignment_loss(model, roma_reference().neighbours(index), step=step)


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
    from moe_peft._internal.state_dict import strip_wrapper_segments  # FSDP1 names carry its wrapper modules

    return {
        strip_wrapper_segments(n): b.detach().clone() for n, b in model.named_buffers() if n.endswith("selection_bias")
    }


def adapter_state(model) -> dict[str, torch.Tensor]:
    """What the run saves: the adapter's state dict, or for phatgoose_gates the gates ({module name: v [in]})."""
    from moe_peft.phatgoose import gates_from_state_dict
    from peft.utils import get_peft_model_state_dict

    if isinstance(model, dict):  # a gathered full state dict of the wrapped model
        return gates_from_state_dict(model)
    if hasattr(model, "_gate_block"):
        return gates_from_state_dict(model.state_dict())
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def save(method: str, model, state, out_dir: str) -> None:
    """Every rank saves: the files must be identical."""
    if method == "phatgoose_gates":
        from moe_peft.phatgoose import save_gates

        from moe_peft._internal.state_dict import strip_wrapper_segments

        state = model.state_dict() if state is None else state
        save_gates(adapter_state({strip_wrapper_segments(k): v for k, v in state.items()}), out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state)


def saved_files(method: str) -> tuple[str, ...]:
    if method == "phatgoose_gates":
        from moe_peft.phatgoose import GATES_FILE

        return (GATES_FILE,)
    return ("adapter_model.safetensors", "adapter_config.json")


def reference(method: str) -> dict:
    """One process, the global batch as the ranks' halves accumulated (loss / WORLD each), same optimizer."""
    model = build(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, aux = [], []
    for step in range(STEPS):
        batch = global_batch(step)
        step_losses, step_aux = [], []
        for rank in range(WORLD):
            torch.manual_seed(1000 * step + rank)  # the rank's random draws (MHR's relaxed Bernoulli routing)
            out = model(**inputs_for(method, batch, rank))
            extra = aux_loss(method, model, step, rank)
            loss = out.loss if extra is None else out.loss + extra
            (loss / WORLD).backward()
            step_losses.append(out.loss.item())
            step_aux.append(None if extra is None else extra.item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_losses)
        aux.append(step_aux)
    return {"losses": losses, "aux": aux, "state": adapter_state(model), "biases": selection_biases(model)}


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


def _zero3(method: str, rank: int, stage: int = 3):
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
        # ZeRO-3: partition every parameter; ZeRO-2: gradients and optimizer states partitioned, weights replicated
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at norm 1.0 unless told; the reference does not clip
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def full_state():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # every rank gets the full weights
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    return engine, _EngineStep(engine), engine.backward, lambda: engine.module, full_state if stage == 3 else None


def _zero2(method: str, rank: int):
    return _zero3(method, rank, stage=2)


ENGINES = {"ddp": _ddp, "fsdp1": _fsdp1, "fsdp2": _fsdp2, "zero2": _zero2, "zero3": _zero3}


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
            out_dir = os.path.join(args.out, engine, method, f"rank{rank}")
            losses, aux, counts = [], [], None
            for step in range(STEPS):
                torch.manual_seed(1000 * step + rank)
                out = model(**inputs_for(method, global_batch(step), rank))
                extra = aux_loss(method, unwrap(), step, rank)  # computed on the rank's own rows
                backward(out.loss if extra is None else out.loss + extra)
                aux.append(None if extra is None else extra.item())
                if step == 0:
                    counts = expert_counts(unwrap())
                optimizer.step()  # SMoRA: the step post-hook all-reduces the counts and updates the biases
                optimizer.zero_grad()
                losses.append(out.loss.item())
            state = full_state() if full_state is not None else None
            save(method, unwrap(), state, out_dir)
            torch.save(
                {"losses": losses, "aux": aux, "counts": counts, "biases": selection_biases(unwrap())},
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
