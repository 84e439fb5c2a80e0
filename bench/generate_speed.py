"""Generation speed: decode tokens/s of ours (eager and compiled) against transformers' generate + PEFT,
the batch-1 figure against the memory roofline, and the wall time of the real evaluation workload.

    python bench/generate_speed.py --model llama-7b --json out/bench/generate_llama-7b.json   # on a GPU
    python bench/generate_speed.py --model llama-7b --compile --skip_reference
    python bench/generate_speed.py --model llama-7b --skip_speed --eval_workload \\
        --data_dir data --tokenizer data/spm-tokenizer --json out/bench/eval_llama-7b.json
    python bench/generate_speed.py --eval_workload --data_dir ../shared/data/llm-adapters --limit 2   # CPU smoke run

Each model is built directly on the device with random bf16 weights (no checkpoint needed),
one model on the device at a time, in eval mode under bf16 autocast as eval.py runs it. Rows:

    ours     InterLoRA r=4 on q, v, down with its gates   Transformer.generate, eager
    ours     the same under model.compile() (--compile; default mode, dynamic shapes)
    hf+peft  LoRA r=4 on q, v, down (no gates)            transformers' generate with PEFT

Speed rows use random prompts of --prompt_len tokens (no padding) and greedy decoding that
never stops early (ours: eos_id=None; transformers: min_new_tokens = max_new_tokens; the
output lengths are checked). Prefill and decode are timed apart: generate with 1 new token
is the prefill (the prompt's forward pass and the first token), generate with 1 + new_tokens
adds new_tokens decode steps, so

    decode time      = time(1 + new_tokens) - time(1)          medians of --repeats runs each
    decode tokens/s  = batch * new_tokens / decode time

Memory roofline: each decode step must read every weight once (the bf16 base including
lm_head but not the embedding table, of which only the new tokens' rows are read, plus the
fp32 adapters) and the KV cache so far (2 * n_layer * batch * n_kv_heads * head_dim * context
values, on average context = prompt_len + (new_tokens + 1) / 2). The floor per step is those
bytes over the device's copy bandwidth, measured in the same run as a large device-to-device
copy (bytes read + bytes written over the time); "of roofline" = floor / measured step time.
The same floor serves the reference rows (its LoRA has as many weights, within 0.1%).

The evaluation workload (--eval_workload) is the math test split of LLM-Adapters (806 prompts,
data.load_task("math", data_dir) and data.generate_prompt) tokenized with --tokenizer (the
byte tokenizer for the tiny presets), generated through model.generate_batches, the code
path of eval.py: sorted by length, --eval_batch_size per batch, KV cache, --new_tokens each
(256 for math), stopping at the tokenizer's EOS. Random weights rarely emit EOS, so nearly
every prompt runs the full 256 tokens: a worst case for the real workload.
"""
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/generate_speed.py
import interlora  # noqa: E402
from data import ByteTokenizer, generate_prompt, load_task, load_tokenizer  # noqa: E402
from runs import settings_from_command_line  # noqa: E402
from interlora import InterLoRAConfig  # noqa: E402
from bench.common import (default_dtype, device_description, error_text, fmt, free_memory, hf_config,  # noqa: E402
                          peak_memory_gb, synchronize, versions)
from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class Settings:
    model: str = field(default="", metadata={"help": "comma-separated presets (default: llama-7b on CUDA, "
                                                      "tiny on CPU)"})
    batch_sizes: str = field(default="", metadata={"help": "comma-separated batch sizes (default: 1,64 on "
                                                            "CUDA, 1,4 on CPU)"})
    prompt_len: int = field(default=0, metadata={"help": "prompt tokens of the speed rows (default: 128 on "
                                                          "CUDA, 16 on CPU)"})
    new_tokens: int = field(default=0, metadata={"help": "decode steps timed, and the eval workload's new "
                                                          "tokens (default: 256 on CUDA, 8 on CPU)"})
    repeats: int = field(default=0, metadata={"help": "timed runs per measurement, median taken (default: 3 "
                                                       "on CUDA, 2 on CPU)"})
    compile: bool = field(default=False, metadata={"help": "add rows for ours under model.compile()"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode for --compile"})
    skip_reference: bool = field(default=False, metadata={"help": "leave out the transformers + PEFT rows"})
    skip_speed: bool = field(default=False, metadata={"help": "leave out the speed rows (only --eval_workload)"})
    eval_workload: bool = field(default=False, metadata={"help": "also time the math test split through "
                                                                  "generate_batches, as eval.py runs it"})
    data_dir: str = field(default="data", metadata={"help": "LLM-Adapters data for --eval_workload"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer folder for --eval_workload (tokenizer.model, "
                                                          "or vocab.json + merges.txt); tiny presets use bytes"})
    limit: int = field(default=0, metadata={"help": "eval workload: the first N prompts of each test set (0: all)"})
    eval_batch_size: int = field(default=64, metadata={"help": "eval workload: prompts per batch"})
    json: str = field(default="", metadata={"help": "write settings, ceilings and all rows to this file"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})


def parse_settings(argv=None):
    s = settings_from_command_line(Settings, __doc__.split("\n\n")[0], argv)
    s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = s.device == "cuda"
    s.model = s.model or ("llama-7b" if cuda else "tiny")
    s.batch_sizes = s.batch_sizes or ("1,64" if cuda else "1,4")
    s.prompt_len = s.prompt_len or (128 if cuda else 16)
    s.new_tokens = s.new_tokens or (256 if cuda else 8)
    s.repeats = s.repeats or (3 if cuda else 2)
    return s


ADAPTER = InterLoRAConfig()  # the paper's InterLoRA: r=4 on q, v, down with gates
REFERENCE_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gptj": ["q_proj", "v_proj", "fc_out"]}
DESCRIPTIONS = {"ours": "InterLoRA r=4 q,v,down + gates", "hf+peft": "LoRA r=4 q,v,down (no gates)"}


# ----------------------------------------------------------------------------- helpers

def wall_seconds(fn, device):
    """Host time of fn() with the device idle before and drained after (generate syncs inside anyway)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure_copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy (1 GiB on a GPU, 64 MiB on CPU)."""
    n_bytes = 2 ** 30 if device == "cuda" else 2 ** 26
    source = torch.randn(n_bytes // 4, device=device)  # random fp32, never zeros
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(20):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(wall_seconds(lambda: target.copy_(source), device))
    return 2 * n_bytes / statistics.median(times), f"{n_bytes / 2 ** 20:.0f} MiB fp32 copy"


def compiled_graphs():
    """Graphs torch.compile has made so far in this process (its own counter; None where torch lacks it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------- the two stacks

def build_ours(name, device, dtype):
    """Our model with random weights made on the device (from its own init), InterLoRA added, eval mode."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = Transformer(ModelConfig.from_name(name))
    interlora.add_interlora(model, ADAPTER)
    # B starts at zero, which would make the adapters no-ops: give them trained-like random values
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, interlora.InterLoRALinear):
                module.lora_B.weight.normal_(0.0, 0.02)
    return model.eval()


def build_reference(name, device, dtype):
    """transformers' model of the same shape, random weights made on the device, PEFT LoRA, eval mode.

    Returns (model, attention implementation): sdpa where transformers has it, else eager (GPT-J)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTJForCausalLM, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()  # generate's notes on unset generation flags would flood the table
    config = ModelConfig.from_name(name)
    model_class = LlamaForCausalLM if config.family == "llama" else GPTJForCausalLM
    attention = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation=attention, dtype=dtype)
    model.to(device)  # a no-op where transformers honours the device context, as 5.x does
    lora = LoraConfig(r=ADAPTER.r, lora_alpha=2 * ADAPTER.r, lora_dropout=0.05,
                      target_modules=REFERENCE_TARGETS[config.family], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random B as well: the adapters do real work, as ours
    return get_peft_model(model, lora).eval(), attention


def ours_generate(model, prompts, n, autocast):
    with autocast:
        outputs = model.generate(prompts, n, eos_id=None, pad_id=0)
    if any(len(row) != n for row in outputs):
        raise RuntimeError(f"ours generated {sorted(set(map(len, outputs)))} tokens per row, expected {n}")


def reference_generate(model, prompts, n, autocast):
    input_ids = torch.tensor(prompts, device=model.device)  # (B, prompt_len), no padding
    with autocast:
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)
    if output.shape[1] != input_ids.shape[1] + n:
        raise RuntimeError(f"transformers generated {output.shape[1] - input_ids.shape[1]} tokens, expected {n}")


# ----------------------------------------------------------------------------- speed rows

def weight_bytes(model):
    """Bytes every decode step reads: all parameters but the embedding table (only B of its rows are read)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith("tok_embeddings"))


def decode_floor_seconds(config, weights, batch, s, cache_element_size, bandwidth):
    """The memory floor of one decode step: weights + the KV cache at the mean context, over the copy bandwidth."""
    mean_context = s.prompt_len + (s.new_tokens + 1) / 2
    kv_bytes = 2 * config.n_layer * batch * config.n_kv_heads * config.head_dim * mean_context * cache_element_size
    return (weights + kv_bytes) / bandwidth


def time_generation(generate, model, prompts, s, autocast):
    """Prefill and decode times (medians of s.repeats), after one untimed run of each (compilation included)."""
    t_first = wall_seconds(lambda: generate(model, prompts, 1 + s.new_tokens, autocast), s.device)
    generate(model, prompts, 1, autocast)
    graphs_before = compiled_graphs()
    prefill_times, full_times = [], []
    for _ in range(s.repeats):  # interleaved, so that a slow spell of the machine hits both alike
        prefill_times.append(wall_seconds(lambda: generate(model, prompts, 1, autocast), s.device))
        full_times.append(wall_seconds(lambda: generate(model, prompts, 1 + s.new_tokens, autocast), s.device))
    prefill, full = statistics.median(prefill_times), statistics.median(full_times)
    graphs_after = compiled_graphs()
    # a compiled model that still compiles during the timed runs recompiles on every call
    recompiled = None if graphs_before is None else graphs_after - graphs_before
    decode = full - prefill
    if decode <= 0:
        raise RuntimeError(f"decode time {decode:.4f} s is not positive (prefill {prefill:.4f} s, "
                           f"full {full:.4f} s): timing noise; raise --repeats or --new_tokens")
    batch = len(prompts)
    return {"prefill_ms": 1e3 * prefill, "decode_s": decode, "decode_tokens_per_s": batch * s.new_tokens / decode,
            "ms_per_step": 1e3 * decode / s.new_tokens, "first_run_s": t_first,
            "graphs_compiled_while_timed": recompiled,
            "prefill_s_all": prefill_times, "full_s_all": full_times}


def speed_rows(s, name, implementation, mode, build, generate, floors):
    """Rows of one model at each batch size; failures (OOM, compilation) become rows, not crashes."""
    base = {"model": name, "implementation": implementation, "mode": mode,
            "adapters": DESCRIPTIONS[implementation], "prompt_len": s.prompt_len, "new_tokens": s.new_tokens}
    batch_sizes = [int(b) for b in s.batch_sizes.split(",")]
    model = failure = None
    try:
        model, attention = build()
    except Exception as e:  # reported in the table; the other rows still run
        traceback.print_exc()
        failure = f"failed to build: {error_text(e)}"
    if failure:  # freed here, once the except block has let go of the failed frames
        del model
        free_memory(s.device)
        return [base | {"batch": b, "status": failure} for b in batch_sizes]
    cuda = s.device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    vocab = ModelConfig.from_name(name).vocab_size
    rows = []
    for batch in batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        # random prompt ids from 3 (no special tokens), the same prompts for every implementation
        prompts = torch.randint(3, vocab, (batch, s.prompt_len), generator=generator).tolist()
        row = base | {"batch": batch, "attention": attention}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            row |= time_generation(generate, model, prompts, s, autocast) | {"status": "ok"}
            row["peak_memory_gb"] = peak_memory_gb(s.device)
            row["floor_ms_per_step"] = 1e3 * floors[(name, batch)]
            row["of_roofline"] = floors[(name, batch)] / (row["ms_per_step"] / 1e3)
        except Exception as e:  # an out-of-memory or compilation failure is one failed row
            traceback.print_exc()
            row["status"] = f"failed: {error_text(e)}"
        rows.append(row)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    del model
    free_memory(s.device)
    return rows


def compiled(build, mode):
    """Our model with its __call__ compiled in place, so that generate's self(...) runs the compiled forward."""
    def build_compiled():
        model, attention = build()
        model.compile(mode=None if mode == "default" else mode)
        return model, attention
    return build_compiled


# ----------------------------------------------------------------------------- the evaluation workload

def workload_prompts(s, name):
    """(token-id prompts of the math test split, tokenizer); called before any model is built."""
    config = ModelConfig.from_name(name)
    if name.startswith("tiny"):
        tokenizer = ByteTokenizer()
    elif s.tokenizer:
        tokenizer = load_tokenizer(s.tokenizer)
    else:
        raise SystemExit(f"error: --eval_workload with {name} needs --tokenizer FOLDER (LLaMA: tokenizer.model; "
                         "GPT-J: vocab.json + merges.txt); on the GPU machine copy ../shared/data/spm-tokenizer "
                         "into data/ first (see bench/README.md)")
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tokenizer.vocab_size} ids but {name} only {config.vocab_size}: "
                         "pass the tokenizer of this model family")
    task = load_task("math", s.data_dir)
    items = [item for test_set in task.test.values() for item in test_set[: s.limit or None]]
    prompts = [tokenizer.encode(generate_prompt(item["instruction"], item["input"])) for item in items]
    longest = max(map(len, prompts)) + s.new_tokens
    if longest > config.max_seq_len:
        raise SystemExit(f"error: the longest prompt + {s.new_tokens} new tokens is {longest} tokens, more than "
                         f"{name}'s {config.max_seq_len}")
    return prompts, tokenizer


def eval_workload(s, name, dtype, prompts, tokenizer):
    """Wall time of the math test split through generate_batches, as eval.py runs it."""
    model = build_ours(name, s.device, dtype)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device == "cuda" else contextlib.nullcontext()
    with autocast:
        model.generate(prompts[:1], 2, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)  # warm-up, untimed
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    outputs = []

    def run():
        with autocast:
            for _, batch_outputs in model.generate_batches(prompts, s.eval_batch_size, s.new_tokens,
                                                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id):
                outputs.extend(batch_outputs)
    seconds = wall_seconds(run, s.device)
    new_tokens = sum(map(len, outputs))
    stopped = sum(1 for row in outputs if row and row[-1] == tokenizer.eos_id)
    row = {"model": name, "implementation": "ours", "mode": "eager", "adapters": DESCRIPTIONS["ours"],
           "prompts": len(prompts), "batch_size": s.eval_batch_size, "max_new_tokens": s.new_tokens,
           "prompt_tokens": sum(map(len, prompts)), "longest_prompt": max(map(len, prompts)),
           "new_tokens": new_tokens, "stopped_at_eos": stopped, "wall_s": seconds,
           "new_tokens_per_s": new_tokens / seconds, "peak_memory_gb": peak_memory_gb(s.device)}
    del model
    free_memory(s.device)
    return row


# ----------------------------------------------------------------------------- tables

def markdown(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in lines])


def speed_table(rows):
    reference = {(r["model"], r["batch"]): r["decode_tokens_per_s"]
                 for r in rows if r["implementation"] == "hf+peft" and r["status"] == "ok"}
    header = ["model", "implementation", "adapters", "mode", "attention", "batch", "prefill ms",
              "decode tokens/s", "vs hf+peft", "ms/step", "floor ms/step", "of roofline", "peak mem GB",
              "first run s", "compiles while timed"]
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append([r["model"], r["implementation"], r["adapters"], r["mode"], r.get("attention", "-"),
                          str(r["batch"]), r["status"]] + ["-"] * 8)
            continue
        ref = reference.get((r["model"], r["batch"]))
        r["vs_hf_peft"] = r["decode_tokens_per_s"] / ref if ref else None
        lines.append([r["model"], r["implementation"], r["adapters"], r["mode"], r["attention"], str(r["batch"]),
                      f"{r['prefill_ms']:.1f}", f"{r['decode_tokens_per_s']:,.1f}", fmt(r["vs_hf_peft"], ".2f"),
                      f"{r['ms_per_step']:.2f}", f"{r['floor_ms_per_step']:.2f}", f"{r['of_roofline']:.1%}",
                      fmt(r["peak_memory_gb"], ".1f"), f"{r['first_run_s']:.1f}",
                      str(r["graphs_compiled_while_timed"]) if r["mode"] == "compiled" else "-"])
    return markdown(header, lines)


def eval_table(rows):
    header = ["model", "implementation", "prompts", "batch", "max new tokens", "new tokens", "stopped at EOS",
              "wall s", "new tokens/s", "peak mem GB"]
    return markdown(header, [[r["model"], f"{r['implementation']} {r['mode']}", str(r["prompts"]),
                              str(r["batch_size"]), str(r["max_new_tokens"]), f"{r['new_tokens']:,}",
                              str(r["stopped_at_eos"]), f"{r['wall_s']:.1f}", f"{r['new_tokens_per_s']:,.1f}",
                              fmt(r["peak_memory_gb"], ".1f")] for r in rows])


# ----------------------------------------------------------------------------- main

def main(argv=None):
    s = parse_settings(argv)
    print(json.dumps(asdict(s), indent=2))
    cuda = s.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as eval.py: bf16 weights on a GPU, fp32 on CPU
    names = [n.strip() for n in s.model.split(",") if n.strip()]
    for name in names:
        ModelConfig.from_name(name)  # an unknown name fails here, before minutes of work
    # data first: a missing file or tokenizer should fail before minutes of building models
    workload_inputs = {name: workload_prompts(s, name) for name in names} if s.eval_workload else {}
    if s.compile:
        torch._logging.set_logs(recompiles=True)  # why a compiled row recompiles, on stderr

    bandwidth, bandwidth_what = measure_copy_bandwidth(s.device)
    print(f"measured {bandwidth_what}: {bandwidth / 1e9:.0f} GB/s (read + write)")

    speed, workload = [], []
    for name in names:
        if not s.skip_speed:
            # the floor is the workload's, the same for every implementation: from our model's weights
            shapes_only = build_ours(name, "meta", dtype)  # sizes without memory
            config, weights = shapes_only.config, weight_bytes(shapes_only)
            cache_element_size = shapes_only.tok_embeddings.weight.element_size()  # the KV cache's dtype
            floors = {(name, int(b)): decode_floor_seconds(config, weights, int(b), s, cache_element_size, bandwidth)
                      for b in s.batch_sizes.split(",")}

            def build():
                return build_ours(name, s.device, dtype), "sdpa"
            speed += speed_rows(s, name, "ours", "eager", build, ours_generate, floors)
            if s.compile:
                speed += speed_rows(s, name, "ours", "compiled", compiled(build, s.compile_mode), ours_generate,
                                    floors)
            if not s.skip_reference:
                speed += speed_rows(s, name, "hf+peft", "eager", lambda: build_reference(name, s.device, dtype),
                                    reference_generate, floors)
        if s.eval_workload:
            workload.append(eval_workload(s, name, dtype, *workload_inputs[name]))

    environment = {"device": device_description(s.device), **versions(), "dtype": str(dtype),
                   "copy_bandwidth_bytes_per_s": bandwidth, "bandwidth_measured_with": bandwidth_what}
    print()
    print(f"generation: {environment['device']}, " + ", ".join(f"{k} {v}" for k, v in versions().items())
          + (", bf16 weights + autocast" if cuda else ", fp32 on CPU: a smoke run, not a speed claim"))
    tables = {}
    if speed:
        tables["speed"] = speed_table(speed)
        print(f"prompt {s.prompt_len} tokens, {s.new_tokens} decode steps, greedy, no early stop; medians of "
              f"{s.repeats} runs; roofline from the measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        print(tables["speed"])
    if workload:
        tables["eval"] = eval_table(workload)
        print()
        print(f"evaluation workload: math test split from {s.data_dir}"
              f"{f' (first {s.limit} of each set)' if s.limit else ''}, generate_batches as eval.py, "
              f"random weights (EOS is rare: about the worst case)")
        print(tables["eval"])
    if s.json:
        os.makedirs(os.path.dirname(os.path.abspath(s.json)), exist_ok=True)
        with open(s.json, "w") as f:
            json.dump({"settings": asdict(s), "environment": environment, "speed": speed, "eval_workload": workload},
                      f, indent=2)
        print(f"wrote {s.json}")
    return {"settings": asdict(s), "environment": environment, "speed": speed, "eval_workload": workload,
            "tables": tables}


if __name__ == "__main__":
    main()
