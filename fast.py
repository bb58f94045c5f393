"""Fast paths of proxykd.py's losses: the same numbers from the model's final hidden states and output
weight, without ever holding (B, T, V) logits. Each function here is tested equal to its reference in
proxykd.py, values and gradients (test_fast.py); read proxykd.py for the method, this file for speed.
Training runs them by default (`--loss fused`); `--loss reference` runs proxykd.py's functions on the
full logits instead (run.head).

- `topk_logps_chunked` (the proxy cache's producer, proxykd.topk_logps, and the held-out evaluation):
  fp32 logits exist for one chunk of positions at a time.
- The fused heads (`token_logps_fused`, `nll_loss_fused`, `sequence_logps_fused`, `student_loss_fused`):
  only response rows reach the head, and each chunk's gradient with respect to the hidden states is
  taken in the forward, in place in one reused (chunk, V) buffer, so the backward neither keeps nor
  recomputes logits.

Every head is meant as a model's head_fn:
`model(tokens, head_fn=lambda h, w: fast.sequence_logps_fused(h, w, labels))`, which under FSDP2 runs it
inside the root forward, where the output weight is unsharded.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

import proxykd as pk


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least fp32, fp64 if any input is fp64."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _label_logps(logits: Tensor, y: Tensor, lse: Tensor) -> Tensor:
    """logits (..., V), y (...), lse (...) the log-partition -> log pi(y) (...)."""
    return logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse


def default_chunk_size(vocab_size: int, device) -> int:
    """Rows per (rows, V) fp32 logits block when a head is given chunk_size None or 0: 1024 on
    accelerators; on the CPU as many rows as keep the block at 16 MiB, because glibc serves blocks over
    32 MiB with fresh mmap pages, page-faulted anew on every allocation (RESULTS.md, "The fused head")."""
    if torch.device(device).type != "cpu":
        return 1024
    return max(1, (16 << 20) // (4 * vocab_size))


# ---------------------------------------------------------------------------------------------------
# the proxy cache's producer


@torch.no_grad()
def topk_logps_chunked(
    hidden: Tensor, weight: Tensor, labels: Tensor, k: int, chunk_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """proxykd.topk_logps chunked: the proxy cache for Eq. 8-9 in one pass. hidden (B, T, D), weight (V, D),
    labels (B, T) ->
    (topk_ids (B, T-1, k) int32, topk_logps (B, T-1, k) fp32 log pi_p normalised over the full
    vocabulary, sorted descending, seq_logps (B,) log pi_p(y|x) over response tokens).
    Entry t is pi_p's distribution for predicting labels[:, t+1]; only positions with
    response_mask(labels) True are meaningful (the rest are computed but ignored downstream).
    No gradients. With k = 1, topk_ids[..., 0] == labels[:, 1:] is the top-1 agreement.
    """
    B, T, D = hidden.shape
    y, m = pk.shift_labels(labels)
    h, y, m = hidden[:, :-1].reshape(B * (T - 1), D), y.reshape(-1), m.reshape(-1)  # the shifted grid, flat
    dtype = _compute_dtype(hidden, weight)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    ids, lps, lp = [], [], []
    for s in range(0, max(h.shape[0], 1), chunk_size):
        # the matmul in the weight's own dtype (bf16 on a bf16 proxy), then an fp32 (n, V) block: no fp32
        # copy of the output weight (1 GiB at 70B) and no fp32 GEMM
        logits = F.linear(h[s : s + chunk_size].to(weight.dtype), weight).to(dtype)  # (n, V)
        lse = logits.logsumexp(-1)
        vals, top = logits.topk(k, dim=-1)
        ids.append(top.to(torch.int32))
        lps.append(vals - lse.unsqueeze(-1))
        lp.append(_label_logps(logits, y[s : s + chunk_size], lse))
    seq = torch.cat(lp).masked_fill(~m, 0.0).view(B, T - 1).sum(-1)
    return torch.cat(ids).view(B, T - 1, k), torch.cat(lps).view(B, T - 1, k), seq


# ---------------------------------------------------------------------------------------------------
# fused heads: the references' values and gradients, faster; what the training steps run by default.
# Three things make them fast, none of which changes a number beyond float rounding:
# - Only response rows reach the head: prompt and pad positions are never scored, so their logits are
#   never computed (transformers computes them all). Their count comes from the host (`n_rows`, which
#   data.make_batch records), so gathering them waits for nothing; without it, counting them is one sync.
# - Each chunk's gradient with respect to the hidden states is computed during the forward, while its
#   logits exist anyway (Liger's fused linear cross-entropy, generalised to per-position outputs), so the
#   backward neither keeps nor recomputes logits: it scales stored (n, D) rows.
# - The losses see a row's logits only through a few log-probabilities: log q(y_t), log q on the k cached
#   ids and log q of the tail bucket (everything else). So d loss / d logits is q * (one number per row)
#   plus a few sparse entries, and it is built in place in the chunk's one fp32 (n_c, V) buffer. The
#   losses themselves are differentiated by autograd, but on those (n_c, 1 + k + 1) log-probabilities.
# Matmuls run in the model's dtype (bf16 logits on a bf16 base, as transformers computes them), the
# softmax and the losses in fp32.


def _head_buffers(rows: int, w_mm: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The (rows, V) blocks _head_chunk works in, allocated once per call and reused by every chunk: a
    fresh vocab-sized allocation per chunk page-faults anew on the CPU."""
    V = w_mm.shape[0]
    buf = torch.empty(rows, V, dtype=dtype, device=w_mm.device)
    return buf, None if w_mm.dtype == dtype else torch.empty(rows, V, dtype=w_mm.dtype, device=w_mm.device)


def _head_chunk(h: Tensor, w_mm: Tensor, dtype: torch.dtype, fn, y: Tensor, ids: Tensor | None,
                rows: list[Tensor], coef: Tensor | None, bufs: tuple[Tensor, Tensor | None]
                ) -> tuple[Tensor, Tensor | None]:
    """One chunk of the fused head. h (n, D), w_mm (V, D) in the matmul dtype, y (n,) targets, ids (n, k)
    cached ids or None, rows: fn's extra (n, ...) inputs, coef (n, m) or None, bufs from _head_buffers
    (at least n rows; g below lives in them, valid until the next call).

    out = fn(log q(y) (n,), log q(ids) (n, k) or None, log q(tail) (n,) or None, *rows) -> (n, m), with
    q = softmax(h @ w.T) in `dtype` and the tail = every id not in ids (None when ids is None or k >= V).
    Returns (out detached, g (n, V) in w_mm's dtype = d sum(coef * out) / d logits), g None without coef.
    log q(tail) is floored at exp(-87) (fp32's smallest normal) times q's largest entry.
    """
    n = h.shape[0]
    buf, mm_buf = bufs[0][:n], None if bufs[1] is None else bufs[1][:n]
    if mm_buf is None:
        x = torch.mm(h.to(w_mm.dtype), w_mm.T, out=buf)  # (n, V) logits, overwritten in place below
    else:  # matmul in bf16, everything after it in fp32
        x = buf.copy_(torch.mm(h.to(w_mm.dtype), w_mm.T, out=mm_buf))
    tail = ids is not None and ids.shape[-1] < x.shape[-1]
    l_y = x.gather(1, y.unsqueeze(1)).squeeze(1)
    l_k = None if ids is None else x.gather(1, ids)
    mx = x.amax(-1, keepdim=True)
    e = x.sub_(mx).exp_()  # exp(logits - max): q * z
    z = e.sum(-1)
    lse = mx.squeeze(1) + z.log()
    lq = [l_y - lse, None if ids is None else l_k - lse.unsqueeze(1), None]
    if tail:  # the tail's mass summed directly (no 1 - sum_k q cancellation), K entries zeroed then restored
        e_k = e.gather(1, ids)
        z_tail = e.scatter_(1, ids, 0.0).sum(-1).clamp(min=torch.finfo(dtype).tiny)
        e.scatter_(1, ids, e_k)
        lq[2] = z_tail.log() - z.log()
    if coef is None:
        return fn(*lq, *rows).detach(), None
    inputs = [t.detach().requires_grad_() if t is not None else None for t in lq]
    with torch.enable_grad():
        out = fn(*inputs, *rows)
        used = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad(out, used, coef.to(out.dtype), allow_unused=True))
    a, b, c = (None if t is None else next(grads) for t in inputs)
    a = torch.zeros_like(l_y) if a is None else a
    # d log q(y) / d l_j = [j = y] - q_j; d log q(id_i) / d l_j = [j = id_i] - q_j;
    # d log q(tail) / d l_j = [j in tail] q_j / q(tail) - q_j. Summed with weights a, b_i, c:
    r = -a
    if b is not None:
        r = r - b.sum(-1)
    r = r / z if c is None else (r - c) / z  # c is None without a tail bucket
    g = e.mul_((r if c is None else r + c / z_tail).unsqueeze(1))
    if c is not None:  # the K entries are not in the tail: set them without its term (subtracting it
        g.scatter_(1, ids, e_k * r.unsqueeze(1))  # again would cancel catastrophically for a tiny tail)
    g.scatter_add_(1, y.unsqueeze(1), a.unsqueeze(1))
    if b is not None:
        g.scatter_add_(1, ids, b)
    return out.detach(), g if mm_buf is None else mm_buf.copy_(g)


class _FusedHead(torch.autograd.Function):
    """Per-position outputs of a linear head, with their hidden-state gradients taken in the forward.

    forward(h (n, D), w (V, D), coef (n, m), fn, chunk_size (None or 0: default_chunk_size), y (n,),
    ids (n, k) or None, *rows (n, ...))
    -> (s (n,), out (n, m)): out = fn(log q(y), log q(ids), log q(tail), *rows) chunk by chunk (see
    _head_chunk), s = (coef * out).sum(-1). Only s carries a gradient. Fixing how each row's m outputs
    combine (coef, constants) before the upstream gradient is known is what lets
    d s_t / d h_t = (d s_t / d logits_t) @ w be computed in the forward; the backward is then
    grad_h = grad_s[:, None] * those rows.
    A trainable w (tied embeddings, full fine-tuning; not LoRA) needs grad_s inside its sum over rows, so
    its gradient is computed in the backward by recomputing each chunk's logits.
    """

    @staticmethod
    def forward(ctx, h, w, coef, fn, chunk_size, y, ids, *rows):
        need_h, need_w = ctx.needs_input_grad[:2]
        chunk_size = chunk_size or default_chunk_size(w.shape[0], h.device)
        w_mm, dtype = w.to(torch.promote_types(h.dtype, w.dtype)), _compute_dtype(h, w)
        outs, dh, bufs = [], [], _head_buffers(min(chunk_size, h.shape[0]), w_mm, dtype)
        for s in range(0, max(h.shape[0], 1), chunk_size):
            sl = slice(s, s + chunk_size)
            out, g = _head_chunk(h[sl], w_mm, dtype, fn, y[sl], None if ids is None else ids[sl],
                                 [r[sl] for r in rows], coef[sl] if need_h else None, bufs)
            outs.append(out)
            if need_h:
                dh.append(g @ w_mm)  # (n_c, D)
        out = torch.cat(outs)
        ctx.fn, ctx.chunk_size, ctx.n_rows, ctx.h_dtype = fn, chunk_size, len(rows), h.dtype
        ctx.save_for_backward(torch.cat(dh) if need_h else None,
                              *((h, w, coef, y, ids, *rows) if need_w else ()))
        ctx.mark_non_differentiable(out)
        return (coef.to(out.dtype) * out).sum(-1), out

    @staticmethod
    def backward(ctx, grad_s, _):
        dh, *saved = ctx.saved_tensors
        grad_h = None if dh is None else (grad_s.unsqueeze(-1) * dh.to(grad_s.dtype)).to(ctx.h_dtype)
        grad_w = None
        if saved:
            h, w, coef, y, ids, *rows = saved
            w_mm, dtype, c = w.to(torch.promote_types(h.dtype, w.dtype)), _compute_dtype(h, w), ctx.chunk_size
            grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device)
            bufs = _head_buffers(min(c, h.shape[0]), w_mm, dtype)
            for s in range(0, max(h.shape[0], 1), c):
                sl = slice(s, s + c)
                _, g = _head_chunk(h[sl], w_mm, dtype, ctx.fn, y[sl], None if ids is None else ids[sl],
                                   [r[sl] for r in rows], coef[sl] * grad_s[sl, None], bufs)
                grad_w += g.T @ h[sl].to(w_mm.dtype)  # (V, D)
            grad_w = grad_w.to(w.dtype)
        return (grad_h, grad_w, None, None, None, None, None) + (None,) * ctx.n_rows


def _logp_cols(lq_y: Tensor, lq_k: None, lq_tail: None) -> Tensor:
    return lq_y.unsqueeze(-1)  # (n, 1)


def _student_cols(lq_y: Tensor, lq_k: Tensor, lq_tail: Tensor | None, p_lp: Tensor) -> Tensor:
    return torch.stack([lq_y, pk.bucket_kl(lq_k, lq_tail, p_lp)], -1)  # (n, 2): Eq. 8 per position


def _response_rows(hidden: Tensor, labels: Tensor, n_rows: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """-> h (n, D) the hidden states of the n scored positions (labels[:, t+1] a response token),
    idx (n,) their flat index in the (B*(T-1),) shifted grid, y (n,) their targets. n_rows: n when the
    caller knows it (data.make_batch's count, from the host copy of the labels), else counted here."""
    B, T, D = hidden.shape
    y, m = pk.shift_labels(labels)
    m = m.reshape(-1)
    # a data-dependent size makes the host wait for the device; a known one does not (and traces)
    idx = m.nonzero().squeeze(-1) if n_rows is None else torch.nonzero_static(m, size=n_rows).squeeze(-1)
    b, t = idx // (T - 1), idx % (T - 1)
    return hidden.reshape(B * T, D).index_select(0, b * T + t), idx, y.reshape(-1)[idx]


def _scatter_rows(x: Tensor, idx: Tensor, B: int, T: int) -> Tensor:
    """x (n,) at flat shifted positions idx -> (B, T-1), 0 elsewhere (differentiable in x). Not a view:
    it may be returned from an FSDP2 root forward (head_fn), whose backward hook a view would lose."""
    return x.new_zeros(B, T - 1).index_put((idx // (T - 1), idx % (T - 1)), x)


def token_logps_fused(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int | None = None,
                      n_rows: int | None = None) -> Tensor:
    """proxykd.token_logps (Eq. 1 per position) by the fused head: hidden (B, T, D), weight (V, D), labels
    (B, T) -> (B, T-1) fp32, 0 where masked, up to the rounding of the matmuls in hidden's / weight's
    dtype. n_rows: the number of response positions (see _response_rows)."""
    B, T, _ = hidden.shape
    h, idx, y = _response_rows(hidden, labels, n_rows)
    coef = torch.ones(h.shape[0], 1, dtype=_compute_dtype(hidden, weight), device=hidden.device)
    lp, _ = _FusedHead.apply(h, weight, coef, _logp_cols, chunk_size, y, None)
    return _scatter_rows(lp, idx, B, T)


def nll_loss_fused(hidden: Tensor, weight: Tensor, labels: Tensor, n_tokens: Tensor | float | None = None,
                   chunk_size: int | None = None, n_rows: int | None = None) -> Tensor:
    """proxykd.nll_loss (Eq. 1 / 3 / 7) by the fused head: the same lines on token_logps_fused's log-probs."""
    if n_tokens is None:
        n_tokens = pk.num_response_tokens(labels).clamp(min=1)
    return -token_logps_fused(hidden, weight, labels, chunk_size, n_rows).sum() / n_tokens


def sequence_logps_fused(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int | None = None,
                         n_rows: int | None = None) -> Tensor:
    """proxykd.sequence_logps (Eq. 1, 3, 4, 9) by the fused head: hidden (B, T, D), weight (V, D), labels
    (B, T) -> (B,) fp32. The proxy's NLL + DPO forward over [y; y_hat]."""
    return token_logps_fused(hidden, weight, labels, chunk_size, n_rows).sum(-1)


def student_loss_fused(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logps: Tensor,
    weights: Tensor | None = None,
    alpha: float = 100.0,
    n_tokens: Tensor | float | None = None,
    chunk_size: int | None = None,
    n_rows: int | None = None,
) -> pk.StudentLoss:
    """proxykd.student_loss (Eq. 11 = Eq. 7 + alpha * Eq. 10) by the fused head: hidden (B, T, D) and weight
    (V, D) instead of logits, otherwise the same arguments and result; n_rows as token_logps_fused's.

    Eq. 11 is linear in each position's (log pi_s(y_t), KL_t) with known coefficients (-1 / N and
    alpha * w_i / N), which is what the fused head needs to differentiate in the forward.
    """
    B, T, _ = hidden.shape
    dtype = _compute_dtype(hidden, weight)
    h, idx, y = _response_rows(hidden, labels, n_rows)
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, k)[idx].long()
    p_lp = topk_logps.reshape(-1, k)[idx].detach().to(dtype)
    n = pk.num_response_tokens(labels).clamp(min=1) if n_tokens is None else n_tokens
    w = torch.ones(B, dtype=dtype, device=hidden.device) if weights is None else weights.detach().to(dtype)
    # d Eq. 11 / d (lp, KL)
    coef = torch.stack([-torch.ones_like(p_lp[:, 0]), alpha * w[idx // (T - 1)]], -1) / n
    s, out = _FusedHead.apply(h, weight, coef, _student_cols, chunk_size, y, ids, p_lp)
    lp = _scatter_rows(out[:, 0], idx, B, T)
    kl_seq = _scatter_rows(out[:, 1], idx, B, T).sum(-1)
    nll = -lp.sum() / n
    wkl = (w * kl_seq).sum() / n
    return pk.StudentLoss(s.sum(), nll, wkl, kl_seq)  # s.sum() = nll + alpha * wkl, differentiable
