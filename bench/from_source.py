"""``bench/reproduce.py --source HF_DIR``: four ways to cut a real pre-trained model, at one target and budget.

    python bench/reproduce.py --source HF_DIR [--target-shape JSON] [--scale 1.0] [--device cpu|gpu]
        [--prune-steps N] [--cpt-steps N] [--mixtures dynamic,fixed] [--methods oneshot,l0_constant,...]
        [--calibration-seqs 32] [--no-force-export] [--output bench_smol]

The bench corpus (``bench/corpus.py``, four domains) is tokenized with the source's own tokenizer
(``shearing.data.prep.prepare`` with ``tokenizer=HF_DIR``); the source is not trained. Its per-domain
eval losses are the reference losses of dynamic batch loading. At the same target shape and the same
training tokens (T_prune + T_cpt steps), every row is:

- (a) ``oneshot``: ``oneshot_masks`` on the source with activation importance
  (``shearing.pruning.importance.activation_importance`` over ``--calibration-seqs`` train sequences;
  magnitude when that module is not there, said in the row's note), cut, exported, then CPT for
  T_prune + T_cpt steps (the pruning steps it skips go to CPT);
- (b) ``l0_constant``: L0 masks from the paper's constant init (``pruning.init=constant``) for T_prune
  steps, exported, CPT for T_cpt steps;
- (c) ``l0_importance``: as (b) with ``pruning.init=importance``, ``pruning.calibration_sequences=N``;
- (d) ``l0_importance_kd``: (c)'s pruned model, CPT with ``distillation.alpha=0.5``,
  ``distillation.temperature=1.0``, teacher the source;

each once per ``--mixtures`` entry: ``dynamic`` (``dynamic_loading.update=paper``, in pruning and CPT)
and ``fixed`` (``update=constant``: the manifest's proportions throughout). A row whose feature this
checkout lacks (the config has no ``pruning.init`` or no ``distillation:`` section) is skipped with a
note; a row that fails is recorded with its error and the others still run.

The export gate of the pruning runs is used as is: when it refuses (masks not converged in a short
budget) the refusal is recorded and the run is re-exported from its last checkpoint with ``force``
(``--no-force-export``: the row stops there, shown as refused) — the table's ``gate`` column says
which. Reported per row: per-domain and average eval loss right after pruning (the exported pruned
model, before CPT) and after CPT (``shearing.evaluate`` on the exports), training tokens, wall seconds
(pruning + CPT; calibration and evaluation included). Writes ``OUTPUT/reproduce.json`` and
``OUTPUT/reproduce.md`` and prints the tables. Resumable: finished runs are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

from reproduce import Bench, check_steps, flow_mapping

# SmolLM2-135M (hidden 576, 30 layers, 9 heads over 3 KV groups, MLP 1536; 134.5M parameters) to
# 51.3M parameters (32.4M outside the embedding, 31% of the source's 106.2M).
DEFAULT_TARGET = {
    "hidden_size": 384,
    "num_hidden_layers": 20,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "intermediate_size": 1024,
}
# Steps at --scale 1 on the CPU, batch 8 x 128 tokens: a smoke-sized default (the L0 masks cannot converge
# in 8 steps; the gate refuses and the rows are forced). Measured on the 2-core CPU: a pruning step of
# SmolLM2-135M at batch 4 x 128 ~6 s, a CPT step of the 51M target ~2.7 s, at load ~2 (OMP_NUM_THREADS=2).
# How many pruning steps the masks need (SmolLM2-135M -> 51M, batch 4 x 128, the paper's 0.2dur Lagrangian
# warmup): at 160 steps head, MLP and layer families are within 0.003 of their targets, the hidden family
# (one mask across every layer) still 0.10-0.12 past it, overshooting from step ~60 and coming back slowly;
# at 320 steps (64 of warmup) every family is within 0.01 from step ~160 and within 0.005 at the end.
CPU_STEPS = {"prune": 8, "cpt": 8}
CPU_BATCH = 8
# --device gpu: one H100/H200 in bf16, batch 32 x 512 tokens (16,384 a step), never run (no GPU here), sized
# from FLOPs: 6 x params x tokens is 13.2 TFLOP a pruning step (134.5M) and 5.0 a CPT step (51.3M), the
# teacher's forward 4.4. 300 pruning steps, from the CPU runs above (the hidden family needs more than 160).
# The default dynamic-mixture rows: 2 pruning runs x 300 steps (7.9 PFLOP), 700 CPT steps (3.5), 100
# distilled (0.4): 11.8 PFLOP, 1.6-3.3 minutes at 60-120 TFLOP/s, plus 7 run start-ups, exports and
# evaluations (~4 minutes). --mixtures dynamic,fixed doubles the training part.
GPU_STEPS = {"prune": 300, "cpt": 100}
GPU_BATCH = 32
GPU_SEQ_LEN = 512
DEFAULT_MIXTURES = {"cpu": "dynamic,fixed", "gpu": "dynamic"}

METHODS = {
    "oneshot": "(a) one-shot importance prune + CPT",
    "l0_constant": "(b) L0 masks, constant init (paper) + CPT",
    "l0_importance": "(c) L0 masks, importance init + CPT",
    "l0_importance_kd": "(d) = (c) + distillation from the source in CPT",
}
MIXTURES = {"dynamic": [], "fixed": ["callbacks.dynamic_loading.update=constant"]}


@dataclasses.dataclass
class Features:
    """What this checkout offers; a missing feature makes its rows skip with ``note``."""

    l0_init: bool
    distillation: bool
    activation_importance: bool

    @classmethod
    def detect(cls) -> Features:
        from shearing.config import PruningConfig, RunConfig

        pruning = {f.name for f in dataclasses.fields(PruningConfig)}
        run = {f.name for f in dataclasses.fields(RunConfig)}
        try:
            from shearing.pruning import importance

            activation = hasattr(importance, "activation_importance") and hasattr(
                importance, "calibration_batches"
            )
        except ImportError:
            activation = False
        if activation:
            import inspect

            from shearing.pruning.oneshot import oneshot_masks

            activation = "scores" in inspect.signature(oneshot_masks).parameters
        return cls(
            l0_init={"init", "calibration_sequences"} <= pruning,
            distillation="distillation" in run,
            activation_importance=activation,
        )

    def missing(self, method: str) -> str | None:
        """Why ``method`` cannot run on this checkout, or None."""
        if method in ("l0_importance", "l0_importance_kd") and not self.l0_init:
            return "skipped: this checkout's PruningConfig has no init/calibration_sequences (pruning.init)"
        if method == "l0_importance_kd" and not self.distillation:
            return "skipped: this checkout's RunConfig has no distillation section"
        return None


class RowFailed(RuntimeError):
    """A run a row depends on failed or was refused; the message says which."""


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class SourceBench(Bench):
    def __init__(
        self,
        output: Path,
        source: Path,
        scale: float = 1.0,
        corpus_chars: int = 5_000_000,
        eval_seqs: int = 8,
        device: str = "cpu",
        target_shape: str | None = None,
        batch: int | None = None,
        seq_len: int | None = None,
        mixtures: tuple[str, ...] = ("dynamic", "fixed"),
        methods: tuple[str, ...] = tuple(METHODS),
        calibration_seqs: int = 32,
        force_export: bool = True,
        data: Path | None = None,
        eos_token: str | None = None,
        steps: dict[str, int | None] | None = None,
    ):
        gpu = device == "gpu"
        super().__init__(
            output,
            scale,
            str(Path(source).resolve()),
            corpus_chars,
            eval_seqs,
            device,
            target_shape=target_shape or flow_mapping(json.dumps(DEFAULT_TARGET)),
            batch=batch or (GPU_BATCH if gpu else CPU_BATCH),
            seq_len=seq_len or (GPU_SEQ_LEN if gpu else 128),
            data=data,
        )
        unknown = [m for m in mixtures if m not in MIXTURES]
        if unknown or not mixtures:
            raise SystemExit(
                f"--mixtures {','.join(mixtures)}: give a comma-separated subset of {list(MIXTURES)}"
            )
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise SystemExit(
                f"--methods {','.join(methods)}: give a comma-separated subset of {list(METHODS)}"
            )
        if calibration_seqs < 1:
            raise SystemExit(f"--calibration-seqs must be at least 1, got {calibration_seqs}")
        self.source = Path(source).resolve()
        self.tokenizer = self.source
        self.mixtures = tuple(mixtures)
        self.methods = tuple(m for m in METHODS if m in methods)
        self.calibration_seqs = calibration_seqs
        self.force_export = force_export
        self.eos_token = eos_token  # the document separator, when not the tokenizer's EOS
        self.step_table = GPU_STEPS if gpu else CPU_STEPS
        self.explicit_steps = {k: v for k, v in (steps or {}).items() if v is not None}
        for name, value in self.explicit_steps.items():
            if name not in self.step_table or value < 1:
                raise SystemExit(f"--{name}-steps must be a positive number of steps, got {value}")
        # Few evaluations per run: on the CPU one eval of SmolLM2 costs more than a training step.
        self.evals_per_run = 2
        self.eval_first = False  # the start point of each run is the evaluated export before it
        self.force_scaled_prune = False  # the gate decides; a refusal is recorded (prune())

    def steps(self, name: str) -> int:
        """Steps of ``name`` (prune or cpt): --prune-steps/--cpt-steps, else the device default x --scale."""
        if name in self.explicit_steps:
            return self.explicit_steps[name]
        return max(4, int(self.step_table[name] * self.scale))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "source": str(self.source), "calibration_seqs": self.calibration_seqs}

    # -- checks and data -------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail before any work: the source folder, the target shape against it."""
        from shearing.models.shapes import resolve_source_shape, resolve_target_shape

        if not (self.source / "config.json").is_file():
            raise SystemExit(f"--source {self.source}: not a Hugging Face model folder (no config.json)")
        if (
            not (self.source / "tokenizer.json").is_file()
            and not (self.source / "tokenizer_config.json").is_file()
        ):
            raise SystemExit(
                f"--source {self.source}: no tokenizer in the folder (the corpus is tokenized with it)"
            )
        try:
            self.target = resolve_target_shape(resolve_source_shape(str(self.source)), self.target_spec())
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--target-shape {self.target_shape}: {e}") from None

    def prepare_data(self) -> None:
        from corpus import ensure_corpus, prepare_corpus

        if self.given_data is not None:
            self.use_prepared(self.given_data)
            mine = _file_digest(self.source / "tokenizer.json")
            theirs = _file_digest(Path(self.tokenizer) / "tokenizer.json")
            if mine != theirs:
                raise SystemExit(
                    f"--data {self.given_data} was tokenized with {self.tokenizer}, not the source's tokenizer: "
                    f"prepare it with --tokenizer {self.source}"
                )
            self.tokenizer = self.source
            return
        raw = self.output / "raw"
        ensure_corpus(raw, self.corpus_chars)
        prepare_corpus(
            raw,
            self.source,
            self.data,
            self.seq_len,
            self.eval_seqs,
            progress=False,
            eos_token=self.eos_token,
            no_bos=self.no_bos(),
        )

    def no_bos(self) -> bool:
        """Documents without BOS when the tokenizer names one token as both BOS and EOS (SmolLM2-Instruct's
        ``<|im_start|>``): the GPT-2 convention, documents separated by EOS only, as in pre-training."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.source))
        same = tokenizer.bos_token is not None and tokenizer.bos_token == tokenizer.eos_token
        if same:
            print(
                f"[reproduce] the source's BOS and EOS are both {tokenizer.bos_token!r}: no BOS", flush=True
            )
        return same

    # -- runs ------------------------------------------------------------------------------------------
    def prune(self, name: str, steps: int, overrides: list[str]) -> dict[str, Any]:
        """A pruning run through the export gate; a refusal is recorded, then forced or final."""
        from shearing.pruning.gate import ExportRefused

        marker = self.runs / name / "bench_run.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            check_steps(name, record, steps)
            if record.get("gate") == "refused" or (self.runs / name / "hf" / "config.json").is_file():
                print(f"[reproduce] {name}: done before, skipped", flush=True)
                return record
        t0 = time.time()
        common = [
            f"variables.source_model={self.source}",
            f"variables.reference_losses={self.ref_file}",
            f"variables.target_model={self.target_shape}",
            "model.source_shape=null",
            # The gate's loss half on the run's eval loader: as many batches as the eval split holds.
            f"export.gate_eval_batches={max(1, -(-4 * self.eval_seqs // 16))}",
        ]
        refusal = None
        try:
            self.fit(name, "prune.yaml", steps, [*common, *overrides])
        except ExportRefused as e:
            refusal = str(e)
            print(f"[reproduce] {name}: export refused by the gate: {refusal}", flush=True)
            if self.force_export:
                from shearing.export.hf import export_checkpoint

                # The refusal already measured the loss half of the gate: the forced export checks the
                # sparsity half again (its shearing_export.json records it as forced) without re-measuring.
                export_checkpoint(self.runs / name, self.runs / name / "hf", force=True)
        record = {
            "steps": steps,
            "tokens": steps * self.tokens_per_step,
            "seconds": round(time.time() - t0, 1),
            "gate": "passed" if refusal is None else ("forced" if self.force_export else "refused"),
            "gate_failures": self.gate_failures(name) if refusal is None or self.force_export else [refusal],
            "gate_refusal": refusal,
        }
        marker.write_text(json.dumps(record))
        print(
            f"[reproduce] {name}: {steps} steps in {record['seconds']:.0f} s, gate {record['gate']}",
            flush=True,
        )
        return record

    def gate_failures(self, name: str) -> list[str]:
        path = self.runs / name / "hf" / "shearing_export.json"
        gate = json.loads(path.read_text()).get("gate") if path.is_file() else None
        return list(gate.get("failures", [])) if gate else []

    def cpt(
        self, name: str, init: str, steps: int, prune_run: str | None, extra: list[str]
    ) -> dict[str, Any]:
        overrides = self.cpt_overrides(init, prune_run, ["model.source_shape=null", *extra])
        return self.train(name, "cpt.yaml", steps, overrides)

    def oneshot_cut(self, name: str) -> dict[str, Any]:
        """(a)'s start: one-shot masks on the source (activation importance when available), cut, exported."""
        record = self.done(name)
        if record is not None:
            return record
        from shearing.models.hf_io import load_source_model
        from shearing.pruning.oneshot import oneshot_masks

        t0 = time.time()
        model, _ = load_source_model(str(self.source))
        if self.features.activation_importance:
            from shearing.pruning.importance import activation_importance, calibration_batches

            batches = calibration_batches(
                str(self.data), self.calibration_seqs, self.seq_len, min(16, self.calibration_seqs), self.seed
            )
            # Forward only (bf16 autocast on CUDA); the scores come back as fp32 CPU tensors.
            scores = activation_importance(model.to("cuda" if self.device == "gpu" else "cpu"), batches)
            model.cpu()
            masks, kind = oneshot_masks(model, self.target, scores=scores), "activation"
        else:
            masks, kind = oneshot_masks(model, self.target), "magnitude"
        self.cut_and_export(model, masks, name)
        record = {"steps": 0, "tokens": 0, "seconds": round(time.time() - t0, 1), "scores": kind}
        (self.runs / name / "bench_run.json").write_text(json.dumps(record))
        return record

    # -- rows ------------------------------------------------------------------------------------------
    def row(self, method: str, mixture: str, t_prune: int, t_cpt: int) -> dict[str, Any]:
        """Train (or reuse) the runs of one row; returns the runs' names and records, the start's notes."""
        sfx = "" if mixture == "dynamic" else f".{mixture}"
        mix = MIXTURES[mixture]
        notes: list[str] = []
        if method == "oneshot":
            start = self.oneshot_cut("oneshot_cut")
            notes.append(f"{start['scores']} scores")
            if start["scores"] == "magnitude":
                notes.append("activation importance not in this checkout")
            end = self.cpt("oneshot_cpt" + sfx, "oneshot_cut", t_prune + t_cpt, None, mix)
            return {"parts": ["oneshot_cut", "oneshot_cpt" + sfx], "records": [start, end], "notes": notes}
        init = "constant" if method == "l0_constant" else "importance"
        prune_name = f"l0_{init}_prune{sfx}"
        prune_extra = [*mix]
        if self.features.l0_init:
            prune_extra.append(f"pruning.init={init}")
            if init == "importance":
                prune_extra.append(f"pruning.calibration_sequences={self.calibration_seqs}")
        start = self.prune(prune_name, t_prune, prune_extra)
        if start["gate"] == "refused":
            raise RowFailed(f"{prune_name}: export refused by the gate ({'; '.join(start['gate_failures'])})")
        extra = [*mix]
        cpt_name = f"l0_{init}_cpt{sfx}"
        if method == "l0_importance_kd":
            cpt_name = f"l0_importance_kd_cpt{sfx}"
            extra += [
                "distillation.alpha=0.5",
                "distillation.temperature=1.0",
                f"distillation.teacher={self.source}",
            ]
        end = self.cpt(cpt_name, prune_name, t_cpt, prune_name, extra)
        return {"parts": [prune_name, cpt_name], "records": [start, end], "notes": notes}

    def run(self) -> dict[str, Any]:
        from shearing.config import load_config
        from shearing.models.shapes import count_params, resolve_source_shape

        start = time.time()
        self.check()
        self.claim_output()
        self.prepare_data()
        cfg = load_config(
            str(Path(__file__).resolve().parents[1] / "yamls" / "demo" / "prune.yaml"),
            [
                f"variables.data_local={self.data}",
                f"variables.source_model={self.source}",
                "model.source_shape=null",
                *self.shared_overrides(),
            ],
        )
        self.tokens_per_step = cfg.global_train_batch_size * cfg.max_seq_len
        self.seed = cfg.seed
        self.features = Features.detect()
        t_prune, t_cpt = self.steps("prune"), self.steps("cpt")
        print(
            f"[reproduce] source {self.source}: prune {t_prune} + CPT {t_cpt} steps of {self.tokens_per_step} "
            f"tokens; features {dataclasses.asdict(self.features)}",
            flush=True,
        )
        source_eval = self.evaluate("source", model=self.source)
        if not self.ref_file.is_file():
            reference = {d: v["loss"] for d, v in source_eval["domains"].items()}
            self.ref_file.write_text(json.dumps({"reference_losses": reference, "source": str(self.source)}))

        rows: dict[str, dict[str, Any]] = {}
        for mixture in self.mixtures:
            for method in self.methods:
                what = METHODS[method]
                key = f"{method}/{mixture}"
                row: dict[str, Any] = {"method": method, "mixture": mixture, "what": what}
                rows[key] = row
                skip = self.features.missing(method)
                if skip:
                    row["status"] = skip
                    print(f"[reproduce] {key}: {skip}", flush=True)
                    continue
                try:
                    ran = self.row(method, mixture, t_prune, t_cpt)
                    pruned, final = (self.evaluate(p) for p in ran["parts"])
                except Exception as e:  # one broken row must not lose the others' hours
                    traceback.print_exc()
                    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    print(f"[reproduce] {key}: {row['status']}", flush=True)
                    continue
                first, second = ran["records"]
                row.update(
                    status="ok",
                    runs=ran["parts"],
                    notes=ran["notes"],
                    gate=first.get("gate", "n/a (no masks)"),
                    gate_failures=first.get("gate_failures", []),
                    pruned={"domains": _losses(pruned), "average_loss": pruned["average_loss"]},
                    final={"domains": _losses(final), "average_loss": final["average_loss"]},
                    tokens=first["tokens"] + second["tokens"],
                    seconds=round(first["seconds"] + second["seconds"], 1),
                    curve=self.curve(*ran["parts"]),
                )
        source_shape = resolve_source_shape(str(self.source))
        summary = {
            "mode": "source",
            "source": str(self.source),
            "device": self.device,
            "scale": self.scale,
            "source_shape": dataclasses.asdict(source_shape),
            "target_shape": dataclasses.asdict(self.target),
            "params": {"source": count_params(source_shape), "target": count_params(self.target)},
            "steps": {"prune": t_prune, "cpt": t_cpt},
            "tokens_per_step": self.tokens_per_step,
            "calibration_seqs": self.calibration_seqs,
            "eval_seqs_per_domain": self.eval_seqs,
            "features": dataclasses.asdict(self.features),
            "source_eval": {"domains": _losses(source_eval), "average_loss": source_eval["average_loss"]},
            "rows": rows,
            "wall_time_s": round(time.time() - start, 1),
        }
        (self.output / "reproduce.json").write_text(json.dumps(summary, indent=1))
        (self.output / "reproduce.md").write_text(markdown(summary))
        return summary


def _losses(result: dict[str, Any]) -> dict[str, float]:
    return {d: v["loss"] for d, v in result["domains"].items()}


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    domains = list(summary["source_eval"]["domains"])
    p, t = summary["params"]["source"], summary["params"]["target"]
    steps = summary["steps"]
    lines = [
        f"Source {summary['source']} ({p:,} parameters) -> target {t:,} parameters; "
        f"{steps['prune']} pruning + {steps['cpt']} CPT steps of {summary['tokens_per_step']:,} tokens "
        f"(one-shot: {steps['prune'] + steps['cpt']} CPT steps); eval: {summary['eval_seqs_per_domain']} "
        f"held-out sequences per domain; device {summary['device']}.",
        "",
        "Eval loss per domain, after pruning (the exported pruned model) -> after CPT:",
        "",
        "| run | mixture | gate | " + " | ".join(domains) + " | average | tokens | seconds | notes |",
        "|---" * (len(domains) + 7) + "|",
    ]
    src = summary["source_eval"]
    cells = " | ".join(f"{src['domains'][d]:.3f}" for d in domains)
    lines.append(f"| source (unpruned) | — | — | {cells} | {src['average_loss']:.3f} | 0 | — | |")
    for row in rows.values():
        head = f"| {row['what']} | {row['mixture']} |"
        if row["status"] != "ok":
            empty = " — |" * (len(domains) + 3)
            status = row["status"] if len(row["status"]) <= 160 else row["status"][:157] + "..."
            lines.append(f"{head} — |{empty} {status} |")
            continue
        gate = row["gate"]
        if gate == "forced":
            failed = "; ".join(f.split(":")[0] for f in row["gate_failures"]) or "loss gap"
            gate = f"**forced** (failed: {failed})"
        elif gate == "refused":
            gate = "**refused**"
        cells = " | ".join(
            f"{row['pruned']['domains'][d]:.3f} -> {row['final']['domains'][d]:.3f}" for d in domains
        )
        average = f"{row['pruned']['average_loss']:.3f} -> **{row['final']['average_loss']:.3f}**"
        notes = ", ".join(row["notes"])
        lines.append(
            f"{head} {gate} | {cells} | {average} | {row['tokens']:,} | {row['seconds']:.0f} | {notes} |"
        )
    lines += ["", f"Wall time {summary['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"
