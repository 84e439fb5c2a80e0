"""How much memory a run needs, how much the device has, and a refusal that says what would fit.

Checked before any weight is read, so a run that cannot fit stops in a second with the figures
and the flags that would make it fit, instead of thrashing for minutes until the kernel kills it.
b = batch, s = sequence length, h = model width, size = bytes per value of the compute dtype.

    weights      every tensor at its real size: the compute dtype, or quantized codes + fp32 scales
    training     trainable params x 16 bytes (fp32 param, grad and two AdamW moments)
               + activations: per block s·b·h·k bytes, k from ACTIVATION_BYTES (training attends
                 without a mask: nothing of size s²)
                 (--grad_checkpointing: each block's input, n_layer·s·b·h·size, + one block's worth)
               + loss: model.py's chunked cross-entropy holds one of its 8 chunks of logits at a
                 time (in the compute dtype, their fp32 log-softmax and softmax) and the input
                 gradient it computes on the way, (b, s, h)
    evaluation   KV cache 2·n_layer·b·s·n_kv_heads·head_dim values + the logits of one position
    quantized    + one weight dequantized at a time in the compute dtype (the largest)
    margin       1 GiB: the CUDA context or Python + torch themselves, the read buffer while loading

Nothing here allocates: `available` can be passed in (tests, other devices), else it is read
from /proc/meminfo (CPU) or torch.cuda.mem_get_info (CUDA).
"""
import torch

from machinery.quantize import NF4_BLOCK, QUANTIZE_KINDS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GiB = 2 ** 30
MARGIN = GiB

# Bytes that training stores per block, per token and per unit of model width (k above),
# measured with torch.autograd.graph.saved_tensors_hooks on this code with the paper's InterLoRA
# (r=4 on q, v, down), loss included: LLaMA 98 / 77 / 56, GPT-J 85 / 72 / 45, rounded up
# (tests/test_memory.py measures them again; dropout keeps a mask of one byte per value).
# Korthikanti et al. (2022, Table 2) count 34 for a plain 16-bit Megatron layer; ours keep more
# because each adapter works on an fp32 copy of its input unless autocast runs, and RMSNorm and
# rotary compute in fp32. Plain LoRA on q, v stores about half as much, LoRA on all three FFN
# matrices (ffn-all) about 1.8 times as much.
ACTIVATION_BYTES = {"fp32": 100, "16-bit": 79, "16-bit autocast": 57}


class NotEnoughMemory(ValueError):
    """A run that does not fit; `fits` lists the flag sets that would (each a string such as "--dtype bf16")."""

    def __init__(self, message, fits=()):
        super().__init__(message)
        self.fits = list(fits)


def _name(dtype):
    """The name (bf16, fp16, fp32) of a dtype given by name or as a torch dtype."""
    for name, torch_dtype in DTYPES.items():
        if dtype in (name, torch_dtype):
            return name
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def linear_bytes(in_features, out_features, dtype, quantize=None):
    """Bytes of one (out, in) weight: in the compute dtype, or int8 + an fp32 scale per row, or nf4 + an
    fp32 absmax per block of 64."""
    numel = in_features * out_features
    if quantize is None:
        return numel * DTYPES[_name(dtype)].itemsize
    if quantize == "int8":
        return numel + 4 * out_features
    if quantize == "nf4":
        return numel // 2 + 4 * (numel // NF4_BLOCK)
    raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_KINDS)}")


def _block_linears(config):
    """(in, out) of the linear layers of one block."""
    q_width, kv_width = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = [(config.dim, q_width), (config.dim, kv_width), (config.dim, kv_width), (q_width, config.dim),
              (config.dim, config.ffn_dim), (config.ffn_dim, config.dim)]
    if config.family == "llama":
        shapes.append((config.dim, config.ffn_dim))  # w3, the up projection of SwiGLU
    return shapes


def weight_bytes(config, dtype, quantize=None):
    """{part: bytes} of the model's tensors, by the real layer sizes."""
    size = DTYPES[_name(dtype)].itemsize
    gptj = config.family == "gptj"
    linears = sum(linear_bytes(i, o, dtype, quantize) for i, o in _block_linears(config))
    # LLaMA: two RMSNorm weights; GPT-J: one LayerNorm (weight, bias) and the MLP's two biases
    small = (2 * config.dim + config.ffn_dim + config.dim if gptj else 2 * config.dim) * size
    if config.qkv_bias:  # Qwen2's q, k and v biases
        small += (config.n_head + 2 * config.n_kv_heads) * config.head_dim * size
    # a tied output layer is the embedding matrix: no bytes of its own
    output = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return {"embedding": config.vocab_size * config.dim * size,
            "blocks": config.n_layer * (linears + small),
            "final norm": (2 if gptj else 1) * config.dim * size,
            "output": (output + (config.vocab_size if gptj else 0)) * size}


def memory_needed(config, dtype, quantize=None, training=False, batch_size=1, seq_len=256, trainable_params=0,
                  autocast=False, grad_checkpointing=False):
    """{part: bytes} a run needs (see the top of this file); sum the values for the total.

    autocast: training runs under bf16/fp16 autocast (train.py does on CUDA); grad_checkpointing:
    blocks are recomputed in backward.
    """
    size = DTYPES[_name(dtype)].itemsize
    b, s, h = batch_size, seq_len, config.dim
    parts = {"weights": sum(weight_bytes(config, dtype, quantize).values())}
    if quantize:
        parts["dequantized weight"] = max(i * o for i, o in _block_linears(config)) * size
    if training:
        mode = "fp32" if size == 4 else "16-bit autocast" if autocast else "16-bit"
        per_block = s * b * h * ACTIVATION_BYTES[mode]
        stored = config.n_layer * s * b * h * size + per_block if grad_checkpointing else config.n_layer * per_block
        parts["adapters + AdamW"] = trainable_params * 16
        parts["activations"] = stored
        parts["loss"] = -(-b * s // 8) * config.vocab_size * (2 * size + 8) + b * s * h * size
    else:
        parts["KV cache"] = 2 * config.n_layer * b * s * config.n_kv_heads * config.head_dim * size
        parts["logits"] = b * config.vocab_size * size  # prefill: the last position's only
    parts["margin"] = MARGIN
    return parts


def memory_available(device):
    """Bytes free for this run on `device`, or None when unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # reported in kB
        except OSError:  # not Linux
            return None
    return None


def _gib(n):
    return f"{n / GiB:.1f}"


def _fitting_options(config, dtype, quantize, training, batch_size, seq_len, trainable_params, autocast,
                     grad_checkpointing, available):
    """[(flags, total bytes)] of the changes that make the run fit, none of them a superset of another."""
    dtypes = [dtype] + (["bf16"] if _name(dtype) == "fp32" else [])
    smaller = QUANTIZE_KINDS[QUANTIZE_KINDS.index(quantize) + 1:] if quantize else QUANTIZE_KINDS
    checkpointing = [grad_checkpointing] + ([True] if training and not grad_checkpointing else [])
    batches = sorted({batch_size // 2 ** i for i in range(batch_size.bit_length())}, reverse=True)  # b, b/2, ..., 1
    batch_flag = "--micro_batch_size" if training else "--batch_size"
    options = []
    for d in dtypes:
        for q in [quantize, *smaller]:
            for checkpoint in checkpointing:
                for b in batches:  # with these settings, the largest batch that fits
                    total = sum(memory_needed(config, d, q, training, b, seq_len, trainable_params, autocast,
                                              checkpoint).values())
                    if total <= available:
                        flags = ([f"--dtype {_name(d)}"] if d != dtype else []) + \
                                ([f"--quantize {q}"] if q != quantize else []) + \
                                (["--grad_checkpointing"] if checkpoint != grad_checkpointing else []) + \
                                ([f"{batch_flag} {b}"] if b != batch_size else [])
                        options.append((flags, total))
                        break
    minimal = [(flags, total) for flags, total in options
               if not any(set(other) < set(flags) for other, _ in options)]
    minimal.sort(key=lambda option: (len(option[0]), -option[1]))  # fewest changes, then the least squeezed
    return [(" ".join(flags), total) for flags, total in minimal]


def check_memory(config, device, dtype, quantize=None, training=False, batch_size=1, seq_len=256,
                 trainable_params=0, autocast=False, grad_checkpointing=False, available=None):
    """The parts needed (as memory_needed) when the run fits on `device`; else raise NotEnoughMemory
    with the figures and the flags that would make it fit.

    available: bytes free (default: memory_available(device)); when unknown nothing is refused.
    """
    parts = memory_needed(config, dtype, quantize, training, batch_size, seq_len, trainable_params, autocast,
                          grad_checkpointing)
    available = memory_available(device) if available is None else available
    total = sum(parts.values())
    if available is None or total <= available:
        return parts
    largest = sorted(parts.items(), key=lambda part: -part[1])[:3]
    settings = _name(dtype) + (f" with {quantize} weights" if quantize else "")
    message = (f"{'training' if training else 'evaluation'} in {settings} needs {_gib(total)} GiB but "
               f"{_gib(available)} GiB are available on {device} (largest parts: "
               f"{', '.join(f'{name} {_gib(n)}' for name, n in largest)} GiB)")
    fits = _fitting_options(config, dtype, quantize, training, batch_size, seq_len, trainable_params, autocast,
                            grad_checkpointing, available)
    if fits:
        message += "; these fit: " + ", ".join(f"{flags} ({_gib(need)} GiB)" for flags, need in fits[:4])
    else:
        message += "; nothing fits, not even nf4 weights in 16 bits at a batch of 1: use a device with more memory"
    raise NotEnoughMemory(message, [flags for flags, _ in fits])


def default_dtype(config, device, quantize=None, training=False, batch_size=1, seq_len=256, trainable_params=0,
                  grad_checkpointing=False, available=None):
    """(dtype name, one-line note): bf16 on CUDA (the paper's frozen base); on the CPU fp32, the exact
    reference and fast on any CPU, when the run fits in the available memory, else bf16."""
    if torch.device(device).type == "cuda":
        return "bf16", "frozen base in bf16 on cuda (the paper's setting)"
    total = sum(memory_needed(config, "fp32", quantize, training, batch_size, seq_len, trainable_params,
                              False, grad_checkpointing).values())
    available = memory_available(device) if available is None else available
    if available is None:
        return "fp32", "frozen base in fp32 on the CPU (available memory unknown); --dtype bf16 halves the weights"
    if total <= available:
        return "fp32", (f"frozen base in fp32 on the CPU: it fits ({_gib(total)} of {_gib(available)} GiB "
                        "available); --dtype bf16 halves the weights")
    return "bf16", (f"frozen base in bf16: fp32 would need {_gib(total)} GiB but {_gib(available)} GiB are "
                    "available (pass --dtype fp32 to insist)")


def plan(config, device, dtype="", quantize=None, processes=1, **run):
    """(dtype name, note or None) of the frozen base for a run: `dtype` if given, else
    default_dtype's choice (and its one-line note); raises NotEnoughMemory if the run cannot fit.

    processes: how many processes of one torchrun launch share this device's memory (the CPU);
    run: training, batch_size, seq_len, trainable_params, autocast, grad_checkpointing.
    """
    available = memory_available(device)
    if available is not None:
        available //= processes
    note = None
    if not dtype:
        defaults = {k: v for k, v in run.items() if k != "autocast"}  # on the CPU, where the default matters, none
        dtype, note = default_dtype(config, device, quantize, available=available, **defaults)
    check_memory(config, device, dtype, quantize, available=available, **run)
    return dtype, note
