"""model.py and checkpoints.py against Hugging Face transformers, on tiny random models saved to disk.

Each tiny LlamaForCausalLM / GPTJForCausalLM is saved the way transformers saves it (and
rewritten by these tests in Meta's consolidated.NN.pth layout and in the older .bin
layouts), loaded back through `load_checkpoint`, and compared with transformers itself:
logits within 1e-5 in fp32, greedy tokens exactly, with and without left padding and a
KV cache. Parameter counts on the meta device are compared with the published model
sizes and with transformers' own models. Bad folders must give one-line CheckpointErrors.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

from machinery.checkpoints import StoredTensor, load_checkpoint, load_model, model_config
from model import CheckpointError, ModelConfig, Transformer
from machinery.quantize import quantize_model

VOCAB = 300        # even, so Meta's model-parallel split of `output` is exact
DIM, N_LAYER, N_HEAD = 64, 2, 4
MULTIPLE_OF = 32   # Meta's rule: 32 * ceil(int(2/3 * 4 * 64) / 32) = 32 * ceil(170 / 32) = 192
FFN_DIM = 192
NORM_EPS = 1e-6
KINDS = ["llama", "llama-gqa", "gptj"]


# ----------------------------------------------------------------------------- reference models

def randomize_(hf_model):
    """Random norm weights and biases (transformers initialises them to 1 and 0), so that a
    swapped norm or a dropped bias changes the logits."""
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn_like(param))
    return hf_model.eval()


def tiny_hf_model(kind):
    torch.manual_seed({"llama": 0, "llama-gqa": 1, "gptj": 2}[kind])
    if kind == "gptj":
        # rotary_dim 8 < head_dim 16: the partial rotary is exercised; bos/eos inside the vocab
        config = GPTJConfig(vocab_size=VOCAB, n_embd=DIM, n_layer=N_LAYER, n_head=N_HEAD, rotary_dim=8,
                            n_positions=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            initializer_range=0.1)
        return randomize_(GPTJForCausalLM(config))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN_DIM, num_hidden_layers=N_LAYER,
                         num_attention_heads=N_HEAD, num_key_value_heads=2 if kind == "llama-gqa" else N_HEAD,
                         max_position_embeddings=128, rms_norm_eps=NORM_EPS, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, initializer_range=0.1, tie_word_embeddings=False)
    return randomize_(LlamaForCausalLM(config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (transformers model, folder it was saved to with save_pretrained), built once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            hf_model = tiny_hf_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            hf_model.save_pretrained(folder)
            cache[kind] = hf_model, folder
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def loaded(saved):
    """kind -> (transformers model, our model loaded from its folder)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            hf_model, folder = saved(kind)
            cache[kind] = hf_model, load_checkpoint(folder).eval()
        return cache[kind]
    return get


def random_tokens(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)  # no pad/bos/eos ids


@torch.no_grad()
def hf_logits(hf_model, idx, **kwargs):
    return hf_model(idx, **kwargs).logits


@torch.no_grad()
def hf_greedy(hf_model, prompt, max_new_tokens=20, **kwargs):
    """transformers' greedy tokens after a (1, T) or left-padded (B, T) prompt."""
    kwargs.setdefault("eos_token_id", None)
    out = hf_model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, prompt.shape[1]:].tolist()



def assert_logits_equal(ours, reference, atol=1e-5):
    torch.testing.assert_close(ours, reference, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- writing other layouts

def hf_permute(w, n_heads):
    """transformers' convert_llama_weights_to_hf permute: Meta's interleaved q/k rows -> rotate-half."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_unpermute(w, n_heads):
    """The inverse of hf_permute: within each head, rows [evens..., odds...] -> [e0, o0, e1, o1, ...]."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_state_dict(hf_model):
    """The tiny HF LLaMA's weights under Meta's names and q/k layout, with LLaMA-1's rope.freqs."""
    config, hf = hf_model.config, hf_model.state_dict()
    head_dim = config.hidden_size // config.num_attention_heads
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "output.weight": hf["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update({
            f"layers.{i}.attention.wq.weight": meta_unpermute(hf[p + "self_attn.q_proj.weight"],
                                                              config.num_attention_heads),
            f"layers.{i}.attention.wk.weight": meta_unpermute(hf[p + "self_attn.k_proj.weight"],
                                                              config.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    state["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return state


def meta_split_dim(name):
    """How Meta's model-parallel layers split a tensor: None = replicated in every shard."""
    if name.endswith("norm.weight") or name == "rope.freqs":
        return None
    if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
        return 1  # ParallelEmbedding splits the width; RowParallelLinear splits the input
    return 0      # ColumnParallelLinear: wq, wk, wv, w1, w3, output


def write_meta(folder, hf_model, n_shards):
    """A Meta LLaMA download: params.json and n_shards consolidated.NN.pth model-parallel files."""
    folder.mkdir()
    config = hf_model.config
    params = {"dim": config.hidden_size, "multiple_of": MULTIPLE_OF, "n_heads": config.num_attention_heads,
              "n_layers": config.num_hidden_layers, "norm_eps": config.rms_norm_eps, "vocab_size": -1}
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads  # as Llama-2-70B's params.json
    (folder / "params.json").write_text(json.dumps(params))
    state = meta_state_dict(hf_model)
    for rank in range(n_shards):
        shard = {}
        for name, tensor in state.items():
            dim = meta_split_dim(name)
            shard[name] = tensor.clone() if dim is None else tensor.chunk(n_shards, dim=dim)[rank].clone()
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


def write_bin(folder, state, n_shards):
    """Old transformers layout: pytorch_model.bin, or shards with pytorch_model.bin.index.json."""
    if n_shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(n_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = names[i::n_shards]
        torch.save({name: state[name] for name in part}, folder / file)
        weight_map.update({name: file for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def copy_config(source, folder):
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


def check_error(fragments, *args, **kwargs):
    """load_checkpoint(*args) raises a one-line CheckpointError containing every fragment."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(loaded, kind):
    hf_model, model = loaded(kind)
    idx = random_tokens(4, 12)
    with torch.no_grad():
        assert_logits_equal(model(idx), hf_logits(hf_model, idx))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(loaded, kind):
    hf_model, model = loaded(kind)
    for seed in range(2):
        prompt = random_tokens(1, 6, seed=seed)
        expected = hf_greedy(hf_model, prompt)[0]
        assert len(expected) == 20 and len(set(expected)) > 1  # nothing stopped early, not one token
        assert model.generate(prompt.tolist(), 20) == [expected]


def left_padded(rows):
    """A left-padded (B, T) batch with pad id 0 and its attention mask, from token lists."""
    length = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return idx, mask


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_matches_transformers(loaded, kind):
    hf_model, model = loaded(kind)
    full = random_tokens(3, 9, seed=3)
    rows = [full[0, :9].tolist(), full[1, :4].tolist(), full[2, :6].tolist()]
    idx, mask = left_padded(rows)
    with torch.no_grad():
        logits = model(idx, attention_mask=mask)
    for i, row in enumerate(rows):
        # each real token's logits are those of the row run alone, unpadded, by transformers
        alone = hf_logits(hf_model, torch.tensor([row]))[0]
        assert_logits_equal(logits[i, mask[i].bool()], alone)
    # and transformers' own left-padded batched generation gives the same tokens
    expected = hf_greedy(hf_model, idx, attention_mask=mask)
    assert model.generate(rows, 20) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_generation_stops_at_eos_like_transformers(loaded, kind):
    hf_model, model = loaded(kind)
    rows = [random_tokens(1, 5, seed=4)[0].tolist(), random_tokens(1, 8, seed=5)[0].tolist()]
    free = hf_greedy(hf_model, torch.tensor([rows[0]]))[0]
    eos = next(t for t in free[3:] if t not in free[:3])  # a token row 0 first makes at step >= 3
    idx, mask = left_padded(rows)
    expected = hf_greedy(hf_model, idx, attention_mask=mask, eos_token_id=eos)
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in expected]  # drop HF's padding
    assert expected[0][-1] == eos and len(expected[0]) < 20
    assert model.generate(rows, 20, eos_id=eos) == expected
    # a list of stops (stop_ids): each row ends at the first of any, as transformers' list does
    free = hf_greedy(hf_model, torch.tensor([rows[1]]))[0]
    other = next(t for t in free[2:] if t not in free[:2] and t != eos)
    expected = hf_greedy(hf_model, idx, attention_mask=mask, eos_token_id=[eos, other])
    expected = [next((row[:i + 1] for i, t in enumerate(row) if t in (eos, other)), row)
                for row in expected]
    assert expected[1][-1] == other  # the second stop is what ends row 1
    assert model.generate(rows, 20, eos_id=[eos, other]) == expected


# ----------------------------------------------------------------------------- other checkpoint layouts

def test_inverse_permutation_in_this_file_is_right():
    w = torch.randn(32, 8)
    assert torch.equal(hf_permute(meta_unpermute(w, 2), 2), w)
    assert not torch.equal(meta_unpermute(w, 2), w)


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("kind", ["llama", "llama-gqa"])
def test_meta_checkpoint_matches_transformers(saved, tmp_path, kind, n_shards):
    hf_model, _ = saved(kind)
    folder = write_meta(tmp_path / "meta", hf_model, n_shards)
    model = load_checkpoint(folder)
    assert model.config.ffn_dim == FFN_DIM and model.config.vocab_size == VOCAB
    idx = random_tokens(3, 10)
    with torch.no_grad():
        assert_logits_equal(model(idx), hf_logits(hf_model, idx))


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded"])
def test_hf_file_layouts_match_transformers(saved, tmp_path, layout):
    hf_model, source = saved("llama")
    folder = tmp_path / layout
    if layout == "safetensors-sharded":
        hf_model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:
        copy_config(source, folder)
        write_bin(folder, hf_model.state_dict(), n_shards=1 if layout == "bin" else 3)
        assert not list(folder.glob("*.safetensors"))
    idx = random_tokens(2, 10)
    with torch.no_grad():
        assert_logits_equal(load_checkpoint(folder)(idx), hf_logits(hf_model, idx))


def test_tied_embeddings_load_as_one_tensor(tmp_path):
    """A LLaMA with tie_word_embeddings has no lm_head in its file: the output reuses the embedding."""
    torch.manual_seed(3)
    hf_model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=300, tie_word_embeddings=True)).eval()
    hf_model.save_pretrained(tmp_path)
    idx = random_tokens(2, 7, seed=3)
    with torch.no_grad():
        assert_logits_equal(load_checkpoint(tmp_path)(idx), hf_logits(hf_model, idx))
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)  # converted once, not once per name
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_bfloat16_load(saved):
    hf_model, folder = saved("llama")
    model = load_checkpoint(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.tok_embeddings.weight, hf_model.model.embed_tokens.weight.bfloat16())
    idx = random_tokens(2, 10)
    with torch.no_grad():
        logits, reference = model(idx), hf_logits(hf_model, idx)
    assert logits.dtype == torch.bfloat16
    # bf16 rounding only: close to the fp32 reference, far closer than the logits' spread
    assert (logits.float() - reference).abs().max() < 0.1 * reference.std()


# ----------------------------------------------------------------------------- cache and generation

@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_gives_full_forward_logits(loaded, kind):
    hf_model, model = loaded(kind)
    idx = random_tokens(2, 11, seed=6)
    prefill = 5
    model.setup_cache(2, idx.shape[1])
    try:
        with torch.no_grad():
            steps = [model(idx[:, :prefill])]
            for pos in range(prefill, idx.shape[1]):
                steps.append(model(idx[:, pos:pos + 1], start_pos=pos))
    finally:
        model.clear_cache()
    cached = torch.cat(steps, dim=1)
    with torch.no_grad():
        assert_logits_equal(cached, model(idx))
    assert_logits_equal(cached, hf_logits(hf_model, idx))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(loaded, kind):
    """Recomputing blocks in backward saves memory and must change nothing else."""
    _, loaded_model = loaded(kind)
    model = copy.deepcopy(loaded_model).train()
    idx = random_tokens(2, 9, seed=8)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, 6:] = False  # right padding, as in training
    grads, calls = [], []
    block_forward = model.layers[0].forward

    def counted_forward(*args):  # (forward hooks do not fire in the recomputation)
        calls.append(1)
        return block_forward(*args)
    model.layers[0].forward = counted_forward
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(idx, attention_mask=mask).logsumexp(-1)[mask].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing runs the block again in backward
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_one_at_a_time(loaded, kind):
    _, model = loaded(kind)
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (3, 8, 5, 1)]
    one_at_a_time = [model.generate([p], 15)[0] for p in prompts]
    assert model.generate(prompts, 15) == one_at_a_time
    assert len({tuple(t) for t in one_at_a_time}) == len(prompts)


def test_seeded_sampling_is_reproducible(loaded):
    _, model = loaded("llama")
    prompts = [random_tokens(1, 4, seed=7)[0].tolist(), random_tokens(1, 6, seed=8)[0].tolist()]

    def sample(seed, **kwargs):
        return model.generate(prompts, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=1) == model.generate(prompts, 20)


def test_sampling_matches_transformers_with_the_same_seed(loaded):
    # transformers samples with torch.multinomial on the default generator: seeded alike,
    # the same temperature and top_k must draw the same tokens
    hf_model, model = loaded("llama")
    prompt = random_tokens(1, 5, seed=9)
    torch.manual_seed(123)
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=20, top_p=1.0,
                                eos_token_id=None, pad_token_id=0)
    expected = out[:, prompt.shape[1]:].tolist()
    ours = model.generate(prompt.tolist(), 20, temperature=0.8, top_k=20,
                          generator=torch.Generator().manual_seed(123))
    assert ours == expected


# ----------------------------------------------------------------------------- presets

def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published, reference_config", [
    pytest.param("llama-7b", 6_738_415_616, LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        id="llama-7b"),
    pytest.param("llama-13b", 13_015_864_320, LlamaConfig(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
        id="llama-13b"),
    # GPT-J-6B's config.json; its size is checked against transformers only
    pytest.param("gptj-6b", None, GPTJConfig(vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64),
                 id="gptj-6b"),
])
def test_presets_have_the_real_parameter_counts(name, published, reference_config):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(name))
        reference_class = GPTJForCausalLM if name.startswith("gptj") else LlamaForCausalLM
        reference = reference_class(reference_config)
    assert model.tok_embeddings.weight.is_meta
    assert n_params(model) == n_params(reference)
    if published is not None:
        assert n_params(model) == published


def test_unknown_preset_lists_the_choices():
    with pytest.raises(CheckpointError) as info:
        ModelConfig.from_name("nope")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in ("nope", "llama-7b", "llama-13b", "gptj-6b"))


# ----------------------------------------------------------------------------- bad input

def test_missing_folder(tmp_path):
    check_error([str(tmp_path / "absent"), "not found"], tmp_path / "absent")


def test_folder_in_no_known_format(tmp_path):
    (tmp_path / "README.md").write_text("weights coming soon\n")
    check_error([str(tmp_path), "params.json", "config.json"], tmp_path)


def truncate(file):
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


def test_truncated_safetensors(saved, tmp_path):
    _, source = saved("llama")
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    truncate(folder / "model.safetensors")
    check_error(["model.safetensors", "truncated", "download it again"], folder)


@pytest.mark.parametrize("layout", ["bin", "pth"])
def test_truncated_torch_file(saved, tmp_path, layout):
    hf_model, source = saved("llama")
    if layout == "bin":
        folder = copy_config(source, tmp_path / "hf")
        write_bin(folder, hf_model.state_dict(), n_shards=1)
        file = folder / "pytorch_model.bin"
    else:
        folder = write_meta(tmp_path / "meta", hf_model, n_shards=1)
        file = folder / "consolidated.00.pth"
    truncate(file)
    check_error([file.name, "truncated", "download it again"], folder)


@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_file(saved, tmp_path, file_name):
    _, source = saved("llama")
    folder = copy_config(source, tmp_path / "hf")
    (folder / file_name).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                   dtype=torch.uint8).numpy().tobytes())
    check_error([file_name, "download it again"], folder)


class MakesADirectoryWhenUnpickled:
    """A pickled object whose loading runs code: what a malicious .bin would hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_code_is_refused_not_run(saved, tmp_path):
    hf_model, source = saved("llama")
    folder = copy_config(source, tmp_path / "hf")
    marker = tmp_path / "code-was-run"
    state = dict(hf_model.state_dict())
    state["model.norm.weight"] = MakesADirectoryWhenUnpickled(str(marker))
    torch.save(state, folder / "pytorch_model.bin")
    check_error(["pytorch_model.bin", "not plain weights"], folder)
    assert not marker.exists()


def test_weights_of_another_shape_than_the_preset(saved):
    _, folder = saved("llama")
    check_error(["llama-7b", "vocab_size", str(VOCAB), "32000"], folder, name="llama-7b")


def test_meta_13b_folder_given_as_7b(tmp_path):
    params = {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({"tok_embeddings.weight": torch.zeros(32000, 8)}, tmp_path / "consolidated.00.pth")
    check_error(["dim 5120 != llama-7b dim 4096", "llama-13b"], tmp_path, name="llama-7b")


def test_meta_folder_missing_a_middle_shard(saved, tmp_path):
    hf_model, _ = saved("llama")
    folder = write_meta(tmp_path / "meta", hf_model, n_shards=2)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")  # 00, 02 of three: 01 is missing
    check_error(["consolidated.01.pth", "missing"], folder)


def test_hf_index_listing_a_missing_shard(saved, tmp_path):
    hf_model, _ = saved("llama")
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder, max_shard_size="100KB")
    lost = sorted(folder.glob("model-*.safetensors"))[1]
    lost.unlink()
    check_error(["model.safetensors.index.json", lost.name, "missing"], folder)


# ----------------------------------------------------------------------------- old transformers files

@pytest.mark.parametrize("kind", ["llama", "gptj"])
def test_old_transformers_buffers_are_ignored(saved, tmp_path, kind):
    hf_model, source = saved(kind)
    state = dict(hf_model.state_dict())
    head_dim = DIM // N_HEAD
    for i in range(N_LAYER):
        if kind == "llama":  # transformers < 4.31 saved the rotary table of every layer
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
        else:                # GPT-J-6B's files carry the causal mask and its fill value
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    folder = copy_config(source, tmp_path / "hf")
    write_bin(folder, state, n_shards=1)
    idx = random_tokens(2, 10)
    with torch.no_grad():
        assert_logits_equal(load_checkpoint(folder)(idx), hf_logits(hf_model, idx))


def test_unknown_extra_key_is_an_error(saved, tmp_path):
    hf_model, source = saved("llama")
    state = dict(hf_model.state_dict())
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(DIM)
    folder = copy_config(source, tmp_path / "hf")
    save_file(state, folder / "model.safetensors")
    check_error(["model.layers.0.self_attn.q_proj.bias"], folder)


# ----------------------------------------------------------------------------- any LLaMA / GPT-J folder

def test_a_folder_is_a_model_and_loads_in_eval_mode(saved):
    hf_model, folder = saved("llama-gqa")
    config, found = model_config(str(folder))
    assert found == folder and config.n_kv_heads == 2 and config.vocab_size == VOCAB
    model = load_model(str(folder))
    assert not model.training and not load_checkpoint(folder).training and not load_model("tiny").training
    idx = random_tokens(2, 9)
    with torch.no_grad():
        assert_logits_equal(model(idx), hf_logits(hf_model, idx))


def test_model_config_reads_no_weights(saved, tmp_path, monkeypatch):
    """params.json with vocab_size -1 takes the vocab from the pickled index of consolidated.00.pth."""
    hf_model, _ = saved("llama")
    folder = write_meta(tmp_path / "meta", hf_model, n_shards=2)
    real_load = torch.load

    def load_without_data(*args, **kwargs):
        assert kwargs.get("map_location") == "meta", "a weights file was read"
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load_without_data)
    monkeypatch.setattr(StoredTensor, "read", lambda self: pytest.fail("a tensor was read"))
    config, found = model_config(str(folder))
    assert config.vocab_size == VOCAB and config.ffn_dim == FFN_DIM and found == folder


def test_a_preset_name_checks_the_folder_shapes(saved):
    _, folder = saved("llama")
    with pytest.raises(CheckpointError) as error:
        model_config("llama-7b", folder)
    assert "vocab_size" in str(error.value) and "llama-7b" in str(error.value)
    assert model_config("tiny") == (ModelConfig.from_name("tiny"), None)
    with pytest.raises(CheckpointError) as error:
        model_config("llama-13b")  # no checkpoints/llama-13b here
    assert "llama-13b needs its weights" in str(error.value) and "--checkpoint_dir" in str(error.value)


def test_model_that_is_neither_preset_nor_folder(tmp_path):
    with pytest.raises(CheckpointError) as error:
        model_config(str(tmp_path / "llama-8b"))
    message = str(error.value)
    assert "neither a preset" in message and "llama-13b" in message and "\n" not in message


def test_llama2_params_json_loads(tmp_path):
    """Llama-2-70B's params.json fields: n_kv_heads, ffn_dim_multiplier, norm_eps 1e-5."""
    torch.manual_seed(5)
    # Meta's rule: 32 * ceil(int(1.3 * int(2/3 * 4 * 64)) / 32) = 32 * ceil(221 / 32) = 224
    hf_model = randomize_(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=224, num_hidden_layers=N_LAYER, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)))
    folder = write_meta(tmp_path / "meta", hf_model, n_shards=2)
    params = {"dim": DIM, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "n_heads": 4, "n_kv_heads": 2,
              "n_layers": N_LAYER, "norm_eps": 1e-05, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    model = load_model(str(folder))
    assert (model.config.ffn_dim, model.config.n_kv_heads, model.config.norm_eps) == (224, 2, 1e-5)
    idx = random_tokens(2, 9)
    with torch.no_grad():
        assert_logits_equal(model(idx), hf_logits(hf_model, idx))


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_code_llama_rope_theta_and_vocab_load(tmp_path, layout):
    """Code Llama: rope_theta 1e6 and 32016 tokens."""
    torch.manual_seed(6)
    hf_model = randomize_(LlamaForCausalLM(LlamaConfig(
        vocab_size=32016, hidden_size=DIM, intermediate_size=FFN_DIM, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)))
    if layout == "hf":
        hf_model.save_pretrained(tmp_path)
        folder = tmp_path
    else:
        folder = write_meta(tmp_path / "meta", hf_model, n_shards=1)
        (folder / "params.json").write_text(json.dumps(
            {"dim": DIM, "n_layers": N_LAYER, "n_heads": N_HEAD, "multiple_of": MULTIPLE_OF, "ffn_dim_multiplier": 1.0,
             "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016}))
    model = load_model(str(folder))
    assert model.config.rope_theta == 1e6 and model.config.vocab_size == 32016
    idx = torch.randint(3, 32016, (2, 40), generator=torch.Generator().manual_seed(0))  # theta matters at 40
    with torch.no_grad():
        assert_logits_equal(model(idx), hf_logits(hf_model, idx))


def edited_config(source, folder, **fields):
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, field, value", [
    ("llama", "rope_scaling", {"type": "linear", "factor": 2.0}),
    ("llama", "rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
    ("llama", "sliding_window", 4096),
    ("llama", "attention_bias", True),
    ("llama", "mlp_bias", True),
    ("llama", "head_dim", 32),
    ("llama", "hidden_act", "gelu"),
    ("llama", "model_type", "mixtral"),  # mistral and qwen2 load: tests/test_families.py
    ("llama", "quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("gptj", "tie_word_embeddings", True),
    ("gptj", "activation_function", "relu"),
])
def test_configs_that_cannot_run_exactly_are_refused(saved, tmp_path, kind, field, value):
    _, source = saved(kind)
    folder = edited_config(source, tmp_path / "edited", **{field: value})
    with pytest.raises(CheckpointError) as error:
        model_config(str(folder))
    message = str(error.value)
    assert field in message and json.dumps(value) in message and "\n" not in message, message


@pytest.mark.parametrize("field, value", [("use_scaled_rope", "yes"), ("moe_experts", 8)])
def test_params_json_that_cannot_run_exactly_is_refused(tmp_path, field, value):
    params = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": 300,
              field: value}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError) as error:
        model_config(str(tmp_path))
    message = str(error.value)
    assert field in message and "\n" not in message, message
    assert json.dumps(value) in message or repr(value) in message, message  # the value found


@pytest.mark.parametrize("file_name", ["params.json", "config.json"])
def test_invalid_json_is_a_checkpoint_error(tmp_path, file_name):
    (tmp_path / file_name).write_text('{"dim": 64, "n_heads": 4,,}')
    check_error([file_name, "not valid JSON", "line 1"], tmp_path)


def test_config_json_missing_a_field_names_it(saved, tmp_path):
    _, source = saved("llama")
    folder = copy_config(source, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    check_error(["config.json", "'hidden_size'"], folder)


def test_safetensors_offsets_that_do_not_fit_the_shape(saved, tmp_path):
    _, source = saved("llama")
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["model.norm.weight"]["shape"] = [96]  # 96 values where its offsets hold 64 (same digit count)
    new_header = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)  # same length: offsets stay valid
    assert len(new_header) == header_len
    file.write_bytes(data[:8] + new_header + data[8 + header_len:])
    check_error(["model.norm.weight", "data_offsets", "download it again"], folder)


def test_random_bytes_as_meta_weights(saved, tmp_path):
    hf_model, _ = saved("llama")
    folder = write_meta(tmp_path / "meta", hf_model, n_shards=1)
    (folder / "consolidated.00.pth").write_bytes(bytes(range(256)) * 64)
    message = check_error(["consolidated.00.pth", "download it again"], folder)
    assert "weights_only" not in message


def test_refused_pickle_never_suggests_turning_off_weights_only(saved, tmp_path):
    hf_model, source = saved("llama")
    folder = copy_config(source, tmp_path / "hf")
    state = dict(hf_model.state_dict())
    state["model.norm.weight"] = MakesADirectoryWhenUnpickled(str(tmp_path / "code-was-run"))
    torch.save(state, folder / "pytorch_model.bin")
    message = check_error(["pytorch_model.bin", "posix.mkdir"], folder)
    assert "weights_only" not in message


# ----------------------------------------------------------------------------- precision and quantizing while loading

def fp16_folders(saved, tmp_path):
    """The tiny LLaMA saved in fp16, as Hugging Face safetensors and as two Meta shards."""
    hf_model, _ = saved("llama")
    half = copy.deepcopy(hf_model).half()
    half.save_pretrained(tmp_path / "hf")
    return {"hf": tmp_path / "hf", "meta": write_meta(tmp_path / "meta", half, n_shards=2)}


@pytest.mark.parametrize("quantize", [None, "int8", "nf4"])
def test_fp16_files_load_in_any_dtype_and_quantized(saved, tmp_path, quantize):
    for layout, folder in fp16_folders(saved, tmp_path).items():
        reference = load_checkpoint(folder, dtype=torch.float32)  # fp16 -> fp32 is exact
        if quantize:
            quantize_model(reference, quantize)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            model = load_checkpoint(folder, dtype=dtype, quantize=quantize)
            assert list(model.state_dict()) == list(reference.state_dict()), layout
            for key, tensor in model.state_dict().items():
                expected = reference.state_dict()[key]
                # codes and scales are made from the stored precision, whatever the compute dtype
                if expected.is_floating_point() and not key.endswith(".scale"):
                    expected = expected.to(dtype)
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), (layout, key)


PEAK_WHILE_LOADING = """
import sys, torch
from machinery.checkpoints import load_checkpoint
from model import ModelConfig, Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with torch.device("meta"):  # the first model built on meta loads ~70 MB of torch code: not the weights'
    Transformer(ModelConfig.from_name("tiny"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
model = load_checkpoint(sys.argv[1], dtype=torch.bfloat16)
print(before, status("VmHWM"))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets and reads Linux's peak RSS in /proc")
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """fp16 file -> bf16 model in a fresh process: its peak RSS grows by the model, not model + file."""
    torch.manual_seed(7)
    config = dict(vocab_size=1024, dim=512, n_layer=8, n_head=8, ffn_dim=1536)  # 27M params, 54 MB in fp16
    with torch.device("meta"):
        model = Transformer(ModelConfig(**config))
    state = {k: torch.randn(v.shape).half() for k, v in model.state_dict().items()}
    (tmp_path / "params.json").write_text(json.dumps({"dim": 512, "multiple_of": 512, "n_heads": 8, "n_layers": 8,
                                                      "norm_eps": 1e-6, "vocab_size": 1024}))
    torch.save(state, tmp_path / "consolidated.00.pth")
    model_bytes = sum(t.numel() for t in state.values()) * 2
    largest = max(t.numel() for t in state.values()) * 2
    # glibc would keep freed read buffers of these small tensors in its heap (a 7B's are all over its
    # 32 MB threshold, so they go back to the system at once); a fixed threshold shows live memory only
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run([sys.executable, "-c", PEAK_WHILE_LOADING, str(tmp_path)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, check=True).stdout
    before, peak = map(int, out.split())
    # one copy of the model and one tensor's read buffer; a memory-mapped file adds the file (2x)
    assert peak - before < model_bytes + largest + 8 * 2 ** 20, (peak - before, model_bytes)
