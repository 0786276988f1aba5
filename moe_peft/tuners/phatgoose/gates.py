"""PHATGOOSE step 2: post-hoc gate training for one LoRA expert (Muqeeth et al., ICML 2024, method and fig. 2).

Every adapted module of the expert gets a gate vector v [in], zero-initialized, and computes

    y = W x + sigmoid(v . x) * s B A x

for about 100 steps on the expert's own data, with the base model and the expert frozen: only v trains. The
gates are saved next to the adapter (`phatgoose_gates.safetensors`); `assemble` reads them as routing keys.
sigmoid(0) = 0.5, so training starts with the expert at half strength (as in the paper's code).

The gate is applied with a forward hook on the LoRA dropout module of PEFT's LoRA layer: its input is the module
input x, and since A is linear, sigmoid(v . x) * A(dropout(x)) = A(sigmoid(v . x) * dropout(x)). The user's model is
not rebuilt; the hooks and the frozen flags are undone when training ends.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save
from torch import nn

from ..._internal.atomic import atomic_file

GATES_FILE = "phatgoose_gates.safetensors"


def _lora_adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    if not isinstance(model, PeftModel):
        raise TypeError(f"train_gates expects a PeftModel holding one LoRA adapter, got {type(model).__name__}.")
    if adapter_name is None:
        if len(model.peft_config) != 1:
            raise ValueError(
                f"adapter_name=None is ambiguous: the model holds {sorted(model.peft_config)}; name the LoRA expert."
            )
        adapter_name = next(iter(model.peft_config))
    config = model.peft_config.get(adapter_name)
    if config is None or getattr(config.peft_type, "value", config.peft_type) != "LORA":
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: train_gates needs a LoRA adapter (LoraConfig).")
    if adapter_name not in model.active_adapters:
        raise ValueError(f"Adapter '{adapter_name}' is not active; call model.set_adapter('{adapter_name}') first.")
    return adapter_name


def lora_layers(model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """{module name relative to the transformers model: PEFT LoRA layer} holding `adapter_name`."""
    layers = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            if adapter_name in getattr(module, "lora_variant", {}) or not isinstance(
                module.get_base_layer(), nn.Linear
            ):
                raise ValueError(
                    f"{name} of adapter '{adapter_name}' is not a plain LoRA on nn.Linear (DoRA and other variants, "
                    "embeddings and convolutions are not supported as PHATGOOSE experts)."
                )
            layers[name] = module
    if not layers:
        raise ValueError(f"Adapter '{adapter_name}' adapts no module.")
    return layers


GATE_NAME = "phatgoose_gate"  # the gate's parameter name on the LoRA layer's base layer during gate training


def _gate_hook(owner: nn.Module):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]  # the LoRA layer's input, [..., in]
        # read through the layer, not a captured Parameter: FSDP and ZeRO-3 swap in the gathered tensor at forward time
        gate = getattr(owner, GATE_NAME)  # [in]
        with torch.autocast(device_type=x.device.type, enabled=False):
            g = torch.sigmoid(x.float() @ gate)  # [..., in] @ [in] -> [...]
        return output * g.unsqueeze(-1).to(output.dtype)  # gate every token's expert input

    return hook


def _batches(data: Any, collator: Optional[Callable], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless model-ready batches from a datasets.Dataset (+ collator) or an iterable of batches."""
    if hasattr(data, "column_names"):
        if collator is None:
            raise ValueError("collator=None is invalid with a datasets.Dataset: pass the collator that makes batches.")
        generator = torch.Generator().manual_seed(seed)
        data = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=True, collate_fn=collator, generator=generator
        )
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batch: pass a non-empty, re-iterable source (e.g. a list of batches).")


@contextmanager
def gate_training(model: PeftModel, adapter_name: Optional[str] = None) -> Iterator[dict[str, nn.Parameter]]:
    """Within the block, every module of the LoRA expert computes W x + sigmoid(v . x) s B A x and only the gates v
    (zero-initialized, yielded as {module name: v [in]}) require grad; on exit the hooks, gates and flags are undone.

    Each gate is registered for the block as the parameter `phatgoose_gate` of the LoRA layer's base layer (PEFT
    saves everything on a tuner layer except its base layer, so `save_pretrained` inside the block writes the same
    adapter files as outside), so that a data-parallel wrapper made inside the block (DDP, FSDP, DeepSpeed; built
    after entering it) reduces the gates' gradients like any other trainable parameter. Under a sharding engine the
    yielded Parameters hold a shard: take the trained gates from the engine's full state dict with
    `gates_from_state_dict`.
    """
    adapter_name = _lora_adapter(model, adapter_name)
    layers = lora_layers(model, adapter_name)
    owners = {name: layer.get_base_layer() for name, layer in layers.items()}
    taken = sorted(name for name, owner in owners.items() if GATE_NAME in owner._parameters)
    if taken:
        raise ValueError(f"{taken} already train PHATGOOSE gates: gate_training blocks cannot be nested.")
    gates = {
        name: nn.Parameter(torch.zeros(layer.in_features, device=layer.lora_A[adapter_name].weight.device))
        for name, layer in layers.items()
    }  # v [in] per module, float32
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)  # base and expert frozen: only the gates train
    handles = []
    try:
        for name, layer in layers.items():
            owners[name].register_parameter(GATE_NAME, gates[name])
            handles.append(layer.lora_dropout[adapter_name].register_forward_hook(_gate_hook(owners[name])))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
        for owner in owners.values():
            owner._parameters.pop(GATE_NAME, None)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def gates_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name: v [in]} from a full (gathered) state dict of a model inside `gate_training`, e.g. FSDP's or
    DeepSpeed's, keyed by the module names relative to the transformers model as `train_gates` returns them."""
    suffix = ".base_layer." + GATE_NAME
    gates = {}
    for key, value in state_dict.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]  # the LoRA layer
            name = name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
            gates[name] = value.detach().float().clone()
    if not gates:
        raise ValueError("state_dict holds no PHATGOOSE gate: take it from the model inside gate_training(...).")
    return gates


def train_gates(
    model: PeftModel,
    data: Union[Iterable[dict], Any],
    steps: int = 100,
    lr: float = 1e-3,
    *,
    collator: Optional[Callable] = None,
    batch_size: int = 8,
    warmup_ratio: float = 0.1,
    adapter_name: Optional[str] = None,
    save_to: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train the PHATGOOSE gate vectors of a LoRA expert, everything else frozen; return {module name: v [in]}.

    Args:
        model: a PeftModel holding the LoRA expert (a PEFT LoraConfig adapter, e.g. loaded from its directory).
        data: the expert's own training data: an iterable of model-ready batches (dicts of tensors with `labels`),
            or a `datasets.Dataset` together with `collator`. It is cycled until `steps` batches were seen.
        steps, lr: 100 steps at 1e-3 (mttl's PhatgooseTransform; AdamW, no weight decay, linear warmup over
            warmup_ratio of the steps, then constant).
        save_to: the expert's adapter directory: the gates are saved there as phatgoose_gates.safetensors.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: use a positive number of optimizer steps, e.g. 100.")
    was_training = model.training
    losses = []
    with gate_training(model, adapter_name) as gates:
        optimizer = torch.optim.AdamW(gates.values(), lr=lr, weight_decay=0.0)
        warmup = max(1, int(warmup_ratio * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        device = next(iter(gates.values())).device
        model.train()
        try:
            for batch in itertools.islice(_batches(data, collator, batch_size, seed), steps):
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            model.train(was_training)
    trained = {name: v.detach() for name, v in gates.items()}
    if save_to is not None:
        save_gates(trained, save_to, {"steps": steps, "lr": lr, "first_loss": losses[0], "last_loss": losses[-1]})
    return trained


def save_gates(gates: dict[str, torch.Tensor], path: Union[str, os.PathLike], info: Optional[dict] = None) -> str:
    """Write {module name: v [in]} to <path>/phatgoose_gates.safetensors (next to the expert's adapter files)."""
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, GATES_FILE)
    metadata = {"format": "pt", "moe_peft": "phatgoose_gates", **{k: str(v) for k, v in (info or {}).items()}}
    with atomic_file(file) as tmp:  # a reader sees the old gates or the new ones, never a partial file
        data = save({k: v.float().cpu().contiguous() for k, v in gates.items()}, metadata=metadata)
        with open(tmp, "wb") as f:
            f.write(_canonical(data))
    return file


def _canonical(data: bytes) -> bytes:
    """The safetensors bytes with the header's keys sorted: safetensors (0.8) writes the metadata in a per-process
    hash order, so the same gates saved by two processes (data-parallel ranks) would differ in bytes. Same header
    length (only the order changes; the tensors' offsets are in their entries), same tensor bytes."""
    size = int.from_bytes(data[:8], "little")  # header length, then the JSON header padded with spaces
    header = json.dumps(json.loads(data[8 : 8 + size]), separators=(",", ":"), sort_keys=True).encode()
    if len(header) > size:  # not the compact JSON safetensors writes: keep its bytes
        return data
    return data[:8] + header.ljust(size) + data[8 + size :]


def load_gates(path: Union[str, os.PathLike]) -> Optional[dict[str, torch.Tensor]]:
    """The gates saved next to an expert's adapter, or None if it has none."""
    file = os.path.join(path, GATES_FILE)
    return load_file(file) if os.path.exists(file) else None
