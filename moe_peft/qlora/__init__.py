"""Quantized base layers (QLoRA): bitsandbytes `Linear4bit` (NF4/FP4, double quantization) and `Linear8bitLt` under
every moe-peft method.

    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))
    base = peft.prepare_model_for_kbit_training(base)          # optional, as with PEFT LoRA
    model = get_peft_model(base, moe_peft.MoLEConfig(...))     # any method: the experts are fp32, the base stays packed
    merged = moe_peft.qlora.dequantize_base(model)             # only to merge: dense bases first, then merge_and_unload()

The rule (base.py): a moe-peft layer computes the base linear itself (the fused base + experts op) only for a plain
`nn.Linear` with a dense floating-point weight; every other base layer, bitsandbytes' included (they subclass
`nn.Linear` but hold packed weights), runs its own forward and the experts are added to its output. Merging into a
packed weight is refused with an error that says how to dequantize first.
"""

from .base import dense_linear, dequantize_base, dequantized_weight, is_quantized, refuse_quantized_merge

__all__ = ["dense_linear", "dequantize_base", "dequantized_weight", "is_quantized", "refuse_quantized_merge"]
