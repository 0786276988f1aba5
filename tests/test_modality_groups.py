"""Modality-aware expert groups (MoMa; MoLEConfig.modality_experts): routing within the group on the routing
indices, the per-group balance loss by hand, token modality from LLaVA's image tokens or `token_types`, generate
with and without the KV cache, save/reload, combinations that are refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

import moe_peft
from moe_peft import losses
from moe_peft.bases import tiny_llama, tiny_llava, tiny_llava_next
from moe_peft.routing import TopKRouter

from .conftest import MLP, randomize_experts

IMAGE = 63  # tiny_llava's image token: the last id of its 64-token vocabulary
GROUPS = {"text": 2, "image": 3}  # unequal sizes catch an offset mix-up


def llava_batch(builder=tiny_llava, n_images: int = 4):
    """Two rows, the second left-padded; images of 8x8 pixels (4 image tokens each with tiny_llava)."""
    ids = torch.tensor(
        [[5, 6, IMAGE, IMAGE, IMAGE, IMAGE, 7, 8, 9, 10], [0, 0, 11, IMAGE, IMAGE, IMAGE, IMAGE, 12, 13, 14]]
    )
    mask = (ids != 0).long()
    mask[0, :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 8, 8, generator=_g())}


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grouped(base, groups=GROUPS, **overrides):
    config = moe_peft.MoLEConfig(r=4, modality_experts=dict(groups), target_modules=MLP, **overrides)
    model = get_peft_model(base, config)
    randomize_experts(model)
    return model


class RoutingCapture:
    """The (groups, Routing) of every router call, from forward hooks on the routers."""

    def __init__(self, model):
        self.calls = []
        self.handles = [
            m.register_forward_hook(lambda mod, args, out: self.calls.append((args[1], out)))
            for m in model.modules()
            if isinstance(m, TopKRouter)
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def assert_within_groups(idx: torch.Tensor, token_group: torch.Tensor, sizes: tuple[int, ...]) -> None:
    """idx [T, k] global expert indices (-1 = empty slot); token_group [T]."""
    offsets = torch.tensor([0, *sizes]).cumsum(0)  # [G + 1]
    low, high = offsets[token_group].unsqueeze(1), offsets[token_group + 1].unsqueeze(1)  # [T, 1]
    picked = idx >= 0
    assert picked.any(dim=1).all(), "every token reaches an expert"
    assert ((idx >= low) & (idx < high) | ~picked).all(), "a token reached another group's expert"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"top_k": 2},
        {"router_granularity": "linear"},
        {"top_p": 0.6, "router_entropy_loss_coef": 0.01},
        {"eval_routing": "dense"},
    ],
    ids=["block_top1", "top2", "linear", "top_p", "eval_dense"],
)
def test_image_tokens_reach_only_image_experts_and_text_tokens_only_text_experts(overrides):
    model = grouped(tiny_llava(), **overrides)
    batch = llava_batch()
    image = batch["input_ids"] == IMAGE  # [B, S]
    capture = RoutingCapture(model)
    if overrides.get("eval_routing") != "dense":
        model.train()
    with torch.no_grad():
        model(**batch)
    capture.close()
    assert capture.calls, "the routers ran"
    want = torch.where(image, 1, 0).reshape(-1)  # [T]: "image" is the second group
    used = torch.zeros(sum(GROUPS.values()), dtype=torch.bool)
    for groups, routing in capture.calls:
        torch.testing.assert_close(groups, want)
        assert_within_groups(routing.idx, want, tuple(GROUPS.values()))
        used[routing.idx[routing.idx >= 0]] = True
        if routing.idx.shape[1] == 1:  # top-1: the most probable expert of the token's own group, p sums to 1 in it
            torch.testing.assert_close(routing.probs.sum(-1), torch.ones(routing.probs.shape[0]))
            assert torch.equal(routing.probs.gather(1, routing.idx), routing.probs.max(-1, keepdim=True).values)
    assert used.all(), "both groups' experts are used (the check above is not vacuous)"


def test_image_group_ordering_and_three_groups_with_token_types():
    """Groups in another order, and three groups on a plain Llama: the indices follow modality_experts' order."""
    groups = {"image": 2, "audio": 1, "text": 2}
    model = grouped(tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2), groups)
    ids = torch.randint(4, 60, (2, 7), generator=_g())
    types = torch.tensor([[2, 2, 0, 0, 1, 2, 2], [0, 1, 1, 2, 2, 2, 0]])
    capture = RoutingCapture(model)
    with torch.no_grad():
        model(input_ids=ids, token_types=types)
    capture.close()
    for _, routing in capture.calls:
        assert_within_groups(routing.idx, types.reshape(-1), (2, 1, 2))


def test_grouped_balance_equals_a_hand_computation():
    """losses.grouped_switch_balance against loops over groups, experts and tokens."""
    g = _g(3)
    sizes = (2, 3)
    num_tokens, k = 11, 2
    groups = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1])
    logits = torch.randn(num_tokens, 5, generator=g)
    member = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    probs = logits.masked_fill(~member[groups], float("-inf")).softmax(-1)
    choice = probs.topk(k, dim=-1).indices
    got = losses.grouped_switch_balance(probs, choice, groups, sizes)

    per_group, offset = [], 0
    for gi, n in enumerate(sizes):
        rows = [t for t in range(num_tokens) if groups[t] == gi]
        total = 0.0
        for e in range(offset, offset + n):
            f = sum(1 for t in rows if e in choice[t].tolist()) / len(rows)
            p = sum(float(probs[t, e]) for t in rows) / len(rows)
            total += f * p
        per_group.append(n * total)
        offset += n
    want = sum(per_group) / len(per_group)
    assert abs(float(got) - want) < 1e-6
    # a group without tokens does not count: only the text group's term
    text_only = groups == 0
    got_text = losses.grouped_switch_balance(probs[text_only], choice[text_only], groups[text_only], sizes)
    assert abs(float(got_text) - per_group[0]) < 1e-6


def test_layer_balance_loss_is_per_group_over_that_groups_non_padding_tokens():
    """The recorded router loss of each routed layer equals the hand computation from its routing, padding excluded."""
    coef = 0.5
    model = grouped(tiny_llava(), router_aux_loss_coef=coef, router_z_loss_coef=0.0)
    batch = llava_batch()
    real = batch["attention_mask"].reshape(-1).bool()  # [T]
    capture = RoutingCapture(model)
    model.train()
    out = model(**batch)
    capture.close()
    stats = moe_peft.routing_stats(model)
    assert len(stats) == len(capture.calls) == 2
    hand = []
    for (groups, routing), layer_stats in zip(capture.calls, stats.values()):
        g, probs, idx = groups[real], routing.probs[real].detach(), routing.idx[real]
        terms, offset = [], 0
        for gi, n in enumerate(GROUPS.values()):
            rows = (g == gi).nonzero().flatten().tolist()
            terms.append(
                n
                * sum(
                    (sum(1 for t in rows if e in idx[t].tolist()) / len(rows))
                    * (sum(float(probs[t, e]) for t in rows) / len(rows))
                    for e in range(offset, offset + n)
                )
            )
            offset += n
        want = coef * sum(terms) / len(terms)
        assert abs(layer_stats["loss"] - want) < 1e-5
        hand.append(want)
        # the per-group load reported by routing_stats, over the group's own tokens
        for gi, (name, n) in enumerate(GROUPS.items()):
            rows = g == gi
            group_stats = layer_stats["groups"][name]
            assert group_stats["tokens"] == int(rows.sum())
            offset = sum(list(GROUPS.values())[:gi])
            counts = torch.bincount(idx[rows].flatten() - offset, minlength=n).float()
            torch.testing.assert_close(torch.tensor(group_stats["load"]), counts / counts.sum())
    torch.testing.assert_close(out.router_loss, torch.tensor(sum(hand) / len(hand)), rtol=1e-5, atol=1e-6)


def test_a_masked_expert_gets_no_gradient_from_another_groups_tokens():
    """Only image tokens in the loss path: the router rows of the text experts get no gradient."""
    model = grouped(tiny_llava(), router_aux_loss_coef=0.1, router_lr_ratio=1.0)  # routers that train
    model.train()
    ids = torch.tensor([[IMAGE, IMAGE, IMAGE, IMAGE]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 8, 8, generator=_g()), labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if "mole_router" in name and name.endswith("weight"):
            assert torch.count_nonzero(p.grad[:2]) == 0 and torch.count_nonzero(p.grad[2:]) > 0, name


def test_the_modality_changes_the_output():
    """Token types override the image tokens; calling the image tokens text changes the logits (so the group
    routing is not ignored)."""
    model = grouped(tiny_llava()).eval()
    batch = llava_batch()
    with torch.no_grad():
        auto = model(**batch).logits
        as_text = model(**batch, token_types=torch.zeros_like(batch["input_ids"])).logits
        explicit = model(**batch, token_types=(batch["input_ids"] == IMAGE).long()).logits
    torch.testing.assert_close(explicit, auto)
    assert not torch.allclose(as_text, auto)


def test_inputs_embeds_find_the_image_tokens_as_transformers_does():
    model = grouped(tiny_llava()).eval()
    batch = llava_batch()
    with torch.no_grad():
        want = model(**batch).logits
        embeds = model.get_input_embeddings()(batch["input_ids"])
        got = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    torch.testing.assert_close(got.logits, want)


def _generate(model, use_cache: bool, **inputs):
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0, suppress_tokens=[IMAGE],
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("builder", [tiny_llava, tiny_llava_next], ids=["llava", "llava_next"])
def test_llava_generate_with_and_without_cache_equal(builder):
    model = grouped(builder(), top_k=2).eval()
    batch = llava_batch()
    if builder is tiny_llava_next:  # one 8x8 image per row: the base tile only (image_sizes at the tower's size)
        batch = next_batch()
    cached, scores_cached = _generate(model, True, **batch)
    full, scores_full = _generate(model, False, **batch)
    assert torch.equal(cached, full)
    torch.testing.assert_close(scores_cached, scores_full, rtol=1e-4, atol=1e-4)
    as_text, scores_text = _generate(model, True, **batch, token_types=torch.zeros_like(batch["input_ids"]))
    assert not torch.allclose(scores_text, scores_cached)  # the image group mattered in the prefill


def next_batch():
    """A LLaVA-NeXT batch: images of 8x16 pixels (two tiles plus the base image, with newlines), left-padded."""
    sizes = torch.tensor([[8, 16], [16, 8]])
    tokens = [_next_image_tokens(s) for s in sizes.tolist()]
    rows = [[5, 6] + [IMAGE] * tokens[0] + [7, 8, 9], [11] + [IMAGE] * tokens[1] + [12, 13]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 3, 3, 8, 8, generator=_g())  # [images, tiles (base + 2), C, H, W]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def _next_image_tokens(size) -> int:
    """How many image tokens LLaVA-NeXT's processor gives an image of this [height, width]."""
    from PIL import Image

    from moe_peft.llava import build_processor

    processor = build_processor("llava_next", image_size=8)
    text = processor(text=["<image>"], images=[Image.new("RGB", (size[1], size[0]))])["input_ids"][0]
    return sum(1 for t in text if t == processor.tokenizer.convert_tokens_to_ids("<image>"))


def test_llava_next_routes_its_image_tokens_within_the_image_group():
    model = grouped(tiny_llava_next(), top_k=1)
    batch = next_batch()
    capture = RoutingCapture(model)
    with torch.no_grad():
        model(**batch)
    capture.close()
    want = (batch["input_ids"] == IMAGE).long().reshape(-1)
    assert want.sum() > 0
    for groups, routing in capture.calls:
        torch.testing.assert_close(groups, want)
        assert_within_groups(routing.idx, want, tuple(GROUPS.values()))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_token_types_generate_with_and_without_cache_equal(num_beams):
    model = grouped(tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2), top_k=2).eval()
    ids = torch.randint(4, 60, (2, 6), generator=_g())
    types = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_types=types)
    if num_beams > 1:
        kwargs.update(num_beams=num_beams)
    cached, scores_cached = _generate(model, True, **kwargs)
    full, scores_full = _generate(model, False, **kwargs)
    assert torch.equal(cached, full)
    torch.testing.assert_close(scores_cached, scores_full, rtol=1e-4, atol=1e-4)
    if num_beams == 1:  # generated tokens route as text: the same as giving their type (0) by hand each step
        with torch.no_grad():
            step = model(input_ids=cached, token_types=torch.cat([types, torch.zeros(2, 6, dtype=torch.long)], 1))
        want = step.logits[:, 5:-1].transpose(0, 1)  # [B, steps, V] -> [steps, B, V]; the suppressed id aside
        torch.testing.assert_close(want[..., :IMAGE], scores_cached[..., :IMAGE], rtol=1e-4, atol=1e-4)
        other, scores_other = _generate(model, True, **{**kwargs, "token_types": 1 - types})
        assert not torch.allclose(scores_other, scores_cached)


def test_a_model_without_image_tokens_needs_token_types():
    model = grouped(tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2))
    ids = torch.randint(4, 60, (1, 5), generator=_g())
    with pytest.raises(ValueError, match="token_types"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="token_types has values"):
        model(input_ids=ids, token_types=torch.full((1, 5), 2))
    with pytest.raises(ValueError, match=r"\[batch, seq\] integer"):
        model(input_ids=ids, token_types=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not line up"):
        model(input_ids=ids, token_types=torch.zeros(1, 3, dtype=torch.long))


def test_llava_groups_must_be_named_text_and_image():
    model = grouped(tiny_llava(), {"words": 2, "pictures": 2})
    with pytest.raises(ValueError, match='"text" and "image"'):
        model(**llava_batch())
    with torch.no_grad():  # token_types work whatever the names
        model(**llava_batch(), token_types=(llava_batch()["input_ids"] == IMAGE).long())


def test_config_fields_and_refusals():
    config = moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, target_modules=MLP)
    assert config.num_experts == 5 and config.group_sizes == (2, 3) and config.top_k == 1
    assert moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, num_experts=5).num_experts == 5
    assert moe_peft.MoLEConfig(modality_experts={"text": 3, "image": 2}, top_p=0.5).top_k == 2  # the smallest group
    assert moe_peft.MoLEConfig().num_experts == 4  # unchanged default without groups
    with pytest.raises(ValueError, match="num_experts=4 is invalid.*leave num_experts unset"):
        moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, num_experts=4)
    with pytest.raises(ValueError, match="top_k=3 is invalid.*smallest group has 2"):
        moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, top_k=3)
    with pytest.raises(ValueError, match="num_null_experts=1 is invalid"):
        moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 2}, num_null_experts=1, top_k=2)
    for bad in ({"text": 2}, {"text": 0, "image": 2}, {"text": 2.0, "image": 2}, ["text", "image"], {"": 1, "a": 1}):
        with pytest.raises(ValueError, match="modality_experts"):
            moe_peft.MoLEConfig(modality_experts=bad)
    # round trip through what PEFT saves: adapter_config.json sorts dict keys; modality_order keeps the bank order
    import json

    saved = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=sorted))  # sets: as PEFT writes them
    assert list(saved["modality_experts"]) == ["image", "text"] and saved["modality_order"] == ["text", "image"]
    again = moe_peft.MoLEConfig.from_peft_type(**saved)
    assert list(again.modality_experts.items()) == [("text", 2), ("image", 3)] and again.group_sizes == (2, 3)
    ordered = moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, modality_order=["image", "text"])
    assert ordered.group_sizes == (3, 2)
    with pytest.raises(ValueError, match="modality_order"):
        moe_peft.MoLEConfig(modality_experts={"text": 2, "image": 3}, modality_order=["text"])
    with pytest.raises(ValueError, match="modality_order"):
        moe_peft.MoLEConfig(modality_order=["text", "image"])


FRESH = textwrap.dedent(
    """
    import sys, torch
    import moe_peft
    from peft import PeftModel
    from moe_peft.bases import tiny_llava
    root = sys.argv[1]
    ref = torch.load(f"{root}/ref.pt")
    model = PeftModel.from_pretrained(tiny_llava(), f"{root}/adapter").eval()
    config = model.peft_config["default"]
    assert config.modality_experts == {"text": 2, "image": 3}, config.modality_experts
    with torch.no_grad():
        logits = model(**ref["batch"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=0)
    groups = moe_peft.routing_stats(model)
    assert all(set(s["groups"]) == {"text", "image"} for s in groups.values())
    print("FRESH-OK")
    """
)


def test_save_and_reload_in_a_fresh_process(tmp_path):
    model = grouped(tiny_llava(), top_k=2).eval()
    batch = llava_batch()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"batch": batch, "logits": logits}, tmp_path / "ref.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert "FRESH-OK" in result.stdout, result.stderr[-3000:]
    # and in this process, through PeftModel.from_pretrained
    reloaded = PeftModel.from_pretrained(tiny_llava(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=0, atol=0)


def test_a_mixed_batch_routes_each_sample_within_its_groups():
    """moe_peft.multi_lora: a modality-grouped adapter next to the base in one batch gives each sample the output
    it gets alone."""
    model = grouped(tiny_llava()).eval()
    batch = llava_batch()
    with torch.no_grad():
        alone = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    moe_peft.multi_lora.enable(model)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_groups(reentrant):
    """Recomputed layers (reentrant: during backward, after the forward returned) route with the same modality:
    the gradients equal those without checkpointing, router losses included."""
    from .conftest import checkpointed_grads

    model = grouped(tiny_llava(), top_k=2, router_z_loss_coef=1e-2)
    batch = llava_batch()
    grads = checkpointed_grads(model, reentrant, lambda m: m(**batch, labels=batch["input_ids"]).loss)
    assert any("mole_router" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_masked_group_logits_are_not_taken_for_non_finite_input():
    """The router sets the logits outside a token's group to -inf on purpose: no warning, the loss and statistics
    count every token; a NaN token is still found (only it is left out)."""
    import warnings

    model = grouped(
        tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2), router_aux_loss_coef=0.5
    )
    model.train()
    embeds = torch.randn(2, 6, 32, generator=_g())
    types = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(inputs_embeds=embeds, token_types=types)
    for layer in moe_peft.routing_stats(model).values():
        assert layer["loss"] is not None and layer["loss"] > 0
        assert sum(group["tokens"] for group in layer["groups"].values()) == 12
    embeds[0, -1] = float("nan")  # spreads over the first sample's 6 tokens (masked attention scores stay NaN)
    with pytest.warns(UserWarning, match="6 token\\(s\\) reach the router with NaN or inf logits"):
        model(inputs_embeds=embeds, token_types=types)
    for layer in moe_peft.routing_stats(model).values():
        assert sum(group["tokens"] for group in layer["groups"].values()) == 6
