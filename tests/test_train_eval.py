"""train.py and eval.py end to end on the tiny preset: the real commands, resumption, bad input.

The synthetic task is in LLM-Adapters' format: eight questions, each with its own number.
What counts as correct is decided by data.is_correct (checked against LLM-Adapters' rules in
test_data.py), and the untrained base model is the baseline the trained adapter must beat.
"""
import functools
import json

import pytest
import torch

import eval as evaluate_script
import interlora
from machinery import adapters
import train as train_script
from conftest import read_jsonl, run
from model import Transformer

# A tiny run that learns the task in about 30 s on two cores (every seed tried got 7 or 8 of 8 right).
TINY = ["--model", "tiny", "--task", "math", "--micro_batch_size", "8", "--grad_accum", "1", "--lr", "5e-3",
        "--r", "8", "--dropout", "0", "--warmup_steps", "10", "--cutoff_len", "320", "--mask_prompt"]


def test_training_and_evaluation_end_to_end(data_dir, tmp_path):
    out = tmp_path / "run"
    result = run("train.py", *TINY, "--epochs", "200", "--data_dir", data_dir, "--out_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.lstrip().startswith("{")  # the resolved settings come first
    assert "trainable parameters:" in result.stdout
    losses = [line["loss"] for line in read_jsonl(out / "log.jsonl")]
    assert len(losses) == 200 and losses[-1] < 0.2 * losses[0], losses[::10]
    for name in ("adapter.pt", "settings.json", "checkpoint.pt"):
        assert (out / name).exists()

    common = ["--data_dir", data_dir, "--datasets", "AddSub", "--max_new_tokens", "20"]
    base = run("eval.py", "--adapter", out / "adapter.pt", "--base", *common, "--out_dir", tmp_path / "base")
    assert base.returncode == 0, base.stderr[-2000:]
    tuned = run("eval.py", "--adapter", out / "adapter.pt", *common)
    assert tuned.returncode == 0, tuned.stderr[-2000:]

    base_results = json.loads((tmp_path / "base" / "results.json").read_text())
    results = json.loads((out / "eval-math" / "results.json").read_text())
    assert base_results["accuracy"]["AddSub"] <= 100 / 8  # the random base knows none of it
    assert results["accuracy"]["AddSub"] >= 75, (out / "eval-math" / "predictions.jsonl").read_text()
    table = (out / "eval-math" / "results.md").read_text()
    assert table.splitlines()[0] == "| LLM | Method | Params | AddSub | Avg. |"
    assert "| tiny | interlora |" in table and table in tuned.stdout


def adapter_tensors(path):
    return adapters.read_adapter(path)["tensors"]


def test_resumed_training_ends_with_the_same_adapter(data_dir, tmp_path, monkeypatch):
    args = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--lr", "1e-3",
            "--warmup_steps", "2", "--cutoff_len", "320", "--max_steps", "6", "--save_every", "2",
            "--data_dir", str(data_dir)]  # dropout stays on: its RNG state must be restored too
    train_script.main(args + ["--out_dir", str(tmp_path / "straight")])

    # interrupt the second run during step 3 (after the save at step 2), as Ctrl-C would
    get_lr = train_script.get_lr

    def interrupt_at_step_3(step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return get_lr(step, *rest)
    monkeypatch.setattr(train_script, "get_lr", interrupt_at_step_3)
    with pytest.raises(SystemExit) as stop:
        train_script.main(args + ["--out_dir", str(tmp_path / "resumed")])
    assert stop.value.code == 130  # an interruption, as in eval.py
    assert not (tmp_path / "resumed" / "adapter.pt").exists()
    monkeypatch.setattr(train_script, "get_lr", get_lr)

    with pytest.raises(SystemExit):  # without --resume the folder is protected
        train_script.main(args + ["--out_dir", str(tmp_path / "resumed")])
    train_script.main(args + ["--out_dir", str(tmp_path / "resumed"), "--resume"])

    straight, resumed = (adapter_tensors(tmp_path / d / "adapter.pt") for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [line["step"] for line in read_jsonl(tmp_path / "resumed" / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert any(not torch.all(t == 0) for n, t in straight.items() if "lora_B" in n)  # it did train


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_save(data_dir, tmp_path, monkeypatch, capsys):
    forward, calls = Transformer.forward, []

    @functools.wraps(forward)  # the same signature: the adapters' hook finds attention_mask by it
    def poisoned(self, *args, **kwargs):  # the loss of the fifth micro-batch (step 3) is NaN
        calls.append(1)
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(Transformer, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_script.main(["--model", "tiny", "--task", "math", "--micro_batch_size", "4", "--grad_accum", "2",
                           "--cutoff_len", "320", "--max_steps", "6", "--save_every", "2", "--data_dir", str(data_dir),
                           "--out_dir", str(out)])
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 3" in message and "--lr" in message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the last good save stays
    assert not (out / "adapter.pt").exists()


def test_interrupted_evaluation_resumes_without_redoing_items(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_script.main(["--model", "tiny", "--task", "math", "--max_steps", "1", "--cutoff_len", "320",
                       "--data_dir", str(data_dir), "--out_dir", str(out)])
    args = ["--adapter", str(out / "adapter.pt"), "--data_dir", str(data_dir), "--datasets", "AddSub,SVAMP",
            "--max_new_tokens", "4", "--batch_size", "3"]

    generated = []
    generate = Transformer.generate

    def counting_generate(self, prompts, *rest, **kwargs):
        generated.extend(prompts)
        if len(generated) > 6:
            raise KeyboardInterrupt  # dies during the third batch
        return generate(self, prompts, *rest, **kwargs)
    monkeypatch.setattr(Transformer, "generate", counting_generate)
    with pytest.raises(SystemExit) as stop:
        evaluate_script.main(args)
    assert stop.value.code == 130
    predictions = out / "eval-math" / "predictions.jsonl"
    assert len(read_jsonl(predictions)) == 6
    with open(predictions, "a") as f:
        f.write('{"dataset": "AddSub", "ind')  # a line cut short by the crash

    generated.clear()
    monkeypatch.setattr(Transformer, "generate", generate)
    resumed = evaluate_script.main(args)
    records = read_jsonl(predictions)
    assert len(records) == 16 and len({(r["dataset"], r["index"]) for r in records}) == 16

    # the same accuracy as an evaluation that was never interrupted
    fresh = evaluate_script.main(args + ["--out_dir", str(tmp_path / "fresh")])
    assert resumed == fresh

    # predictions of another evaluation are never mixed in: here a longer generation
    with pytest.raises(SystemExit) as stop:
        evaluate_script.main(args[:-2] + ["--max_new_tokens", "6"])
    assert stop.value.code == 2


def one_line_error(result):
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_input_is_one_clear_line_and_writes_nothing(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    message = one_line_error(run("train.py", *TINY, "--data_dir", empty, "--out_dir", out))
    assert "math_data.json not found" in message and "python data.py download" in message

    (data_dir / "dataset" / "SVAMP" / "test.json").write_text('[{"instruction": "x",')
    message = one_line_error(run("eval.py", "--base", "--model", "tiny", "--task", "math", "--data_dir", data_dir,
                                 "--out_dir", out))
    assert "SVAMP" in message and "invalid JSON" in message

    message = one_line_error(run("train.py", *TINY[:2], "--task", "poetry", "--data_dir", data_dir, "--out_dir", out))
    assert "unknown --task 'poetry'" in message and "math, commonsense" in message
    message = one_line_error(run("eval.py", "--base", "--model", "tiny", "--task", "math", "--datasets", "MMLU",
                                 "--data_dir", data_dir, "--out_dir", out))
    assert "MMLU" in message and "gsm8k" in message

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = one_line_error(run("train.py", *TINY, "--max_steps", "1", "--data_dir", data_dir,
                                 "--out_dir", blocker / "run"))
    assert "cannot write to output folder" in message
    assert not out.exists()  # no error above left output behind

    run_dir = tmp_path / "run"
    assert run("train.py", *TINY, "--max_steps", "1", "--data_dir", data_dir, "--out_dir", run_dir).returncode == 0
    message = one_line_error(run("eval.py", "--adapter", run_dir / "adapter.pt", "--model", "tiny-gptj",
                                 "--data_dir", data_dir, "--datasets", "AddSub", "--out_dir", out))
    assert "made for another base model" in message
    assert not out.exists()  # no folder, no predictions, no results

    message = one_line_error(run("eval.py", "--adapter", tmp_path / "missing.pt"))
    assert "not found" in message
