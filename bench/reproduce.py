"""Reproduce the paper's claim at a scale a CPU can run: shearing a stronger model beats training from scratch.

    python bench/reproduce.py [--output bench_out] [--scale 1.0] [--source-shape demo_source|JSON]
        [--target-shape demo_pruned|JSON] [--seq-len 128] [--batch 16] [--device cpu|gpu]

On a real four-domain corpus built from text on this machine (``bench/corpus.py``: code, docs, prose,
legal; 5M characters each by default), a BPE tokenizer trained on it and its MDS splits (128 eval
sequences per domain), with the demo's recipes (``yamls/demo``):

- ``source``: the source shape pre-trained from scratch for T_src steps (``yamls/demo/source.yaml``),
  T_src much larger than the sheared model's budget (the paper: 2T tokens vs 50B);
- ``sheared``: pruned to ``demo_pruned`` for T_prune steps (``prune.yaml``) then continued for T_cpt steps
  (``cpt.yaml``), both with dynamic batch loading against the source's per-domain losses;
- ``scratch_matched`` (a): ``demo_pruned`` from scratch for T_prune + T_cpt steps — the same tokens as
  the sheared model's pruning + CPT;
- ``scratch_long`` (b): ``demo_pruned`` from scratch for T_src steps — as many tokens as the source got;
- ``sheared_constant`` (c): as ``sheared`` with ``dynamic_loading.update=constant`` (fixed mixture);
- ``oneshot`` (d): ``shearing.pruning.oneshot.oneshot_masks`` (largest-norm units, first L_t layers) on
  the source, cut with ``prune_model``, exported like a run, then the same CPT for T_prune + T_cpt steps
  (the pruning steps it skips are given to CPT, so every target-shape run sees the same tokens).

Every training run records its eval curve (``metrics/eval/LanguageCrossEntropy`` and per domain, from an
eval before training and every ~1/8 of the run) through a small Composer callback joined to the
llm-foundry registry, into ``runs/<name>/eval_trace.jsonl``; a sheared run's curve is the pruning run's
(masked model, expected masks) followed by the CPT run's, offset by the pruning tokens. Each final
export is evaluated per domain with ``shearing.evaluate``. The headline is the token ratio: how many
tokens baseline (b) needs to reach the sheared model's final eval loss (linear interpolation on its
curve), over the tokens the sheared model used after the source; "not reached" when (b) never gets there
(then the same ratio on (a)'s curve is still given). The source's tokens are reported separately: in the
paper the source is an existing model, a sunk cost.

Outputs ``OUTPUT/reproduce.json``, ``OUTPUT/reproduce.md`` and the eval-loss-vs-tokens plot
``OUTPUT/reproduce.png``, and prints the table. Resumable: a run
whose export and ``bench_run.json`` exist is skipped, and a run killed mid-way resumes from its last
Composer checkpoint (the yamls autoresume from their save folders).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from llmfoundry import registry

from shearing import demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DEFAULT_CHARS, ensure_corpus, prepare_corpus  # noqa: E402  (bench/ is not a package)

TRACE_CALLBACK = "bench_eval_trace"
EVAL_LOSS = "LanguageCrossEntropy"
STEPS = {"source": 4000, "prune": 200, "cpt": 400}  # at --scale 1: ~45 min on a 2-core CPU
TARGET = "demo_pruned"
SEEDED = ("sheared", "scratch_matched", "sheared_constant", "oneshot")  # repeated with --extra-seeds


class EvalTrace(Callback):
    """Append ``{"step", "loss", "<domain>": loss}`` to ``path`` after every evaluation."""

    def __init__(self, path: str):
        self.path = Path(path)

    def eval_end(self, state: State, logger: Logger) -> None:
        values = state.eval_metric_values
        if EVAL_LOSS not in values:
            return
        record = {"step": int(state.timestamp.batch), "loss": float(values[EVAL_LOSS])}
        suffix = "_" + EVAL_LOSS
        record.update({k[: -len(suffix)]: float(v) for k, v in values.items() if k.endswith(suffix)})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


if TRACE_CALLBACK not in registry.callbacks:
    registry.callbacks.register(TRACE_CALLBACK, func=EvalTrace)


def read_trace(run_dir: Path) -> list[dict[str, float]]:
    """The run's eval points by step (a resumed run may log a step twice: the last record wins)."""
    path = run_dir / "eval_trace.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def tokens_to_reach(curve: list[tuple[int, float]], loss: float) -> float | None:
    """Tokens at which a (tokens, loss) curve first reaches ``loss``, linearly interpolated; None if never."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= loss:
            if l0 <= loss:
                return float(t0)
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1)
    if curve and curve[0][1] <= loss:
        return float(curve[0][0])
    return None


class Bench:
    def __init__(
        self,
        output: Path,
        scale: float,
        source_shape: str,
        corpus_chars: int,
        eval_seqs: int,
        device: str,
        target_shape: str = TARGET,
        batch: int | None = None,
        seq_len: int = demo.SEQ_LEN,
        extra_seeds: tuple[int, ...] = (),
        data: Path | None = None,
    ):
        self.extra_seeds = tuple(extra_seeds)
        self.given_data = data
        self.output = output.resolve()
        self.scale = scale
        self.source_shape = source_shape
        self.target_shape = target_shape
        self.batch = batch
        self.seq_len = seq_len
        self.corpus_chars = corpus_chars
        self.eval_seqs = eval_seqs
        self.device = device
        self.data = self.output / "data"
        self.runs = self.output / "runs"
        self.tokenizer = self.output / "tokenizer"
        self.ref_file = self.output / "reference_losses.json"
        self.tokens_per_step = 0
        # Training-time evaluations per run (the eval curve, and dynamic loading's update points), an eval
        # before the first step, and whether a scaled-down pruning run may export past the convergence gate.
        self.evals_per_run = 8
        self.eval_first = True
        self.force_scaled_prune = True

    def steps(self, name: str) -> int:
        return max(10, int(STEPS[name] * self.scale))

    def shared_overrides(self) -> list[str]:
        """Overrides every run gets: device and precision, sequence length, batch size."""
        out = [f"variables.max_seq_len={self.seq_len}"]
        if self.device == "gpu":
            out += ["device=gpu", "precision=amp_bf16"]
        if self.batch is not None:
            out += [f"global_train_batch_size={self.batch}", f"device_train_microbatch_size={self.batch}"]
        return out

    @staticmethod
    def _spec(shape: str) -> str | dict[str, Any]:
        """A shape as the resolvers take it: a name, or the parsed flow mapping."""
        if not shape.startswith("{"):
            return shape
        from omegaconf import OmegaConf

        return dict(OmegaConf.create(shape))

    def target_spec(self) -> str | dict[str, Any]:
        return self._spec(self.target_shape)

    def scratch_shape(self) -> str:
        """The target shape with every field (vocabulary, head_dim, tying from the source), to train from
        scratch."""
        if not self.target_shape.startswith("{"):
            return self.target_shape
        from shearing.models.shapes import resolve_source_shape, resolve_target_shape

        full = resolve_target_shape(resolve_source_shape(self._spec(self.source_shape)), self.target_spec())
        return flow_mapping(json.dumps(dataclasses.asdict(full)))

    # -- data ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from shearing.data.tokenizer import train_bpe_tokenizer

        if self.given_data is not None:
            self.use_prepared(self.given_data)
            return

        raw = self.output / "raw"
        ensure_corpus(raw, self.corpus_chars)
        if not (self.tokenizer / "tokenizer.json").is_file():
            train_bpe_tokenizer(raw, demo.VOCAB, self.tokenizer, progress=False)
        prepare_corpus(raw, self.tokenizer, self.data, self.seq_len, self.eval_seqs)

    def use_prepared(self, data: Path) -> None:
        """Train on a folder ``data_prep/tokenize_domains.py`` wrote (its manifest names the tokenizer)."""
        from shearing.data.manifest import load_manifest

        manifest = load_manifest(data)
        if manifest.seq_len != self.seq_len:
            raise SystemExit(
                f"--data {data} holds {manifest.seq_len}-token sequences but --seq-len is {self.seq_len}: "
                f"pass --seq-len {manifest.seq_len}"
            )
        tokenizer = Path(manifest.tokenizer.get("path", ""))
        if (
            not (tokenizer / "tokenizer.json").is_file()
            and not (tokenizer / "tokenizer_config.json").is_file()
        ):
            raise SystemExit(
                f"--data {data}: its manifest's tokenizer {str(tokenizer)!r} is not a local folder"
            )
        self.data, self.tokenizer = data.resolve(), tokenizer

    def settings(self) -> dict[str, Any]:
        """What every run and evaluation in ``--output`` depends on, besides each run's own step count."""
        return {
            "source": self.source_shape,
            "target": self.target_shape,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "eval_seqs": self.eval_seqs,
            "corpus_chars": self.corpus_chars,
            "data": str(self.given_data) if self.given_data else None,
            "device": self.device,
        }

    def claim_output(self) -> None:
        """Record the settings in ``--output`` or, when it holds runs made with other settings, refuse: a
        resumed bench skips finished runs, and must not mix their numbers with another configuration's."""
        path = self.output / "bench_settings.json"
        now = json.loads(json.dumps(self.settings()))
        if path.is_file():
            before = json.loads(path.read_text())
            changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
            if changed:
                what = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in changed)
                raise SystemExit(
                    f"--output {self.output} holds runs made with other settings ({what}): "
                    "give another --output, or the same settings to resume"
                )
            return
        self.output.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=1))

    # -- runs ------------------------------------------------------------------------------------------
    def done(self, name: str, steps: int | None = None) -> dict[str, Any] | None:
        """The record of a finished run (None if unfinished); refuses one trained for another step count."""
        marker = self.runs / name / "bench_run.json"
        if marker.is_file() and (self.runs / name / "hf" / "config.json").is_file():
            record = json.loads(marker.read_text())
            check_steps(name, record, steps)
            return record
        return None

    def train(self, name: str, yaml: str, steps: int, overrides: list[str]) -> dict[str, Any]:
        """Train one run (skipped when done); returns its record: steps, tokens, seconds."""
        record = self.done(name, steps)
        if record is not None:
            print(f"[reproduce] {name}: done before, skipped", flush=True)
            return record
        t0 = time.time()
        self.fit(name, yaml, steps, overrides)
        record = {
            "steps": steps,
            "tokens": steps * self.tokens_per_step,
            "seconds": round(time.time() - t0, 1),
        }
        (self.runs / name / "bench_run.json").write_text(json.dumps(record))
        print(f"[reproduce] {name}: {steps} steps in {record['seconds']:.0f} s", flush=True)
        return record

    def fit(self, name: str, yaml: str, steps: int, overrides: list[str]) -> None:
        """Train one demo recipe into ``runs/<name>`` (resuming its checkpoints), with the bench's overrides."""
        run_dir = self.runs / name
        run_dir.mkdir(parents=True, exist_ok=True)
        interval = max(1, steps // self.evals_per_run)
        forced = yaml == "prune.yaml" and self.scale < 1 and self.force_scaled_prune
        demo._train(
            yaml,
            [
                f"variables.data_local={self.data}",
                f"variables.save_folder={run_dir}",
                f"variables.max_duration={steps}ba",
                f"variables.eval_interval={interval}ba",
                f"variables.save_interval={max(interval, steps // 2)}ba",
                f"eval_first={str(self.eval_first).lower()}",
                f"eval_loader.dataset.max_seqs_per_domain={self.eval_seqs}",
                *self.shared_overrides(),
                f"callbacks.{TRACE_CALLBACK}.path={run_dir / 'eval_trace.jsonl'}",
                *overrides,
                # A scaled-down run (--scale < 1) prunes too few steps for the masks to converge: export it
                # anyway; shearing_export.json records the failed gate as forced.
                *(["export.force=true"] if forced else []),
            ],
        )

    def oneshot_init(self, name: str) -> dict[str, Any]:
        """The one-shot structured baseline's starting point: magnitude masks on the source, cut, exported."""
        record = self.done(name)
        if record is not None:
            return record
        from shearing.models.hf_io import load_source_model
        from shearing.models.shapes import resolve_target_shape, shape_from_hf_config
        from shearing.pruning.oneshot import oneshot_masks

        t0 = time.time()
        model, _ = load_source_model(str(self.runs / "source" / "hf"))
        target = resolve_target_shape(shape_from_hf_config(model.config), self.target_spec())
        self.cut_and_export(model, oneshot_masks(model, target), name)
        record = {"steps": 0, "tokens": 0, "seconds": round(time.time() - t0, 1)}
        (self.runs / name / "bench_run.json").write_text(json.dumps(record))
        return record

    def cut_and_export(self, model: Any, masks: dict[str, Any], name: str) -> None:
        """Cut ``model`` with 0/1 ``masks`` and export it to ``runs/<name>/hf`` as a run would."""
        from shearing.export.hf import export_model_state
        from shearing.pruning.surgery import prune_model

        pruned = prune_model(model, masks).model
        # A model state as train.py saves it: HF weights under "model." plus the run metadata.
        state = {f"model.{k}": v for k, v in pruned.state_dict().items()}
        state["_extra_state"] = {"hf_config": pruned.config.to_dict(), "tokenizer": str(self.tokenizer)}
        export_model_state(state, self.runs / name / "hf")

    def evaluate(self, name: str, model: Path | None = None) -> dict[str, Any]:
        """Per-domain eval of ``runs/<name>/hf`` (or ``model``) on the eval split, cached in the run folder."""
        from shearing.evaluate import EvalOptions, evaluate
        from shearing.io import write_json_atomic

        path = self.runs / name / "results.json"
        if path.is_file():
            return json.loads(path.read_text())
        options = EvalOptions(
            model=str(model or self.runs / name / "hf"),
            data=str(self.data / "eval"),
            max_seqs=self.eval_seqs,
            batch_size=16,
            device="cuda" if self.device == "gpu" else "cpu",
            progress=False,
        )
        result = evaluate(options)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        return result

    def curve(self, *names: str) -> list[tuple[int, float]]:
        """(tokens, eval loss) of consecutive runs, each offset by the steps of the ones before it."""
        points, offset = [], 0
        for name in names:
            trace = read_trace(self.runs / name)
            points += [((offset + r["step"]) * self.tokens_per_step, r["loss"]) for r in trace]
            offset += (self.done(name) or {}).get("steps", 0)
        return points

    # -- the whole benchmark ---------------------------------------------------------------------------
    def cpt_overrides(self, init: str, prune_run: str | None, extra: list[str]) -> list[str]:
        """A CPT run from ``init``'s export: the reference losses, the pruning run's final proportions (or the
        manifest's when there is no pruning run), then ``extra``."""
        proportions = (
            [f"variables.prune_run={self.runs / prune_run}"]
            if prune_run
            else ["callbacks.dynamic_loading.initial_proportions=null"]
        )
        return [
            f"variables.source_model={self.runs / init / 'hf'}",
            f"variables.reference_losses={self.ref_file}",
            *proportions,
            *extra,
        ]

    def run(self) -> dict[str, Any]:
        from shearing.config import load_config

        start = time.time()
        self.claim_output()
        self.prepare_data()
        cfg = load_config(
            str(demo.YAMLS / "source.yaml"), [f"variables.data_local={self.data}", *self.shared_overrides()]
        )
        self.tokens_per_step = cfg.global_train_batch_size * cfg.max_seq_len
        self.seed = cfg.seed  # the yamls' seed: the first (unsuffixed) runs
        t_src, t_prune, t_cpt = self.steps("source"), self.steps("prune"), self.steps("cpt")
        tok = [f"variables.tokenizer={self.tokenizer}"]

        source_overrides = [*tok]
        if self.source_shape != "demo_source":
            source_overrides.append(f"variables.source_model={self.source_shape}")
        records = {"source": self.train("source", "source.yaml", t_src, source_overrides)}
        if not self.ref_file.is_file():
            reference = {d: v["loss"] for d, v in self.evaluate("source")["domains"].items()}
            self.ref_file.write_text(
                json.dumps({"reference_losses": reference, "source": "bench source model"})
            )
        source_hf = self.runs / "source" / "hf"
        prune_common = [
            f"variables.source_model={source_hf}",
            f"variables.reference_losses={self.ref_file}",
            f"variables.target_model={self.target_shape}",
        ]
        if self.source_shape != "demo_source":
            prune_common.append("model.source_shape=null")
        constant = ["callbacks.dynamic_loading.update=constant"]

        def cpt(name: str, init: str, steps: int, prune_run: str | None, extra: list[str]) -> dict:
            overrides = self.cpt_overrides(init, prune_run, extra)
            if self.target_shape != TARGET:
                overrides.append("model.source_shape=null")  # cpt.yaml names demo_pruned
            return self.train(name, "cpt.yaml", steps, overrides)

        scratch = [*tok, f"variables.source_model={self.scratch_shape()}"]

        def pipelines(suffix: str = "", seed: tuple[str, ...] = ()) -> None:
            """The four target-shape pipelines of the same token budget, run names suffixed."""

            def go(name: str, yaml: str, steps: int, overrides: list[str]) -> None:
                records[name + suffix] = self.train(name + suffix, yaml, steps, [*overrides, *seed])

            def cpt_after(name: str, init: str, steps: int, prune_run: str | None, extra: list[str]) -> None:
                records[name + suffix] = cpt(name + suffix, init, steps, prune_run, [*extra, *seed])

            go("sheared_prune", "prune.yaml", t_prune, prune_common)
            cpt_after("sheared_cpt", "sheared_prune" + suffix, t_cpt, "sheared_prune" + suffix, [])
            go("scratch_matched", "source.yaml", t_prune + t_cpt, scratch)
            go("constant_prune", "prune.yaml", t_prune, [*prune_common, *constant])
            cpt_after("constant_cpt", "constant_prune" + suffix, t_cpt, "constant_prune" + suffix, constant)
            cpt_after("oneshot_cpt", "oneshot_init", t_prune + t_cpt, None, [])

        records["oneshot_init"] = self.oneshot_init("oneshot_init")
        pipelines()
        records["scratch_long"] = self.train("scratch_long", "source.yaml", t_src, scratch)
        for extra in self.extra_seeds:
            pipelines(f".seed{extra}", (f"variables.seed={extra}",))

        runs = {
            "source": (["source"], "source shape from scratch"),
            "sheared": (["sheared_prune", "sheared_cpt"], "prune + CPT, dynamic batch loading"),
            "scratch_matched": (["scratch_matched"], "(a) target from scratch, same tokens as sheared"),
            "scratch_long": (["scratch_long"], "(b) target from scratch, source's tokens"),
            "sheared_constant": (["constant_prune", "constant_cpt"], "(c) prune + CPT, fixed mixture"),
            "oneshot": (["oneshot_init", "oneshot_cpt"], "(d) one-shot magnitude prune + CPT"),
        }
        table = {}
        for name, (parts, what) in runs.items():
            result = self.evaluate(parts[-1])
            table[name] = {
                "what": what,
                "domains": {d: v["loss"] for d, v in result["domains"].items()},
                "average_loss": result["average_loss"],
                "tokens": sum(records[p]["tokens"] for p in parts),
                "seconds": round(sum(records[p]["seconds"] for p in parts), 1),
                "curve": self.curve(*parts),
            }
        seeds = {}
        if self.extra_seeds:
            for name in SEEDED:
                parts, _ = runs[name]
                averages = [table[name]["average_loss"]]
                averages += [self.evaluate(parts[-1] + f".seed{x}")["average_loss"] for x in self.extra_seeds]
                seeds[name] = {
                    "average_loss": averages,
                    "mean": statistics.mean(averages),
                    "std": statistics.stdev(averages),
                }
        sheared = table["sheared"]
        final = sheared["curve"][-1][1]
        ratios = {}
        for baseline in ("scratch_long", "scratch_matched"):
            reach = tokens_to_reach(table[baseline]["curve"], final)
            ratios[baseline] = {
                "tokens_to_reach": reach,
                "ratio": round(reach / sheared["tokens"], 3) if reach is not None else "not reached",
            }
        summary = {
            "scale": self.scale,
            "steps": {"source": t_src, "prune": t_prune, "cpt": t_cpt},
            "tokens_per_step": self.tokens_per_step,
            "source_shape": self.source_shape,
            "target_shape": self.target_shape,
            "source_tokens": records["source"]["tokens"],
            "sheared_final_curve_loss": final,
            "token_ratio": ratios["scratch_long"]["ratio"],
            "token_ratio_detail": ratios,
            "runs": table,
            "seeds": {"seeds": [self.seed, *self.extra_seeds], "runs": seeds} if seeds else None,
            "wall_time_s": round(time.time() - start, 1),
        }
        (self.output / "reproduce.json").write_text(json.dumps(summary, indent=1))
        (self.output / "reproduce.md").write_text(markdown(summary))
        plot_curves(summary, self.output / "reproduce.png")
        return summary


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Eval loss vs training tokens of every target-shape run (the source's final loss as a line)."""
    from shearing.reporting.figures import HUMAN, plt, run_color

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    runs = summary["runs"]
    for i, (name, run) in enumerate(runs.items()):
        if name == "source":
            ax.axhline(run["curve"][-1][1], color="gray", ls="--", lw=1, label="source, final")
            continue
        tokens, losses = zip(*[(t, loss) for t, loss in run["curve"] if t > 0], strict=True)
        ax.plot(tokens, losses, color=run_color(i), lw=1.6, marker=".", label=f"{name}: {run['what']}")
    sheared_tokens = runs["sheared"]["tokens"]
    ax.set_xscale("log")
    lowest = min(loss for run in runs.values() for _, loss in run["curve"])
    ax.set_ylim(lowest - 0.15, runs["scratch_matched"]["curve"][0][1] * 0.75)
    ax.axvline(sheared_tokens, color="black", lw=0.6, alpha=0.5)
    ax.xaxis.set_major_formatter(HUMAN)
    ax.set_xlabel("training tokens after the source (log scale)")
    ax.set_ylabel("eval loss (mean over domains)")
    ax.set_title(f"{summary['source_shape']} -> {summary['target_shape']}: eval loss vs tokens", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    domains = list(next(iter(runs.values()))["domains"])
    head = "| run | " + " | ".join(domains) + " | average | tokens | seconds |"
    lines = [head, "|---" * (len(domains) + 4) + "|"]
    for name, r in runs.items():
        cells = [f"{r['domains'][d]:.3f}" for d in domains]
        lines.append(
            f"| {name} — {r['what']} | "
            + " | ".join(cells)
            + f" | {r['average_loss']:.3f} | {r['tokens']:,} | {r['seconds']:.0f} |"
        )
    detail = summary["token_ratio_detail"]
    sheared_tokens = runs["sheared"]["tokens"]
    lines += [
        "",
        f"Sheared final eval loss (training-time eval) {summary['sheared_final_curve_loss']:.3f} after {sheared_tokens:,} "
        f"tokens (plus {summary['source_tokens']:,} for the source).",
    ]
    for baseline, d in detail.items():
        reach = d["tokens_to_reach"]
        where = f"{reach:,.0f} tokens, ratio {d['ratio']}" if reach is not None else "not reached"
        lines.append(f"- tokens {baseline} needs to reach it: {where}")
    seeds = summary.get("seeds")
    if seeds:
        lines += ["", "Average eval loss by seed (data order and initialisation; the source is shared):", ""]
        lines += ["| run | " + " | ".join(f"seed {x}" for x in seeds["seeds"]) + " | mean ± std |"]
        lines += ["|---" * (len(seeds["seeds"]) + 2) + "|"]
        for name, r in seeds["runs"].items():
            cells = " | ".join(f"{v:.3f}" for v in r["average_loss"])
            lines.append(f"| {name} | {cells} | {r['mean']:.3f} ± {r['std']:.3f} |")
    return "\n".join(lines) + "\n"


def check_steps(name: str, record: dict[str, Any], steps: int | None) -> None:
    """Refuse to reuse a finished run trained for another number of steps than this call asks for."""
    if steps is not None and record.get("steps") not in (None, steps):
        raise SystemExit(
            f"runs/{name} was trained for {record['steps']} steps, this call asks for {steps}: "
            "give another --output (or the same --scale / --prune-steps / --cpt-steps to resume)"
        )


def flow_mapping(shape: str) -> str:
    """A named shape as is; a JSON mapping as an OmegaConf flow mapping (for a command-line override)."""
    if shape.lstrip().startswith("{"):
        return json.dumps(json.loads(shape)).replace('"', "")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/reproduce.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="bench_out", type=Path)
    parser.add_argument("--scale", default=1.0, type=float, help="multiply every run's steps")
    parser.add_argument(
        "--source-shape",
        default="demo_source",
        help="a named shape or a JSON mapping of the five shape fields (must prune to demo_pruned)",
    )
    parser.add_argument("--corpus-chars", default=DEFAULT_CHARS, type=int, help="raw characters per domain")
    parser.add_argument(
        "--target-shape",
        default=TARGET,
        help="a named shape or a JSON mapping of the five prunable fields (the sheared models' shape)",
    )
    parser.add_argument(
        "--seq-len",
        default=None,
        type=int,
        help=f"tokens per training sequence (default {demo.SEQ_LEN}; --source: 128, gpu 512)",
    )
    parser.add_argument(
        "--batch", default=None, type=int, help="global batch (default: the yamls' 16; --source: 8, gpu 32)"
    )
    parser.add_argument(
        "--eval-seqs",
        default=None,
        type=int,
        help="held-out sequences per domain (default 128; --source: 8, gpu 64)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a prepared data folder (data_prep/tokenize_domains.py) instead of the built-in corpus",
    )
    parser.add_argument(
        "--extra-seeds",
        default="",
        help="comma-separated seeds to repeat the four same-budget target-shape runs with (mean ± std)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="gpu: bf16 on one GPU")
    real = parser.add_argument_group("--source: a real pre-trained model (bench/from_source.py)")
    real.add_argument(
        "--source",
        type=Path,
        default=None,
        help="an HF model folder: compare one-shot / L0 (constant, importance) / distillation at one target",
    )
    real.add_argument(
        "--mixtures",
        default=None,
        help="with --source: dynamic (paper) and/or fixed (constant); default dynamic,fixed (gpu: dynamic)",
    )
    real.add_argument(
        "--prune-steps",
        default=None,
        type=int,
        help="with --source: pruning steps of the L0 rows, instead of the scaled default (cpu 8, gpu 300)",
    )
    real.add_argument(
        "--cpt-steps",
        default=None,
        type=int,
        help="with --source: CPT steps after pruning, instead of the scaled default (cpu 8, gpu 100)",
    )
    real.add_argument(
        "--methods",
        default="oneshot,l0_constant,l0_importance,l0_importance_kd",
        help="with --source: the rows to run, (a) oneshot (b) l0_constant (c) l0_importance (d) l0_importance_kd",
    )
    real.add_argument(
        "--calibration-seqs",
        default=None,
        type=int,
        help="with --source: importance calibration sequences (32, gpu 256)",
    )
    real.add_argument(
        "--no-force-export",
        action="store_true",
        help="with --source: a pruning run the gate refuses stops its row (default: re-export forced, recorded)",
    )
    real.add_argument(
        "--eos-token",
        default=None,
        help="with --source: the document separator token (SmolLM2: '<|endoftext|>', as in its pre-training)",
    )
    args = parser.parse_args(argv)
    if args.source is not None:
        return main_source(args, parser)
    for flag in ("mixtures", "methods", "prune_steps", "cpt_steps", "calibration_seqs", "eos_token"):
        if getattr(args, flag) != parser.get_default(flag):
            parser.error(f"--{flag.replace('_', '-')} applies only with --source")
    summary = Bench(
        args.output,
        args.scale,
        flow_mapping(args.source_shape),
        args.corpus_chars,
        args.eval_seqs or 128,
        args.device,
        target_shape=flow_mapping(args.target_shape),
        batch=args.batch,
        seq_len=args.seq_len or demo.SEQ_LEN,
        extra_seeds=tuple(int(x) for x in args.extra_seeds.split(",") if x),
        data=args.data,
    ).run()
    return print_summary(markdown(summary), summary, args.output)


def print_summary(table: str, summary: dict[str, Any], output: Path) -> int:
    print()
    print(table)
    print(f"wall time {summary['wall_time_s']:.0f} s; {output / 'reproduce.json'}")
    return 0


def main_source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from from_source import DEFAULT_MIXTURES, SourceBench
    from from_source import markdown as source_markdown

    for flag, value, default in (
        ("--source-shape", args.source_shape, "demo_source"),
        ("--extra-seeds", args.extra_seeds, ""),
    ):
        if value != default:
            parser.error(f"{flag} does not apply with --source (the source's shape is its config.json)")
    summary = SourceBench(
        args.output,
        args.source,
        scale=args.scale,
        corpus_chars=args.corpus_chars,
        eval_seqs=args.eval_seqs or (64 if args.device == "gpu" else 8),
        device=args.device,
        target_shape=None if args.target_shape == TARGET else flow_mapping(args.target_shape),
        batch=args.batch,
        seq_len=args.seq_len,
        mixtures=tuple(x for x in (args.mixtures or DEFAULT_MIXTURES[args.device]).split(",") if x),
        steps={"prune": args.prune_steps, "cpt": args.cpt_steps},
        methods=tuple(x for x in args.methods.split(",") if x),
        calibration_seqs=args.calibration_seqs or (256 if args.device == "gpu" else 32),
        force_export=not args.no_force_export,
        data=args.data,
        eos_token=args.eos_token,
    ).run()
    return print_summary(source_markdown(summary), summary, args.output)


if __name__ == "__main__":
    sys.exit(main())
