"""Sequence-level routing (`routing_level="sequence"`) and routers that read a later layer (`router_input_layer`):
every routed linear's output against a hand computation from the same weights (pooled prompt, router, experts), the
prompt found from the labels in training and the first forward in generation (teacher-forced logits equal the
generated scores, with and without the KV cache), packing, router losses and statistics per decision, save/reload,
export, mixed batches, and the refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.routing import TopKRouter
from moe_peft.tuners.routed.layer import MoELoraLinear

from .conftest import MLP, VOCAB, randomize_experts

PAD = 0


def small_base():
    return tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)


def seq_model(method="mole", seed=1, **overrides):
    """A sequence-routed adapter on the tiny Llama's MLPs, with non-zero experts and decisive routers."""
    overrides = {"routing_level": "sequence", **overrides}
    kinds = {
        "mole": lambda: moe_peft.MoLEConfig(r=4, num_experts=4, target_modules=MLP, **overrides),
        "loramoe": lambda: moe_peft.LoRAMoEConfig(r=4, num_experts=4, target_modules=MLP, **overrides),
        "smora": lambda: moe_peft.SMoRAConfig(r=8, top_k=2, target_modules=MLP, **overrides),
    }
    config = kinds[method]()
    model = get_peft_model(small_base(), config)
    randomize_experts(model, std=0.3, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g))  # routers that tell the samples apart
    return model


def rows(prompts, completions):
    """Right-padded rows prompt + completion, labels -100 on the prompt and the padding."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), PAD)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        labels[b, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[b, : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokens(seed, *lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = tokens(0, 5, 3, 7)
ANSWERS = tokens(1, 4, 6, 2)


# -- the hand computation ------------------------------------------------------------------------------------------
class Capture:
    """Each MoELoraLinear's input and output, and each decoder layer's output, of one forward."""

    def __init__(self, model):
        self.io, self.handles = {}, []
        for name, module in model.named_modules():
            if isinstance(module, MoELoraLinear):
                self.handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name):
        def hook(module, args, output):
            self.io[name] = (args[0].detach(), output.detach())

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def hand_route(config, router, v, dense=False):
    """(idx, weights) [N, k] of pooled router inputs v [N, d] from the router's own weights (docs/methods.md); dense:
    MoLE's eval_routing="dense", every expert by its probability."""
    logits = v.double() @ router.linear.weight.double().T  # [N, E]
    if router.linear.bias is not None:
        logits = logits + router.linear.bias.double()
    if isinstance(config, moe_peft.LoRAMoEConfig):
        p = logits.softmax(-1)
        return torch.arange(p.shape[1]).expand_as(p), p
    if isinstance(config, moe_peft.SMoRAConfig):
        s = logits.sigmoid()
        idx = (s + router.selection_bias.double()).topk(config.top_k, dim=-1).indices
        picked = s.gather(1, idx)
        return idx, config.top_k * picked / picked.sum(-1, keepdim=True)
    n = config.num_experts
    if config.num_null_experts:  # AdaMoE: null logits from a bias-free linear, appended
        logits = torch.cat([logits, v.double() @ router.null.weight.double().T], dim=-1)  # [N, n + m]
    p = logits.softmax(-1)
    if dense:
        return torch.arange(p.shape[1]).expand_as(p), p
    if config.top_p is not None:  # the most probable experts until their mass passes top_p, raw p, at most top_k
        ranked, order = p.sort(dim=-1, descending=True)
        ranked, order = ranked[:, : config.top_k], order[:, : config.top_k]
        keep = (ranked.cumsum(-1) - ranked) < config.top_p
        return torch.where(keep, order, -1), ranked * keep
    top, idx = p.topk(config.top_k, dim=-1)
    real = idx < n
    if config.top_k == 1:
        weights = real.double()  # straight-through: value 1 (0 for a null pick)
    else:
        kept = top * real
        weights = kept / kept.sum(-1, keepdim=True).clamp_min(1e-9)  # renormalized over the real picks
    return torch.where(real, idx, -1), weights


def hand_prompt(batch):
    """[B, S] bool by loops: a row's real tokens before its first labelled token after the first one."""
    mask, labels = batch["attention_mask"], batch.get("labels")
    prompt = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[b, t]]
        for i, t in enumerate(real):
            if labels is not None and i > 0 and labels[b, t] != -100:
                break
            prompt[b, t] = True
    return prompt


def pooled(x, prompt, mode):
    """[B, d]: each row's prompt states x [B, S, d] pooled by loops."""
    out = []
    for b in range(x.shape[0]):
        picked = [x[b, t].double() for t in range(x.shape[1]) if prompt[b, t]]
        out.append(torch.stack(picked).mean(0) if mode == "mean" else picked[-1])
    return torch.stack(out)


def check_against_hand(model, batch, capture, router_states=None, dense=False):
    """Every routed linear's output equals W x + b + s * sum_j w_j B_e A_e x with (e, w) routed once per row from the
    pooled prompt of the router's input (its block's input for block routing; `router_states` for
    router_input_layer)."""
    config = model.peft_config["default"]
    prompt = hand_prompt(batch)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, MoELoraLinear):
            continue
        owner = module._router_owner.get("default", module)
        block_input = capture.io[[n for n, m in model.named_modules() if m is owner][0]][0]
        source = router_states if router_states is not None else block_input
        idx, w = hand_route(config, owner.routers["default"], pooled(source, prompt, config.sequence_pooling), dense)
        x, y = capture.io[name]
        a, bb = module.experts_A["default"].double(), module.experts_B["default"].double()
        base = module.base_layer
        want = x.double() @ base.weight.double().T
        for b in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[b, j])
                if e < 0:  # a null expert or a top-p cut-off: no output
                    continue
                want[b] += module.scalings["default"] * w[b, j] * (x[b].double() @ a[e].T @ bb[e].T)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5, msg=name)
        checked += 1
    assert checked == 6


CASES = {
    "mole_block_mean": ("mole", {}),
    "mole_linear_top2_last": ("mole", {"router_granularity": "linear", "top_k": 2, "sequence_pooling": "last"}),
    "mole_eval_dense": ("mole", {"eval_routing": "dense"}),
    "mole_null_top2": ("mole", {"num_null_experts": 2, "top_k": 2}),
    "mole_top_p": ("mole", {"top_p": 0.6, "router_granularity": "linear"}),
    "loramoe": ("loramoe", {}),
    "smora": ("smora", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_routed_linear_equals_the_hand_computation_from_the_pooled_prompt(case):
    method, overrides = CASES[case]
    model = seq_model(method, **overrides).eval()
    batch = rows(PROMPTS, ANSWERS)
    capture = Capture(model)
    with torch.no_grad():
        model(**batch)
    capture.close()
    check_against_hand(model, batch, capture, dense=overrides.get("eval_routing") == "dense")
    # the routing is not token-level: the same weights routed per token give other outputs
    model.peft_config["default"].routing_level = "token"
    with torch.no_grad():
        token_level = model(**batch).logits
    model.peft_config["default"].routing_level = "sequence"
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, token_level, atol=1e-4)


def test_the_completion_never_moves_the_decision_but_without_labels_it_does():
    """Training (labels given): the prompt decides; two answers to the same prompts route alike, so the logits at the
    prompt positions are equal. A forward without labels routes from every token, answer included."""
    model = seq_model().eval()
    one, other = rows(PROMPTS, ANSWERS), rows(PROMPTS, tokens(5, 4, 6, 2))
    with torch.no_grad():
        a, b = model(**one).logits, model(**other).logits
        c = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
    prompt = hand_prompt(one)
    torch.testing.assert_close(a[prompt], b[prompt], rtol=0, atol=1e-6)
    assert not torch.allclose(a[prompt], c[prompt], atol=1e-4)


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    return ids, (ids != PAD).long()  # the prompts hold no PAD


def generate(model, use_cache, num_beams=1, prompts=PROMPTS, **kw):
    ids, mask = left_padded(prompts)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=PAD,
        suppress_tokens=[PAD], num_beams=num_beams, return_dict_in_generate=True, output_scores=True, **kw,
    )  # fmt: skip
    scores = torch.stack(out.scores)[..., PAD + 1 :]  # [new, B, V - 1]: the suppressed PAD's -inf left out
    return out.sequences[:, ids.shape[1] :], scores  # [B, new], [new, B, V - 1]


GENERATE_CASES = {
    "mole_block": ("mole", {}),
    "mole_linear_top2_last": ("mole", {"router_granularity": "linear", "top_k": 2, "sequence_pooling": "last"}),
    "mole_router_input_layer": ("mole", {"router_input_layer": -1}),
    "loramoe": ("loramoe", {}),
    "smora": ("smora", {}),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generation_routes_as_training_does_with_and_without_the_kv_cache(case):
    """The scores of greedy generation from left-padded prompts, with and without the KV cache, equal the logits of
    a training-style forward (right padding, labels -100 on the prompt) on prompt + generated answer: the prompt is
    the same tokens in both, and later steps keep the choice made at the prompt."""
    method, overrides = GENERATE_CASES[case]
    model = seq_model(method, **overrides).eval()
    new, scores = generate(model, use_cache=True)
    new_full, scores_full = generate(model, use_cache=False)
    assert torch.equal(new, new_full)
    torch.testing.assert_close(scores, scores_full, rtol=1e-4, atol=1e-4)
    batch = rows(PROMPTS, new.tolist())
    with torch.no_grad():
        forced = model(**batch).logits  # [B, S, V]
        unlabelled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b, p in enumerate(PROMPTS):
        steps = range(len(p) - 1, len(p) - 1 + new.shape[1])
        torch.testing.assert_close(forced[b, steps, PAD + 1 :], scores[:, b], rtol=1e-4, atol=1e-4)
    # a forward that took every token as prompt would not have generated these scores
    every_token = torch.stack([unlabelled[b, len(p) - 1 :][:5, PAD + 1 :] for b, p in enumerate(PROMPTS)], 1)
    assert not torch.allclose(every_token, scores, atol=1e-3)


def test_beams_and_a_hand_written_kv_cache_loop_keep_the_prompts_choice():
    model = seq_model().eval()
    cached, _ = generate(model, use_cache=True, num_beams=2)
    full, _ = generate(model, use_cache=False, num_beams=2)
    assert torch.equal(cached, full)
    # a loop of forwards continuing a cache (outside generate): the first forward is the prompt
    ids, mask = left_padded(PROMPTS)
    want_new, want_scores = generate(model, use_cache=True)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() gives left-padded rows
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, got = out.cache, [out.logits[:, -1, PAD + 1 :]]
        for i in range(want_new.shape[1] - 1):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            step = mask.sum(-1, keepdim=True) - 1  # [B, 1]
            out = model(input_ids=want_new[:, i : i + 1], attention_mask=mask, position_ids=step, cache=cache)
            cache = out.cache
            got.append(out.logits[:, -1, PAD + 1 :])
    torch.testing.assert_close(torch.stack(got), want_scores, rtol=1e-4, atol=1e-4)
    # a cache the model never saw the prompt of: refused, naming the fix
    fresh = seq_model().eval()
    with pytest.raises(ValueError, match="continues a KV cache.*generate"):
        with torch.no_grad():
            fresh(input_ids=want_new[:, :1], attention_mask=mask, cache=cache)


def test_packed_sequences_route_each_sequence_as_its_own_row():
    """Two samples packed in one row (position ids restarting at 0, a block-diagonal causal mask, as TRL's packing
    gives) get the routing and the logits they get as separate rows."""
    model = seq_model().eval()
    separate = rows(PROMPTS[:2], ANSWERS[:2])
    lengths = [len(p) + len(c) for p, c in zip(PROMPTS[:2], ANSWERS[:2])]
    ids = torch.cat([separate["input_ids"][b, :n] for b, n in enumerate(lengths)])[None]  # [1, S]
    labels = torch.cat([separate["labels"][b, :n] for b, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    total = sum(lengths)
    block = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        block[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    with torch.no_grad():
        want = model(**separate).logits
        got = model(input_ids=ids, labels=labels, position_ids=position_ids, attention_mask=block[None, None]).logits
    stats = moe_peft.routing_stats(model)
    assert all(s["tokens"] == 2 and s["routing_level"] == "sequence" for s in stats.values())
    torch.testing.assert_close(got[0, : lengths[0]], want[0, : lengths[0]], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0, lengths[0] :], want[1, : lengths[1]], rtol=1e-4, atol=1e-5)


def test_router_losses_and_statistics_count_one_decision_per_sequence():
    """MoLE's balance and z-loss over the N sequences' decisions (padding and an all-padding row excluded), by hand;
    routing_stats and the statistics probe count sequences."""
    aux, z = 0.5, 0.1
    model = seq_model(router_aux_loss_coef=aux, router_z_loss_coef=z)
    batch = rows(PROMPTS + [[5]], ANSWERS + [[6]])
    batch["attention_mask"][3] = 0  # an all-padding row: no sequence to route
    batch["labels"][3] = -100
    probe = moe_peft.stats.RoutingProbe(model)
    capture = Capture(model)
    model.train()
    out = model(**batch)
    capture.close()
    totals, _, _ = probe.take()
    probe.remove()
    prompt = hand_prompt(batch)[:3]
    hand = []
    for i in (0, 1):
        owner = model.base_model.model.model.layers[i].mlp.gate_proj
        x = capture.io[f"base_model.model.model.layers.{i}.mlp.gate_proj"][0][:3]
        router = owner.routers["default"]
        logits = pooled(x, prompt, "mean") @ router.linear.weight.double().T + router.linear.bias.double()  # [3, E]
        p = logits.softmax(-1)
        pick = p.argmax(-1)
        f = torch.stack([(pick == e).double().mean() for e in range(4)])
        balance = 4 * (f * p.mean(0)).sum()
        z_term = logits.logsumexp(-1).pow(2).mean()
        hand.append(aux * balance + z * z_term)
        stats = moe_peft.routing_stats(model)[f"model.layers.{i}.mlp.gate_proj[default]"]
        assert stats["tokens"] == 3 and stats["routing_level"] == "sequence"
        torch.testing.assert_close(torch.tensor(stats["load"], dtype=torch.float64), f)
        assert abs(stats["loss"] - float(hand[-1])) < 1e-5
        assert float(totals[f"model.layers.{i}.mlp"].tokens.sum()) == 3  # the probe: one row per sequence
    torch.testing.assert_close(out.router_loss.double(), torch.stack(hand).mean(), rtol=1e-5, atol=1e-6)


def test_loramoe_localized_balancing_per_sequence_by_hand():
    """LBC with one decision per sample: Q[b, i] = w[b, i] (each sample counted once, whatever its length: the rows
    have 7, 9 and 12 tokens, so a token-weighted Q would give another value)."""
    delta, weight = 0.1, 0.5
    model = seq_model("loramoe", blc_alpha=delta, blc_weight=weight)
    batch = rows(PROMPTS, tokens(1, 2, 6, 5))
    types = torch.tensor([1, 0, 1])
    capture = Capture(model)
    model.train()
    model(**batch, sample_types=types)
    capture.close()
    stats = moe_peft.routing_stats(model)
    prompt = hand_prompt(batch)
    name = "model.layers.0.mlp.up_proj"
    layer = model.base_model.model.get_submodule(name)
    x = capture.io["base_model.model." + name][0]
    q = pooled(x, prompt, "mean") @ layer.routers["default"].linear.weight.double().T
    q = q.softmax(-1)  # [B, N]
    own = torch.tensor([[1, 1, 0, 0] if t == 1 else [0, 0, 1, 1] for t in types.tolist()], dtype=torch.bool)
    zz = (q / torch.where(own, 1 + delta, 1 - delta)).flatten()
    want = weight * zz.var() / (zz.mean() ** 2 + 1e-10)
    assert abs(stats[f"{name}[default]"]["loss"] - float(want)) < 1e-6
    # with packing a row's sample type does not say each packed sequence's: refused
    with pytest.raises(ValueError, match="packed sequences.*blc_weight=0"):
        model(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]] * 3),
            sample_types=types,
        )


def test_gradients_reach_the_routers_and_equal_under_reentrant_checkpointing():
    from .conftest import checkpointed_grads

    for overrides in ({}, {"router_input_layer": 1}):
        model = seq_model(router_z_loss_coef=0.01, **overrides)
        batch = rows(PROMPTS, ANSWERS)
        grads = checkpointed_grads(model, True, lambda m, batch=batch: m(**batch).loss)
        routers = [g for n, g in grads.items() if "mole_router" in n and n.endswith("weight")]
        assert routers and all(torch.count_nonzero(g) > 0 for g in routers)


def test_router_input_layer_routes_from_the_frozen_bases_normalized_layer_output():
    """Every router reads decoder layer L's output of the base model (adapters off), rms-normalized, pooled over the
    prompt; the blocks before and after L alike. The pre-pass leaves the KV cache and the base unchanged."""
    for layer in (0, -1):
        model = seq_model(router_input_layer=layer).eval()
        batch = rows(PROMPTS, ANSWERS)
        captured = {}
        decoder = model.base_model.model.model.layers
        handle = decoder[layer].register_forward_hook(lambda m, a, o, captured=captured: captured.setdefault("h", o))
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        h = captured["h"].double()
        states = h / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        capture = Capture(model)
        with torch.no_grad():
            model(**batch)
        capture.close()
        check_against_hand(model, batch, capture, router_states=states)
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        assert routers and all(r.linear.in_features == 32 for r in routers)


def test_router_input_layer_reads_the_hidden_size_on_linear_routers():
    """down_proj's own input is the 48-wide intermediate activation; its router reads the 32-wide layer output."""
    model = seq_model(router_granularity="linear", router_input_layer=0).eval()
    down = model.base_model.model.model.layers[1].mlp.down_proj
    assert down.routers["default"].linear.in_features == 32 and down.in_features == 48
    with torch.no_grad():
        model(**rows(PROMPTS, ANSWERS))


def test_save_and_reload_keep_the_options(tmp_path):
    model = seq_model(router_input_layer=0, sequence_pooling="last").eval()
    batch = rows(PROMPTS, ANSWERS)
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"batch": batch, "logits": want}, tmp_path / "ref.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-OK" in result.stdout, result.stderr[-3000:]
    reloaded = PeftModel.from_pretrained(small_base(), tmp_path / "adapter").eval()
    config = reloaded.peft_config["default"]
    assert (config.routing_level, config.sequence_pooling, config.router_input_layer) == ("sequence", "last", 0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, want, rtol=0, atol=0)


FRESH = textwrap.dedent(
    """
    import sys, torch
    import moe_peft
    from peft import PeftModel
    from moe_peft.bases import tiny_llama
    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    base = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    model = PeftModel.from_pretrained(base, f"{root}/adapter").eval()
    assert model.peft_config["default"].routing_level == "sequence"
    with torch.no_grad():
        torch.testing.assert_close(model(**ref["batch"]).logits, ref["logits"], rtol=0, atol=0)
    print("FRESH-OK")
    """
)


def test_a_config_saved_without_the_fields_loads_token_level_routing():
    saved = moe_peft.MoLEConfig(r=4, target_modules=MLP).to_dict()
    for key in ("routing_level", "sequence_pooling", "router_input_layer"):
        saved.pop(key)
    config = moe_peft.MoLEConfig.from_peft_type(**{k: sorted(v) if isinstance(v, set) else v for k, v in saved.items()})
    assert (config.routing_level, config.sequence_pooling, config.router_input_layer) == ("token", "mean", None)


def test_refusals_name_the_field_the_value_and_the_fix():
    with pytest.raises(ValueError, match="routing_level='batch' is invalid.*'token', 'sequence'"):
        moe_peft.MoLEConfig(routing_level="batch")
    with pytest.raises(ValueError, match="sequence_pooling='last' is invalid.*routing_level='sequence'"):
        moe_peft.MoLEConfig(sequence_pooling="last")
    with pytest.raises(ValueError, match="router_input_layer=1 is invalid.*KV cache.*routing_level='sequence'"):
        moe_peft.LoRAMoEConfig(router_input_layer=1)
    with pytest.raises(ValueError, match="routing_level='sequence' is invalid.*modality group"):
        moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 2}, routing_level="sequence")
    with pytest.raises(ValueError, match="router_input_layer=5 is invalid.*2 decoder layers"):
        seq_model(router_input_layer=5)
    with pytest.raises(ValueError, match="has none.*target_parameters"):
        get_peft_model(
            small_base(),
            moe_peft.MoLEConfig(target_modules=MLP, plain_lora_modules=MLP, routing_level="sequence"),
        )


def test_training_forwards_that_cannot_find_the_prompt_warn():
    model = seq_model().train()
    batch = rows(PROMPTS, ANSWERS)
    with pytest.warns(UserWarning, match="without labels"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    text = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100))
    with pytest.warns(UserWarning, match="3 sequence.*first token only"):
        model(**text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)  # prompt/completion rows: nothing to say
        with torch.no_grad():
            model.eval()(input_ids=batch["input_ids"])  # inference: every token is prompt, by definition


def test_native_export_is_refused_with_the_reason_and_the_approximation_fits_the_sequence_routing(tmp_path):
    from moe_peft.data import CharTokenizer
    from moe_peft.export.calibration import batches, load_calibration
    from moe_peft.export.native import NativeMoEError

    tok = CharTokenizer()
    model = seq_model(router_bias=False).eval()
    with pytest.raises(NativeMoEError, match="routing_level='sequence' routes each sample once"):
        moe_peft.export(model, "native_moe", tmp_path / "native", tokenizer=tok, verbose=False)
    with pytest.raises(ValueError, match="routing_level='sequence'"):
        model.merge_and_unload()
    result = moe_peft.export(
        model, "routing_weighted", tmp_path / "rw", tokenizer=tok, calibration_rows=32, verbose=False
    )
    # by hand: c_e = the share of the fit rows' real tokens whose sequence picked e (each token carries the choice of
    # its row's prompt, found from the labels)
    calib = load_calibration(None, tok, rows=32)
    batch = next(batches(calib.fit, calib.pad_id, batch_size=len(calib.fit)))
    picks = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, i=i: picks.__setitem__(i, out.idx[:, 0]))
        for i, m in enumerate(m for m in model.modules() if isinstance(m, TopKRouter))
    ]
    with torch.no_grad():
        model(**batch)
        by_prompt = dict(picks)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # every token as prompt
    for h in handles:
        h.remove()
    assert any(not torch.equal(by_prompt[i], picks[i]) for i in picks), "the labels decide (the check is not vacuous)"
    length = batch["attention_mask"].sum(1).double()  # [B] real tokens per row
    for i in (0, 1):
        c = torch.stack([(length * (by_prompt[i] == e)).sum() for e in range(4)]) / length.sum()  # [E]
        for projection in MLP:
            name = f"model.layers.{i}.mlp.{projection}"
            layer = model.base_model.model.get_submodule(name)
            a, b = layer.experts_A["default"].double(), layer.experts_B["default"].double()
            want = sum(c[e] * layer.scalings["default"] * (b[e] @ a[e]) for e in range(4))
            exported = result.model.base_model.model.get_submodule(name)
            got = exported.lora_B["default"].weight @ exported.lora_A["default"].weight * exported.scaling["default"]
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_a_mixed_batch_gives_each_sample_what_it_gets_alone():
    """moe_peft.multi_lora: a sequence-routed adapter next to a token-routed one and the base in one batch, forward
    and generate."""
    import moe_peft.multi_lora as multi_lora

    model = seq_model().eval()
    other = moe_peft.MoLEConfig(r=4, num_experts=3, target_modules=MLP)
    model.add_adapter("tok", other)
    randomize_experts(model, std=0.3, seed=4)
    multi_lora.enable(model)
    batch = rows(PROMPTS, ANSWERS)
    names = ["default", "tok", "default"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        alone = {}
        for adapter in ("default", "tok"):
            model.set_adapter(adapter)
            alone[adapter] = model(**batch).logits
    for b, name in enumerate(names):
        torch.testing.assert_close(mixed[b], alone[name][b], rtol=1e-4, atol=1e-5)
    model.set_adapter("default")
    cached, scores = generate(model, use_cache=True, adapter_names=names)
    full, scores_full = generate(model, use_cache=False, adapter_names=names)
    assert torch.equal(cached, full)
    torch.testing.assert_close(scores, scores_full, rtol=1e-4, atol=1e-4)


def test_trl_packing_routes_each_packed_sample_from_its_prompt(tmp_path):
    """MoESFTTrainer with packing=True: one packed row per batch, position ids restarting per sample, labels -100 on
    the prompts (completion-only loss): every router call routes as many sequences as the row packs, and nothing
    warns that a prompt could not be found."""
    from datasets import Dataset
    from trl import SFTConfig

    from moe_peft.bases import char_tokenizer
    from moe_peft.data import make_samples
    from moe_peft.train import MoESFTTrainer

    tok = char_tokenizer()
    base = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=2, seed=0)
    samples = make_samples(16, ("rev", "srt"), seed=0)
    data = Dataset.from_list([{"prompt": s["prompt"], "completion": s["completion"]} for s in samples])
    config = moe_peft.MoLEConfig(
        r=4, target_modules=MLP, routing_level="sequence", router_input_layer=0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    routed, packed = [], []
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(lambda mod, a, out: routed.append(out.idx.shape[0]))
    model.base_model.model.register_forward_pre_hook(
        lambda mod, a, kw: packed.append(int((kw["position_ids"] == 0).sum())), with_kwargs=True
    )
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", disable_tqdm=True, packing=True, max_length=64, bf16=False, logging_steps=1,
        gradient_checkpointing=True,  # TRL's default: each router runs again in backward
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MoESFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()
    assert not [w for w in caught if "routing_level" in str(w.message)]
    assert len(packed) == 2 and min(packed) > 1  # several samples per packed row
    # two block routers, each routing every packed sample, in the forward and in the checkpointed recompute
    assert routed == [n for n in packed for _ in range(4)]
