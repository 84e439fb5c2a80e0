"""Evaluate an adapter (or the base model) on the paper's test sets and print the accuracy table.

    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt
    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt --datasets SVAMP,gsm8k --limit 50
    python eval.py --base --model llama-7b --task math

The model, task and adapter settings come from the adapter file. Greedy decoding, batched with
the KV cache; each prediction is appended to predictions.jsonl as its batch finishes, so an
interrupted evaluation continues where it stopped when the same command runs again. A
prediction is reused only for the same test item (a hash of its prompt and answer) and the
same evaluation (run.json: adapter, base weights, generation settings). At the end results.md
(a table shaped like the paper's Table 1/2) and results.json are written next to the predictions.
"""
import os

# reproducible matmuls on the CPU, as in train.py (the reason is there)
os.environ.setdefault("MKL_CBWR", "AUTO")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import interlora  # noqa: E402
import runs  # noqa: E402
from data import DataError, extract_answer, generate_prompt, is_correct, load_task, tokenizer_for  # noqa: E402
from interlora import AdapterError  # noqa: E402
from model import CheckpointError, ModelConfig, load_model  # noqa: E402
from runs import RunError  # noqa: E402


@dataclass
class EvalSettings:
    adapter: str = field(default="", metadata={"help": "adapter file written by train.py"})
    base: bool = field(default=False, metadata={"help": "evaluate the base model alone, without adapters"})
    model: str = field(default="", metadata={"help": "model preset (default: the adapter's)"})
    task: str = field(default="", metadata={"help": "math or commonsense (default: the adapter's)"})
    checkpoint_dir: str = field(default="", metadata={"help": "folder of the base weights (default: the adapter's)"})
    data_dir: str = field(default="data", metadata={"help": "LLM-Adapters data (python data.py download)"})
    datasets: str = field(default="", metadata={"help": "comma-separated test sets, e.g. SVAMP,gsm8k (default: all of the task)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N items of each test set (default 0: all)",
                                            "min": 0})
    batch_size: int = field(default=32, metadata={"help": "prompts generated together", "min": 1})
    max_new_tokens: int = field(default=0, metadata={"help": "tokens to generate (default 0: 256 math, 32 commonsense)",
                                                     "min": 0})
    out_dir: str = field(default="", metadata={"help": "output folder (default: eval-<task> beside the adapter)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (CUDA graphs on a GPU)"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


def parse_settings(argv=None):
    s = runs.settings_from_command_line(EvalSettings, __doc__.split("\n\n")[0], argv)
    if not s.adapter and not (s.base and s.model and s.task):
        raise RunError("pass --adapter FILE, or --base with --model and --task")
    s.device = runs.choose_device(s.device)
    return s


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def base_fingerprint(model_name, checkpoint_dir):
    """What identifies the base weights without reading them: each file's name, size and modification time."""
    if model_name.startswith("tiny"):
        return f"{model_name}: random weights, seed 0"
    folder = Path(checkpoint_dir)
    files = [f for f in sorted(folder.iterdir()) if f.is_file()] + [folder.parent / "tokenizer.model"]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def item_key(dataset, prompt, answer):
    """A short hash of what decides a prediction and its score: a record is reused only for its own item."""
    return hashlib.sha256(json.dumps([dataset, prompt, answer]).encode()).hexdigest()[:16]


def is_record(record):
    return (isinstance(record, dict) and isinstance(record.get("dataset"), str) and isinstance(record.get("index"), int)
            and isinstance(record.get("item"), str) and isinstance(record.get("response"), str)
            and isinstance(record.get("correct"), bool))


def results_table(model_name, method, params, accuracy):
    """A Markdown table shaped like the paper's Table 1/2: one row, datasets in the paper's order."""
    names = list(accuracy)
    average = sum(accuracy.values()) / len(accuracy)
    header = "| LLM | Method | Params | " + " | ".join(names) + " | Avg. |"
    rule = "|" + "---|" * (len(names) + 4)
    params_text = f"{params / 1e6:.2f}M" if params else "-"
    row = (f"| {model_name} | {method} | {params_text} | " + " | ".join(f"{accuracy[n]:.2f}" for n in names)
           + f" | {average:.2f} |")
    return "\n".join([header, rule, row]) + "\n", average


def check_same_run(path, run):
    """Predictions in a folder are reused only by the evaluation that made them."""
    if not os.path.exists(path):
        return
    saved = runs.read_json(path, "delete the folder, or choose another --out_dir")
    changed = sorted(k for k in run.keys() | saved.keys() if run.get(k) != saved.get(k))
    if changed:
        raise RunError(f"{os.path.dirname(path)} holds predictions of another evaluation (its {', '.join(changed)} "
                       "differ): delete the folder, or choose another --out_dir")


def evaluate(s):
    info = interlora.read_adapter(s.adapter)["info"] if s.adapter else {}
    model_name, task_name = s.model or info.get("model"), s.task or info.get("task")
    ModelConfig.from_name(model_name)
    checkpoint_dir = s.checkpoint_dir or info.get("checkpoint_dir") or os.path.join("checkpoints", model_name)
    method = "base" if s.base else info.get("method", "adapter")
    default_out = os.path.join(os.path.dirname(os.path.abspath(s.adapter)) if s.adapter else "out",
                               f"eval-{task_name}" + ("-base" if s.base else ""))
    out_path = s.out_dir or default_out
    print(json.dumps(asdict(s) | {"model": model_name, "task": task_name, "checkpoint_dir": checkpoint_dir,
                                  "out_dir": out_path}, indent=2))

    # everything that can be checked without the weights first, and no output folder until they loaded
    datasets = [d.strip() for d in s.datasets.split(",") if d.strip()] or None
    task = load_task(task_name, s.data_dir, datasets=datasets, with_train=False)
    tokenizer = tokenizer_for(model_name, checkpoint_dir)
    max_new_tokens = s.max_new_tokens or task.max_new_tokens
    selected = {name: items[: s.limit or None] for name, items in task.test.items()}
    prompts = {(name, i): generate_prompt(item["instruction"], item["input"])
               for name, items in selected.items() for i, item in enumerate(items)}
    keys = {(name, i): item_key(name, prompt, selected[name][i]["answer"]) for (name, i), prompt in prompts.items()}
    runs.check_output_dir(out_path)
    run = {"model": model_name, "task": task_name, "base": s.base, "max_new_tokens": max_new_tokens,
           "adapter_sha256": None if s.base else file_sha256(s.adapter),
           "base_weights": base_fingerprint(model_name, checkpoint_dir)}
    check_same_run(os.path.join(out_path, "run.json"), run)

    cuda = s.device.startswith("cuda")
    model = load_model(model_name, checkpoint_dir, device=s.device, dtype=torch.bfloat16 if cuda else torch.float32)
    params = 0
    if not s.base:
        cfg, _ = interlora.load_adapter(model, s.adapter)
        params = sum(p.numel() for name, p in model.named_parameters() if interlora.is_adapter_parameter(name))
        print(f"adapter: {json.dumps(asdict(cfg))}")
    model.eval()

    out = runs.OutputDir(out_path)  # from here on this process owns the folder
    try:
        check_same_run(out / "run.json", run)  # again, under the lock
        runs.write_json(out / "run.json", run)
        done = reusable_predictions(runs.JsonLines(out / "predictions.jsonl"), keys)
        todo = [key for key in prompts if key not in done]
        print(f"{len(prompts)} items, {len(todo)} to generate, {len(done)} already in {out / 'predictions.jsonl'}")
        generate_predictions(model, tokenizer, s, todo, prompts, selected, keys, max_new_tokens, out, done)

        accuracy = {name: 100 * sum(done[(name, i)]["correct"] for i in range(len(items))) / max(1, len(items))
                    for name, items in selected.items()}
        table, average = results_table(model_name, method, params, accuracy)
        print(table)
        runs.write_text(out / "results.md", table)
        runs.write_json(out / "results.json",
                        {"model": model_name, "task": task_name, "method": method, "adapter": s.adapter,
                         "data_dir": s.data_dir, "trainable_parameters": params,
                         "items": {n: len(v) for n, v in selected.items()}, "accuracy": accuracy, "average": average,
                         "max_new_tokens": max_new_tokens})
    finally:
        out.close()
    print(f"wrote {out / 'results.md'} and results.json")
    return accuracy


def reusable_predictions(predictions, keys):
    """The finished predictions by (dataset, index) that belong to the current test items.

    A line that is no record (cut short by a crash, or garbage) and a record made for another
    item (the test files changed) are dropped, said, and their items generated again.
    """
    records, bad = predictions.read(is_record)
    done = {}
    for record in records:
        key = (record["dataset"], record["index"])
        if keys.get(key) == record["item"]:
            done[key] = record
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"{predictions.path}: dropped {len(bad)} unreadable line(s) ({shown}); their items are generated again")
    if len(done) < len(records):
        print(f"{predictions.path}: {len(records) - len(done)} prediction(s) were made for items that are not in "
              "this evaluation (other test files or --datasets); they are set aside")
    if bad:
        predictions.rewrite(records)  # keep what is good, so appends start on a clean line
    return done


def generate_predictions(model, tokenizer, s, todo, prompts, selected, keys, max_new_tokens, out, done):
    """Generate, score and append a record per item of `todo`, a batch at a time (durably)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.startswith("cuda") else contextlib.nullcontext()
    encoded = [tokenizer.encode(prompts[key]) for key in todo]
    sink = runs.JsonLines(out / "predictions.jsonl")
    try:
        with tqdm(total=len(todo), desc="eval", dynamic_ncols=True) as bar, autocast:
            for positions, outputs in model.generate_batches(encoded, s.batch_size, max_new_tokens,
                                                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                                             compile=s.compile):
                records = []
                for position, new_tokens in zip(positions, outputs):
                    name, index = key = todo[position]
                    if new_tokens and new_tokens[-1] == tokenizer.eos_id:
                        new_tokens = new_tokens[:-1]
                    response = tokenizer.decode(new_tokens)
                    answer = selected[name][index]["answer"]
                    records.append({"dataset": name, "index": index, "item": keys[key], "answer": answer,
                                    "response": response, "prediction": extract_answer(name, response),
                                    "correct": is_correct(name, response, answer)})
                sink.append(records, durable=True)  # what is written stays written if the machine dies
                done.update({(r["dataset"], r["index"]): r for r in records})
                bar.update(len(positions))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(done)} predictions are kept in {out / 'predictions.jsonl'}: run the same "
                                "command again to continue") from None
    finally:
        sink.close()


def main(argv=None):
    return runs.run_command(lambda argv: evaluate(parse_settings(argv)), argv,
                            errors=(CheckpointError, DataError, AdapterError))


if __name__ == "__main__":
    main()
