"""MHRConfig: multi-head adapter routing (MHR, Caccia et al. 2023), with Poly (Ponti et al. 2023) as n_splits=1."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..._internal.registration import ensure_peft_type
from ..routed.config import ConfigFile, _bad

MODES = ("mhr", "mhr_z", "mhr_mu")


@dataclass
class MHRConfig(ConfigFile):
    """Every adapted linear holds `n_skills` LoRA skills, each split into `n_splits` heads (A along the input
    features, B along the output features), and a task-by-(head, skill) routing matrix Z `[n_tasks, n_splits *
    n_skills]`. For a sample of task t the layer adds one LoRA mixed from the skills, per head, with weights
    `w[h, s] = zhat[h, s] / sum_s zhat[h, s]`, `zhat = sigmoid(Z[t])` (eval) or a relaxed-Bernoulli sample
    (training). Task ids come as the forward/generate keyword `task_ids` (`[batch]`).

    Args:
        r: rank of each skill (and of the mixed task LoRA).
        n_tasks: rows of the routing matrix; task ids must lie in [0, n_tasks).
        n_skills: LoRA skills per layer.
        n_splits: heads per skill; 1 is Poly, > 1 is MHR. Must divide the in and out features of every target.
        mode: "mhr" trains skills and routing; "mhr_z" trains only the routing (skills frozen, e.g. to fit new
            tasks on top of a multi-task adapter); "mhr_mu" drops routing and fine-tunes the average of the skills
            as one LoRA (then n_skills is 1 and task_ids is not needed). Switch with `moe_peft.mhr.set_mode`.
        lora_alpha: the delta is scaled by lora_alpha / r. PEFT's Poly and mttl scale by 1 / r: the default 1.0.
        relaxed_bernoulli: sample the routing in training from RelaxedBernoulli(temperature 1, logits Z[t]) (PEFT's
            Poly, mttl's default); False uses sigmoid(Z[t]) in training too (mttl's T0 MHR configs), which avoids the
            train/eval mismatch.
        init_weights: B = 0 at init, so a new adapter is a no-op; False draws B like A (tests only).
    """

    r: int = field(default=8, metadata={"help": "Rank of each skill."})
    n_tasks: int = field(default=1, metadata={"help": "Number of tasks (rows of the routing matrix)."})
    n_skills: int = field(default=4, metadata={"help": "LoRA skills per layer."})
    n_splits: int = field(default=1, metadata={"help": "Heads per skill: 1 = Poly, > 1 = MHR."})
    mode: Literal["mhr", "mhr_z", "mhr_mu"] = field(default="mhr", metadata={"help": "'mhr', 'mhr_z' or 'mhr_mu'."})
    lora_alpha: float = field(default=1.0, metadata={"help": "Scaling lora_alpha / r (Poly: 1 / r)."})
    relaxed_bernoulli: bool = field(default=True, metadata={"help": "Gumbel-sigmoid routing noise in training."})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at init (adapter starts as a no-op)."})
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("MHR")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def routed(self) -> bool:
        """Whether the adapter routes by task (needs task_ids); MHR-mu is one LoRA for every task."""
        return self.mode != "mhr_mu"

    def _validate(self) -> None:
        for name, example in (("r", 8), ("n_tasks", 4), ("n_skills", 4), ("n_splits", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(name, value, f"use a positive integer, e.g. {name}={example}.")
        if self.mode not in MODES:
            raise _bad("mode", self.mode, f"use one of {MODES}.")
        if self.mode == "mhr_mu" and self.n_skills != 1:
            raise _bad(
                "n_skills",
                self.n_skills,
                "mode='mhr_mu' holds the average of the skills as one LoRA: use n_skills=1, or switch a trained "
                "adapter with moe_peft.mhr.set_mode(model, 'mhr_mu'), which averages the skills for you.",
            )
        if self.lora_alpha <= 0:
            raise _bad("lora_alpha", self.lora_alpha, "use a positive scaling numerator (Poly: 1.0).")
