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
keep the dependency list at torch, sentencepiece, numpy, tqdm. The price, measured on the CPU
for LLaMA-7B's largest layer (forward + backward, bf16): int8 1.6x and nf4 2.9x the time of the
bf16 layer, since dequantizing is not fused into the matmul as bitsandbytes' CUDA kernels do.
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


CHUNK = 2 ** 22  # values quantized at a time, in work buffers of 16 MB each


class Quantizer:
    """quantizer(weight) -> {"weight": codes, "scale": fp32 scales} of a weight (out, in) on `device`.

    Computes in fp32 a chunk at a time, every intermediate written into the same two work buffers,
    kept from one weight to the next: loading 7B weights with fresh temporaries per layer left
    2.5 GB of freed memory in glibc's heap (RSS 9.0 GiB for 6.5 GiB of int8 weights).
    """

    def __init__(self, kind, device=None):
        _check_kind(kind)
        self.kind = kind
        self.values = torch.empty(CHUNK, dtype=torch.float32, device=device)                # w, then w / scale
        self.index = torch.empty(CHUNK, dtype=torch.int32, device=device) if kind == "nf4" else None

    @torch.no_grad()
    def __call__(self, weight):
        shapes = quantized_shapes(*weight.shape, self.kind)  # checks the nf4 block size
        codes, scale = (torch.empty(shape, dtype=dtype, device=weight.device) for shape, dtype in shapes.values())
        tiny = torch.finfo(torch.float32).tiny  # an all-zero row or block stays zero, not 0/0
        # fp16/bf16 values are exact in fp32: the same codes as from the weight in fp32
        if self.kind == "int8":
            rows = max(1, CHUNK // weight.shape[1])
            for start in range(0, weight.shape[0], rows):
                w = weight[start:start + rows]
                work = self.values[:w.numel()].view(w.shape).copy_(w)             # (rows, in) in fp32
                s = scale[start:start + rows] = _absmax(work).div_(127).clamp_(min=tiny)  # (rows,)
                work.div_(s[:, None]).round_().clamp_(-127, 127)
                codes[start:start + rows].copy_(work)                             # exact integers -> int8
            return {"weight": codes, "scale": scale}
        blocks = weight.reshape(-1, NF4_BLOCK)                                   # (numel / 64, 64)
        midpoints = NF4_MIDPOINTS.to(weight.device)
        for start in range(0, blocks.shape[0], CHUNK // NF4_BLOCK):
            chunk = blocks[start:start + CHUNK // NF4_BLOCK]                     # (n, 64)
            n = chunk.shape[0]
            work = self.values[:n * NF4_BLOCK].view(n, NF4_BLOCK).copy_(chunk)    # (n, 64) in fp32
            absmax = scale[start:start + n] = _absmax(work).clamp_(min=tiny)      # (n,)
            work.div_(absmax[:, None])
            index = torch.bucketize(work, midpoints, out_int32=True, out=self.index[:work.numel()].view(n, NF4_BLOCK))
            pairs = index.view(-1, 2)  # neighbours share a byte: the first in the high nibble
            high = pairs[:, 0].bitwise_left_shift_(4).bitwise_or_(pairs[:, 1])
            codes[start * NF4_BLOCK // 2:(start + n) * NF4_BLOCK // 2].copy_(high)
        return {"weight": codes, "scale": scale}


def _absmax(x):
    """max |x| of each row, without storing |x|."""
    low, high = torch.aminmax(x, dim=1)
    return torch.maximum(high, low.neg_())


def quantize_weight(weight, kind):
    """{"weight": codes, "scale": fp32 scales} of one weight (out, in); see Quantizer for many."""
    return Quantizer(kind, weight.device)(weight)


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
    def from_linear(cls, linear, kind, quantizer=None):
        """The quantized twin of an nn.Linear; on the meta device only the empty layer (to load into)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, kind, weight.dtype,
                    weight.device)
        if not weight.is_meta:
            quantizer = quantizer or Quantizer(kind, weight.device)
            for name, tensor in quantizer(weight).items():
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
    quantizers = {}  # one per device, its work buffers shared by all layers
    for name in names:
        linear = model.get_submodule(name)
        device = linear.weight.device
        if device not in quantizers and not linear.weight.is_meta:
            quantizers[device] = Quantizer(kind, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear.from_linear(linear, kind, quantizers.get(device)))
    return names
