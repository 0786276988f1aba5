"""Plumbing every layer may use, and that uses no other part of moe-peft: atomic writes (atomic.py), adapter state
dict keys under wrapped models and without the adapter name (state_dict.py), target entries that match nothing
(targets.py), the one place that knows PEFT's private tables (registration.py), how router losses count under
gradient accumulation (accumulation.py), what a layer may do with a quantized base (quantized.py), and the
deprecated module paths of the 0.1 layout (compat.py).

Nothing here is public API: the names users need are re-exported from `moe_peft`.
"""
