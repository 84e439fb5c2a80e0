"""Evaluate an adapter (or the base model) on the paper's test sets and print the accuracy table.

    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt
    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt --datasets SVAMP gsm8k --limit 50
    python eval.py --base --model llama-7b --task math

The model, task and adapter settings come from the adapter file. Greedy decoding, batched with
the KV cache; each prediction is appended to predictions.jsonl as its batch finishes, so an
interrupted evaluation resumes where it stopped. At the end results.md (a table shaped like
the paper's Table 1/2) and results.json are written next to the predictions.
"""
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import interlora
from data import (DataError, extract_answer, generate_prompt, is_correct, load_task, make_output_dir,
                  settings_from_command_line, tokenizer_for, write_json, write_text)
from interlora import AdapterError
from model import CheckpointError, load_model


@dataclass
class EvalSettings:
    adapter: str = field(default="", metadata={"help": "adapter file written by train.py"})
    base: bool = field(default=False, metadata={"help": "evaluate the base model alone, without adapters"})
    model: str = field(default="", metadata={"help": "model preset (default: the adapter's)"})
    task: str = field(default="", metadata={"help": "math or commonsense (default: the adapter's)"})
    checkpoint_dir: str = field(default="", metadata={"help": "folder of the base weights (default: the adapter's)"})
    data_dir: str = field(default="data", metadata={"help": "LLM-Adapters data (python data.py download)"})
    datasets: str = field(default="", metadata={"help": "comma-separated test sets (default: all of the task)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N items of each test set (default 0: all)"})
    batch_size: int = field(default=32, metadata={"help": "prompts generated together"})
    max_new_tokens: int = field(default=0, metadata={"help": "tokens to generate (default 0: 256 math, 32 commonsense)"})
    out_dir: str = field(default="", metadata={"help": "output folder (default: eval-<task> beside the adapter)"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


def parse_settings(argv=None):
    parser, s = settings_from_command_line(EvalSettings, __doc__.split("\n\n")[0], argv)
    if not s.adapter and not (s.base and s.model and s.task):
        parser.error("pass --adapter FILE, or --base with --model and --task")
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return s


def read_predictions(path):
    """Finished predictions by (dataset, index); a line cut short by a crash is dropped."""
    done, good_bytes = {}, 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a half-written last line: everything after it is redone
                done[(record["dataset"], record["index"])] = record
                good_bytes += len(line)
        os.truncate(path, good_bytes)
    return done


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


def evaluate(s):
    info, cfg_text = {}, "base"
    if s.adapter:
        payload = interlora.read_adapter(s.adapter)
        info = payload["info"]
    model_name, task_name = s.model or info.get("model"), s.task or info.get("task")
    checkpoint_dir = s.checkpoint_dir or info.get("checkpoint_dir") or os.path.join("checkpoints", model_name)
    method = "base" if s.base else info.get("method", "adapter")
    default_out = os.path.join(os.path.dirname(os.path.abspath(s.adapter)) if s.adapter else "out",
                               f"eval-{task_name}" + ("-base" if s.base else ""))
    print(json.dumps(asdict(s) | {"model": model_name, "task": task_name, "checkpoint_dir": checkpoint_dir}, indent=2))

    datasets = [d.strip() for d in s.datasets.split(",") if d.strip()] or None
    task = load_task(task_name, s.data_dir, datasets=datasets, with_train=False)
    out = make_output_dir(s.out_dir or default_out)
    cuda = s.device == "cuda"
    model = load_model(model_name, checkpoint_dir, device=s.device, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = tokenizer_for(model_name, checkpoint_dir)
    params = 0
    if not s.base:
        cfg, _ = interlora.load_adapter(model, s.adapter)
        params = sum(p.numel() for name, p in model.named_parameters() if interlora.is_adapter_parameter(name))
        cfg_text = json.dumps(asdict(cfg))
    print(f"adapter: {cfg_text}")
    model.eval()
    max_new_tokens = s.max_new_tokens or task.max_new_tokens
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    # predictions are reused only by the same evaluation: same weights, adapter and generation length
    run = {"model": model_name, "task": task_name, "base": s.base, "max_new_tokens": max_new_tokens,
           "adapter_sha256": None if s.base else hashlib.sha256(open(s.adapter, "rb").read()).hexdigest()}
    run_path = os.path.join(out, "run.json")
    if os.path.exists(run_path) and json.load(open(run_path)) != run:
        raise DataError(f"{out} holds predictions of another evaluation (other adapter, model or settings): "
                        "delete the folder or choose another --out_dir")
    write_json(run_path, run)
    predictions_path = os.path.join(out, "predictions.jsonl")
    done = read_predictions(predictions_path)
    selected = {name: items[: s.limit or None] for name, items in task.test.items()}
    todo = [(name, i) for name, items in selected.items() for i in range(len(items)) if (name, i) not in done]
    print(f"{sum(map(len, selected.values()))} items, {len(todo)} to generate, "
          f"{len(done)} already in {predictions_path}")

    prompts = [tokenizer.encode(generate_prompt(selected[name][i]["instruction"], selected[name][i]["input"]))
               for name, i in todo]
    with open(predictions_path, "a") as sink, tqdm(total=len(todo), desc=f"eval {task_name}",
                                                   dynamic_ncols=True) as bar, autocast:
        for positions, outputs in model.generate_batches(prompts, s.batch_size, max_new_tokens,
                                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id):
            for position, new_tokens in zip(positions, outputs):
                name, index = todo[position]
                if new_tokens and new_tokens[-1] == tokenizer.eos_id:
                    new_tokens = new_tokens[:-1]
                response = tokenizer.decode(new_tokens)
                item = selected[name][index]
                record = {"dataset": name, "index": index, "answer": item["answer"], "response": response,
                          "prediction": extract_answer(name, response),
                          "correct": is_correct(name, response, item["answer"])}
                done[(name, index)] = record
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            os.fsync(sink.fileno())  # what is written stays written if the machine dies
            bar.update(len(positions))

    accuracy = {name: 100 * sum(done[(name, i)]["correct"] for i in range(len(items))) / max(1, len(items))
                for name, items in selected.items()}
    table, average = results_table(model_name, method, params, accuracy)
    print(table)
    write_text(os.path.join(out, "results.md"), table)
    write_json(os.path.join(out, "results.json"),
               {"model": model_name, "task": task_name, "method": method, "adapter": s.adapter,
                "trainable_parameters": params, "items": {n: len(v) for n, v in selected.items()},
                "accuracy": accuracy, "average": average, "max_new_tokens": max_new_tokens})
    print(f"wrote {os.path.join(out, 'results.md')} and results.json")
    return accuracy


def main(argv=None):
    settings = parse_settings(argv)
    try:
        return evaluate(settings)
    except (CheckpointError, DataError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
