"""The fast paths of fast.py against the references of proxykd.py: values and gradients (with respect to
the hidden states and, where trainable, the output weight), masking, accumulation, dtypes, memory, and
the proxy cache's producer and layout. fp64 wherever values are compared tightly."""

import weakref

import pytest
import torch

import fast
import proxykd as pk
import topk_cache
from test_losses import (
    F64,
    _student_setup,
    check_gradient_accumulation_equals_big_batch,
    check_masked_positions_contribute_nothing,
    make_labels,
    random_topk,
)


def test_masked_positions_contribute_nothing():
    check_masked_positions_contribute_nothing(lambda *args: fast.student_loss_fused(*args, chunk_size=5))


def test_gradient_accumulation_equals_big_batch():
    # W is trainable, so its gradient takes the recompute path
    check_gradient_accumulation_equals_big_batch(lambda *args: fast.student_loss_fused(*args, chunk_size=4))


@pytest.mark.parametrize("k", [1, 5, 15])  # 15 = V
def test_topk_logps_chunked_equals_reference(k):
    """The cache's producer against proxykd.topk_logps from full logits. Two vocabulary rows are made
    equal, so tokens tie at every position; tied tokens may come in either order, anything else may not."""
    _, labels, hidden, W, _, _, _ = _student_setup(21, V=15)
    hidden, W = hidden.detach(), W.detach().clone()
    W[7] = W[3]
    B, T, _ = hidden.shape
    ref_ids, ref_lps, ref_seq = pk.topk_logps(hidden @ W.T, labels, k)
    full = (hidden @ W.T)[:, :-1].log_softmax(-1)
    # tied[b, t, i]: another token has the log-prob of the i-th listed one
    tied = ((full.unsqueeze(-2) - ref_lps.unsqueeze(-1)).abs() < 1e-9).sum(-1) > 1
    assert tied.any() or k < 15
    for chunk in (1, 4, None, 1000):
        ids, lps, seq = fast.topk_logps_chunked(hidden, W, labels, k, chunk)
        assert ids.dtype == torch.int32 and ids.shape == lps.shape == (B, T - 1, k)
        # sorted descending, like the reference
        torch.testing.assert_close(lps, ref_lps, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seq, ref_seq, rtol=1e-12, atol=1e-12)
        assert (ids.long().sort(-1).values.diff(dim=-1) > 0).all()  # k distinct tokens
        torch.testing.assert_close(full.gather(-1, ids.long()), lps, rtol=1e-12, atol=1e-12)
        assert torch.equal(ids[~tied], ref_ids[~tied])


def test_topk_logps_chunked_multiplies_in_the_weights_dtype():
    """On a bf16 proxy the cache's producer multiplies in bf16 and scores the product in fp32, as
    proxykd.topk_logps does on those bf16 logits, and never makes an fp32 copy of the output weight (at
    70B a 1 GiB copy per rank)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, labels, hidden, W, _, _, _ = _student_setup(22, V=15)
    hidden, W = hidden.detach().bfloat16(), W.detach().bfloat16()

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_outputs = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.fp32_outputs.add(tuple(t.shape))
            return out

    with Shapes() as seen:
        ids, lps, seq = fast.topk_logps_chunked(hidden, W, labels, 4, 2)
    assert tuple(W.shape) not in seen.fp32_outputs
    ref_ids, ref_lps, ref_seq = pk.topk_logps(hidden @ W.T, labels, 4)  # bf16 logits, scored in fp32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lps, ref_lps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seq, ref_seq, rtol=1e-6, atol=1e-5)


def test_default_chunk_size_keeps_cpu_blocks_at_16_mib():
    for V in (7, 1000, 32000, 128256, 1 << 23):
        rows = fast.default_chunk_size(V, "cpu")
        assert rows >= 1 and (rows == 1 or rows * V * 4 <= 16 << 20) and (rows + 1) * V * 4 > 16 << 20
        assert fast.default_chunk_size(V, "cuda") == fast.default_chunk_size(V, torch.device("meta")) == 1024


@pytest.mark.parametrize("k", [4, 15])  # 15 = V: no tail bucket
@pytest.mark.parametrize("trainable_w", [False, True])
def test_fused_equals_reference_values_and_grads(trainable_w, k):
    """The fused head (gradients taken in the forward) against the full-logits losses, fp64: values, and
    gradients wrt hidden and (when it requires grad) W, under upstream gradients that differ per position
    (pow(2), DPO) so a wrong per-row scale could not hide behind a plain sum."""
    _, labels, hidden, W, ids, lps, weights = _student_setup(17, V=15, k=k)
    W = W.detach().requires_grad_(trainable_w)
    B = hidden.shape[0]
    ref_logps = torch.randn(2, B, dtype=F64)
    wrt = (hidden, W) if trainable_w else (hidden,)

    def grads(out):
        return (out,) + torch.autograd.grad(out, wrt)

    def dpo(lp):
        return pk.dpo_loss(lp, lp.flip(0), *ref_logps)[0].sum()

    for chunk in (1, 5, 7, 1000):  # 1000 > B*(T-1): a single chunk
        pairs = [
            (lambda: pk.token_logps(hidden @ W.T, labels).pow(2).sum(),
             lambda: fast.token_logps_fused(hidden, W, labels, chunk).pow(2).sum()),
            (lambda: pk.nll_loss(hidden @ W.T, labels, 7.0),
             lambda: fast.nll_loss_fused(hidden, W, labels, 7.0, chunk)),
            (lambda: pk.nll_loss(hidden @ W.T, labels),
             lambda: fast.nll_loss_fused(hidden, W, labels, chunk_size=chunk)),
            (lambda: dpo(pk.sequence_logps(hidden @ W.T, labels)),
             lambda: dpo(fast.sequence_logps_fused(hidden, W, labels, chunk))),
            (lambda: pk.student_loss(hidden @ W.T, labels, ids, lps, weights, alpha=3.0, n_tokens=11.0).loss,
             lambda: fast.student_loss_fused(hidden, W, labels, ids, lps, weights, 3.0, 11.0, chunk).loss),
            (lambda: pk.student_loss(hidden @ W.T, labels, ids, lps).loss,
             lambda: fast.student_loss_fused(hidden, W, labels, ids, lps, chunk_size=chunk).loss),
        ]
        for ref_f, fused_f in pairs:
            for a, b in zip(grads(ref_f()), grads(fused_f())):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        ref = pk.student_loss(hidden @ W.T, labels, ids, lps, weights)
        out = fast.student_loss_fused(hidden, W, labels, ids, lps, weights, chunk_size=chunk)
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a.detach(), rtol=1e-10, atol=1e-12)
        assert not (out.nll.requires_grad or out.wkl.requires_grad or out.kl.requires_grad)
    with torch.no_grad():  # no gradient wanted: values only
        torch.testing.assert_close(fast.sequence_logps_fused(hidden, W, labels, 4),
                                   pk.sequence_logps(hidden @ W.T, labels))


def test_fused_tail_bucket_when_student_is_peaked():
    """The fused head sums the tail's probability directly rather than as 1 - sum_k q: a student that puts
    all but ~e^-60 of its mass on the k cached ids still gets Eq. 8's tail term and its gradient right in
    fp32, where 1 - sum_k q would be 0 and the KL infinite."""
    g = torch.Generator().manual_seed(19)
    B, T, V, k = 2, 6, 40, 3
    labels = make_labels(g, [(1, 6), (2, 5)], T, V)
    _, ids, lps = random_topk(g, B, T - 1, V, k)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    logits[:, :-1].scatter_add_(-1, ids.long(), torch.full(ids.shape, 60.0, dtype=F64))
    eye = torch.eye(V, dtype=F64)  # hidden = logits, W = I: the head's matmul is exact

    def run(dtype):
        h = logits.to(dtype).requires_grad_()
        out = fast.student_loss_fused(h, eye.to(dtype), labels, ids, lps, chunk_size=4)
        return out.loss, out.kl, torch.autograd.grad(out.loss, h)[0]

    h64 = logits.clone().requires_grad_()
    ref = pk.student_loss(h64 @ eye.T, labels, ids, lps)
    ref_grad = torch.autograd.grad(ref.loss, h64)[0]
    assert ref.kl.min() > 10  # the tail term dominates: p_tail * 60
    loss, kl, grad = run(torch.float32)
    torch.testing.assert_close(kl.double(), ref.kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), ref.loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_fused_bf16_matmuls_fp32_losses():
    """bf16 hidden / weight: the logits matmul runs in bf16 (as transformers computes logits), everything
    after it in fp32; the gradient wrt hidden comes back in bf16 and close to the fp64 one."""
    g = torch.Generator().manual_seed(18)
    B, T, V, D = 2, 9, 50, 16
    h = torch.randn(B, T, D, generator=g).bfloat16().requires_grad_()
    W = torch.randn(V, D, generator=g).bfloat16()
    labels = make_labels(g, [(1, 9), (2, 7)], T, V)
    out = fast.sequence_logps_fused(h, W, labels, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pk.sequence_logps((h @ W.T).float(), labels), rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), h)
    h64 = h.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(pk.sequence_logps(h64 @ W.double().T, labels).sum(), h64)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_fused_keeps_no_vocab_sized_tensor_for_backward():
    _, labels, hidden, W, ids, lps, weights = _student_setup(15, V=40, k=3)
    V = W.shape[0]

    def saved_shapes(f):
        """Shapes of the tensors the result's graph still holds for its backward (the fused head's
        forward builds and frees a graph of its own per chunk: those are not kept)."""
        saved = []
        pack = lambda t: saved.append(weakref.ref(t)) or t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = f()  # noqa: F841 (keeps the graph alive)
        return [tuple(r().shape) for r in saved if r() is not None]

    unchunked = saved_shapes(lambda: pk.student_loss(hidden @ W.T, labels, ids, lps, weights).loss)
    fused = saved_shapes(
        lambda: fast.student_loss_fused(hidden, W.detach(), labels, ids, lps, weights, chunk_size=4).loss)
    assert any(s and s[-1] == V for s in unchunked)  # the probe sees full logits when they are kept
    assert fused and not any(s and s[-1] == V for s in fused)


def test_proxy_cache_roundtrip_and_self_distillation():
    g = torch.Generator().manual_seed(17)
    B, T, V, D, k = 3, 9, 30, 8, 6
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g)
    labels = make_labels(g, [(2, 9), (4, 8), (1, 5)], T, V)
    ids, lps, seq = fast.topk_logps_chunked(h, W, labels, k)
    rows = topk_cache.topk_rows(ids, lps.half(), labels)  # what a cache file stores
    assert [r[0].shape[0] for r in rows] == pk.response_mask(labels).sum(1).tolist()
    ids2, lps2 = topk_cache.pad_topk(rows, labels)
    mask = pk.response_mask(labels)
    assert torch.equal(ids2[mask], ids[mask]) and torch.equal(lps2[mask], lps.half()[mask])
    # a student identical to the proxy: KL ~ 0 up to the fp16 rounding of the cache
    kl = pk.topk_kl(h @ W.T, ids2, lps2, mask)
    assert (kl >= 0).all() and (kl < 1e-3).all()
    with pytest.raises(ValueError):
        topk_cache.pad_topk(rows, make_labels(g, [(1, 9), (4, 8), (1, 5)], T, V))


def random_example(g: torch.Generator, vocab: int, n_prompt: int, n_reply: int) -> dict:
    """An encoded example (data.encode_example's form) of random tokens: n_prompt masked, n_reply scored."""
    ids = torch.randint(1, vocab, (n_prompt + n_reply,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]}


class RandomTopkCache:
    """A stand-in for topk_cache.ProxyCache: a random top-k row per response token of each encoded
    example (ids int32, fp16 log-probs of a k + 1 outcome distribution), drawn once, so every call sees
    the same rows."""

    def __init__(self, encoded: dict, vocab: int, k: int, g: torch.Generator):
        n = {i: sum(y != -100 for y in e["labels"][1:]) for i, e in encoded.items()}
        self.r = {i: (torch.randint(0, vocab, (n[i], k), generator=g, dtype=torch.int32),
                      torch.log_softmax(torch.randn(n[i], k + 1, generator=g), -1)[:, :k].half())
                  for i in n}

    def rows(self, ids):
        return [self.r[i] for i in ids]


def test_training_steps_give_the_same_step_with_either_loss_head():
    """One optimizer step of each script with --loss reference (full logits, proxykd.py as written) and with
    --loss fused (fast.py): the same logged values and the same LoRA update. An fp64 model and SGD at lr 1,
    so the update is minus the gradient: the two heads differ only in the order of fp64 sums (~1e-15
    relative), which after the LoRA parameters' fp32 cast is at most an ulp or two (rtol 1e-6)."""
    import torch.distributed as dist

    import data
    import lora
    import train_proxy
    import train_student
    from model import Llama, ModelArgs
    from run import Run

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(23)
        V, k = 50, 4
        torch.manual_seed(23)
        model = lora.apply_lora(Llama(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                                vocab_size=V)).double(), r=4, alpha=8.0)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # a trained-looking adapter: B != 0, so every LoRA tensor gets a gradient
            torch.nn.init.normal_(p, std=0.1, generator=g)
        start = [p.detach().clone() for p in params]

        encoded = {i: random_example(g, V, 3 + i % 4, 4 + 2 * i) for i in range(5)}
        rows = [random_example(g, V, 3 + i % 4, 2 + i) for i in range(5)]  # the proxy's own replies y_hat
        micro = [data.make_batch(m, encoded, 0, "cpu") for m in ([0, 1, 2], [3, 4])]
        pairs = [data.make_batch(m, encoded, 0, "cpu", extra=[rows[i] for i in m])
                 for m in ([0, 1, 2], [3, 4])]
        for b in pairs:
            b["ref_chosen"], b["ref_rejected"] = (-torch.rand(b["n"], generator=g) * 20,
                                                  -torch.rand(b["n"], generator=g) * 20)

        cache, weights = RandomTopkCache(encoded, V, k, g), {i: 0.2 + 0.15 * i for i in encoded}
        steps = {
            "proxy warm-up (Eq. 3)": lambda run: train_proxy.train_step(run, micro),
            "proxy alignment (Eq. 6)": lambda run: train_proxy.train_step(run, pairs),
            "student (Eq. 11)": lambda run: train_student.student_step(run, micro, cache, weights),
            "black-box KD (Eq. 7)": lambda run: train_student.student_step(run, micro, None, None),
        }
        for name, step in steps.items():
            out = {}
            for loss in ("reference", "fused"):
                with torch.no_grad():
                    for p, s in zip(params, start):
                        p.copy_(s)
                script = train_proxy if name.startswith("proxy") else train_student
                cfg = script.Config(loss=loss, chunk_size=3,
                                    **({"beta": 0.5} if script is train_proxy else {"alpha": 2.0}))
                logged = step(Run(cfg, model=model, optimizer=torch.optim.SGD(params, lr=1.0)))
                out[loss] = (logged, [p.detach() - s for p, s in zip(params, start)])
            (ref, d_ref), (fused, d_fused) = out["reference"], out["fused"]
            assert fused._fields == ref._fields
            for f in ref._fields:
                assert getattr(fused, f) == pytest.approx(getattr(ref, f), rel=1e-10, abs=1e-12), (name, f)
            assert all(d.abs().max() > 0 for d in d_ref), name  # every LoRA tensor moved
            for a, b in zip(d_ref, d_fused):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=name)
    finally:
        if own_group:
            dist.destroy_process_group()
