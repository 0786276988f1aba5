"""RoutingProbe: forward hooks that read every routed layer's decisions and add them to running totals, for any
moe-peft adapter (MoLE, LoRAMoE, SMoRA, MHR, PHATGOOSE, RoMA).

Hooks sit on the routers (MoLE, LoRAMoE, SMoRA, MHR), on the PHATGOOSE layers and on the RoMA router layers, plus a
pre-hook and a hook on the root transformers model that delimit one forward: a router call outside a root forward
(a gradient-checkpointed layer recomputed during backward) is not counted twice. Totals stay on the device (no host
synchronization per forward); `take()` reads them and starts a new window.

Each sample can belong to a group (its task, its sample type): `probe.groups = LongTensor [B]` before a forward
splits the totals by group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .summary import TENSORS, Totals, normalized_entropy


@dataclass
class Decision:
    """What one routed layer decided for the N rows (tokens, or samples for MHR) of one forward."""

    idx: torch.Tensor  # [N, k] long, the expert of each slot; -1 = no expert (null expert, top-p cut-off)
    num_experts: int
    weights: Optional[torch.Tensor] = None  # [N, k], used for the load of dense routers
    probs: Optional[torch.Tensor] = None  # [N, C] the router distribution (for the entropy)
    dense: bool = False  # every row mixes all experts: load = mean weight, not pick share
    null_slots: bool = False  # -1 means a null expert (AdaMoE), not a top-p cut-off
    per_sample: bool = False  # rows are samples (MHR routes per task), not tokens
    # the samples of the batch the N rows come from, [b] long, when the router saw only some of them (a mixed batch
    # routes each adapter on its own samples: N = b x S); None: every sample of the batch
    samples: Optional[torch.Tensor] = None
    # routing_level="sequence": the rows are sequences (one decision each); the row of the router's input [b] each sits
    # in, [N] long, and whether it had a prompt token, [N] bool (only those count)
    sequence_rows: Optional[torch.Tensor] = None
    sequence_valid: Optional[torch.Tensor] = None


Reader = Callable[[nn.Module, tuple, Any], Optional[Decision]]


# -- what each method's routed modules look like --------------------------------------------------------------------
def _moe_lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Reader]]:
    from ..routing import DenseRouter, SMoRARouter
    from ..tuners.routed.layer import MoELoraLinear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoraLinear)]
    adapters = {a for _, m in layers for a in m.routers.keys()}
    for name, layer in layers:
        for adapter, router in layer.routers.items():
            config = layer.configs[adapter]
            label = name.rpartition(".")[0] if config.router_granularity == "block" else name
            if len(adapters) > 1:
                label = f"{label}[{adapter}]"
            num_experts = layer.experts_A[adapter].shape[0]
            null = getattr(config, "num_null_experts", 0) > 0
            sigmoid = isinstance(router, SMoRARouter)

            def read(module, inputs, routing, num_experts=num_experts, null=null, sigmoid=sigmoid, layer=layer):
                probs = routing.probs
                if sigmoid:  # independent scores: normalize to a distribution for the entropy
                    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
                dense = isinstance(module, DenseRouter) or (
                    not module.training and getattr(module, "eval_routing", "topk") == "dense"
                )
                ctx = layer._routing_ctx
                samples = ctx.router_rows  # set while a mixed batch routes one adapter's samples
                call = ctx.router_call  # set while a router routes pooled sequences (routing_level="sequence")
                return Decision(
                    routing.idx, num_experts, routing.weights, probs, dense=dense, null_slots=null, samples=samples,
                    sequence_rows=call.get("rows"), sequence_valid=call.get("valid"),
                )  # fmt: skip

            yield label, router, read


def _mhr_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Reader]]:
    from ..tuners.mhr.layer import MHRLinear

    for name, layer in model.named_modules():
        if not isinstance(layer, MHRLinear):
            continue
        for adapter, router in layer.mhr_router.items():

            def read(module, inputs, weights):
                w = weights.float().mean(1)  # [B, H, S] -> [B, S]: the skill mix averaged over heads
                idx = torch.arange(w.shape[-1], device=w.device).expand_as(w)  # [B, S]
                return Decision(idx, w.shape[-1], w, w, dense=True, per_sample=True)

            yield (name if len(layer.mhr_router) == 1 else f"{name}[{adapter}]"), router, read


def _phatgoose_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Reader]]:
    from ..tuners.phatgoose.layer import PhatgooseLinear

    for name, layer in model.named_modules():
        if not isinstance(layer, PhatgooseLinear):
            continue

        def read(module, inputs, output):
            x = inputs[0]
            adapters = [a for a in module.active_adapters if a in module.phatgoose_A]
            if not adapters or module.disable_adapters or module.merged:
                return None
            x_flat = x.reshape(-1, module.in_features)  # [..., in] -> [T, in]
            with torch.no_grad():  # the layer's own routing, recomputed for the statistics
                idx, weights = module.route(adapters[0], x_flat, x.shape[0] if x.dim() > 1 else 1)  # [T, k]
            config = module.phatgoose_config[adapters[0]]
            return Decision(idx, config.num_experts, weights, dense=config.routing == "uniform")

        yield name, layer, read


def _roma_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Reader]]:
    from ..tuners.roma.layer import RoMARouterLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, RoMARouterLayer):
            continue

        def read(module, inputs, out):
            # transformers 5 MoE routers return (logits [T, E], top-k weights [T, k], top-k indices [T, k])
            logits = out[0] if isinstance(out, tuple) else out
            idx = out[-1] if isinstance(out, tuple) and not out[-1].is_floating_point() else None
            probs = logits.float().softmax(-1)  # [T, E]
            if idx is None:  # logits only: every expert counted by its probability
                idx = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
                return Decision(idx, probs.shape[-1], probs, probs, dense=True)
            return Decision(idx, probs.shape[-1], probs=probs)

        yield name, layer, read


def routed_modules(model: nn.Module) -> list[tuple[str, nn.Module, Reader]]:
    """(layer label, module to hook, reader) for every routed layer of a moe-peft model (a PeftModel or a tuner);
    labels are module names in the transformers model, as in `moe_peft.routing_stats`."""
    found = []
    root = root_model(model)
    for finder in (_moe_lora_layers, _mhr_layers, _phatgoose_layers, _roma_layers):
        found.extend(finder(root))
    return found


def root_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or a tuner, or a wrapper with `.module` such as DDP)."""
    model = getattr(model, "module", model)
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "peft_config") and isinstance(getattr(base, "model", None), nn.Module):
        return base.model
    return model


# -- the probe ---------------------------------------------------------------------------------------------------
class RoutingProbe:
    """Running routing totals of every routed layer of `model`.

    probe = RoutingProbe(model)             # train_only=True: only forwards in training mode with grad enabled
    model(**batch); ...
    window = probe.take()                   # {layer: Totals (on the CPU)}, and the totals start again
    probe.remove()
    """

    def __init__(self, model: nn.Module, train_only: bool = False):
        self.train_only = train_only
        self.groups: Optional[torch.Tensor] = None  # [B] group of each sample of the next forwards
        self.num_groups = 1
        self.totals: dict[str, Totals] = {}
        self.router_loss_sum: Optional[torch.Tensor] = None  # sum of outputs.router_loss over counted forwards
        self.forwards = 0
        self._active = False
        self._shape: Optional[tuple[int, int]] = None  # (B, S) of the current forward
        self._mask: Optional[torch.Tensor] = None  # [B, S] attention mask of the current forward
        modules = routed_modules(model)
        if not modules:
            raise ValueError(
                f"{type(model).__name__} has no routed layer moe-peft knows (MoLE, LoRAMoE, SMoRA, MHR, PHATGOOSE or "
                "RoMA adapter): nothing to measure."
            )
        self.layers = list(dict.fromkeys(label for label, _, _ in modules))
        root = root_model(model)
        self._handles = [
            root.register_forward_pre_hook(self._start, with_kwargs=True),
            root.register_forward_hook(self._finish),
        ]
        for label, module, reader in modules:
            self._handles.append(module.register_forward_hook(self._layer_hook(label, reader)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict):
        self._active = not self.train_only or (module.training and torch.is_grad_enabled())
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
        self._shape = tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    def _finish(self, module: nn.Module, args: tuple, outputs) -> None:
        if not self._active:
            return
        self._active = False
        self.forwards += 1
        loss = outputs.get("router_loss") if isinstance(outputs, dict) else None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()
            self.router_loss_sum = loss if self.router_loss_sum is None else self.router_loss_sum + loss

    def _layer_hook(self, label: str, reader: Reader):
        def hook(module, inputs, output):
            if not self._active:
                return
            # no_grad: nothing the statistics compute may be saved for backward. Under gradient checkpointing the
            # recomputed forward (where the probe is inactive) must save exactly what the first one saved, or
            # torch raises a CheckpointError (SMoRA's normalized scores did, under MoESFTTrainer).
            with torch.no_grad():
                decision = reader(module, inputs, output)
                if decision is not None:
                    self._add(label, decision)

        return hook

    # -- accumulation (no host synchronization) --------------------------------------------------------------------
    def _rows(self, decision: Decision) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Per row: the padding mask [N] float (None: every row counts) and the group [N] long."""
        rows, device = decision.idx.shape[0], decision.idx.device
        shape, mask = self._shape, self._mask
        samples = decision.samples  # [b] the batch rows a mixed batch's router saw, None: all of them
        if decision.sequence_rows is not None:  # one row per sequence: its prompt decides whether it counts
            keep = decision.sequence_valid.to(device=device, dtype=torch.float64)  # [N]
            sample = decision.sequence_rows.to(device)  # [N] the row of the router's input
            if samples is not None:
                sample = samples.to(device)[sample]  # the router's row -> the batch's sample
            if self.groups is None:
                return keep, torch.zeros(rows, dtype=torch.long, device=device)
            groups = self.groups.to(device)
            return keep, groups[sample.clamp(max=groups.shape[0] - 1)]  # [N]
        if samples is not None and shape is not None:
            samples = samples.to(device)
            shape = (samples.numel(), shape[1])  # the router's tokens are [b, S] (b of the batch's B rows)
            if mask is not None and mask.shape[0] == self._shape[0]:
                mask = mask.index_select(0, samples.to(mask.device))  # [B, S] -> [b, S]
        if decision.per_sample or shape is None or rows != shape[0] * shape[1]:
            # rows are samples (MHR), or the layer saw another layout: no padding mask; samples by position
            keep = None
            per = rows // shape[0] if shape is not None and shape[0] and rows % shape[0] == 0 else rows
            sample = torch.arange(rows, device=device) // max(per, 1)
        else:
            keep = None
            if mask is not None and mask.shape == shape:
                keep = mask.reshape(-1).to(device=device, dtype=torch.float64)  # [B, S] -> [N]
            sample = torch.arange(rows, device=device) // shape[1]  # token -> its sample
        if self.groups is None:
            return keep, torch.zeros(rows, dtype=torch.long, device=device)
        if samples is not None:
            sample = samples[sample.clamp(max=samples.numel() - 1)]  # the router's row -> the batch's sample
        groups = self.groups.to(device)
        return keep, groups[sample.clamp(max=groups.shape[0] - 1)]  # [N]

    def _add(self, label: str, d: Decision) -> None:
        keep, group = self._rows(d)
        num_experts, device = d.num_experts, d.idx.device
        totals = self.totals.get(label)
        if totals is None or totals.counts.shape[1] != num_experts:
            totals = Totals.zeros(self.num_groups, num_experts, device)
        totals = totals.grown(self.num_groups)
        rows, k = d.idx.shape
        m = keep if keep is not None else torch.ones(rows, dtype=torch.float64, device=device)  # [N]
        valid = (d.idx >= 0).double()  # [N, k]
        picked = valid * m[:, None]  # [N, k] real picks on real tokens
        amount = picked * d.weights.detach().double() if d.dense and d.weights is not None else picked  # [N, k]
        cell = group[:, None] * num_experts + d.idx.clamp(min=0)  # [N, k] -> flat (group, expert) cell
        totals.counts.view(-1).index_add_(0, cell.reshape(-1), amount.reshape(-1))  # [G * E]
        totals.tokens.index_add_(0, group, m)
        totals.picks.index_add_(0, group, picked.sum(-1))
        totals.slots.index_add_(0, group, m * k)
        if d.null_slots:
            totals.null.index_add_(0, group, ((1.0 - valid) * m[:, None]).sum(-1))
            totals.has_null = True
        if d.probs is not None:
            entropy = normalized_entropy(d.probs.detach())  # [N]
            totals.entropy_sum.index_add_(0, group, entropy * m)
            totals.entropy_rows.index_add_(0, group, m)
            totals.has_probs = True
        self.totals[label] = totals

    # -- reading --------------------------------------------------------------------------------------------------
    def take(self, all_reduce: bool = False) -> tuple[dict[str, Totals], Optional[float], int]:
        """(totals per layer on the CPU, mean router loss per counted forward or None, counted forwards) of the
        window since the last take(); the totals start again from zero. all_reduce=True sums them over the
        data-parallel ranks first (every rank must call it, as every rank runs Trainer.log)."""
        if all_reduce and dist.is_available() and dist.is_initialized():
            self._all_reduce()
        totals = {label: t.cpu() for label, t in self.totals.items()}
        loss = (
            None if self.router_loss_sum is None or not self.forwards else float(self.router_loss_sum) / self.forwards
        )
        forwards = self.forwards
        self.totals, self.router_loss_sum, self.forwards = {}, None, 0
        return totals, loss, forwards

    def _all_reduce(self) -> None:
        device = next((t.counts.device for t in self.totals.values()), torch.device("cpu"))
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        # every rank runs the same layers; the scalars travel in one tensor
        scalars = torch.tensor(
            [float(self.forwards), 0.0 if self.router_loss_sum is None else float(self.router_loss_sum)],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(scalars)
        self.forwards = int(scalars[0])
        self.router_loss_sum = scalars[1] if self.router_loss_sum is not None else None
        for label in sorted(self.totals):
            reduced = self.totals[label].apply(lambda t: t.to(device))
            for name in TENSORS:
                dist.all_reduce(getattr(reduced, name))
            self.totals[label] = reduced
