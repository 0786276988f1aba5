"""Many adapters of one base in one batch, for serving and for training, through the fused op.

    import moe_peft
    from moe_peft import multi_lora

    model = PeftModel.from_pretrained(base, "adapters/support", adapter_name="support")
    model.load_adapter("adapters/legal", adapter_name="legal")
    multi_lora.enable(model)                      # PEFT's `adapter_names`, one op call per adapted linear
    model.generate(**batch, adapter_names=["support", "legal", "__base__", "support"])

    multi_lora.enable(model, training=True)      # train them all at once, each sample its own adapter
    out = model(**batch, adapter_names=names)
    loss, per_adapter = multi_lora.per_adapter_loss(out, labels, names)   # gradient of each = alone on its samples
    multi_lora.save_adapters(model, "out")       # out/<adapter>/, each loadable by plain PEFT
    # or: multi_lora.Trainer(model=model, args=..., train_dataset=<rows with an "adapter" column>, ...)

PEFT LoRA adapters (any ranks, alphas, rsLoRA; `"__base__"` rows) and several adapters of one moe-peft method
(MoLE, LoRAMoE, SMoRA: each sample routed within its own adapter's experts) both work.

Layout: selection.py (the names as tensors), enable.py (the hooks that carry them), bank.py (several adapters
as one expert bank), lora.py (PEFT LoRA layers), moe.py (moe-peft layers), training.py (loss, clipping, saving
per adapter), trainer.py (the transformers.Trainer subclass).
"""

from . import moe  # noqa: F401  (registers the routed layer's mixed-batch hook)
from .enable import disable, enable, is_enabled
from .selection import BASE, AdapterSelection
from .training import adapter_parameters, clip_grad_norm_per_adapter, per_adapter_loss, save_adapters

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "per_adapter_loss",
    "clip_grad_norm_per_adapter",
    "adapter_parameters",
    "save_adapters",
    "Trainer",
    "AdapterCollator",
    "AdapterSelection",
    "BASE",
]


def __getattr__(name: str):
    # the Trainer imports transformers.Trainer: load it on first use only
    if name in ("Trainer", "AdapterCollator"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
