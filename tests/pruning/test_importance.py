"""Activation importance: the hooks compute what they claim, the logits keep the order, calibration data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shearing.data.manifest import load_manifest
from shearing.data.shards import DomainShards
from shearing.models.hf_io import load_source_model
from shearing.models.shapes import named_shape, resolve_target_shape
from shearing.pruning import hard_concrete as hc
from shearing.pruning.importance import (
    IMPORTANCE_BANDS,
    SCORE_NAMES,
    activation_importance,
    calibration_batches,
    importance_log_alphas,
)
from shearing.pruning.l0 import FamilySpec, L0Module

# tiny_gqa: D 64, L 4, H 8 over G 4 (2 heads per group), K 16, F 176, V 512.
L, H, G, K, F_, D = 4, 8, 4, 16, 176, 64


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_source_model("tiny_gqa", seed=3)
    return model.eval()


def _ids(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _captured(model, ids):
    """Every layer's input/output, attention output, o_proj input and down_proj input from one forward."""
    seen: dict[str, list] = {k: [] for k in ("x", "y", "attn", "ctx", "act")}
    handles = []
    for layer in model.model.layers:
        handles += [
            layer.register_forward_pre_hook(lambda m, a: seen["x"].append(a[0].reshape(-1, D))),
            layer.register_forward_hook(lambda m, a, o: seen["y"].append(o.reshape(-1, D))),
            layer.self_attn.register_forward_hook(lambda m, a, o: seen["attn"].append(o.reshape(-1, D))),
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a: seen["ctx"].append(a[0].reshape(-1, H * K))
            ),
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a: seen["act"].append(a[0].reshape(-1, F_))
            ),
        ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def test_scores_equal_a_manual_computation(tiny):
    ids = _ids()
    scores = activation_importance(tiny, [ids[:4], ids[4:]])  # two batches: sums, not means of means
    assert set(scores) == set(SCORE_NAMES)
    seen = _captured(tiny, ids)
    head, group = torch.zeros(L, H), torch.zeros(L, G)
    inter = torch.zeros(L, F_)
    turns = {name: torch.zeros(L) for name in ("layer", "head_layer", "mlp")}
    for i, layer in enumerate(tiny.model.layers):
        w = layer.self_attn.o_proj.weight
        outs = [seen["ctx"][i][:, h * K : (h + 1) * K] @ w[:, h * K : (h + 1) * K].T for h in range(H)]
        for h in range(H):
            head[i, h] = outs[h].pow(2).sum(-1).mean().sqrt()
        for g in range(G):
            group[i, g] = (outs[2 * g] + outs[2 * g + 1]).pow(2).sum(-1).mean().sqrt()
        for f in range(F_):
            inter[i, f] = seen["act"][i][:, f].pow(2).mean().sqrt() * layer.mlp.down_proj.weight[:, f].norm()
        x, y, mid = seen["x"][i], seen["y"][i], seen["x"][i] + seen["attn"][i]
        turns["layer"][i] = (1 - F.cosine_similarity(x, y, dim=-1)).mean()
        turns["head_layer"][i] = (1 - F.cosine_similarity(x, mid, dim=-1)).mean()
        turns["mlp"][i] = (1 - F.cosine_similarity(mid, y, dim=-1)).mean()
    stream = [seen["x"][0], *seen["y"]]
    hidden = torch.stack([s.pow(2).mean(0) / s.pow(2).mean() for s in stream]).mean(0).sqrt()
    for name, want in {
        "head": head,
        "kv_group": group,
        "intermediate": inter,
        "hidden": hidden,
        **turns,
    }.items():
        torch.testing.assert_close(scores[name], want, rtol=1e-4, atol=1e-7, msg=name)


def test_zeroed_and_scaled_output_weights_move_only_their_unit(tiny):
    ids = _ids(4, 16, seed=1)
    base = activation_importance(tiny, [ids])
    heads, _ = load_source_model("tiny_gqa", seed=3)
    channels, _ = load_source_model("tiny_gqa", seed=3)
    with torch.no_grad():
        o = heads.model.layers[2].self_attn.o_proj.weight
        o[:, 3 * K : 4 * K] = 0.0  # head 3 (group 1) of layer 2 writes nothing
        o[:, 6 * K : 7 * K] *= 3.0  # head 6 of layer 2 writes 3x as much
        down = channels.model.layers[1].mlp.down_proj.weight
        down[:, 7] = 0.0
        down[:, 9] *= 2.0
    scores = activation_importance(heads, [ids])
    assert scores["head"][2, 3] == 0
    torch.testing.assert_close(scores["head"][2, 6], 3 * base["head"][2, 6])
    untouched = [h for h in range(H) if h not in (3, 6)]
    torch.testing.assert_close(scores["head"][2, untouched], base["head"][2, untouched])
    torch.testing.assert_close(scores["head"][:2], base["head"][:2])  # layers before it: unchanged
    torch.testing.assert_close(scores["kv_group"][2, 1], base["head"][2, 2])  # group 1 = head 2 alone now
    scores = activation_importance(channels, [ids])
    assert scores["intermediate"][1, 7] == 0
    torch.testing.assert_close(scores["intermediate"][1, 9], 2 * base["intermediate"][1, 9])
    keep = [f for f in range(F_) if f not in (7, 9)]
    torch.testing.assert_close(scores["intermediate"][1, keep], base["intermediate"][1, keep])


def test_a_layer_that_writes_nothing_scores_zero_and_its_stream_is_unchanged(tiny):
    model, _ = load_source_model("tiny_gqa", seed=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 5] *= 20.0  # one loud residual channel
    scores = activation_importance(model, [_ids(4, 16)])
    for name in ("layer", "head_layer", "mlp"):
        assert float(scores[name][1]) == pytest.approx(0.0, abs=1e-6), name
        assert bool((scores[name][[0, 2, 3]] > 1e-4).all()), name
    assert int(scores["hidden"].argmax()) == 5


def test_bf16_autocast_gives_the_same_ranking_and_restores_the_mode(tiny):
    ids = _ids(4, 16)
    tiny.train()
    exact = activation_importance(tiny, [ids])
    assert tiny.training
    tiny.eval()
    approx = activation_importance(tiny, [ids], autocast=True)
    assert all(torch.isfinite(v).all() for v in approx.values())
    for name in ("head", "intermediate", "hidden"):
        torch.testing.assert_close(approx[name], exact[name], rtol=0.05, atol=1e-3, msg=name)
    with pytest.raises(ValueError, match="no calibration batches"):
        activation_importance(tiny, [])


# ----------------------------------------------------------------------------- log-alpha mapping

SPECS = [
    FamilySpec("hidden", (D,), 48),
    FamilySpec("kv_group", (L, G), 2),
    FamilySpec("head", (L, H), 1, group=2),
    FamilySpec("intermediate", (L, F_), 96),
    FamilySpec("layer", (L,), 3),
]


def _random_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {spec.name: torch.rand(spec.shape, generator=g) for spec in SPECS}


def test_log_alphas_are_monotone_per_row_and_inside_the_clamp():
    scores = _random_scores()
    scores["intermediate"][0, :10] = 0.5  # ties: the lower index ranks lower
    alphas = importance_log_alphas(scores, SPECS)
    for spec in SPECS:
        la, s = alphas[spec.name], scores[spec.name]
        low, high = IMPORTANCE_BANDS[spec.name]
        assert la.shape == s.shape
        assert float(la.min()) == pytest.approx(low) and float(la.max()) == pytest.approx(high)
        assert hc.LOG_ALPHA_MIN < float(la.min()) and float(la.max()) < hc.LOG_ALPHA_MAX
        if spec.group:
            la, s = la.reshape(L, -1, spec.group), s.reshape(L, -1, spec.group)
        order = torch.argsort(s, dim=-1, stable=True)
        assert bool((torch.diff(la.gather(-1, order), dim=-1) > 0).all()), spec.name  # strictly increasing
    tied = alphas["intermediate"][0, :10]
    assert bool((torch.diff(tied) > 0).all())
    # A grouped head family is ranked inside each group: every group has its own top and bottom.
    heads, (low, high) = alphas["head"].reshape(L, G, 2), IMPORTANCE_BANDS["head"]
    torch.testing.assert_close(heads.max(-1).values, torch.full((L, G), high))
    torch.testing.assert_close(heads.min(-1).values, torch.full((L, G), low))


def test_log_alphas_refuse_wrong_scores():
    scores = _random_scores()
    with pytest.raises(ValueError, match="shape"):
        importance_log_alphas({**scores, "head": torch.rand(L, H + 1)}, SPECS)
    with pytest.raises(ValueError, match="no importance scores for mask family 'layer'"):
        importance_log_alphas({k: v for k, v in scores.items() if k != "layer"}, SPECS)
    with pytest.raises(ValueError, match="not finite"):
        importance_log_alphas({**scores, "hidden": torch.full((D,), float("nan"))}, SPECS)
    with pytest.raises(ValueError, match="strictly inside the clamp"):
        importance_log_alphas(scores, SPECS, bands={"layer": (2.0, 4.7)})


def test_final_masks_of_an_importance_initialised_l0_keep_the_most_important_units():
    source = named_shape("tiny_gqa")
    target = resolve_target_shape(
        source,
        {
            "hidden_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
        },
    )
    l0 = L0Module(source, target)
    assert set(l0.specs) == {s.name for s in SPECS}
    scores = _random_scores(seed=5)
    l0.init_log_alphas_(importance_log_alphas(scores, l0.specs.values()))
    l0.eval()
    l0.use_final_masks = True
    masks = l0()

    def kept(mask):
        return sorted(torch.nonzero(mask > 0).flatten().tolist())

    def top(score, k):
        return sorted(torch.topk(score, k).indices.tolist())

    assert kept(masks["hidden_z"]) == top(scores["hidden"], 48)
    assert kept(masks["layer_z"]) == top(scores["layer"], 3)
    for i in range(L):
        assert kept(masks["kv_group_z"][i]) == top(scores["kv_group"][i], 2)
        assert kept(masks["intermediate_z"][i]) == top(scores["intermediate"][i], 96)
        pairs = scores["head"][i].reshape(G, 2)
        assert kept(masks["head_z"][i]) == [2 * g + int(pairs[g].argmax()) for g in range(G)]


# ----------------------------------------------------------------------------- calibration data


def _domain_rows(data, domain):
    manifest = load_manifest(data)
    shards = DomainShards(data / "train" / domain, domain, manifest.seq_len, manifest.dtype)
    return {tuple(row) for row in shards.read(np.arange(shards.num_samples)).astype(np.int64).tolist()}


def test_calibration_batches_follow_the_proportions(tiny_data):
    manifest = load_manifest(tiny_data)
    batches = calibration_batches(tiny_data, 100, 64, 32, seed=3)
    assert [tuple(b.shape) for b in batches] == [(32, 64)] * 3 + [(4, 64)]
    assert all(b.dtype == torch.long for b in batches)
    rows = [tuple(r) for b in batches for r in b.tolist()]
    assert len(set(rows)) == 100  # drawn without replacement
    code = _domain_rows(tiny_data, "code")
    share = manifest.token_proportions()["code"]
    assert sum(r in code for r in rows) == round(100 * share)
    again = calibration_batches(tiny_data / "train", 100, 64, 32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(tiny_data, 100, 64, 32, seed=4)
    assert not torch.equal(torch.cat(batches), torch.cat(other))
    # Explicit proportions; a domain that runs short gives all it has and the rest go to the others.
    # The counts come from the manifest: the corpus is the running Python's stdlib, which differs by version.
    n_code = manifest.domains["code"].train.sequences
    n_docs = manifest.domains["docs"].train.sequences
    wanted = min(n_code + n_docs, int(n_code / 0.9) + 50)  # 90% of it is more code than there is
    assert 0.9 * wanted > n_code and wanted <= n_code + n_docs
    many = calibration_batches(tiny_data, wanted, 16, 512, seed=0, proportions={"code": 0.9, "docs": 0.1})
    many_rows = torch.cat(many)
    assert many_rows.shape == (wanted, 16)
    code16 = {r[:16] for r in code}
    assert sum(tuple(r) in code16 for r in many_rows.tolist()) == n_code  # every code row, then docs


def test_calibration_batches_refuse_too_few_sequences_and_longer_sequences(tiny_data):
    manifest = load_manifest(tiny_data)
    total = sum(d.train.sequences for d in manifest.domains.values())
    with pytest.raises(ValueError, match=f"calibration_sequences={total + 1}.*holds only {total}"):
        calibration_batches(tiny_data, total + 1, 64, 8)
    with pytest.raises(ValueError, match="packed into 64-token"):
        calibration_batches(tiny_data, 8, 128, 8)
    with pytest.raises(ValueError, match="positive integer"):
        calibration_batches(tiny_data, 0, 64, 8)


# ----------------------------------------------------------------------------- the run's init

YAML = "yamls/testing/prune_tiny.yaml"


def test_importance_init_is_validated(tiny_gqa_dir, tiny_data, tmp_path):
    from tiny import run_overrides

    from shearing.config import load_config
    from shearing.validation import validate_config

    def check(*extra):
        validate_config(load_config(YAML, run_overrides(tiny_gqa_dir, tiny_data, tmp_path / "run", *extra)))

    total = sum(d.train.sequences for d in load_manifest(tiny_data).domains.values())  # depends on the stdlib
    check("pruning.init=importance")  # 256 of them
    with pytest.raises(ValueError, match=r"pruning.init='random' is not one of \['constant', 'importance'\]"):
        check("pruning.init=random")
    with pytest.raises(ValueError, match="pruning.calibration_sequences=0 must be a positive integer"):
        check("pruning.calibration_sequences=0")
    with pytest.raises(
        ValueError, match=f"calibration_sequences={total + 1} but the train split .* holds only {total}"
    ):
        check("pruning.init=importance", f"pruning.calibration_sequences={total + 1}")
    check("pruning.init=constant", f"pruning.calibration_sequences={total + 1}")  # not read: no error


def test_prune_run_starts_from_importance_logits(tiny_gqa_dir, tiny_data, tmp_path):
    from tiny import run_overrides

    from shearing.composer.builder import build_sheared_llama
    from shearing.config import load_config
    from shearing.spec import resolve_run
    from shearing.train import train_from_yaml

    steps = ["variables.max_duration=3ba", "variables.save_interval=3ba", "variables.eval_interval=3ba"]
    base = run_overrides(
        tiny_gqa_dir, tiny_data, tmp_path / "run", *steps, "pruning.calibration_sequences=48"
    )
    overrides = [*base, "pruning.init=importance"]
    cfg = load_config(YAML, overrides)
    source, _ = load_source_model(tiny_gqa_dir)
    batches = calibration_batches(f"{tiny_data}/train", 48, 64, cfg.device_eval_batch_size, seed=cfg.seed)
    built = build_sheared_llama(resolve_run(cfg)).l0
    want = importance_log_alphas(activation_importance(source, batches), built.specs.values())
    constant = build_sheared_llama(resolve_run(load_config(YAML, base))).l0
    assert set(want) == set(built.log_alphas) == {"hidden", "kv_group", "intermediate", "layer"}
    for name, la in built.log_alphas.items():
        torch.testing.assert_close(la.detach(), want[name], rtol=0, atol=1e-6)
        assert float((la - constant.log_alphas[name]).abs().min()) > 0.15, name  # off the ln 100 edge
    # The run itself (mask_lr tiny so the logits stay at their start): it trained from those logits.
    trainer = train_from_yaml(YAML, [*overrides, "optimizer.mask_lr=1.0e-4"])
    assert int(trainer.state.timestamp.batch) == 3
    l0 = trainer.state.model.l0
    for name, la in l0.log_alphas.items():
        torch.testing.assert_close(la.detach(), want[name], rtol=0, atol=1e-3)
        assert not torch.equal(la.detach(), want[name]), name  # the optimizer did step the logits
    final = l0.deterministic_masks(exact=True)
    kept_layers = want["layer"] > want["layer"].min()  # the top 3 of 4 by importance
    assert torch.equal(final["layer_z"] > 0, kept_layers)
    weights = dict(trainer.state.model.model.named_parameters())
    assert not torch.equal(
        weights["model.layers.0.mlp.up_proj.weight"], source.model.layers[0].mlp.up_proj.weight
    )
