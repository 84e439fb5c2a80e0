"""The fast form of interlora.InterLoRALinear: the same parameters and gates, fewer kernels.

interlora.py computes Eq. 4-8 as the paper writes them; this subclass computes the same numbers
(tests/test_fused.py holds it to the clear layer) with:
- one matmul for A and the gate's first projection (both read x: A stacked with W_att / W_ffn);
- every scale (lambda, alpha, the head gates, dropout's 1 / (1 - p)) folded into B or A, small
  (d_out, r) matrices, never a (B, T, d_out) activation;
- Eq. 8's relu gate as an exact rank-2r update: for a number z, relu(z w) = relu(z) relu(w) +
  relu(-z) relu(-w), so LoRA(u) * alpha relu(z W_o) = [relu(z) a, relu(-z) a] [alpha B relu(W_o),
  alpha B relu(-W_o)]^T (about 27% less activation memory per adapted block);
- the per-sequence head gate of Eq. 6 as a batched product with head-scaled rows of B (baddbmm);
- the decode state kept in place (fixed addresses, which CUDA graphs replay);
- on a CPU, dropout's dropped places drawn as geometric gaps (about p n random numbers, not n).

It also holds the training loss train.py uses, chunked_loss: model.py's next_token_loss without
the (B, T, vocab) logits (tests/test_fast_paths.py holds it to the plain loss).
"""
import torch
import torch.nn.functional as F

import interlora
import model as model_module


class FusedInterLoRALinear(interlora.InterLoRALinear):
    def forward(self, x):
        out = self.base(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        # dropout(x) A^T = (x * mask) (A / (1 - p))^T; without dropout A and W_att are one matmul
        if self.training and self.dropout > 0:
            a = F.linear(x * dropout_mask(x, self.dropout), self.lora_A.weight / (1 - self.dropout))
            z = None if self.gate == "none" else self.gate_in(x)
        elif self.gate == "none":
            a, z = self.lora_A(x), None
        else:
            az = F.linear(x, torch.cat((self.lora_A.weight, self.gate_in.weight)))  # (..., r + 1)
            a, z = az[..., :-1], az[..., -1:]  # (..., r), (..., 1)
        lora_B = self.lora_B.weight * self.scaling  # lambda into B: (d_out, r)

        if self.gate == "head":
            g = self.head_gate(z)  # Eq. 5: (B, 1, heads), or (B, T, heads) for "causal"
            B, T, _ = out.shape
            if g.shape[1] == 1:  # Eq. 6: head i's rows of B times g_i, one batched product
                heads = lora_B.unflatten(0, (self.n_heads, -1))  # (heads, head_dim, r)
                B_gated = (heads * g.view(B, self.n_heads, 1, 1)).flatten(1, 2)  # (B, d_out, r)
                return torch.baddbmm(out, a.to(out.dtype), B_gated.transpose(1, 2).to(out.dtype))
            lora = F.linear(a, lora_B).view(B, T, self.n_heads, -1)  # (B, T, heads, head_dim)
            gated = torch.addcmul(out.view(B, T, self.n_heads, -1), lora.to(out.dtype),
                                  g[..., None].to(out.dtype))
            return gated.flatten(2)  # (B, T, d_out)
        if self.gate == "relu":  # Eq. 7-8 as the rank-2r product (the module docstring)
            w_o = self.gate_out.weight  # (d_out, 1)
            a = torch.cat((a * F.relu(z), a * F.relu(-z)), dim=-1)  # (..., 2r)
            lora_B = torch.cat((lora_B * F.relu(w_o), lora_B * F.relu(-w_o)), dim=-1)
            lora_B = lora_B * self.gate_scale  # (d_out, 2r)
        elif self.gate == "sigmoid":  # InterLoRA*: the sigmoid does not factor; one fused add
            g_ffn = torch.sigmoid(self.gate_out(z))  # (..., d_out)
            return torch.addcmul(out, F.linear(a, lora_B).to(out.dtype), g_ffn.to(out.dtype))
        return add_low_rank(out, a, lora_B)  # Eq. 4 (no gate) or Eq. 8

    def keep_gate_state(self, sums, counts):
        """In place when the shapes allow: a CUDA graph replays reads of fixed addresses."""
        if self.gate_sum is not None and self.gate_sum.shape == sums.shape \
                and self.gate_sum.dtype == sums.dtype:
            self.gate_sum.copy_(sums)
            self.gate_count.copy_(counts)
        else:
            self.gate_sum, self.gate_count = sums.clone(), counts.clone()


CPU_GAPS = True  # bench/speed.py --plain_dropout sets False: one draw per element, as on CUDA


def dropout_mask(x, p):
    """Dropout's mask for x: True (kept) with probability 1 - p, each element independently.

    On a CPU the dropped places are drawn as the gaps between them, which are geometric: about
    p n random numbers for n elements instead of n (torch's CPU generator makes them one at a
    time). 1.5 p n + 200 gaps reach past the last element except with probability below 1e-55
    (Chernoff's bound on n Bernoulli draws); elsewhere (CUDA) one draw per element.
    """
    if x.device.type != "cpu" or not CPU_GAPS:
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    n = x.numel()
    gaps = torch.empty(int(1.5 * p * n) + 200, dtype=torch.float64).geometric_(p)
    places = gaps.clamp_(max=n + 1).cumsum_(0).clamp_(max=n + 1).long() - 1  # n: past the end
    keep = torch.ones(n + 1, dtype=torch.bool)
    return keep.index_fill_(0, places, False)[:n].view(x.shape)


def add_low_rank(out, a, b):
    """out + a b^T as one fused matmul-add in out's dtype: out (..., d_out), a (..., k),
    b (d_out, k)."""
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), a.reshape(-1, a.shape[-1]).to(out.dtype),
                       b.t().to(out.dtype))
    return flat.view(out.shape)


def chunked_loss(x, output, targets):
    """model.next_token_loss, the same numbers, a chunk of rows of logits at a time (a frozen
    output layer only: a trained one takes the plain loss and its gradient)."""
    if output.weight.requires_grad:
        return model_module.next_token_loss(x, output, targets)
    return ChunkedCrossEntropy.apply(x.flatten(0, 1), output.weight, output.bias, targets.flatten())


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x W^T + b (N, vocab) against targets (N,), -100: not
    scored.

    The logits are made a chunk of rows at a time and turned at once into the gradient of x:
    d loss / d x = (softmax - onehot(target)) W = softmax W - W[target], so no more than one
    chunk of logits ever exists (not N x vocab of them, nor their fp32 copy, nor their gradient)
    and backward only scales that gradient. The output layer is frozen base weight here: it gets
    no gradient (chunked_loss takes model.py's plain loss when it is trained). A fixed number of
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
            logits = F.linear(chunk, weight, bias)  # (rows, vocab): one chunk of logits
            log_probs = logits.float().log_softmax(-1)
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
