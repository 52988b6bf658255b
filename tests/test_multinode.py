"""Multi-node runs as the README launches them: ``scripts/launch_multinode.sh`` on every node (here two
launchers on this machine, NODE_RANK 0 and 1, one CPU rank each over gloo) on one shared save_folder with
autoresume on; ``scripts/slurm_train.sbatch`` runs that script once per node through ``srun``.

Composer 0.32.1 gave both nodes one signal-file name in the shared folder (``shearing.composer.compat``):
the first start crashed with ``FileNotFoundError ... ._signal_file_node0_*``. Killed (SIGKILL, both
process groups) once a checkpoint exists and relaunched, the run continues from that checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO, free_port, run_overrides

from shearing.checkpoints import LATEST, checkpoint_batch

LAUNCH = REPO / "scripts/launch_multinode.sh"
YAML = "yamls/testing/prune_tiny.yaml"


def launch_two_nodes(logs: Path, args: list[str], per_node: dict[int, list[str]] | None = None):
    """``scripts/launch_multinode.sh args`` as node 0 and node 1 (each in its own process group); each
    node's launcher and local rank 0 write ``logs/node{N}.log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NNODES": "2", "GPUS_PER_NODE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this venv's composer
    env.pop("FSDP_VERSION", None)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in (0, 1):
        with open(logs / f"node{node}.log", "w") as out:
            cmd = [str(LAUNCH), *args, *(per_node or {}).get(node, [])]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env={**env, "NODE_RANK": str(node)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


def kill_nodes(procs) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its training process
        except ProcessLookupError:
            pass
        proc.wait()


def node_logs(logs: Path) -> str:
    return "".join(
        f"\n--- {p.name} (end) ---\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("node*.log"))
    )


def wait_nodes(procs, logs: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        kill_nodes(procs)
        pytest.fail(f"the two nodes did not finish in {timeout:.0f} s:{node_logs(logs)}", pytrace=False)


def train_losses(metrics: Path) -> dict[int, float]:
    """``loss/train/total`` per logged step of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    losses = {}
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss/train/total" in record:
            losses[record["step"]] = record["loss/train/total"]
    return losses


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_nodes_on_a_shared_folder_resume_after_sigkill(tmp_path, tiny_gqa_dir, tiny_data):
    run = tmp_path / "run"
    args = [
        YAML,
        *run_overrides(tiny_gqa_dir, tiny_data, run, "variables.reference_losses={code: 3.0, docs: 3.0}"),
        "max_duration=8ba",
        "save_interval=3ba",
        "eval_interval=100ba",
        "console_log_interval=1ba",  # the console shows every batch: where the relaunch starts
    ]
    # Metrics log step s for batch s + 1: the checkpoint at batch 3 holds steps 0-2.
    procs = launch_two_nodes(tmp_path / "killed", args)
    deadline = time.monotonic() + 300
    while True:
        done = [proc.poll() for proc in procs]
        logged = train_losses(run / "metrics.jsonl")
        if (run / LATEST).exists() and max(logged, default=-1) >= checkpoint_batch((run / LATEST).resolve()):
            break  # a checkpoint, and a step past it that the relaunch redoes
        if any(code is not None for code in done) or time.monotonic() > deadline:
            kill_nodes(procs)
            pytest.fail(
                f"no checkpoint with a step past it before the nodes ended (exit codes {done}):"
                f"{node_logs(tmp_path / 'killed')}",
                pytrace=False,
            )
        time.sleep(0.02)
    kill_nodes(procs)
    saved = checkpoint_batch((run / LATEST).resolve())
    killed = train_losses(run / "metrics.jsonl")
    assert saved in (3, 6) and not (run / "ep0-ba8-rank0.pt").exists(), "killed too late"

    procs = launch_two_nodes(tmp_path / "relaunched", args)
    codes = wait_nodes(procs, tmp_path / "relaunched", timeout=300)
    assert codes == [0, 0], node_logs(tmp_path / "relaunched")
    console = (tmp_path / "relaunched" / "node0.log").read_text()
    batches = [
        int(line.split("=")[1].split("/")[0]) for line in console.splitlines() if line.startswith("[batch=")
    ]
    assert batches == list(range(saved + 1, 9)), batches  # continued after the checkpoint, to max_duration
    assert os.readlink(run / LATEST) == "ep0-ba8-rank0.pt"
    final = train_losses(run / "metrics.jsonl")
    assert sorted(final) == list(range(8))
    redone = [step for step in killed if step >= saved]
    assert redone
    for step in redone:  # the steps the killed run had logged past the checkpoint, computed again
        assert final[step] == pytest.approx(killed[step], rel=0, abs=1e-6), step
    assert not list(run.glob("._signal_file*"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_refusal_stops_every_node_and_a_node_local_folder_is_refused(tmp_path, tiny_gqa_dir, tiny_data):
    """Rank 0's refusals reach the other node at once (before: it waited dist_timeout, 600 s, for rank 0);
    a save_folder that node 1 cannot see is refused on both nodes before anything loads."""
    from tiny import hold_lock

    common = ["variables.reference_losses={code: 3.0, docs: 3.0}", "max_duration=2ba"]
    run = tmp_path / "run"
    holder = hold_lock(run)  # another run holds the folder
    try:
        logs = tmp_path / "locked"
        procs = launch_two_nodes(logs, [YAML, *run_overrides(tiny_gqa_dir, tiny_data, run, *common)])
        codes = wait_nodes(procs, logs, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert all(codes), node_logs(logs)
    assert "is in use by another run (host testhost" in (logs / "node0.log").read_text(), node_logs(logs)
    assert (
        "global rank 0 stopped the run at the save_folder lock: SaveFolderLocked"
        in (logs / "node1.log").read_text()
    ), node_logs(logs)

    # Node-local folders: the same path on two machines is two folders; here two paths stand for them.
    logs = tmp_path / "node_local"
    base = [YAML, *run_overrides(tiny_gqa_dir, tiny_data, tmp_path / "node0_disk", *common)]
    procs = launch_two_nodes(logs, base, per_node={1: [f"variables.save_folder={tmp_path / 'node1_disk'}"]})
    codes = wait_nodes(procs, logs, timeout=120)
    assert all(codes), node_logs(logs)
    for node in (0, 1):
        text = (logs / f"node{node}.log").read_text()
        assert (
            f"save_folder {tmp_path / 'node0_disk' if node == 0 else tmp_path / 'node1_disk'} is not shared"
            in text
        )
        assert f"is not visible from node 1 ({socket.gethostname()})" in text, node_logs(logs)
    assert not list((tmp_path / "node0_disk").glob("ep*")), "trained on a node-local folder"
    assert not list((tmp_path / "node0_disk").glob(".shearing.shared-check-*"))


def test_the_composer_signal_file_name_is_per_node(monkeypatch):
    """Composer 0.32.1 broadcasts rank 0's name (``._signal_file_node0_*``) to every node."""
    from composer.utils import dist

    import shearing.train  # noqa: F401  (applies the workaround)
    from shearing.composer import compat as composer_compat

    patched = dist.get_node_signal_file_name
    assert getattr(patched, "_shearing_per_node", False)
    composer_compat.apply()  # once: a second call changes nothing
    assert dist.get_node_signal_file_name is patched
    # busy_wait_for_local_rank_zero reads the name function from its module's globals: the same one
    assert dist.busy_wait_for_local_rank_zero.__wrapped__.__globals__ is vars(dist)

    def from_global_rank_zero(objects, src=0):
        objects[0] = "._signal_file_node0_AbC123"  # what every node receives

    monkeypatch.setattr(dist, "broadcast_object_list", from_global_rank_zero)
    monkeypatch.setenv("NODE_RANK", "1")
    assert dist.get_node_signal_file_name() == "._signal_file_node1_AbC123"
    monkeypatch.setenv("NODE_RANK", "0")
    assert dist.get_node_signal_file_name() == "._signal_file_node0_AbC123"
    assert composer_compat.per_node_signal_file_name("other", 3) == "other_node3"


def test_slurm_script_runs_the_launch_script_once_per_node(tmp_path):
    """``slurm_train.sbatch`` under stand-ins for ``srun``/``scontrol`` (one task per node) and for
    ``composer``: each node gets its SLURM_NODEID as node rank and the job's first host as master."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "scontrol": 'printf "gpu-node-7\\ngpu-node-9\\n"',
        # srun: run the command once per node, as Slurm would, with that node's SLURM_NODEID
        "srun": 'while [[ $1 == --* ]]; do echo "srun $1" >> "$OUT/srun.args"; shift; done\n'
        'for n in 0 1; do SLURM_NODEID=$n "$@" > "$OUT/node$n.cmd"; done',
        "composer": 'echo "$@"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[7,9]",
        "SLURM_GPUS_PER_NODE": "h100:4",
        "NODE_RANK": "5",  # a stray value in the submitting shell must not reach the tasks
    }
    args = ["yamls/pruning/llama2_7b_to_2.7b.yaml", "variables.save_folder=/shared/runs/x"]
    done = subprocess.run(
        ["bash", str(REPO / "scripts/slurm_train.sbatch"), *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "srun --kill-on-bad-exit=1" in (tmp_path / "srun.args").read_text()
    for node in (0, 1):
        cmd = (tmp_path / f"node{node}.cmd").read_text().split()
        assert cmd[:10] == [
            "--world_size", "8", "--node_rank", str(node), "-n", "4",
            "--master_addr", "gpu-node-7", "--master_port", "29500",
        ]  # fmt: skip
        assert cmd[10:] == [str(REPO / "train.py"), *args]
    # without Slurm, a missing variable is named
    bare = {"PATH": os.environ["PATH"]}
    done = subprocess.run([str(LAUNCH), "x.yaml"], env=bare, capture_output=True, text=True)
    assert done.returncode == 2 and "set NNODES NODE_RANK GPUS_PER_NODE MASTER_ADDR" in done.stderr
