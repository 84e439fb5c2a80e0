"""The fast paths of training and decoding against the plain computations they replace.

- Training without masks: right-padded batches with right_padded=True (causal attention, no
  mask) give the masked computation's outputs and gradients on every real token.
- The loss: ChunkedCrossEntropy equals F.cross_entropy over the full logits, value and gradient.
- torch.compile on the CPU, tiny models: the training step and the decode step each compile to
  one graph (no graph breaks), once for a whole run, and compute what eager computes. The
  compiler is inductor (torch.compile's default, as train.py --compile and generate(decode_step=decode.compiled_decode_step(model))
  use it), wrapped in a counting backend that sees every graph dynamo hands over: one graph for
  several steps means no graph break (a break splits the code into more graphs) and no
  recompile. Losses are compared at rtol 1e-5: fused kernels sum in another order (fp32).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from machinery.adapters import default_targets
import interlora
from machinery import decode, fused
from interlora import InterLoRAConfig
from model import PRESETS, ModelConfig, Transformer, next_token_loss


@pytest.fixture(autouse=True)
def one_thread_fresh_compiler():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    torch.set_num_threads(threads)


def small_model(cfg, seed=0, name="tiny", n_layer=2):
    """A 2-layer LLaMA (or GPT-J: name tiny-gptj) of width 64 with randomised adapters: quick to compile, every
    code path exercised. The compile tests take one layer: a graph of half the size compiles in
    about half the time, and one layer holds every code path."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**PRESETS[name], "dim": 64, "n_layer": n_layer, "ffn_dim": 160}))
    interlora.add_interlora(model, cfg, default_targets(model), layer=fused.FusedInterLoRALinear)
    model.loss_function = fused.chunked_loss  # as train.py runs it
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return model


def right_padded_batch(generator, lengths, T):
    """(idx, labels, mask) as data.collate makes them: real tokens first, then padding."""
    idx = torch.randint(3, 259, (len(lengths), T), generator=generator)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return idx.masked_fill(~mask, 0), idx.masked_fill(~mask, -100), mask


def train_steps(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for idx, labels, mask in batches:
        loss = model(idx, attention_mask=mask, labels=labels, right_padded=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj"])
def test_right_padded_training_needs_no_attention_mask(name):
    """Causal attention without a mask is exact for real tokens followed by padding: same outputs, same gradients."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(name))
    interlora.add_interlora(model, InterLoRAConfig(dropout=0.0), default_targets(model), layer=fused.FusedInterLoRALinear)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0.0, 0.2)
    idx, labels, mask = right_padded_batch(torch.Generator().manual_seed(2), [11, 4, 8], 11)
    real = mask.bool()
    grads, outputs = [], []
    for right_padded in (False, True):  # the masked computation, then the mask-free one
        logits = model(idx, attention_mask=mask, right_padded=right_padded)
        logits[real].square().sum().backward()  # a function of the real tokens only
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        outputs.append(logits.detach())
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(outputs[1][real], outputs[0][real], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for param_name in grads[0]:
        torch.testing.assert_close(grads[1][param_name], grads[0][param_name], rtol=1e-4, atol=1e-5)


def test_right_padded_training_gives_attention_no_mask(monkeypatch):
    """The mask reaches the gates only: every attention call takes SDPA's causal path (flash on a GPU)."""
    calls, attention = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **options):
        calls.append((attn_mask is None, is_causal))
        return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **options)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = small_model(InterLoRAConfig()).train()
    idx, labels, mask = right_padded_batch(torch.Generator().manual_seed(6), [9, 3], 9)
    model(idx, attention_mask=mask, labels=labels, right_padded=True).backward()
    assert calls == [(True, True)] * 2


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_equals_cross_entropy_over_all_logits(with_bias):
    """Value and gradient, with unscored rows, a row count that is no multiple of the chunks, and a bias (GPT-J)."""
    from machinery.fused import ChunkedCrossEntropy
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=generator), torch.randn(50, generator=generator) if with_bias else None
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[[0, 5, 36]] = -100
    loss = ChunkedCrossEntropy.apply(x, weight, bias, targets)
    (2 * loss).backward()
    x_plain = x.detach().clone().requires_grad_()
    expected = F.cross_entropy(F.linear(x_plain, weight, bias), targets, ignore_index=-100)
    (2 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["model.next_token_loss", "fused.chunked_loss"])
def test_model_loss_is_the_next_token_cross_entropy(loss):
    """labels= gives the cross-entropy of position t against labels t + 1, with model.py's plain
    loss and with the chunked one train.py sets."""
    model = small_model(InterLoRAConfig()).eval()
    model.loss_function = {"model.next_token_loss": next_token_loss,
                           "fused.chunked_loss": fused.chunked_loss}[loss]
    idx, labels, mask = right_padded_batch(torch.Generator().manual_seed(5), [10, 7], 10)
    logits = model(idx, attention_mask=mask)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(model(idx, attention_mask=mask, labels=labels, right_padded=True), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(idx, attention_mask=mask, last_only=True), logits[:, -1:], rtol=1e-5, atol=1e-6)


# dropout 0 only: the compiled losses must equal eager's (with dropout the two draw other masks);
# each case compiles a whole training graph, about 90-120 s on a cold 2-core CI machine
@pytest.mark.parametrize("dropout", [0.0])
def test_training_step_is_one_graph_for_a_whole_run(dropout):
    """As train.py compiles: dynamic=True, so batches of other lengths (each as long as its longest item) reuse it."""
    model = small_model(InterLoRAConfig(dropout=dropout), n_layer=1).train()
    generator = torch.Generator().manual_seed(1)
    # three lengths; at least 36 tokens a batch (inductor computes matmuls of <= 32 rows otherwise: another graph)
    batches = [right_padded_batch(generator, lengths, max(lengths)) for lengths in ([15, 9, 12], [20, 20, 5], [13, 6, 8])]
    eager = train_steps(copy.deepcopy(model), batches)
    counter = CompileCounterWithBackend("inductor")
    compiled = train_steps(torch.compile(model, backend=counter, dynamic=True), batches)
    # the adapters' mask hook is a frame of its own with no tensor work: an empty graph, not a break
    graphs = [graph for graph in counter.graphs if len(graph.graph.nodes)]
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break or a recompile"
    if dropout == 0:  # with dropout the two draw different random numbers
        assert compiled == pytest.approx(eager, rel=1e-5)


# "causal": its decode state changes every step (test_fused holds both poolings' eager tokens)
@pytest.mark.parametrize("pool", ["causal"])
def test_decode_step_compiles_once_and_gives_the_eager_tokens(pool):
    """generate with decode.compiled_decode_step: fullgraph=True (a graph break would raise), one graph for every step and call."""
    model = small_model(InterLoRAConfig(gate_pool=pool), n_layer=1).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40] * 9]
    eager = model.generate(prompts, max_new_tokens=10)
    graphs = counters["stats"]["unique_graphs"]
    assert model.generate(prompts, max_new_tokens=10, decode_step=decode.compiled_decode_step(model)) == eager
    assert model.generate(prompts, max_new_tokens=10, decode_step=decode.compiled_decode_step(model)) == eager
    assert counters["stats"]["unique_graphs"] - graphs == 1
    # sampling goes through the same compiled step
    sampled = [model.generate(prompts, max_new_tokens=6, temperature=0.8, top_k=20, decode_step=decode.compiled_decode_step(model) if compiled else None,
                              generator=torch.Generator().manual_seed(3)) for compiled in (False, True)]
    assert sampled[0] == sampled[1]


def matmul_kernels(code):
    """The matmul kernels (MKL's, through aten) that inductor's generated code calls."""
    return sum(code.count(f"extern_kernels.{name}(") for name in ("mm", "addmm"))


# GPT-J: its biased layers (addmm) and the adapters' unbiased products (mm) in one model
@pytest.mark.parametrize("name", ["tiny-gptj"])
def test_decode_step_at_batch_one_computes_its_products_as_reductions(name):
    """CPU, one or two rows per step: the compiled decode step calls no matmul kernel (every weight, biased or not,
    is read by a multiply-and-sum of its own: decode.decode_backend) and gives eager's tokens; at three rows the
    matmuls are MKL's again."""
    from torch._inductor.utils import run_and_get_code
    model = small_model(InterLoRAConfig(), name=name, n_layer=1).eval()
    kernels = {}
    for prompts in ([[5, 6, 7, 8, 9]], [[5, 6, 7], [8, 9, 10, 11]], [[5, 6, 7], [8, 9, 10], [40] * 9]):
        eager = model.generate(prompts, max_new_tokens=8)
        model._compiled_decode_step = None  # compile anew: each batch size's code is captured
        torch.compiler.reset()
        compiled, codes = run_and_get_code(lambda: model.generate(prompts, max_new_tokens=8, decode_step=decode.compiled_decode_step(model)))
        assert compiled == eager
        assert len(codes) == 1
        kernels[len(prompts)] = matmul_kernels(codes[0])
    # GPT-J's 6 base weights of the one layer (q, k, v, o, fc_in, fc_out), the output layer, and
    # the adapters' products, at three rows
    assert kernels[1] == kernels[2] == 0 and kernels[3] >= 6 + 1, kernels
