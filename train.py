"""Fine-tune a LLaMA / GPT-J with InterLoRA (or a baseline) on the paper's math or commonsense task.

    python train.py --model llama-7b --task math                  # the paper's InterLoRA run
    python train.py --model llama-7b --task math --method lora    # the LoRA baseline (r = 10)
    python train.py --model llama-7b --task math --method adapter # the bottleneck Adapter
    python train.py --model llama-7b --task math --method prefix  # the Prefix baseline (lr 3e-2)
    python train.py --model tiny --task math --max_steps 20       # random tiny model, any machine
    torchrun --standalone --nproc_per_node 2 train.py --model llama-7b --task math   # 2 GPUs

Writes into --out_dir: settings.json, log.jsonl (one line per optimizer step), checkpoint.pt
(adapters + optimizer + RNG, every --save_every steps and at the end) and, last, adapter.pt
(the adapter file eval.py reads). What a rerun does depends on what the folder holds:

    the folder holds                      python train.py ...        ... --resume
    nothing                               starts                     error: nothing to resume
    a log, no checkpoint (stopped early)  starts over, says so       starts over, says so
    checkpoint.pt, no adapter.pt          error: pass --resume       continues from the checkpoint
    adapter.pt (finished)                 error: choose another      nothing to do, says so
"""
import os

# MKL picks matmul kernels by the memory alignment of the operands unless told to be reproducible
# (its "conditional numerical reproducibility"); without this, two processes doing the same
# training can differ in the last bits, and resuming in a new process would not be bit-exact.
# Set before torch loads MKL; the measured cost is in the README.
os.environ.setdefault("MKL_CBWR", "AUTO")

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from machinery import adapters  # noqa: E402
from machinery import checks  # noqa: E402
from machinery import distributed  # noqa: E402
from machinery import fused  # noqa: E402
from machinery import gates  # noqa: E402
from machinery import memory  # noqa: E402
from machinery import runs  # noqa: E402
from data import (TASKS, DataError, collate, load_task, tokenize_item, tokenizer_for,  # noqa: E402
                  truncation_note)
from machinery.memory import NotEnoughMemory  # noqa: E402
from machinery.checkpoints import check_window, load_model, model_config  # noqa: E402
from model import PRESETS, CheckpointError, Transformer  # noqa: E402
from machinery.quantize import QUANTIZE_KINDS, QuantizedLinear  # noqa: E402
from machinery.runs import RunError, flag  # noqa: E402


@dataclass
class TrainSettings:
    model: str = flag("llama-7b", "model preset (llama-7b, llama-13b, gptj-6b, tiny, tiny-gptj) "
                      "or a LLaMA / GPT-J checkpoint folder")
    task: str = flag("math", "math or commonsense")
    method: str = flag("interlora", "interlora; a baseline: lora, adapter, prefix (these two take "
                       "none of the LoRA settings r, alpha, dropout, gate_pool); or an ablation: "
                       + ", ".join(adapters.METHODS[2:-2]))
    checkpoint_dir: str = flag("", "folder of a preset's weights (default checkpoints/<model>)")
    dtype: str = flag("", "the frozen base's dtype: bf16, fp16 or fp32 (default: bf16 on CUDA; on "
                      "the CPU fp32 if the run fits in memory, else bf16)")
    quantize: str = flag("", "int8 or nf4: keep the base's block weights in 8 or 4 bits")
    data_dir: str = flag("data", "LLM-Adapters data (python data.py download)")
    out_dir: str = flag("", "output folder (default out/<model>-<task>-<method>)")
    r: int = flag(0, "LoRA rank (default 0: the method's, 4 for interlora, 10 for lora)", min=0)
    alpha: float = flag(0.0, "LoRA alpha, lambda = alpha / r (default 0: 2r)", min=0)
    dropout: float = flag(0.05, "LoRA dropout", min=0, below=1)
    gate_pool: str = flag("mean", "head-gate pooling: mean (paper) or causal")
    lr: float = flag(0.0, "peak learning rate (default 0: the method's, 3e-2 for prefix, 3e-4 for "
                     "the others)", min=0)
    epochs: int = flag(3, "passes over the training set", min=1)
    micro_batch_size: int = flag(4, "sequences per forward pass", min=1)
    grad_accum: int = flag(4, "micro-batches per optimizer step (batch 16 = 4 x 4), shared by the "
                           "processes under torchrun", min=1)
    warmup_steps: int = flag(100, "linear warmup steps, then linear decay to 0", min=0)
    cutoff_len: int = flag(256, "tokens per training sequence", min=2)
    mask_prompt: bool = flag(False, "no loss on the prompt (default: loss on prompt and response)")
    max_grad_norm: float = flag(1.0, "gradient clipping", above=0)
    seed: int = flag(42, "seed of adapter init, data order and dropout")
    max_steps: int = flag(0, "stop after this many optimizer steps (default 0: the epochs decide)",
                          min=0)
    save_every: int = flag(100, "save checkpoint.pt every N optimizer steps", min=1)
    gate_log_every: int = flag(25, "log a few gate statistics every N steps, from one micro-batch "
                               "run again without gradients (0: never)", min=0)
    resume: bool = flag(False, "continue the run in --out_dir (see the table above)")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute blocks in backward (less memory)")
    shard_base: bool = flag(False, "under torchrun: shard the frozen base over the processes "
                            "(FSDP2), for a base that does not fit one device")
    device: str = flag("", "cuda or cpu (default: cuda when available)")


# The paper's learning rate of each method where it is not 3e-4.
LEARNING_RATES = {"prefix": 3e-2}
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "compile", "grad_checkpointing", "shard_base", "checkpoint_dir",
                     "data_dir", "device", "out_dir", "gate_log_every"}


def parse_settings(argv=None):
    s = runs.settings_from_command_line(TrainSettings, __doc__.split("\n\n")[0], argv)
    if s.method not in adapters.METHODS:
        raise RunError(f"unknown --method {s.method!r}: choose one of "
                       f"{', '.join(adapters.METHODS)}")
    if s.method in adapters.BASELINES:  # LoRA's settings: refused rather than ignored
        defaults = {f.name: f.default for f in fields(TrainSettings)}
        given = [f"--{name} {getattr(s, name)}" for name in ("r", "alpha", "dropout", "gate_pool")
                 if getattr(s, name) != defaults[name]]
        if given:
            raise RunError(f"{', '.join(given)}: LoRA's settings, which --method {s.method} does "
                           "not have (it runs with the paper's settings); leave them out")
    s.lr = s.lr or LEARNING_RATES.get(s.method, 3e-4)
    if s.task not in TASKS:
        raise RunError(f"unknown --task {s.task!r}: expected one of {', '.join(TASKS)}")
    if s.dtype not in ("", *memory.DTYPES):
        raise RunError(f"--dtype {s.dtype!r}: expected one of {', '.join(memory.DTYPES)}")
    if s.quantize not in ("", *QUANTIZE_KINDS):
        raise RunError(f"--quantize {s.quantize!r}: expected one of {', '.join(QUANTIZE_KINDS)}")
    s.out_dir = s.out_dir or os.path.join("out", f"{Path(s.model).name}-{s.task}-{s.method}")
    s.device = runs.choose_device(s.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if s.grad_accum % world_size:
        batch = s.micro_batch_size * s.grad_accum
        # the same batch, split another way
        fits = [a for a in range(world_size, batch + 1, world_size) if batch % a == 0]
        hint = (f"; --micro_batch_size {batch // fits[0]} --grad_accum {fits[0]} keeps the batch "
                f"of {batch}" if fits else "")
        raise RunError(f"--grad_accum {s.grad_accum} micro-batches per step do not split evenly "
                       f"over {world_size} processes: pass a multiple of {world_size}{hint}")
    if s.shard_base and world_size == 1:
        raise RunError("--shard_base shards the base over the processes of a torchrun launch: "
                       "run under torchrun --nproc_per_node N, or leave it out")
    return s


def get_lr(step, settings, total_steps):
    """Linear warmup to lr, then linear decay to 0 at total_steps (LLM-Adapters' Trainer's)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    decay_steps = max(1, total_steps - settings.warmup_steps)
    return settings.lr * max(0.0, (total_steps - step) / decay_steps)


def step_batches(examples, settings, step, steps_per_epoch):
    """The micro-batches of optimizer step `step`: a seeded shuffle per epoch, so a resumed run
    sees the same order."""
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    per_step, size = settings.micro_batch_size * settings.grad_accum, settings.micro_batch_size
    chosen = order[position * per_step:(position + 1) * per_step]
    return [chosen[i:i + size] for i in range(0, len(chosen), size)]


def schedule(settings, n_examples):
    """(optimizer steps per epoch, steps of the run); an epoch's last step takes what is left."""
    steps_per_epoch = math.ceil(n_examples / (settings.micro_batch_size * settings.grad_accum))
    return steps_per_epoch, settings.max_steps or settings.epochs * steps_per_epoch


def micro_batch_seed(settings, step, index):
    """The RNG seed of micro-batch `index` of step `step`: its dropout masks are the same whichever
    process computes it, and whether the run was interrupted or not."""
    return hash((settings.seed, step, index)) % 2**63


def memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # peak resident memory of this process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def folder_state(out):
    """What an output folder holds: new, started (stopped before its first save), unfinished,
    finished."""
    if os.path.exists(os.path.join(out, "adapter.pt")):
        return "finished"
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        return "unfinished"
    if any(os.path.exists(os.path.join(out, name)) for name in ("log.jsonl", "settings.json")):
        return "started"
    return "new"


def tokenizer_fingerprint(tokenizer):
    """A sha256 of what decides a tokenizer's ids: its vocabulary, merges and special ids."""
    if hasattr(tokenizer, "processor"):  # sentencepiece: the model file's contents, as loaded
        vocabulary = tokenizer.processor.serialized_model_proto().hex()
    elif hasattr(tokenizer, "token_to_id"):  # byte-level BPE
        vocabulary = [sorted(tokenizer.token_to_id.items()), sorted(tokenizer.merge_rank.items()),
                      sorted(tokenizer.id_to_added.items())]
    else:  # the byte tokenizer: no files, its ids are the bytes
        vocabulary = type(tokenizer).__name__
    special = [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
               tokenizer.add_bos]
    return hashlib.sha256(json.dumps([vocabulary, special]).encode()).hexdigest()


def data_record(tokenizer, examples):
    """What decides the run besides its settings: the tokenizer and the training items as the model
    sees them (token ids and loss labels after the cutoff). --data_dir may move, not change."""
    tokens = hashlib.sha256(json.dumps(examples).encode()).hexdigest()
    return {"items": len(examples), "tokens_sha256": tokens,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}


def check_same_data(saved, record, path):
    """Refuse to continue a run on other training data or with another tokenizer, naming which."""
    if not isinstance(saved, dict):  # written before runs recorded their data: nothing to compare
        print(f"{path} records no training data (an older version wrote it): it cannot be checked")
        return
    def short(key):
        return f"sha256 {str(saved.get(key))[:12]}..."
    if saved.get("tokenizer_sha256") != record["tokenizer_sha256"]:
        raise RunError(f"{path} was written with another tokenizer ({short('tokenizer_sha256')}, "
                       f"this one's is {record['tokenizer_sha256'][:12]}...): resume with the "
                       "model and tokenizer the run started with, or choose another --out_dir")
    found = (record["items"], record["tokens_sha256"])
    if (saved.get("items"), saved.get("tokens_sha256")) != found:
        raise RunError(f"{path} was written for other training data: {saved.get('items')} items "
                       f"(tokens {short('tokens_sha256')}), --data_dir now gives {record['items']} "
                       f"(sha256 {record['tokens_sha256'][:12]}...): resume with the data the run "
                       "started with (--data_dir may move, not change), or choose another "
                       "--out_dir")


def check_rerun(s, state, announce, record):
    """Refuse what a rerun must not do to the folder; True when there is nothing left to do."""
    out = s.out_dir
    if state == "new" and s.resume:
        raise RunError(f"nothing to resume in {out}: it holds no checkpoint.pt; run without "
                       "--resume to start")
    if state == "unfinished" and not s.resume:
        raise RunError(f"{out} holds an unfinished run (checkpoint.pt): pass --resume to "
                       "continue it, or choose another --out_dir")
    if state == "finished" and not s.resume:
        raise RunError(f"{out} holds a finished run (adapter.pt): choose another --out_dir")
    if state == "finished":
        saved = read_settings_json(os.path.join(out, "settings.json"))
        check_same_settings(saved["settings"], s, os.path.join(out, "settings.json"))
        check_same_data(saved.get("data"), record, os.path.join(out, "settings.json"))
        print(f"nothing to do: {out}/adapter.pt is the finished run ({saved['total_steps']} steps)")
        return True
    if state == "unfinished" and os.path.exists(os.path.join(out, "settings.json")):
        # refused in seconds, before the weights load; resume() checks the checkpoint's own record
        saved = read_settings_json(os.path.join(out, "settings.json"))
        check_same_data(saved.get("data"), record, os.path.join(out, "settings.json"))
    if state == "started" and announce:
        print(f"{out}: the run there stopped before its first save; starting it over")
    return False


def check_same_settings(saved, s, path):
    changed = sorted(k for k, v in saved.items()
                     if getattr(s, k, None) != v and k not in RESUMABLE_CHANGES)
    if changed:
        flags = ", ".join(f"--{k} {saved[k]}" for k in changed)
        raise RunError(f"{path} was written with other settings ({flags}): resume with the same "
                       "settings, or choose another --out_dir")


def train(s):
    # everything that can be checked without the weights is checked first: a mistake should
    # fail in seconds, before minutes of loading, and leave no output folder behind
    # reads params.json / config.json only
    config, folder = model_config(s.model, s.checkpoint_dir or None)
    s.checkpoint_dir = str(folder) if folder else ""
    check_window(config, s.cutoff_len, f"--cutoff_len {s.cutoff_len}")
    cfg = adapters.make_config(s.method, r=s.r, alpha=s.alpha, dropout=s.dropout,
                               gate_pool=s.gate_pool)
    checks.check_flags(s, config, RunError, cfg)  # --r within the layers, --cutoff_len the context
    n_trainable = trainable_parameters(config, cfg)
    if s.resume and not s.dtype:  # a resumed run keeps the dtype it started with
        s.dtype = saved_settings(s.out_dir).get("dtype", "")
    note = choose_dtype(s, config, n_trainable)
    print(json.dumps(asdict(s), indent=2))
    if note:
        print(note)
    task = load_task(s.task, s.data_dir, datasets=[])
    if not task.train:
        raise DataError(f"the {s.task} training file in {s.data_dir} holds no items: download it "
                        "again (python data.py download)")
    tokenizer = tokenizer_for(folder)
    examples = [tokenize_item(tokenizer, item, s.cutoff_len, train_on_inputs=not s.mask_prompt)
                for item in task.train]
    if cut := truncation_note(examples, s.cutoff_len, tokenizer.eos_id):
        print(cut)
    runs.check_output_dir(s.out_dir)
    record = data_record(tokenizer, examples)
    if check_rerun(s, folder_state(s.out_dir), announce=False, record=record):
        return

    group = distributed.start(s.device)  # None for a single process
    try:
        train_on(s, group, cfg, tokenizer, examples, record)
    except runs.Stopped as e:  # while the base loads: nothing was trained that could be lost
        raise runs.interrupted(e, "before training began; nothing was lost: run the same "
                                  "command again") from None
    finally:
        distributed.finish(group)


def trainable_parameters(config, cfg):
    """The adapters' parameter count, from a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = Transformer(config)
    adapters.add_adapters(model, cfg)
    return sum(p.numel() for name, p in model.named_parameters()
               if adapters.is_adapter_parameter(name))


def choose_dtype(s, config, n_trainable):
    """Set s.dtype (given, or the device's default) once the run is known to fit; the default's
    note."""
    if s.shard_base:  # each process keeps 1/N of the base: the one-device estimate does not apply
        s.dtype = s.dtype or ("bf16" if s.device.startswith("cuda") else "fp32")
        return None
    cpu_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if s.device == "cpu" else 1
    s.dtype, note = memory.plan(config, s.device, s.dtype, s.quantize or None,
                                processes=cpu_processes, training=True,
                                batch_size=s.micro_batch_size, seq_len=s.cutoff_len,
                                trainable_params=n_trainable, autocast=s.device.startswith("cuda"),
                                grad_checkpointing=s.grad_checkpointing)
    return note


def saved_settings(out_dir):
    path = os.path.join(out_dir, "settings.json")
    if not os.path.exists(path):
        return {}
    return read_settings_json(path)["settings"]


def read_settings_json(path):
    """settings.json as train.py writes it; edited or cut, it is one line saying what to do."""
    saved = runs.read_json(path, "delete it, or choose another --out_dir")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) \
            or not is_whole(saved.get("total_steps")):
        raise RunError(f"{path} is not the settings.json train.py writes (expected an object "
                       "with the 'settings' object and a whole number 'total_steps'): delete it, "
                       "or choose another --out_dir")
    checks.check_settings_json(path, saved, TrainSettings, RunError,
                               "delete it, or choose another --out_dir")
    return saved


def train_on(s, group, cfg, tokenizer, examples, record):
    """Load the base, add the adapters and train them: alone, or as one of group.world_size
    processes."""
    device = group.device if group else s.device
    main_process = group is None or group.main
    torch.manual_seed(s.seed)  # the adapters' initial weights, the same in every process
    cuda = device.startswith("cuda")
    # a base to be sharded is read into host memory first: it need not fit the device
    model = load_model(s.model, s.checkpoint_dir or None, device="cpu" if s.shard_base else device,
                       dtype=memory.DTYPES[s.dtype], quantize=s.quantize or None)
    adapters.add_adapters(model, cfg)
    model.loss_function = fused.chunked_loss  # no (B, T, vocab) logits in memory at once
    model.grad_checkpointing = s.grad_checkpointing
    params = [p for name, p in model.named_parameters() if adapters.is_adapter_parameter(name)]
    n_trainable, n_total = sum(p.numel() for p in params), weight_count(model)
    if s.shard_base:
        distributed.shard_base(model, params, device)
    share = 100 * n_trainable / n_total
    print(f"trainable parameters: {n_trainable:,} of {n_total:,} ({share:.3f}%)")
    print(f"adapter config: {json.dumps(adapters.describe(cfg))}")
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, fused=cuda)
    _, total_steps = schedule(s, len(examples))

    # rank 0 owns the folder; the others only read the checkpoint it decided to resume from
    out = runs.OutputDir(s.out_dir) if main_process else None
    try:
        state = folder_state(s.out_dir)
        if group:
            # rank 0 looked under its lock: its word holds
            state = distributed.gather(state, group)[0]
        # again, now under the lock: another run may have come and gone
        if check_rerun(s, state, announce=True, record=record):
            return
        step = 0
        if state == "unfinished":
            path = os.path.join(s.out_dir, "checkpoint.pt")
            step = resume(path, model, optimizer, s, group, record, total_steps)
            print(f"resumed from {path} at step {step} of {total_steps}")
        log = runs.JsonLines(os.path.join(s.out_dir, "log.jsonl")) if main_process else None
        if main_process:
            # the log holds each step once: the steps a resumed run redoes are dropped (and
            # anything unreadable)
            records, _ = log.read(lambda r: isinstance(r, dict) and isinstance(r.get("step"), int))
            log.rewrite([r for r in records if r["step"] <= step])
            runs.write_json(out / "settings.json", {
                "settings": asdict(s), "adapter": adapters.describe(cfg),
                "trainable_parameters": n_trainable, "total_steps": total_steps,
                "world_size": group.world_size if group else 1, "data": record})
        try:
            step = train_loop(s, group, model, optimizer, examples, tokenizer.pad_id, log, step,
                              record)
        finally:
            if log:
                log.close()
        if main_process:
            # folders absolute, so the adapter evaluates from anywhere; the base's precision, so
            # eval.py and report.py load the base it was trained on
            is_folder = s.model not in PRESETS  # else model_config would have refused it
            info = {"model": os.path.abspath(s.model) if is_folder else s.model, "task": s.task,
                    "method": s.method,
                    "checkpoint_dir": os.path.abspath(s.checkpoint_dir) if s.checkpoint_dir else "",
                    "dtype": s.dtype, "quantize": s.quantize or None,
                    "steps": step, "trainable_parameters": n_trainable}
            try:
                adapters.save_adapter(out / "adapter.pt", model, cfg, info)
            except KeyboardInterrupt as e:
                raise runs.interrupted(e, f"while writing adapter.pt; checkpoint.pt holds all "
                                          f"{step} steps: run again with --resume to write it") \
                    from None
    finally:
        if out:
            out.close()
    adapter = os.path.join(s.out_dir, "adapter.pt")
    print(f"wrote {adapter}: evaluate with python eval.py --adapter {adapter}")


def weight_count(model):
    """The model's weights by element count; a quantized weight, a buffer of packed codes, counts
    its out x in values, so that the trainable share is the same whether the base is quantized."""
    quantized = sum(m.out_features * m.in_features for m in model.modules()
                    if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + quantized


def train_loop(s, group, model, optimizer, examples, pad_id, log, step, data):
    """Optimizer steps from `step` to the end; checkpoint.pt every save_every steps and at the
    end."""
    steps_per_epoch, total_steps = schedule(s, len(examples))
    params = optimizer.param_groups[0]["params"]
    main_process = group is None or group.main
    checkpoint_path = os.path.join(s.out_dir, "checkpoint.pt")
    # dynamic: one graph for every batch (each as long as its longest item), compiled once
    runner = torch.compile(model, dynamic=True) if s.compile else model
    model.train()
    saved = step or None  # the step of the last good checkpoint
    bar = tqdm(total=total_steps, initial=step, desc=f"{s.model} {s.task} {s.method}",
               dynamic_ncols=True, disable=not main_process)

    def stop(signum, during):
        """A clean stop (SIGTERM, SIGHUP): the last finished step saved, unless it is already."""
        nonlocal saved
        if main_process and step and saved != step and not checkpoint_problem(model, optimizer):
            save_checkpoint(checkpoint_path, step, model, optimizer, s, group, data)
            saved = step
        kept = (f"checkpoint at step {saved} ({checkpoint_path}): continue with --resume" if saved
                else "nothing was saved yet: run the same command again to start over")
        return runs.Stopped(signum, f"stopped by {signal.Signals(signum).name} during step "
                                    f"{during}; {kept}")

    # SIGTERM and SIGHUP are taken between micro-batches (the step is abandoned: the adapters are
    # still the last step's) and after a step, its checkpoint written
    runs.defer_stops()
    try:
        while step < total_steps:
            t0 = time.time()
            lr = get_lr(step, s, total_steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            batches = step_batches(examples, s, step, steps_per_epoch)
            loss, tokens = backward_step(s, group, runner, params, examples, batches, pad_id,
                                         step, stop)
            if not math.isfinite(loss):
                raise RunError(f"loss is {loss} at step {step + 1}: lower --lr or check the "
                               f"data; {last_save(checkpoint_path, saved)}")
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "loss": round(loss, 5), "lr": lr,
                      "tokens_per_s": round(tokens / (time.time() - t0), 1)}
            if s.gate_log_every and (step % s.gate_log_every == 0 or step == total_steps):
                record |= gate_record(model, examples, batches[0], pad_id, runs_on(s, group))
            if main_process:
                log.append([record])
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{record['tokens_per_s']:,.0f}",
                            mem=f"{memory_gb(runs_on(s, group)):.1f}GB")
            bar.update()
            if step % s.save_every == 0 or step == total_steps:
                # every process holds the same adapter, so all of them stop here, or none
                check_good(model, optimizer, step, checkpoint_path, saved)
                if main_process:
                    save_checkpoint(checkpoint_path, step, model, optimizer, s, group, data)
                saved = step
            if signum := runs.pending_stop():
                raise stop(signum, during=step)
    except KeyboardInterrupt as e:  # torchrun's stop says why, Ctrl-C nothing, a clean stop all
        raise runs.interrupted(e, f"during step {step + 1}; {last_save(checkpoint_path, saved)}") \
            from None
    except distributed.PeerLost as e:
        raise RunError(f"{e} during step {step + 1}; {last_save(checkpoint_path, saved)}") from None
    finally:
        runs.defer_stops(False)
        bar.close()
    return step


def runs_on(s, group):
    """The device this process trains on."""
    return group.device if group else s.device


def backward_step(s, group, runner, params, examples, batches, pad_id, step, stop):
    """The gradients of one optimizer step, its micro-batches summed: (mean loss, tokens).

    With several processes each takes every world_size-th micro-batch; the loss is the mean over
    all micro-batches of the step in any case, so the summed gradients are the single process's.
    """
    device = runs_on(s, group)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else contextlib.nullcontext())
    loss_sum, tokens = torch.zeros((), device=device), 0
    mine = range(group.rank, len(batches), group.world_size) if group else range(len(batches))
    for index in mine:
        if signum := runs.pending_stop():
            raise stop(signum, during=step + 1)
        torch.manual_seed(micro_batch_seed(s, step, index))  # this micro-batch's dropout masks
        idx, labels, mask = collate([examples[i] for i in batches[index]], pad_id)
        tokens += int(mask.sum())  # counted on the CPU tensor: no device sync
        idx, labels, mask = (t.to(device, non_blocking=True) for t in (idx, labels, mask))
        with autocast:
            # position t predicts token t + 1; -100 marks padding (and a masked prompt). collate
            # pads on the right, so attention needs no mask: only the gates read it
            loss = runner(idx, attention_mask=mask, labels=labels, right_padded=True)
        (loss / len(batches)).backward()
        loss_sum += loss.detach() / len(batches)
    if group:
        distributed.sum_gradients(params)
        totals = torch.stack([loss_sum, torch.tensor(float(tokens), device=device)])
        distributed.sum_across([totals])
        loss_sum, tokens = totals[0], int(totals[1])
    return loss_sum.item(), tokens


def gate_record(model, examples, batch, pad_id, device):
    """A few gate statistics for the log, from one micro-batch run again without gradients:
    about 1 / (3 x grad_accum x gate_log_every) of the compute."""
    idx, _, mask = collate([examples[i] for i in batch], pad_id)
    summary = gates.summary(model, idx.to(device), mask.to(device))
    return {"gates": summary} if summary else {}


def check_good(model, optimizer, step, checkpoint_path, saved):
    """Refuse to call a diverged step good: no checkpoint holds a non-finite or runaway number."""
    if problem := checkpoint_problem(model, optimizer):
        advice = "run again with a lower --lr" if saved is None else \
            f"{last_save(checkpoint_path, saved)}, or lower --lr in a new --out_dir"
        raise RunError(f"not saving step {step}: {problem} (the run diverged): {advice}")


def last_save(path, saved):
    if saved is None:
        return "nothing was saved yet: run the same command again to start over"
    return f"the last good save is step {saved} ({path}): continue with --resume"


def checkpoint_problem(model, optimizer):
    """Why the adapter and optimizer state cannot be a good save (runs.bad_numbers), or None."""
    return (runs.bad_numbers(adapters.adapter_state_dict(model), runs.ADAPTER_BOUND)
            or runs.bad_numbers(optimizer.state_dict()["state"]))


def save_checkpoint(path, step, model, optimizer, settings, group, data):
    # no RNG state: data order and dropout are seeded per epoch and per micro-batch
    state = {"step": step, "settings": asdict(settings),
             "world_size": group.world_size if group else 1, "data": data,
             "adapter": adapters.adapter_state_dict(model), "optimizer": optimizer.state_dict()}
    runs.save_torch(path, state)  # atomic: a crash or a full disk leaves the last one intact


def resume(path, model, optimizer, s, group, record, total_steps):
    state = runs.load_torch(path, "delete it to start the run over, or choose another --out_dir")
    params = [p for name, p in model.named_parameters() if adapters.is_adapter_parameter(name)]
    tensors = adapters.adapter_state_dict(model)
    check_checkpoint(path, state, s, record, tensors, params, total_steps)
    world_size = group.world_size if group else 1
    if state["world_size"] != world_size:
        saved = state["world_size"]
        raise RunError(f"{path} was written by a run of {saved} process(es), this one has "
                       f"{world_size}: resume it with the same number (torchrun --nproc_per_node "
                       f"{saved}, or python train.py for 1)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if problem := checkpoint_problem(model, optimizer):  # written by hand, or by an older version
        raise RunError(f"{path}: {problem}: it cannot be resumed; delete it to start the run over")
    return state["step"]


def is_whole(value):
    return type(value) is int  # not a bool, not a float such as 2.0


def check_checkpoint(path, state, s, record, tensors, params, total_steps):
    """Refuse a checkpoint.pt that is not one this run could have written, naming what is wrong,
    before any of it is used: its settings and data, its step, the adapter's tensors and AdamW's
    state."""
    def refuse(found):
        raise RunError(f"{path} does not hold a checkpoint of this run: {found}; delete it to "
                       "start the run over, or choose another --out_dir")
    if not isinstance(state, dict):
        refuse(f"it holds a {type(state).__name__}, not a dict")
    missing = sorted({"step", "settings", "world_size", "adapter", "optimizer"} - state.keys())
    if missing:
        refuse(f"it lacks {', '.join(missing)}")
    world_size = state["world_size"]
    if not isinstance(state["settings"], dict) or not is_whole(world_size) or world_size < 1:
        refuse("its settings are no dict or its world_size no whole number above 0")
    # settings before the step: another --max_steps is named as such
    check_same_settings(state["settings"], s, path)
    check_same_data(state.get("data"), record, path)
    step = state["step"]
    if not is_whole(step) or not 1 <= step <= total_steps:
        refuse(f"its step is {step!r}, expected a whole number from 1 to the run's "
               f"{total_steps} steps")
    saved = state["adapter"]
    if not isinstance(saved, dict):
        refuse(f"its adapter is a {type(saved).__name__}, not a dict of tensors")
    if saved.keys() != tensors.keys():
        name = sorted(saved.keys() ^ tensors.keys(), key=str)[0]
        where = "model" if name in tensors else "checkpoint"
        refuse(f"the adapter tensor {name} is in the {where} only")
    for name, tensor in saved.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != tensors[name].dtype \
                or tensor.shape != tensors[name].shape:
            found = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                     else type(tensor).__name__)
            refuse(f"the adapter tensor {name} is {found}, the model's is {tensors[name].dtype} "
                   f"{tuple(tensors[name].shape)}")
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    moments = optimizer.get("state") if isinstance(optimizer, dict) else None
    indices = list(range(len(params)))  # AdamW numbers its tensors in the order it was given them
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(moments, dict) \
            or not isinstance(groups[0], dict) or groups[0].get("params") != indices:
        refuse(f"its optimizer state is not AdamW's for the {len(params)} adapter tensors")
    for index, moment in moments.items():
        shape = params[index].shape if is_whole(index) and 0 <= index < len(params) else None
        if shape is None or not isinstance(moment, dict) or not all(
                isinstance(moment.get(key), torch.Tensor) and moment[key].shape == shape
                for key in ("exp_avg", "exp_avg_sq")):
            refuse(f"its optimizer state of tensor {index!r} does not fit the adapter tensor it "
                   "belongs to")
        taken = moment.get("step")
        if not isinstance(taken, torch.Tensor) or taken.numel() != 1 or float(taken) != step:
            taken = float(taken) if isinstance(taken, torch.Tensor) else taken
            refuse(f"its optimizer has taken {taken} steps, its step says {step}")


def main(argv=None):
    return runs.run_command(lambda argv: train(parse_settings(argv)), argv,
                            errors=(CheckpointError, DataError, *adapters.ERRORS, NotEnoughMemory))


if __name__ == "__main__":
    main()
