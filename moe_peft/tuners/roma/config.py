"""RoMAConfig: router-only tuning of a pretrained MoE model with routing manifold alignment.

Flat, typed and validated like moe_peft/config.py: every field maps one-to-one onto a key of
`adapter_config.json` and of configs/roma.yaml. Equations and sources: docs/methods.md (RoMA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..._internal.registration import ensure_peft_type
from ..routed.config import ConfigFile, _bad

REPRESENTATIONS = ("last", "mean")
KERNELS = ("cosine", "euclidean")
# The released script's learning rate (methods-reference.md 6.2). It belongs to the trainer, not to the
# adapter: pass it as TrainingArguments(learning_rate=...) or to your optimizer.
DEFAULT_LEARNING_RATE = 7e-5


@dataclass
class RoMAConfig(ConfigFile):
    """RoMA (routing manifold alignment): fine-tune only the routers of a pretrained MoE LLM, pulling each
    sample's routing toward that of its successful neighbours in a task-embedding space (paper section 4):

        L(i) = CE(i) + lambda(t) * sum_{j in N(i)} W_ij ||r_i - r_j||^2

    Args:
        target_routers: router modules to tune. None detects them by architecture (see
            `moe_peft.roma.SUPPORTED_ARCHITECTURES`); otherwise module names (suffix match, e.g. ["mlp.gate"])
            or a regex of full module names. A router must hold `weight [num_experts, hidden]` and return its
            logits (or a tuple whose first element is the logits).
        layers: decoder-layer indices whose routers are tuned. None: the last `num_last_layers` MoE layers.
        num_last_layers: with layers=None, tune the routers of this many last MoE layers (paper and released
            script: 5; None = all MoE layers).
        representation: r_i per tuned layer: the routing softmax at the sample's last non-padding token
            ("last", the paper's choice) or its mean over the non-padding tokens ("mean").
        num_neighbours: k, the successful neighbours of each sample (released: 5; the paper's ablation
            prefers 3).
        sigma: width of the Gaussian kernel on the task-embedding distance (released: 0.4).
        kernel: "cosine" weights a neighbour by exp(-(1 - cos)^2 / (2 sigma^2)) (the released code, whose
            sigma 0.4 is tuned for it); "euclidean" by exp(-||e_i - e_j||^2 / (2 sigma^2)) on unit vectors
            (the paper's equation). Weights are normalized over the k neighbours.
        lambda_reg: weight of the manifold term (released: 0.8).
        lambda_warmup_steps: lambda grows linearly, lambda(t) = lambda_reg * min(1, (t + 1) / warmup)
            (released: 2000 steps; 0 disables the warmup).
        embedding_model: path of a sentence-transformers model directory for the task embeddings (the
            released code uses all-MiniLM-L6-v2; needs the optional `moe-peft[roma]` extra). None: the frozen
            base model's mean-pooled last hidden state.
        reference_refresh_steps: recompute the neighbours' routing r_j with the model being trained every this
            many optimizer steps (RoMATrainer); 0 keeps the reference of the pretrained model (the paper).

    The learning rate belongs to the trainer; the released default is 7e-5 (`DEFAULT_LEARNING_RATE`).
    """

    target_routers: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Router module names (suffix match) or a regex; None = detect by architecture."}
    )
    layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Decoder-layer indices to tune; None = the last num_last_layers MoE layers."}
    )
    num_last_layers: Optional[int] = field(
        default=5, metadata={"help": "With layers=None: how many last MoE layers to tune (None = all)."}
    )
    representation: Literal["last", "mean"] = field(
        default="last", metadata={"help": "Routing at the last non-padding token, or mean over non-padding tokens."}
    )
    num_neighbours: int = field(default=5, metadata={"help": "k successful neighbours per sample."})
    sigma: float = field(default=0.4, metadata={"help": "Gaussian kernel width."})
    kernel: Literal["cosine", "euclidean"] = field(
        default="cosine", metadata={"help": "'cosine' (released code) or 'euclidean' (paper) kernel distance."}
    )
    lambda_reg: float = field(default=0.8, metadata={"help": "Weight of the manifold regularizer."})
    lambda_warmup_steps: int = field(default=2000, metadata={"help": "Linear warmup of lambda, in optimizer steps."})
    embedding_model: Optional[str] = field(
        default=None, metadata={"help": "sentence-transformers model dir; None = base model mean-pooled states."}
    )
    reference_refresh_steps: int = field(
        default=0, metadata={"help": "Refresh the neighbours' routing every N steps (0 = never)."}
    )

    # PEFT's injection reads these attributes of every config; RoMA resolves its targets from target_routers
    # (class attributes, not fields: they are not saved)
    target_modules = None
    exclude_modules = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("ROMA")
        if isinstance(self.target_routers, (list, tuple, set)):
            self.target_routers = list(self.target_routers)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self._validate()

    def _validate(self) -> None:
        if self.target_routers is not None and not (
            isinstance(self.target_routers, str) or all(isinstance(t, str) and t for t in self.target_routers)
        ):
            raise _bad("target_routers", self.target_routers, "use None, a regex, or a list of module names.")
        if self.target_routers is not None and len(self.target_routers) == 0:
            raise _bad("target_routers", self.target_routers, "use None to detect the routers, or name at least one.")
        if self.layers is not None and (
            not isinstance(self.layers, list) or not self.layers or not all(isinstance(i, int) for i in self.layers)
        ):
            raise _bad("layers", self.layers, "use None or a non-empty list of decoder-layer indices, e.g. [11, 12].")
        if self.num_last_layers is not None and (not isinstance(self.num_last_layers, int) or self.num_last_layers < 1):
            raise _bad("num_last_layers", self.num_last_layers, "use a positive integer (paper: 5) or None for all.")
        if self.representation not in REPRESENTATIONS:
            raise _bad("representation", self.representation, f"use one of {REPRESENTATIONS}.")
        if not isinstance(self.num_neighbours, int) or self.num_neighbours < 1:
            raise _bad("num_neighbours", self.num_neighbours, "use a positive integer (released: 5).")
        if not self.sigma > 0:
            raise _bad("sigma", self.sigma, "the kernel width must be > 0 (released: 0.4).")
        if self.kernel not in KERNELS:
            raise _bad("kernel", self.kernel, f"use one of {KERNELS}.")
        if not self.lambda_reg >= 0:
            raise _bad("lambda_reg", self.lambda_reg, "use a value >= 0 (0 is plain router fine-tuning).")
        if not isinstance(self.lambda_warmup_steps, int) or self.lambda_warmup_steps < 0:
            raise _bad("lambda_warmup_steps", self.lambda_warmup_steps, "use an integer >= 0 (0 = no warmup).")
        if not isinstance(self.reference_refresh_steps, int) or self.reference_refresh_steps < 0:
            raise _bad("reference_refresh_steps", self.reference_refresh_steps, "use an integer >= 0 (0 = never).")

    def lambda_at(self, step: Optional[int]) -> float:
        """lambda(t) = lambda_reg * min(1, (t + 1) / warmup), as released; step None means fully warmed up."""
        if step is None or self.lambda_warmup_steps == 0:
            return float(self.lambda_reg)
        return float(self.lambda_reg) * min(1.0, (step + 1) / self.lambda_warmup_steps)
