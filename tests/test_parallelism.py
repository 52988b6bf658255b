"""The yaml fsdp_config -> Composer FSDP2 config: strategy translation, the HYBRID_SHARD mesh, refusals."""

import logging
from pathlib import Path

import pytest
import torch
from composer.utils.parallelism import FSDP2Config, FSDPConfig

from shearing.composer.parallelism import build_parallelism_config, keep_fp32
from shearing.config import load_config

YAMLS_DIR = Path(__file__).resolve().parents[1] / "yamls"

RECIPE = {
    "sharding_strategy": "FULL_SHARD",
    "mixed_precision": "DEFAULT",
    "activation_checkpointing": True,
    "state_dict_type": "full",
    "use_orig_params": True,
    "limit_all_gathers": True,
}


def build(cfg, world=16, local=8, **kw):
    return build_parallelism_config(cfg, world_size=world, local_world_size=local, **kw)["fsdp"]


def test_recipe_keys_become_fsdp2_without_an_environment_variable(monkeypatch):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    config = build(RECIPE)
    assert isinstance(config, FSDP2Config)
    assert config.activation_checkpointing and config.state_dict_type == "full"
    assert config.mixed_precision == "DEFAULT" and config.reshard_after_forward is True
    assert config.data_parallel_shard_degree == -1 and config.data_parallel_replicate_degree is None


def test_hybrid_shard_is_a_2d_mesh_sharded_within_a_node():
    config = build({**RECIPE, "sharding_strategy": "HYBRID_SHARD"}, world=16, local=8)
    assert (config.data_parallel_replicate_degree, config.data_parallel_shard_degree) == (2, 8)
    assert config.reshard_after_forward is True
    zero2 = build({"sharding_strategy": "_HYBRID_SHARD_ZERO2"}, world=16, local=8)
    assert (zero2.data_parallel_replicate_degree, zero2.data_parallel_shard_degree) == (2, 8)
    assert zero2.reshard_after_forward is False
    assert build({"sharding_strategy": "SHARD_GRAD_OP"}).reshard_after_forward is False
    explicit = build({"data_parallel_shard_degree": 1, "data_parallel_replicate_degree": 2}, world=2, local=2)
    assert (explicit.data_parallel_replicate_degree, explicit.data_parallel_shard_degree) == (2, 1)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"sharding_strategy": "NO_SHARD"}, "NO_SHARD"),
        ({"sharding_strategy": "FULLSHARD"}, "sharding_strategy='FULLSHARD'"),
        ({"use_orig_params": False}, "use_orig_params=false"),
        ({"auto_wrap": True}, r"\['auto_wrap'\]"),
        ({"version": 3}, "version=3"),
        ({"data_parallel_shard_degree": 3, "data_parallel_replicate_degree": 2}, "world size 16"),
    ],
)
def test_bad_fsdp_config_is_refused_with_the_fix(cfg, match):
    with pytest.raises(ValueError, match=match):
        build(cfg)


def test_version_1_keeps_composer_fsdp1_and_refuses_flat_params_for_pruning():
    assert isinstance(build({**RECIPE, "version": 1}), FSDPConfig)
    with pytest.raises(ValueError, match="use_orig_params: true"):
        build({**RECIPE, "version": 1, "use_orig_params": False}, pruning=True)
    assert build_parallelism_config(None) is None


@pytest.mark.parametrize("path", sorted(YAMLS_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_committed_recipes_run_fsdp2_with_checkpointing_full_state_dict_and_mixed_precision(path):
    cfg = load_config(path)
    if not cfg.fsdp_config:
        return
    config = build(cfg.fsdp_config, pruning=cfg.pruning is not None)
    assert isinstance(config, FSDP2Config), path
    assert config.activation_checkpointing and config.state_dict_type == "full"
    assert config.mixed_precision == "DEFAULT"
    hybrid = build({**cfg.fsdp_config, "sharding_strategy": "HYBRID_SHARD"}, world=16, local=8)
    assert (hybrid.data_parallel_replicate_degree, hybrid.data_parallel_shard_degree) == (2, 8)


def test_fsdp1_pruning_with_mixed_precision_warns_that_masks_are_gathered_in_bf16(caplog):
    with caplog.at_level(logging.WARNING, logger="shearing.composer.parallelism"):
        build({**RECIPE, "version": 1}, pruning=True)
    assert "version: 2 (the L0 module stays fp32) or mixed_precision: FULL" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shearing.composer.parallelism"):
        build({**RECIPE, "version": 1, "mixed_precision": "FULL"}, pruning=True)
        build({**RECIPE, "version": 1})  # continued pre-training: no L0 module
        build(RECIPE, pruning=True)  # FSDP2: keep_fp32 handles it
    assert "L0 module" not in caplog.text


def test_keep_fp32_is_a_no_op_on_a_module_fsdp2_does_not_wrap():
    assert keep_fp32(torch.nn.Linear(2, 2)) is False
