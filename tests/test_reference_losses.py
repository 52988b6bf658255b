"""Reference losses: the scaling-law fit against SPEC §3's table, model eval on MDS shards, the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from streaming import MDSWriter
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from shearing.data.manifest import DomainEntry, Manifest, SplitStats, save_manifest
from shearing.reference_losses import (
    domain_eval_losses,
    fit_scaling_law,
    load_reference_losses,
    main,
    predict_reference_losses,
    scaling_law,
)

# SPEC §3: LLaMA2 7B / 13B / 70B losses, then the reference losses for 1.3B and 2.7B.
TABLE = {
    "cc": (1.7520, 1.6680, 1.4621, 1.9643, 1.8712),
    "github": (0.6216, 0.5791, 0.4890, 0.7459, 0.6883),
    "book": (1.9063, 1.8242, 1.6450, 2.1393, 2.0325),
    "stackexchange": (1.4482, 1.3936, 1.2805, 1.6117, 1.5353),
    "wiki": (1.4844, 1.3945, 1.2118, 1.7590, 1.6297),
    "arxiv": (1.2637, 1.2109, 1.1148, 1.4449, 1.3560),
    "c4": (1.9219, 1.8486, 1.6848, 2.1251, 2.0328),
}
PARAMS = [6_738_415_616, 13_015_864_320, 68_976_648_192]
PARAMS_1_3B, PARAMS_2_7B = 1_345_423_360, 2_701_560_320
POINTS = {"params": PARAMS, "losses": {domain: list(row[:3]) for domain, row in TABLE.items()}}


@pytest.mark.parametrize(("target", "column"), [(PARAMS_1_3B, 3), (PARAMS_2_7B, 4)])
def test_scaling_law_reproduces_the_spec_table(target: int, column: int) -> None:
    predicted = predict_reference_losses(POINTS, target)
    for domain, row in TABLE.items():
        assert predicted[domain] == pytest.approx(row[column], abs=1e-3), domain


def test_fit_interpolates_and_recovers_a_known_law() -> None:
    for domain, row in TABLE.items():
        a, b, c = fit_scaling_law(PARAMS, row[:3])
        assert b > 0, domain
        assert [scaling_law(n, a, b, c) for n in PARAMS] == pytest.approx(row[:3], abs=1e-6), domain
    a, b, c = fit_scaling_law(
        [1e8, 4e8, 1.6e9, 7e9, 3e10],
        [scaling_law(n, 406.4, 0.336, 0.69) for n in [1e8, 4e8, 1.6e9, 7e9, 3e10]],
    )
    assert (a, b, c) == pytest.approx((406.4, 0.336, 0.69), rel=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        fit_scaling_law(PARAMS[:2], [1.0, 0.9])


@pytest.mark.parametrize("b", [0.05, 0.3, 0.8, 1.5])
@pytest.mark.parametrize("c", [-2.0, 0.5, 1.5])
def test_fit_recovers_loss_like_laws_far_from_p0(b: float, c: float) -> None:
    sizes = [1e8, 4e8, 1.6e9, 7e9, 3e10]
    for gap in (0.3, 2.0):  # L(1e8) - c: how far the smallest model sits above the floor
        law = (gap * 1e8**b, b, c)
        fit = fit_scaling_law(sizes, [scaling_law(n, *law) for n in sizes])
        for target in (2e7, 1.3e9, 1e12):
            assert scaling_law(target, *fit) == pytest.approx(scaling_law(target, *law), abs=1e-9)


def test_scaling_law_cli_writes_metadata(tmp_path: Path) -> None:
    points = tmp_path / "points.json"
    points.write_text(json.dumps(POINTS))
    out = tmp_path / "ref.json"
    assert (
        main(["--scaling-law", str(points), "--target-params", str(PARAMS_2_7B), "--output", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["method"] == "scaling_law" and result["target_params"] == PARAMS_2_7B
    assert result["reference_losses"]["wiki"] == pytest.approx(1.6297, abs=1e-3)
    assert set(result["fit"]["cc"]) == {"a", "b", "c"}
    assert load_reference_losses(out, ["wiki", "cc"]) == {
        "wiki": result["reference_losses"]["wiki"],
        "cc": result["reference_losses"]["cc"],
    }


def test_load_reference_losses_mapping_and_errors(tmp_path: Path) -> None:
    assert load_reference_losses({"cc": 1.9, "wiki": 1.6, "extra": 1}, ["wiki", "cc"]) == {
        "wiki": 1.6,
        "cc": 1.9,
    }
    with pytest.raises(ValueError, match="reference losses missing domain 'book': the given mapping has cc"):
        load_reference_losses({"cc": 1.9}, ["cc", "book"])
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"cc": 2.0}))
    assert load_reference_losses(str(flat), ["cc"]) == {"cc": 2.0}
    with pytest.raises(ValueError, match="reference losses missing domain 'github': .*flat.json has cc"):
        load_reference_losses(flat, ["github"])
    with pytest.raises(ValueError, match="does not exist"):
        load_reference_losses(tmp_path / "nope.json", ["cc"])
    with pytest.raises(ValueError, match="must be a finite number"):
        load_reference_losses({"cc": float("nan")}, ["cc"])


SEQ, VOCAB = 12, 48
DTYPE_KEYWORD = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config).eval()


def _eval_dir(root: Path, sequences: dict[str, np.ndarray]) -> Path:
    for domain, seqs in sequences.items():
        with MDSWriter(out=str(root / "eval" / domain), columns={"tokens": "ndarray:uint16"}) as writer:
            for seq in seqs:
                writer.write({"tokens": seq})
    empty = SplitStats(sequences=0, tokens=0)
    domains = {d: DomainEntry(train=empty, eval=SplitStats(len(s), s.size)) for d, s in sequences.items()}
    save_manifest(Manifest(seq_len=SEQ, dtype="uint16", domains=domains), root)
    return root / "eval"


def test_domain_eval_losses_match_hf_loss(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sequences = {
        "zeta": rng.integers(0, VOCAB, (5, SEQ), dtype=np.uint16),
        "alpha": rng.integers(0, VOCAB // 4, (4, SEQ), dtype=np.uint16),
    }
    data = _eval_dir(tmp_path, sequences)
    model = _tiny_model()
    losses = domain_eval_losses(model, data, batch_size=3, progress=False)
    assert list(losses) == ["zeta", "alpha"]  # the manifest's order
    with torch.no_grad():
        for domain, seqs in sequences.items():
            ids = torch.from_numpy(seqs.astype(np.int64))
            expected = np.mean([model(input_ids=row[None], labels=row[None]).loss.item() for row in ids])
            assert losses[domain] == pytest.approx(expected, rel=1e-5), domain
        first_two = model(
            input_ids=torch.from_numpy(sequences["zeta"][:2].astype(np.int64)),
            labels=torch.from_numpy(sequences["zeta"][:2].astype(np.int64)),
        ).loss.item()
    assert domain_eval_losses(model, data, batch_size=8, max_seqs=2, progress=False)["zeta"] == pytest.approx(
        first_two, rel=1e-5
    )


def test_model_cli_and_vocab_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _eval_dir(tmp_path / "data", {"cc": np.full((2, SEQ), 3, dtype=np.uint16)})
    model = _tiny_model()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "ref.json"
    loads = []
    load = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        loads.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(data),
                "--output",
                str(out),
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["method"] == "model_eval" and result["model"] == str(tmp_path / "model")
    # the dtype under the name the installed transformers reads (5.x deprecates torch_dtype, 4.x ignores dtype)
    assert [{k: v for k, v in kw.items() if "dtype" in k} for kw in loads] == [{DTYPE_KEYWORD: torch.float32}]
    assert result["reference_losses"]["cc"] > 0
    bad = _eval_dir(tmp_path / "bad", {"cc": np.full((1, SEQ), VOCAB + 5, dtype=np.uint16)})
    with pytest.raises(ValueError, match="another tokenizer"):
        domain_eval_losses(model, bad, progress=False)
