"""Fine-tune a LLaMA / GPT-J with InterLoRA (or a LoRA baseline) on the paper's math or commonsense task.

    python train.py --model llama-7b --task math                      # the paper's InterLoRA run
    python train.py --model llama-7b --task math --method lora        # the LoRA baseline (r = 10)
    python train.py --model tiny --task math --max_steps 20           # random tiny model, any machine

Writes into --out_dir: settings.json, log.jsonl (one line per optimizer step), checkpoint.pt
(adapters + optimizer + RNG, every --save_every steps, for --resume) and, at the end,
adapter.pt (the adapter file eval.py reads).
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import interlora
from data import (DataError, collate, load_task, make_output_dir, settings_from_command_line, tokenize_item,
                  tokenizer_for, write_json, write_text)
from interlora import AdapterError, InterLoRAConfig
from model import CheckpointError, ModelConfig, load_model


@dataclass
class TrainSettings:
    model: str = field(default="llama-7b", metadata={"help": "model preset: llama-7b, llama-13b, gptj-6b, tiny, tiny-gptj"})
    task: str = field(default="math", metadata={"help": "math or commonsense"})
    method: str = field(default="interlora", metadata={"help": "interlora, lora, or an ablation: "
                                                       + ", ".join(list(interlora.VARIANTS)[2:])})
    checkpoint_dir: str = field(default="", metadata={"help": "folder of the base weights (default checkpoints/<model>)"})
    data_dir: str = field(default="data", metadata={"help": "LLM-Adapters data (python data.py download)"})
    out_dir: str = field(default="", metadata={"help": "output folder (default out/<model>-<task>-<method>)"})
    r: int = field(default=0, metadata={"help": "LoRA rank (default 0: the method's, 4 for interlora, 10 for lora)"})
    alpha: float = field(default=0.0, metadata={"help": "LoRA alpha, lambda = alpha / r (default 0: 2r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    gate_pool: str = field(default="mean", metadata={"help": "head-gate pooling: mean (paper) or causal"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    epochs: int = field(default=3, metadata={"help": "passes over the training set"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step (batch 16 = 4 x 4)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps, then linear decay to 0"})
    cutoff_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    mask_prompt: bool = field(default=False, metadata={"help": "no loss on the prompt (default: loss on prompt and response)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    seed: int = field(default=42, metadata={"help": "seed of adapter init, data order and dropout"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (default 0: the epochs decide)"})
    save_every: int = field(default=100, metadata={"help": "save checkpoint.pt every N optimizer steps"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/checkpoint.pt"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward (less memory)"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "compile", "grad_checkpointing", "checkpoint_dir", "data_dir", "device"}


class RunStopped(RuntimeError):
    """A run that stopped early (non-finite loss, interruption); the last checkpoint stays."""


def parse_settings(argv=None):
    parser, s = settings_from_command_line(TrainSettings, __doc__.split("\n\n")[0], argv)
    if s.method not in interlora.VARIANTS:
        parser.error(f"unknown --method {s.method!r}: choose one of {', '.join(interlora.VARIANTS)}")
    s.checkpoint_dir = s.checkpoint_dir or os.path.join("checkpoints", s.model)
    s.out_dir = s.out_dir or os.path.join("out", f"{s.model}-{s.task}-{s.method}")
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return s


def get_lr(step, settings, total_steps):
    """Linear warmup to lr, then linear decay to 0 at total_steps (the schedule of LLM-Adapters' Trainer)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    return settings.lr * max(0.0, (total_steps - step) / max(1, total_steps - settings.warmup_steps))


def step_batches(examples, settings, step, steps_per_epoch):
    """The micro-batches of optimizer step `step`: a seeded shuffle per epoch, so a resumed run sees the same order."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(settings.seed + epoch)).tolist()
    per_step = settings.micro_batch_size * settings.grad_accum
    chosen = order[position * per_step:(position + 1) * per_step]
    return [chosen[i:i + settings.micro_batch_size] for i in range(0, len(chosen), settings.micro_batch_size)]


def save_checkpoint(path, step, model, optimizer, settings):
    state = {"step": step, "settings": asdict(settings), "adapter": interlora.adapter_state_dict(model),
             "optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # peak resident memory of this process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(s):
    print(json.dumps(asdict(s), indent=2))
    # names, data and output folder first: a mistake should fail before minutes of loading weights
    ModelConfig.from_name(s.model)
    cfg = InterLoRAConfig(**interlora.VARIANTS[s.method], r=s.r, alpha=s.alpha, dropout=s.dropout,
                          gate_pool=s.gate_pool)
    task = load_task(s.task, s.data_dir, datasets=[])
    out = make_output_dir(s.out_dir)
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    has_run = os.path.exists(checkpoint_path) or os.path.exists(os.path.join(out, "adapter.pt"))
    if has_run and not s.resume:
        raise DataError(f"{out} already holds a run: pass --resume to continue it or choose another --out_dir")
    torch.manual_seed(s.seed)
    cuda = s.device == "cuda"
    model = load_model(s.model, s.checkpoint_dir, device=s.device, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = tokenizer_for(s.model, s.checkpoint_dir)
    examples = [tokenize_item(tokenizer, item, s.cutoff_len, train_on_inputs=not s.mask_prompt) for item in task.train]

    interlora.add_interlora(model, cfg)
    model.grad_checkpointing = s.grad_checkpointing
    params = [p for name, p in model.named_parameters() if interlora.is_adapter_parameter(name)]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%)")
    print(f"adapter config: {asdict(cfg)}")
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, fused=cuda)

    steps_per_epoch = math.ceil(len(examples) / (s.micro_batch_size * s.grad_accum))
    total_steps = s.max_steps or s.epochs * steps_per_epoch
    step = 0
    if s.resume and os.path.exists(checkpoint_path):
        step = resume(checkpoint_path, model, optimizer, s)
        print(f"resumed from {checkpoint_path} at step {step}")
        keep_log_until(os.path.join(out, "log.jsonl"), step)
    write_json(os.path.join(out, "settings.json"), {"settings": asdict(s), "adapter": asdict(cfg),
                                                    "trainable_parameters": n_trainable, "total_steps": total_steps})

    runner = torch.compile(model) if s.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    model.train()
    log = open(os.path.join(out, "log.jsonl"), "a")
    bar = tqdm(total=total_steps, initial=step, desc=f"{s.model} {s.task} {s.method}", dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.time()
            lr = get_lr(step, s, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = step_batches(examples, s, step, steps_per_epoch)
            loss_sum, tokens = torch.zeros((), device=s.device), 0
            for batch in batches:
                idx, labels, mask = collate([examples[i] for i in batch], tokenizer.pad_id)
                tokens += int(mask.sum())  # counted on the CPU tensor: no device sync
                idx, labels, mask = (t.to(s.device, non_blocking=True) for t in (idx, labels, mask))
                with autocast:
                    logits = runner(idx, attention_mask=mask)
                # next-token loss: position t predicts token t + 1; -100 marks padding (and a masked prompt)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
                (loss / len(batches)).backward()
                loss_sum += loss.detach() / len(batches)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise RunStopped(f"loss is {loss_value} at step {step + 1}: lower --lr or check the data; "
                                 f"{last_save(checkpoint_path)}")
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_per_s = tokens / (time.time() - t0)
            log.write(json.dumps({"step": step, "loss": round(loss_value, 5), "lr": lr,
                                  "tokens_per_s": round(tokens_per_s, 1)}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            mem=f"{memory_gb(s.device):.1f}GB")
            bar.update()
            if step % s.save_every == 0 or step == total_steps:
                save_checkpoint(checkpoint_path, step, model, optimizer, s)
    except KeyboardInterrupt:
        bar.close()
        raise RunStopped(f"interrupted after step {step}: continue with --resume; {last_save(checkpoint_path)}") from None
    finally:
        bar.close()
        log.close()

    info = {"model": s.model, "task": s.task, "method": s.method, "checkpoint_dir": s.checkpoint_dir,
            "steps": step, "trainable_parameters": n_trainable}
    interlora.save_adapter(os.path.join(out, "adapter.pt"), model, cfg, info)
    print(f"wrote {os.path.join(out, 'adapter.pt')}: evaluate with python eval.py --adapter "
          f"{os.path.join(out, 'adapter.pt')}")


def last_save(path):
    if not os.path.exists(path):
        return "nothing was saved yet"
    return f"the last good save ({torch.load(path, weights_only=True)['step']} steps) is {path}"


def resume(path, model, optimizer, s):
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = {k for k, v in state["settings"].items() if getattr(s, k, None) != v} - RESUMABLE_CHANGES
    if changed:
        raise DataError(f"{path} was saved with other settings ({', '.join(sorted(changed))}): resume with the "
                        "same settings or start a new --out_dir")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def keep_log_until(path, step):
    """Drop log lines of steps after `step`, which the resumed run redoes (and a line cut short by a crash)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except ValueError:
                break
        write_text(path, "".join(kept))


def main(argv=None):
    settings = parse_settings(argv)
    try:
        train(settings)
    except (CheckpointError, DataError, AdapterError, RunStopped) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
