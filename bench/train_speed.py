"""Training speed: tokens/s, MFU and peak memory of one fine-tuning step, ours against transformers + PEFT.

    python bench/train_speed.py --model llama-7b --json out/bench/train_llama-7b.json     # on a GPU
    python bench/train_speed.py --model gptj-6b --json out/bench/train_gptj-6b.json
    python bench/train_speed.py --model llama-7b --compile --skip_reference --batch_sizes 16
    python bench/train_speed.py                      # CPU: tiny and tiny-gptj, a smoke run, no timing claims

Each model is built directly on the device with random bf16 weights (its own init, never zeros;
no checkpoint is needed), one model on the device at a time. Rows, for each micro-batch:

    ours     InterLoRA r=4 on q, v, down with its gates   eager, and compiled with --compile
    hf+peft  LoRA r=4 on q, v, down (no gates)            the closest reference for InterLoRA
    ours     LoRA r=10 on q, v                            eager, and compiled with --compile
    hf+peft  LoRA r=10 on q, v                            the paper's LoRA baseline, same ranks

(GPT-J: fc_out is its down projection.) The reference is transformers' LlamaForCausalLM /
GPTJForCausalLM in bf16 with sdpa attention (eager where transformers has no sdpa for the
model: GPT-J) plus PEFT's LoRA (lora_alpha = 2r, dropout 0.05).

One step is what train.py does per micro-batch, on random tokens (B, seq_len): forward under
torch.autocast(bf16) with an all-ones attention_mask (train.py always passes one; see
--attention_mask), next-token cross-entropy in fp32, backward, gradient clipping and a fused
AdamW step on the fp32 adapter parameters; the bf16 base is frozen. Steps are timed with
CUDA events after --warmup steps (which include compilation); the per-step median is used.
tokens/s = B * seq_len / median step time.

Model FLOPs per step, with tokens = B * T (T = seq_len) and N = the weights of the frozen
linear layers every token passes through (q, k, v, o, the FFN matrices and lm_head; not the
embedding table, which is a lookup):

    4 * N * tokens                        forward 2NT + input gradients 2NT; frozen weights need
                                          no weight gradients (the usual 6NT counts them)
  + 3 * 4 * B * T^2 * dim * n_layer       attention scores QK^T and values AV, 2*B*T^2*dim each
                                          forward, backward twice that; the full T x T square
                                          is counted (as in PaLM's MFU), not the causal half
  + 6 * N_adapter * tokens                the adapters, trained in full (tiny)

MFU = FLOPs per step / step time / peak, against two peaks printed with the table: the
datasheet dense bf16 rate (--peak_tflops, H100 SXM 989.5 TFLOP/s by default) and the rate of
an 8192^3 bf16 matmul measured in the same run. Peak memory is torch.cuda.max_memory_allocated
over the row (weights, activations, gradients and optimizer state).
"""
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/train_speed.py
import interlora  # noqa: E402
from interlora import InterLoRAConfig  # noqa: E402
from runs import RunError, settings_from_command_line  # noqa: E402
from bench.common import (default_dtype, device_description, error_text, fmt, free_memory, hf_config,  # noqa: E402
                          peak_memory_gb, synchronize, versions)
from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class Settings:
    model: str = field(default="", metadata={"help": "comma-separated presets (default: llama-7b,gptj-6b on "
                                                      "CUDA, tiny,tiny-gptj on CPU)"})
    batch_sizes: str = field(default="", metadata={"help": "comma-separated micro-batch sizes (default: 4,16 "
                                                            "on CUDA, 2 on CPU)"})
    seq_len: int = field(default=0, metadata={"help": "tokens per sequence (default: 256 on CUDA, 64 on CPU)"})
    steps: int = field(default=0, metadata={"help": "timed steps per row (default: 10 on CUDA, 2 on CPU)"})
    warmup: int = field(default=0, metadata={"help": "untimed steps first, compilation included (default: 3 "
                                                      "on CUDA, 1 on CPU)"})
    compile: bool = field(default=False, metadata={"help": "add rows for ours under torch.compile"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward (both stacks)"})
    attention_mask: str = field(default="ones", metadata={"help": "ones: an all-ones mask as train.py passes; "
                                                                   "none: no mask (plain causal attention)"})
    skip_reference: bool = field(default=False, metadata={"help": "leave out the transformers + PEFT rows"})
    peak_tflops: float = field(default=989.5, metadata={"help": "datasheet dense bf16 peak for MFU (H100 SXM: "
                                                                 "989.5 TFLOP/s); not used on CPU"})
    json: str = field(default="", metadata={"help": "write settings, ceilings and all rows to this file"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


def parse_settings(argv=None):
    s = settings_from_command_line(Settings, __doc__.split("\n\n")[0], argv)
    if s.attention_mask not in ("ones", "none"):
        raise RunError(f"--attention_mask {s.attention_mask!r}: expected ones or none")
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = s.device == "cuda"
    s.model = s.model or ("llama-7b,gptj-6b" if cuda else "tiny,tiny-gptj")
    s.batch_sizes = s.batch_sizes or ("4,16" if cuda else "2")
    s.seq_len = s.seq_len or (256 if cuda else 64)
    s.steps = s.steps or (10 if cuda else 2)
    s.warmup = s.warmup or (3 if cuda else 1)
    return s


# The two adapter set-ups of the paper, and the PEFT LoRA on the same modules for each.
# name: (our config, PEFT rank, PEFT target modules by family, what the reference row is)
METHODS = {
    "interlora": (InterLoRAConfig(), 4,
                  {"llama": ["q_proj", "v_proj", "down_proj"], "gptj": ["q_proj", "v_proj", "fc_out"]}),
    "lora": (InterLoRAConfig(method="lora", r=10), 10,
             {"llama": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"]}),
}
DESCRIPTIONS = {("ours", "interlora"): "InterLoRA r=4 q,v,down + gates",
                ("hf+peft", "interlora"): "LoRA r=4 q,v,down (no gates)",
                ("ours", "lora"): "LoRA r=10 q,v",
                ("hf+peft", "lora"): "LoRA r=10 q,v"}


# ----------------------------------------------------------------------------- FLOPs

def matmul_params(config):
    """Weights of the linear layers every token passes through: attention, FFN and lm_head (not the embedding)."""
    kv_dim = config.n_kv_heads * config.head_dim
    attention = 2 * config.dim * config.dim + 2 * config.dim * kv_dim  # wq, wo; wk, wv
    ffn = (3 if config.family == "llama" else 2) * config.dim * config.ffn_dim  # w1, w2 (and w3 for LLaMA)
    return config.n_layer * (attention + ffn) + config.dim * config.vocab_size


def train_step_flops(config, adapter_params, batch, seq_len):
    """Model FLOPs of one training step with a frozen base (the formula of the module docstring)."""
    tokens = batch * seq_len
    frozen = 4 * matmul_params(config) * tokens  # forward + input gradients; no weight gradients
    attention = 3 * 4 * batch * seq_len ** 2 * config.dim * config.n_layer  # full T x T, forward + backward
    adapters = 6 * adapter_params * tokens
    return frozen + attention + adapters


# ----------------------------------------------------------------------------- timing

def median_seconds(fn, warmup, repeats, device):
    """(median, all times) of fn() in seconds over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            # events are recorded on the stream, so they time the device work, not the launches
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure_matmul_tflops(device):
    """The achieved rate of one large matmul on random data: 8192^3 in bf16 on a GPU (512^3 fp32 on CPU)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = median_seconds(lambda: a @ b, warmup=3, repeats=20, device=device)
    return 2 * n ** 3 / seconds / 1e12, f"{n}^3 {str(dtype).removeprefix('torch.')} matmul"


# ----------------------------------------------------------------------------- the two stacks

def build_ours(name, method, device, dtype):
    """Our model with random weights made on the device (from its own init), adapters added."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = Transformer(ModelConfig.from_name(name))
    interlora.add_interlora(model, METHODS[method][0])  # freezes the base; adapters are fp32
    return model


def build_reference(name, method, device, dtype):
    """transformers' model of the same shape with random weights made on the device, plus PEFT LoRA.

    Returns (model, attention implementation): sdpa where transformers has it for the model,
    else eager (GPT-J)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTJForCausalLM, LlamaForCausalLM
    config = ModelConfig.from_name(name)
    model_class = LlamaForCausalLM if config.family == "llama" else GPTJForCausalLM
    attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation=attention, dtype=dtype)
    model.to(device)  # a no-op where transformers honours the device context, as 5.x does
    _, r, targets = METHODS[method]
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets[config.family],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora), attention  # PEFT keeps the adapters in fp32 next to a bf16 base


# ----------------------------------------------------------------------------- one row

def time_training(forward, model, s, batch):
    """Time train.py's step (autocast forward, fp32 loss, backward, clip, fused AdamW) on random tokens."""
    cuda = s.device == "cuda"
    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda)
    # a few different random batches in turn (ids from 3: no special tokens); never zeros
    batches = [torch.randint(3, vocab, (batch, s.seq_len), device=s.device) for _ in range(4)]
    mask = torch.ones(batch, s.seq_len, dtype=torch.bool, device=s.device) if s.attention_mask == "ones" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    losses, calls = [], [0]

    def step():
        idx = batches[calls[0] % len(batches)]
        calls[0] += 1
        with autocast:
            logits = forward(idx, mask)  # (B, T, vocab)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    model.train()
    t0 = time.perf_counter()
    step()  # the first step compiles (with --compile) and allocates the optimizer state
    synchronize(s.device)
    first_step_s = time.perf_counter() - t0
    seconds, times = median_seconds(step, s.warmup - 1, s.steps, s.device)
    last_loss = losses[-1].item()
    if not math.isfinite(last_loss):
        raise RuntimeError(f"the loss is {last_loss}: the timed steps computed garbage")
    return {"step_ms": 1e3 * seconds, "step_ms_all": [round(1e3 * t, 3) for t in times],
            "tokens_per_s": batch * s.seq_len / seconds, "first_step_s": first_step_s, "loss": last_loss}


def make_forward(model, implementation, mode, grad_checkpointing):
    """forward(idx, mask) -> logits (B, T, vocab) for our model (compiled or not) or the PEFT model."""
    if implementation == "ours":
        model.grad_checkpointing = grad_checkpointing
        # dynamic=False: one static graph per batch size, as a fixed-shape training run would have
        runner = torch.compile(model, dynamic=False) if mode == "compiled" else model
        return lambda idx, mask: runner(idx, attention_mask=mask)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lambda idx, mask: model(input_ids=idx, attention_mask=mask).logits


def run_rows(s, name, implementation, method, mode, batch_sizes, build):
    """Build one model, time it at each batch size; failures (OOM, compilation) become rows, not crashes."""
    config = ModelConfig.from_name(name)
    base = {"model": name, "implementation": implementation, "method": method, "mode": mode,
            "adapters": DESCRIPTIONS[(implementation, method)], "seq_len": s.seq_len}
    model = forward = failure = None
    try:
        model, attention = build()
        adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        forward = make_forward(model, implementation, mode, s.grad_checkpointing)
    except Exception as e:  # reported in the table; the other rows still run
        traceback.print_exc()
        failure = f"failed to build: {error_text(e)}"
    if failure:  # freed here, once the except block has let go of the failed frames
        del model, forward
        free_memory(s.device)
        return [base | {"batch": b, "status": failure} for b in batch_sizes]
    rows = []
    for batch in batch_sizes:
        row = base | {"batch": batch, "attention": attention, "adapter_params": adapter_params,
                      "flops_per_step": train_step_flops(config, adapter_params, batch, s.seq_len)}
        if s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the peak of this row: weights stay, the rest is new
        try:
            row |= time_training(forward, model, s, batch) | {"status": "ok"}
            row["peak_memory_gb"] = peak_memory_gb(s.device)
        except Exception as e:  # an out-of-memory or compilation failure is one failed row
            traceback.print_exc()
            row["status"] = f"failed: {error_text(e)}"
        rows.append(row)
        model.zero_grad(set_to_none=True)
        gc.collect()
        if s.device == "cuda":
            torch.cuda.empty_cache()
    del model, forward  # the closure holds the only other reference (and the compiled graph)
    free_memory(s.device)
    return rows


# ----------------------------------------------------------------------------- table

def add_ratios_and_mfu(rows, peak_tflops, matmul_tflops):
    reference = {(r["model"], r["method"], r["batch"]): r["tokens_per_s"]
                 for r in rows if r["implementation"] == "hf+peft" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        ref = reference.get((r["model"], r["method"], r["batch"]))
        r["vs_hf_peft"] = r["tokens_per_s"] / ref if ref else None
        achieved = r["flops_per_step"] / (r["step_ms"] / 1e3) / 1e12  # TFLOP/s
        r["model_tflops"] = achieved
        r["mfu_datasheet"] = achieved / peak_tflops if peak_tflops else None
        r["mfu_measured"] = achieved / matmul_tflops


def markdown_table(rows, peak_tflops, matmul_tflops):
    peak_name = f"MFU vs {peak_tflops:g} datasheet" if peak_tflops else "MFU vs datasheet"
    header = ["model", "implementation", "adapters", "mode", "attention", "batch", "tokens/s", "vs hf+peft",
              "step ms", peak_name, f"MFU vs {matmul_tflops:.3g} measured", "peak mem GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["model"], r["implementation"], r["adapters"], r["mode"], r.get("attention", "-"),
                     str(r["batch"]), r["status"]] + ["-"] * 5
        else:
            cells = [r["model"], r["implementation"], r["adapters"], r["mode"], r["attention"], str(r["batch"]),
                     f"{r['tokens_per_s']:,.0f}", fmt(r["vs_hf_peft"], ".2f"), f"{r['step_ms']:.1f}",
                     fmt(r["mfu_datasheet"], ".1%"), f"{r['mfu_measured']:.1%}", fmt(r["peak_memory_gb"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    s = parse_settings(argv)
    print(json.dumps(asdict(s), indent=2))
    cuda = s.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as train.py: bf16 base on a GPU, fp32 on CPU
    names = [n.strip() for n in s.model.split(",") if n.strip()]
    batch_sizes = [int(b) for b in s.batch_sizes.split(",")]
    for name in names:
        ModelConfig.from_name(name)  # an unknown name fails here, before minutes of work

    matmul_tflops, matmul_what = measure_matmul_tflops(s.device)
    peak_tflops = s.peak_tflops if cuda else None
    print(f"measured {matmul_what}: {matmul_tflops:.1f} TFLOP/s")

    rows = []
    for name in names:
        for method in METHODS:
            rows += run_rows(s, name, "ours", method, "eager", batch_sizes,
                             lambda: (build_ours(name, method, s.device, dtype), "sdpa"))
            if s.compile:
                rows += run_rows(s, name, "ours", method, "compiled", batch_sizes,
                                 lambda: (build_ours(name, method, s.device, dtype), "sdpa"))
            if not s.skip_reference:
                rows += run_rows(s, name, "hf+peft", method, "eager", batch_sizes,
                                 lambda: build_reference(name, method, s.device, dtype))
    add_ratios_and_mfu(rows, peak_tflops, matmul_tflops)

    environment = {"device": device_description(s.device), **versions(), "dtype": str(dtype),
                   "peak_tflops_datasheet": peak_tflops, "matmul_tflops_measured": matmul_tflops,
                   "matmul_measured_with": matmul_what}
    table = markdown_table(rows, peak_tflops, matmul_tflops)
    print()
    print(f"training step: {environment['device']}, " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"seq_len {s.seq_len}, {s.steps} timed steps (median) after {s.warmup} warm-up, attention_mask "
          f"{s.attention_mask}, grad_checkpointing {s.grad_checkpointing}, "
          f"{'bf16 autocast' if cuda else 'fp32 on CPU: a smoke run, not a speed claim'}")
    print(f"MFU peaks: datasheet {fmt(peak_tflops, 'g')} TFLOP/s dense bf16 (--peak_tflops; H100 SXM 989.5), "
          f"measured {matmul_what} {matmul_tflops:.1f} TFLOP/s")
    print(table)
    if s.json:
        os.makedirs(os.path.dirname(os.path.abspath(s.json)), exist_ok=True)
        with open(s.json, "w") as f:
            json.dump({"settings": asdict(s), "environment": environment, "rows": rows}, f, indent=2)
        print(f"wrote {s.json}")
    return {"settings": asdict(s), "environment": environment, "rows": rows, "table": table}


if __name__ == "__main__":
    main()
