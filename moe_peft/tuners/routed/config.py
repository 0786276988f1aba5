"""Flat, typed, validated configs: one shared base and one class per method.

Every field maps one-to-one onto a key of `adapter_config.json` (and of the YAML configs in `configs/`).
`__post_init__` rejects bad values with a `ValueError` that names the field and says what to do.
Equations and defaults: docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ..._internal.registration import ensure_peft_type
from ...ops import BACKENDS
from ...routing.losses import LBC_FORMS
from ...routing.sequence import ROUTING_LEVELS, SEQUENCE_POOLINGS

ROUTER_GRANULARITIES = ("linear", "block")
# expert_scaling: the power of the gate spread c that multiplies lora_alpha / r
EXPERT_SCALINGS = {"lora": 0.0, "sqrt_gate": 0.5, "gate": 1.0}


def _bad(field_name: str, value, fix: str) -> ValueError:
    return ValueError(f"{field_name}={value!r} is invalid: {fix}")


def _finite_non_negative(value) -> bool:
    """A real number >= 0 that is not a bool, NaN or inf (router_lr_ratio, router_init_std)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class ConfigFile(PeftConfig):
    """What every moe-peft config does with its `adapter_config.json` (no fields of its own):

    * sets (`target_modules`, `exclude_modules`) are written as sorted lists, so that every process and every
      data-parallel rank writes the same file (PEFT writes a set in hash order, which differs between processes);
    * keys this moe-peft version does not know (an adapter saved by a newer moe-peft) are dropped with a warning that
      names them and the config class, instead of PEFT's generic advice to upgrade PEFT.
    """

    def __post_init__(self):
        check_field_types(self)  # before any field-specific check compares a value of the wrong type
        super().__post_init__()

    def to_dict(self) -> dict:
        return {k: sorted(v) if isinstance(v, set) else v for k, v in super().to_dict().items()}

    @classmethod
    def check_kwargs(cls, **kwargs):
        kwargs = super().check_kwargs(**kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: the adapter config has keys this moe-peft version does not know: {unknown}; they are "
                "ignored. It was probably saved by a newer moe-peft: upgrade moe-peft (pip install -U moe-peft) if the "
                "adapter must behave exactly as it did there.",
                stacklevel=2,
            )
        return {k: v for k, v in kwargs.items() if k in known}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether `value` fits a field annotation: int (not bool), float (finite; an int is fine), bool, str, Literal,
    Optional / Union, list / set / tuple of X, dict, a class; anything else is not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str) and value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, set, tuple):
        return isinstance(value, (list, set, tuple)) and all(_conforms(v, args[0]) for v in value if args)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_field_types(config: PeftConfig) -> None:
    """Raise a ValueError naming the first field whose value does not fit its annotation (a string for a number, a
    NaN or inf weight, a float rank, a routing name that is not one of the choices)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in hints and not _conforms(value, hints[f.name]):
            raise _bad(f.name, value, f"expected {_describe(hints[f.name])}.")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if hint is float:
        return "a finite number"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "None")


@dataclass
class MoELoraConfig(ConfigFile):
    """Fields shared by every token-routed mixture of LoRA experts.

    Args:
        r: rank of each LoRA expert.
        lora_alpha: LoRA scaling numerator; an expert's delta is scaled by `lora_alpha / r`.
        lora_dropout: dropout on the experts' input (the router always sees the undropped input).
        target_modules: names (suffix match) or a regex of the `nn.Linear` modules to adapt.
        target_parameters: fused 3-D expert parameters of a transformers MoE model to adapt (PEFT's matching,
            e.g. ["experts.gate_up_proj", "experts.down_proj"]): one LoRA of rank r, scaling lora_alpha / r, per
            base expert, routed by the base model's own router (moe_peft/experts/, docs/methods.md).
        exclude_modules: names or a regex of modules never to adapt.
        num_experts: experts per routed layer.
        top_k: experts chosen per token.
        router_aux_loss_coef: weight of the load-balancing loss (0 disables it).
        router_z_loss_coef: weight of the router z-loss (ST-MoE; 0 disables it).
        router_granularity: "linear" gives every adapted linear its own router; "block" gives one router
            per parent block (e.g. a Llama MLP), reading the block's input and shared by its gate/up/down
            projections, as LLaVA-MoLE and MixLoRA do.
        init_lora_weights: B starts at zero so a new adapter is a no-op; set False only for tests.
        expert_scaling: "lora" scales an expert's delta by lora_alpha / r, as PEFT's LoRA; "gate" and "sqrt_gate"
            multiply that by c or sqrt(c), c being the number of experts a token's gate weights are spread over when
            routing is uniform (`gate_spread()`: LoRAMoE num_experts, renormalized top-k top_k, top-1 and top-p 1).
            A softmax gate gives each expert about 1/c of its delta, so at the usual lora_alpha = 2r a mixture learns
            more slowly than LoRA; docs/quality.md has the measurements behind each method's default. None (the
            default) resolves to the method's default ("sqrt_gate" for LoRAMoE, "lora" otherwise) for a new config,
            and to "lora" for a saved adapter_config.json without the key (it predates the field, when every expert
            was scaled by lora_alpha / r), on every loading path.
        kernel_backend: how the experts are applied (`moe_peft.ops.apply_lora_experts`): "auto" (Triton
            kernels on CUDA, the torch path elsewhere), "torch", "triton", or a specific path; a runtime
            choice that does not change the numbers beyond floating-point rounding.
        routing_level: "token" (default) routes every token from its own hidden state; "sequence" routes each
            sample (each packed sequence, with packing) once, from its prompt's pooled hidden state, and every token of
            it uses that choice: in training the prompt is the tokens before the first labelled one (labels != -100),
            in generation the input of the first forward, whose choice later steps reuse (docs/methods.md,
            "Sequence-level routing"). The router losses and statistics then count one decision per sequence.
        sequence_pooling: with routing_level="sequence", how a prompt's states become the router input: "mean" over its
            real tokens (default) or its "last" token.
        router_input_layer: with routing_level="sequence", every router of the adapter reads the output of this
            decoder layer (0-based; negative counts from the last) of the frozen base model instead of its own input,
            rms-normalized and pooled over the prompt: a pre-pass of the base up to that layer runs under no_grad at
            each forward that starts sequences (training steps, the prompt of a generation). None (default): each
            router reads its own layer's input.
        router_lr_ratio: the routers of the adapter train at `lr * router_lr_ratio` (the experts at `lr`); 0 freezes
            them at their initialization (a fixed random routing function, in the spirit of hash routing): the routers
            read their weights detached in the forward, so no optimizer, weight decay or router loss moves them.
            A ratio other than 0 and 1 is applied by an optimizer built from parameter groups:
            `moe_peft.create_router_optimizer(model, lr=...)` (or `router_param_groups`), MoESFTTrainer and
            `moe-peft train` do it; a training forward under any other optimizer warns once. None (the default)
            resolves to `_default_router_lr_ratio()` for a new config (1.0; 0 for MoLE's plain top-1 token routing),
            and to 1.0 for a saved adapter_config.json without the key (it predates the field, when routers trained
            at lr), on every loading path.
        router_init_std: the standard deviation of the normal init of the router weights (router biases start at 0):
            0.02 (default, MixLoRA's N(0, 0.02^2)) starts every router near uniform. The logit scale at init is
            std * |x|, so it depends on the hidden size and the router input's norm. A frozen top-1 router with the
            straight-through weight (MoLE top-1's default) picks argmax(W x + 0), which a rescaled W does not change:
            there the std has no effect; it matters for learned routers, top-k weights, LoRAMoE's softmax and SMoRA's
            sigmoid. 0 starts every router at zero (uniform; a learned router then starts from ties), and is refused
            with router_lr_ratio=0, where it would route every token alike for good.
    """

    r: int = field(default=8, metadata={"help": "Rank of each LoRA expert."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex of nn.Linear layers to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Fused 3-D expert parameters: a LoRA per base expert, the base routing."}
    )
    num_experts: int = field(default=4, metadata={"help": "LoRA experts per routed layer."})
    top_k: int = field(default=1, metadata={"help": "Experts chosen per token."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing loss weight."})
    router_z_loss_coef: float = field(default=0.0, metadata={"help": "Router z-loss weight."})
    router_granularity: Literal["linear", "block"] = field(
        default="linear", metadata={"help": "'linear': a router per adapted linear; 'block': one per parent block."}
    )
    init_lora_weights: bool = field(default=True, metadata={"help": "B = 0 at init (adapter starts as a no-op)."})
    expert_scaling: Optional[Literal["lora", "sqrt_gate", "gate"]] = field(
        default=None,
        metadata={
            "help": "'lora': lora_alpha / r; 'gate' / 'sqrt_gate': times c / sqrt(c) (gate spread); None: the "
            "method's default ('lora'; LoRAMoE 'sqrt_gate')."
        },
    )
    kernel_backend: str = field(
        default="auto", metadata={"help": "apply_lora_experts backend: 'auto', 'torch', 'triton', ..."}
    )
    routing_level: Literal["token", "sequence"] = field(
        default="token",
        metadata={"help": "'token': every token routed; 'sequence': each sample routed once from its prompt."},
    )
    sequence_pooling: Literal["mean", "last"] = field(
        default="mean", metadata={"help": "routing_level='sequence': pool the prompt's states by 'mean' or 'last'."}
    )
    router_input_layer: Optional[int] = field(
        default=None,
        metadata={"help": "routing_level='sequence': routers read this decoder layer's output of the frozen base."},
    )
    router_lr_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Routers train at lr * router_lr_ratio (0: frozen at init); applied by create_router_optimizer, "
            "MoESFTTrainer and moe-peft train. None: the method's default (1.0; MoLE top-1: 0)."
        },
    )
    router_init_std: float = field(
        default=0.02,
        metadata={
            "help": "Std of the routers' normal weight init (biases start at 0); 0: zero routers (learned only)."
        },
    )

    # the PeftType name this config registers as; set by each subclass
    _method = "MOELORA"
    # what expert_scaling=None means for a new config of this method
    _default_expert_scaling = "lora"

    def __post_init__(self):
        if self.expert_scaling is None:
            # PEFT builds a config from a saved adapter_config.json by calling the class with every saved key,
            # peft_type included (PeftConfig.from_pretrained, PeftModel.from_pretrained, load_adapter, AutoPeftModel
            # all end in that call); a user's new config has none. A saved config without expert_scaling predates the
            # field, when every method scaled its experts by lora_alpha / r: it reloads exactly as trained.
            saved = self.peft_type is not None
            self.expert_scaling = "lora" if saved else self._default_expert_scaling
        if self.router_lr_ratio is None:
            # as expert_scaling: a saved config without the key predates the field, when routers trained at lr
            self.router_lr_ratio = 1.0 if self.peft_type is not None else self._default_router_lr_ratio()
        super().__post_init__()
        self.peft_type = ensure_peft_type(self._method)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r * self.gate_spread() ** EXPERT_SCALINGS[self.expert_scaling]

    def _default_router_lr_ratio(self) -> float:
        """What router_lr_ratio=None means for a new config of this method (the one place that rule lives)."""
        return 1.0

    def gate_spread(self) -> int:
        """Over how many experts a token's gate weights (which sum to 1) are spread under uniform routing."""
        return 1

    def _validate(self) -> None:
        if self.expert_scaling not in EXPERT_SCALINGS:
            raise _bad("expert_scaling", self.expert_scaling, f"use one of {tuple(EXPERT_SCALINGS)}.")
        ratio = self.router_lr_ratio
        if not _finite_non_negative(ratio):
            raise _bad(
                "router_lr_ratio",
                ratio,
                "use a finite number >= 0: the routers' learning rate over the experts' (1: the same, 0.1: ten times "
                "slower, 0: frozen at their initialization).",
            )
        std = self.router_init_std
        if not _finite_non_negative(std):
            raise _bad(
                "router_init_std",
                std,
                "use a finite number >= 0: the std of the routers' normal init (default 0.02; 0 starts them at zero).",
            )
        if std == 0 and ratio == 0:
            raise _bad(
                "router_init_std",
                std,
                "zero routers frozen at their init (router_lr_ratio=0) would route every token alike for good; use "
                "router_init_std > 0 (e.g. 0.02), or train the routers (router_lr_ratio > 0).",
            )
        if not isinstance(self.r, int) or self.r <= 0:
            raise _bad("r", self.r, "the rank of each expert must be a positive integer, e.g. r=8.")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise _bad("num_experts", self.num_experts, "use a positive integer, e.g. num_experts=4.")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise _bad("top_k", self.top_k, "use a positive integer, e.g. top_k=1.")
        if self.top_k > self.num_experts + self._num_null_experts():
            raise _bad(
                "top_k", self.top_k, f"top_k cannot exceed the number of experts ({self.num_experts}); lower top_k."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _bad("lora_dropout", self.lora_dropout, "use a probability in [0, 1).")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "loss coefficients must be >= 0 (0 disables the loss).")
        if self.router_granularity not in ROUTER_GRANULARITIES:
            raise _bad("router_granularity", self.router_granularity, f"use one of {ROUTER_GRANULARITIES}.")
        if self.kernel_backend not in BACKENDS:
            raise _bad("kernel_backend", self.kernel_backend, f"use one of {BACKENDS}.")
        self._validate_routing_level()
        if self.target_parameters is not None and (
            isinstance(self.target_parameters, str) or not all(isinstance(t, str) and t for t in self.target_parameters)
        ):
            raise _bad(
                "target_parameters",
                self.target_parameters,
                'use a list of parameter names, e.g. ["experts.gate_up_proj", "experts.down_proj"].',
            )

    def _num_null_experts(self) -> int:
        return 0

    def _validate_routing_level(self) -> None:
        if self.routing_level not in ROUTING_LEVELS:
            raise _bad("routing_level", self.routing_level, f"use one of {ROUTING_LEVELS}.")
        if self.sequence_pooling not in SEQUENCE_POOLINGS:
            raise _bad("sequence_pooling", self.sequence_pooling, f"use one of {SEQUENCE_POOLINGS}.")
        if self.routing_level == "token" and self.sequence_pooling != "mean":
            raise _bad(
                "sequence_pooling",
                self.sequence_pooling,
                "it pools a sequence's prompt for routing_level='sequence'; set routing_level='sequence' or leave "
                "sequence_pooling unset.",
            )
        if self.router_input_layer is not None and self.routing_level != "sequence":
            raise _bad(
                "router_input_layer",
                self.router_input_layer,
                "a router reading a later layer needs routing_level='sequence': a token-level router at generation "
                "would need the frozen base's hidden state of every new token, i.e. a second forward and KV cache of "
                "the base up to that layer at every decoding step, kept in step with generate()'s own (beam search "
                "reorders it); a sequence is routed once, at its prompt. Set routing_level='sequence', or leave "
                "router_input_layer unset.",
            )


@dataclass
class MoLEConfig(MoELoraConfig):
    """MoLE: sparse top-k (top-1 by default) mixture of LoRA experts (LLaVA-MoLE), with optional null experts
    (AdaMoE) and top-p dynamic routing.

    Args:
        top1_weight: with top_k=1, "straight_through" multiplies the expert output by
            onehot(e*) - sg(p) + p (value 1, gradient reaches the router; LLaVA-MoLE's released code
            multiplies by a constant 1, which starves the router); "prob" scales by p (Switch).
            With top_k > 1 the weights are the softmax renormalized over the chosen experts (Mixtral, MixLoRA).
        eval_routing: "topk" routes as in training; "dense" mixes all experts by p at eval time
            (what LLaVA-MoLE's released inference does).
        router_bias: the router linear has a bias (LLaVA-MoLE: yes).
        num_null_experts: AdaMoE null experts that output zero; top_k then counts real and null picks.
        top_k: experts per token; with top_p, the most a token may get. Unset: 1, or num_experts with top_p.
        top_p: if set, keep the most probable experts until their cumulative probability exceeds top_p
            ("Harder Tasks Need More Experts"), capped at top_k; weights are the raw probabilities.
        router_entropy_loss_coef: weight of the mean router entropy (used with top_p).
        num_experts: experts per routed layer (unset: 4, or the sum of modality_experts).
        modality_experts: modality-aware expert groups (MoMa), e.g. {"text": 2, "image": 2}: names and expert
            counts, in bank order (the first group's experts come first). A token routes only among its group's
            experts, with top_k within the group and a balance loss per group over that group's tokens. The
            modality of a token comes from `input_ids == config.image_token_id` on LLaVA-family models (groups
            "text" and "image"), or from the forward/generate keyword `token_types` ([batch, seq] group indices
            in this dict's order) for any model (docs/methods.md, "Modality-aware expert groups").
        modality_order: the group names in bank order (and the order token_types indexes); unset: the order of
            modality_experts. Saved with the adapter, because adapter_config.json stores dicts with sorted keys.
        plain_lora_modules: target modules (names with suffix match, or a regex, as target_modules) that get one
            plain LoRA of rank r (a single expert, no router) instead of routed experts: LLaVA-MoLE's attention.
    """

    router_granularity: Literal["linear", "block"] = field(
        default="block", metadata={"help": "'block' (LLaVA-MoLE, MixLoRA) or 'linear'."}
    )
    top1_weight: Literal["straight_through", "prob"] = field(
        default="straight_through", metadata={"help": "How a top-1 pick weights its expert."}
    )
    top_k: Optional[int] = field(
        default=None, metadata={"help": "Experts per token (unset: 1; with top_p: num_experts, the cap)."}
    )
    eval_routing: Literal["topk", "dense"] = field(default="topk", metadata={"help": "Routing in eval mode."})
    router_bias: bool = field(default=True, metadata={"help": "Router linear has a bias."})
    num_null_experts: int = field(default=0, metadata={"help": "AdaMoE null experts (output zero)."})
    top_p: Optional[float] = field(default=None, metadata={"help": "Top-p dynamic routing threshold."})
    router_entropy_loss_coef: float = field(default=0.0, metadata={"help": "Router entropy loss weight."})
    num_experts: Optional[int] = field(
        default=None, metadata={"help": "LoRA experts per routed layer (unset: 4, or the sum of modality_experts)."}
    )
    modality_experts: Optional[dict[str, int]] = field(
        default=None, metadata={"help": 'Modality-aware expert groups (MoMa), e.g. {"text": 2, "image": 2}.'}
    )
    modality_order: Optional[list[str]] = field(
        default=None, metadata={"help": "Group names in bank order (unset: modality_experts' order)."}
    )
    plain_lora_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Target modules with one plain LoRA (no router), e.g. attention."}
    )

    _method = "MOLE"

    def __post_init__(self):
        self._resolve_num_experts()
        if self.top_k is None:  # top-p caps at top_k: with top_k=1 it would be plain top-1 routing
            cap = min(self.modality_experts.values()) if self.modality_experts else self.num_experts
            self.top_k = cap if self.top_p is not None and isinstance(cap, int) else 1
        if isinstance(self.plain_lora_modules, (list, tuple, set)) and all(
            isinstance(m, str) for m in self.plain_lora_modules
        ):
            self.plain_lora_modules = sorted(set(self.plain_lora_modules))
        super().__post_init__()

    def _resolve_num_experts(self) -> None:
        groups = self.modality_experts
        if groups is None:
            if self.num_experts is None:
                self.num_experts = 4
            if self.modality_order is not None:
                raise _bad("modality_order", self.modality_order, "it orders modality_experts: set both or neither.")
            return
        if (
            not isinstance(groups, dict)
            or len(groups) < 2
            or not all(isinstance(k, str) and k for k in groups)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in groups.values())
        ):
            raise _bad(
                "modality_experts",
                groups,
                'use a dict of at least two group names and expert counts >= 1, e.g. {"text": 2, "image": 2}.',
            )
        order = list(groups) if self.modality_order is None else list(self.modality_order)
        if sorted(order) != sorted(groups):
            raise _bad(
                "modality_order",
                self.modality_order,
                f"list each group of modality_experts once ({sorted(groups)}), in bank order, or leave it unset.",
            )
        self.modality_order = order
        self.modality_experts = groups = {name: groups[name] for name in order}  # dict order = bank order
        total = sum(groups.values())
        if self.num_experts is None:
            self.num_experts = total
        elif self.num_experts != total:
            raise _bad(
                "num_experts",
                self.num_experts,
                f"modality_experts={groups} has {total} experts in all; leave num_experts unset (it is their sum) "
                f"or set it to {total}.",
            )

    @property
    def group_sizes(self) -> Optional[tuple[int, ...]]:
        """Experts per modality group in bank order, or None without modality groups."""
        return None if self.modality_experts is None else tuple(self.modality_experts.values())

    def _num_null_experts(self) -> int:
        return self.num_null_experts if isinstance(self.num_null_experts, int) else 0

    def _default_router_lr_ratio(self) -> float:
        """0 (routers frozen at init) for plain top-1 token routing, 1 otherwise.

        Issue 23 (docs/quality.md, "Defaults after issue 23"): a top-1 router kept at its random initialization, a
        fixed random partition of the hidden states as in hash routing (Roller et al. 2021, "Hash Layers For Large
        Sparse Models"), scored higher and forgot less than one trained at the experts' lr on both quality suites, and
        varied less across seeds (the faster a top-1 router learns, the worse: docs/quality.md, item 3). Where frozen
        routers were not measured better (top-k > 1, top1_weight="prob", null experts, top-p, sequence routing)
        routers train at lr.
        """
        hashed = (
            self.top_k == 1
            and self.top_p is None
            and self.top1_weight == "straight_through"
            and self._num_null_experts() == 0
            and self.routing_level == "token"
        )
        return 0.0 if hashed else 1.0

    def gate_spread(self) -> int:
        if self.top_p is not None:
            return 1  # raw probabilities, not renormalized: a sharpening router gives the kept experts up to 1
        if self.top_k == 1:
            # straight-through: the weight's value is 1; "prob": p, about 1 / (n + m) under uniform routing
            return 1 if self.top1_weight == "straight_through" else self.num_experts + self._num_null_experts()
        return self.top_k  # renormalized over the picked experts (null experts: over the real ones among top_k)

    def _validate(self) -> None:
        super()._validate()
        if self.top1_weight not in ("straight_through", "prob"):
            raise _bad("top1_weight", self.top1_weight, "use 'straight_through' or 'prob'.")
        if self.eval_routing not in ("topk", "dense"):
            raise _bad("eval_routing", self.eval_routing, "use 'topk' or 'dense'.")
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            raise _bad("num_null_experts", self.num_null_experts, "use an integer >= 0.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "use a probability in (0, 1], or None for plain top-k routing.")
        if self.top_p is not None and self.top_k == 1 and self.num_experts > 1:
            raise _bad(
                "top_k",
                self.top_k,
                "with top_p set, top_k is the most experts a token may get, so top_k=1 is plain top-1 routing; "
                "leave top_k unset (the cap is then num_experts) or set top_k >= 2.",
            )
        if self.top_p is not None and self.num_null_experts:
            raise _bad("top_p", self.top_p, "top-p routing and null experts cannot be combined; drop one of them.")
        if self.router_entropy_loss_coef < 0:
            raise _bad("router_entropy_loss_coef", self.router_entropy_loss_coef, "use a value >= 0.")
        if self.modality_experts is not None:
            smallest = min(self.modality_experts.values())
            if self.top_k > smallest:
                raise _bad(
                    "top_k",
                    self.top_k,
                    f"with modality_experts a token picks top_k experts within its own group, and the smallest "
                    f"group has {smallest}; lower top_k or give every group at least top_k experts.",
                )
            if self.num_null_experts:
                raise _bad(
                    "num_null_experts",
                    self.num_null_experts,
                    "null experts and modality_experts cannot be combined yet; drop one of them.",
                )
            if self.routing_level == "sequence":
                raise _bad(
                    "routing_level",
                    self.routing_level,
                    "modality_experts routes every token within its own modality group, while 'sequence' gives all "
                    "tokens of a sample (image and text) one choice; use routing_level='token' with modality groups.",
                )
        if self.plain_lora_modules is not None and not (
            isinstance(self.plain_lora_modules, str) or all(isinstance(m, str) and m for m in self.plain_lora_modules)
        ):
            raise _bad(
                "plain_lora_modules",
                self.plain_lora_modules,
                'use module names or a regex, as in target_modules, e.g. ["q_proj", "k_proj", "v_proj", "o_proj"].',
            )


@dataclass
class LoRAMoEConfig(MoELoraConfig):
    """LoRAMoE: dense softmax routing over all experts of each linear, with the localized balancing
    constraint (LBC) driven by per-sample types passed as `sample_types` ([batch] long; 1 = world
    knowledge, favouring the first half of the experts; 0 = downstream task, favouring the second half).

    Args:
        blc_alpha: delta of the LBC coefficient matrix I (1 + delta in a sample's half, 1 - delta outside).
        blc_weight: weight of the LBC loss. The released script sets both to 0 (constraint off); our
            defaults (0.1, 0.1) turn it on. With it on, num_experts must be even (two equal halves).
        blc_form: "intended" (default): the squared coefficient of variation of Q / I, zero when a sample's own
            half gets (1 + delta) / (1 - delta) times the other's importance; "released": of I * Q, as the
            released code computes it, which leaves the own half the smaller share (docs/methods.md).
    """

    num_experts: int = field(default=8, metadata={"help": "Experts per linear (released: 8)."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Dense: always num_experts."})
    r: int = field(default=4, metadata={"help": "Rank of each expert (released: 4)."})
    # the usual LoRA alpha = 2r with the gate-aware scaling sqrt(E) (docs/quality.md: at alpha = 2r and "lora" scaling
    # the dense softmax gate ~1/E leaves the experts' update too small to learn the substitution tasks). The released
    # recipe is lora_alpha=32, expert_scaling="lora" (scaling 8 at r=4, E=8).
    lora_alpha: float = field(default=8.0, metadata={"help": "2r; released: 32 with expert_scaling='lora'."})
    expert_scaling: Optional[Literal["lora", "sqrt_gate", "gate"]] = field(
        default=None,
        metadata={"help": "LoRAMoE: None means 'sqrt_gate' (lora_alpha / r * sqrt(num_experts))."},
    )
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "Switch balance loss (off: LoRAMoE uses LBC)."})
    blc_alpha: float = field(default=0.1, metadata={"help": "LBC delta."})
    blc_weight: float = field(default=0.1, metadata={"help": "LBC loss weight."})
    blc_form: Literal["intended", "released"] = field(
        default="intended", metadata={"help": "'intended': CV^2 of Q / I (own half larger); 'released': of I * Q."}
    )

    _method = "LORAMOE"
    _default_expert_scaling = "sqrt_gate"

    def gate_spread(self) -> int:
        return self.num_experts  # a dense softmax over every expert

    def __post_init__(self):
        if self.top_k is None:
            self.top_k = self.num_experts if isinstance(self.num_experts, int) else 1
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        if self.top_k != self.num_experts:
            raise _bad(
                "top_k", self.top_k, f"LoRAMoE routes densely; leave top_k unset or set it to {self.num_experts}."
            )
        if self.router_granularity != "linear":
            raise _bad("router_granularity", self.router_granularity, "LoRAMoE has a router per linear: use 'linear'.")
        if not 0.0 <= self.blc_alpha < 1.0:
            raise _bad("blc_alpha", self.blc_alpha, "use a value in [0, 1).")
        if self.blc_weight < 0:
            raise _bad("blc_weight", self.blc_weight, "use a value >= 0 (0 disables the constraint).")
        if self.blc_form not in LBC_FORMS:
            raise _bad("blc_form", self.blc_form, f"use one of {LBC_FORMS} (docs/methods.md, LoRAMoE).")
        if self.blc_weight > 0 and self.num_experts % 2:
            raise _bad(
                "num_experts",
                self.num_experts,
                "the localized balancing constraint splits the experts into two equal halves (world knowledge, "
                "downstream task); use an even num_experts, or blc_weight=0 to turn the constraint off.",
            )


@dataclass
class SMoRAConfig(MoELoraConfig):
    """SMoRA: one LoRA of rank r whose every rank is a rank-1 expert; each token activates top_k ranks.

    Scores s = sigmoid(W_g x); selection uses s + b, where b is a per-rank bias buffer updated once per
    optimizer step (loss-free balancing, DeepSeek-V3 style) from padding-masked counts all-reduced over
    data-parallel ranks; b never enters the gate values. Gate g_i = k * s_i / sum_selected s_j; the delta
    is scaled by lora_alpha / k.

    Args:
        bias_update_rate: u in b_i += u * sign(mean_count - count_i) (released: 1e-5).
    """

    r: int = field(default=64, metadata={"help": "Total rank = number of rank-1 experts (released: 64)."})
    top_k: int = field(default=8, metadata={"help": "Ranks active per token (released: 8)."})
    num_experts: Optional[int] = field(default=None, metadata={"help": "Always r (each rank is an expert)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling is lora_alpha / top_k (released: 16)."})
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "Off: SMoRA balances with the bias."})
    bias_update_rate: float = field(default=1e-5, metadata={"help": "Loss-free balancing step u."})

    _method = "SMORA"

    def __post_init__(self):
        if self.num_experts is None:
            self.num_experts = self.r
        super().__post_init__()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.top_k

    def _validate(self) -> None:
        if self.num_experts != self.r:
            raise _bad(
                "num_experts", self.num_experts, f"in SMoRA every rank is an expert: leave it unset or use r={self.r}."
            )
        super()._validate()
        if self.router_granularity != "linear":
            raise _bad("router_granularity", self.router_granularity, "SMoRA has a router per linear: use 'linear'.")
        if self.expert_scaling != "lora":
            raise _bad(
                "expert_scaling",
                self.expert_scaling,
                "SMoRA's gates k * s_i / sum s already average 1 and its delta is scaled by lora_alpha / top_k: use "
                "'lora' and set lora_alpha.",
            )
        if self.bias_update_rate < 0:
            raise _bad("bias_update_rate", self.bias_update_rate, "use a value >= 0 (0 disables balancing).")
