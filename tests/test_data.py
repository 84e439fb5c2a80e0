"""Tasks, prompt, batching, scoring and download, checked against the real LLM-Adapters files,
their README's facts, the paper's test sizes, and hand-written expectations."""
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, run, shared_path, write_tiny_task
from machinery import download as fetching
from machinery.download import download
from data import (COMMONSENSE_DATASETS, MATH_DATASETS, ByteTokenizer, DataError, collate, extract_answer,
                  generate_prompt, is_correct, load_task, main, read_items, tokenize_item,
                  truncation_note)

# SPEC §3: the only sizes consistent with every accuracy in the paper's Table 1
MATH_TEST_SIZES = {"AQuA": 51, "AddSub": 79, "MultiArith": 110, "SVAMP": 200, "SingleEq": 102, "gsm8k": 264}
COMMONSENSE_TEST_SIZES = {"ARC-Challenge": 1172, "ARC-Easy": 2376, "boolq": 3270, "winogrande": 1267,
                          "piqa": 1838, "social_i_qa": 1954, "openbookqa": 500}
# the bundle's README: the early 80/20 split's MultiArith test items that duplicate training items
MULTIARITH_DUPLICATES = [7, 20, 22, 57, 66, 74, 77, 97, 101, 118]
FAKE_ITEMS = [
    {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Pick one.", "input": "ctx", "output": "the correct answer is option1", "answer": "option1"},
]


def one_line_error(call, *args, **kwargs):
    """The message of the DataError that call raises, checked to be one line."""
    with pytest.raises(DataError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and message
    return message


# -----------------------------------------------------------------------------
# Tasks on the real files

@pytest.fixture(scope="module")
def adapters_dir():
    return shared_path("llm-adapters")


@pytest.fixture(scope="module")
def math_task(adapters_dir):
    return load_task("math", adapters_dir)


def test_math_task_sizes(math_task):
    assert len(math_task.train) == 3260
    assert list(math_task.test) == MATH_DATASETS  # the paper's table order
    assert {name: len(items) for name, items in math_task.test.items()} == MATH_TEST_SIZES
    assert math_task.max_new_tokens == 256


def test_math_test_sets_are_the_early_split_minus_duplicates(math_task, adapters_dir):
    # The repository's first commit had an 80/20 split; our test sets, derived from the full
    # test files and math_data.json, must be its test files minus the README's duplicates.
    for name in MATH_DATASETS:
        early = json.loads((adapters_dir / "commit_bffe56c" / "dataset" / name / "test.json").read_text())
        dropped = MULTIARITH_DUPLICATES if name == "MultiArith" else []
        assert math_task.test[name] == [item for i, item in enumerate(early) if i not in dropped], name
        for i in dropped:
            assert early[i] in math_task.train


def test_commonsense_task_sizes(tmp_path, adapters_dir):
    # the real commonsense_15k.json is not in the bundle: a tiny stand-in for the training file
    (tmp_path / "dataset").symlink_to(adapters_dir / "dataset", target_is_directory=True)
    (tmp_path / "ft-training_set").mkdir()
    (tmp_path / "ft-training_set" / "commonsense_15k.json").write_text(json.dumps(FAKE_ITEMS))
    task = load_task("commonsense", tmp_path)
    assert {name: len(items) for name, items in task.test.items()} == COMMONSENSE_TEST_SIZES
    assert list(task.test) == COMMONSENSE_DATASETS and task.train == FAKE_ITEMS and task.max_new_tokens == 32
    # evaluation does not need the training file
    (tmp_path / "ft-training_set" / "commonsense_15k.json").unlink()
    task = load_task("commonsense", tmp_path, datasets=["piqa", "boolq"], with_train=False)
    assert task.train is None
    assert {name: len(items) for name, items in task.test.items()} == {"boolq": 3270, "piqa": 1838}
    assert list(task.test) == ["boolq", "piqa"]  # the paper's order, whatever the order asked
    message = one_line_error(load_task, "commonsense", tmp_path)
    assert f'python data.py download --data_dir {tmp_path}' in message and "commonsense_15k.json" in message


def test_task_name_errors(adapters_dir):
    message = one_line_error(load_task, "algebra", adapters_dir)
    assert "algebra" in message and "math, commonsense" in message
    message = one_line_error(load_task, "math", adapters_dir, datasets=["gsm8k", "GSM-Hard"])
    assert "GSM-Hard" in message and all(name in message for name in MATH_DATASETS)
    assert list(load_task("math", adapters_dir, datasets=["gsm8k"]).test) == ["gsm8k"]


# -----------------------------------------------------------------------------
# Bad input files

def test_read_items_errors(tmp_path):
    message = one_line_error(read_items, tmp_path / "dataset" / "gsm8k" / "test.json")
    assert "test.json not found" in message and f'"python data.py download --data_dir {tmp_path}"' in message
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "x",,}\n]')
    message = one_line_error(read_items, broken)
    assert str(broken) in message and "line 2 column" in message
    no_answer = tmp_path / "no_answer.json"
    no_answer.write_text(json.dumps([FAKE_ITEMS[0], {k: v for k, v in FAKE_ITEMS[1].items() if k != "answer"}]))
    message = one_line_error(read_items, no_answer)
    assert str(no_answer) in message and "item 1" in message and "answer is missing" in message
    not_list = tmp_path / "not_list.json"
    not_list.write_text(json.dumps({"instruction": "x"}))
    assert "expected a JSON list" in one_line_error(read_items, not_list)
    number = tmp_path / "number.json"
    number.write_text(json.dumps([{**FAKE_ITEMS[0], "answer": 4}]))
    message = one_line_error(read_items, number)
    assert "item 0" in message and "answer is 4 (int)" in message
    # input may be left out: it means no input
    no_input = tmp_path / "no_input.json"
    no_input.write_text(json.dumps([{k: v for k, v in FAKE_ITEMS[0].items() if k != "input"}]))
    assert read_items(no_input) == [FAKE_ITEMS[0]]


# -----------------------------------------------------------------------------
# Prompt, tokenization, batching

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.")


def test_prompt_exact_strings():
    assert generate_prompt("Add 2 and 3.") == HEADER + "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert generate_prompt("Add.", "2 and 3", "\nThe answer is 5.") == (
        HEADER + "\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n\nThe answer is 5.")
    # evaluation generates from the training text's prefix, whatever the item
    for item in FAKE_ITEMS:
        train_text = generate_prompt(item["instruction"], item["input"], item["output"])
        assert train_text == generate_prompt(item["instruction"], item["input"]) + item["output"]


def byte_ids(text):
    return [3 + b for b in text.encode("utf-8")]  # ByteTokenizer's ids, independently


def test_tokenize_item_eos_and_truncation():
    tokenizer = ByteTokenizer()
    item = FAKE_ITEMS[1]
    full = [1] + byte_ids(generate_prompt(item["instruction"], item["input"], item["output"]))
    input_ids, labels = tokenize_item(tokenizer, item, cutoff_len=1000)
    assert input_ids == full + [2] and labels == input_ids
    input_ids, labels = tokenize_item(tokenizer, item, cutoff_len=50)
    assert input_ids == full[:50] and labels == input_ids  # truncated: no EOS
    assert tokenize_item(tokenizer, item, cutoff_len=len(full) + 1)[0] == full + [2]  # EOS just fits
    assert tokenize_item(tokenizer, item, cutoff_len=len(full))[0] == full


def test_tokenize_item_masks_the_prompt():
    tokenizer = ByteTokenizer()
    item = FAKE_ITEMS[1]
    prompt_len = 1 + len(generate_prompt(item["instruction"], item["input"]).encode("utf-8"))
    input_ids, labels = tokenize_item(tokenizer, item, cutoff_len=1000, train_on_inputs=False)
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == input_ids[prompt_len:] == byte_ids(item["output"]) + [2]
    # a cutoff inside the prompt masks everything
    input_ids, labels = tokenize_item(tokenizer, item, cutoff_len=20, train_on_inputs=False)
    assert len(input_ids) == 20 and labels == [-100] * 20


def test_the_readme_prompt_and_cutoff_figures_for_the_byte_tokenizer(adapters_dir):
    """The Quickstart's figures, counted from the UTF-8 bytes (one byte a token, plus BOS)."""
    assert 1 + len(generate_prompt("", "").encode("utf-8")) == 193  # the prompt's fixed part
    lengths = sorted(1 + len(generate_prompt(i["instruction"], i["input"], i["output"]).encode())
                     for i in load_task("math", adapters_dir, datasets=[]).train)
    assert (len(lengths), lengths[0], lengths[len(lengths) // 2], lengths[-1]) == (3260, 327, 566, 1539)
    assert sum(n >= 1024 for n in lengths) == 48  # cut at 1024: items of 1024 tokens or more


@pytest.mark.parametrize("cutoff_len", [100, 250, 260, 1000])
def test_truncation_note_counts_the_items_cut(tmp_path, cutoff_len, capsys):
    import train as train_script  # the note as a training run prints it
    data_dir = write_tiny_task(tmp_path / "data")
    training_file = data_dir / "ft-training_set" / "math_data.json"
    items = json.loads(training_file.read_text())
    items = [dict(item, output=item["output"] + " Why:" + " so" * i) for i, item in enumerate(items)]
    training_file.write_text(json.dumps(items))
    lengths = [1 + len(generate_prompt(i["instruction"], i["input"], i["output"]).encode())
               for i in items]
    assert 260 in lengths  # an item of exactly cutoff_len tokens loses only its EOS: cut too
    cut = sum(n >= cutoff_len for n in lengths)
    tokenizer = ByteTokenizer()
    note = truncation_note([tokenize_item(tokenizer, i, cutoff_len) for i in items], cutoff_len,
                           tokenizer.eos_id)
    if cut == 0:
        assert note is None
    else:
        assert note.startswith(f"note: {cut:,} of {len(items):,} training items")
        assert f"--cutoff_len {cutoff_len} tokens" in note and "\n" not in note
    train_script.main(["--model", "tiny", "--task", "math", "--max_steps", "1", "--device", "cpu",
                       "--micro_batch_size", "1", "--grad_accum", "1", "--cutoff_len",
                       str(cutoff_len), "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "o")])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert printed == ([note] if note else [])


def test_collate_pads_right():
    examples = [([5, 6, 7], [-100, 6, 7]), ([8, 9, 10, 11, 12], [8, 9, 10, 11, 12]), ([13], [13])]
    input_ids, labels, mask = collate(examples, pad_id=0)
    assert input_ids.dtype == labels.dtype == torch.long and mask.dtype == torch.bool
    assert input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7, -100, -100], [8, 9, 10, 11, 12], [13, -100, -100, -100, -100]]
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]


# -----------------------------------------------------------------------------
# Scoring (LLM-Adapters' rules)

SCORING_CASES = [
    ("gsm8k", "The answer is 1,000.", "1000.0", True),  # commas removed
    ("gsm8k", "In total 1,234,567 apples", "1234567", True),
    ("SVAMP", "It is -5 degrees.", "-5.0", True),  # negatives
    ("SVAMP", "It is 5 degrees.", "-5.0", False),
    ("AddSub", "total 3.0005", "3", True),  # within 0.001
    ("AddSub", "total 3.002", "3", False),  # outside
    ("AddSub", "The answer is 40.17.", "40.17", True),
    ("MultiArith", "first 12 then 7", "7", True),  # the last number wins
    ("MultiArith", "first 12 then 7", "12", False),
    ("SingleEq", "I do not know.", "4", False),  # no number
    ("SingleEq", "", "0", False),
    ("gsm8k", "8-3", "3", False),  # "-3" is the last match: LLM-Adapters' regex, kept
    ("gsm8k", "8 - 3", "3", True),
    ("AQuA", "The answer is (C).", "C", True),  # the first capital A-E
    ("AQuA", "A: the answer is (C).", "C", False),  # the trap the rule really has
    ("AQuA", "A: the answer is (C).", "A", True),
    ("AQuA", "Because of x, (D)", "D", False),  # B in "Because"
    ("AQuA", "none of them", "A", False),
    ("boolq", "the correct answer is true", "true", True),
    ("boolq", "True", "true", False),  # case-sensitive
    ("boolq", "false, not true", "false", True),  # the first keyword
    ("boolq", "maybe", "false", False),
    ("piqa", "the correct answer is solution2", "solution2", True),
    ("piqa", "Solution1", "solution1", False),
    ("winogrande", "option1 or option2", "option1", True),
    ("winogrande", "the blank is Sarah", "option1", False),
    ("ARC-Challenge", "answer3", "answer3", True),
    ("ARC-Easy", "the correct answer is answer5", "answer5", True),
    ("openbookqa", "answer4 then answer1", "answer1", False),
    ("social_i_qa", "the correct answer is answer1", "answer1", True),
    ("social_i_qa", "no idea", "answer1", False),
]


@pytest.mark.parametrize("dataset, response, answer, expected", SCORING_CASES)
def test_is_correct_cases(dataset, response, answer, expected):
    assert is_correct(dataset, response, answer) is expected


def test_extract_answer_values():
    assert extract_answer("gsm8k", "so 1,234.5 apples, then 7.") == 7.0
    assert extract_answer("gsm8k", "so 1,234.5 apples") == 1234.5
    assert extract_answer("SVAMP", "none") is None
    assert extract_answer("AQuA", "  (E) is it") == "E"
    assert extract_answer("boolq", "True") is None
    assert extract_answer("piqa", "solution2 solution1") == "solution2"
    message = one_line_error(extract_answer, "hellaswag", "ending1")
    assert "hellaswag" in message and "gsm8k" in message and "piqa" in message
    assert "hellaswag" in one_line_error(is_correct, "hellaswag", "ending1", "ending1")


def test_math_outputs_score_as_their_own_answer_says(adapters_dir):
    # An independent reading of the records' own rationales, which end "The answer is N."
    # or "The answer is N units.": where no digit follows N, the verdict must match ours.
    final = re.compile(r".*The answer is \$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)[^0-9]*", re.S)
    for name in MATH_DATASETS[:1] + MATH_DATASETS[2:]:  # AQuA answers are letters
        items = read_items(adapters_dir / "dataset" / name / "test.json")
        judged = 0
        for item in items:
            match = final.fullmatch(item["output"])
            if match:
                expected = abs(float(match.group(1).replace(",", "")) - float(item["answer"])) <= 0.001
                assert is_correct(name, item["output"], item["answer"]) == expected, item
                judged += 1
        assert judged > 0.9 * len(items), name
        # ChatGPT wrote these rationales and is wrong now and then, but right more often than not
        assert sum(is_correct(name, item["output"], item["answer"]) for item in items) > 0.5 * len(items)


# -----------------------------------------------------------------------------
# Download from a local HTTP server laid out like the repository

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        QuietHandler.requests.append(self.path)
        super().do_GET()


@contextmanager
def serve(folder):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory, adapters_dir):
    """A copy of the repository's data files, with a stand-in commonsense_15k.json."""
    root = tmp_path_factory.mktemp("repository")
    for name in MATH_DATASETS + COMMONSENSE_DATASETS:
        (root / "dataset" / name).mkdir(parents=True)
        shutil.copy(adapters_dir / "dataset" / name / "test.json", root / "dataset" / name / "test.json")
    (root / "ft-training_set").mkdir()
    shutil.copy(adapters_dir / "ft-training_set" / "math_data.json", root / "ft-training_set" / "math_data.json")
    (root / "ft-training_set" / "commonsense_15k.json").write_text(json.dumps(FAKE_ITEMS))
    return root


def expected_sums(adapters_dir):
    """path -> sha256 from the bundle's SHA256SUMS (independent of the sums in data.py)."""
    lines = (adapters_dir / "SHA256SUMS").read_text().splitlines()
    return {path.removeprefix("./"): digest for digest, path in (line.split() for line in lines)}


def test_download_all_then_skip(tmp_path, repository, adapters_dir, capsys):
    data_dir = tmp_path / "data"
    (data_dir / "dataset" / "AQuA").mkdir(parents=True)
    (data_dir / "dataset" / "AQuA" / "test.json").write_text("[]")  # a stale file gets replaced
    with serve(repository) as url:
        main(["download", "--data_dir", str(data_dir), "--base_url", url])
        lines = capsys.readouterr().out.splitlines()
        sums = expected_sums(adapters_dir)
        relative = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
        assert len(relative) == len(lines) == 6 + 7 + 2  # nothing else, no temp files
        for path in relative:
            digest = hashlib.sha256((data_dir / path).read_bytes()).hexdigest()
            assert digest == sums[path] if path in sums else path == "ft-training_set/commonsense_15k.json"
        assert load_task("commonsense", data_dir).train == FAKE_ITEMS
        QuietHandler.requests.clear()
        main(["download", "--data_dir", str(data_dir), "--base_url", url, "--task", "math"])
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 7 and all("skipped" in line for line in lines) and QuietHandler.requests == []


def test_download_rejects_corrupted_file(tmp_path, repository):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(repository, corrupted)
    gsm8k = corrupted / "dataset" / "gsm8k" / "test.json"
    gsm8k.write_bytes(gsm8k.read_bytes().replace(b"576", b"577", 1))
    data_dir = tmp_path / "data"
    with serve(corrupted) as url:
        message = one_line_error(download, data_dir, "math", url)
    assert url + "dataset/gsm8k/test.json" in message and "expected" in message
    assert not (data_dir / "dataset" / "gsm8k").exists()  # neither the file, a temp file nor an empty folder
    assert (data_dir / "dataset" / "SingleEq" / "test.json").exists()  # the files before it landed


def test_download_errors_through_main(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as url:
        with pytest.raises(SystemExit) as exited:
            main(["download", "--data_dir", str(tmp_path / "data"), "--base_url", url, "--task", "commonsense"])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "404" in stderr and url + "ft-training_set/commonsense_15k.json" in stderr
    # a port nobody listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SystemExit) as exited:
        main(["download", "--data_dir", str(tmp_path / "data"), "--base_url", f"http://127.0.0.1:{port}/",
              "--timeout", "5"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and stderr.count("\n") == 1 and "could not download" in stderr and str(port) in stderr
    assert not (tmp_path / "data").exists()  # offline: no files and no empty folders left behind


# -----------------------------------------------------------------------------
# Download from a local copy of the repository: a folder or a file:// URL

def local_source(folder, form):
    return str(folder) if form == "folder" else folder.resolve().as_uri()


@pytest.mark.parametrize("form", ["folder", "file_url"])
def test_download_from_a_local_copy_of_the_repository(tmp_path, repository, adapters_dir, form,
                                                      capsys):
    data_dir = tmp_path / "data"
    main(["download", "--data_dir", str(data_dir), "--base_url", local_source(repository, form)])
    lines = capsys.readouterr().out.splitlines()
    sums = expected_sums(adapters_dir)
    relative = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    assert len(relative) == len(lines) == 6 + 7 + 2 and all("copied from" in x for x in lines)
    for path in relative:  # byte for byte the bundle's files (sums from its own SHA256SUMS)
        digest = hashlib.sha256((data_dir / path).read_bytes()).hexdigest()
        assert digest == sums[path] if path in sums else path == "ft-training_set/commonsense_15k.json"
    assert load_task("math", data_dir).train == load_task("math", adapters_dir).train
    main(["download", "--data_dir", str(data_dir), "--base_url", local_source(repository, form)])
    assert all("skipped" in line for line in capsys.readouterr().out.splitlines())


def test_the_readme_command_with_the_shared_bundle(tmp_path):
    """The shared bundle has the math files only: --task math copies them, the default (all)
    names the one missing file and copies nothing; as a user runs it, from the project root."""
    bundle = shared_path("llm-adapters")
    base_url = "../shared/data/llm-adapters"  # the README's relative form: the shared folder's
    assert (Path(fetching.__file__).parent.parent / base_url).resolve() == bundle.resolve()
    refused = run("data.py", "download", "--data_dir", tmp_path / "all", "--base_url", base_url)
    assert refused.returncode == 2 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "commonsense_15k.json" in refused.stderr and "--task math" in refused.stderr
    assert not (tmp_path / "all").exists()
    copied = run("data.py", "download", "--data_dir", tmp_path / "math", "--base_url", base_url,
                 "--task", "math")
    assert copied.returncode == 0, copied.stderr
    assert load_task("math", tmp_path / "math").train == load_task("math", bundle).train


def fake_repository(folder):
    """A tiny folder in the repository's layout (the tiny task's files); its sums stand in for
    the real ones, so this always runs, with or without ../shared."""
    write_tiny_task(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*.json")}


@pytest.mark.parametrize("form", ["folder", "file_url"])
def test_download_from_a_tiny_local_folder(tmp_path, monkeypatch, capsys, form):
    sums = fake_repository(tmp_path / "repository")
    monkeypatch.setattr(fetching, "SHA256", sums | {"ft-training_set/commonsense_15k.json": None})
    data_dir = tmp_path / "data"
    main(["download", "--data_dir", str(data_dir), "--task", "math",
          "--base_url", local_source(tmp_path / "repository", form)])
    assert len(capsys.readouterr().out.splitlines()) == 7
    for relative, digest in sums.items():
        assert hashlib.sha256((data_dir / relative).read_bytes()).hexdigest() == digest
    assert len([p for p in data_dir.rglob("*") if p.is_file()]) == 7  # no temp files
    # a source file that is not the expected one: one line naming it; no file, no empty folder
    gsm8k = tmp_path / "repository" / "dataset" / "gsm8k" / "test.json"
    gsm8k.write_text(gsm8k.read_text().replace("2", "3"))
    message = one_line_error(download, tmp_path / "other", "math",
                             local_source(tmp_path / "repository", form))
    assert "repository/dataset/gsm8k/test.json: not the expected file (sha256" in message
    assert not (tmp_path / "other" / "dataset" / "gsm8k").exists()


@pytest.mark.parametrize("base_url, expected", [
    ("{tmp}/missing", "no such folder"),
    ("{tmp}/repository", "has no ft-training_set/commonsense_15k.json and 7 more"),
    ("{tmp}/repository/dataset", "has no ft-training_set/math_data.json and 6 more"),
    ("file://elsewhere{tmp}/repository", "a file:// URL names a folder on this machine"),
    ("s3://bucket/LLM-Adapters", "found the scheme s3://"),
])
def test_download_from_a_local_folder_refuses_what_it_cannot_copy(tmp_path, capsys, base_url,
                                                                  expected):
    fake_repository(tmp_path / "repository")  # the math files only
    task = "all" if "commonsense" in expected else "math"
    with pytest.raises(SystemExit) as exited:
        main(["download", "--data_dir", str(tmp_path / "data"), "--task", task,
              "--base_url", base_url.format(tmp=tmp_path)])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert expected in stderr
    assert not (tmp_path / "data").exists()  # checked before anything is copied
