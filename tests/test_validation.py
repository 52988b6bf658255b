"""Config errors fail in ``validate_run``, before the model loads, with the field, the value and the fix.

Most tests go through ``shearing.train.validate_run`` on the tiny pruning yaml pointed at a real tiny HF
checkpoint and real prepared MDS data (so each is a check the old code did not make); a few test the
small functions of ``shearing.validation`` directly.
"""

import json
import shutil
from pathlib import Path

import pytest

from shearing.config import load_config
from shearing.train import validate_run

REPO = Path(__file__).resolve().parents[1]
PRUNE = REPO / "yamls/testing/prune_tiny.yaml"


@pytest.fixture()
def base(tiny_gqa_dir, tiny_data):
    return [f"variables.source_model={tiny_gqa_dir}", f"variables.data_local={tiny_data}"]


def run(base, *overrides, mutate=None):
    cfg = load_config(PRUNE, [*base, *overrides])
    if mutate is not None:
        mutate(cfg)
    validate_run(cfg)


def test_the_tiny_recipe_passes(base):
    run(base)


# 1. Time strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval_interval=50", r"eval_interval=50 has no unit: write '50ba' \(batches\)"),
        ("save_interval=50", r"save_interval=50 has no unit: write '50ba' \(batches\)"),
        ("max_duration=300", r"max_duration=300 has no unit: write '300ba'"),
        ("console_log_interval=10", r"console_log_interval=10 has no unit: write '10ba'"),
        ("scheduler.t_warmup=0.1", r"scheduler.t_warmup=0.1 has no unit: write '0.1dur'"),
        ("pruning.lagrangian_warmup=60", r"pruning.lagrangian_warmup=60 has no unit: write '60ba'"),
        ("eval_interval=300steps", r"eval_interval='300steps' is not a time string.*e.g. '300ba'"),
        ("pruning.lagrangian_warmup=64sp", r"lagrangian_warmup='64sp' is in samples.*ba \(batches\), dur"),
        ("eval_interval=1ep", r"eval_interval='1ep' is in epochs.*domain_mixture train stream is endless"),
        ("save_interval=0ba", r"save_interval='0ba' must be positive"),
    ],
)
def test_time_strings(base, override, message):
    with pytest.raises(ValueError, match=message):
        run(base, override)


def test_lagrangian_warmup_fraction_needs_max_duration_in_batches(base):
    with pytest.raises(
        ValueError, match=r"lagrangian_warmup='0.2dur' is a fraction of max_duration.*'19200tok'"
    ):
        run(base, "max_duration=19200tok")


# 2. Keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "callbacks.dynamic_loading.etaa=1.0",
            r"callbacks.dynamic_loading: unknown key 'etaa' \(did you mean 'eta'\?\)",
        ),
        (
            "train_loader.dataset.shufle=true",
            r"train_loader.dataset: unknown key 'shufle' \(did you mean 'shuffle'\?\)",
        ),
        (
            "eval_loader.dataset.max_seqs_per_domian=4",
            r"eval_loader.dataset: unknown key 'max_seqs_per_domian' \(did you mean 'max_seqs_per_domain'\?\)",
        ),
        (
            "train_loader.num_worker=2",
            r"train_loader: unknown key 'num_worker' \(did you mean 'num_workers'\?\)",
        ),
        (
            "algorithms.gradient_clipping.clipping_treshold=1.0",
            r"algorithms.gradient_clipping: unknown key 'clipping_treshold' \(did you mean 'clipping_threshold'\?\)",
        ),
        ("loggers.metrics_file.foldr=x", r"loggers.metrics_file: unknown key 'foldr'"),
        (
            "+callbacks.speed_monitr={}",
            r"callbacks.speed_monitr: unknown name .*did you mean 'speed_monitor'.*lr_monitor",
        ),
        ("+algorithms.grad_clip={}", r"algorithms.grad_clip: unknown name 'grad_clip'.*gradient_clipping"),
        ("+loggers.wandbb={}", r"loggers.wandbb: unknown name 'wandbb' \(did you mean 'wandb'\?\)"),
        ("train_loader.name=domain_mix", r"dataloaders.domain_mix: unknown name.*domain_mixture"),
    ],
)
def test_unknown_keys_and_names(base, override, message):
    override = override.lstrip("+")
    with pytest.raises(ValueError, match=message):
        run(base, override)


def test_missing_required_argument(base):
    def drop(cfg):
        cfg.algorithms["gradient_clipping"].pop("clipping_type")

    with pytest.raises(
        ValueError, match=r"algorithms.gradient_clipping is missing required key\(s\) \['clipping_type'\]"
    ):
        run(base, mutate=drop)


# 3. Enumerated values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "callbacks.dynamic_loading.update=clamped",
            r"callbacks.dynamic_loading.update='clamped' is not one of \['paper', 'released', 'constant'\]",
        ),
        ("precision=bf16", r"precision='bf16' is not one of .*\(did you mean 'amp_bf16'\?\)"),
        ("model.attn_impl=flash2", r"model.attn_impl='flash2' is not one of \['sdpa', 'flash', 'eager'\]"),
        ("export.dtype=fp16", r"export.dtype='fp16' is not one of \['float32', 'bfloat16', 'float16'\]"),
        ("optimizer.name=adamw", r"optimizer.name='adamw' is not one of \['decoupled_adamw'\]"),
        ("scheduler.name=cosine", r"scheduler.name='cosine' is not one of .*cosine_with_warmup"),
        ("pruning.eval_masks=exact", r"pruning.eval_masks='exact' is not one of \['expected', 'final'\]"),
        (
            "precision=amp_bf16",
            r"precision='amp_bf16' needs a GPU but this run is on the CPU \(device='cpu'\)",
        ),
    ],
)
def test_enumerated_values(base, override, message):
    with pytest.raises(ValueError, match=message):
        run(base, override)


# 4. Cross-field ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "eval_loader.dataset.domains=[code]",
            r"train_loader reads \['code', 'docs'\] and eval_loader reads \['code'\] \(only in train: \['docs'\]",
        ),
        (
            "eval_loader.dataset.domains=[docs,code]",
            r"the same domains in another order\): set both dataset.domains",
        ),
        (
            "train_loader.dataset.domains=[code,wiki]",
            r"train_loader.dataset.domains names \['wiki'\], which the data at",
        ),
        (
            "variables.reference_losses={code: 2.0}",
            r"reference_losses names \['code'\] but the train domains are \['code', 'docs'\] \(missing: \['docs'\]",
        ),
        ("variables.reference_losses={code: 2.0, docs: 2.0, wiki: 1.0}", r"not trained on: \['wiki'\]"),
        ("variables.reference_losses=./no/such/ref.json", r"is neither 'source' nor an existing file"),
    ],
)
def test_cross_field(base, override, message):
    with pytest.raises(ValueError, match=message):
        run(base, override)


def test_matching_reference_losses_pass(base):
    run(base, "variables.reference_losses={code: 2.0, docs: 2.5}")


def test_max_seq_len_longer_than_the_source(tmp_path, tiny_data):
    from tiny import make_hf_llama

    source = make_hf_llama(tmp_path / "short", max_position_embeddings=32)  # the data is packed at 64
    cfg = load_config(PRUNE, [f"variables.source_model={source}", f"variables.data_local={tiny_data}"])
    with pytest.raises(
        ValueError, match=r"max_seq_len=64 is longer than the source's max_position_embeddings=32"
    ):
        validate_run(cfg)


def test_max_seq_len_longer_than_a_named_shape():
    from shearing.validation import check_context_length

    cfg = load_config(REPO / "yamls/pretraining/llama2_1.3b.yaml")  # llama2 shapes: 4096 positions
    check_context_length(cfg, local=False)
    cfg.max_seq_len = 8192
    with pytest.raises(ValueError, match=r"max_seq_len=8192 is longer .*=4096 \(llama2_1.3b\)"):
        check_context_length(cfg, local=False)


# 5. Corrupt files -------------------------------------------------------------------------------


def _copy_data(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def test_manifest_not_json(base, tiny_data, tmp_path):
    data = _copy_data(tiny_data, tmp_path)
    (data / "manifest.json").write_text('{"seq_len": 64, "dtype": ')
    with pytest.raises(ValueError, match=rf"{data / 'manifest.json'} is not valid JSON .*re-run data_prep"):
        run(base, f"variables.data_local={data}")


def test_manifest_missing_field(base, tiny_data, tmp_path):
    data = _copy_data(tiny_data, tmp_path)
    raw = json.loads((data / "manifest.json").read_text())
    del raw["seq_len"]
    (data / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"{data / 'manifest.json'} is missing the field 'seq_len'"):
        run(base, f"variables.data_local={data}")


def test_source_config_not_json(base, tiny_gqa_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_gqa_dir, source)
    (source / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{source / 'config.json'} is not valid JSON.*download it again"):
        run(base, f"variables.source_model={source}")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors(base, tiny_gqa_dir, tmp_path, monkeypatch, damage):
    import shearing.train

    source = tmp_path / "src"
    shutil.copytree(tiny_gqa_dir, source)
    weights = source / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x89PNG not a tensor file" * 10)
    monkeypatch.setattr(shearing.train, "build_model", _no_model)
    with pytest.raises(
        ValueError, match=rf"{weights} is not a readable safetensors file .*download the checkpoint again"
    ):
        shearing.train.train_from_yaml(PRUNE, [*base, f"variables.source_model={source}"])


# The integration test: a bad callback key fails before the model is built. ----------------------


def _no_model(cfg):
    raise AssertionError("build_model was called: validation ran too late")


def test_bad_callback_key_fails_before_the_model_loads(base, monkeypatch):
    import shearing.train

    monkeypatch.setattr(shearing.train, "build_model", _no_model)
    with pytest.raises(
        ValueError, match=r"callbacks.dynamic_loading: unknown key 'etaa' \(did you mean 'eta'\?\)"
    ):
        shearing.train.train_from_yaml(PRUNE, [*base, "callbacks.dynamic_loading.etaa=1.0"])


# Small functions -------------------------------------------------------------------------------


def test_parse_time_units():
    from shearing.validation import parse_time

    assert parse_time("eval_interval", "50ba", ("ba",)).value == 50
    assert parse_time("scheduler.t_warmup", "0.1dur", ("ba", "dur")).value == pytest.approx(0.1)
    with pytest.raises(
        ValueError, match=r"x=1.5dur.*must be between 0 and 1|x='1.5dur' must be between 0 and 1"
    ):
        parse_time("x", "1.5dur", ("dur",))


def test_check_kwargs_accepts_var_keyword_and_rejects_typos():
    from shearing.validation import check_kwargs

    def anything(**kwargs):
        return kwargs

    def exact(alpha, beta=1):
        return alpha, beta

    check_kwargs("callbacks.x", {"whatever": 1}, anything)
    check_kwargs("callbacks.x", {"alpha": 1}, exact)
    with pytest.raises(ValueError, match=r"callbacks.x: unknown key 'alpah' \(did you mean 'alpha'\?\)"):
        check_kwargs("callbacks.x", {"alpah": 1}, exact)


def test_every_committed_yaml_validates_without_files():
    from shearing.validation import validate_config

    for path in sorted((REPO / "yamls").rglob("*.yaml")):
        validate_config(load_config(path), local=False)


# ----------------------------------------------------------------------------- refused before the model loads

BEFORE_LOAD = {
    "proportions_sum": (
        ["train_loader.dataset.proportions=[0.3, 0.3]"],
        r"proportions=\[0.3, 0.3\]: proportions sum to 0.6",
    ),
    "proportions_negative": (
        ["train_loader.dataset.proportions=[-0.5, 1.5]"],
        "'code' is -0.5: proportions must be finite and >= 0",
    ),
    "proportions_nan": (["train_loader.dataset.proportions=[.nan, 1.0]"], "'code' is nan"),
    "proportions_length": (
        ["train_loader.dataset.proportions=[0.5, 0.3, 0.2]"],
        r"got 3 proportions for 2 domains \['code', 'docs'\]",
    ),
    "initial_proportions": (
        ["callbacks.dynamic_loading.initial_proportions={code: 1.5, docs: 0.5}"],
        "initial_proportions=.*sum to 2",
    ),
    "global_batch_0": (["global_train_batch_size=0"], "global_train_batch_size=0 must be a positive integer"),
    "micro_batch_0": (
        ["device_train_microbatch_size=0"],
        "device_train_microbatch_size=0 must be a positive integer",
    ),
    "eval_batch_0": (["device_eval_batch_size=0"], "device_eval_batch_size=0 must be a positive integer"),
    "lr_nan": (["optimizer.lr=.nan"], "optimizer.lr=nan must be a finite number"),
    "lr_zero": (["optimizer.lr=0.0"], "need lr > 0"),
    "betas": (
        ["optimizer.betas=[0.9, 1.5]"],
        r"optimizer.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)",
    ),
    "eta": (["callbacks.dynamic_loading.eta=-1.0"], "dynamic_loading.eta=-1.0 must be a finite number >= 0"),
    "smoothing": (
        ["callbacks.dynamic_loading.smoothing=2.0"],
        r"dynamic_loading.smoothing=2.0 must be in \[0, 1\]",
    ),
    "max_seqs_0": (
        ["eval_loader.dataset.max_seqs_per_domain=0"],
        "max_seqs_per_domain=0 must be a positive integer",
    ),
    "reference_negative": (
        ["variables.reference_losses={code: -1.0, docs: 3.0}"],
        "reference_losses.code=-1.0 must be positive",
    ),
    "load_path": (
        ["load_path=/nonexistent/latest-rank0.pt"],
        "load_path=/nonexistent/latest-rank0.pt does not exist",
    ),
    "autoresume": (["autoresume=true", "variables.save_folder=null"], "autoresume=true needs a save_folder"),
    "variables_typo": (
        ["variables.save_foldr=/tmp/x"],
        r"variables.save_foldr: .* has no variable 'save_foldr'.*did you mean variables.save_folder\?",
    ),
    "target_is_source": (["variables.target_model=tiny_gqa"], "is the source's own shape.*nothing to prune"),
}


@pytest.mark.parametrize("case", list(BEFORE_LOAD))
def test_mistakes_are_refused_before_the_model_loads(case, tiny_gqa_dir, tiny_data, tmp_path, monkeypatch):
    """Each mistake is refused by the run's own entry point, with the key and the fix, while building the model
    would raise: a check that moved after the model load fails here."""
    from tiny import run_overrides

    import shearing.train

    def build_model(cfg):
        raise AssertionError(f"{case}: the model was built before the mistake was refused")

    monkeypatch.setattr(shearing.train, "build_model", build_model)
    extra, match = BEFORE_LOAD[case]
    overrides = run_overrides(
        tiny_gqa_dir,
        tiny_data,
        tmp_path / "run",
        "variables.max_duration=4ba",
        "variables.eval_interval=2ba",
        "variables.reference_losses={code: 3.0, docs: 3.0}",
        *extra,
    )
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        shearing.train.train_from_yaml(PRUNE, overrides)


def test_paths_refused_before_the_model_loads(tiny_gqa_dir, tiny_data, tmp_path, monkeypatch):
    """A save_folder inside the data or the source model's folder, and a domain folder without index.json."""
    import shutil

    from tiny import run_overrides

    import shearing.train

    monkeypatch.setattr(shearing.train, "build_model", lambda cfg: pytest.fail("the model was built"))
    quick = (
        "variables.max_duration=4ba",
        "variables.eval_interval=2ba",
        "variables.reference_losses={code: 3.0, docs: 3.0}",
    )
    for inside, key in (
        (tiny_data / "runs" / "x", "train_loader.dataset.local"),
        (tiny_gqa_dir / "run", "model.source"),
    ):
        with pytest.raises(ValueError, match=f"save_folder={inside} is inside {key}"):
            shearing.train.train_from_yaml(PRUNE, run_overrides(tiny_gqa_dir, tiny_data, inside, *quick))
        assert not inside.exists()
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "eval" / "docs" / "index.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"eval_loader.dataset.local=.*domain 'docs' has no .*index.json"
    ):
        shearing.train.train_from_yaml(PRUNE, run_overrides(tiny_gqa_dir, data, tmp_path / "run", *quick))
    previous = (
        tmp_path / "previous_run"
    )  # a folder given as initial proportions, without dynamic_loading.json
    previous.mkdir()
    with pytest.raises(FileNotFoundError, match=r"initial_proportions=.*previous_run is a folder without"):
        overrides = [*quick, f"callbacks.dynamic_loading.initial_proportions={previous}"]
        shearing.train.train_from_yaml(
            PRUNE, run_overrides(tiny_gqa_dir, tiny_data, tmp_path / "run", *overrides)
        )


def test_short_runs_are_warned_about_not_refused(tiny_gqa_dir, tiny_data, tmp_path, caplog):
    """A warmup or an eval interval longer than the run (a shortened smoke run of a recipe) is said, not refused."""
    from tiny import run_overrides

    from shearing.config import load_config
    from shearing.validation import validate_config

    cfg = load_config(
        PRUNE,
        run_overrides(
            tiny_gqa_dir,
            tiny_data,
            tmp_path / "run",
            "variables.max_duration=4ba",
            "pruning.lagrangian_warmup=640ba",
            "variables.reference_losses={code: 3.0, docs: 3.0}",
        ),
    )
    with caplog.at_level("WARNING", logger="shearing.validation"):
        validate_config(cfg)
    text = caplog.text
    assert "lagrangian_warmup='640ba' is longer than max_duration='4ba'" in text and "ends at 1%" in text
    assert "eval_interval='100ba' is longer than max_duration='4ba'" in text


@pytest.mark.slow
def test_a_refusal_is_a_message_and_exit_2_not_a_traceback(tiny_gqa_dir, tiny_data, tmp_path):
    """``python train.py`` and ``composer train.py`` (the launcher) with a refused config: exit 2 (the launcher
    passes on its rank's failure), the message once per rank with the key and the fix, no Python traceback."""
    import subprocess
    import sys

    from tiny import run_overrides

    overrides = run_overrides(tiny_gqa_dir, tiny_data, tmp_path / "run", "global_train_batch_size=0")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(
        [sys.executable, "train.py", str(PRUNE), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 2, plain.stderr[-3000:]
    assert "shearing: the run was refused before it started:" in plain.stderr
    assert "global_train_batch_size=0 must be a positive integer" in plain.stderr
    assert "Traceback" not in plain.stderr + plain.stdout
    composer = Path(sys.executable).with_name("composer")
    launched = subprocess.run(
        [str(composer), "-n", "1", "train.py", str(PRUNE), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = launched.stdout + launched.stderr
    assert (
        launched.returncode != 0 and out.count("global_train_batch_size=0 must be a positive integer") == 1
    ), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
