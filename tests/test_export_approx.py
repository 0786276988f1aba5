"""Approximate strategies: each against a hand computation of its definition (docs/methods.md, "Export"), the
measured error against hand-computed KL and perplexity, and the plain-LoRA / merged outputs loaded without moe_peft."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import moe_peft
from moe_peft.bases import tiny_llama
from moe_peft.data import CharTokenizer
from moe_peft.export import approximate as approx
from moe_peft.export.calibration import batches, load_calibration
from moe_peft.export.measure import compare_logits
from moe_peft.export.parts import RoutedLinear

from .conftest import MLP, VOCAB, make_config
from .export_fresh import left_padded, load_fresh, routed_outputs
from .test_mhr import mhr_config
from .test_mhr import randomize as randomize_mhr
from .test_phatgoose import (
    library,  # noqa: F401  (a module-scoped fixture: three saved PEFT LoRA experts)
    small_base,
)

TOK = CharTokenizer()


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].endswith("_B") or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "router" in name and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def routed(case, **overrides):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)
    return randomize(get_peft_model(base, make_config(case, task_type="CAUSAL_LM", **overrides)))


def export(model, out, strategy, **kw):
    kw = {"tokenizer": TOK, "calibration_rows": 32, "verbose": False, **kw}
    return moe_peft.export(model, strategy, out, **kw)


def lora_delta(peft_lora, name):
    """B A * scaling of the exported PEFT LoRA at module `name`."""
    layer = peft_lora.base_model.model.get_submodule(name)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (b @ a) * layer.scaling["default"]


def experts_of(model, name, adapter="default"):
    layer = model.base_model.model.get_submodule(name)
    return layer.experts_A[adapter], layer.experts_B[adapter], layer.scalings[adapter]


# -- average and routing_weighted: the single LoRA against the definition ----------------------------------------------
@pytest.mark.parametrize("case, total", [("mole_block", 1.0), ("loramoe", 1.0), ("smora", 2.0)])
def test_average_is_the_mean_expert_delta(case, total, tmp_path):
    """average: sum_e (W/E) s B_e A_e with W what a token's weights sum to (SMoRA: top_k = 2 ranks of weight sum k)."""
    model = routed(case)
    result = export(model, tmp_path / "avg", "average")
    name = "model.layers.1.mlp.up_proj"
    a, b, s = experts_of(model, name)
    want = sum(total / a.shape[0] * s * b[e] @ a[e] for e in range(a.shape[0]))  # one expert at a time
    torch.testing.assert_close(lora_delta(result.model, name), want, rtol=1e-5, atol=1e-6)


def test_routing_weighted_uses_each_experts_mean_routing_weight(tmp_path):
    """top-1 MoLE: an expert's mean weight is the fraction of tokens it got, which routing_stats reports per layer
    (padding excluded): the hand computation runs the fit rows as one batch and reads those loads."""
    model = routed("mole_block")
    result = export(model, tmp_path / "rw", "routing_weighted")
    calib = load_calibration(None, TOK, rows=32)
    batch = next(batches(calib.fit, calib.pad_id, batch_size=len(calib.fit)))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    stats = moe_peft.routing_stats(model)
    for layer_index in (0, 1):
        block = f"model.layers.{layer_index}.mlp"
        load = torch.tensor(stats[f"{block}.gate_proj[default]"]["load"], dtype=torch.float64)
        assert stats[f"{block}.gate_proj[default]"]["tokens"] == int(batch["attention_mask"].sum())
        for projection in ("gate_proj", "up_proj", "down_proj"):
            name = f"{block}.{projection}"
            a, b, s = experts_of(model, name)
            want = sum(load[e] * s * (b[e].double() @ a[e].double()) for e in range(a.shape[0]))
            torch.testing.assert_close(lora_delta(result.model, name).double(), want, rtol=1e-5, atol=1e-6)


def test_collector_and_coefficients_on_a_hand_made_routing():
    """Padding tokens are left out; null slots (-1) count for no expert; c_e = sum of e's weights / tokens."""
    layer = nn.Linear(3, 2, bias=False)
    idx = torch.tensor([[0, 1], [1, -1], [2, 0], [0, 0]])  # [T, k], the last token is padding
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.6, 0.4], [9.0, 9.0]])
    part = RoutedLinear(
        name="x", source="test", layer=layer, adapter="a", config=None, lora_A=torch.randn(3, 2, 3),
        lora_B=torch.randn(3, 2, 2), scale=torch.ones(3), weight_total=1.0, route=lambda x, batch: (idx, weights),
    )  # fmt: skip
    collector = approx.Collector([part], fit=False)
    collector.mask = torch.tensor([[1, 1, 1, 0]])  # [B, S]
    with collector.attached():
        layer(torch.randn(1, 4, 3))
    coef = approx.coefficients(part, "routing_weighted", collector.stats[id(part)])
    torch.testing.assert_close(coef, torch.tensor([0.7 + 0.4, 0.3 + 1.0, 0.6], dtype=torch.float64) / 3)


def test_rank_truncation_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 20, generator=g), torch.randn(16, 12, generator=g)
    new_a, new_b = approx.truncate(a, b, 5)
    u, s, vh = torch.linalg.svd((b @ a).double())
    want = (u[:, :5] * s[:5]) @ vh[:5]  # Eckart-Young
    torch.testing.assert_close((new_b @ new_a).double(), want, rtol=1e-4, atol=1e-4)


# -- svd: reduced-rank least squares ---------------------------------------------------------------------------------
def _stats(x, d):
    x, d = x.double(), d.double()
    return approx.LayerStats(torch.zeros(1), tokens=x.shape[0], sxx=x.T @ x, cdx=d.T @ x, dd=float(d.square().sum()))


def test_svd_fit_is_the_reduced_rank_least_squares_solution():
    """Hand computation: M0 = lstsq(X, D), then the rank-R projection of the fitted values M0 X^T (Izenman's
    reduced-rank regression); ours streams only S = X^T X and C = D^T X."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64)
    experts = torch.randn(3, 8, 10, generator=g, dtype=torch.float64)  # 3 full-rank "experts"
    pick = torch.randint(0, 3, (200,), generator=g)
    d = torch.einsum("toi,ti->to", experts[pick], x)  # each token's delta from its expert: [T, out]
    rank = 3
    m0 = torch.linalg.lstsq(x, d).solution.T  # [out, in]
    u = torch.linalg.svd(m0 @ x.T, full_matrices=False).U[:, :rank]  # fitted values [out, T]
    want = u @ u.T @ m0
    a, b, residual = approx.svd_fit(_stats(x, d), rank, ridge=1e-12)
    got = b.double() @ a.double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    objective = lambda m: float((x @ m.T - d).square().sum())  # noqa: E731
    assert math.isclose(residual, objective(got) / float(d.square().sum()), rel_tol=1e-5)
    # it beats the other rank-R candidates: the plain SVD truncation of M0, and of the routing-weighted mean
    plain = torch.linalg.svd(m0)
    truncated = (plain.U[:, :rank] * plain.S[:rank]) @ plain.Vh[:rank]
    mean = experts[pick].mean(0)
    mean_r = torch.linalg.svd(mean)
    assert objective(got) <= objective(truncated) + 1e-9
    assert objective(got) <= objective((mean_r.U[:, :rank] * mean_r.S[:rank]) @ mean_r.Vh[:rank]) + 1e-9


def test_svd_recovers_a_delta_that_is_already_rank_r():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(8, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 10, generator=g, dtype=torch.float64)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    a, b, residual = approx.svd_fit(_stats(x, x @ m.T), 2, ridge=1e-12)
    torch.testing.assert_close(b.double() @ a.double(), m, rtol=1e-5, atol=1e-5)
    assert residual < 1e-8


def test_svd_export_fits_the_tokens_the_routed_layers_saw(tmp_path):
    """End to end: the exported delta of a layer equals svd_fit on stats recomputed by hand from the layer inputs."""
    model = routed("mole_linear_top2")
    result = export(model, tmp_path / "svd", "svd", rank=2)
    name = "model.layers.0.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    inputs = []
    handle = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    calib = load_calibration(None, TOK, rows=32)
    xs, ds = [], []
    with torch.no_grad():
        for batch in batches(calib.fit, calib.pad_id):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            x = inputs.pop()[batch["attention_mask"].bool()]  # [T, in], padding dropped
            routing = layer.routers["default"](x)
            a, b, s = experts_of(model, name)
            d = torch.stack(  # the routed delta, token by token and slot by slot
                [
                    sum(w * s * (b[e] @ (a[e] @ xt)) for e, w in zip(i.tolist(), ws) if e >= 0)
                    for xt, i, ws in zip(x, routing.idx, routing.weights)
                ]
            )
            xs.append(x)
            ds.append(d)
    handle.remove()
    fa, fb, _ = approx.svd_fit(_stats(torch.cat(xs), torch.cat(ds)), 2, ridge=1e-4)
    torch.testing.assert_close(lora_delta(result.model, name), fb @ fa, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "svd" / "adapter_config.json").read_text())["r"] == 2
    assert 0 <= result.record["options"]["svd_relative_residual_mean"] <= 1


# -- MHR-mu, mixed adapters, and what loads without moe_peft -----------------------------------------------------------
def test_mhr_average_is_mhr_mu(tmp_path):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)
    model = get_peft_model(base, mhr_config("mhr", task_type="CAUSAL_LM"))
    randomize_mhr(model)
    model.eval()
    reference = copy.deepcopy(model)
    moe_peft.mhr.set_mode(reference, "mhr_mu")
    want = moe_peft.mhr.task_lora_weights(reference, None)
    result = export(model, tmp_path / "mu", "average", task_id=0)  # task_id: the routed task the error is measured on
    assert result.record["parts"]["approximated"] == ["MHR 'default' (MHR-mu)"]
    for name, (a, b) in want.items():
        torch.testing.assert_close(lora_delta(result.model, name), (b @ a) * 0.5, rtol=1e-5, atol=1e-6)  # alpha 2 / r 4
    with pytest.raises(ValueError, match="route per task, not per token"):
        export(model, tmp_path / "svd", "svd")


def test_measured_kl_and_perplexity_equal_a_hand_computation():
    calib = load_calibration(None, TOK, rows=16)
    one, two = routed("mole_block", router_bias=False), routed("loramoe")
    got = compare_logits(one, two, calib)
    kl, positions, nll, scored = 0.0, 0, {"one": 0.0, "two": 0.0}, 0
    with torch.no_grad():
        for row in calib.eval:  # one row at a time, no padding
            x = torch.tensor([row["input_ids"]])
            p1, p2 = one(input_ids=x).logits[0].double(), two(input_ids=x).logits[0].double()
            kl += float(
                torch.nn.functional.kl_div(p2.log_softmax(-1), p1.log_softmax(-1), log_target=True, reduction="sum")
            )
            positions += x.shape[1]
            targets = torch.tensor(row["labels"][1:])
            keep = targets != -100
            for key, logits in (("one", p1), ("two", p2)):
                nll[key] += float(torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum"))
            scored += int(keep.sum())
    assert math.isclose(got["kl_mean"], kl / positions, rel_tol=1e-4)
    assert math.isclose(got["ppl_routed"], math.exp(nll["one"] / scored), rel_tol=1e-5)
    assert math.isclose(got["ppl_export"], math.exp(nll["two"] / scored), rel_tol=1e-5)


def test_approximations_load_with_plain_peft_and_transformers_and_record_their_error(tmp_path):
    """LoRA outputs (PEFT), merged outputs (transformers) in a fresh process equal the exported model that was
    measured; the modules_to_save of the source travel with the LoRA; a calibration file is used as given."""
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)
    base.save_pretrained(tmp_path / "base")
    config = make_config(
        "mole_block", task_type="CAUSAL_LM", modules_to_save=["lm_head"], target_modules=MLP + ["q_proj"]
    )
    model = randomize(get_peft_model(base, config))
    rows = [{"text": "abc def ghi"}, {"prompt": "rev abc=", "completion": "cba"}, {"input_ids": [1, 5, 6, 7, 8]}] * 4
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    inputs = left_padded(torch.randint(4, 40, (3, 9), generator=torch.Generator().manual_seed(0)))
    jobs, want = [], {}
    for strategy in ("average", "routing_weighted", "svd"):
        for merge in (False, True):
            result = export(model, tmp_path / f"{strategy}-{merge}", strategy, calibration=str(path), merge=merge)
            error = result.record["measured_error"]
            assert error["kl_mean"] > 0 and error["ppl_export"] > 0 and "exact_match" not in error  # no task column
            assert (
                result.record["calibration"]["source"] == str(path) and result.record["calibration"]["eval_rows"] == 3
            )
            assert not result.record["exact"] and result.record["parts"]["approximated"] == ["MoLE 'default'"]
            kind = "full" if merge else "lora"
            jobs.append({"kind": kind, "path": result.path, "base": str(tmp_path / "base"), **inputs})
            want[result.path] = routed_outputs(result.model, inputs)
    got = load_fresh(tmp_path, jobs)
    for path_, (logits, tokens) in want.items():
        torch.testing.assert_close(got[path_]["logits"], logits, rtol=1e-5, atol=1e-5, msg=path_)
        assert torch.equal(got[path_]["tokens"], tokens)
    # the merged export and the LoRA export of a strategy are the same model
    for strategy in ("average", "routing_weighted", "svd"):
        torch.testing.assert_close(
            got[str(tmp_path / f"{strategy}-True")]["logits"],
            got[str(tmp_path / f"{strategy}-False")]["logits"],
            rtol=1e-4,
            atol=1e-4,  # W + B A in one weight vs W x + B A x: float rounding only
        )


def test_phatgoose_top_k_library_routing_weighted_uses_its_gates_and_expert_scalings(library, tmp_path):  # noqa: F811
    lib = moe_peft.phatgoose.assemble(small_base(), library, top_k=2).eval()
    result = export(lib, tmp_path / "pg", "routing_weighted")
    name = "model.layers.1.mlp.gate_proj"
    layer = lib.base_model.model.get_submodule(name)
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    calib = load_calibration(None, TOK, rows=32)
    weight_sum, tokens = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches(calib.fit, calib.pad_id):
            lib(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            x = seen.pop()[batch["attention_mask"].bool()]  # [T, in]
            idx, w = layer.route("default", x, 1)  # the library's own routing: top-2 of the gate logits
            for row, ws in zip(idx.tolist(), w.tolist()):
                for e, v in zip(row, ws):
                    weight_sum[e] += v
            tokens += x.shape[0]
    handle.remove()
    c = weight_sum / tokens
    a, b = layer.phatgoose_A["default"], layer.phatgoose_B["default"]
    s = layer.phatgoose_scaling["default"]  # each expert keeps its own lora_alpha / r (rsLoRA for e1)
    want = sum(c[e] * s[e] * (b[e].double() @ a[e].double()) for e in range(3))
    torch.testing.assert_close(lora_delta(result.model, name).double(), want, rtol=1e-5, atol=1e-6)


def test_mixed_adapter_keeps_its_exact_parts_exact(tmp_path):
    """Routed MoLE on an MoE base's attention (approximated) with expert LoRA on its fused experts (exact under the
    base routing): the plain LoRA holds the expert LoRA unchanged, in PEFT's target_parameters layout."""
    from moe_peft.experts import MoELoraExperts
    from peft.tuners.lora.layer import ParamWrapper

    from moe_peft.bases import tiny_moe

    config = moe_peft.MoLEConfig(
        r=4,
        num_experts=3,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    model = randomize(get_peft_model(tiny_moe("mixtral"), config))
    result = export(model, tmp_path / "mixed", "svd", calibration=[{"input_ids": list(range(4, 30))}] * 8)
    assert result.record["parts"]["exact"] == ["expert LoRA 'default' (base routing)"]
    assert result.record["parts"]["approximated"] == ["MoLE 'default'"]
    source = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, MoELoraExperts)}
    checked = 0
    for name, module in result.model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = source[name.replace(".base_layer", "")]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # [E*R, in], [out, R*E]
            num_experts, rank = owner.layout.num_experts, module.r["default"]
            a = a.reshape(num_experts, rank, -1)  # rows expert-major
            b = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)  # column j*E + e: rank j of expert e
            delta = torch.bmm(b, a) * module.scaling["default"]
            torch.testing.assert_close(
                delta, owner.get_delta_weight("default", module.parameter_name), rtol=1e-5, atol=1e-6
            )
            checked += 1
    assert checked == 2 * 3  # two parameters in each of the three layers


# -- modality groups (MoLEConfig.modality_experts): the routed model needs each token's group ------------------------
def _grouped(granularity="linear"):
    base = tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2)
    config = moe_peft.MoLEConfig(
        r=4, top_k=1, modality_experts={"text": 2, "image": 2}, router_granularity=granularity, target_modules=MLP,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return randomize(get_peft_model(base, config))


def _typed_rows(n=16, seed=0):
    """input_ids rows with each token's modality group (0 text, 1 image), of varied lengths (padding in batches)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + i % 4
        rows.append(
            {
                "input_ids": torch.randint(4, VOCAB, (length,), generator=g).tolist(),
                "token_types": torch.randint(0, 2, (length,), generator=g).tolist(),
            }
        )
    return rows


def test_modality_groups_without_token_types_are_refused_naming_the_fix(tmp_path):
    model = _grouped()
    for strategy in ("average", "routing_weighted", "svd"):
        with pytest.raises(ValueError, match=r"modality_experts.*calibration data \(bundled\) does not carry.*"
                                             r"token_types \(one group index per token, 0\.\.1 in the order"):  # fmt: skip
            export(model, tmp_path / strategy, strategy)
        assert not (tmp_path / strategy).exists()
    untyped = [{"input_ids": r["input_ids"]} for r in _typed_rows()]
    with pytest.raises(ValueError, match="give them on every row"):
        export(model, tmp_path / "half", "svd", calibration=untyped[:8] + _typed_rows()[8:])
    with pytest.raises(ValueError, match="row 0 has token_types but no input_ids"):
        export(model, tmp_path / "text", "svd", calibration=[{"text": "ab", "token_types": [0, 1]}] * 4)
    with pytest.raises(ValueError, match="row 0 has 2 token_types for 3 input_ids"):
        export(model, tmp_path / "short", "svd", calibration=[{"input_ids": [5, 6, 7], "token_types": [0, 1]}] * 4)


def test_modality_groups_fit_and_measure_with_the_rows_token_types(tmp_path):
    """routing_weighted: c_e is each expert's share of the fit tokens routed within their groups (linear routers,
    which the collector routes as the layer does); the measured error is the routed model run with token_types
    against the export, by hand; the record counts each group's tokens."""
    model = _grouped()
    rows = _typed_rows()
    result = export(model, tmp_path / "rw", "routing_weighted", calibration=rows)
    calib = load_calibration(rows, None)
    fit = next(batches(calib.fit, calib.pad_id, batch_size=len(calib.fit)))
    with torch.no_grad():
        model(input_ids=fit["input_ids"], attention_mask=fit["attention_mask"], token_types=fit["token_types"])
    stats = moe_peft.routing_stats(model)
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        assert stats[f"{name}[default]"]["tokens"] == int(fit["attention_mask"].sum())
        load = torch.tensor(stats[f"{name}[default]"]["load"], dtype=torch.float64)  # top-1: the pick share
        a, b, s = experts_of(model, name)
        want = sum(load[e] * s * (b[e].double() @ a[e].double()) for e in range(a.shape[0]))
        torch.testing.assert_close(lora_delta(result.model, name).double(), want, rtol=1e-5, atol=1e-6)

    held = next(batches(calib.eval, calib.pad_id, batch_size=len(calib.eval)))
    mask = held["attention_mask"].bool()
    with torch.no_grad():
        routed_logits = model(input_ids=held["input_ids"], attention_mask=held["attention_mask"],
                              token_types=held["token_types"]).logits  # fmt: skip
        export_logits = result.model(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits
    want_diff = float((routed_logits.double() - export_logits.double()).abs()[mask].max())
    record = result.record
    assert record["measured_error"]["max_abs_logit_diff"] == pytest.approx(want_diff, rel=1e-6)
    assert record["calibration"]["token_types"] is True
    types = [t for r in calib.eval for t in r["token_types"]]
    assert record["calibration"]["modality_tokens"]["eval"] == {"text": types.count(0), "image": types.count(1)}
    assert "exact_match" not in record["measured_error"]  # generation would need each token's modality

    for strategy in ("average", "svd"):  # the other approximations run on the same rows
        assert export(model, tmp_path / strategy, strategy, calibration=rows).record["measured_error"]["positions"]


def test_a_llava_model_takes_the_modality_from_its_image_tokens_and_says_what_was_measured(tmp_path, capsys):
    """On a LLaVA-family model the image tokens give the modality; text-only calibration rows measure no image
    token, which the record and the printed summary say."""
    from moe_peft.bases import tiny_llava

    config = moe_peft.MoLEConfig(
        r=2,
        modality_experts={"text": 2, "image": 2},
        target_modules=r".*language_model.*\.(gate_proj|up_proj|down_proj)",
    )
    model = randomize(get_peft_model(tiny_llava(), config))
    rows = [{"input_ids": list(range(5, 12 + i % 3))} for i in range(8)]
    result = moe_peft.export(model, "average", tmp_path / "avg", rows, verbose=True)
    held = sum(len(r["input_ids"]) for r in rows[3::4])
    assert result.record["calibration"]["modality_tokens"]["eval"] == {"text": held, "image": 0}
    assert f"modality groups of the held-out tokens: text {held}, image 0 (no image token" in capsys.readouterr().out
