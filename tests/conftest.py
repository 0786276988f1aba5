"""Shared fixtures: tiny models built from configs and one table of method cases (a new router is one row)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# The Triton kernels run on CPU tensors through Triton's interpreter, which Triton decides when it is first
# imported (peft imports it), so this comes before `import moe_peft`. With a GPU the gpu-marked tests run
# the compiled kernels instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Triton < 3.7's interpreter converts 1-element arrays to ints, which NumPy >= 2.4 refuses: every interpreted
    kernel would fail with 'only 0-dimensional arrays can be converted to Python scalars'. Say so once instead."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
        from packaging.version import Version
    except ImportError:
        return
    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1, how the kernel tests run on CPU) does not "
            f'work with numpy {numpy.__version__}: pip install "numpy<2.4" (or triton >= 3.7).'
        )


# One thread: tiny models gain nothing from more, and on a shared machine extra threads fight other processes
# for the cores (the suite took 482 s instead of 73 s with torch's default). MOE_PEFT_THREADS raises it; the
# environment variable also reaches the fresh processes some tests start.
THREADS = int(os.environ.setdefault("MOE_PEFT_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

from hypothesis import settings  # noqa: E402

# hypothesis: "ci" (default) runs a fixed, derandomized set of examples, small enough for CI; "thorough" runs 20x more
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import moe_peft  # noqa: E402
from moe_peft.bases import tiny_llama  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

warnings.filterwarnings("ignore", category=FutureWarning)

MLP = ["gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def make_config(case: str, **overrides):
    """The method x routing cases every contract test runs over."""
    cases = {
        # routers that train (router_lr_ratio=1): the contract's router-gradient checks need them; top-1's default,
        # routers frozen at init, is covered by test_router_lr_ratio.py (and by DDP/FSDP/ZeRO in test_distributed.py)
        "mole_block": lambda: moe_peft.MoLEConfig(
            r=4, num_experts=4, top_k=1, target_modules=MLP, router_z_loss_coef=1e-3, router_lr_ratio=1.0
        ),
        "mole_linear_top2": lambda: moe_peft.MoLEConfig(
            r=4, num_experts=4, top_k=2, router_granularity="linear", target_modules=MLP + ["q_proj", "v_proj"]
        ),
        "mole_null": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, num_null_experts=2, target_modules=MLP),
        "mole_top_p": lambda: moe_peft.MoLEConfig(
            r=4, num_experts=4, top_k=3, top_p=0.5, target_modules=MLP, router_entropy_loss_coef=1e-2
        ),
        "loramoe": lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP),
        "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, router_aux_loss_coef=1e-2),
    }
    config = cases[case]()
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


CASES = ["mole_block", "mole_linear_top2", "mole_null", "mole_top_p", "loramoe", "smora"]


@pytest.fixture(scope="session", autouse=True)
def tiny_base_cache(tmp_path_factory):
    """`model: tiny` bases are built once per test session, in a temporary cache (not the user's ~/.cache)."""
    if "MOE_PEFT_CACHE" not in os.environ:
        os.environ["MOE_PEFT_CACHE"] = str(tmp_path_factory.mktemp("moe_peft_cache"))
    return os.environ["MOE_PEFT_CACHE"]


@pytest.fixture
def base():
    return tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # left padding in the last row
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def randomize_experts(model, std: float = 0.1, seed: int = 1) -> None:
    """Give B non-zero values so an adapter changes the output (B = 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def train_mode(model, checkpointing: bool = False, reentrant: bool = True):
    """Put a PEFT model in training mode with zeroed gradients, with gradient checkpointing if asked."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    model.train()
    model.zero_grad()
    return model


def checkpointed_grads(model, reentrant: bool, loss) -> dict:
    """Gradients of `loss(model)` with gradient checkpointing, after checking that they equal the gradients
    without it (computed on a deep copy taken first): the same set of parameters, the same values."""
    import copy

    reference = copy.deepcopy(model)
    grads = []
    for m, checkpointing in ((reference, False), (model, True)):
        train_mode(m, checkpointing, reentrant)
        loss(m).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    want, got = grads
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    return got
