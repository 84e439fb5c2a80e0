"""Shared test setup: offline Hugging Face, the project root on sys.path, ../shared data, a tiny task."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import MATH_DATASETS  # noqa: E402  (after the path is set)

# Real data and tokenizer files live beside the project, not in it (a user's clone lacks them).
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run torch on one thread: tiny shapes gain nothing from a second, and on a busy machine
    a descheduled OpenMP thread stalls every parallel region (10x slower steps were seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts):
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need the shared data folder beside the project")
    return path


# ----------------------------------------------------------------------------- the real commands

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "flute"]


def write_tiny_task(folder):
    """A math task whose test sets ask the training questions again (with other outputs, so the
    whole-record filter of the math split keeps them)."""
    train = [{"instruction": f"What number goes with {word}?", "input": "", "output": f"The answer is {i + 2}.",
              "answer": f"{i + 2}.0"} for i, word in enumerate(WORDS)]
    (folder / "ft-training_set").mkdir(parents=True)
    (folder / "ft-training_set" / "math_data.json").write_text(json.dumps(train))
    for name in MATH_DATASETS:
        (folder / "dataset" / name).mkdir(parents=True)
        test = [dict(item, output=str(i + 2)) for i, item in enumerate(train)]
        (folder / "dataset" / name / "test.json").write_text(json.dumps(test))
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return write_tiny_task(tmp_path / "data")


def run(script, *args, cwd=ROOT, threads=1):
    """The real command line, as a user types it, on `threads` threads (None: torch's default).

    Tiny models gain little from a second thread, and on a busy machine a descheduled OpenMP
    thread stalls every parallel region (10x slower steps were seen), so tests take one."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]




# The longest tests (tens of seconds each: whole runs, torchrun, compiled graphs) start first, so
# that under pytest -n 2 the other worker takes the many short ones and no long test is left to
# run alone at the end.
LONG_TESTS = ("test_training_and_evaluation_end_to_end", "test_training_step_is_one_graph",
              "test_two_processes", "test_training_killed_at_any_moment",
              "test_bad_input_is_one_clear_line", "test_a_bad_setup_is_one_line",
              "test_decode_step_", "test_a_killed_process", "test_every_row_runs",
              "test_training_stopped_by_sigterm", "test_evaluation_killed_at_any_moment",
              "test_sigterm_to_torchrun", "test_a_sharded_base")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(name in item.name for name in LONG_TESTS))
