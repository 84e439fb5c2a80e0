"""A frozen base stored in 8 or 4 bits, for training adapters on a model that does not fit in 16.

    W (out, in), fp ── quantize once, tensor by tensor while loading ──┐
        int8: Q = round(W / s) in [-127, 127],  s = max|W_row| / 127     one scale per output channel
        nf4:  the nearest of 16 NF4 values x absmax, per block of 64      two 4-bit codes per byte
                                                                        │
    forward   y  = x · deq(Q)ᵀ (+ bias)      deq(Q) exists only inside the matmul, in the compute dtype
    backward  dx = dy · deq(Q)               dequantized again: autograd keeps Q and its scales, never
                                             a full-precision copy of W (the pattern of torchao's NF4 linear)

The weights are frozen (adapters train beside them), so no gradient for W is ever needed.
Embeddings and the output head stay in the compute dtype: the embedding is a table lookup, not
a matmul, and the head's error goes straight into the softmax with no normalisation after it;
both together are 4% of LLaMA-7B. QLoRA and LLM.int8 keep them in 16 bits too.

int8 is absmax quantization per output channel (LLM.int8's vector-wise scheme, without its
fp16 outlier columns); its error is at most s/2 per weight. nf4 is QLoRA's NormalFloat4
(Dettmers et al. 2023): 16 values at the quantiles of a normal distribution, blockwise absmax
over 64 consecutive weights (row-major), no double quantization (the fp32 absmax costs 0.5 bit
per weight). Written out here in torch because both fit in a page, run on any device, and
keep the dependency list at torch, sentencepiece, numpy, tqdm.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

QUANTIZE_KINDS = ("int8", "nf4")
NF4_BLOCK = 64

# QLoRA's NormalFloat4 values (bitsandbytes' create_normal_map(0.9677083), normalised to [-1, 1])
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
# halfway between neighbouring values: bucketize against these picks the nearest NF4 value
NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


def _check_kind(kind):
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize kind {kind!r} is unknown: choose one of {', '.join(QUANTIZE_KINDS)}")


def quantized_shapes(out_features, in_features, kind):
    """{buffer name: (shape, dtype)} of a quantized (out, in) weight."""
    _check_kind(kind)
    if kind == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "scale": ((out_features,), torch.float32)}
    numel = out_features * in_features
    if numel % NF4_BLOCK:
        raise ValueError(f"nf4 needs a weight of a multiple of {NF4_BLOCK} values, found {out_features} x "
                         f"{in_features}: use --quantize int8 for this model")
    return {"weight": ((numel // 2,), torch.uint8), "scale": ((numel // NF4_BLOCK,), torch.float32)}


CHUNK = 2 ** 22  # values quantized at a time: fp32 temporaries of 16 MB, the same size for every layer


@torch.no_grad()
def quantize_weight(weight, kind):
    """{"weight": codes, "scale": fp32 scales} of a weight (out, in), computed in fp32 on its device.

    Works through the weight a chunk at a time into outputs allocated first, so the temporaries are
    small and alike (whole-layer fp32 temporaries fragmented the heap: +100% RSS while loading).
    """
    shapes = quantized_shapes(*weight.shape, kind)  # checks the kind and the nf4 block size
    codes, scale = (torch.empty(shape, dtype=dtype, device=weight.device) for shape, dtype in shapes.values())
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or block stays zero, not 0/0
    # the max of stored values is exact in their own dtype; dividing by an fp32 scale promotes to fp32
    if kind == "int8":
        rows = max(1, CHUNK // weight.shape[1])
        for start in range(0, weight.shape[0], rows):
            w = weight[start:start + rows]                                        # (rows, in)
            s = scale[start:start + rows] = (w.abs().amax(dim=1).float() / 127).clamp_(min=tiny)
            codes[start:start + rows] = (w / s[:, None]).round_().clamp_(-127, 127)  # exact integers -> int8
        return {"weight": codes, "scale": scale}
    blocks = weight.reshape(-1, NF4_BLOCK)                                # (numel / 64, 64)
    midpoints = NF4_MIDPOINTS.to(weight.device)
    step = CHUNK // NF4_BLOCK
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start:start + step]
        absmax = scale[start:start + step] = chunk.abs().amax(dim=1).float().clamp_(min=tiny)
        index = torch.bucketize(chunk / absmax[:, None], midpoints, out_int32=True).view(-1, 2)  # 0..15
        # neighbours share a byte: the first in the high nibble
        codes[start * NF4_BLOCK // 2:(start + step) * NF4_BLOCK // 2] = index[:, 0] << 4 | index[:, 1]
    return {"weight": codes, "scale": scale}


def dequantize(weight, scale, kind, shape, dtype):
    """The weight (out, in) in `dtype` from its codes and scales."""
    if kind == "int8":
        w = weight.to(dtype)
        return w.mul_(scale.to(dtype)[:, None])                      # (out, in)
    # one lookup per byte gives both of its values: a (256, 2) table of (high, low) nibble values
    byte = torch.arange(256, device=weight.device)
    table = NF4.to(weight.device, dtype)[torch.stack((byte >> 4, byte & 15), dim=1)]  # (256, 2)
    values = F.embedding(weight.int(), table).view(-1, NF4_BLOCK)    # (numel / 64, 64)
    return values.mul_(scale.to(dtype)[:, None]).view(shape)         # (out, in)


class _DequantizedMatmul(torch.autograd.Function):
    """y = x · deq(W)ᵀ that saves only the quantized weight and its scales for backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, kind, shape):
        ctx.save_for_backward(weight, scale)  # small; x is not needed: W gets no gradient
        ctx.kind, ctx.shape = kind, shape
        return F.linear(x, dequantize(weight, scale, kind, shape, x.dtype))  # deq(W) freed on return

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize(weight, scale, ctx.kind, ctx.shape, grad_out.dtype)  # (..., in)
        return grad_x, None, None, None, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored quantized. Not an nn.Linear, but it has what adapters look for:
    in_features, out_features, weight (the int8 / packed uint8 codes) and bias (compute dtype)."""

    def __init__(self, in_features, out_features, bias, kind, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        for name, (shape, buffer_dtype) in quantized_shapes(out_features, in_features, kind).items():
            self.register_buffer(name, torch.empty(shape, dtype=buffer_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear, kind):
        """The quantized twin of an nn.Linear; on the meta device only the empty layer (to load into)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, kind, weight.dtype,
                    weight.device)
        if not weight.is_meta:
            for name, tensor in quantize_weight(weight, kind).items():
                setattr(layer, name, tensor)
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach().clone()
        return layer

    def forward(self, x):
        # dequantize straight into the dtype the matmul runs in (autocast's, else the input's)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        out = _DequantizedMatmul.apply(x.to(dtype), self.weight, self.scale, self.kind,
                                       (self.out_features, self.in_features))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dequantized_weight(self, dtype=torch.float32):
        return dequantize(self.weight, self.scale, self.kind, (self.out_features, self.in_features), dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, " \
               f"bias={self.bias is not None}"


def quantize_model(model, kind, skip=("output", "lm_head")):
    """Replace every nn.Linear of `model` but those named in `skip` by a QuantizedLinear, in place.

    Returns the replaced names. Call it on the base before adding adapters (their layers are
    nn.Linear too). On the meta device it builds the empty layers a checkpoint is loaded into.
    """
    _check_kind(kind)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in skip]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear.from_linear(model.get_submodule(name), kind))
    return names
