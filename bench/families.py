"""The numbers a user plans with, for the LLaMA-family models fine-tuned today: trainable
parameters of InterLoRA (r=4 on q, v, down, with its gates) and LoRA (r=10 on q, v), and what
machinery/memory.py says training needs in bf16 and with --quantize nf4.

    python bench/families.py               # a Markdown table; nothing is downloaded or allocated

Each model's config.json is written here from the published file (the fields our loader reads)
and read through checkpoints.read_config, as a downloaded folder's would be. The counts are
taken two ways: model.py's Transformer built on the meta device with the adapters added
(machinery/adapters.py, as train.py counts them), and a closed-form sum over the adapted layers
(closed_form below). The memory plan is train.py's on CUDA at its defaults: --micro_batch_size
4, --cutoff_len 256, bf16 autocast, no --grad_checkpointing, InterLoRA's trainable parameters.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as python bench/families.py
from machinery import adapters, memory  # noqa: E402
from machinery.checkpoints import read_config  # noqa: E402
from model import Transformer  # noqa: E402

GiB = 2 ** 30
BATCH, SEQ_LEN = 4, 256  # train.py's --micro_batch_size and --cutoff_len defaults

LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
          "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 128000,
          "eos_token_id": 128001, "max_position_embeddings": 131072, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256}
# config.json of each base model as published on the Hugging Face Hub (meta-llama/..., mistralai/
# Mistral-7B-v0.3, Qwen/Qwen2.5-7B), less fields that change no shape (torch_dtype, use_cache, ...)
CONFIGS = {
    "Llama-3.1-8B": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": False},
    "Llama-3.2-1B": {**LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "head_dim": 64,
                     "num_hidden_layers": 16, "num_attention_heads": 32,
                     "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True},
    "Llama-3.2-3B": {**LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "head_dim": 128,
                     "num_hidden_layers": 28, "num_attention_heads": 24,
                     "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True},
    "Mistral-7B-v0.3": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                        "hidden_size": 4096, "intermediate_size": 14336,
                        "max_position_embeddings": 32768, "num_attention_heads": 32,
                        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                        "rope_theta": 1000000.0, "sliding_window": None,
                        "tie_word_embeddings": False, "vocab_size": 32768},
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
                   "hidden_size": 3584, "intermediate_size": 18944,
                   "max_position_embeddings": 131072, "max_window_layers": 28,
                   "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
                   "use_sliding_window": False, "tie_word_embeddings": False,
                   "vocab_size": 152064},
}
METHODS = ("interlora", "lora")  # the paper's settings: r=4 and r=10, alpha 2r


def model_config(name):
    """Our ModelConfig of a published config.json, read as the loader reads a folder's."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(CONFIGS[name]))
        return read_config(folder)


def counted(config, method):
    """(trainable, frozen) parameters of model.py's model with `method` added, on meta."""
    with torch.device("meta"):
        model = Transformer(config)
    adapters.add_adapters(model, adapters.make_config(method))
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if adapters.is_adapter_parameter(n))
    return trainable, sum(p.numel() for p in model.parameters()) - trainable  # tied: once


def closed_form(config, cfg):
    """The adapters' parameters, summed by hand: per adapted (d_in -> d_out) layer, LoRA's
    r (d_in + d_out) (Eq. 4); a head gate d_in + heads (Eq. 5); an FFN gate d_in + d_out (Eq. 7)
    and, for relu, its one alpha."""
    heads, kv_heads, d = config.n_head, config.n_kv_heads, config.dim
    shapes = {"q": (d, heads * config.head_dim, heads),
              "k": (d, kv_heads * config.head_dim, kv_heads),
              "v": (d, kv_heads * config.head_dim, kv_heads),
              "gate": (d, config.ffn_dim, None), "up": (d, config.ffn_dim, None),
              "down": (config.ffn_dim, d, None)}
    per_layer = 0
    for role in cfg.attention_targets + cfg.ffn_targets:
        d_in, d_out, n = shapes[role]
        per_layer += cfg.r * (d_in + d_out)
        if role in cfg.attention_targets and cfg.attention_gate:
            per_layer += d_in + n
        elif role in cfg.ffn_targets and cfg.ffn_gate != "none":
            per_layer += d_in + d_out + (cfg.ffn_gate == "relu")
    return config.n_layer * per_layer


def training_plan(config, trainable, quantize=None):
    """memory.py's parts (bytes) for train.py on CUDA at its defaults, the base in bf16."""
    return memory.memory_needed(config, "bf16", quantize, training=True, batch_size=BATCH,
                                seq_len=SEQ_LEN, trainable_params=trainable, autocast=True)


def rows():
    """One dict per model: the shape, both counts of both methods, the two memory plans."""
    for name in CONFIGS:
        config = model_config(name)
        row = {"model": name, "config": config}
        for method in METHODS:
            row[method], row["total"] = counted(config, method)
            row[method + " closed form"] = closed_form(config, adapters.make_config(method))
        for quantize in (None, "nf4"):
            row[quantize or "bf16"] = training_plan(config, row["interlora"], quantize)
        yield row


def table(all_rows):
    def gib(parts, part=None):
        return f"{(parts[part] if part else sum(parts.values())) / GiB:.1f}"
    lines = ["| model | layers x width, heads / kv, FFN, vocab | parameters | InterLoRA r=4 "
             "| LoRA r=10 | train bf16 (GiB) | train nf4 (GiB) | weights bf16 / nf4 "
             "| activations | loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in all_rows:
        c = row["config"]
        shape = (f"{c.n_layer} x {c.dim}, {c.n_head} / {c.n_kv_heads}, {c.ffn_dim}, "
                 f"{c.vocab_size:,}{' tied' if c.tie_embeddings else ''}")
        counts = []
        for method in METHODS:  # one figure when both ways agree, both when they do not
            ours, formula = row[method], row[method + " closed form"]
            counts.append(f"{ours:,}" if ours == formula else f"{ours:,} != {formula:,} (formula)")
        lines.append(f"| {row['model']} | {shape} | {row['total'] / 1e9:.2f}B | {counts[0]} | "
                     f"{counts[1]} | {gib(row['bf16'])} | {gib(row['nf4'])} | "
                     f"{gib(row['bf16'], 'weights')} / {gib(row['nf4'], 'weights')} | "
                     f"{gib(row['bf16'], 'activations')} | {gib(row['bf16'], 'loss')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.parse_args(argv)
    all_rows = list(rows())
    print(table(all_rows))
    print(f"\nparameters: the base's, tied embeddings counted once. Training: train.py on CUDA at "
          f"its defaults (batch {BATCH} x {SEQ_LEN} tokens, bf16 autocast), InterLoRA's adapters "
          "with AdamW; memory.py's estimate, its 1 GiB margin included (GiB = 2^30 bytes)")
    return all_rows


if __name__ == "__main__":
    main()
