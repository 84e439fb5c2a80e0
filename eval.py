"""Evaluate an adapter (or the base model) on the paper's test sets and print the accuracy table.

    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt
    python eval.py --adapter out/llama-7b-math-interlora/adapter.pt --datasets SVAMP --limit 50
    python eval.py --base --model llama-7b --task math
    torchrun --standalone --nproc_per_node 2 eval.py --adapter out/llama-7b-math-lora/adapter.pt

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
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from machinery import adapters  # noqa: E402
from machinery import decode  # noqa: E402
from machinery import checks  # noqa: E402
from machinery import distributed  # noqa: E402
from machinery import memory  # noqa: E402
from machinery import runs  # noqa: E402
from data import (DataError, extract_answer, generate_prompt, is_correct, load_task,  # noqa: E402
                  tokenizer_for)
from machinery.memory import NotEnoughMemory  # noqa: E402
from machinery.checkpoints import check_window, load_model, model_config  # noqa: E402
from model import CheckpointError, Transformer  # noqa: E402
from machinery.quantize import QUANTIZE_KINDS  # noqa: E402
from machinery.runs import RunError, flag  # noqa: E402


@dataclass
class EvalSettings:
    adapter: str = flag("", "adapter file written by train.py")
    base: bool = flag(False, "evaluate the base model alone, without adapters")
    model: str = flag("", "model preset or checkpoint folder (default: the adapter's)")
    task: str = flag("", "math or commonsense (default: the adapter's)")
    checkpoint_dir: str = flag("", "folder of a preset's weights (default: the adapter's)")
    dtype: str = flag("", "the base's dtype: bf16, fp16 or fp32 (default: the adapter's, as it "
                      "was trained; for --base bf16 on CUDA, on the CPU fp32 if it fits in "
                      "memory, else bf16)")
    quantize: str = flag("", "int8 or nf4: keep the base's block weights in 8 or 4 bits; none: do "
                         "not (default: as the adapter was trained)")
    data_dir: str = flag("data", "LLM-Adapters data (python data.py download)")
    datasets: str = flag("", "comma-separated test sets, e.g. SVAMP,gsm8k (default: all of the "
                         "task)")
    limit: int = flag(0, "evaluate only the first N items of each test set (default 0: all)", min=0)
    batch_size: int = flag(32, "prompts generated together", min=1)
    max_new_tokens: int = flag(0, "tokens to generate (default 0: 256 math, 32 commonsense)", min=0)
    out_dir: str = flag("", "output folder (default: eval-<task> beside the adapter)")
    compile: bool = flag(False, "torch.compile the decode step (CUDA graphs on a GPU)")
    device: str = flag("", "cuda or cpu (default: cuda when available)")


def parse_settings(argv=None):
    s = runs.settings_from_command_line(EvalSettings, __doc__.split("\n\n")[0], argv)
    if not s.adapter and not (s.base and s.model and s.task):
        raise RunError("pass --adapter FILE, or --base with --model and --task")
    if s.dtype not in ("", *memory.DTYPES):
        raise RunError(f"--dtype {s.dtype!r}: expected one of {', '.join(memory.DTYPES)}")
    if s.quantize not in ("", "none", *QUANTIZE_KINDS):
        raise RunError(f"--quantize {s.quantize!r}: expected none or one of "
                       f"{', '.join(QUANTIZE_KINDS)}")
    s.device = runs.choose_device(s.device)
    return s


def base_fingerprint(model_name, folder):
    """What identifies the base weights without reading them: each file's name, size and
    modification time."""
    if folder is None:
        return f"{model_name}: random weights, seed 0"
    folder = Path(folder)
    files = [f for f in sorted(folder.iterdir()) if f.is_file()]
    files.append(folder.parent / "tokenizer.model")
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def item_key(dataset, prompt, answer):
    """A short hash of what decides a prediction and its score: a record is reused only for its
    own item."""
    return hashlib.sha256(json.dumps([dataset, prompt, answer]).encode()).hexdigest()[:16]


def is_record(record):
    return (isinstance(record, dict) and isinstance(record.get("dataset"), str)
            and isinstance(record.get("index"), int) and isinstance(record.get("item"), str)
            and isinstance(record.get("response"), str) and isinstance(record.get("correct"), bool))


def results_table(model_name, method, params, accuracy):
    """A Markdown table shaped like the paper's Table 1/2: one row, datasets in its order."""
    names = list(accuracy)
    average = sum(accuracy.values()) / len(accuracy)
    header = "| LLM | Method | Params | " + " | ".join(names) + " | Avg. |"
    rule = "|" + "---|" * (len(names) + 4)
    params_text = f"{params / 1e6:.2f}M" if params else "-"
    scores = " | ".join(f"{accuracy[n]:.2f}" for n in names)
    row = f"| {model_name} | {method} | {params_text} | {scores} | {average:.2f} |"
    return "\n".join([header, rule, row]) + "\n", average


def check_same_run(path, run):
    """Predictions in a folder are reused only by the evaluation that made them."""
    if not os.path.exists(path):
        return
    saved = runs.read_json(path, "delete the folder, or choose another --out_dir")
    checks.check_fields(path, saved, {}, RunError,  # an object, not a list or a number
                        "delete the folder, or choose another --out_dir")
    changed = sorted(k for k in run.keys() | saved.keys() if run.get(k) != saved.get(k))
    if changed:
        raise RunError(f"{os.path.dirname(path)} holds predictions of another evaluation "
                       f"(different {', '.join(changed)}): delete the folder, or choose another "
                       "--out_dir")


@dataclass
class Evaluation:
    """What one evaluation is, settled before any weight is read."""
    model: str            # as given: a preset name or a checkpoint folder
    task: str
    checkpoint_dir: str   # the folder of the weights, "" for the random tiny presets
    method: str           # the adapter's method, or "base"
    out_dir: str
    run: dict             # what run.json holds: predictions are reused only by the same evaluation
    items: dict           # dataset -> its test items (the first --limit)
    prompts: dict         # (dataset, index) -> the prompt
    keys: dict            # (dataset, index) -> a hash of what decides the prediction and its score
    max_new_tokens: int
    adapter: object       # the adapter file's bytes (runs.AdapterBytes), None for the base alone


def plan(s):
    """(Evaluation, tokenizer): the settings resolved against the adapter file, the data and the
    memory the run needs; everything is checked but the weights."""
    # the adapter's bytes are read once: its record, its hash and its tensors all come from them
    adapter = runs.AdapterBytes(s.adapter) if s.adapter else None
    info = adapters.read_adapter(adapter.open())["info"] if adapter else {}
    if not (s.model or info.get("model")) or not (s.task or info.get("task")):
        raise RunError(f"{s.adapter} names no model or task: pass --model and --task")
    task_name = s.task or info.get("task")
    base_note = None
    if adapter:  # the base the adapter was trained on, unless flags say otherwise
        model_name, checkpoint_dir, base_note = runs.recorded_base(s, info, s.adapter)
    else:
        model_name, checkpoint_dir = s.model, s.checkpoint_dir or None
        s.quantize = "" if s.quantize == "none" else s.quantize
    # reads params.json / config.json only
    config, folder = model_config(model_name, checkpoint_dir)
    if s.adapter and not s.base:  # the adapter against the base first, on a model of no weights
        with torch.device("meta"):
            adapters.check_base(Transformer(config), s.adapter)
    default_out = os.path.join(os.path.dirname(os.path.abspath(s.adapter)) if s.adapter else "out",
                               f"eval-{task_name}" + ("-base" if s.base else ""))
    out_dir = s.out_dir or default_out
    datasets = [d.strip() for d in s.datasets.split(",") if d.strip()] or None
    task = load_task(task_name, s.data_dir, datasets=datasets, with_train=False)
    max_new_tokens = s.max_new_tokens or task.max_new_tokens
    items = {name: test[: s.limit or None] for name, test in task.test.items()}
    prompts = {(name, i): generate_prompt(item["instruction"], item["input"])
               for name, test in items.items() for i, item in enumerate(test)}
    keys = {(name, i): item_key(name, prompt, items[name][i]["answer"])
            for (name, i), prompt in prompts.items()}
    tokenizer = tokenizer_for(folder)
    # the longest sequence a batch holds: the longest prompt and the answer
    seq_len = max((len(tokenizer.encode(p)) for p in prompts.values()), default=1) + max_new_tokens
    checks.check_flags(s, config, RunError, prompt_len=seq_len - max_new_tokens,
                       max_new_tokens=max_new_tokens)
    check_window(config, seq_len, f"the longest prompt + --max_new_tokens {max_new_tokens}")
    s.dtype, note = memory.plan(config, s.device, s.dtype, s.quantize or None, training=False,
                                batch_size=min(s.batch_size, max(1, len(prompts))), seq_len=seq_len)
    run = {"model": model_name, "task": task_name, "base": s.base, "max_new_tokens": max_new_tokens,
           "dtype": s.dtype, "quantize": s.quantize or None,
           "adapter_sha256": adapter.sha256 if adapter and not s.base else None,
           "base_weights": base_fingerprint(model_name, folder)}
    resolved = {"model": model_name, "task": task_name, "checkpoint_dir": str(folder or ""),
                "out_dir": out_dir}
    print(json.dumps(asdict(s) | resolved, indent=2))
    for line in (base_note, note):
        if line:
            print(line)
    method = "base" if s.base else info.get("method", "adapter")
    return Evaluation(model_name, task_name, str(folder or ""), method, out_dir, run, items,
                      prompts, keys, max_new_tokens, adapter), tokenizer


def evaluate(s):
    # everything that can be checked without the weights first, and no output folder until they
    # loaded
    e, tokenizer = plan(s)
    runs.check_output_dir(e.out_dir)
    check_same_run(os.path.join(e.out_dir, "run.json"), e.run)
    group = distributed.start(s.device)  # None for a single process
    try:
        return evaluate_on(s, e, tokenizer, group)
    finally:
        distributed.finish(group)


def evaluate_on(s, e, tokenizer, group):
    """Load the model and generate what is missing: alone, or as one of group.world_size
    processes."""
    device = group.device if group else s.device
    main_process = group is None or group.main
    model = load_model(e.model, e.checkpoint_dir or None, device=device,
                       dtype=memory.DTYPES[s.dtype], quantize=s.quantize or None)
    params = 0
    if not s.base:
        # the bytes whose sha256 run.json holds
        cfg, _ = adapters.load_adapter(model, e.adapter.open())
        params = sum(p.numel() for name, p in model.named_parameters()
                     if adapters.is_adapter_parameter(name))
        print(f"adapter: {json.dumps(adapters.describe(cfg))}")
    model.eval()

    # rank 0 owns the folder and decides what is left to do; every process generates its share of it
    out = runs.OutputDir(e.out_dir) if main_process else None
    try:
        done = {}
        if main_process:
            check_same_run(out / "run.json", e.run)  # again, under the lock
            runs.write_json(out / "run.json", e.run)
            done = reusable_predictions(runs.JsonLines(out / "predictions.jsonl"), e.keys)
            print(f"{len(e.prompts)} items, {len(e.prompts) - len(done)} to generate, "
                  f"{len(done)} already in {out / 'predictions.jsonl'}")
        todo = [key for key in e.prompts if key not in done]
        if group:
            todo = distributed.gather(todo, group)[0]
        generate_predictions(model, tokenizer, s, e, group, todo, done)
        if not main_process:
            return None

        accuracy = {}
        for name, test in e.items.items():
            right = sum(done[(name, i)]["correct"] for i in range(len(test)))
            accuracy[name] = 100 * right / max(1, len(test))
        table, average = results_table(Path(e.model).name, e.method, params, accuracy)
        print(table)
        runs.write_text(out / "results.md", table)
        runs.write_json(out / "results.json",
                        {"model": e.model, "task": e.task, "method": e.method, "adapter": s.adapter,
                         "data_dir": s.data_dir, "trainable_parameters": params,
                         "items": {n: len(v) for n, v in e.items.items()}, "accuracy": accuracy,
                         "average": average, "max_new_tokens": e.max_new_tokens})
    finally:
        if out:
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
        print(f"{predictions.path}: dropped {len(bad)} unreadable line(s) ({shown}); their items "
              "are generated again")
    if len(done) < len(records):
        print(f"{predictions.path}: {len(records) - len(done)} prediction(s) were made for items "
              "that are not in this evaluation (other test files or --datasets); they are set "
              "aside")
    if bad:
        predictions.rewrite(records)  # keep what is good, so appends start on a clean line
    return done


def generate_predictions(model, tokenizer, s, e, group, todo, done):
    """Generate, score and append a record per item of `todo`, a batch at a time (durably, by
    rank 0).

    With several processes each generates every world_size-th batch; after each round rank 0
    gathers the round's records and appends them, so the file grows as with one process."""
    device = group.device if group else s.device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else contextlib.nullcontext())
    encoded = [tokenizer.encode(e.prompts[key]) for key in todo]
    main_process = group is None or group.main
    path = os.path.join(e.out_dir, "predictions.jsonl")
    sink = runs.JsonLines(path) if main_process else None
    rank, world_size = (group.rank, group.world_size) if group else (0, 1)
    decode_step = decode.compiled_decode_step(model) if s.compile else None  # None: eager
    try:
        batches = model.generate_batches(encoded, s.batch_size, e.max_new_tokens, rank, world_size,
                                         eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                         decode_step=decode_step)
        bar = tqdm(total=len(todo), desc="eval", dynamic_ncols=True, disable=not main_process)
        with bar, autocast:
            for positions, outputs in batches:
                records = []
                for position, new_tokens in zip(positions, outputs):
                    name, index = key = todo[position]
                    if new_tokens and new_tokens[-1] in tokenizer.stop_ids:
                        new_tokens = new_tokens[:-1]
                    response = tokenizer.decode(new_tokens)
                    answer = e.items[name][index]["answer"]
                    records.append({"dataset": name, "index": index, "item": e.keys[key],
                                    "answer": answer, "response": response,
                                    "prediction": extract_answer(name, response),
                                    "correct": is_correct(name, response, answer)})
                if group:
                    records = [r for part in distributed.gather(records, group) for r in part]
                runs.defer_stops()  # a batch's lines are appended whole, whatever signal comes
                try:
                    if main_process:
                        sink.append(records, durable=True)  # stays written if the machine dies
                    done.update({(r["dataset"], r["index"]): r for r in records})
                    bar.update(len(records))
                    signum = runs.pending_stop()
                finally:
                    runs.defer_stops(False)
                if signum:  # SIGTERM or SIGHUP: the batch in generation is dropped, not awaited
                    raise runs.Stopped(signum)
    except KeyboardInterrupt as stop:
        raise runs.interrupted(stop, f"with {len(done)} of {len(e.prompts)} predictions made; all "
                                     f"made are kept in {path}: run the same command again to "
                                     "continue") from None
    except distributed.PeerLost as lost:
        raise RunError(f"{lost}; the predictions so far are kept in {path}: run the same command "
                       "again to continue") from None
    finally:
        if sink:
            sink.close()


def main(argv=None):
    return runs.run_command(lambda argv: evaluate(parse_settings(argv)), argv,
                            errors=(CheckpointError, DataError, *adapters.ERRORS, NotEnoughMemory))


if __name__ == "__main__":
    main()
