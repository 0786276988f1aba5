"""RoMA: router-only tuning of pretrained MoE models with routing manifold alignment.

    import moe_peft
    from peft import get_peft_model
    from moe_peft.tuners.roma import RoMAConfig, build_reference, alignment_loss, RoMATrainer

    model = get_peft_model(moe_base, RoMAConfig())              # only the last 5 MoE layers' routers train
    reference = build_reference(model, dataset, tokenizer, collate_fn=collator, cache_dir="out/roma")
    # transformers.Trainer with the regularizer:
    RoMATrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, reference=reference).train()
    # or a plain loop:
    out = model(**batch); loss = out.loss + alignment_loss(model, reference.neighbours(index), step=step)

Equations and choices: docs/methods.md (RoMA).
"""

from .capture import RoutingCapture, pool_routing
from .config import DEFAULT_LEARNING_RATE, RoMAConfig
from .embeddings import task_embeddings
from .layer import RoMARouterLayer
from .loss import Neighbours, alignment_loss, manifold_loss
from .model import RoMAModel, routing_representation
from .reference import (
    RoMAReference,
    build_reference,
    collect_routing,
    exact_match_success,
    knn_weights,
    multiple_choice_success,
)
from .targets import SUPPORTED_ARCHITECTURES, find_routers


def __getattr__(name: str):
    # the trainers import transformers.Trainer: load them on first use only
    if name in ("RoMATrainer", "RoMALossMixin", "RoMACollator", "with_roma_index"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_LEARNING_RATE",
    "SUPPORTED_ARCHITECTURES",
    "Neighbours",
    "RoMAConfig",
    "RoMACollator",
    "RoMALossMixin",
    "RoMAModel",
    "RoMAReference",
    "RoMARouterLayer",
    "RoMATrainer",
    "RoutingCapture",
    "alignment_loss",
    "build_reference",
    "collect_routing",
    "exact_match_success",
    "find_routers",
    "knn_weights",
    "manifold_loss",
    "multiple_choice_success",
    "pool_routing",
    "routing_representation",
    "task_embeddings",
    "with_roma_index",
]
