"""The README's commands cannot drift: every command in its ``` blocks is checked, the CPU ones are run.

Each logical line (``\\`` continuations joined, comments dropped) of a shell block is one command. Every
command must name things that exist: a ``make`` target of the Makefile, a ``python -m`` module or a
``python``/``composer`` script of this repository, a yaml under ``yamls/``, ``key=value`` overrides that
load with ``shearing.config.load_config`` (and ``variables.*`` keys the yaml has), and only flags that the
CLI's own ``--help`` lists (composer's launcher included). Inline code spans that start with ``python`` or
``composer`` get the same module/script/flag checks. Then each command is either in ``RUNS_ON_CPU`` (run
here against the tiny fixtures, placeholders like ``/path/to/hf_dir`` / ``DATA_DIR`` replaced) or in
``NOT_RUN`` (needs a GPU, real data, or minutes: checked, not run); a new kind of command fails until it
is put in one of them. All ``--help`` texts come from one subprocess, so the whole file takes ~30 s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shearing.config import load_config
from shearing.plan import render_plan

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PROGRAMS = (
    "make",
    "python",
    "composer",
    "source",
    "export",
    "srun",
    "bash",
    "docker",
    "sbatch",
    "scripts/launch_multinode.sh",
)
# Blocks that are program output or a file's text, not commands: their first line.
NOT_SHELL = ("field ", "#!/bin/bash")
# Commands run on CPU: (regex on the command) -> runner below.
RUNS_ON_CPU = {
    r"^python -m shearing\.plan yamls/\S+\.yaml$": "plan",
    r"^python -m shearing\.plan --source \w+ --target-params \S+$": "plan",
    r"^composer train\.py yamls/testing/prune_tiny\.yaml ": "tiny_prune",
    r"^source \.venv/bin/activate$": "activate",
}
# Checked but not run: (program, module or script, first yaml/target) heads.
NOT_RUN = {
    ("make", "install"): "creates the venv (~1-2 min fresh); the suite runs inside it",
    ("make", "demo"): "the whole demo pipeline, ~6-7 min",
    ("make", "test"): "the test suite itself",
    ("make", "lint"): "ruff over the tree",
    ("make", "install-gpu"): "GPU machines: builds flash-attn",
    ("python", "data_prep/redpajama.py"): "needs a RedPajama download",
    ("python", "data_prep/tokenize_domains.py"): "0.4B tokens of real data",
    ("python", "-m shearing.reference_losses"): "a 7B source on real data (the SmolLM2 walk-through runs it)",
    ("python", "-m shearing.export"): "needs a pruning run of a 7B model",
    ("python", "-m shearing.evaluate"): "needs a 2.7B model and a GPU",
    ("python", "-m shearing.report"): "needs the 7B runs",
    ("composer", "yamls/pruning/llama2_7b_to_2.7b.yaml"): "LLaMA2-7B on GPUs",
    ("composer", "yamls/continued_pretraining/llama2_2.7b.yaml"): "50B tokens on GPUs",
    ("export", "MASTER_ADDR"): "Slurm environment",
    ("make", "test-torch211"): "the second profile's test subset (CI runs it)",
    ("docker", "build"): "no Docker here: tests/test_dockerfile.py checks the Dockerfile",
    ("docker", "run"): "needs the image and a GPU",
    ("scripts/launch_multinode.sh", "yamls/pruning/llama2_7b_to_2.7b.yaml"): "two GPU nodes "
    "(tests/test_multinode.py runs the script with two launchers on one machine)",
    ("sbatch", "--nodes=2"): "a Slurm cluster",
}


def code_blocks(text: str) -> list[list[str]]:
    """The shell blocks: fences without a language or marked bash/sh/shell (``yaml`` blocks are config)."""
    blocks = re.findall(r"^```([a-z]*)\n(.*?)^```", text, re.M | re.S)
    return [block.splitlines() for lang, block in blocks if lang in ("", "bash", "sh", "shell")]


def logical_lines(lines: list[str]) -> list[str]:
    """Join ``\\`` continuations; drop comment lines and trailing ``# ...`` comments."""
    out, current = [], ""
    for line in lines:
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            out.append(re.sub(r"\s+#\s.*$", "", current).strip())
            current = ""
    return [" ".join(c.split()) for c in out if c.strip()]


def commands() -> list[str]:
    found = []
    for lines in code_blocks(README):
        first = next((line for line in lines if line.strip()), "")
        if first.startswith(NOT_SHELL):
            if first.startswith("#!"):  # a script: check its srun payload like a command
                found += [c for c in logical_lines(lines) if c.startswith(("srun", "export"))]
            continue
        found += logical_lines(lines)
    return found


def split(command: str) -> list[str]:
    """Words of one command, ``&&`` chains split off, ``VAR=value`` prefixes and ``[optional]`` brackets removed."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    return words


def parts(command: str) -> list[str]:
    return [part.strip() for part in command.split("&&")]


def head(words: list[str]) -> tuple[str, str]:
    program = words[0]
    if program == "python":
        return program, f"-m {words[2]}" if words[1] == "-m" else words[1]
    if program == "composer":
        return program, next(w for w in words if w.endswith(".yaml"))
    if program == "export":
        return program, words[1].split("=")[0]
    return program, words[1] if len(words) > 1 else ""


def inline_commands() -> list[str]:
    spans = re.findall(r"`((?:OMP_NUM_THREADS=\d+ )?(?:python|composer) [^`]+)`", README)
    return [" ".join(span.split()) for span in spans]


ALL = commands()

# The SmolLM2 walk-through: its commands run, as written, in test_the_smollm2_walk_through_runs_as_written.
WALK_THROUGH_TITLE = "## A real small model on CPU: SmolLM2-135M, step by step\n"
WALK_THROUGH_TEXT = README.split(WALK_THROUGH_TITLE, 1)[1].split("\n## ", 1)[0]
WALK_THROUGH = [c for lines in code_blocks(WALK_THROUGH_TEXT) for c in logical_lines(lines)]
# What that test adds to each command (the first pattern that matches): sizes and step counts only, through
# the flags and overrides the README uses, and --force on the export: two pruning steps cannot converge, so the
# gate refuses them (the test checks that the export records it). The README section lists these.
WALK_THROUGH_STEPS = (
    "variables.max_seq_len=64 variables.max_duration=2ba variables.eval_interval=2ba "
    "variables.save_interval=2ba global_train_batch_size=2 device_train_microbatch_size=2"
)
WALK_THROUGH_SMOKE = {
    r"^python bench/corpus\.py ": "--chars 40000",
    r"^python data_prep/tokenize_domains\.py ": "--seq-len 64 --eval-seqs 4",
    r"^python -m shearing\.reference_losses ": "",
    r"^python -m shearing\.plan ": "",
    r"^composer train\.py yamls/small/smollm2_135m_to_51m\.yaml ": WALK_THROUGH_STEPS,
    r"^python -m shearing\.export ": "--force",
    r"^composer train\.py yamls/small/smollm2_51m_cpt\.yaml ": WALK_THROUGH_STEPS,
    r"^python -m shearing\.evaluate .*--tasks ": "--limit 4",
    r"^python -m shearing\.report ": "",
}
# The repository paths the walk-through reads, linked into the folder it runs in (its outputs land there).
WALK_THROUGH_LINKS = ("train.py", "yamls", "data_prep", "bench", "examples")
CLIS = sorted(
    {f"-m {m}" for m in re.findall(r"python -m (shearing\.\w+)", README)}
    | set(re.findall(r"\b((?:data_prep|bench)/\w+\.py)\b", README))
)

HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys
out = {}
for cli in sys.argv[1:]:
    buffer = io.StringIO()
    sys.argv = [cli, "--help"]
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            if cli == "composer":
                from composer.cli.launcher import main
                main()
            elif cli.startswith("-m "):
                runpy.run_module(cli[3:], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, cli.rsplit("/", 1)[0])
                runpy.run_path(cli, run_name="__main__")
    except SystemExit as e:
        buffer.write(f"\n<exit {e.code}>")
    except Exception as e:
        buffer.write(f"\n<error {type(e).__name__}: {e}>")
    out[cli] = buffer.getvalue()
print("HELP-JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, "composer", *CLIS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "HELP-JSON" in proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("HELP-JSON", 1)[1])


def test_the_readme_has_commands_and_says_how_to_activate():
    assert len(ALL) >= 15, ALL
    assert "make install && source .venv/bin/activate" in ALL
    assert not any("pip install" in c and "uv pip" not in c for c in ALL + inline_commands())


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_named_in_the_readme_has_a_help(cli, help_texts):
    text = help_texts[cli]
    assert "<exit 0>" in text and "usage:" in text, f"{cli} --help failed:\n{text[-2000:]}"


def check_command(part: str, help_texts: dict[str, str]) -> None:
    words = split(part)
    program = words[0]
    assert program in PROGRAMS, f"{part!r}: unknown program {program!r}"
    if program == "srun":  # srun bash -c 'composer ...'
        for inner in parts(words[words.index("-c") + 1]):
            check_command(inner, help_texts)
        return
    if program == "make":
        for target in (w for w in words[1:] if "=" not in w):
            dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
            assert dry.returncode == 0, f"{part!r}: make target {target!r}: {dry.stderr}"
        return
    if program in ("source", "export"):
        return
    if program == "docker":
        assert (REPO / "Dockerfile").is_file(), f"{part!r}: no Dockerfile"
        return
    if program in ("sbatch", "scripts/launch_multinode.sh"):  # [sbatch flags] SCRIPT yaml overrides
        script = next(w for w in words if w.startswith("scripts/"))
        assert os.access(REPO / script, os.X_OK), f"{part!r}: {script} is not an executable script"
        yaml = next(w for w in words if w.endswith(".yaml"))
        overrides = [w for w in words[words.index(yaml) + 1 :] if "=" in w]
        cfg = load_config(REPO / yaml, overrides)
        for key in (item.split("=", 1)[0] for item in overrides):
            if key.startswith("variables."):
                assert key.split(".")[1] in cfg.variables, f"{part!r}: {yaml} has no {key}"
        return
    flags = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", " ".join(w for w in words if "=" not in w))
    if program == "python":
        cli = f"-m {words[2]}" if words[1] == "-m" else words[1]
        flags = [f for f in flags if f != "-m"]
        assert cli.startswith("-m ") or (REPO / cli).is_file(), f"{part!r}: no script {cli}"
        text = help_texts.get(cli)
        assert text is not None, f"{part!r}: {cli} is not collected"
    else:  # composer [launcher flags] train.py yaml overrides
        assert (REPO / "train.py").is_file()
        yaml = next((w for w in words if w.endswith(".yaml")), None)  # inline `composer -n 8 train.py ...`
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        cfg = load_config(REPO / yaml, overrides) if yaml else None
        for item in overrides if cfg else ():
            key = item.split("=", 1)[0]
            if key.startswith("variables."):
                assert key.split(".")[1] in cfg.variables, f"{part!r}: {yaml} has no {key}"
        text = help_texts["composer"]
        flags = [f for f in flags if words.index(f) < words.index("train.py")]
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"{part!r}: {flag} is not a flag of it"
        )


@pytest.mark.parametrize("command", ALL + inline_commands())
def test_every_command_names_what_exists(command, help_texts):
    for part in parts(command):
        check_command(part, help_texts)


@pytest.mark.parametrize("command", ALL)
def test_every_command_is_run_here_or_listed_as_not_run(command):
    for part in parts(command):
        if any(re.search(pattern, part) for pattern in RUNS_ON_CPU) or part in WALK_THROUGH:
            continue
        words = split(part)
        if words[0] == "srun":
            continue  # its payload is a composer command, checked above; the block is Slurm-only
        assert head(words) in NOT_RUN, f"{part!r}: add it to RUNS_ON_CPU (and run it) or to NOT_RUN with why"


def test_plan_runs_for_every_recipe_the_readme_names():
    yamls = sorted(set(re.findall(r"yamls/[\w/.]+?\.yaml", README)))
    recipes = [y for y in yamls if (REPO / y).is_file()]
    named = {Path(y).name for y in re.findall(r"`([\w.]+\.yaml)`", README)}
    for name in named:  # `llama2_7b_to_1.3b.yaml` after a full path names a recipe too
        matches = list((REPO / "yamls").rglob(name))
        assert matches, f"the README names {name}, which is not under yamls/"
    for y in recipes:
        render_plan(str(REPO / y))


def test_the_cpu_commands_run(tmp_path, tiny_gqa_dir, tiny_data):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    ran = set()
    for command in ALL:
        for part in parts(command):
            kind = next((k for p, k in RUNS_ON_CPU.items() if re.search(p, part)), None)
            if kind is None:
                continue
            ran.add(kind)
            if kind == "activate":
                assert (REPO / ".venv/bin/activate").is_file() or sys.prefix != sys.base_prefix
                continue
            line = part.replace("/path/to/hf_dir", str(tiny_gqa_dir)).replace("DATA_DIR", str(tiny_data))
            if kind == "tiny_prune":  # the README's line, shortened to 10 steps
                line += f" variables.save_folder={tmp_path / 'run'} variables.max_duration=10ba"
                line += " variables.eval_interval=10ba variables.save_interval=10ba"
            proc = subprocess.run(
                shlex.split(line), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{line}\n{(proc.stdout + proc.stderr)[-3000:]}"
            if kind == "plan":
                assert "parameters" in proc.stdout
            else:
                assert "[batch=10/10]" in proc.stdout + proc.stderr
    assert ran == set(RUNS_ON_CPU.values()), ran


def test_the_walk_through_has_the_whole_chain():
    """Data prep from raw text, reference losses, plan (and --target-params), prune, export, CPT, evaluate
    (with the local lm-eval task), report: each command has its smoke sizes, each smoke pattern a command."""
    steps = [next((p for p in WALK_THROUGH_SMOKE if re.search(p, c)), None) for c in WALK_THROUGH]
    assert None not in steps, [c for c, p in zip(WALK_THROUGH, steps, strict=True) if p is None]
    assert set(steps) == set(WALK_THROUGH_SMOKE)
    assert any("--no-bos --eos-token '<|im_end|>'" in c for c in WALK_THROUGH)
    assert any("--target-params" in c for c in WALK_THROUGH)
    assert any("--include-path examples/lm_eval --local-tasks-only" in c for c in WALK_THROUGH)


@pytest.mark.slow
def test_the_smollm2_walk_through_runs_as_written(tmp_path, smollm2_dir):
    """The README's SmolLM2 commands, in order, as a user types them in a fresh folder (the repository's
    scripts and yamls linked in), SMOLLM2_DIR replaced; only WALK_THROUGH_SMOKE's sizes are added."""
    work = tmp_path / "work"
    work.mkdir()
    for name in WALK_THROUGH_LINKS:
        (work / name).symlink_to(REPO / name)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    outputs = {}
    for command in WALK_THROUGH:
        extra = next(value for pattern, value in WALK_THROUGH_SMOKE.items() if re.search(pattern, command))
        line = f"{command.replace('SMOLLM2_DIR', str(smollm2_dir))} {extra}".strip()
        proc = subprocess.run(
            shlex.split(line), cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{line}\n{(proc.stdout + proc.stderr)[-4000:]}"
        outputs[command] = proc.stdout + proc.stderr

    manifest = json.loads((work / "data_smol/manifest.json").read_text())
    assert set(manifest["domains"]) == {"code", "docs", "legal", "prose"}
    assert set(json.loads((work / "data_smol/ref.json").read_text())["reference_losses"]) == set(
        manifest["domains"]
    )
    planned = "\n".join(out for c, out in outputs.items() if c.startswith("python -m shearing.plan"))
    assert "51,330,432" in planned and "56,198,784" in planned  # the recipe; --target-params 56M's first
    export = json.loads((work / "out/smol_51m_pruned/shearing_export.json").read_text())
    assert export["target"]["num_params"] == 51_330_432
    assert export["gate"]["forced"] is True and export["gate"]["failures"]  # 2 steps: refused, then forced
    cpt = json.loads((work / "runs/smol_cpt/hf/config.json").read_text())
    assert (cpt["num_hidden_layers"], cpt["hidden_size"]) == (20, 384)
    for name in ("source", "pruned", "cpt"):
        result = json.loads((work / f"out/{name}_results.json").read_text())
        assert set(result["domains"]) == set(manifest["domains"]) and "tiny_facts" in result["tasks"]
    report = (work / "report_smol/report.md").read_text()
    assert "smol_51m_pruned (export)" in report and "smol_cpt" in report
