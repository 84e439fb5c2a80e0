"""The compiled decode step of generation: model.decode_step under torch.compile, made once.

model.generate(..., decode_step=compiled_decode_step(model)) runs every step after the prompt
through one compiled graph (every shape is fixed for a generation; the position is a 0-dim
tensor). On CUDA the graph is replayed with CUDA graphs (mode reduce-overhead). On a CPU it is
inductor's code except for the products of one or two rows, which get a kernel of their own:

A decode step multiplies each weight W (out, in) by one row per sequence. MKL's kernel for a
product of one or two rows reads W slowly on a CPU, and at batch 1 those products are nearly the
whole step. Written as a multiply and a sum over `in`, W's contiguous dimension, the same product
is one reduction that inductor vectorizes and spreads over the cores. `python bench/speed.py
--work profile` times both on the output layer at 1, 2 and 4 rows (this project's 2-core CPU,
1 row: MKL 13 GB/s, the reduction 26, a plain sum 30); from 4 rows on MKL is faster.
"""
import torch

MATRIX_VECTOR_ROWS = 2


def compiled_decode_step(model):
    """model.decode_step under torch.compile, made once per model and kept on it."""
    if getattr(model, "_compiled_decode_step", None) is None:
        if model.tok_embeddings.weight.is_cuda:
            step = torch.compile(model.decode_step, fullgraph=True, mode="reduce-overhead")
        else:
            step = torch.compile(model.decode_step, fullgraph=True, backend=decode_backend)
        model._compiled_decode_step = step
    return model._compiled_decode_step


def matrix_vector(rows, weight_t):
    """rows (M, in) @ weight_t (in, out) as multiply-and-sum, accumulated in fp32: (M, out)."""
    products = rows.float()[:, None, :] * weight_t.t().float()[None]  # (M, out, in)
    return products.sum(-1).to(rows.dtype)


def _few_rows(rows):
    return (rows.device.type == "cpu" and rows.is_floating_point()
            and rows.shape[0] <= MATRIX_VECTOR_ROWS)


def decode_backend(graph, example_inputs):
    """torch.compile's inductor, except that a CPU matmul of one or two rows (aten.mm,
    aten.addmm: every nn.Linear of a decode step at batch 1 or 2) becomes the reduction above;
    other matmuls are inductor's."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    aten, table = torch.ops.aten, dict(select_decomp_table())
    mm, addmm = table.get(aten.mm.default), table.get(aten.addmm.default)

    def decomposed_mm(rows, weight_t, **kwargs):
        if _few_rows(rows) and not kwargs:
            return matrix_vector(rows, weight_t)
        return mm(rows, weight_t, **kwargs) if mm else NotImplemented

    def decomposed_addmm(bias, rows, weight_t, beta=1, alpha=1, **kwargs):
        if _few_rows(rows) and not kwargs:
            return beta * bias + alpha * matrix_vector(rows, weight_t)
        return (addmm(bias, rows, weight_t, beta=beta, alpha=alpha, **kwargs) if addmm
                else NotImplemented)

    table.update({aten.mm.default: decomposed_mm, aten.addmm.default: decomposed_addmm})
    # the compilers' caches do not key on decompositions: a graph cached by a plain
    # torch.compile would be reused
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(graph, example_inputs, decompositions=table,
                          config_patches={"fx_graph_cache": False})
