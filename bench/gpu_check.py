"""The shipped recipes on one GPU, as shipped, then how fast: one command for a lent GPU machine (issue 16).

    python bench/gpu_check.py --output $OUT                 # GPU: every stage, <= ~9 minutes on an H100/H200
    OMP_NUM_THREADS=2 python bench/gpu_check.py --smoke --output /tmp/gpu_check   # CPU rehearsal, ~5 min

Stages, each timed and recorded in ``OUTPUT/gpu_check.json`` (the command lines and log tails included), in
this order so that the most valuable finding comes first:

1. ``data``: the bench corpus (``bench/corpus.py``: code, docs, prose, legal, text already on the machine;
   nothing downloaded), a 32,000-token BPE tokenizer (LLaMA-2's vocabulary size) and MDS shards at the
   recipes' 4,096 tokens, through ``shearing.data`` as ``data_prep/`` runs it.
2. ``source``: a random-init ``LlamaForCausalLM`` of LLaMA2-7B's widths (hidden 4096, 32 heads, MLP 11008)
   with ``--layers`` layers, bf16, saved as a Hugging Face folder with the tokenizer.
3. ``prune``: ``composer train.py yamls/pruning/llama2_7b_to_2.7b.yaml`` with only the source (and
   ``model.source_shape=null``, the target at the 2.7B widths with as many layers as the source), the data
   (its four domains, equal proportions, fixed reference losses), the duration (``--steps`` batches, a
   checkpoint and an eval every half) and ``export.force=true`` overridden: the recipe's FSDP2 config, bf16,
   activation checkpointing, SDPA, batch 32 x 4096 (micro-batch 4) and dynamic loading stay. The run is
   SIGKILLed one step after its first checkpoint and the same command is launched again (autoresume);
   the fit-end export goes through the convergence gate, forced (a 10-step run cannot converge) and
   recorded in ``hf/shearing_export.json``.
4. ``cpt``: ``yamls/continued_pretraining/llama2_2.7b.yaml`` on that export, ``variables.prune_run`` the
   pruning run (its final proportions), killed and resumed the same way, exported.
5. ``throughput``: ``bench/throughput.py --sections train,cpt,loader,infer`` (plain vs pruning step at 7B
   widths, CPT tokens/s and MFU of the 2.7B and 1.3B shapes at seq 4096, the dynamic-loading wait, prefill
   and decode of the 7B, 2.7B, 1.3B and the equal-parameter non-uniform shape).
6. ``full_7b``: the pruning step of the whole 32-layer LLaMA2-7B (masks + Lagrangian, AdamW state on the
   device, activation checkpointing, micro-batch 1, seq 4096): peak memory and step time, the number to
   size a cluster with.

A stage that fails is recorded with its error and log tail and the next one still runs (a later stage that
needs its output is skipped, saying why); a stage is skipped when less than its budget is left of
``--budget-s``. ``--smoke`` runs the same code path on the CPU at toy widths (fp32, one process without
FSDP, seq 128) so a GPU minute is never spent on an import error or a bad override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

DOMAINS = ("code", "docs", "prose", "legal")
# Fixed reference losses for dynamic loading (the numbers only steer the mixture; a random source is far above).
REFERENCE = {"code": 1.5, "docs": 2.5, "prose": 2.5, "legal": 1.8}
LLAMA2_VOCAB = 32_000
STAGES = ("data", "source", "prune", "cpt", "throughput", "full_7b")


class Sizes:
    """What differs between the GPU run and its CPU rehearsal; everything else is the recipes'."""

    def __init__(self, smoke: bool, layers: int, steps: int):
        self.smoke = smoke
        self.layers = layers
        self.steps = steps
        self.seq_len = 128 if smoke else 4096
        self.corpus_chars = 300_000 if smoke else 3_000_000
        self.vocab = 2_000 if smoke else LLAMA2_VOCAB
        self.eval_seqs = 8 if smoke else 32
        if smoke:
            self.source = {
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "intermediate_size": 344,
            }
            self.target = {
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 172,
            }
        else:
            from shearing.models.shapes import named_shape

            self.source = named_shape("llama2_7b").prunable()
            self.target = named_shape("llama2_2.7b").prunable()
        self.source = {**self.source, "num_hidden_layers": layers}
        self.target = {**self.target, "num_hidden_layers": layers}
        self.checkpoint_at = max(1, steps // 2)  # the first checkpoint and eval; the kill comes after it
        self.warmup = max(1, steps // 5)  # the learning-rate and Lagrangian warmups, in batches

    def run_overrides(self) -> list[str]:
        """The CPU rehearsal's only departures from the recipes: device, precision, sequence, batch, workers."""
        if not self.smoke:
            return []
        return [
            "device=cpu",
            "precision=fp32",
            f"max_seq_len={self.seq_len}",
            "global_train_batch_size=4",
            "device_train_microbatch_size=2",
            "device_eval_batch_size=4",
            "train_loader.num_workers=0",
            "eval_loader.num_workers=0",
            "fsdp_config=null",
        ]


def mapping(values: dict[str, Any]) -> str:
    """An OmegaConf dotlist value for a flat mapping, ``{a: 1, b: 2}`` (YAML flow style needs the spaces)."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}"


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def metric_steps(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    return records


def trained_batches(records: list[dict[str, Any]]) -> list[int]:
    """The batches whose training loss was logged: Composer logs batch N's loss at step N - 1."""
    return [r["step"] + 1 for r in records if "loss/train/total" in r and r.get("step") is not None]


def last_metrics(records: list[dict[str, Any]], prefixes: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for record in records:
        out.update((k, v) for k, v in record.items() if k.startswith(prefixes))
    return out


def launch(cmd: list[str], log: Path, env: dict[str, str], mode: str = "a") -> subprocess.Popen:
    with open(log, mode) as out:  # the child keeps its own copy of the descriptor
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train_kill_resume(
    yaml: str, overrides: list[str], folder: Path, log: Path, kill_after: int, limit_s: float
):
    """``composer train.py YAML OVERRIDES``: SIGKILLed once the checkpoint of batch ``kill_after`` is complete
    and ``metrics.jsonl`` shows a later batch trained (work the kill loses), then the same command again, which
    must resume at batch ``kill_after + 1``; returns what happened."""
    from shearing.checkpoints import checkpoint_is_complete

    # The `composer` launcher through this interpreter: a --target install (the device) puts no script on PATH.
    cmd = [sys.executable, "-m", "composer.cli.launcher", "train.py", yaml, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    metrics = folder / "metrics.jsonl"
    checkpoint = folder / f"ep0-ba{kill_after}-rank0.pt"
    result: dict[str, Any] = {"command": shlex.join(["composer", *cmd[3:]])}
    start = time.time()
    proc = launch(cmd, log, env, mode="w")
    killed_at = None
    while proc.poll() is None:
        if time.time() - start > limit_s:
            kill_group(proc)
            raise TimeoutError(f"first launch still running after {limit_s:.0f} s")
        if checkpoint.is_file() and checkpoint_is_complete(checkpoint):  # only then read the metrics
            done = max(trained_batches(metric_steps(metrics)), default=0)
            if done > kill_after:
                kill_group(proc)
                killed_at = done
                break
        time.sleep(0.2)
    result["first_launch_s"] = round(time.time() - start, 1)
    if killed_at is None:
        result["killed"] = False
        result["returncode"] = proc.returncode
        if proc.returncode != 0:
            raise RuntimeError(f"training exited {proc.returncode} before the kill:\n{tail(log)}")
        return result
    result.update(killed=True, killed_at_step=killed_at)
    log_offset = log.stat().st_size
    again = time.time()
    proc = launch(cmd, log, env)
    try:
        proc.wait(timeout=max(1.0, limit_s - (again - start)))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise TimeoutError(f"the relaunch was still running after {limit_s:.0f} s in all") from None
    result["second_launch_s"] = round(time.time() - again, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"the relaunch exited {proc.returncode}:\n{tail(log)}")
    # The relaunch's console (log_to_console) names each batch it trains: the first is where it resumed.
    with open(log, "rb") as f:
        f.seek(log_offset)
        first = re.search(rb"\[batch=(\d+)/", f.read())
    result["relaunch_first_batch"] = int(first.group(1)) if first else None
    if result["relaunch_first_batch"] != kill_after + 1:
        raise RuntimeError(
            f"the relaunch trained batch {result['relaunch_first_batch']} first, not {kill_after + 1}: "
            f"it did not resume from the batch-{kill_after} checkpoint"
        )
    # metrics.jsonl is cut back to the checkpoint on resume (MetricsFileLogger): each batch's loss once.
    logged = trained_batches(metric_steps(metrics))
    if sorted(logged) != list(range(1, max(logged, default=0) + 1)):
        raise RuntimeError(
            f"metrics.jsonl has the train loss of batches {sorted(logged)}: repeated or missing"
        )
    return result


def run_summary(folder: Path) -> dict[str, Any]:
    records = metric_steps(folder / "metrics.jsonl")
    export = folder / "hf" / "shearing_export.json"
    summary: dict[str, Any] = {
        "batches_trained": max(trained_batches(records), default=0),
        "metrics": last_metrics(
            records, ("throughput/", "memory/", "time/", "metrics/eval/LanguageCrossEntropy")
        ),
        "checkpoints": sorted(p.name for p in folder.glob("ep*-ba*-rank0.pt")),
    }
    if export.is_file():
        record = json.loads(export.read_text())
        summary["export"] = {
            k: record.get(k) for k in ("target", "gate", "dtype", "parameters") if k in record
        }
    else:
        summary["export"] = None
    return summary


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = Sizes(args.smoke, args.layers, args.steps)
        self.out: Path = args.output.resolve()
        self.work: Path = args.work.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.record: dict[str, Any] = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "smoke": args.smoke,
            "environment": environment(),
            "sizes": {
                "layers": args.layers,
                "steps": args.steps,
                "seq_len": self.sizes.seq_len,
                "source": self.sizes.source,
                "target": self.sizes.target,
            },
            "stages": {},
        }

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def stage(
        self, name: str, budget_s: float, needs: tuple[str, ...], work: Callable[[float], dict]
    ) -> None:
        stages = self.record["stages"]
        if name not in self.args.stages:
            return
        missing = [n for n in needs if n in self.args.stages and stages.get(n, {}).get("status") != "ok"]
        if missing:
            stages[name] = {"status": "skipped", "why": f"needs {', '.join(missing)}"}
        elif self.left() < budget_s and not self.args.smoke:
            stages[name] = {
                "status": "skipped",
                "why": f"{self.left():.0f} s left, stage needs ~{budget_s:.0f} s",
            }
        else:
            print(f"[gpu_check] {name} (budget {budget_s:.0f} s, {self.left():.0f} s left)", flush=True)
            t0 = time.time()
            try:
                stages[name] = {"status": "ok", **work(max(budget_s, self.left()))}
            except Exception as exc:  # record and go on: every stage's finding is worth having
                stages[name] = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            stages[name]["seconds"] = round(time.time() - t0, 1)
            print(f"[gpu_check] {name}: {stages[name]['status']} in {stages[name]['seconds']} s", flush=True)
        self.save()

    def save(self) -> None:
        from shearing.io import write_json_atomic

        self.record["wall_s"] = round(time.time() - self.start, 1)
        write_json_atomic(self.out / "gpu_check.json", self.record)

    # --- stages ----------------------------------------------------------------------------------------
    def data(self, _limit: float) -> dict:
        from corpus import build_corpus

        from shearing.data.prep import PrepConfig, prepare
        from shearing.data.tokenizer import train_bpe_tokenizer

        raw, tokenizer, data = self.work / "raw", self.work / "tokenizer", self.work / "data"
        documents = build_corpus(raw, self.sizes.corpus_chars)
        if not (tokenizer / "tokenizer.json").is_file():
            train_bpe_tokenizer(raw, self.sizes.vocab, tokenizer, progress=False)
        workers = min(16, os.cpu_count() or 1)
        prepare(
            PrepConfig(
                input=raw,
                tokenizer=str(tokenizer),
                output=data,
                seq_len=self.sizes.seq_len,
                eval_seqs=self.sizes.eval_seqs,
                workers=workers,
                progress=False,
            )
        )
        manifest = json.loads((data / "manifest.json").read_text())
        return {"documents": documents, "manifest_domains": manifest.get("domains")}

    def source(self, _limit: float) -> dict:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        from shearing.models.hf_io import config_from_shape
        from shearing.models.shapes import count_params, named_shape

        base = named_shape("llama2_7b")
        shape = base.with_target(self.sizes.source)
        tokenizer = AutoTokenizer.from_pretrained(self.work / "tokenizer")
        vocab = max(len(tokenizer), self.sizes.vocab)
        shape = dataclasses.replace(shape, vocab_size=vocab)
        config = config_from_shape(
            shape,
            torch_dtype="bfloat16",
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        device = "cpu" if self.args.smoke else "cuda"
        torch.manual_seed(17)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        folder = self.work / "source"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
        return {"folder": str(folder), "parameters": count_params(shape), "shape": shape.prunable()}

    def reference_file(self) -> Path:
        from shearing.io import write_json_atomic

        path = self.work / "reference_losses.json"
        write_json_atomic(
            path, {"reference_losses": REFERENCE, "source": "fixed numbers (bench/gpu_check.py)"}
        )
        return path

    def common(self) -> list[str]:
        s = self.sizes
        return [
            f"variables.data_local={self.work / 'data'}",
            f"variables.domains=[{','.join(DOMAINS)}]",
            f"variables.proportions=[{','.join(['0.25'] * len(DOMAINS))}]",
            # A file, not a mapping: a dotlist mapping is merged into the recipe's seven RedPajama domains.
            f"variables.reference_losses={self.reference_file()}",
            f"variables.max_duration={s.steps}ba",
            f"variables.save_interval={s.checkpoint_at}ba",
            f"variables.eval_interval={s.checkpoint_at}ba",
            "model.source_shape=null",
            f"scheduler.t_warmup={s.warmup}ba",
            "progress_bar=false",
            "console_log_interval=1ba",
            *s.run_overrides(),
        ]

    def prune(self, limit: float) -> dict:
        folder = self.work / "runs" / "prune"
        overrides = [
            *self.common(),
            f"variables.source_model={self.work / 'source'}",
            f"variables.target_model={mapping(self.sizes.target)}",
            f"variables.save_folder={folder}",
            f"pruning.lagrangian_warmup={self.sizes.warmup}ba",
            "export.force=true",
        ]
        run = train_kill_resume(
            "yamls/pruning/llama2_7b_to_2.7b.yaml",
            overrides,
            folder,
            self.out / "prune.log",
            self.sizes.checkpoint_at,
            limit,
        )
        summary = run_summary(folder)
        if summary["export"] is None:
            raise RuntimeError(f"no export in {folder / 'hf'}:\n{tail(self.out / 'prune.log')}")
        return {**run, **summary}

    def cpt(self, limit: float) -> dict:
        prune = self.work / "runs" / "prune"
        folder = self.work / "runs" / "cpt"
        overrides = [
            *self.common(),
            f"variables.source_model={prune / 'hf'}",
            f"variables.prune_run={prune}",
            f"variables.save_folder={folder}",
        ]
        run = train_kill_resume(
            "yamls/continued_pretraining/llama2_2.7b.yaml",
            overrides,
            folder,
            self.out / "cpt.log",
            self.sizes.checkpoint_at,
            limit,
        )
        summary = run_summary(folder)
        if summary["export"] is None:
            raise RuntimeError(f"no export in {folder / 'hf'}:\n{tail(self.out / 'cpt.log')}")
        return {**run, **summary}

    def bench(self, name: str, args: list[str], limit: float) -> dict:
        json_path = self.out / f"{name}.json"
        cmd = [sys.executable, str(REPO / "bench/throughput.py"), *args, "--json", str(json_path)]
        log = self.out / "throughput.log"
        with open(log, "a") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=limit)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}:\n{tail(log)}")
        return {"command": shlex.join(cmd[1:]), "json": json_path.name, "table": tail(log, 60)}

    def throughput(self, limit: float) -> dict:
        if self.args.smoke:
            args = (
                "--device cpu --shape llama2_7b --layers 1 --cpt-shapes llama2_1.3b --cpt-layers 1 --seq-len 64"
                " --batch 1 --steps 1 --warmup 1 --loader-domain-scale 0.02 --infer-layers 2 --prompt-len 16"
                " --new-tokens 4 --repeats 1 --attn sdpa"
            )
        else:
            args = "--sections train,cpt,loader,infer --steps 8 --warmup 2 --attn sdpa --activation-checkpointing"
        return self.bench("throughput", args.split(), limit)

    def full_7b(self, limit: float) -> dict:
        """The whole 32-layer 7B pruning step (CPU rehearsal: one layer at seq 64)."""
        sizes = "--device cpu --layers 1 --seq-len 64" if self.args.smoke else "--layers 32 --seq-len 4096"
        steps = "--steps 1 --warmup 1" if self.args.smoke else "--steps 3 --warmup 1"
        args = f"--sections train {sizes} --batch 1 {steps} --attn sdpa --activation-checkpointing"
        return self.bench("full_7b", args.split(), limit)

    def run(self) -> int:
        budgets = {"data": 60, "source": 30, "prune": 150, "cpt": 90, "throughput": 120, "full_7b": 60}
        self.stage("data", budgets["data"], (), self.data)
        self.stage("source", budgets["source"], ("data",), self.source)
        self.stage("prune", budgets["prune"], ("source",), self.prune)
        self.stage("cpt", budgets["cpt"], ("prune",), self.cpt)
        self.stage("throughput", budgets["throughput"], (), self.throughput)
        self.stage("full_7b", budgets["full_7b"], (), self.full_7b)
        stages = self.record["stages"]
        print(json.dumps({k: v.get("status") for k, v in stages.items()}))
        return 0 if all(v.get("status") == "ok" for v in stages.values()) else 1


def environment() -> dict[str, Any]:
    """``bench/throughput.py``'s record (device, versions), plus llm-foundry, the cores and the GPU's memory."""
    import torch
    from throughput import environment as device_environment

    cuda = torch.cuda.is_available()
    env = device_environment(torch.device("cuda" if cuda else "cpu"))
    env["versions"]["llmfoundry"] = __import__("llmfoundry").__version__
    env["cpus"] = os.cpu_count()
    if cuda:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="gpu_check.json, the logs, the bench json")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpu_check_work",
        help="data, source and runs: tens of GB on the GPU, so outside --output, whose files a device call "
        "sends back (default: TMPDIR/gpu_check_work)",
    )
    parser.add_argument("--smoke", action="store_true", help="the CPU rehearsal at toy widths")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers of the random source (default 4 on the GPU: set by the time, not memory)",
    )
    parser.add_argument("--steps", type=int, default=10, help="batches of each recipe run")
    parser.add_argument("--budget-s", type=float, default=510.0, help="skip a stage that no longer fits")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="a comma list of stages to run (a later run reuses the work folder's data and runs)",
    )
    args = parser.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    if args.layers is None:
        args.layers = 2 if args.smoke else 4
    if args.steps < 2:
        parser.error("--steps must be at least 2: the run is killed after the first half and resumed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print(
                "bench/gpu_check.py: no CUDA device here; --smoke rehearses the same path on the CPU",
                file=sys.stderr,
            )
            return 2
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
