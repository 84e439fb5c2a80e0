"""LLaMA and GPT-J written out by hand, with a KV cache and generation.

One `Transformer` serves both families of the InterLoRA paper:

    LLaMA  x -> x + Attention(RMSNorm(x)) -> x + SwiGLU(RMSNorm(x))          (serial)
    GPT-J  x -> x + Attention(LN(x)) + MLP(LN(x))      one LayerNorm, both in parallel

Module names follow Meta's checkpoint (`layers.{i}.attention.wq`, `feed_forward.w2`), so
Meta's files load with strict=True and no renaming; checkpoints.py renames Hugging Face keys
and reads every format into this model. `feed_forward.w2` is the down projection in both
families (GPT-J's fc_out), `w1` the gate (LLaMA) or fc_in (GPT-J), `w3` the up projection
(LLaMA only).

Rotary embeddings use Meta's interleaved layout (pairs 2i, 2i+1) in both families; GPT-J
rotates only the first `rotary_dim` dims of each head (Hugging Face's permuted q/k rows are
un-permuted on loading).

A model can be given `past_key_values`: per layer the keys and values of P positions before its
tokens, as a KV cache holds them (used as stored, never rotated, always attended; the tokens'
positions then start at P), which is also how a learned prefix reaches attention from outside.

This file never imports interlora.py: adapters are added to a loaded model from outside.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    eos_id: int = 2                # the first end id when the checkpoint names several
    eos_ids: tuple = ()            # every end id of the checkpoint (Llama 3's eos_token_id lists)
    qkv_bias: bool = False         # Qwen2: biases on q, k and v
    # the output layer is the embedding matrix (Llama 3.2 1B/3B, small Qwen2.5)
    tie_embeddings: bool = False
    # rope scaling of type llama3 (Llama 3.1+); rope_factor 0: plain rotary
    rope_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Mistral: 0 none; a run whose sequences exceed it is refused (machinery/checkpoints.py)
    sliding_window: int = 0

    def __post_init__(self):
        if self.family not in ("llama", "gptj"):
            raise CheckpointError(f"model family {self.family!r} is not supported: "
                                  "expected llama or gptj")
        self.n_kv_heads = self.n_kv_heads or self.n_head
        self.eos_ids = tuple(self.eos_ids) or (self.eos_id,)
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
SHAPE_FIELDS = ("family", "vocab_size", "dim", "n_layer", "n_head", "n_kv_heads", "ffn_dim",
                "rotary_dim")


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


def rotary_frequencies(config, device=None):
    """The rotary inverse frequencies (rotary_dim // 2,) in fp32, with Llama 3's scaling if set.

    llama3 scaling (Meta's apply_scaling): wavelengths shorter than original / high_freq_factor
    are kept, longer than original / low_freq_factor divided by factor, and in between a smooth
    interpolation of the two."""
    dim = config.rotary_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    if not config.rope_factor:
        return inv_freq
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, mixed, scaled)


def rotary_cos_sin(positions, inv_freq):
    """cos and sin of the rotary angles, each (B, T, 1, rotary_dim // 2), in fp32."""
    angles = positions[..., None].float() * inv_freq  # (B, T, rotary_dim // 2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x[2i], x[2i+1]) of the first rotary dims of each head: x (B, T, H, D)."""
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
        """Store k, v (B, n_kv, T, hd) at the cache positions (T,) in place; return the cache."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_heads = config.n_head, config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.qkv_bias
        self.wq = nn.Linear(config.dim, config.n_head * self.head_dim, bias=bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
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
            keys = T if mask is None else mask.shape[-1] - P  # the mask: how many cached keys count
            k, v = k[:, :, :keys], v[:, :, :keys]
        if P:  # keys and values of P earlier positions, as stored: (B or 1, nkv, P, hd) each
            past_k, past_v = (t.to(k.dtype).expand(B, -1, -1, -1) for t in past)
            k = torch.cat((past_k, k), dim=2)  # (B, nkv, P + keys, hd)
            v = torch.cat((past_v, v), dim=2)
        # mask None means plain causal attention (training, prefill without padding): the fastest
        # kernels. Grouped-query attention (n_kv_heads < n_head) is SDPA's own (enable_gqa): no
        # copies of k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_head)
        # y: (B, nh, T, hd)
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
            attended = self.attention(h, cos, sin, mask, cache_positions, past)
            return x + attended + self.feed_forward(h)
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_positions, past)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------- model

def next_token_loss(x, output, targets):
    """Mean cross-entropy of output(x) (B, T, vocab) against targets (B, T); -100: not scored."""
    logits = output(x).flatten(0, 1).float()  # (B * T, vocab)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)


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
        if config.tie_embeddings:  # one shared matrix: a parameter of the embedding, counted once
            self.output.weight = self.tok_embeddings.weight
        self.grad_checkpointing = False  # recompute each block in backward to save memory
        self.loss_function = next_token_loss  # train.py's: fused.chunked_loss, the same numbers
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

    def forward(self, idx, attention_mask=None, start_pos=0, labels=None, right_padded=False,
                last_only=False, past_key_values=None):
        """Logits (B, T, vocab) for tokens idx (B, T); given labels, the mean next-token loss.

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
        as a mean over the scored positions, by self.loss_function (train.py sets the chunked
        loss of machinery/fused.py, which never holds all B x T x vocab logits).
        last_only=True: the logits of the last position only (B, 1, vocab), what generation reads.

        past_key_values: for each layer (keys, values), each (B or 1, n_kv_heads, P, head_dim), of P
        positions before every row's tokens (the same P for all layers), as a KV cache holds them:
        used as stored (no rotary is applied to them), always attended, and the tokens' positions
        start at P, as transformers gives tokens after a P-token past. attention_mask, start_pos and
        the KV cache count the tokens only, not these P positions; pass them with every call.
        """
        B, T = idx.shape
        decoding = torch.is_tensor(start_pos)
        expected = (B, start_pos + T)
        if attention_mask is not None and not decoding and attention_mask.shape != expected:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {expected}")
        if (decoding or start_pos) and self.layers[0].attention.cache is None:
            raise ValueError("start_pos > 0 needs a KV cache: call setup_cache first")
        if decoding and attention_mask is None:
            raise ValueError("a tensor start_pos needs the attention_mask of the whole KV cache")
        past = past_key_values
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past)} layers, "
                             f"the model {len(self.layers)}")
        P = 0 if past is None else past[0][0].shape[2]  # positions before the tokens
        # (T,) where the new tokens go in the KV cache
        cache_positions = start_pos + torch.arange(T, device=idx.device)

        mask = None  # plain causal attention: training, and prompts without padding
        if attention_mask is None or right_padded:
            positions = cache_positions[None]  # (1, T)
        else:
            real_so_far = attention_mask.long().cumsum(1) - 1  # (B, S): a row's real tokens before
            positions = real_so_far.clamp(min=0)[:, cache_positions]  # (B, T)
        if (attention_mask is not None and not right_padded) or decoding or start_pos > 0 or P:
            keys = attention_mask.shape[1] if attention_mask is not None else start_pos + T
            key_pos = torch.arange(keys, device=idx.device)[None, :]  # (1, S)
            mask = key_pos <= cache_positions[:, None]                 # (T, S) causal
            if attention_mask is not None:
                # padding is never attended to; a pad query attends to itself so no row is empty
                itself = key_pos == cache_positions[:, None]  # (T, S)
                mask = mask & attention_mask.bool()[:, None, :] | itself  # (B, T, S)
            mask = mask[:, None] if mask.dim() == 3 else mask[None, None]  # (B|1, 1, T, S)
            if P:  # the past comes first and is always attended: causal with an offset of P
                mask = F.pad(mask, (P, 0), value=True)  # (B|1, 1, T, P + S)
        if P:
            positions = positions + P
        cos, sin = rotary_cos_sin(positions, rotary_frequencies(self.config, idx.device))

        x = self.tok_embeddings(idx)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else past[i]
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, cache_positions, layer_past,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_positions, layer_past)
        x = self.norm(x[:, -1:] if last_only else x)
        if labels is None:
            return self.output(x)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): the token after each position
        return self.loss_function(x, self.output, targets)

    # --------------------------------------------------------------------- generation

    def setup_cache(self, batch_size, max_len):
        param = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_len, self.config.n_kv_heads,
                                            self.config.head_dim, param.dtype, param.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def decode_step(self, token, cache_mask, position):
        """Logits (B, vocab) of the token after `token` (B, 1), which goes to cache `position`
        (a 0-dim tensor).

        Every shape is fixed for a whole generation (cache_mask (B, max_len) covers the whole
        cache), so torch.compile makes one graph of it and CUDA graphs can replay it.
        """
        return self(token, attention_mask=cache_mask, start_pos=position, last_only=True)[:, -1]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id=None, pad_id=0, temperature=0.0, top_k=None,
                 generator=None, decode_step=None):
        """New tokens for each prompt (a list of token-id lists of any lengths).

        The prompts are left-padded into one batch, run once (prefill), then decoded one token
        per step with the KV cache. A row stops at eos_id, an id or a list of them (a
        tokenizer's stop_ids), which it keeps, as transformers does; the loop ends when every row
        has stopped. temperature 0 is greedy decoding.
        decode_step: what runs each step (default self.decode_step; eval.py passes a compiled
        one, machinery/decode.py).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        device = self.tok_embeddings.weight.device
        stops = [] if eos_id is None else [eos_id]
        if isinstance(eos_id, (list, tuple)):
            stops = list(eos_id)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)  # (number of stops,)
        B, prompt_len = len(prompts), max(len(p) for p in prompts)
        idx = torch.full((B, prompt_len), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((B, prompt_len), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            idx[row, prompt_len - len(prompt):] = torch.tensor(prompt, device=device)
            mask[row, prompt_len - len(prompt):] = True
        # the mask of the whole cache, made once: the prompt's padding is 0, every new token real
        # (the causal mask hides the positions not yet written), so each step has the same shapes
        cache_mask = F.pad(mask, (0, max_new_tokens), value=True)  # (B, prompt + max_new_tokens)
        decode_step = decode_step or self.decode_step

        self.setup_cache(B, prompt_len + max_new_tokens)
        try:
            logits = self(idx, attention_mask=mask, last_only=True)[:, -1]  # prefill: (B, vocab)
            position = torch.tensor(prompt_len, device=device)  # where the next token goes
            new_tokens, done = [], torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                token = self._pick(logits, temperature, top_k, generator)  # (B,)
                token = torch.where(done, pad_id, token)  # finished rows only carry padding
                new_tokens.append(token)
                done |= torch.isin(token, stop_ids)
                # done.all() waits for the device: look every 8 steps (extra tokens are cut below)
                if step == max_new_tokens - 1 or (step % 8 == 7 and done.all()):
                    break
                logits = decode_step(token[:, None], cache_mask, position)
                position += 1  # in place: the same tensor, so a compiled step sees the same input
        finally:
            self.clear_cache()

        out = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
        results = []
        for row in out:
            ends = [i for i, t in enumerate(row) if t in stops]
            if ends:
                row = row[: ends[0] + 1]
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
            batch = [prompts[i] for i in chosen]
            yield chosen, self.generate(batch, max_new_tokens, **kwargs) if chosen else []

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
