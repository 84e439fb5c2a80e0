"""Finite numbers only: no checkpoint, adapter or JSON file holds a NaN, an infinity or a
diverged weight; the save a failed run names as good is finite and resumes; eval.py and
report.py refuse such an adapter in one line (issue 19; machinery/runs.py's promises)."""
import importlib
import json
import math

import pytest
import torch

import data
import eval as evaluate_script
import report
import train as train_script
from conftest import read_jsonl
from machinery import runs
from test_faults import SHORT, assert_same_adapter, hidden_files, stopped


def train(data_dir, out, *extra):
    argv = [*SHORT, "--data_dir", data_dir, "--out_dir", out, *extra]
    return train_script.main([str(a) for a in argv])


def assert_nothing_bad_written(out):
    """No checkpoint or adapter, no temporary file; what was logged is finite."""
    assert not (out / "checkpoint.pt").exists() and not (out / "adapter.pt").exists()
    assert hidden_files(out) == []
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(out / "log.jsonl"))


@pytest.mark.parametrize("steps", [["--max_steps", "6", "--save_every", "2"], ["--max_steps", "1"]])
def test_a_diverging_run_writes_no_checkpoint_and_no_adapter(data_dir, tmp_path, capsys, steps):
    # --lr 1e10: one step moves each weight by about that step's lr (warmup: a fraction of 1e10)
    out = tmp_path / "run"
    message = stopped(train_script.main, [*SHORT, "--lr", "1e10", *steps, "--data_dir", data_dir,
                                          "--out_dir", out], capsys)
    assert "not saving step" in message and "lower --lr" in message, message
    assert "non-finite" in message or "past the 10000" in message, message
    assert_nothing_bad_written(out)


def poison_after(monkeypatch, optimizer_steps):
    """Make every adapter weight NaN after the optimizer's `optimizer_steps`-th step."""
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == optimizer_steps:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_after_a_nan_loss_the_save_named_good_is_finite_and_resumes(data_dir, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "run"
    poison_after(monkeypatch, 3)  # step 4's loss is NaN; the save at step 2 came before
    message = stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out], capsys)
    assert "loss is nan at step 4" in message and "the last good save is step 2" in message, message
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and runs.bad_numbers(state["adapter"], runs.ADAPTER_BOUND) is None
    assert runs.bad_numbers(state["optimizer"]) is None
    monkeypatch.undo()

    # --resume, as the message says: it finishes, with the adapter of an uninterrupted run
    train(data_dir, out, "--resume")
    train(data_dir, tmp_path / "straight")
    assert_same_adapter(out / "adapter.pt", tmp_path / "straight" / "adapter.pt")


def test_a_poisoned_save_is_never_written_and_the_last_good_one_is_named(data_dir, tmp_path, capsys,
                                                                         monkeypatch):
    # the weights go NaN in step 2's optimizer step: the loss of step 2 was still finite, so
    # only the guard before the save at step 2 can stop it
    out = tmp_path / "run"
    poison_after(monkeypatch, 2)
    message = stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out], capsys)
    assert "not saving step 2" in message and "non-finite" in message, message
    assert_nothing_bad_written(out)

    monkeypatch.undo()
    poison_after(monkeypatch, 4)  # a fresh count: the save at step 2 is good, the one at 4 is not
    message = stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out], capsys)
    assert "not saving step 4" in message and "the last good save is step 2" in message, message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_resume_refuses_a_checkpoint_that_holds_nan(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    poison_after(monkeypatch, 3)
    stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out], capsys)
    monkeypatch.undo()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    name = sorted(state["adapter"])[0]
    state["adapter"][name] = torch.full_like(state["adapter"][name], float("inf"))
    torch.save(state, out / "checkpoint.pt")
    argv = [*SHORT, "--data_dir", data_dir, "--out_dir", out, "--resume"]
    message = stopped(train_script.main, argv, capsys)
    assert name in message and "cannot be resumed" in message, message
    assert not (out / "adapter.pt").exists()


@pytest.fixture
def adapter(data_dir, tmp_path):
    out = tmp_path / "trained"
    train(data_dir, out, "--max_steps", "1")
    return out / "adapter.pt"


BAD_VALUES = [(float("nan"), "non-finite"), (float("-inf"), "non-finite"), (5e9, "past the 10000")]


@pytest.mark.parametrize("value, found", BAD_VALUES)
def test_eval_and_report_refuse_an_adapter_with_bad_numbers(data_dir, adapter, tmp_path, capsys,
                                                            value, found):
    payload = torch.load(adapter, weights_only=True)
    name = sorted(payload["tensors"])[-1]
    payload["tensors"][name] = payload["tensors"][name].clone().fill_(value)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    for main, extra in ((evaluate_script.main, ["--max_new_tokens", "2"]), (report.main, [])):
        out = tmp_path / f"out-{main.__module__}"
        argv = ["--adapter", bad, "--data_dir", data_dir, "--datasets", "SVAMP", "--limit", "2",
                *extra, "--out_dir", out]
        message = stopped(main, argv, capsys)
        assert name in message and found in message and "lower --lr" in message, message
        assert not out.exists()


def test_json_files_never_hold_a_bare_nan(tmp_path):
    # json.dumps would write NaN, which JSON readers other than Python's reject
    with pytest.raises(runs.RunError, match="NaN or an infinity"):
        runs.write_json(tmp_path / "gates.json", {"gate": float("nan")})
    log = runs.JsonLines(tmp_path / "log.jsonl")
    with pytest.raises(runs.RunError, match="NaN or an infinity"):
        log.append([{"loss": float("inf")}])
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    runs.write_json(tmp_path / "fine.json", {"gate": 0.5})
    assert json.loads((tmp_path / "fine.json").read_text()) == {"gate": 0.5}


def test_the_bound_passes_a_trained_adapter_and_stops_a_diverged_one():
    # integers are never checked; a float at the bound is fine, one past it or NaN is not
    bound = runs.ADAPTER_BOUND
    fine = {"a": torch.tensor([1.0, -bound]), "n": torch.tensor([10 ** 12])}
    assert runs.bad_numbers(fine, bound) is None
    assert "past" in runs.bad_numbers({"a": torch.tensor([bound * 1.01])}, bound)
    state = {"s": {0: {"exp_avg": torch.tensor([0.0, float("nan")])}}}
    assert "1 non-finite" in runs.bad_numbers(state)
    # no bound (the optimizer state): only finiteness is checked
    assert runs.bad_numbers({"s": {0: {"exp_avg": torch.tensor([1e30])}}}) is None


# ------------------------------------------------------------------------ numbers typed or read

@pytest.mark.parametrize("answer", ["nan", "inf", "-Infinity", "1e999"])
def test_a_math_answer_no_number_can_equal_is_refused_when_the_task_loads(data_dir, answer):
    # float() reads each as a non-finite number: |prediction - answer| <= 0.001 never holds
    path = data_dir / "dataset" / "SVAMP" / "test.json"
    items = json.loads(path.read_text())
    items[1]["answer"] = answer
    path.write_text(json.dumps(items))
    expected = rf"test.json: item 1: answer '{answer}' is not a finite number"
    with pytest.raises(data.DataError, match=expected):
        data.load_task("math", data_dir, datasets=["SVAMP"], with_train=False)
    with pytest.raises(data.DataError, match="is not a finite number"):
        data.is_correct("SVAMP", "the answer is 8", answer)
    assert data.is_correct("SVAMP", "the answer is 8", "8.0")
    # a response never yields one either ("1e999" reads as its last number, 999)
    assert data.extract_answer("SVAMP", f"the answer is {answer}") in (None, 999.0)


@pytest.mark.parametrize("typed", ["1e-400", "0.5e-330", "2.5E-500"])
def test_a_float_flag_that_rounds_to_zero_is_refused(data_dir, tmp_path, capsys, typed):
    out = tmp_path / "run"
    argv = [*SHORT, "--lr", typed, "--data_dir", data_dir, "--out_dir", out]
    message = stopped(train_script.main, argv, capsys)
    assert f"argument --lr: {typed} is too small to be a float" in message, message
    assert not out.exists()
    # zero typed as zero still means the method's learning rate; a tiny float that is one stays
    assert train_script.parse_settings(["--lr", "0e5"]).lr == 3e-4  # the paper's, for interlora
    assert train_script.parse_settings(["--lr", "4e-320"]).lr == float("4e-320")
    argv = ["download", "--timeout", "1e-400", "--data_dir", tmp_path / "d"]
    message = stopped(data.main, argv, capsys)
    assert "argument --timeout: 1e-400 is too small" in message, message
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("main, argv, flag", [
    (train_script.main, ["--max_step", "2"], "--max_step"),
    (evaluate_script.main, ["--adapter", "a.pt", "--max_new_token", "2"], "--max_new_token"),
    (report.main, ["--adapter", "a.pt", "--limi", "2"], "--limi"),
    (data.main, ["download", "--data_di", "somewhere"], "--data_di"),
])
def test_an_abbreviated_flag_is_refused_not_guessed(main, argv, flag, capsys, tmp_path,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it taken as the full flag, nothing lands in the project
    message = stopped(main, argv, capsys)
    assert f"unrecognized arguments: {flag}" in message, message


@pytest.mark.parametrize("script", ["full_size", "reproducibility", "speed"])
def test_the_benchmarks_refuse_abbreviations_too(script, capsys):
    # "--hel" would be --help with prefix matching (exit 0 and the usage); refused, it is exit 2
    bench = importlib.import_module(f"bench.{script}")
    with pytest.raises((SystemExit, runs.RunError)) as stop:
        bench.main(["--hel"])
    assert isinstance(stop.value, runs.RunError) or stop.value.code == 2
    assert "show this help message" not in capsys.readouterr().out
