"""Faults and bad input on the real commands: kills at chosen moments, interruptions, full
disks, unreadable files, files of another run, nonsense settings (the promises of runs.py,
train.py and eval.py; the README's claims about resuming, reuse and atomic writes rest here).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import eval as evaluate_script
import interlora
from machinery import adapters, runs
import train as train_script
from conftest import ROOT, read_jsonl, run, shared_path, write_tiny_task

# six optimizer steps of two micro-batches of two, a checkpoint every two steps: seconds on the CPU
SHORT = ["--model", "tiny", "--task", "math", "--micro_batch_size", "2", "--grad_accum", "2", "--lr", "1e-3",
         "--warmup_steps", "2", "--cutoff_len", "320", "--max_steps", "6", "--save_every", "2"]


def killed(moment, script, *args, threads=1):
    """Run a command and SIGKILL it at `moment` (see tests/kill_at.py); threads as in conftest.run."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at.py"), moment, script, *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, (moment, result.returncode, result.stderr[-2000:])
    return result


def succeeded(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def stopped(main, argv, capsys, code=2, printed="", quiet=False):
    """Call a command's main in-process; it must exit with `code` and one `error:` line, no traceback
    (and print `printed` on stdout first, or nothing at all when quiet)."""
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert stop.value.code == code and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert printed in out and not (quiet and out), out[-2000:]
    return lines[0]


def step_losses(folder):
    return [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(folder / "log.jsonl")]


def hidden_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def checkpoint_step(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)["step"]


def assert_same_adapter(a, b):
    a, b = (adapters.read_adapter(path)["tensors"] for path in (a, b))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def adapter(data_dir, tmp_path):
    """A briefly trained tiny adapter to evaluate."""
    out = tmp_path / "trained"
    train_script.main([*SHORT, "--max_steps", "1", "--data_dir", str(data_dir), "--out_dir", str(out)])
    return out / "adapter.pt"


# ----------------------------------------------------------------------------- kills

def test_training_killed_at_any_moment_ends_with_the_adapter_of_an_uninterrupted_run(data_dir, tmp_path):
    # the reference and each piece of the interrupted run are separate processes at torch's default
    # thread count: what must agree bit for bit is the arithmetic of two processes, not only of one
    args = [*SHORT, "--data_dir", data_dir]
    succeeded(run("train.py", *args, "--out_dir", tmp_path / "straight", threads=None))

    out = tmp_path / "killed"
    killed("step:3", "train.py", *args, "--out_dir", out, threads=None)  # during step 3, after the save of step 2
    assert checkpoint_step(out) == 2
    killed("save:1", "train.py", *args, "--out_dir", out, "--resume", threads=None)  # halfway through step 4's save
    assert checkpoint_step(out) == 2  # the half-written file never took its place...
    assert hidden_files(out)  # ... and is left behind, as a kill leaves it
    killed("adapter", "train.py", *args, "--out_dir", out, "--resume", threads=None)  # 6 steps saved, adapter half done
    assert checkpoint_step(out) == 6 and not (out / "adapter.pt").exists()
    result = succeeded(run("train.py", *args, "--out_dir", out, "--resume", threads=None))
    assert "resumed from" in result.stdout and "at step 6 of 6" in result.stdout

    assert_same_adapter(tmp_path / "straight" / "adapter.pt", out / "adapter.pt")
    assert step_losses(out) == step_losses(tmp_path / "straight")  # each step logged once, the same losses
    assert hidden_files(out) == []  # the stale temporary files are gone


def test_evaluation_killed_at_any_moment_gives_the_predictions_of_an_uninterrupted_one(data_dir, adapter, tmp_path):
    args = ["--adapter", adapter, "--data_dir", data_dir, "--datasets", "AddSub,SVAMP", "--max_new_tokens", "4",
            "--batch_size", "3"]  # 16 items: 6 batches
    succeeded(run("eval.py", *args, "--out_dir", tmp_path / "straight"))

    out = tmp_path / "killed"
    killed("batch:3", "eval.py", *args, "--out_dir", out)  # two batches written
    assert len(read_jsonl(out / "predictions.jsonl")) == 6
    killed("append:2", "eval.py", *args, "--out_dir", out)  # one more batch, then half of the next's 3 lines
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3 + 2 and not lines[-1].endswith("}")
    result = succeeded(run("eval.py", *args, "--out_dir", out))
    assert "16 items, 6 to generate, 10 already in" in result.stdout
    assert "dropped 1 unreadable line(s) (11)" in result.stdout

    def predictions(folder):
        return sorted(read_jsonl(folder / "predictions.jsonl"), key=lambda r: (r["dataset"], r["index"]))
    assert predictions(out) == predictions(tmp_path / "straight")
    for name in ("results.md", "results.json"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text()
    assert hidden_files(out) == []


def test_matmuls_do_not_depend_on_memory_alignment_in_the_commands():
    # The mechanism behind the bit-exact resumes: MKL picks kernels by the operands' alignment
    # unless its conditional numerical reproducibility is on (MKL_CBWR, set by train.py and
    # eval.py before torch loads). The same numbers at 16 alignments must give the same bits.
    probe = """
import sys; sys.path.insert(0, {root!r})
import {script}, torch
torch.manual_seed(0)
differing = 0
for M, K, N in [(2048, 128, 4), (128, 1000, 4), (333, 517, 129)]:  # LoRA's narrow shapes among them
    data, w = torch.randn(M * K), torch.randn(N, K)
    outputs = []
    for offset in range(16):
        buffer = torch.empty(M * K + 16)
        buffer[offset:offset + M * K] = data
        outputs.append(buffer[offset:offset + M * K].view(M, K) @ w.T)
    differing += sum(not torch.equal(outputs[0], o) for o in outputs)
print(differing)
"""
    for script in ("train", "eval"):
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        result = subprocess.run([sys.executable, "-c", probe.format(root=str(ROOT), script=script)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "0", (script, result.stdout, result.stderr[-500:])


# ----------------------------------------------------------------------------- what a rerun means

def interrupt_at_step(monkeypatch, number):
    get_lr = train_script.get_lr

    def interrupted(step, *rest):
        if step == number - 1:
            raise KeyboardInterrupt
        return get_lr(step, *rest)
    monkeypatch.setattr(train_script, "get_lr", interrupted)


def test_what_a_rerun_does_in_each_state_of_the_folder(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*SHORT, "--save_every", "4", "--data_dir", data_dir, "--out_dir", out]

    # nothing there: --resume has nothing to resume, and creates nothing
    assert "nothing to resume" in stopped(train_script.main, [*args, "--resume"], capsys)
    assert not out.exists()

    # stopped before its first save: a log, no checkpoint; a rerun (with or without --resume) starts over
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        message = stopped(train_script.main, args, capsys, code=130)
    assert "during step 3" in message and "nothing was saved yet" in message
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2]
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 2)
        stopped(train_script.main, [*args, "--resume"], capsys, code=130, printed="starting it over")
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1]

    # unfinished: a checkpoint (step 4) and no adapter; a plain rerun refuses, --resume continues
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6)
        message = stopped(train_script.main, [*args, "--resume"], capsys, code=130)
    assert "the last good save is step 4" in message and "--resume" in message
    assert checkpoint_step(out) == 4
    assert "pass --resume" in stopped(train_script.main, args, capsys)
    assert "--lr 0.001" in stopped(train_script.main, [*args, "--resume", "--lr", "2e-3"], capsys)
    train_script.main([str(a) for a in [*args, "--resume"]])
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]

    # finished: a plain rerun refuses; --resume has nothing to do, even without checkpoint.pt
    written = (out / "adapter.pt").read_bytes()
    assert "holds a finished run" in stopped(train_script.main, args, capsys)
    for _ in range(2):
        train_script.main([str(a) for a in [*args, "--resume"]])
        assert "nothing to do" in capsys.readouterr().out
        assert (out / "adapter.pt").read_bytes() == written
        (out / "checkpoint.pt").unlink(missing_ok=True)


def test_a_started_run_is_started_over_when_run_again(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*SHORT, "--save_every", "10", "--data_dir", data_dir, "--out_dir", out]
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        stopped(train_script.main, args, capsys, code=130)
    train_script.main([str(a) for a in args])
    assert "the run there stopped before its first save; starting it over" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_resume_on_other_training_data_is_refused_and_a_moved_data_dir_is_not(
        data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*SHORT, "--out_dir", out]
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)  # the checkpoint of step 2 stays
        stopped(train_script.main, [*args, "--data_dir", data_dir], capsys, code=130)
    log = (out / "log.jsonl").read_text()

    def changed(name, edit):
        other = tmp_path / name
        shutil.copytree(data_dir, other)
        path = other / "ft-training_set" / "math_data.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return other
    one_more = changed("one-more", lambda items: items + [dict(items[0], output="It is 1.")])
    one_other = changed("one-other", lambda items: [dict(items[0], output="It is 9.")] + items[1:])
    for other, found in ((one_more, "now gives 9"), (one_other, "now gives 8")):
        message = stopped(train_script.main, [*args, "--data_dir", other, "--resume"], capsys)
        assert "settings.json was written for other training data: 8 items" in message
        assert found in message
        # nothing trained
        assert checkpoint_step(out) == 2 and (out / "log.jsonl").read_text() == log
    # the checkpoint's own record is checked too, should settings.json have been replaced
    (out / "settings.json").unlink()
    message = stopped(train_script.main, [*args, "--data_dir", one_other, "--resume"], capsys)
    assert "checkpoint.pt was written for other training data" in message
    assert checkpoint_step(out) == 2

    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    shutil.rmtree(data_dir)
    train_script.main([str(a) for a in [*args, "--data_dir", moved, "--resume"]])
    assert "resumed from" in capsys.readouterr().out and (out / "adapter.pt").exists()
    # a finished run too
    message = stopped(train_script.main, [*args, "--data_dir", one_more, "--resume"], capsys)
    assert "settings.json was written for other training data" in message


def test_the_data_record_tells_tokenizers_and_cutoffs_apart():
    from data import ByteTokenizer, SentencePieceTokenizer, tokenize_item
    items = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    spm = SentencePieceTokenizer(shared_path("spm-tokenizer", "tokenizer.model"))
    records = [train_script.data_record(tokenizer, [tokenize_item(tokenizer, items[0], cutoff)])
               for tokenizer, cutoff in ((ByteTokenizer(), 256), (spm, 256),
                                         (ByteTokenizer(), 100))]
    assert len({r["tokenizer_sha256"] for r in records}) == 2
    assert len({r["tokens_sha256"] for r in records}) == 3
    with pytest.raises(train_script.RunError, match="written with another tokenizer"):
        train_script.check_same_data(records[0], records[1], "checkpoint.pt")
    with pytest.raises(train_script.RunError, match="written for other training data: 1 items"):
        train_script.check_same_data(records[0], records[2], "checkpoint.pt")
    train_script.check_same_data(records[1], dict(records[1]), "checkpoint.pt")  # the same: passes


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A tiny run stopped during step 4, its checkpoint at step 2 (made once; tests copy it)."""
    folder = tmp_path_factory.mktemp("interrupted")
    data, out = write_tiny_task(folder / "data"), folder / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):
        interrupt_at_step(patch, 4)
        train_script.main([str(a) for a in [*SHORT, "--data_dir", data, "--out_dir", out]])
    return data, out


def edit_checkpoint(edit):
    def apply(folder):
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        edit(state)
        torch.save(state, folder / "checkpoint.pt")
    return apply


def edit_settings(edit):
    def apply(folder):
        path = folder / "settings.json"
        path.write_text(edit(path.read_text()))
    return apply


def first_adapter_tensor(state):
    return next(iter(state["adapter"]))


def set_first_tensor(make):
    """An edit that replaces the first adapter tensor by make(tensor)."""
    def edit(state):
        name = first_adapter_tensor(state)
        state["adapter"][name] = make(state["adapter"][name])
    return edit


def settings_with(**fields):
    return edit_settings(lambda text: json.dumps(dict(json.loads(text), **fields)))


BAD_RUN_FILES = {  # how checkpoint.pt or settings.json is edited -> a piece of the one error line
    "a tensor missing": (edit_checkpoint(lambda s: s["adapter"].pop(first_adapter_tensor(s))),
                         "in the model only"),
    "an extra tensor": (edit_checkpoint(lambda s: s["adapter"].update(extra=torch.zeros(2))),
                        "tensor extra is in the checkpoint only"),
    "a misshapen tensor": (edit_checkpoint(set_first_tensor(lambda t: torch.zeros(3, 5))),
                           "is torch.float32 (3, 5), the model's is torch.float32"),
    "an int64 tensor": (edit_checkpoint(set_first_tensor(lambda t: t.long())), "is torch.int64"),
    "step 1000": (edit_checkpoint(lambda s: s.update(step=1000)),
                  "its step is 1000, expected a whole number from 1 to the run's 6 steps"),
    "a negative step": (edit_checkpoint(lambda s: s.update(step=-2)), "its step is -2"),
    "a float step": (edit_checkpoint(lambda s: s.update(step=2.0)), "its step is 2.0"),
    "a step the optimizer did not take": (edit_checkpoint(lambda s: s.update(step=3)),
                                          "its optimizer has taken 2.0 steps, its step says 3"),
    "optimizer moments misshapen": (edit_checkpoint(lambda s: s["optimizer"]["state"][0].update(
        exp_avg=torch.zeros(7))), "optimizer state of tensor 0 does not fit"),
    "optimizer of fewer tensors": (edit_checkpoint(
        lambda s: s["optimizer"]["param_groups"][0]["params"].pop()), "not AdamW's for the"),
    "no optimizer": (edit_checkpoint(lambda s: s.pop("optimizer")), "it lacks optimizer"),
    "a list": (lambda f: torch.save([1, 2], f / "checkpoint.pt"), "it holds a list, not a dict"),
    "settings.json a list": (edit_settings(lambda text: "[]"), "is not the settings.json"),
    "settings.json settings a list": (settings_with(settings=[]), "is not the settings.json"),
    "settings.json a float total_steps": (settings_with(total_steps=6.0), "number 'total_steps'"),
    "settings.json cut": (edit_settings(lambda text: text[: len(text) // 2]), "json is corrupt"),
}


@pytest.mark.parametrize("damage", list(BAD_RUN_FILES))
def test_an_edited_checkpoint_or_settings_file_is_one_line_and_trains_nothing(
        interrupted_run, tmp_path, capsys, damage):
    data, original = interrupted_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    edit, fragment = BAD_RUN_FILES[damage]
    edit(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [*SHORT, "--data_dir", data, "--out_dir", out, "--resume"]
    message = stopped(train_script.main, args, capsys)
    assert fragment in message and "delete it" in message, message
    # nothing trained, nothing rewritten
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_untouched_copy_of_the_interrupted_run_resumes(interrupted_run, tmp_path, capsys):
    # the edits above are refused for what they change, not because any copy would be
    data, original = interrupted_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    train_script.main([str(a) for a in [*SHORT, "--data_dir", data, "--out_dir", out, "--resume"]])
    assert "resumed from" in capsys.readouterr().out and (out / "adapter.pt").exists()


@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
def test_a_damaged_checkpoint_is_one_clear_line(data_dir, tmp_path, monkeypatch, capsys, damage):
    out = tmp_path / "run"
    args = [*SHORT, "--data_dir", data_dir, "--out_dir", out]
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 4)
        stopped(train_script.main, args, capsys, code=130)
    path = out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000] if damage == "truncated" else os.urandom(5000))
    message = stopped(train_script.main, [*args, "--resume"], capsys)
    assert "checkpoint.pt" in message and "corrupt" in message and "delete it" in message
    assert "weights_only" not in message  # torch's advice to unpickle anything is never passed on


# ----------------------------------------------------------------------------- reuse of predictions

def test_predictions_are_reused_only_for_the_same_items_and_evaluation(data_dir, adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--adapter", adapter, "--datasets", "SVAMP", "--limit", "3", "--max_new_tokens", "4", "--out_dir", out]
    evaluate_script.main([str(a) for a in [*args, "--data_dir", data_dir]])
    assert "3 items, 3 to generate" in capsys.readouterr().out

    # other SVAMP items in another data folder: generated again, never the old answers
    other = tmp_path / "other-data"
    shutil.copytree(data_dir, other)
    items = json.loads((other / "dataset" / "SVAMP" / "test.json").read_text())
    items = [dict(item, instruction=item["instruction"].replace("number", "figure"), answer="99.0") for item in items]
    (other / "dataset" / "SVAMP" / "test.json").write_text(json.dumps(items))
    accuracy = evaluate_script.main([str(a) for a in [*args, "--data_dir", other]])
    assert "3 items, 3 to generate, 0 already in" in capsys.readouterr().out
    records = read_jsonl(out / "predictions.jsonl")
    assert {r["answer"] for r in records if r["index"] < 3} >= {"99.0"} and accuracy["SVAMP"] == 0

    # the same evaluation again: everything reused
    evaluate_script.main([str(a) for a in [*args, "--data_dir", other]])
    assert "3 items, 0 to generate" in capsys.readouterr().out

    # garbage in the middle of predictions.jsonl: the good records stay, the dropped ones are said and redone
    lines = (out / "predictions.jsonl").read_text().splitlines()
    lines[1:1] = ["42", "not json at all"]
    (out / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    evaluate_script.main([str(a) for a in [*args, "--data_dir", other]])
    printed = capsys.readouterr().out
    assert "dropped 2 unreadable line(s) (2, 3)" in printed and "0 to generate" in printed

    # another adapter (or generation length) in the same folder: refused, saying what differs
    retrained = tmp_path / "retrained"
    train_script.main([*SHORT, "--max_steps", "1", "--seed", "1", "--data_dir", str(data_dir),
                       "--out_dir", str(retrained)])
    message = stopped(evaluate_script.main, [*args[:-4], "--adapter", retrained / "adapter.pt", "--out_dir", out,
                                             "--data_dir", other], capsys)
    assert "another evaluation" in message and "adapter_sha256" in message
    (out / "run.json").write_text("{ not json")
    message = stopped(evaluate_script.main, [*args, "--data_dir", other], capsys)
    assert "run.json is corrupt" in message


def loads_recorded(monkeypatch, script):
    """The dtype and quantization each load_model call of `script` is given."""
    loads, load_model = [], script.load_model

    def recording(*args, **kwargs):
        loads.append((kwargs["dtype"], kwargs["quantize"]))
        return load_model(*args, **kwargs)
    monkeypatch.setattr(script, "load_model", recording)
    return loads


def test_eval_and_report_load_the_base_the_adapter_was_trained_on(data_dir, tmp_path, monkeypatch,
                                                                  capsys):
    import report as report_script
    trained = tmp_path / "trained"
    train_script.main([*SHORT, "--max_steps", "1", "--dtype", "bf16", "--quantize", "int8",
                       "--data_dir", str(data_dir), "--out_dir", str(trained)])
    adapter = trained / "adapter.pt"
    info = adapters.read_adapter(str(adapter))["info"]
    assert (info["dtype"], info["quantize"]) == ("bf16", "int8")
    capsys.readouterr()
    loads = loads_recorded(monkeypatch, evaluate_script)
    args = ["--adapter", adapter, "--data_dir", data_dir, "--datasets", "AddSub", "--limit", "2",
            "--max_new_tokens", "2"]
    evaluate_script.main([str(a) for a in [*args, "--out_dir", tmp_path / "as-trained"]])
    assert f"base: bf16, quantized int8, as {adapter} was trained" in capsys.readouterr().out
    assert json.loads((tmp_path / "as-trained" / "run.json").read_text())["quantize"] == "int8"
    evaluate_script.main([str(a) for a in [*args, "--quantize", "none", "--dtype", "fp32",
                                           "--out_dir", tmp_path / "other"]])
    assert (f"base: fp32, not quantized as given, though {adapter} was trained on bf16, quantized "
            "int8") in capsys.readouterr().out
    assert loads == [(torch.bfloat16, "int8"), (torch.float32, None)]

    report_loads = loads_recorded(monkeypatch, report_script)
    report_script.main([str(a) for a in ["--adapter", adapter, "--data_dir", data_dir, "--datasets",
                                         "AddSub", "--limit", "2"]])
    assert f"base: bf16, quantized int8, as {adapter} was trained" in capsys.readouterr().out
    assert report_loads == [(torch.bfloat16, "int8")]


def test_a_folder_model_is_recorded_absolute_and_found_with_checkpoint_dir(data_dir, tmp_path,
                                                                           monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    work = tmp_path / "work"
    folder = work / "llama-tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=192,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    monkeypatch.chdir(work)  # the user trains with a relative --model
    train_script.main(["--model", "llama-tiny", "--task", "math", "--max_steps", "1",
                       "--cutoff_len", "64", "--micro_batch_size", "1", "--grad_accum", "1",
                       "--data_dir", str(data_dir),
                       "--out_dir", str(tmp_path / "trained")])
    adapter = tmp_path / "trained" / "adapter.pt"
    info = adapters.read_adapter(str(adapter))["info"]
    assert info["model"] == str(folder) and info["checkpoint_dir"] == str(folder)

    monkeypatch.chdir(tmp_path)  # evaluated from elsewhere: the recorded folder is found
    args = ["--adapter", adapter, "--data_dir", data_dir, "--datasets", "AddSub", "--limit", "1",
            "--max_new_tokens", "1"]
    evaluate_script.main([str(a) for a in [*args, "--out_dir", tmp_path / "eval"]])
    moved = tmp_path / "moved-llama"
    shutil.move(folder, moved)  # the folder moved: --checkpoint_dir says where it is now
    message = stopped(evaluate_script.main, [*args, "--out_dir", tmp_path / "eval-moved"], capsys)
    assert "llama-tiny" in message
    evaluate_script.main([str(a) for a in [*args, "--checkpoint_dir", moved, "--out_dir",
                                           tmp_path / "eval-moved"]])
    assert json.loads((tmp_path / "eval-moved" / "results.json").read_text())["model"] == str(moved)


def test_the_adapter_evaluated_is_the_adapter_recorded(data_dir, adapter, tmp_path, monkeypatch):
    # the file is replaced while the base loads: run.json's sha256 and the tensors are the first's
    first = adapter.read_bytes()
    retrained = tmp_path / "retrained"
    train_script.main([*SHORT, "--max_steps", "1", "--seed", "1", "--data_dir", str(data_dir),
                       "--out_dir", str(retrained)])
    load_model, loaded = evaluate_script.load_model, {}

    def load_and_replace(*args, **kwargs):
        shutil.copy(retrained / "adapter.pt", adapter)
        return load_model(*args, **kwargs)
    load_adapter = evaluate_script.adapters.load_adapter

    def remember(model, source):
        result = load_adapter(model, source)
        loaded.update(evaluate_script.adapters.adapter_state_dict(model))
        return result
    monkeypatch.setattr(evaluate_script, "load_model", load_and_replace)
    monkeypatch.setattr(evaluate_script.adapters, "load_adapter", remember)
    out = tmp_path / "eval"
    evaluate_script.main([str(a) for a in ["--adapter", adapter, "--data_dir", data_dir,
                                           "--datasets", "AddSub", "--limit", "1",
                                           "--max_new_tokens", "1", "--out_dir", out]])
    import hashlib
    assert adapter.read_bytes() != first  # it was replaced, and yet:
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["adapter_sha256"] == hashlib.sha256(first).hexdigest()
    (tmp_path / "first.pt").write_bytes(first)
    saved = adapters.read_adapter(str(tmp_path / "first.pt"))["tensors"]
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], loaded[name].cpu()) for name in saved)


def test_the_trainable_share_counts_a_quantized_base_by_its_weights(data_dir, tmp_path, capsys):
    # a quantized weight is a buffer of codes (nf4: two a byte); the count is the model's weights,
    # the unquantized model's, and the tiny preset's from its shapes (LLaMA: 9 matrices a block)
    printed = {}
    for kind in ("none", "int8", "nf4"):
        quantize = [] if kind == "none" else ["--quantize", kind]
        train_script.main([*SHORT, "--max_steps", "1", *quantize, "--data_dir", str(data_dir),
                           "--out_dir", str(tmp_path / kind)])
        line, = [x for x in capsys.readouterr().out.splitlines() if "trainable parameters" in x]
        printed[kind] = line
    dim, layers, ffn, vocab = 128, 4, 344, 259  # model.PRESETS["tiny"]
    weights = layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim) + 2 * vocab * dim + dim
    trainable, total = (int(n.replace(",", "")) for n in printed["none"].split()[2:5:2])
    assert total == weights + trainable, printed
    assert printed["int8"] == printed["nf4"] == printed["none"], printed


def test_the_base_weights_are_told_apart_by_their_files(tmp_path):
    folder = tmp_path / "llama" / "7B"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text("{}")
    (folder / "consolidated.00.pth").write_bytes(b"x" * 100)
    first = evaluate_script.base_fingerprint("llama-7b", folder)
    assert evaluate_script.base_fingerprint("llama-7b", folder) == first
    (folder / "consolidated.00.pth").write_bytes(b"y" * 101)
    assert evaluate_script.base_fingerprint("llama-7b", folder) != first
    second = evaluate_script.base_fingerprint("llama-7b", folder)
    (folder.parent / "tokenizer.model").write_bytes(b"z")  # Meta's layout: the tokenizer one level up
    assert evaluate_script.base_fingerprint("llama-7b", folder) != second


# ----------------------------------------------------------------------------- file permissions

def test_outputs_get_the_permissions_of_plainly_created_files(data_dir, tmp_path, monkeypatch, capsys):
    previous = os.umask(0o027)  # distinct from both mkstemp's 0600 and the usual 022
    try:
        out = tmp_path / "run"
        args = [*SHORT, "--data_dir", data_dir, "--out_dir", out]
        with monkeypatch.context() as patch:
            interrupt_at_step(patch, 4)
            stopped(train_script.main, args, capsys, code=130)
        train_script.main([str(a) for a in [*args, "--resume"]])  # a resume rewrites the log
        evaluate_script.main(["--adapter", str(out / "adapter.pt"), "--data_dir", str(data_dir), "--datasets",
                              "AddSub", "--limit", "2", "--max_new_tokens", "2"])
    finally:
        os.umask(previous)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"adapter.pt", "checkpoint.pt", "settings.json", "log.jsonl", "run.json",
                                       "predictions.jsonl", "results.md", "results.json"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o640, (path.name, oct(path.stat().st_mode))


def make_unreadable(path):
    """Take away this user's right to read `path`. Root reads anything, so as root the file goes to
    user nobody and the command runs without root's right to override file permissions."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o600)
    else:
        os.chmod(path, 0)


def run_without_override(script, *args):
    if os.geteuid() != 0:
        return run(script, *args)
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run a command as root without its file-permission override")
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable,
                           str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_unreadable_file_says_permission_denied(data_dir, adapter, tmp_path):
    private = shutil.copy(adapter, tmp_path / "private.pt")
    make_unreadable(private)
    result = run_without_override("eval.py", "--adapter", private, "--data_dir", data_dir, "--datasets", "AddSub")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: cannot read adapter {private}: permission denied"

    test_file = data_dir / "dataset" / "AddSub" / "test.json"
    make_unreadable(test_file)
    result = run_without_override("eval.py", "--adapter", adapter, "--data_dir", data_dir, "--datasets", "AddSub")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: cannot read {test_file}: permission denied"


# ----------------------------------------------------------------------------- full disks

@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a given size (needs the right to mount, as root in CI has)."""
    mounted = []

    def make(kilobytes):
        folder = tmp_path / f"disk-{kilobytes}k"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}): needs root")
        mounted.append(folder)
        return folder
    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(data_dir, small_disk, capsys):
    # a checkpoint of the tiny run is about 290 KB: the first fits, the second (beside the first) does not
    out = small_disk(420) / "run"
    args = [*SHORT, "--data_dir", data_dir, "--out_dir", out]
    message = stopped(train_script.main, args, capsys)
    assert message.startswith(f"error: cannot write {out / 'checkpoint.pt'}") and "No space left on device" in message
    assert checkpoint_step(out) == 2 and hidden_files(out) == []
    message = stopped(train_script.main, [*args, "--resume"], capsys)  # still full: the same, nothing left over
    assert "No space left on device" in message and checkpoint_step(out) == 2 and hidden_files(out) == []


def test_a_full_disk_while_writing_the_adapter_keeps_the_checkpoint(data_dir, small_disk, capsys):
    disk = small_disk(340)
    out = disk / "run"
    args = [*SHORT, "--max_steps", "2", "--data_dir", data_dir, "--out_dir", out]
    message = stopped(train_script.main, args, capsys)
    assert message == f"error: cannot write {out / 'adapter.pt'}: No space left on device"
    assert checkpoint_step(out) == 2 and hidden_files(out) == [] and not (out / "adapter.pt").exists()
    subprocess.run(["mount", "-o", "remount,size=600k", str(disk)], check=True)
    train_script.main([str(a) for a in [*args, "--resume"]])
    assert (out / "adapter.pt").exists()


def test_a_full_disk_during_evaluation_is_one_line(data_dir, adapter, small_disk, capsys):
    disk = small_disk(64)
    (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # one 4 KB page stays free: room for run.json only
    out = disk / "eval"
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--data_dir", data_dir, "--datasets", "AddSub",
                                             "--max_new_tokens", "64", "--out_dir", out], capsys)
    assert message == f"error: cannot write {out / 'predictions.jsonl'}: No space left on device"
    assert hidden_files(out) == []


# ----------------------------------------------------------------------------- bad input

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
BAD_TRAINING = [  # extra flags -> a piece of the one error line
    (["--lr", "-1"], "--lr -1.0: expected a value at least 0"),
    (["--lr", "nan"], "--lr nan: expected a finite number"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--micro_batch_size", "0"], "--micro_batch_size 0: expected a value at least 1"),
    (["--grad_accum", "0"], "--grad_accum 0: expected a value at least 1"),
    (["--shard_base"], "--shard_base shards the base over the processes of a torchrun launch"),
    (["--save_every", "0"], "--save_every 0: expected a value at least 1"),
    (["--cutoff_len", "0"], "--cutoff_len 0: expected a value at least 2"),
    (["--epochs", "0"], "--epochs 0: expected a value at least 1"),
    (["--max_steps", "-1"], "--max_steps -1: expected a value at least 0"),
    (["--dropout", "1"], "--dropout 1.0: expected a value below 1"),
    (["--warmup_steps", "-3"], "--warmup_steps -3: expected a value at least 0"),
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU", marks=NO_GPU),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "mps"], "--device mps: expected cpu or cuda"),
    (["--model", "gpt5"], "model 'gpt5' is neither a preset"),
    (["--method", "dora"], "unknown --method 'dora'"),
    (["--method", "prefix", "--r", "8"], "--r 8: LoRA's settings, which --method prefix does not have"),
    (["--method", "adapter", "--dropout", "0.1", "--gate_pool", "causal"],
     "--dropout 0.1, --gate_pool causal: LoRA's settings, which --method adapter does not have"),
    (["--task", "poetry"], "unknown --task 'poetry'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--gate_pool", "max"], "gate_pool 'max' is not one of mean, causal"),
]
BAD_EVALUATION = [
    (["--batch_size", "0"], "--batch_size 0: expected a value at least 1"),
    (["--limit", "-1"], "--limit -1: expected a value at least 0"),
    (["--max_new_tokens", "-5"], "--max_new_tokens -5: expected a value at least 0"),
    (["--datasets", "MMLU"], "unknown math dataset(s) MMLU"),
    (["--model", "gpt5"], "model 'gpt5' is neither a preset"),
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU", marks=NO_GPU),
]


@pytest.mark.parametrize("flags, fragment", BAD_TRAINING)
def test_bad_training_settings_are_one_line_and_leave_nothing(data_dir, tmp_path, capsys, flags, fragment):
    out = tmp_path / "out"
    message = stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out, *flags], capsys,
                      quiet=True)  # refused before the settings are printed
    assert fragment in message
    assert not out.exists()


@pytest.mark.parametrize("flags, fragment", BAD_EVALUATION)
def test_bad_evaluation_settings_are_one_line_and_leave_nothing(data_dir, adapter, tmp_path, capsys, flags, fragment):
    out = tmp_path / "out"
    message = stopped(evaluate_script.main, ["--adapter", adapter, "--data_dir", data_dir, "--out_dir", out, *flags],
                      capsys, quiet="--datasets" not in flags)  # test sets are read after the settings are shown
    assert fragment in message
    assert not out.exists()


def test_bad_input_files_are_one_line_and_leave_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (data_dir / "ft-training_set" / "math_data.json").write_text("[]")
    message = stopped(train_script.main, [*SHORT, "--data_dir", data_dir, "--out_dir", out], capsys)
    assert "holds no items" in message and "download" in message

    message = stopped(evaluate_script.main, ["--base", "--model", "tiny", "--task", "math"], capsys)
    assert "data" in message and "not found" in message
    message = stopped(evaluate_script.main, ["--data_dir", data_dir], capsys)
    assert "pass --adapter FILE, or --base with --model and --task" in message
    assert not out.exists()


def damage_config_json(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))


def damage_offsets(folder):
    """A .safetensors whose header gives a tensor fewer bytes than its shape needs."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size  # the same header, one number smaller: it fits in the space of the old one
    path.write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


def to_meta_layout(folder, damage):
    """Meta's layout: params.json and consolidated.00.pth (here damaged: cut short or random bytes)."""
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32,
                                                    "norm_eps": 1e-5, "vocab_size": 32000}))
    path = folder / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(32000, 64)}, path)
    path.write_bytes(path.read_bytes()[:5000] if damage == "truncated" else os.urandom(5000))


BAD_CHECKPOINTS = {  # how the folder is damaged -> a piece of the one error line
    "params.json is no JSON": (lambda f: (to_meta_layout(f, "truncated"), (f / "params.json").write_text("{dim: 64")),
                               "params.json is not valid JSON"),
    "config.json lacks hidden_size": (damage_config_json, "lacks the field 'hidden_size'"),
    "safetensors offsets do not fit the shape": (damage_offsets, "data_offsets"),
    "safetensors cut short": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-1000]), "truncated"),
    "pth cut short": (lambda f: to_meta_layout(f, "truncated"), "consolidated.00.pth"),
    "pth of random bytes": (lambda f: to_meta_layout(f, "random"), "consolidated.00.pth"),
}


@pytest.mark.parametrize("damage", list(BAD_CHECKPOINTS))
def test_a_damaged_checkpoint_folder_is_one_line_and_leaves_nothing(tmp_path, capsys, damage):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path / "llama-tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, tie_word_embeddings=False)).save_pretrained(folder)
    shutil.copy(shared_path("spm-tokenizer", "tokenizer.model"), folder)
    make, fragment = BAD_CHECKPOINTS[damage]
    make(folder)
    out = tmp_path / "out"
    message = stopped(train_script.main, ["--model", folder, "--task", "math", "--max_steps", "1", "--data_dir",
                                          shared_path("llm-adapters"), "--out_dir", out], capsys)
    assert fragment in message and "weights_only" not in message
    assert not out.exists()


def test_a_bare_command_leaves_no_folder_behind(tmp_path):
    result = run("train.py", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_interruptions_are_one_line_and_exit_130(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = [*SHORT, "--max_steps", "2", "--data_dir", data_dir, "--out_dir", out]
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # while loading the weights
        patch.setattr(train_script, "load_model", ctrl_c)
        assert stopped(train_script.main, args, capsys, code=130) == "error: interrupted"
    assert not out.exists()

    with monkeypatch.context() as patch:  # while writing adapter.pt
        fsync = os.fsync

        def interrupted(fd):
            if any(name.startswith(".adapter.pt") for name in os.listdir(out)):
                raise KeyboardInterrupt
            return fsync(fd)
        patch.setattr(runs.os, "fsync", interrupted)
        message = stopped(train_script.main, args, capsys, code=130)
    assert "while writing adapter.pt" in message and "--resume" in message
    assert hidden_files(out) == [] and not (out / "adapter.pt").exists()
    train_script.main([str(a) for a in [*args, "--resume"]])
    assert (out / "adapter.pt").exists()


# ----------------------------------------------------------------------------- docs and help

@pytest.mark.parametrize("script", [train_script, evaluate_script])
def test_the_docstring_examples_parse(script):
    for line in script.__doc__.splitlines():
        if line.strip().startswith("python "):
            argv = line.split("#")[0].split()[2:]
            script.parse_settings(argv)  # raises on a flag that does not exist or a bad value


@pytest.mark.parametrize("script", ["train.py", "eval.py", "data.py"])
def test_help_reads_well(script):
    args = ["download", "--help"] if script == "data.py" else ["--help"]
    result = succeeded(run(script, *args))
    assert "(default: )" not in result.stdout
    if script == "data.py":
        assert "which task's training and test files" in result.stdout


def test_the_readme_says_it_in_its_own_words():
    readme = (ROOT / "README.md").read_text()
    assert "SPEC" not in readme  # the spec is not part of the repository
    assert "index-url https://download.pytorch.org/whl/cpu" in readme
