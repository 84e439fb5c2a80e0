"""Training and generation speed of ours against transformers + PEFT, in one process, as ratios.

    python bench/speed.py                                  # CPU: the LLaMA shape below, fp32, a few minutes
    python bench/speed.py --work generate                  # only the generation table
    python bench/speed.py --work profile                   # where the time goes (torch.profiler)
    python bench/speed.py --dim 1024 --n_layer 18 --n_head 16 --ffn_dim 2816 --rounds 3   # ~300M parameters
    python bench/speed.py --model llama-7b --json out/bench/llama-7b.json                 # a GPU: bf16

The model is LLaMA-shaped with random weights, from the shape flags (default: dim 512, 8 layers,
8 heads, FFN 1536, vocab 32000, 58M parameters) or a preset of model.py (--model). Each stack
builds its own copy; no checkpoint is needed. Rows:

    train     one micro-batch step as train.py takes it (right-padded batch and its mask, next-token
              loss, backward, gradient clipping, AdamW), on --micro_batch x --seq_len random tokens:
                InterLoRA r=4 on q, v, down with its gates   against PEFT LoRA r=4 on q, v, down
                LoRA r=10 on q, v                            against PEFT LoRA r=10 on q, v
    generate  greedy decoding of --new_tokens after --prompt_len random tokens, never stopping early,
              at each of --batch_sizes: InterLoRA r=4 against transformers' generate with PEFT LoRA r=4
              on q, v, down; decode tokens/s = batch * new_tokens / (time(1 + new_tokens) - time(1)).
              A last row, "matmuls alone", runs only the frozen weights' matmuls of those decode steps
              (every nn.Linear of the base on a (batch, width) input, one after another, no model
              around them) with torch's matmul (MKL on a CPU): what a stack that multiplies with that
              kernel cannot go below. Ours compiled goes below it at batch 1 and 2 on a CPU, where the
              decode step computes each product as a reduction of its own (machinery/decode.py).

for ours eager, ours compiled (train: torch.compile of the model; generate: the compiled decode
step) and hf+peft (transformers' LlamaForCausalLM, sdpa attention; eager for GPT-J, which has
no sdpa there). Both stacks run under the same process settings: threads, MKL_CBWR=AUTO (what
train.py and eval.py set), the default allocator; fp32 on a CPU, bf16 base + fp32 adapters under
bf16 autocast on a GPU, as train.py and eval.py run.

Timing: the rows of one table are measured in turn, round after round (--rounds), and each row
keeps its median, so that a busy spell of a shared machine hits every row alike. Compilation
happens in an untimed warm-up. GPU steps are timed with CUDA events.

Ceilings, measured in the same run:
- training: the rate of one large matmul (2048^3 fp32 on a CPU, 8192^3 bf16 on a GPU; the best of
  10 before the rows and 10 after them). A step's model FLOPs are 4 * N * tokens (N = weights of
  the frozen matmuls every token passes: q, k, v, o, the FFN, the output layer; forward plus input
  gradients, frozen weights need no weight gradients) + 6 * B * T^2 * dim * n_layer (attention
  scores and values, forward and backward, the causal half of the square) + 6 * adapter
  parameters * tokens. "of matmul" = FLOPs / step time / that rate.
- decoding: each step must read every weight but the embedding table (adapters included) and
  the KV cache at the mean context (prompt_len + (new_tokens + 1) / 2). The floor is those bytes
  over the memory bandwidth: the better of a streaming read (a sum) and a copy (bytes read plus
  written) of 512 MiB (2 GiB on a GPU). "of floor" = floor / measured time per step.
"""
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO")  # as train.py and eval.py, before torch loads MKL

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python bench/speed.py
from machinery.adapters import default_targets
import interlora  # noqa: E402
from machinery import fused  # noqa: E402
from data import ByteTokenizer, generate_prompt, load_task, load_tokenizer  # noqa: E402
from machinery import decode  # noqa: E402
from model import PRESETS, ModelConfig, Transformer  # noqa: E402
from machinery.runs import RunError, choose_device, settings_from_command_line  # noqa: E402


@dataclass
class Settings:
    work: str = field(default="train,generate", metadata={"help": "comma-separated: train, generate, eval (eval.py's "
                                                                   "path over the math test split), profile (where "
                                                                   "ours spends its time)"})
    model: str = field(default="", metadata={"help": "a preset of model.py instead of the shape flags, e.g. llama-7b"})
    dim: int = field(default=512, metadata={"help": "model width", "min": 1})
    n_layer: int = field(default=8, metadata={"help": "layers", "min": 1})
    n_head: int = field(default=8, metadata={"help": "attention heads", "min": 1})
    ffn_dim: int = field(default=1536, metadata={"help": "FFN width", "min": 1})
    vocab_size: int = field(default=32000, metadata={"help": "vocabulary", "min": 4})
    micro_batch: int = field(default=4, metadata={"help": "train: sequences per step", "min": 1})
    seq_len: int = field(default=256, metadata={"help": "train: tokens per sequence", "min": 2})
    batch_sizes: str = field(default="1,32", metadata={"help": "generate: comma-separated batch sizes"})
    prompt_len: int = field(default=128, metadata={"help": "generate: prompt tokens", "min": 1})
    new_tokens: int = field(default=128, metadata={"help": "generate: decode steps", "min": 1})
    rounds: int = field(default=5, metadata={"help": "timed rounds (each row once per round; medians)", "min": 1})
    skip_compile: bool = field(default=False, metadata={"help": "leave out the ours-compiled rows"})
    skip_reference: bool = field(default=False, metadata={"help": "leave out the transformers + PEFT rows"})
    data_dir: str = field(default="data", metadata={"help": "eval workload: LLM-Adapters data"})
    tokenizer: str = field(default="", metadata={"help": "eval workload: tokenizer folder (default: bytes, for "
                                                          "small vocabularies)"})
    limit: int = field(default=0, metadata={"help": "eval workload: first N prompts of each test set (0: all)",
                                            "min": 0})
    eval_batch_size: int = field(default=32, metadata={"help": "eval workload: prompts per batch", "min": 1})
    eval_new_tokens: int = field(default=256, metadata={"help": "eval workload: new tokens (math: 256)", "min": 1})
    json: str = field(default="", metadata={"help": "write the settings, environment and rows to this file"})
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})
    reference_layer: bool = field(default=False, metadata={
        "help": "ours with interlora.py's clear layer instead of machinery/fused.py's"})
    plain_dropout: bool = field(default=False, metadata={
        "help": "ours' CPU dropout masks drawn one element at a time (torch's bernoulli), not as "
                "machinery/fused.py's geometric gaps"})


# ----------------------------------------------------------------------------- the stacks

# Our adapters and PEFT's LoRA on the same modules: (our config, PEFT rank, PEFT's module names)
METHODS = {"interlora": (interlora.InterLoRAConfig(), 4, ["q_proj", "v_proj", "down_proj"]),
           "lora": (interlora.InterLoRAConfig(**interlora.VARIANTS["lora"]), 10, ["q_proj", "v_proj"])}


def model_config(s):
    if s.model:
        return ModelConfig.from_name(s.model)
    return ModelConfig(family="llama", vocab_size=s.vocab_size, dim=s.dim, n_layer=s.n_layer, n_head=s.n_head,
                       ffn_dim=s.ffn_dim, max_seq_len=max(s.seq_len, s.prompt_len + s.new_tokens, 2048))


LAYER = {False: fused.FusedInterLoRALinear, True: interlora.InterLoRALinear}  # by --reference_layer


def build_ours(config, method, device, dtype, trained_like=False, reference_layer=False):
    """Our model with random weights made on the device, adapters added (B random if trained_like)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    interlora.add_interlora(model, METHODS[method][0], default_targets(model), layer=LAYER[reference_layer])
    model.loss_function = fused.chunked_loss  # train.py's loss
    if trained_like:  # B = 0 would make every update a no-op
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    return model


def build_reference(config, method, device, dtype, trained_like=False):
    """transformers' model of the same shape with random weights made on the device, plus PEFT's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()  # generate's notes on unset generation flags
    if config.family == "llama":
        hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
                                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                                num_key_value_heads=config.n_kv_heads, rms_norm_eps=config.norm_eps,
                                max_position_embeddings=config.max_seq_len, tie_word_embeddings=False,
                                attn_implementation="sdpa")
        model_class, targets = LlamaForCausalLM, METHODS[method][2]
    else:  # transformers has no sdpa for GPT-J; fc_out is its down projection
        hf_config = GPTJConfig(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.dim,
                               n_layer=config.n_layer, n_head=config.n_head, rotary_dim=config.rotary_dim,
                               n_inner=config.ffn_dim, layer_norm_epsilon=config.norm_eps, tie_word_embeddings=False,
                               attn_implementation="eager")
        model_class = GPTJForCausalLM
        targets = [name.replace("down_proj", "fc_out") for name in METHODS[method][2]]
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(hf_config).to(dtype)
    r = METHODS[method][1]
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM",
                      init_lora_weights=not trained_like)  # False: random B, the adapters do real work
    return get_peft_model(model, lora)  # adapters in fp32, as ours


# ----------------------------------------------------------------------------- timing

def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, device):
    """Time of one call of fn: CUDA events on a GPU (device time), the host clock on a CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(rows, rounds, device):
    """Call each row's "measure" once per round, rows in turn, keeping what it returns in row["times"]."""
    for row in rows:
        row["times"] = []
    for _ in range(rounds):
        for row in rows:
            synchronize(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            row["times"].append(row["measure"]())
            if device.startswith("cuda"):
                row["peak_memory_gb"] = max(row.get("peak_memory_gb", 0), torch.cuda.max_memory_allocated() / 2**30)
    for row in rows:
        del row["measure"]  # it holds the model: let it go


def matmul_rate(device):
    """FLOP/s of one large matmul on random data: 2048^3 fp32 on a CPU, 8192^3 bf16 on a GPU."""
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / min(seconds(lambda: a @ b, device) for _ in range(10))  # the best: a peak


def memory_bandwidth(device):
    """Bytes/s: the better of a streaming read (sum) and a copy (read + write) of 512 MiB (2 GiB on a GPU)."""
    n_bytes = 2 ** 31 if device.startswith("cuda") else 2 ** 29
    source = torch.randn(n_bytes // 4, device=device)
    target = torch.empty_like(source)
    read = n_bytes / min(seconds(source.sum, device) for _ in range(8))
    copy = 2 * n_bytes / min(seconds(lambda: target.copy_(source), device) for _ in range(8))
    return max(read, copy)


# ----------------------------------------------------------------------------- training

def matmul_weights(config):
    """Weights of the frozen matmuls every token passes: attention, FFN and the output layer (not the embedding)."""
    kv_dim = config.n_kv_heads * config.head_dim
    attention = 2 * config.dim * config.dim + 2 * config.dim * kv_dim
    ffn = (3 if config.family == "llama" else 2) * config.dim * config.ffn_dim
    return config.n_layer * (attention + ffn) + config.dim * config.vocab_size


def train_flops(config, adapter_params, batch, seq_len):
    """Model FLOPs of one training step with a frozen base (the module docstring's formula)."""
    tokens = batch * seq_len
    attention = 6 * batch * seq_len ** 2 * config.dim * config.n_layer  # the causal half, forward and backward
    return 4 * matmul_weights(config) * tokens + attention + 6 * adapter_params * tokens


def train_rows(s, config, method, dtype):
    """The rows of one adapter set: ours eager, ours compiled, hf+peft; each with its step function."""
    cuda = s.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(3, config.vocab_size, (s.micro_batch, s.seq_len), generator=generator).to(s.device)
    mask = torch.ones_like(idx, dtype=torch.bool)  # what collate gives for full-length rows

    def stepper(model, loss_of):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)

        def step():
            with autocast:
                loss = loss_of()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in params)

    ours = build_ours(config, method, s.device, dtype, reference_layer=s.reference_layer).train()
    rows = [("ours", "eager", ours, lambda: ours(idx, attention_mask=mask, labels=idx, right_padded=True))]
    if not s.skip_compile:
        compiled = torch.compile(ours)
        rows.append(("ours", "compiled", ours, lambda: compiled(idx, attention_mask=mask, labels=idx,
                                                                  right_padded=True)))
    if not s.skip_reference:
        reference = build_reference(config, method, s.device, dtype).train()
        rows.append(("hf+peft", "eager", reference,
                     lambda: reference(input_ids=idx, attention_mask=mask, labels=idx).loss))
    out = []
    for stack, mode, model, loss_of in rows:
        step, adapter_params = stepper(model, loss_of)
        for _ in range(2):  # warm-up: compilation, the optimizer's state
            step()
        out.append({"work": "train", "method": method, "stack": stack, "mode": mode,
                    "measure": lambda step=step: seconds(step, s.device),
                    "adapter_params": adapter_params,
                    "flops": train_flops(config, adapter_params, s.micro_batch, s.seq_len)})
    return out


def finish_train_rows(rows, s, rate):
    reference = {r["method"]: statistics.median(r["times"]) for r in rows if r["stack"] == "hf+peft"}
    for r in rows:
        step_s = statistics.median(r["times"])
        r.update(step_ms=1e3 * step_s, tokens_per_s=s.micro_batch * s.seq_len / step_s,
                 of_matmul=r["flops"] / step_s / rate,
                 vs_hf_peft=reference[r["method"]] / step_s if r["method"] in reference else None)


# ----------------------------------------------------------------------------- generation

def generate_rows(s, config, dtype, batch):
    """Rows at one batch size: each run times a prefill (1 new token) and a full generate (1 + new_tokens)."""
    cuda = s.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, config.vocab_size, (batch, s.prompt_len), generator=generator).tolist()
    models = {}

    def ours_run(compile):
        def generate(n):
            with autocast:
                step = decode.compiled_decode_step(models["ours"]) if compile else None
                out = models["ours"].generate(prompts, n, eos_id=None, decode_step=step)
            assert all(len(row) == n for row in out)
        return generate

    def reference_run(n):
        input_ids = torch.tensor(prompts, device=s.device)
        with autocast, torch.no_grad():
            out = models["hf+peft"].generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == s.prompt_len + n

    models["ours"] = build_ours(config, "interlora", s.device, dtype, trained_like=True,
                                reference_layer=s.reference_layer).eval()
    runs = [("ours", "eager", ours_run(False))]
    if not s.skip_compile:
        runs.append(("ours", "compiled", ours_run(True)))
    if not s.skip_reference:
        models["hf+peft"] = build_reference(config, "interlora", s.device, dtype, trained_like=True).eval()
        runs.append(("hf+peft", "eager", reference_run))
    # the frozen weights' matmuls of new_tokens decode steps as torch's matmul (MKL on a CPU) computes them, run
    # bare one after another: what a stack that multiplies with that kernel cannot go below
    weights = [module.weight for name, module in models["ours"].named_modules()
               if isinstance(module, torch.nn.Linear) and not interlora.is_adapter_parameter(name + ".weight")]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=s.device, dtype=dtype) for w in weights}

    def matmuls_alone(n):
        with torch.no_grad():
            for _ in range(n - 1):
                for w in weights:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)
    runs.append(("matmuls", "alone", matmuls_alone))
    rows = []
    for stack, mode, generate in runs:
        def measure(generate=generate):  # a prefill alone, then the whole generation, each timed
            return {"prefill": seconds(lambda: generate(1), s.device),
                    "full": seconds(lambda: generate(1 + s.new_tokens), s.device)}
        t0 = time.perf_counter()
        generate(1 + s.new_tokens)  # warm-up: compiles the decode step
        rows.append({"work": "generate", "batch": batch, "stack": stack, "mode": mode, "measure": measure,
                     "warmup_s": time.perf_counter() - t0})
    return rows, models


def decode_floor_bytes(model, config, batch, s):
    """Bytes one decode step must read: the weights but the embedding table, and the KV cache at the mean context."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith("tok_embeddings"))
    context = s.prompt_len + (s.new_tokens + 1) / 2
    element = model.tok_embeddings.weight.element_size()
    return weights + 2 * config.n_layer * batch * config.n_kv_heads * config.head_dim * context * element


def finish_generate_rows(rows, s, floor_bytes, bandwidth):
    for r in rows:
        prefill = statistics.median(t["prefill"] for t in r["times"])
        decode = statistics.median(t["full"] for t in r["times"]) - prefill
        r.update(prefill_ms=1e3 * prefill, ms_per_step=1e3 * decode / s.new_tokens,
                 tokens_per_s=r["batch"] * s.new_tokens / decode,
                 floor_ms_per_step=1e3 * floor_bytes[r["batch"]] / bandwidth)
        r["of_floor"] = r["floor_ms_per_step"] / r["ms_per_step"]
    for r in rows:
        reference = [x["tokens_per_s"] for x in rows if x["stack"] == "hf+peft" and x["batch"] == r["batch"]]
        r["vs_hf_peft"] = r["tokens_per_s"] / reference[0] if reference else None
        alone = [x["ms_per_step"] for x in rows if x["stack"] == "matmuls" and x["batch"] == r["batch"]]
        r["of_matmuls"] = alone[0] / r["ms_per_step"]


# ----------------------------------------------------------------------------- the evaluation workload

def eval_workload(s, config, dtype):
    """Wall time of the math test split through generate_batches (eval.py's path), ours compiled unless skipped."""
    tokenizer = load_tokenizer(s.tokenizer) if s.tokenizer else ByteTokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise RunError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {config.vocab_size}: pass "
                       "--tokenizer of this model family")
    items = [item for test_set in load_task("math", s.data_dir).test.values() for item in test_set[:s.limit or None]]
    prompts = [tokenizer.encode(generate_prompt(item["instruction"], item["input"])) for item in items]
    model = build_ours(config, "interlora", s.device, dtype, trained_like=True).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.startswith("cuda") else contextlib.nullcontext()
    step = None if s.skip_compile else decode.compiled_decode_step(model)
    options = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, decode_step=step)
    outputs = []

    def run():
        with autocast:
            for _, batch_outputs in model.generate_batches(prompts, s.eval_batch_size, s.eval_new_tokens, **options):
                outputs.extend(batch_outputs)
    wall = seconds(run, s.device)  # compilations included, as a user's evaluation pays them
    new_tokens = sum(map(len, outputs))
    return {"work": "eval", "prompts": len(prompts), "batch": s.eval_batch_size, "max_new_tokens": s.eval_new_tokens,
            "mode": "eager" if s.skip_compile else "compiled", "new_tokens": new_tokens, "wall_s": wall,
            "tokens_per_s": new_tokens / wall, "stopped_at_eos": sum(1 for row in outputs if row[-1:] == [options["eos_id"]])}


# ----------------------------------------------------------------------------- where the time goes

def profile(s, config, dtype):
    """torch.profiler's busiest operators in one training step and one batch-1 generation of ours (eager), and
    the output layer's matrix-vector product in both weight layouts next to a plain read of the same bytes."""
    from torch.profiler import ProfilerActivity, profile as profiler
    lines = []
    model = build_ours(config, "interlora", s.device, dtype, trained_like=True).train()
    idx = torch.randint(3, config.vocab_size, (s.micro_batch, s.seq_len), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx, dtype=torch.bool)
    for _ in range(2):  # warm-up
        model(idx, attention_mask=mask, labels=idx, right_padded=True).backward()
    prompt = idx[:1, :s.prompt_len].tolist()
    prompts = torch.randint(3, config.vocab_size, (32, s.prompt_len), generator=torch.Generator().manual_seed(2)).tolist()
    model.eval().generate(prompt, 4)
    step = decode.compiled_decode_step(model)
    for batch in (prompt, prompts):  # compiles the decode step for batch 1, then for 32
        model.eval().generate(batch, s.new_tokens, decode_step=step)
    for name, work in [("training step (forward + backward)",
                        lambda: model.train()(idx, attention_mask=mask, labels=idx, right_padded=True).backward()),
                       (f"generation, batch 1, {s.new_tokens} new tokens", lambda: model.eval().generate(prompt, s.new_tokens)),
                       (f"generation, batch 1, {s.new_tokens} new tokens, compiled decode step",
                        lambda: model.eval().generate(prompt, s.new_tokens, decode_step=step)),
                       (f"generation, batch 32, {s.new_tokens} new tokens, compiled decode step (and the prefill)",
                        lambda: model.eval().generate(prompts, s.new_tokens, decode_step=step))]:
        with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.startswith("cuda")
                                                          else [])) as prof:
            work()
            synchronize(s.device)
        lines.append(f"{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    weight = model.output.weight.detach()  # (vocab, dim), as nn.Linear stores it
    transposed, mb = weight.t().contiguous(), weight.numel() * weight.element_size() / 1e6
    reduction = torch.compile(decode.matrix_vector, dynamic=False)  # the compiled decode step's product
    for rows in (1, 2, 4):  # decode.MATRIX_VECTOR_ROWS: where the reduction stops being the faster
        x = torch.randn(rows, weight.shape[1], device=s.device, dtype=dtype)
        reduction(x, weight.T)
        times = {what: 1e3 * statistics.median(seconds(fn, s.device) for _ in range(20)) for what, fn in [
            ("x @ W^T, W stored (out, in) as nn.Linear (MKL)", lambda: x @ weight.T),
            ("x @ W, W stored (in, out) (MKL)", lambda: x @ transposed),
            ("multiply-and-sum over W's rows (inductor, the compiled decode step's)", lambda: reduction(x, weight.T)),
            ("sum of W (a plain read)", weight.sum)]}
        lines.append(f"the output layer's product at {rows} row(s) ({tuple(weight.shape)}, {mb:.0f} MB):\n" + "\n".join(
            f"  {what}: {ms:.2f} ms, {mb / ms:.1f} GB/s of W" for what, ms in times.items()))
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- tables

def markdown(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in lines])


def ratio(value):
    return "-" if value is None else f"{value:.2f}"


def train_table(rows, cuda):
    header = ["adapters", "stack", "tokens/s", "vs hf+peft", "step ms", "of matmul rate"] + (["peak GB"] if cuda else [])
    names = {("interlora", "ours"): "InterLoRA r=4 q,v,down + gates", ("interlora", "hf+peft"): "LoRA r=4 q,v,down",
             ("lora", "ours"): "LoRA r=10 q,v", ("lora", "hf+peft"): "LoRA r=10 q,v"}
    return markdown(header, [[names[r["method"], r["stack"]], f"{r['stack']} {r['mode']}", f"{r['tokens_per_s']:,.0f}",
                              ratio(r["vs_hf_peft"]), f"{r['step_ms']:.0f}", f"{r['of_matmul']:.0%}"]
                             + ([f"{r.get('peak_memory_gb', 0):.1f}"] if cuda else []) for r in rows])


def generate_table(rows):
    header = ["batch", "stack", "decode tokens/s", "vs hf+peft", "ms/step", "floor ms/step", "of floor",
              "of matmuls alone", "prefill ms", "warm-up s"]
    return markdown(header, [[str(r["batch"]), f"{r['stack']} {r['mode']}", f"{r['tokens_per_s']:,.1f}",
                              ratio(r["vs_hf_peft"]), f"{r['ms_per_step']:.2f}", f"{r['floor_ms_per_step']:.2f}",
                              f"{r['of_floor']:.0%}", f"{r['of_matmuls']:.0%}", f"{r['prefill_ms']:.0f}",
                              f"{r['warmup_s']:.1f}"] for r in rows])


def cpu_name():
    """The CPU's model name (Linux), with its core count."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"CPU {name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment(s, config, dtype):
    found = {"device": torch.cuda.get_device_name() if s.device.startswith("cuda") else cpu_name(),
             "threads": torch.get_num_threads(),
             "MKL_CBWR": os.environ.get("MKL_CBWR"), "torch": torch.__version__, "dtype": str(dtype)}
    for package in ("transformers", "peft"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = "not installed"
    with torch.device("meta"):
        found["parameters"] = sum(p.numel() for p in Transformer(config).parameters())
    return found


# ----------------------------------------------------------------------------- main

def main(argv=None):
    s = settings_from_command_line(Settings, __doc__.split("\n\n")[0], argv)
    s.device = choose_device(s.device)
    work = {w.strip() for w in s.work.split(",")}
    if not work <= {"train", "generate", "eval", "profile"}:
        raise RunError(f"--work {s.work!r}: expected train, generate, eval, profile or several of them")
    if s.model and s.model not in PRESETS:
        raise RunError(f"--model {s.model!r}: choose one of {', '.join(PRESETS)}")
    cuda = s.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32  # as train.py and eval.py
    config = model_config(s)
    fused.CPU_GAPS = not s.plain_dropout
    env = environment(s, config, dtype)
    print(json.dumps({"settings": asdict(s), "environment": env}, indent=2))
    results, tables = {"settings": asdict(s), "environment": env, "rows": []}, []
    load_before = os.getloadavg()

    if "train" in work:
        rate = matmul_rate(s.device)
        rows = []
        for method in METHODS:  # one adapter set at a time: its rows are interleaved, then its models freed
            method_rows = train_rows(s, config, method, dtype)
            interleaved(method_rows, s.rounds, s.device)
            rows += method_rows
            torch.compiler.reset()
            gc.collect()
        rate = max(rate, matmul_rate(s.device))  # again after the rows: a busy spell at the start is no peak
        finish_train_rows(rows, s, rate)
        tables.append(f"training step, {s.micro_batch} x {s.seq_len} tokens; matmul rate measured "
                      f"{rate / 1e9:,.0f} GFLOP/s\n" + train_table(rows, cuda))
        results["matmul_flops_per_s"] = rate
        results["rows"] += rows

    if "generate" in work:
        bandwidth = memory_bandwidth(s.device)
        rows, floor_bytes = [], {}
        for batch in [int(b) for b in s.batch_sizes.split(",")]:
            batch_rows, models = generate_rows(s, config, dtype, batch)
            floor_bytes[batch] = decode_floor_bytes(models["ours"], config, batch, s)
            del models
            interleaved(batch_rows, s.rounds, s.device)
            rows += batch_rows
            torch.compiler.reset()
            gc.collect()
        finish_generate_rows(rows, s, floor_bytes, bandwidth)
        tables.append(f"greedy decoding, prompt {s.prompt_len}, {s.new_tokens} new tokens; memory bandwidth measured "
                      f"{bandwidth / 1e9:.1f} GB/s\n" + generate_table(rows))
        results["memory_bytes_per_s"] = bandwidth
        results["rows"] += rows

    if "eval" in work:
        row = eval_workload(s, config, dtype)
        tables.append(f"evaluation workload: {row['prompts']} math prompts, generate_batches ({row['mode']}), batch "
                      f"{row['batch']}, up to {row['max_new_tokens']} new tokens: {row['new_tokens']:,} tokens in "
                      f"{row['wall_s']:.1f} s ({row['tokens_per_s']:,.0f} tokens/s)")
        results["rows"].append(row)

    if "profile" in work:
        tables.append(profile(s, config, dtype))

    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print()
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, peft "
          f"{env['peft']}, {env['dtype']}, MKL_CBWR={env['MKL_CBWR']}; {env['parameters'] / 1e6:.0f}M parameters "
          f"({s.model or f'dim {config.dim}, {config.n_layer} layers, {config.n_head} heads, FFN {config.ffn_dim}, '}"
          f"{'' if s.model else f'vocab {config.vocab_size}'}); load average {load_before[0]:.2f} before, "
          f"{results['load_average']['after'][0]:.2f} after")
    for table in tables:
        print()
        print(table)
    if s.json:
        os.makedirs(os.path.dirname(os.path.abspath(s.json)), exist_ok=True)
        with open(s.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {s.json}")
    results["tables"] = tables
    return results


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        sys.exit(f"error: {e}")
