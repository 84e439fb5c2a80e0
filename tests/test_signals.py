"""SIGTERM and SIGHUP as clean stops, across real processes (tests/kill_at.py sends them at chosen
moments): a scheduler's preemption or a closed terminal stops train.py with its last finished
step saved and eval.py with every finished batch kept, in one line and with exit code 128 + the
signal's number; the run resumed gives, bit for bit, what an uninterrupted run gives.
"""
import os
import signal
import subprocess
import sys

import pytest

import eval as evaluate_script
import train as train_script
from machinery import runs
from conftest import ROOT, read_jsonl, run, write_tiny_task
from test_faults import SHORT, assert_same_adapter, checkpoint_step, hidden_files, step_losses

FOUR = [*SHORT, "--max_steps", "4"]  # four steps, a checkpoint every two


def signalled(moment, script, *args, code):
    """Run a command through tests/kill_at.py, which sends a signal at `moment`; it must stop
    with exit code `code` and one line on stderr, no traceback."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at.py"), moment, script,
                             *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == code, (moment, result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of the four steps, in its own process."""
    data = write_tiny_task(tmp_path_factory.mktemp("task"))
    out = tmp_path_factory.mktemp("straight")
    result = run("train.py", *FOUR, "--data_dir", data, "--out_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return data, out


def test_training_stopped_by_sigterm_or_sighup_resumes_to_the_uninterrupted_adapter(straight,
                                                                                   tmp_path,
                                                                                   capsys):
    data, reference = straight
    out = tmp_path / "stopped"
    args = [*FOUR, "--data_dir", data, "--out_dir", out]
    # as step 3 begins (step 2 saved): step 3 is abandoned, the checkpoint stays at step 2
    line = signalled("SIGTERM/step:3", "train.py", *args, code=128 + signal.SIGTERM)
    assert line.startswith("stopped by SIGTERM during step 3; checkpoint at step 2 (") \
        and line.endswith("): continue with --resume"), line
    assert checkpoint_step(out) == 2
    # in step 4's first micro-batch (the third of this process): step 4 is abandoned before its
    # second, and step 3 (no save step) is saved
    line = signalled("SIGHUP/micro:3", "train.py", *args, "--resume", code=128 + signal.SIGHUP)
    assert line.startswith("stopped by SIGHUP during step 4; checkpoint at step 3 ("), line
    assert checkpoint_step(out) == 3
    # while step 4's checkpoint (the last) is being written: the write finishes, then the run stops
    line = signalled("SIGTERM/save:1", "train.py", *args, "--resume", code=128 + signal.SIGTERM)
    assert line.startswith("stopped by SIGTERM during step 4; checkpoint at step 4 ("), line
    assert checkpoint_step(out) == 4 and not (out / "adapter.pt").exists()
    # no step is left to take: only the adapter is written, here in-process
    train_script.main([str(a) for a in [*args, "--resume"]])
    assert "at step 4 of 4" in capsys.readouterr().out

    assert_same_adapter(reference / "adapter.pt", out / "adapter.pt")
    assert step_losses(out) == step_losses(reference)  # each step logged once, the same losses
    assert hidden_files(out) == []


def test_a_stop_while_the_base_loads_loses_nothing(straight, tmp_path, monkeypatch, capsys):
    data, _ = straight
    out = tmp_path / "stopped"

    def load_and_stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train_script, "load_model", load_and_stop)
    before = {signum: signal.getsignal(signum) for signum in runs.STOP_SIGNALS}
    with pytest.raises(SystemExit) as stop:
        train_script.main([*FOUR, "--data_dir", str(data), "--out_dir", str(out)])
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == (
        "stopped by SIGTERM before training began; nothing was lost: run the same command again")
    assert not (out / "checkpoint.pt").exists()
    # the commands run in-process here: pytest's own handlers are given back
    assert {signum: signal.getsignal(signum) for signum in runs.STOP_SIGNALS} == before


def test_evaluation_stopped_by_sigterm_keeps_every_finished_batch(straight, tmp_path, capsys):
    data, reference = straight
    args = ["--adapter", reference / "adapter.pt", "--data_dir", data, "--datasets", "AddSub,SVAMP",
            "--max_new_tokens", "4", "--batch_size", "3"]  # 16 items: 6 batches
    out = tmp_path / "stopped"
    line = signalled("SIGTERM/batch:3", "eval.py", *args, "--out_dir", out,
                     code=128 + signal.SIGTERM)
    assert line == (f"stopped by SIGTERM with 6 of 16 predictions made; all made are kept in "
                    f"{out / 'predictions.jsonl'}: run the same command again to continue"), line
    assert len(read_jsonl(out / "predictions.jsonl")) == 6 and hidden_files(out) == []

    evaluate_script.main([str(a) for a in [*args, "--out_dir", out]])
    assert "16 items, 10 to generate, 6 already in" in capsys.readouterr().out
    evaluate_script.main([str(a) for a in [*args, "--out_dir", tmp_path / "straight"]])

    def predictions(folder):
        return sorted(read_jsonl(folder / "predictions.jsonl"),
                      key=lambda r: (r["dataset"], r["index"]))
    assert predictions(out) == predictions(tmp_path / "straight")


def test_sigterm_to_torchrun_is_a_clean_stop_not_a_failed_process(straight, tmp_path):
    data, reference = straight
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(ROOT / "tests" / "kill_at.py"), "SIGTERM-to-torchrun/step:3@0",
               "train.py", *map(str, FOUR), "--data_dir", str(data), "--out_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "another process" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(
        "stopped by SIGTERM during step 3; checkpoint at step 2 ("), result.stderr[-3000:]
    assert checkpoint_step(out) == 2
