"""The registry seam: pyproject's entry points and shearing.composer.registry name the same pieces, llm-foundry finds
them, and a yaml can swap the model builder and the pruning algorithm by name."""

import tomllib
from pathlib import Path

import pytest
from llmfoundry import registry

from shearing.composer import registry as ours
from shearing.config import load_config
from shearing.validation import validate_config

REPO = Path(__file__).resolve().parents[1]


def test_entry_points_and_the_registry_module_declare_the_same_table():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    tables = {f"llmfoundry_{name}": table for name, table in ours.TABLES.items()}
    assert declared == tables


@pytest.mark.parametrize(
    ("registry_name", "name"),
    [(r, n) for r, table in ours.TABLES.items() for n in table],
)
def test_llm_foundry_resolves_every_entry_to_our_object(registry_name, name):
    target = getattr(registry, registry_name)
    assert name in target
    module, attribute = ours.TABLES[registry_name][name].split(":")
    assert target.get(name) is ours._resolve(f"{module}:{attribute}")


def _swap_run(tmp_path, overrides):
    return load_config(
        REPO / "yamls/testing/prune_tiny.yaml",
        ["variables.source_model=tiny_gqa", f"variables.data_local={tmp_path}", *overrides],
    )


def test_unregistered_model_or_algorithm_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"model\.name='nope'.*models registry"):
        validate_config(_swap_run(tmp_path, ["model.name=nope"]), local=False)
    with pytest.raises(
        ValueError, match=r"pruning\.algorithm='lagrangian'.*did you mean 'lagrangian_pruning'"
    ):
        validate_config(_swap_run(tmp_path, ["pruning.algorithm=lagrangian"]), local=False)


def test_a_yaml_swaps_the_model_builder_and_the_algorithm(tmp_path):
    from composer.core import Algorithm

    from shearing.composer.builder import build_sheared_llama
    from shearing.spec import resolve_run
    from shearing.train import build_algorithms, build_model

    built = []

    def my_model(spec):  # a registered model builder is called with the run's RunSpec
        built.append(spec.cfg.model.source)
        return build_sheared_llama(spec)

    class MyClock(Algorithm):
        def __init__(self, lagrangian_warmup):
            self.lagrangian_warmup = lagrangian_warmup

        def match(self, event, state):
            return False

        def apply(self, event, state, logger):
            pass

    registry.models.register("test_swapped_model", func=my_model)
    registry.algorithms.register("test_swapped_clock", func=MyClock)
    cfg = _swap_run(tmp_path, ["model.name=test_swapped_model", "pruning.algorithm=test_swapped_clock"])
    model = build_model(resolve_run(cfg, local=False))
    assert built == ["tiny_gqa"] and model.l0 is not None
    algorithms = build_algorithms(cfg)
    assert isinstance(algorithms[-1], MyClock) and algorithms[-1].lagrangian_warmup == "0.2dur"
