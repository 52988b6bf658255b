"""bench/gpu_check.py's pieces that decide what the GPU run checks, and the device wheel list.

The whole rehearsal (``bench/gpu_check.py --smoke``: the shipped recipes at toy widths, killed and resumed,
exported through the gate) takes ~2.5 min on 2 cores and runs by hand before a GPU call, not in make test."""

import re
import sys

import pytest
from tiny import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_a_mapping_override_is_yaml_flow_style_that_omegaconf_reads_as_a_mapping():
    from omegaconf import OmegaConf

    text = gpu_check.mapping({"hidden_size": 64, "num_hidden_layers": 2})
    assert OmegaConf.from_dotlist([f"x={text}"]).x == {"hidden_size": 64, "num_hidden_layers": 2}


def test_trained_batches_reads_composers_step_minus_one_convention():
    records = [
        {"step": 0, "time/batch": 0},
        {"step": 0, "loss/train/total": 9.0},
        {"step": 1, "loss/train/total": 8.0},
        {"step": 2, "metrics/eval/LanguageCrossEntropy": 7.0},
    ]
    assert gpu_check.trained_batches(records) == [1, 2]


@pytest.mark.parametrize(
    "argv, message", [(["--steps", "1"], "at least 2"), (["--stages", "prune,fly"], "unknown fly")]
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(["--output", "x", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_smoke_departs_from_the_recipes_only_in_device_precision_sizes_and_workers():
    keys = {o.split("=")[0] for o in gpu_check.Sizes(True, 2, 10).run_overrides()}
    assert keys <= {
        "device",
        "precision",
        "max_seq_len",
        "global_train_batch_size",
        "device_train_microbatch_size",
        "device_eval_batch_size",
        "train_loader.num_workers",
        "eval_loader.num_workers",
        "fsdp_config",
    }
    assert gpu_check.Sizes(False, 4, 10).run_overrides() == []


def test_device_wheels_are_the_torch211_locks_versions():
    lock = (REPO / "locks/py312-torch211.txt").read_text()
    pins = [
        line
        for line in (REPO / "bench/device_wheels.txt").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert len(pins) > 20
    for pin in pins:
        name, version = pin.split("==")
        if name == "mlflow-skinny":  # the lock has mlflow itself: the same version, without its server
            name = "mlflow"
        found = re.search(rf"^{re.escape(name)}==(\S+)", lock, re.M | re.I)
        assert found and found.group(1) == version, f"{pin}: the lock has {found and found.group(0)}"
