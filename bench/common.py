"""Pieces both benchmarks use: device timing and memory, the transformers config of a preset, table cells."""
import contextlib
import gc

import torch


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None


def free_memory(device):
    """Drop compiled graphs and cached blocks so the next model starts from an empty device."""
    torch.compiler.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def error_text(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def hf_config(config):
    """The transformers config with the same shapes as one of our presets."""
    from transformers import GPTJConfig, LlamaConfig
    if config.family == "llama":
        return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
                           num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                           num_key_value_heads=config.n_kv_heads, rms_norm_eps=config.norm_eps,
                           max_position_embeddings=config.max_seq_len, bos_token_id=config.bos_id,
                           eos_token_id=config.eos_id, tie_word_embeddings=False)
    return GPTJConfig(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.dim,
                      n_layer=config.n_layer, n_head=config.n_head, rotary_dim=config.rotary_dim,
                      n_inner=config.ffn_dim, layer_norm_epsilon=config.norm_eps, bos_token_id=config.bos_id,
                      eos_token_id=config.eos_id, tie_word_embeddings=False)


def fmt(value, pattern):
    return "-" if value is None else format(value, pattern)


def device_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform  # only for this description
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions():
    found = {"torch": torch.__version__}
    for package in ("transformers", "peft"):
        try:
            found[package] = __import__(package).__version__
        except ImportError:
            found[package] = "not installed"
    return found

