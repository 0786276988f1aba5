"""Routing statistics: the summary formulas against hand values, the probe against per-token loops over the routers'
own decisions, collect/plots, and RoutingStatsCallback in a real Trainer (logs, report_to, SMoRA's bias update)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import moe_peft
from moe_peft.bases import tiny_llama, tiny_moe
from moe_peft.stats import RoutingProbe, collect, load_cv, max_load, normalized_entropy, summarize
from moe_peft.stats.summary import Totals
from moe_peft.train import RoutingStatsCallback

from .conftest import MLP, VOCAB


# -- the formulas ---------------------------------------------------------------------------------------------------
def test_summary_formulas_on_hand_values():
    assert load_cv(torch.tensor([0.25, 0.25, 0.25, 0.25])) == 0.0
    assert load_cv(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(1.0)  # mean 0.25, std 0.25
    assert load_cv(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(math.sqrt(3))  # sqrt(E - 1)
    assert max_load(torch.tensor([0.5, 0.25, 0.25, 0.0])) == pytest.approx(2.0)
    ent = normalized_entropy(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    torch.testing.assert_close(ent, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))  # log 2 / log 4
    totals = Totals.zeros(1, 4, "cpu")
    totals.counts += torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    totals.tokens += 2
    totals.picks += 4
    totals.slots += 6
    totals.null += 2
    totals.has_null = True
    s = summarize(totals)
    assert (
        s["load"] == [0.75, 0.25, 0.0, 0.0]
        and s["experts_per_token"] == 2.0
        and s["null_fraction"] == pytest.approx(1 / 3)
    )
    assert s["entropy"] is None  # no router distribution was recorded


# -- the probe against the routers' own decisions -------------------------------------------------------------------
def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding
    mask[0, 7:] = 0  # right padding
    return ids, mask


def _hand_totals(routings: list, mask: torch.Tensor, num_experts: int, dense: bool, null: bool):
    """Per-token loop over the recorded Routing objects of one layer (padding excluded)."""
    keep = mask.reshape(-1).bool().tolist()
    counts, picks, tokens, nulls, slots, entropy = [0.0] * num_experts, 0, 0, 0, 0, 0.0
    for r in routings:
        for t, kept in enumerate(keep):
            if not kept:
                continue
            tokens += 1
            p = r.probs[t].double()
            if p.numel() > 1:
                entropy += float(-(p * p.clamp_min(1e-30).log()).sum() / math.log(p.numel()))
            for slot in range(r.idx.shape[1]):
                e = int(r.idx[t, slot])
                slots += 1
                if e < 0:
                    nulls += 1
                    continue
                picks += 1
                counts[e] += float(r.weights[t, slot]) if dense else 1.0
    total = sum(counts)
    return {
        "load": [c / total for c in counts],
        "experts_per_token": picks / tokens,
        "null_fraction": nulls / slots if null else None,
        "entropy": entropy / tokens,
    }


@pytest.mark.parametrize("case", ["mole_null", "mole_top_p", "loramoe", "smora"])
def test_probe_matches_a_per_token_loop(case):
    from .conftest import make_config

    config = make_config(case)
    model = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2), config)
    model.eval()
    recorded: dict[str, list] = {}
    handles = []
    for name, module, _ in moe_peft.stats.routed_modules(model):
        handles.append(
            module.register_forward_hook(lambda m, i, out, name=name: recorded.setdefault(name, []).append(out))
        )
    probe = RoutingProbe(model)
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    totals, _, forwards = probe.take()
    probe.remove()
    for h in handles:
        h.remove()
    assert forwards == 1 and totals.keys() == recorded.keys()
    dense = case == "loramoe"
    for name, routings in recorded.items():
        num_experts = totals[name].counts.shape[1]
        if case == "smora":  # SMoRA's sigmoid scores are normalized for the entropy
            routings = [
                SimpleNamespace(idx=r.idx, weights=r.weights, probs=r.probs / r.probs.sum(-1, keepdim=True))
                for r in routings
            ]
        want = _hand_totals(routings, mask, num_experts, dense, null=case == "mole_null")
        got = summarize(totals[name])
        assert got["load"] == pytest.approx(want["load"], abs=1e-6), name
        assert got["experts_per_token"] == pytest.approx(want["experts_per_token"]), name
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-9), name
        assert got["null_fraction"] == (None if want["null_fraction"] is None else pytest.approx(want["null_fraction"]))
        assert got["tokens"] == int(mask.sum())


@pytest.mark.parametrize("case, reentrant", [("mole_block", True), ("mole_block", False), ("smora", False)])
def test_probe_counts_a_checkpointed_forward_once(case, reentrant):
    """Non-reentrant checkpointing requires the recomputation to save what the first forward saved: the probe,
    active only in the first, computes under no_grad (SMoRA's normalized scores raised a CheckpointError before)."""
    from .conftest import make_config, train_mode

    model = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48), make_config(case))
    train_mode(model, checkpointing=True, reentrant=reentrant)
    probe = RoutingProbe(model, train_only=True)
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # layers recomputed in backward
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # not a training forward
    totals, router_loss, forwards = probe.take()
    probe.remove()
    assert forwards == 1 and router_loss is not None
    assert all(int(t.tokens.sum()) == int(mask.sum()) for t in totals.values())


# -- collect ----------------------------------------------------------------------------------------------------------
def _mole_model():
    config = moe_peft.MoLEConfig(r=4, num_experts=4, top_k=2, target_modules=MLP, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2), config)
    return model.eval()


def _token_rows(n=12):
    g = torch.Generator().manual_seed(1)
    tasks = ["a", "b", "c"]
    return [
        {
            "input_ids": torch.randint(4, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist(),
            "task": tasks[i % 3],
        }
        for i in range(n)
    ]


def test_collect_by_task_equals_one_collect_per_task():
    model, rows = _mole_model(), _token_rows()
    stats = collect(model, rows, by="task", batch_size=5)  # batches mix the tasks
    assert stats.groups == ["a", "b", "c"]
    for task in stats.groups:
        alone = collect(model, [r for r in rows if r["task"] == task], by=None, batch_size=3)
        for layer in stats.layers:
            assert stats.layer(layer, task)["load"] == pytest.approx(alone.layer(layer)["load"], abs=1e-6)
            assert stats.layer(layer, task)["tokens"] == alone.layer(layer)["tokens"]
    whole = collect(model, rows, by=None, batch_size=4)
    for layer in stats.layers:
        assert stats.layer(layer)["load"] == pytest.approx(whole.layer(layer)["load"], abs=1e-6)


def test_collect_mhr_per_task_is_the_task_skill_mix():
    config = moe_peft.MHRConfig(r=4, n_tasks=3, n_skills=4, n_splits=2, target_modules=MLP, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "task_logits" in name:
                p.normal_()  # tasks that route differently
    rows = [{"input_ids": r["input_ids"], "task_ids": i % 3} for i, r in enumerate(_token_rows())]
    stats = collect(model, rows, by="task", task_names=["x", "y", "z"])
    tuner = model.base_model
    for name, layer in tuner.layers():
        want = layer.mhr_router["default"].eval_weights(1).mean(0)  # [H, S] -> [S]
        assert stats.layer(name, "y")["load"] == pytest.approx(want.tolist(), abs=1e-5)


def test_collect_phatgoose_matches_the_layers_own_load(tmp_path):
    from peft import LoraConfig

    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48)
    dirs = []
    for i in range(3):
        expert = get_peft_model(
            tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48),
            LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        moe_peft.phatgoose.save_gates(
            {n: torch.randn(32) for n in moe_peft.tuners.phatgoose.gates.lora_layers(expert, "default")},
            tmp_path / f"e{i}",
        )
        expert.save_pretrained(tmp_path / f"e{i}")
        dirs.append(tmp_path / f"e{i}")
    library = moe_peft.phatgoose.assemble(base, dirs, top_k=2).eval()
    ids, mask = _batch()
    stats = collect(library, [{"input_ids": ids[i][mask[i].bool()].tolist()} for i in range(3)], by=None, batch_size=3)
    with torch.no_grad():  # the same rows, right-padded as collect pads them
        library(**_right_padded(ids, mask))
    own = moe_peft.phatgoose.expert_load(library)
    for name in stats.layers:
        assert stats.layer(name)["load"] == pytest.approx(own[name], abs=1e-6)
        assert stats.layer(name)["experts_per_token"] == pytest.approx(2.0)


def _right_padded(ids, mask):
    rows = [ids[i][mask[i].bool()] for i in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    m = torch.zeros_like(out)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        m[i, : len(r)] = 1
    return {"input_ids": out, "attention_mask": m}


def test_collect_roma_reads_the_base_routers():
    model = get_peft_model(
        tiny_moe("mixtral", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_experts=4, top_k=2),
        moe_peft.RoMAConfig(),
    ).eval()
    recorded = {}
    handles = [
        m.register_forward_hook(lambda mod, i, out, n=n: recorded.__setitem__(n, out))
        for n, m, _ in moe_peft.stats.routed_modules(model)
    ]
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    stats = collect(model, [{"input_ids": r.tolist()} for r in ids], by=None)
    for h in handles:
        h.remove()
    for name, (_, _, idx) in recorded.items():
        want = torch.bincount(idx.reshape(-1), minlength=4).double()
        assert stats.layer(name)["load"] == pytest.approx((want / want.sum()).tolist(), abs=1e-6)
        assert stats.layer(name)["experts_per_token"] == pytest.approx(2.0)


def test_save_writes_json_and_readable_plots(tmp_path):
    from PIL import Image

    stats = collect(_mole_model(), _token_rows(), by="task")
    paths = stats.save(str(tmp_path))
    assert {"json", "expert_load", "routing_by_task", "experts_per_token"} <= set(paths)
    saved = json.loads((tmp_path / "stats.json").read_text())
    layer = stats.layers[0]
    assert saved["layers"][layer]["load"] == stats.layer(layer)["load"]
    assert saved["layers"][layer]["by_task"]["b"]["tokens"] == stats.layer(layer, "b")["tokens"]
    for key in ("expert_load", "routing_by_task", "experts_per_token"):
        with Image.open(paths[key]) as image:
            assert image.size[0] > 100 and image.size[1] > 100


# -- RoutingStatsCallback in a real Trainer --------------------------------------------------------------------------
def _samples(n=8, seq=7):
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


class _Reporter(TrainerCallback):
    """Stands for TensorBoard / W&B: a callback listed before the ones passed in callbacks= sees the logs as sent."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _trainer(model, tmp_path, **changes):
    fields = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    fields.update(changes)
    return Trainer(model=model, args=TrainingArguments(**fields), train_dataset=_samples())


def test_callback_logs_reach_the_reporters_and_the_history(tmp_path):
    model = _mole_model()
    losses = []
    model.base_model.model.register_forward_hook(
        lambda m, a, out: losses.append(float(out["router_loss"])) if torch.is_grad_enabled() else None
    )
    trainer = _trainer(model, tmp_path)
    reporter = _Reporter()
    trainer.callback_handler.callbacks.insert(1, reporter)  # where report_to's callbacks sit
    RoutingStatsCallback.attach(trainer)
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 2
    for i, log in enumerate(logged):
        assert log["router_loss"] == pytest.approx(sum(losses[2 * i : 2 * i + 2]) / 2, rel=1e-5)  # mean of the window
        for stat in ("load_cv", "max_load", "entropy", "experts_per_token"):
            assert f"routing/mean/{stat}" in log
        assert log["routing/L0.mlp/experts_per_token"] == pytest.approx(2.0)
    sent = [log for log in reporter.seen if "loss" in log]
    assert all("routing/mean/load_cv" in log and "router_loss" in log for log in sent)


def test_callback_per_layer_values_equal_routing_stats(tmp_path):
    model = _mole_model()
    loads = []
    model.base_model.model.register_forward_hook(
        lambda m, a, out: loads.append(moe_peft.routing_stats(model, "default")) if torch.is_grad_enabled() else None
    )
    trainer = _trainer(model, tmp_path, logging_steps=1, max_steps=2)
    RoutingStatsCallback.attach(trainer)
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == len(loads) == 2 and len(loads[0]) == 2  # two windows; one router per MLP block
    for log, stats in zip(logged, loads):  # one forward per window
        for layer, st in stats.items():
            short = layer.replace("model.layers.", "L").rsplit(".", 1)[0]  # block routing: the MLP's router
            assert log[f"routing/{short}/load_cv"] == pytest.approx(load_cv(torch.tensor(st["load"])), abs=1e-6)


def test_callback_passed_in_callbacks_warns(tmp_path):
    model = _mole_model()
    trainer = Trainer(
        model=model, args=_trainer(model, tmp_path, max_steps=1, logging_steps=1).args, train_dataset=_samples(),
        callbacks=[RoutingStatsCallback()],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="attach"):
        trainer.train()
    assert "routing/mean/load_cv" in trainer.state.log_history[0]  # the history still gets them


def _smora_model(rate=1e-2):
    config = moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, bias_update_rate=rate, task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48), config)


class _PendingCounts(TrainerCallback):
    """The counts each optimizer step's bias update must use, read just before the step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: m.__dict__["_pending_counts"]["default"].clone() for n, m in _smora_layers(model)})


def _smora_layers(model):
    from moe_peft.tuners.routed.layer import MoELoraLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoraLinear)]


def test_smora_bias_moves_once_per_optimizer_step_with_the_callback(tmp_path):
    model = _smora_model()
    pending = _PendingCounts()
    trainer = _trainer(model, tmp_path, max_steps=3, gradient_accumulation_steps=2, logging_steps=1)
    trainer.add_callback(pending)
    callback = RoutingStatsCallback.attach(trainer)
    trainer.train()
    assert len(pending.steps) == 3
    for name, layer in _smora_layers(model):
        want = torch.zeros(8)
        for counts in pending.steps:  # b += u * sign(mean - count), once per step, from both micro-batches' counts
            c = counts[name].float()
            want += 1e-2 * torch.sign(c.mean() - c)
        torch.testing.assert_close(layer.routers["default"].selection_bias, want, rtol=0, atol=1e-7)
    assert callback.bias_updates == 0  # the step hook had applied them: the callback's call was a no-op


def test_callback_applies_pending_counts_unless_the_step_was_skipped():
    model = _smora_model()
    model.train()
    ids, mask = _batch()
    model(
        input_ids=ids, attention_mask=mask
    )  # counts pending, no optimizer step (e.g. an optimizer outside torch.optim)
    layer = _smora_layers(model)[0][1]
    callback = RoutingStatsCallback()
    callback.on_step_end(None, None, None, model=model, optimizer=SimpleNamespace(step_was_skipped=True))
    assert torch.count_nonzero(layer.routers["default"].selection_bias) == 0  # a skipped step updates nothing
    callback.on_step_end(None, None, None, model=model, optimizer=SimpleNamespace(step_was_skipped=False))
    moved = layer.routers["default"].selection_bias.clone()
    assert torch.count_nonzero(moved) > 0 and callback.bias_updates == 1
    callback.on_step_end(None, None, None, model=model, optimizer=SimpleNamespace(step_was_skipped=False))
    assert torch.equal(layer.routers["default"].selection_bias, moved)  # counts are consumed: no double update


def test_moe_sft_trainer_adds_the_callback_first(tmp_path):
    from trl import SFTConfig

    from moe_peft.bases import char_tokenizer
    from moe_peft.train import MoESFTTrainer

    tok = char_tokenizer()
    trainer = MoESFTTrainer(
        model=tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48),
        args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], bf16=False, gradient_checkpointing=False),
        train_dataset=Dataset.from_list([{"prompt": "rev ab=", "completion": "ba"}] * 4),
        processing_class=tok,
        peft_config=moe_peft.MoLEConfig(r=2, num_experts=2, target_modules=MLP, task_type="CAUSAL_LM"),
    )
    assert isinstance(trainer.callback_handler.callbacks[0], RoutingStatsCallback)


def test_probe_sums_over_data_parallel_ranks(tmp_path):
    import torch.distributed as dist

    model = _mole_model()
    probe = RoutingProbe(model)
    ids, mask = _batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    alone = {k: v.cpu() for k, v in probe.totals.items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:  # one rank: the sums must come back unchanged (the multi-rank path is the same calls)
        totals, _, forwards = probe.take(all_reduce=True)
    finally:
        dist.destroy_process_group()
        probe.remove()
    assert forwards == 1 and totals.keys() == alone.keys()
    for name in totals:
        assert torch.equal(totals[name].counts, alone[name].counts)


# -- mixed batches (moe_peft.multi_lora): each router sees only its adapter's rows ------------------------------------
def _mixed_model():
    """Four MoLE adapters that route differently: block, linear top-2 (attention too), null experts, modality groups."""
    from .conftest import make_config, randomize_experts

    model = get_peft_model(_base_for_mixed(), make_config("mole_block"), adapter_name="block")
    model.add_adapter("linear", make_config("mole_linear_top2"))
    model.add_adapter("null", make_config("mole_null"))
    model.add_adapter("groups", moe_peft.MoLEConfig(r=4, modality_experts={"text": 2, "image": 2}, target_modules=MLP))
    randomize_experts(model, std=0.2)
    with torch.no_grad():  # sharp routers: the samples spread over the experts
        for name, p in model.named_parameters():
            if "mole_router" in name and name.endswith("weight"):
                p.mul_(8)
    return model.eval()


def _base_for_mixed():
    return tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


def test_probe_on_a_mixed_batch_equals_each_adapter_alone_on_its_rows():
    """A router of a mixed batch routes only its adapter's rows (b_a x S tokens, not B x S): the probe must count
    those rows' real tokens only and give each to its own sample's group. Oracle: the adapter active alone on its
    rows (same inputs, padding, token modality and sample groups): every total equal."""
    from moe_peft import multi_lora

    model = _mixed_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (7, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in a "block" row, right padding in a "groups" row, one padded "linear" row
    mask[3, 4:] = 0
    mask[5, :1] = 0
    names = ["block", "linear", "groups", "groups", "null", "linear", "block"]
    token_types = torch.randint(0, 2, ids.shape, generator=g)  # [B, S] text / image per token
    sample_groups = torch.tensor([0, 1, 1, 0, 1, 0, 1])  # what collect(by=...) sets: one group per sample

    multi_lora.enable(model)
    probe = RoutingProbe(model)
    probe.num_groups, probe.groups = 2, sample_groups
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_types=token_types, adapter_names=names)
    mixed, _, _ = probe.take()
    probe.remove()

    for adapter in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == adapter])
        model.set_adapter(adapter)
        probe = RoutingProbe(model)
        probe.num_groups, probe.groups = 2, sample_groups[rows]
        with torch.no_grad():
            model(input_ids=ids[rows], attention_mask=mask[rows], token_types=token_types[rows])
        alone, _, _ = probe.take()
        probe.remove()
        labels = [label for label in alone if label.endswith(f"[{adapter}]")]
        assert labels and labels == list(alone), (adapter, list(alone))
        for label in labels:
            got, want = mixed[label], alone[label]
            # the real tokens of the adapter's rows, split by their samples' groups: the hand count
            tokens = [float(mask[rows][sample_groups[rows] == grp].sum()) for grp in range(2)]
            assert want.tokens.tolist() == tokens, label
            for field in ("counts", "tokens", "picks", "slots", "null", "entropy_sum", "entropy_rows"):
                torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=f"{label} {field}")
