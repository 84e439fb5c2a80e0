"""LLaMA and GPT-J written out by hand, with a KV cache and loading of raw checkpoints.

One `Transformer` serves both families of the InterLoRA paper:

    LLaMA  x -> x + Attention(RMSNorm(x)) -> x + SwiGLU(RMSNorm(x))          (serial)
    GPT-J  x -> x + Attention(LN(x)) + MLP(LN(x))      one LayerNorm, both in parallel

Module names follow Meta's checkpoint (`layers.{i}.attention.wq`, `feed_forward.w2`), so
Meta's files load with strict=True and no renaming; Hugging Face keys are renamed through
a table of templates. `feed_forward.w2` is the down projection in both families (GPT-J's
fc_out), `w1` the gate (LLaMA) or fc_in (GPT-J), `w3` the up projection (LLaMA only).

Rotary embeddings use Meta's interleaved layout (pairs 2i, 2i+1) in both families; GPT-J
rotates only the first `rotary_dim` dims of each head. Hugging Face stores LLaMA's q/k rows
permuted for its rotate-half kernel, so loading un-permutes them.

Loading builds the model on the meta device and fills it one tensor at a time: read with
plain file reads, converted to the chosen dtype (or quantized by quantize.py) on the device,
its source dropped. Configs come from the checkpoint's own params.json / config.json; what
this code cannot run exactly (rope scaling, biases LLaMA has not, ...) is refused by name.

A model can be given `past_key_values`: per layer the keys and values of P positions before its
tokens, as a KV cache holds them (used as stored, never rotated, always attended; the tokens'
positions then start at P), which is also how a learned prefix reaches attention from outside.

This file never imports interlora.py: adapters are added to a loaded model from outside.
"""
import json
import math
import pickle
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quantize import QUANTIZE_KINDS, Quantizer, quantize_model


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used, with what to do about it."""


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    family: str = "llama"          # "llama" | "gptj"
    vocab_size: int = 32000
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_heads: int = 0            # 0: same as n_head (no grouped-query attention)
    ffn_dim: int = 11008           # width of the FFN's hidden activation (input of w2)
    rotary_dim: int = 0            # 0: the whole head (LLaMA); GPT-J rotates 64 dims
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.family not in ("llama", "gptj"):
            raise CheckpointError(f"model family {self.family!r} is not supported: expected llama or gptj")
        self.n_kv_heads = self.n_kv_heads or self.n_head
        self.rotary_dim = self.rotary_dim or self.head_dim
        if self.dim % self.n_head or self.n_head % self.n_kv_heads or self.rotary_dim % 2:
            raise CheckpointError(f"inconsistent model shape: dim {self.dim}, {self.n_head} heads, "
                                  f"{self.n_kv_heads} kv heads, rotary_dim {self.rotary_dim}")

    @property
    def head_dim(self):
        return self.dim // self.n_head

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise CheckpointError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self):
        return asdict(self)


# The paper's three models, plus tiny random ones (vocab 259 = the byte tokenizer of data.py).
PRESETS = {
    "llama-7b": dict(family="llama", dim=4096, n_layer=32, n_head=32, ffn_dim=11008),
    "llama-13b": dict(family="llama", dim=5120, n_layer=40, n_head=40, ffn_dim=13824),
    "gptj-6b": dict(family="gptj", vocab_size=50400, dim=4096, n_layer=28, n_head=16, ffn_dim=16384,
                    rotary_dim=64, norm_eps=1e-5, bos_id=50256, eos_id=50256),
    "tiny": dict(family="llama", vocab_size=259, dim=128, n_layer=4, n_head=4, ffn_dim=344,
                 max_seq_len=1024),
    "tiny-gptj": dict(family="gptj", vocab_size=259, dim=128, n_layer=4, n_head=4, ffn_dim=512,
                      rotary_dim=16, norm_eps=1e-5, max_seq_len=1024),
}
RANDOM_PRESETS = ("tiny", "tiny-gptj")  # random weights, no checkpoint
# The fields that fix the shapes of the weights: a checkpoint must agree on these with a preset.
SHAPE_FIELDS = ("family", "vocab_size", "dim", "n_layer", "n_head", "n_kv_heads", "ffn_dim", "rotary_dim")


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 squares lose too much), then back to the stream's dtype
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_float.type_as(x) * self.weight


def rotary_cos_sin(positions, rotary_dim, theta):
    """cos and sin of the rotary angles, each (B, T, 1, rotary_dim // 2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim)
    angles = positions[..., None].float() * inv_freq  # (B, T, rotary_dim // 2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x[2i], x[2i+1]) of the first rotary dims of each head: x is (B, T, H, D)."""
    rotary_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = x_rot.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, T, H, rotary_dim // 2)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.type_as(x), x_pass), dim=-1)


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, preallocated for `max_len` positions."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions, k, v):
        """Store k, v (B, n_kv, T, hd) at the cache positions (T,) in place; return the whole cache."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.dim, bias=False)
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, mask, cache_positions, past=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)      # (B, T, nh, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        P = 0 if past is None else past[0].shape[2]
        if self.cache is not None:
            k, v = self.cache.update(cache_positions, k, v)  # (B, nkv, max_len, hd)
            keys = T if mask is None else mask.shape[-1] - P  # the mask says how many cached keys count
            k, v = k[:, :, :keys], v[:, :, :keys]
        if P:  # keys and values of P earlier positions, as stored: (B or 1, nkv, P, hd) each
            past_k, past_v = (t.to(k.dtype).expand(B, -1, -1, -1) for t in past)
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)  # (B, nkv, P + keys, hd)
        # mask None means plain causal attention (training, prefill without padding): the fastest kernels.
        # Grouped-query attention (n_kv_heads < n_head) is SDPA's own (enable_gqa): no copies of k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_head)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """LLaMA: w2(silu(w1 x) * w3 x). GPT-J: w2(gelu_tanh(w1 x)), with biases."""

    def __init__(self, config):
        super().__init__()
        self.family = config.family
        bias = config.family == "gptj"
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=bias)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=bias)
        if config.family == "llama":
            self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)

    def forward(self, x):
        if self.family == "llama":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.parallel = config.family == "gptj"
        if self.parallel:
            # GPT-J has one LayerNorm (ln_1) feeding both attention and MLP
            self.attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        else:
            self.attention_norm = RMSNorm(config.dim, config.norm_eps)
            self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, mask, cache_positions, past=None):
        if self.parallel:
            h = self.attention_norm(x)
            return x + self.attention(h, cos, sin, mask, cache_positions, past) + self.feed_forward(h)
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_positions, past)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        if config.family == "gptj":
            self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        else:
            self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=config.family == "gptj")
        self.grad_checkpointing = False  # recompute each block in backward to save memory
        self.apply(self._init_weights)   # free on the meta device; real checkpoints overwrite it

    @staticmethod
    def _init_weights(module):
        # Random weights only matter for the tiny presets, whose base stays frozen: unit-variance
        # activations (std fan_in^-0.5) let their adapters reach confident predictions, which a
        # GPT-style std of 0.02 in a 128-wide model cannot (its logits stay within about +-3).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)

    def forward(self, idx, attention_mask=None, start_pos=0, labels=None, right_padded=False, last_only=False,
                past_key_values=None):
        """Logits (B, T, vocab) for tokens idx (B, T); given labels, the mean next-token loss instead.

        attention_mask (B, S), 1 for real tokens and 0 for padding, covers every token so far (the
        cached ones too), as in Hugging Face: S = start_pos + T, or the whole KV cache (generate's
        preallocated mask: the columns after the new tokens are not attended to). Positions count
        real tokens only, so left-padded prompts get the positions they would have alone.
        start_pos is where idx begins in the KV cache (0 without a cache): an int, or a 0-dim
        tensor while decoding, so that one compiled graph serves every position.

        right_padded=True says that every pad comes after the real tokens of its row (train.py's
        batches). Causal attention is then exact for the real tokens and their positions are
        0..T-1, so no mask is built and attention takes its causal kernel (flash attention on a
        GPU; with past_key_values, a causal mask shifted by P); attention_mask still reaches the
        adapters' gates, which read it through their hook.

        labels (B, T): position t is scored on labels[:, t + 1] (-100: not scored, as padding),
        as a mean over the scored positions, without ever holding all B x T x vocab logits.
        last_only=True: the logits of the last position only (B, 1, vocab), all that generation reads.

        past_key_values: for each layer (keys, values), each (B or 1, n_kv_heads, P, head_dim), of P
        positions before every row's tokens (the same P for all layers), as a KV cache holds them:
        used as stored (no rotary is applied to them), always attended, and the tokens' positions
        start at P, as transformers gives tokens after a P-token past. attention_mask, start_pos and
        the KV cache count the tokens only, not these P positions; pass them with every call.
        """
        B, T = idx.shape
        decoding = torch.is_tensor(start_pos)
        if attention_mask is not None and not decoding and attention_mask.shape != (B, start_pos + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, start_pos + T)}")
        if (decoding or start_pos) and self.layers[0].attention.cache is None:
            raise ValueError("start_pos > 0 needs a KV cache: call setup_cache first")
        if decoding and attention_mask is None:
            raise ValueError("a tensor start_pos needs the attention_mask of the whole KV cache")
        past = past_key_values
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past)} layers, the model {len(self.layers)}")
        P = 0 if past is None else past[0][0].shape[2]  # positions before the tokens
        cache_positions = start_pos + torch.arange(T, device=idx.device)  # (T,) where the new tokens go

        mask = None  # plain causal attention: training, and prompts without padding
        if attention_mask is None or right_padded:
            positions = cache_positions[None]  # (1, T)
        else:
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, cache_positions]  # (B, T)
        if (attention_mask is not None and not right_padded) or decoding or start_pos > 0 or P:
            keys = attention_mask.shape[1] if attention_mask is not None else start_pos + T
            key_pos = torch.arange(keys, device=idx.device)[None, :]  # (1, S)
            mask = key_pos <= cache_positions[:, None]                 # (T, S) causal
            if attention_mask is not None:
                # padding is never attended to; a pad query attends to itself so no row is empty
                mask = mask & attention_mask.bool()[:, None, :] | (key_pos == cache_positions[:, None])  # (B, T, S)
            mask = mask[:, None] if mask.dim() == 3 else mask[None, None]  # (B|1, 1, T, S)
            if P:  # the past comes first and is always attended: causal attention with an offset of P
                mask = F.pad(mask, (P, 0), value=True)  # (B|1, 1, T, P + S)
        if P:
            positions = positions + P
        cos, sin = rotary_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)

        x = self.tok_embeddings(idx)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache_positions, layer_past, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_positions, layer_past)
        x = self.norm(x[:, -1:] if last_only else x)
        if labels is None:
            return self.output(x)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the token after each position
        if self.output.weight.requires_grad:  # a trained output layer: the plain loss, with its gradient
            return F.cross_entropy(self.output(x).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ChunkedCrossEntropy.apply(x.flatten(0, 1), self.output.weight, self.output.bias, targets.flatten())

    # --------------------------------------------------------------------- generation

    def setup_cache(self, batch_size, max_len):
        param = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_len, self.config.n_kv_heads, self.config.head_dim,
                                            param.dtype, param.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def decode_step(self, token, cache_mask, position):
        """Logits (B, vocab) of the token after `token` (B, 1), which goes to cache `position` (0-dim tensor).

        Every shape is fixed for a whole generation (cache_mask (B, max_len) covers the whole
        cache), so torch.compile makes one graph of it and CUDA graphs can replay it.
        """
        return self(token, attention_mask=cache_mask, start_pos=position, last_only=True)[:, -1]

    def compiled_decode_step(self):
        """decode_step under torch.compile, made once per model. CUDA: mode reduce-overhead (CUDA graphs replay
        the step). CPU: inductor with matrix-vector products of its own for one or two rows (decode_backend)."""
        if getattr(self, "_compiled_decode_step", None) is None:
            if self.tok_embeddings.weight.is_cuda:
                self._compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, mode="reduce-overhead")
            else:
                self._compiled_decode_step = torch.compile(self.decode_step, fullgraph=True, backend=decode_backend)
        return self._compiled_decode_step

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id=None, pad_id=0, temperature=0.0, top_k=None,
                 generator=None, compile=False):
        """New tokens for each prompt (a list of token-id lists of any lengths).

        The prompts are left-padded into one batch, run once (prefill), then decoded one token
        per step with the KV cache. A row stops at eos_id (which it keeps, as transformers
        does); the loop ends when every row has stopped. temperature 0 is greedy decoding.
        compile=True runs the decode steps through compiled_decode_step().
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        device = self.tok_embeddings.weight.device
        B, prompt_len = len(prompts), max(len(p) for p in prompts)
        idx = torch.full((B, prompt_len), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, prompt_len), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            idx[row, prompt_len - len(prompt):] = torch.tensor(prompt, device=device)
            mask[row, prompt_len - len(prompt):] = True
        # the mask of the whole cache, made once: the prompt's padding is 0 and every new token is real
        # (the causal mask hides the positions not yet written), so each step has the same shapes
        cache_mask = F.pad(mask, (0, max_new_tokens), value=True)  # (B, prompt_len + max_new_tokens)
        decode_step = self.compiled_decode_step() if compile else self.decode_step

        self.setup_cache(B, prompt_len + max_new_tokens)
        try:
            logits = self(idx, attention_mask=mask, last_only=True)[:, -1]  # prefill: (B, vocab)
            position = torch.tensor(prompt_len, device=device)  # where the next token goes in the cache
            new_tokens, done = [], torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                token = self._pick(logits, temperature, top_k, generator)  # (B,)
                token = torch.where(done, pad_id, token)  # finished rows only carry padding
                new_tokens.append(token)
                if eos_id is not None:
                    done |= token == eos_id
                # done.all() waits for the device: look only every 8 steps (extra tokens are cut below)
                if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
                    break
                logits = decode_step(token[:, None], cache_mask, position)
                position += 1  # in place: the same tensor, so a compiled step sees the same input
        finally:
            self.clear_cache()

        out = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
        results = []
        for row in out:
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id) + 1]
            results.append(row)
        return results

    def generate_batches(self, prompts, batch_size, max_new_tokens, rank=0, world_size=1, **kwargs):
        """Generate for many prompts, longest first in batches of batch_size (similar lengths pad
        little); yields (prompt indices, their new tokens) as each batch finishes.

        Split over world_size processes, this one takes every world_size-th batch from `rank` on
        and yields ([], []) in a round where it has none, so that all yield equally often."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for first in range(0, len(batches), world_size):
            this_round = batches[first:first + world_size]
            chosen = this_round[rank] if rank < len(this_round) else []
            yield chosen, self.generate([prompts[i] for i in chosen], max_new_tokens, **kwargs) if chosen else []

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


# A decode step multiplies each weight W (out, in) by one row per sequence. MKL's kernel for a product of one or
# two rows reads W slowly on a CPU (this project's 2-core machine: 14 GB/s, where a plain sum reads 31), and at
# batch 1 those products are nearly the whole step. Written as a multiply and a sum over `in`, W's contiguous
# dimension, the same product is one reduction that inductor vectorizes and spreads over the cores: 27 GB/s
# there. From 4 rows on MKL's kernel is the faster (bench/speed.py --work profile measures the output layer's).
MATRIX_VECTOR_ROWS = 2


def matrix_vector(rows, weight_t):
    """rows (M, in) @ weight_t (in, out) as multiply-and-sum, accumulated in fp32: (M, out)."""
    return (rows.float()[:, None, :] * weight_t.t().float()[None]).sum(-1).to(rows.dtype)


def _few_rows(rows, weight_t):
    return (rows.device.type == "cpu" and rows.dim() == 2 and weight_t.dim() == 2 and rows.is_floating_point()
            and rows.shape[0] <= MATRIX_VECTOR_ROWS)


def decode_backend(graph, example_inputs):
    """torch.compile's inductor, except that a CPU matmul of one or two rows (aten.mm, aten.addmm: every
    nn.Linear of a decode step at batch 1 or 2) becomes the reduction above; other matmuls are inductor's."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    aten, table = torch.ops.aten, dict(select_decomp_table())
    mm, addmm = table.get(aten.mm.default), table.get(aten.addmm.default)

    def decomposed_mm(rows, weight_t, **kwargs):
        if _few_rows(rows, weight_t) and not kwargs:
            return matrix_vector(rows, weight_t)
        return mm(rows, weight_t, **kwargs) if mm else NotImplemented

    def decomposed_addmm(bias, rows, weight_t, beta=1, alpha=1, **kwargs):
        if _few_rows(rows, weight_t) and not kwargs:
            return beta * bias + alpha * matrix_vector(rows, weight_t)
        return addmm(bias, rows, weight_t, beta=beta, alpha=alpha, **kwargs) if addmm else NotImplemented

    table.update({aten.mm.default: decomposed_mm, aten.addmm.default: decomposed_addmm})
    # the compilers' caches do not key on decompositions: a graph cached by a plain torch.compile would be reused
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(graph, example_inputs, decompositions=table, config_patches={"fx_graph_cache": False})


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x W^T + b (N, vocab) against targets (N,), -100 = not scored.

    The logits are made a chunk of rows at a time and turned at once into the gradient of x:
    d loss / d x = (softmax - onehot(target)) W = softmax W - W[target], so no more than one
    chunk of logits ever exists (not N x vocab of them, nor their fp32 copy, nor their gradient)
    and backward only scales that gradient. The output layer is frozen base weight here: it gets
    no gradient (Transformer.forward takes the plain loss when it is trained). A fixed number of
    chunks, not a fixed size, so that a compiled graph serves every N.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunks=8):
        N, dim = x.shape
        rows = -(-N // chunks)  # per chunk: the last rows are padding, not scored
        x = F.pad(x, (0, 0, 0, rows * chunks - N)).view(chunks, rows, dim)
        targets = F.pad(targets, (0, rows * chunks - N), value=-100).view(chunks, rows)
        total, grads = torch.zeros((), dtype=torch.float32, device=x.device), []
        for chunk, chunk_targets in zip(x, targets):
            scored = chunk_targets != -100
            chunk_targets = chunk_targets.clamp(min=0)
            log_probs = F.linear(chunk, weight, bias).float().log_softmax(-1)  # (rows, vocab): one chunk of logits
            total -= (log_probs.gather(1, chunk_targets[:, None])[:, 0] * scored).sum()
            if ctx.needs_input_grad[0]:
                probs = log_probs.exp_()  # the softmax, in place
                grad = probs.to(x.dtype) @ weight - weight[chunk_targets]  # (rows, dim)
                grads.append(grad * scored[:, None])
        count = (targets != -100).sum()
        ctx.save_for_backward(torch.cat(grads)[:N] if grads else None, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, count = ctx.saved_tensors
        return grad_x * (grad_loss / count).to(grad_x.dtype), None, None, None, None


# ----------------------------------------------------------------------------- reading files
#
# Tensors are read one at a time with plain file reads, at offsets taken from the file's header
# (.safetensors) or from a torch.load onto the meta device (it unpickles the index of a .pth/.bin
# with weights_only=True and reads no tensor data). A memory-mapped file is released only when
# its last tensor is, so converting fp16 -> bf16 from a mapping peaks at model + file; plain
# reads peak at model + one tensor, and the page cache they fill is not this process's memory.

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class StoredTensor(NamedTuple):
    """Where one tensor's bytes are in a weights file; read() reads just those."""
    path: Path
    offset: int              # byte offset of the tensor's storage in the file
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    storage_offset: int = 0  # elements between the storage's start and the tensor's first element

    @property
    def nbytes(self):
        # the storage the tensor spans (a view may skip some of it)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        return span * self.dtype.itemsize

    def read(self, buffer=None):
        """The tensor, in a new buffer or in the first bytes of `buffer` (uint8, large enough)."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8) if buffer is None else buffer[:self.nbytes]
        view, done = memoryview(buffer.numpy()), 0
        with open(self.path, "rb") as f:
            f.seek(self.offset + self.storage_offset * self.dtype.itemsize)
            while done < len(view):  # a single read returns at most 2 GiB on Linux
                count = f.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{self.path} is truncated: it ends inside a tensor; download it again")
                done += count
        return buffer.view(self.dtype).as_strided(self.shape, self.stride)


def index_safetensors(path):
    """{name: StoredTensor} of a .safetensors file: an 8-byte little-endian header length, a JSON
    header of {name: {dtype, shape, data_offsets}}, then the raw bytes. Reads the header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is no JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid .safetensors file ({e}): it may be truncated; "
                              "download it again") from None
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{path}: the header entry of {name} is not {{dtype, shape, data_offsets}}: "
                                  "the file is corrupt; download it again")
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype, shape, offsets = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(n, int) and n >= 0 for n in shape + offsets)):
            raise CheckpointError(f"{path}: tensor {name} has shape {shape} and data_offsets {offsets}: expected "
                                  "lists of non-negative integers; the file is corrupt, download it again")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name} is {info['dtype']} {shape} ({nbytes} bytes) but its "
                                  f"data_offsets [{begin}, {end}] hold {end - begin}: the file is corrupt; "
                                  "download it again")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends at byte {data_start + end} "
                                  f"of a {size}-byte file; download it again")
        stride = torch.empty(shape, device="meta").stride()  # row-major, as safetensors stores them
        tensors[name] = StoredTensor(path, data_start + begin, dtype, tuple(shape), stride)
    return tensors


def index_torch_file(path):
    """{name: StoredTensor} of a torch .pth/.bin, from its pickled index: no tensor data is read."""
    index = _torch_load(path, map_location="meta")
    if not isinstance(index, dict) or not all(isinstance(t, torch.Tensor) for t in index.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors: expected model weights (name -> tensor), "
                              "not e.g. a training checkpoint")
    offsets = {name: getattr(t.untyped_storage(), "_checkpoint_offset", None) for name, t in index.items()}
    if None in offsets.values():
        # torch's pre-1.6 format records no offsets: read it whole (such files are old and small)
        return _torch_load(path, map_location="cpu")
    return {name: StoredTensor(path, offsets[name], t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
            for name, t in index.items()}


def _torch_load(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:  # weights_only=True met an object whose unpickling would call code
            raise CheckpointError(f"{path} is not plain weights: it holds the pickled Python object "
                                  f"{refused.group(1)}, which was not loaded (unpickling it can run code); use "
                                  "plain weights (.safetensors, or a state dict of tensors) from a trusted source"
                                  ) from None
        raise CheckpointError(f"cannot read {path}: it is no torch weights file, or it is truncated or corrupt; "
                              "download it again") from None
    except Exception as e:  # torch raises several types for truncated zips and foreign files
        reason = (str(e).strip().splitlines() or [""])[0][:150]
        if "weights_only" in reason:  # never pass on advice to turn the safety off
            reason = ""
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}{': ' + reason if reason else ''}): "
                              "the file is truncated or corrupt; download it again") from None


def index_weights(path):
    """{name: StoredTensor} of one weights file: .safetensors, or a torch .pth/.bin (never unpickling code)."""
    return index_safetensors(path) if path.suffix == ".safetensors" else index_torch_file(path)




# ----------------------------------------------------------------------------- configs

def _read_json(path):
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({e}): repair it or download it again") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} holds {type(values).__name__}, expected a JSON object of settings")
    return values


def _positive_int(values, key, path):
    if key not in values:
        raise CheckpointError(f"{path} lacks the field {key!r}: is it complete? download it again")
    if not isinstance(values[key], int) or values[key] <= 0:
        raise CheckpointError(f"{path}: {key} is {values[key]!r}, expected a positive integer")
    return values[key]


# Every field of Meta's params.json (LLaMA 1, 2, 3); anything else is refused rather than ignored.
_META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}


def _meta_shard_files(folder):
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder} has params.json but no consolidated.*.pth weights")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise CheckpointError(f"{folder}: found shards {[f.name for f in files]}, expected {expected}: "
                              "a shard is missing")
    return files


def _meta_config(folder):
    """The config of Meta's LLaMA download, from params.json."""
    path = folder / "params.json"
    params = _read_json(path)
    unknown = sorted(params.keys() - _META_FIELDS)
    if unknown:
        raise CheckpointError(f"{path}: {unknown[0]} = {json.dumps(params[unknown[0]])} is a field this loader "
                              "does not know, so it cannot promise to run the model exactly")
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{path}: use_scaled_rope = true (Llama 3.1's rope scaling) is not supported; "
                              "only plain rotary is")
    # Meta's FFN width: 2/3 of 4*dim, times an optional multiplier, rounded up to multiple_of
    dim = _positive_int(params, "dim", path)
    ffn_dim = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        ffn_dim = int(params["ffn_dim_multiplier"] * ffn_dim)
    multiple_of = params.get("multiple_of", 256)
    ffn_dim = multiple_of * ((ffn_dim + multiple_of - 1) // multiple_of)
    vocab_size = params.get("vocab_size", -1)
    if not isinstance(vocab_size, int):
        raise CheckpointError(f"{path}: vocab_size is {vocab_size!r}, expected an integer (-1: the embedding's)")
    if vocab_size <= 0:  # LLaMA-1/2 say -1: the embedding's shape knows, read from the file's index only
        index = index_torch_file(_meta_shard_files(folder)[0])
        if "tok_embeddings.weight" not in index:
            raise CheckpointError(f"{folder}: consolidated.00.pth has no tok_embeddings.weight: is it LLaMA?")
        vocab_size = index["tok_embeddings.weight"].shape[0]
    return ModelConfig(family="llama", vocab_size=vocab_size, dim=dim, n_layer=_positive_int(params, "n_layers", path),
                       n_head=_positive_int(params, "n_heads", path), n_kv_heads=params.get("n_kv_heads") or 0,
                       ffn_dim=ffn_dim, norm_eps=params.get("norm_eps", 1e-5),
                       rope_theta=params.get("rope_theta", 10000.0), max_seq_len=params.get("max_seq_len", 2048))


def _hf_config(folder):
    """(config, the raw config.json) of a Hugging Face LLaMA or GPT-J folder."""
    path = folder / "config.json"
    hf = _read_json(path)
    kind = hf.get("model_type")
    if kind not in ("llama", "gptj"):
        raise CheckpointError(f"{path}: model_type = {json.dumps(kind)} is not supported: expected llama or gptj")

    def refuse(field, why):
        raise CheckpointError(f"{path}: {field} = {json.dumps(hf[field])} is not supported ({why}); only plain "
                              f"{'LLaMA' if kind == 'llama' else 'GPT-J'} runs exactly here")
    if hf.get("quantization_config"):
        refuse("quantization_config", "pre-quantized weights: load the original ones and pass --quantize")
    if isinstance(hf.get("eos_token_id"), list):
        refuse("eos_token_id", "several end tokens")

    if kind == "llama":
        for field in ("rope_scaling", "rope_parameters"):
            rope = hf.get(field)
            if rope and (not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default"):
                refuse(field, "rope scaling; only plain rotary is")
        for field in ("attention_bias", "mlp_bias", "sliding_window"):
            if hf.get(field):
                refuse(field, "LLaMA has no biases and full causal attention")
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "LLaMA's FFN is SwiGLU")
        dim, n_head = _positive_int(hf, "hidden_size", path), _positive_int(hf, "num_attention_heads", path)
        if hf.get("head_dim") not in (None, dim // n_head):
            refuse("head_dim", f"it must be hidden_size / num_attention_heads = {dim // n_head}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return ModelConfig(family="llama", vocab_size=_positive_int(hf, "vocab_size", path), dim=dim,
                           n_layer=_positive_int(hf, "num_hidden_layers", path), n_head=n_head,
                           n_kv_heads=hf.get("num_key_value_heads") or 0,
                           ffn_dim=_positive_int(hf, "intermediate_size", path),
                           norm_eps=hf.get("rms_norm_eps", 1e-6),
                           rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                           max_seq_len=hf.get("max_position_embeddings", 2048),
                           bos_id=hf.get("bos_token_id", 1), eos_id=hf.get("eos_token_id", 2)), hf

    if hf.get("activation_function", "gelu_new") != "gelu_new":
        refuse("activation_function", "GPT-J's MLP uses gelu_new (tanh)")
    if hf.get("tie_word_embeddings"):
        refuse("tie_word_embeddings", "GPT-J's head is its own matrix with a bias")
    if "rotary_dim" in hf and hf["rotary_dim"] is None:
        refuse("rotary_dim", "transformers' GPT-J needs a rotary width")
    dim = _positive_int(hf, "n_embd", path)
    return ModelConfig(family="gptj", vocab_size=_positive_int(hf, "vocab_size", path), dim=dim,
                       n_layer=_positive_int(hf, "n_layer", path), n_head=_positive_int(hf, "n_head", path),
                       ffn_dim=hf.get("n_inner") or 4 * dim, rotary_dim=_positive_int(hf, "rotary_dim", path),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_seq_len=hf.get("n_positions", 2048),
                       bos_id=hf.get("bos_token_id", 50256), eos_id=hf.get("eos_token_id", 50256)), hf


def read_config(folder):
    """The ModelConfig of a checkpoint folder, from its params.json (Meta) or config.json (Hugging Face)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} not found: pass the folder that holds params.json "
                              "(Meta) or config.json (Hugging Face)")
    if (folder / "params.json").exists():
        return _meta_config(folder)
    if (folder / "config.json").exists():
        return _hf_config(folder)[0]
    raise CheckpointError(f"{folder} is no checkpoint folder: expected params.json + consolidated.*.pth "
                          "(Meta's LLaMA) or config.json + weights (Hugging Face)")


def model_config(model, checkpoint_dir=None):
    """(ModelConfig, folder or None) of `model`, a preset name or a checkpoint folder; reads no weights.

    Random presets (tiny, tiny-gptj): their config and no folder. Other presets: the config of
    checkpoint_dir (default checkpoints/<name>), which must have the preset's shapes. A folder:
    its own params.json / config.json.
    """
    if model in RANDOM_PRESETS:
        return ModelConfig.from_name(model), None
    if model in PRESETS:
        folder = Path(checkpoint_dir or Path("checkpoints") / model)
        if not folder.is_dir():
            raise CheckpointError(f"{model} needs its weights: checkpoint folder {folder} not found; pass "
                                  "--checkpoint_dir, or the folder itself as --model (see the README: Weights)")
        config = read_config(folder)
        check_against_preset(config, model, folder)
        return config, folder
    folder = Path(model)
    if not folder.is_dir():
        raise CheckpointError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                              "folder: name a preset, or the folder that holds params.json or config.json")
    if checkpoint_dir and Path(checkpoint_dir).resolve() != folder.resolve():
        raise CheckpointError(f"model {model!r} is a folder and checkpoint_dir {checkpoint_dir!r} another one: "
                              "pass the checkpoint folder once")
    return read_config(folder), folder


def check_against_preset(config, name, where="checkpoint"):
    """Raise CheckpointError when `config` does not have the shapes of the preset `name`."""
    preset = ModelConfig.from_name(name)
    for field in SHAPE_FIELDS:
        found, wanted = getattr(config, field), getattr(preset, field)
        if found != wanted:
            # name the preset the weights do fit, when there is one
            fits = [other for other in PRESETS if all(getattr(config, f) == getattr(ModelConfig.from_name(other), f)
                                                     for f in SHAPE_FIELDS)]
            hint = f"these are {fits[0]} weights" if fits else f"is this the folder of {name}?"
            raise CheckpointError(f"{where}: checkpoint {field} {found} != {name} {field} {wanted}: {hint}")


# ----------------------------------------------------------------------------- checkpoint formats
#
# Each yields (our name, pieces, dim, heads): the stored pieces of one tensor, joined along dim
# (Meta's model-parallel shards; None: one piece or replicated), and the number of heads whose
# q/k rows must be un-permuted (Hugging Face LLaMA; None: leave as stored).

def _meta_tensors(folder, config):
    """Meta's LLaMA download: consolidated.NN.pth model-parallel shards."""
    files = _meta_shard_files(folder)
    shards = [index_torch_file(f) for f in files]
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise CheckpointError(f"{file} holds other tensors than {files[0].name}: the shards do not belong "
                                  "together")
    # every shard holds a 1/n slice of the embedding's width: a missing last shard shows here
    width = shards[0]["tok_embeddings.weight"].shape[1] * len(shards)
    if width != config.dim:
        raise CheckpointError(f"{folder}: {len(shards)} shard(s) give an embedding width of {width} but "
                              f"params.json says dim {config.dim}: is a shard missing?")
    for name in shards[0]:
        if name == "rope.freqs":  # a precomputed rotary table in LLaMA-1 files; we compute it
            continue
        yield name, [shard[name] for shard in shards], _shard_dim(name), None


def _shard_dim(name):
    """The dimension along which Meta split a tensor across model-parallel shards (None: replicated)."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # the embedding is split along its width; wo, w2 are row-parallel
    return 0      # wq, wk, wv, w1, w3 and output are column-parallel


# Hugging Face key -> our key; "{}" is the layer index.
_HF_LLAMA_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
_HF_GPTJ_KEYS = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
    "transformer.h.{}.ln_1.weight": "layers.{}.attention_norm.weight",
    "transformer.h.{}.ln_1.bias": "layers.{}.attention_norm.bias",
    "transformer.h.{}.attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "transformer.h.{}.attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "transformer.h.{}.attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "transformer.h.{}.attn.out_proj.weight": "layers.{}.attention.wo.weight",
    "transformer.h.{}.mlp.fc_in.weight": "layers.{}.feed_forward.w1.weight",
    "transformer.h.{}.mlp.fc_in.bias": "layers.{}.feed_forward.w1.bias",
    "transformer.h.{}.mlp.fc_out.weight": "layers.{}.feed_forward.w2.weight",
    "transformer.h.{}.mlp.fc_out.bias": "layers.{}.feed_forward.w2.bias",
}
# Buffers that old Hugging Face files carry and our model computes instead.
_HF_DROPPED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _hf_weight_files(folder):
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).exists():
            weight_map = _read_json(folder / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{folder / index_name} has no weight_map: download it again")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{folder}/{index_name} lists {', '.join(missing)}, which are missing: "
                                      "download every shard")
            return files
        if (folder / single_name).exists():
            return [folder / single_name]
    raise CheckpointError(f"{folder} has config.json but no weights: expected model.safetensors or "
                          "pytorch_model.bin (or a sharded index of them)")


def _hf_tensors(folder, config, hf):
    """A Hugging Face LLaMA or GPT-J folder: .safetensors or .bin weights, single or sharded."""
    templates = _HF_LLAMA_KEYS if config.family == "llama" else _HF_GPTJ_KEYS
    stored = {}
    for file in _hf_weight_files(folder):
        stored.update(index_weights(file))
    if config.family == "llama" and "lm_head.weight" not in stored and hf.get("tie_word_embeddings") \
            and "model.embed_tokens.weight" in stored:
        stored["lm_head.weight"] = stored["model.embed_tokens.weight"]  # one source, read once
    for hf_name, tensor in stored.items():
        if hf_name.endswith(_HF_DROPPED):
            continue
        name = _rename(hf_name, templates)
        if name is None:
            raise CheckpointError(f"{folder}: unexpected tensor {hf_name} in a {config.family} checkpoint")
        heads = None
        if config.family == "llama" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = config.n_head if name.endswith("wq.weight") else config.n_kv_heads
        yield name, [tensor], None, heads


def _rename(hf_name, templates):
    parts = hf_name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    template = ".".join("{}" if p.isdigit() else p for p in parts)
    if template not in templates:
        return None
    return templates[template].format(*numbers)


# ----------------------------------------------------------------------------- loading

DTYPE_CHOICES = (torch.float32, torch.bfloat16, torch.float16)


def load_checkpoint(path, name=None, device="cpu", dtype=None, quantize=None):
    """The model in a checkpoint folder (Meta's LLaMA download, or Hugging Face LLaMA / GPT-J), in eval mode.

    The config comes from the folder's own params.json or config.json; when `name` names a
    preset, the shapes must agree with it. dtype is the frozen base's (default: the
    checkpoint's own); quantize ("int8", "nf4" or None) stores the linear layers of the blocks
    quantized. The model is built on the meta device and filled one tensor at a time, each read,
    converted (or quantized) on `device` and its source dropped, so memory stays near one copy
    of the finished model.
    """
    folder = Path(path)
    config = read_config(folder)
    if name is not None:
        check_against_preset(config, name, folder)
    if (folder / "params.json").exists():
        tensors = _meta_tensors(folder, config)
    else:
        tensors = _hf_tensors(folder, config, _hf_config(folder)[1])
    return _assemble(config, tensors, device, dtype, quantize, folder)


def load_model(model, checkpoint_dir=None, device="cpu", dtype=None, quantize=None, seed=0):
    """`model` (a preset name or a checkpoint folder, as in model_config) in eval mode: random weights
    (seeded) for the tiny presets, else the checkpoint. dtype and quantize as in load_checkpoint."""
    config, folder = model_config(model, checkpoint_dir)
    if folder is not None:
        return load_checkpoint(folder, name=model if model in PRESETS else None, device=device, dtype=dtype,
                               quantize=quantize)
    with torch.random.fork_rng(devices=[]):  # the same weights on every machine, the caller's RNG untouched
        torch.manual_seed(seed)
        random = Transformer(config)
    tensors = ((key, [tensor], None, None) for key, tensor in random.state_dict().items())
    return _assemble(config, tensors, device, dtype or torch.float32, quantize, model)


class _ReadBuffer:
    """One buffer for every tensor that is read to be converted, joined or quantized: a buffer per
    tensor would leave the allocator's heap full of holes (measured: +40% RSS on a 650 MB model)."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def read(self, stored):
        if not isinstance(stored, StoredTensor):  # already in memory (random presets, torch's pre-1.6 files)
            return stored
        if self.buffer.numel() < stored.nbytes:
            self.buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
        return stored.read(self.buffer)  # valid until the next read


def _materialize(pieces, shape, dim, heads, dtype, device, reader):
    """One tensor of `shape` in `dtype` on `device`, in one allocation: each stored piece is read into
    the reader's buffer and copied (converted, un-permuted) into its slice. A single piece already in
    `dtype` on the CPU is read into memory of its own instead, which becomes the parameter."""
    first = pieces[0]
    if len(pieces) == 1 and not heads and first.dtype == dtype and torch.device(device).type == "cpu":
        return first.read() if isinstance(first, StoredTensor) else first
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if heads:
        # Hugging Face permutes the q/k rows of each head for its rotate-half rotary: [evens..., odds...];
        # Meta's (and ours) are the interleaved pairs [e0, o0, e1, o1, ...]
        out_dim, in_dim = shape
        half = out_dim // heads // 2
        tensor.view(heads, half, 2, in_dim).transpose(1, 2).copy_(reader.read(first).reshape(heads, 2, half, in_dim))
    elif dim is None:  # one piece, or the same in every shard
        tensor.copy_(reader.read(first))
    else:
        start = 0
        for piece in pieces:
            tensor.narrow(dim, start, piece.shape[dim]).copy_(reader.read(piece))
            start += piece.shape[dim]
    return tensor


def _assemble(config, tensors, device, dtype, quantize, where):
    """A model of `config` on `device` from (name, pieces, dim, heads) of stored tensors, in eval mode."""
    if dtype not in (None, *DTYPE_CHOICES):
        raise CheckpointError(f"dtype {dtype} is not one of {', '.join(map(str, DTYPE_CHOICES))}")
    if quantize not in (None, *QUANTIZE_KINDS):
        raise CheckpointError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_KINDS)} (or None)")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # the shapes stored in a checkpoint
    to_quantize = set()
    if quantize:
        try:  # empty quantized layers in place of the blocks' nn.Linear, still on the meta device
            to_quantize = {f"{name}.weight" for name in quantize_model(model, quantize)}
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None

    state, converted = {}, {}  # converted: source -> its copy on the device (tied weights: one copy)
    reader = _ReadBuffer()
    quantizer = Quantizer(quantize, device) if quantize else None
    for key, pieces, dim, heads in tensors:
        if key not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {key}: is this a {config.family} checkpoint?")
        if dtype is None:  # the checkpoint's own dtype, taken from the first tensor, for every tensor
            dtype = pieces[0].dtype
        if len(pieces) == 1 and pieces[0] in converted:
            state[key] = converted[pieces[0]]
            continue
        shape = list(pieces[0].shape)
        if dim is not None:  # Meta's model-parallel pieces, joined
            shape[dim] = sum(p.shape[dim] for p in pieces)
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(shape)} but the config gives "
                                  f"{tuple(expected[key])}: the weights do not match params.json/config.json")
        if key not in to_quantize:
            state[key] = converted[pieces[0]] = _materialize(pieces, shape, dim, heads, dtype, device, reader)
            continue
        # quantized from its stored precision (quantize_weight works in fp32), on the CPU straight
        # from the read buffer
        if len(pieces) == 1 and not heads and torch.device(device).type == "cpu":
            weight = reader.read(pieces[0])
        else:
            weight = _materialize(pieces, shape, dim, heads, pieces[0].dtype, device, reader)
        prefix = key.removesuffix("weight")
        state.update({prefix + buffer: t for buffer, t in quantizer(weight).items()})
        del weight
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise CheckpointError(f"{where}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}: "
                              "is a weights file missing?")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
