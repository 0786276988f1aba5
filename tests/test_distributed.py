"""Data parallelism on CPU: 2 processes (torchrun, gloo) of DDP through accelerate, FSDP1 and FSDP2 (torch's
FullyShardedDataParallel and fully_shard) and DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator), every method
(PHATGOOSE as a library and as step 2's gate training, RoMA with its alignment term), against one process on the same
global batch (tests/distributed_worker.py)."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from . import distributed_worker as worker

ROUTED = ["mole_top1", "mole_null_top2", "smora", "experts"]  # token-routed: some expert idles on some rank
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = ["ddp", "fsdp1", "fsdp2"] + (["zero2", "zero3"] if HAS_DEEPSPEED else [])
# DDP and FSDP reduce the two ranks' gradients as one process sums the two halves: equal bit for bit in practice.
# ZeRO-2 too (with DeepSpeed's default gradient clipping at norm 1.0 turned off, as the reference does not clip).
# ZeRO-3 reduces flattened partitions in another order; AdamW divides a gradient by its own running size, so an
# element whose gradient is nearly zero turns a 1e-7 difference into a larger one (measured up to 1.5e-5).
ATOL = {"ddp": 1e-7, "fsdp1": 1e-7, "fsdp2": 1e-7, "zero2": 1e-7, "zero3": 1e-4}


def _launch(out: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo)
    env.pop("TRITON_INTERPRET", None)
    with socket.socket() as sock:  # a free port: `--standalone` (c10d rendezvous) made the ZeRO-3 steps 5x slower
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(worker.WORLD),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        os.path.join(os.path.dirname(__file__), "distributed_worker.py"), "--out", out, "--engines", *ENGINES,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch (process start-up is most of the time): every engine, every method."""
    out = str(tmp_path_factory.mktemp("distributed"))
    _launch(out)
    return out


@pytest.fixture(params=["ddp", "fsdp1", "fsdp2", "zero2", "zero3"])
def run(request, launched):
    if request.param not in ENGINES:
        pytest.skip("DeepSpeed is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return request.param, os.path.join(launched, request.param)


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize("method", worker.METHODS)
def test_every_rank_ends_with_the_single_process_adapter(run, method, references):
    engine, out = run
    if method not in references:
        references[method] = worker.reference(method)
    want = references[method]
    ranks = [os.path.join(out, method, f"rank{r}") for r in range(worker.WORLD)]
    # the saved adapter (PHATGOOSE step 2: the gates file) is the same file from every rank
    files = worker.saved_files(method)
    for name in files:
        assert filecmp.cmp(os.path.join(ranks[0], name), os.path.join(ranks[1], name), shallow=False), name
    saved = load_file(os.path.join(ranks[0], files[0]))
    assert saved.keys() == want["state"].keys()
    start = worker.adapter_state(worker.build(method))
    for key, value in saved.items():  # equal to one process on the global batch (in practice bit for bit)
        torch.testing.assert_close(value, want["state"][key], rtol=1e-6, atol=ATOL[engine], msg=key)
    assert any(not torch.equal(saved[k], start[k]) for k in saved)  # it trained
    records = [torch.load(os.path.join(d, "record.pt")) for d in ranks]
    for rank, record in enumerate(records):  # each rank's loss is the reference's loss on that half
        torch.testing.assert_close(record["losses"], [step[rank] for step in want["losses"]], rtol=1e-6, atol=1e-6)
        # RoMA: each rank's alignment term is the reference's on that rank's rows (per rank, as one process computes
        # it per accumulated micro-batch); the other methods have none
        want_aux = [step[rank] for step in want["aux"]]
        if method == "roma":
            assert all(a > 0 for a in record["aux"]), record["aux"]
            torch.testing.assert_close(record["aux"], want_aux, rtol=1e-5, atol=1e-6)
        else:
            assert record["aux"] == want_aux == [None] * worker.STEPS
    if method == "smora":  # counts all-reduced: every rank moves its selection biases as one process would
        assert records[0]["biases"] and all(b.abs().max() > 0 for b in records[0]["biases"].values())
        for key, bias in want["biases"].items():
            assert torch.equal(records[0]["biases"][key], records[1]["biases"][key]), key
            torch.testing.assert_close(records[0]["biases"][key], bias, rtol=0, atol=1e-7, msg=key)  # same counts
    if method in ROUTED:  # some expert got tokens on one rank and none on the other, and no unused-parameter error
        counts = [records[r]["counts"] for r in range(worker.WORLD)]
        assert counts[0], "no routing recorded"
        assert any((a == 0) != (b == 0) for layer in counts[0] for a, b in zip(counts[0][layer], counts[1][layer])), (
            counts
        )
    if method == "mole_top1":  # experts 6 and 7 are unreachable on every rank
        assert all(c[6] == c[7] == 0 for r in range(worker.WORLD) for c in records[r]["counts"].values())


@pytest.mark.parametrize(
    "name,kind,key,value",
    [
        ("ddp", "MULTI_GPU", None, None),
        ("fsdp1", "FSDP", "fsdp_version", 1),
        ("fsdp2", "FSDP", "fsdp_version", 2),
        ("deepspeed_zero2", "DEEPSPEED", "zero_stage", 2),
        ("deepspeed_zero3", "DEEPSPEED", "zero_stage", 3),
    ],
)
def test_accelerate_configs_load(name, kind, key, value):
    """configs/accelerate/*.yaml are what `accelerate launch --config_file` reads (they run on GPUs only)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "accelerate", f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type.name == kind and not config.use_cpu
    if key is not None:
        engine = config.fsdp_config if kind == "FSDP" else config.deepspeed_config
        assert engine[key] == value
