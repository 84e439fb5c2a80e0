"""Several processes under torchrun (gloo, CPU, two processes, tiny preset): what distributed.py
promises. Two processes must train the adapter one process trains with the same batch and
micro-batch, write nothing twice, stop together with one clear line, resume, and evaluate to
exactly the predictions of one process.
"""
import os
import subprocess
import sys

import pytest
import torch

import interlora
from machinery import adapters
from conftest import ROOT, read_jsonl, run, write_tiny_task

# 4 sequences per step in 2 micro-batches of 2: one micro-batch per process with two processes
ARGS = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--lr", "1e-3",
        "--warmup_steps", "2", "--cutoff_len", "320", "--max_steps", "6", "--save_every", "2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torchrun gives each process one thread: so does the reference


def torchrun(*args, kill=None, processes=2):
    """`torchrun --standalone --nproc_per_node 2 SCRIPT ARGS`, or through tests/kill_at.py with a kill."""
    script = [str(ROOT / "tests" / "kill_at.py"), kill] if kill else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *script, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


def single(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | ONE_THREAD)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def our_errors(result):
    """The error lines our processes printed (torchrun adds its own failure report after them)."""
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def adapter(folder):
    return adapters.read_adapter(folder / "adapter.pt")["tensors"]


@pytest.fixture(scope="module")
def module_data_dir(tmp_path_factory):
    return write_tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_data_dir):
    """One process: the adapter and log that two processes must reproduce."""
    out = tmp_path_factory.mktemp("one-process")
    ok(single("train.py", *ARGS, "--data_dir", module_data_dir, "--out_dir", out))
    return out


def test_two_processes_train_the_adapter_of_one(reference, module_data_dir, tmp_path):
    out = tmp_path / "two"
    result = ok(torchrun("train.py", *ARGS, "--data_dir", module_data_dir, "--out_dir", out))
    # each micro-batch's gradient is the same whichever process computes it (its dropout is seeded by
    # step and index), and a sum of two is the same in either order: the adapters agree bit for bit
    ones, twos = adapter(reference), adapter(out)
    assert ones.keys() == twos.keys()
    for name in ones:
        assert torch.equal(ones[name], twos[name]), (name, (ones[name] - twos[name]).abs().max())
    assert read_jsonl(out / "log.jsonl") and [r["loss"] for r in read_jsonl(out / "log.jsonl")] == \
        [r["loss"] for r in read_jsonl(reference / "log.jsonl")]
    # only rank 0 wrote: each file once, each step logged once, one progress bar
    assert sorted(p.name for p in out.iterdir()) == ["adapter.pt", "checkpoint.pt", "log.jsonl", "settings.json"]
    assert result.stdout.count("trainable parameters:") == 1


def test_a_sharded_base_trains_the_same_adapter(reference, module_data_dir, tmp_path):
    out = tmp_path / "sharded"
    ok(torchrun("train.py", *ARGS, "--shard_base", "--data_dir", module_data_dir, "--out_dir", out))
    ones, sharded = adapter(reference), adapter(out)
    # FSDP2 gathers each block's weights before it runs: the same numbers, so the same arithmetic
    for name in ones:
        assert torch.allclose(ones[name], sharded[name], rtol=0, atol=1e-6), name


def test_a_killed_process_stops_the_run_with_one_line_and_resume_continues(reference, module_data_dir, tmp_path):
    out = tmp_path / "killed"
    args = [*ARGS, "--data_dir", module_data_dir, "--out_dir", out]
    # rank 1 dies as step 4 begins: rank 0 has saved step 2 for sure (it joined step 3's gradient sum only after the
    # save), and cannot save step 4 (its gradient sum never completes). Dying at step 3 would race with that save.
    result = torchrun("train.py", *args, kill="step:4@1")
    assert result.returncode != 0
    errors = our_errors(result)
    assert len(errors) == 1 and "the last good save is step 2" in errors[0] and "--resume" in errors[0], errors
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and not (out / "adapter.pt").exists()

    ok(torchrun("train.py", *args, "--resume"))
    resumed = adapter(out)
    for name, tensor in adapter(reference).items():
        assert torch.equal(tensor, resumed[name]), name
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_two_processes_evaluate_to_the_predictions_of_one(reference, module_data_dir, tmp_path):
    args = ["--adapter", reference / "adapter.pt", "--data_dir", module_data_dir, "--datasets", "AddSub,SVAMP,AQuA",
            "--max_new_tokens", "6", "--batch_size", "5"]  # 24 items: 5 batches, the last round has one
    ok(single("eval.py", *args, "--out_dir", tmp_path / "one"))
    result = ok(torchrun("eval.py", *args, "--out_dir", tmp_path / "two"))
    assert result.stdout.count("| tiny |") == 1  # one table, printed by rank 0, and each file written once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["predictions.jsonl", "results.json", "results.md",
                                                                   "run.json"]

    def predictions(folder):
        return sorted(read_jsonl(folder / "predictions.jsonl"), key=lambda r: (r["dataset"], r["index"]))
    assert predictions(tmp_path / "two") == predictions(tmp_path / "one") and len(predictions(tmp_path / "one")) == 24
    for name in ("results.md", "results.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()

    # interrupted two-process evaluation: rerun on one process continues, nothing redone
    out = tmp_path / "killed"
    assert torchrun("eval.py", *args, "--out_dir", out, kill="batch:2@1").returncode != 0
    kept = len(read_jsonl(out / "predictions.jsonl"))
    assert 0 < kept < 24
    result = ok(single("eval.py", *args, "--out_dir", out))
    assert f"24 items, {24 - kept} to generate, {kept} already in" in result.stdout
    assert predictions(out) == predictions(tmp_path / "one")


def test_a_bad_setup_is_one_line_from_rank_0(module_data_dir, tmp_path):
    out = tmp_path / "run"
    # 3 micro-batches per step do not split over 2 processes
    result = torchrun("train.py", *ARGS, "--grad_accum", "3", "--data_dir", module_data_dir, "--out_dir", out)
    errors = our_errors(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "--grad_accum 3 micro-batches per step do not split evenly over 2 processes" in errors[0]
    assert not out.exists()

    # a checkpoint of one process, resumed by two
    partial = single("tests/kill_at.py", "step:3", "train.py", *ARGS, "--data_dir", module_data_dir, "--out_dir", out)
    assert partial.returncode == -9
    result = torchrun("train.py", *ARGS, "--data_dir", module_data_dir, "--out_dir", out, "--resume")
    errors = our_errors(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "written by a run of 1 process(es), this one has 2" in errors[0]
    assert "python train.py for 1" in errors[0]
    ok(run("train.py", *ARGS, "--data_dir", module_data_dir, "--out_dir", out, "--resume"))  # as it says
