"""Property tests for proxykd.py against brute-force references computed another way (Python loops,
torch.distributions, F.cross_entropy). fp64 wherever values are compared tightly."""

import math
import multiprocessing as mp
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

import proxykd as pk

F64 = torch.float64


def make_labels(gen: torch.Generator, spans: list[tuple[int, int]], T: int, V: int) -> torch.Tensor:
    """spans[b] = (prompt_len, total_len): -100 on the prompt and on the right padding."""
    labels = torch.randint(0, V, (len(spans), T), generator=gen)
    for b, (p, n) in enumerate(spans):
        labels[b, :p] = pk.IGNORE_INDEX
        labels[b, n:] = pk.IGNORE_INDEX
    return labels


def pad_dim1(x: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad dim 1 of (B, L) or (B, L, k) to `length`."""
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, length - x.shape[1]], value=value)


def random_topk(gen: torch.Generator, B: int, Tm1: int, V: int, k: int, dtype=F64):
    """A proxy cache from random full proxy logits: (proxy_logits (B,Tm1,V), ids (B,Tm1,k) int32 in a
    random order, logps (B,Tm1,k) normalised over the full vocabulary)."""
    proxy_logits = 3 * torch.randn(B, Tm1, V, generator=gen, dtype=dtype)
    ids = torch.rand(B, Tm1, V, generator=gen).argsort(-1)[..., :k]
    logps = proxy_logits.log_softmax(-1).gather(-1, ids)
    return proxy_logits, ids.to(torch.int32), logps


def coarse_kl_reference(p_logits: torch.Tensor, ids: list[int], q_logits: torch.Tensor) -> torch.Tensor:
    """KL of the (k tokens + tail bucket) distributions, built explicitly, via torch.distributions."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    rest = [j for j in range(p.shape[0]) if j not in ids]
    pc = [p[j] for j in ids] + ([p[rest].sum()] if rest else [])
    qc = [q[j] for j in ids] + ([q[rest].sum()] if rest else [])
    return kl_divergence(Categorical(probs=torch.stack(pc)), Categorical(probs=torch.stack(qc)))


# --------------------------------------------------------------------------- log-probs and NLL


def test_sequence_logps_matches_python_loop():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    labels = make_labels(g, [(2, 9), (4, 7), (1, 3)], T, V)
    extra = torch.rand(B, T - 1, generator=g) > 0.3
    for mask in (None, extra):
        ref = torch.zeros(B, dtype=F64)
        for b in range(B):
            for t in range(T - 1):
                if labels[b, t + 1] != -100 and (mask is None or mask[b, t]):
                    ref[b] += torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
        torch.testing.assert_close(pk.sequence_logps(logits, labels, mask), ref, rtol=1e-12, atol=1e-12)


def test_token_logps_upcasts_bf16():
    g = torch.Generator().manual_seed(1)
    logits = (8 * torch.randn(2, 6, 300, generator=g)).bfloat16()
    labels = make_labels(g, [(1, 6), (2, 5)], 6, 300)
    out = pk.token_logps(logits, labels)
    assert out.dtype == torch.float32
    # same bf16 values, exact math: a bf16 log_softmax would be off by ~1e-1 here
    torch.testing.assert_close(out.double(), pk.token_logps(logits.double(), labels), rtol=0, atol=1e-4)


def test_nll_loss_matches_cross_entropy_and_ignores_minus_100():
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 8, 13
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    labels = make_labels(g, [(2, 8), (3, 6), (1, 4)], T, V)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss = pk.nll_loss(logits, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert int(pk.num_response_tokens(labels)) == int((labels[:, 1:] != -100).sum()) == 6 + 3 + 3
    # explicit divisor: sum / n
    torch.testing.assert_close(pk.nll_loss(logits, labels, n_tokens=4.0), ref * 12 / 4)
    loss.backward()
    # positions whose next label is -100, and the last position (it predicts nothing)
    ignored = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], 1)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().min() > 0


# --------------------------------------------------------------------------- DPO / proxy (Eq. 4-6)


def test_dpo_is_log2_at_reference_and_matches_formula():
    g = torch.Generator().manual_seed(3)
    pc, pr = -10 * torch.rand(5, generator=g, dtype=F64), -10 * torch.rand(5, generator=g, dtype=F64)
    losses, cr, rr = pk.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2), dtype=F64))
    assert cr.abs().max() == 0 and rr.abs().max() == 0
    rc, rrf = -10 * torch.rand(5, generator=g, dtype=F64), -10 * torch.rand(5, generator=g, dtype=F64)
    losses, cr, rr = pk.dpo_loss(pc, pr, rc, rrf, beta=0.3)
    for i in range(5):
        h = 0.3 * ((pc[i] - rc[i]) - (pr[i] - rrf[i]))
        assert abs(losses[i] - math.log1p(math.exp(-h))) < 1e-12  # -log sigmoid(h)
        assert abs(cr[i] - 0.3 * (pc[i] - rc[i])) < 1e-12 and abs(rr[i] - 0.3 * (pr[i] - rrf[i])) < 1e-12


def test_dpo_gradient_raises_chosen_lowers_rejected():
    g = torch.Generator().manual_seed(4)
    B, T, V = 4, 7, 10
    chosen_labels = make_labels(g, [(2, 7), (3, 7), (2, 5), (1, 6)], T, V)
    rejected_labels = make_labels(g, [(2, 6), (3, 7), (2, 7), (1, 4)], T, V)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=F64, requires_grad=True)
    labels = torch.cat([chosen_labels, rejected_labels])
    with torch.no_grad():
        ref = pk.sequence_logps(logits, labels)  # pi_p^(i-1) = the current proxy, frozen

    lp = pk.sequence_logps(logits, labels)
    pc, pr = lp[:B].detach().requires_grad_(), lp[B:].detach().requires_grad_()
    losses, cr, rr = pk.dpo_loss(pc, pr, ref[:B], ref[B:], beta=0.5)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent pushes y up and y_hat down
    assert not cr.requires_grad and not rr.requires_grad

    for _ in range(3):  # a few SGD steps on the logits themselves
        lp = pk.sequence_logps(logits, labels)
        losses, _, _ = pk.dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=0.5)
        logits.grad = None
        losses.mean().backward()
        with torch.no_grad():
            logits -= 0.5 * logits.grad
    after = pk.sequence_logps(logits, labels).detach()
    assert (after[:B] > ref[:B]).all() and (after[B:] < ref[B:]).all()


def test_proxy_loss_is_nll_plus_pref_and_accumulates_exactly():
    g = torch.Generator().manual_seed(5)
    V, D = 12, 5
    W = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    micro = []
    for B, T in ((2, 6), (3, 9)):
        h = torch.randn(2 * B, T, D, generator=g, dtype=F64)
        prompt = torch.randint(1, 3, (2 * B,), generator=g).tolist()
        pad = torch.randint(0, 3, (2 * B,), generator=g).tolist()
        labels = make_labels(g, [(p, T - n) for p, n in zip(prompt, pad)], T, V)
        ref = pk.sequence_logps(h @ W.detach().T, labels)
        micro.append((h, labels, ref, B))

    def terms(h, labels, ref, B, n_tok, n_pairs):
        lp = pk.sequence_logps_chunked(h, W, labels, chunk_size=4)
        # reference = pi_p^(i-1), shifted so that the DPO term is not at its log 2 point
        ref_c, ref_r = ref[:B] - 0.3, ref[B:] + 0.2
        return pk.proxy_loss(lp[:B], lp[B:], ref_c, ref_r, n_tokens=n_tok, beta=0.2, n_pairs=n_pairs)

    n_tok = sum(pk.num_response_tokens(lab[:B]) for _, lab, _, B in micro)
    n_pairs = sum(B for *_, B in micro)
    total = 0.0
    for h, labels, ref, B in micro:
        out = terms(h, labels, ref, B, n_tok, n_pairs)
        out.loss.backward()
        total = total + out.loss.detach()
        # Eq. 6 = Eq. 3 + Eq. 5 with the documented reductions
        lp = pk.sequence_logps(h @ W.T, labels).detach()
        dpo = -F.logsigmoid(0.2 * ((lp[:B] - ref[:B] + 0.3) - (lp[B:] - ref[B:] - 0.2)))
        torch.testing.assert_close(out.nll, -lp[:B].sum() / n_tok)
        torch.testing.assert_close(out.pref, dpo.sum() / n_pairs)
    grad_acc, W.grad = W.grad.clone(), None

    # one big batch: every micro-batch padded to the longest T (pad positions are -100), chosen first
    T = max(h.shape[1] for h, *_ in micro)
    chosen_then_rejected = lambda f: torch.cat([f(m)[: m[3]] for m in micro] + [f(m)[m[3] :] for m in micro])
    hc = chosen_then_rejected(lambda m: pad_dim1(m[0], T, 0.0))
    lc = chosen_then_rejected(lambda m: pad_dim1(m[1], T, -100))
    rc = chosen_then_rejected(lambda m: m[2])
    P = n_pairs
    big = terms(hc, lc, rc, P, pk.num_response_tokens(lc[:P]), None)  # defaults: n_pairs = B
    big.loss.backward()
    torch.testing.assert_close(total, big.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_acc, W.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- sample weights (Eq. 9)


def test_sample_weights_standardise_over_the_set():
    x = torch.tensor([-40.0, -20.0, -30.0, -10.0, -50.0], dtype=F64)
    mu, gamma = x.mean(), x.std(unbiased=False)  # population std: Var over D_s
    w = pk.sample_weights(x)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), torch.sigmoid((x - mu) / gamma), rtol=1e-6, atol=1e-7)
    assert w[2] == 0.5  # the mean sample
    m, s = -123.0, 7.5
    w = pk.sample_weights(torch.tensor([m - s, m + s]))  # mean m, population std s
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([-1.0, 1.0])))
    # explicit global moments override the local ones
    w = pk.sample_weights(torch.tensor([-5.0, -3.0]), mu=-4.0, gamma=2.0)
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([-0.5, 0.5])))


@pytest.mark.parametrize("x", [[-12345.678] * 7, [3.0], [0.0, 0.0], [-0.1] * 1000])
def test_sample_weights_zero_spread_is_half_without_nan(x):
    w = pk.sample_weights(torch.tensor(x, dtype=torch.float32))
    assert torch.equal(w, torch.full((len(x),), 0.5))


def test_sample_weights_per_token_option():
    lp = torch.tensor([-10.0, -40.0, -90.0])
    n = torch.tensor([2, 20, 30])  # per-token: -5, -2, -3 -> a different order than the sums
    w_seq = pk.sample_weights(lp)
    w_tok = pk.sample_weights(lp, n_tokens=n, per_token=True)
    s = (lp / n).double()
    ref = torch.sigmoid((s - s.mean()) / s.std(unbiased=False))
    torch.testing.assert_close(w_tok.double(), ref, rtol=1e-6, atol=1e-7)
    assert w_seq.argmax() == 0 and w_tok.argmax() == 1
    with pytest.raises(ValueError):
        pk.sample_weights(lp, per_token=True)


def _dist_worker(rank: int, world: int, path: str, shards, q) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    mu, gamma = pk.reduce_mean_std(shards[rank])
    q.put((rank, float(mu), float(gamma), pk.sample_weights(shards[rank]).tolist()))
    dist.destroy_process_group()


def test_reduce_mean_std_across_ranks(tmp_path):
    g = torch.Generator().manual_seed(6)
    full = -200 + 30 * torch.randn(11, generator=g, dtype=F64)
    shards = [full[:3], full[3:]]  # unequal shards
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, store, shards, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    mu, gamma = full.mean().item(), full.std(unbiased=False).item()
    for rank, m, s, w in results:
        assert abs(m - mu) < 1e-9 and abs(s - gamma) < 1e-9
    w_all = torch.tensor(results[0][3] + results[1][3])
    torch.testing.assert_close(w_all, pk.sample_weights(full))  # == one process over all of D_s


# --------------------------------------------------------------------------- top-k KL (Eq. 8)


def test_topk_kl_of_identical_distributions_is_zero():
    g = torch.Generator().manual_seed(7)
    B, T, V = 2, 6, 17
    mask = torch.ones(B, T - 1, dtype=torch.bool)
    for k in (1, 4, V):
        proxy_logits, ids, lps = random_topk(g, B, T - 1, V, k)
        student = F.pad(proxy_logits, (0, 0, 0, 1))  # same distribution at every predicting position
        kl = pk.topk_kl(student, ids, lps, mask)
        assert kl.abs().max() < 1e-12


def test_topk_kl_equals_full_kl_at_k_equals_v_and_is_below_it_otherwise():
    g = torch.Generator().manual_seed(8)
    B, T, V = 2, 7, 9
    labels = make_labels(g, [(2, 7), (1, 5)], T, V)
    mask = pk.response_mask(labels)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=F64)
    proxy_logits, ids_all, lps_all = random_topk(g, B, T - 1, V, V)  # a random permutation of all ids
    full = torch.zeros(B, dtype=F64)
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t]:
                p, q = Categorical(logits=proxy_logits[b, t]), Categorical(logits=student[b, t])
                full[b] += kl_divergence(p, q)
    torch.testing.assert_close(pk.topk_kl(student, ids_all, lps_all, mask), full, rtol=1e-10, atol=1e-12)

    for k in (1, 3, V - 1):
        ids, lps = ids_all[..., :k], lps_all[..., :k]
        kl = pk.topk_kl(student, ids, lps, mask)
        ref = torch.zeros(B, dtype=F64)
        for b in range(B):
            for t in range(T - 1):
                if mask[b, t]:
                    ref[b] += coarse_kl_reference(proxy_logits[b, t], ids[b, t].tolist(), student[b, t])
        torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
        assert (kl <= full + 1e-12).all()  # data processing inequality
        if k == V - 1:  # a one-token tail bucket loses nothing
            torch.testing.assert_close(kl, full, rtol=1e-10, atol=1e-12)
        else:
            assert (kl < full - 1e-3).all()


def test_topk_kl_nonnegative_on_random_and_rounded_caches():
    g = torch.Generator().manual_seed(9)
    B, T, V = 4, 12, 50
    mask = torch.ones(B, T - 1, dtype=torch.bool)
    for k in (1, 2, 10, V - 1, V):
        for scale in (0.1, 3.0, 30.0):
            student = scale * torch.randn(B, T, V, generator=g)
            proxy_logits, ids, lps = random_topk(g, B, T - 1, V, k, dtype=torch.float32)
            proxy_logits *= scale / 3
            lps = proxy_logits.log_softmax(-1).gather(-1, ids.long())
            for cache in (lps, lps.half(), lps.bfloat16()):  # rounding can push sum_k p_k above 1
                kl = pk.topk_kl(student, ids, cache, mask)
                assert torch.isfinite(kl).all() and (kl >= 0).all(), (k, scale, cache.dtype, kl)
            # student == proxy in fp32: the true value is 0, rounding must not make it negative
            same = pk.topk_kl(F.pad(proxy_logits, (0, 0, 0, 1)), ids, lps, mask)
            assert (same >= 0).all() and (same < 1e-4).all(), (k, scale, same)


def test_topk_kl_of_rounded_cache_uses_a_proper_coarse_distribution():
    # fp16/bf16 caches: sum_k p_k may land above 1 (then the tail is 0 and p_k is renormalised) or
    # below it (the tail takes the rest). The reference builds exactly that distribution explicitly.
    g = torch.Generator().manual_seed(18)
    B, T, V = 2, 9, 12
    mask = torch.ones(B, T - 1, dtype=torch.bool)
    student = 2 * torch.randn(B, T, V, generator=g, dtype=F64)
    over = 0
    for k in (3, V - 1, V):
        for dtype in (torch.float16, torch.bfloat16):
            proxy_logits, ids, lps = random_topk(g, B, T - 1, V, k)
            if k == V - 1:  # the one excluded token holds ~1e-17: rounding often overshoots 1
                proxy_logits.scatter_(-1, torch.rand(B, T - 1, V, generator=g).argsort(-1)[..., :1], -40.0)
                ids = proxy_logits.argsort(-1, descending=True)[..., :k].to(torch.int32)
                lps = proxy_logits.log_softmax(-1).gather(-1, ids.long())
            cache = lps.to(dtype)
            kl = pk.topk_kl(student, ids, cache, mask)
            ref = torch.zeros(B, dtype=F64)
            for b in range(B):
                for t in range(T - 1):
                    p_k = cache[b, t].double().exp()
                    over += int(p_k.sum() > 1 and k < V)
                    rest = [j for j in range(V) if j not in ids[b, t].tolist()]
                    q = student[b, t].softmax(-1)
                    pc = torch.cat([p_k, (1 - p_k.sum()).clamp(min=0).view(1)]) if rest else p_k
                    q_k = q[ids[b, t].long()]
                    qc = torch.cat([q_k, q[rest].sum().view(1)]) if rest else q_k
                    # Categorical normalises probs: the renormalised pi_p when sum_k p_k > 1
                    ref[b] += kl_divergence(Categorical(probs=pc), Categorical(probs=qc))
            torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)
    assert over > 0  # the renormalising branch (sum_k p_k > 1 with a tail bucket) was exercised


def test_topk_kl_stable_when_student_tail_mass_underflows():
    # the student puts all but ~1e-11 of its mass on the cached ids: log(1 - sum_k q_k) is log(0) in
    # fp32, the masked logsumexp over the complement is not
    g = torch.Generator().manual_seed(10)
    B, T, V, k = 2, 5, 64, 4
    proxy_logits, ids, lps = random_topk(g, B, T - 1, V, k, dtype=torch.float32)
    student = torch.zeros(B, T, V)
    student[:, :-1].scatter_(-1, ids.long(), 30.0)
    student.requires_grad_()
    mask = torch.ones(B, T - 1, dtype=torch.bool)
    kl = pk.topk_kl(student, ids, lps, mask)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()
    ref = torch.zeros(B, dtype=F64)
    for b in range(B):
        for t in range(T - 1):
            ref[b] += coarse_kl_reference(proxy_logits[b, t], ids[b, t].tolist(), student[b, t].detach())
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- student loss (Eq. 10-11)


def _student_setup(seed: int, B=3, T=8, V=15, D=6, k=4):
    g = torch.Generator().manual_seed(seed)
    spans = [(2, T), (3, T - 2), (1, 4)][:B]
    labels = make_labels(g, spans, T, V)
    hidden = torch.randn(B, T, D, generator=g, dtype=F64, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    _, ids, lps = random_topk(g, B, T - 1, V, k)
    weights = torch.rand(B, generator=g, dtype=F64)
    return g, labels, hidden, W, ids, lps, weights


def test_student_loss_matches_definition():
    _, labels, hidden, W, ids, lps, weights = _student_setup(11)
    logits = hidden @ W.T
    out = pk.student_loss(logits, labels, ids, lps, weights, alpha=100.0)
    mask = pk.response_mask(labels)
    n = mask.sum()
    kl = pk.topk_kl(logits, ids, lps, mask)
    V = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, (nll + 100.0 * (weights * kl).sum()) / n)
    torch.testing.assert_close(out.nll, nll / n)
    torch.testing.assert_close(out.wkl, (weights * kl).sum() / n)
    torch.testing.assert_close(out.kl, kl)
    plain = pk.student_loss(logits, labels, ids, lps, None, alpha=2.0)  # weights=None -> w = 1
    torch.testing.assert_close(plain.loss, (nll + 2.0 * kl.sum()) / n)


@pytest.mark.parametrize("head", ["full", "chunked", "fused"])
def test_masked_positions_contribute_nothing(head):
    g, labels, hidden, W, ids, lps, weights = _student_setup(12)
    B, V = labels.shape[0], W.shape[0]
    keep = torch.cat([pk.response_mask(labels), torch.zeros(B, 1, dtype=torch.bool)], 1)  # (B, T)

    def run(h, ids_, lps_):
        h = h.detach().requires_grad_()
        if head == "chunked":
            out = pk.student_loss_chunked(h, W.detach(), labels, ids_, lps_, weights, chunk_size=5)
        elif head == "fused":
            out = pk.student_loss_fused(h, W.detach(), labels, ids_, lps_, weights, chunk_size=5)
        else:
            out = pk.student_loss(h @ W.detach().T, labels, ids_, lps_, weights)
        out.loss.backward()
        return out.loss.detach(), h.grad

    base, grad = run(hidden, ids, lps)
    # garbage everywhere that is masked out: other hidden states, NaN log-probs, out-of-range ids
    noise = 5 * torch.randn(hidden.shape, generator=g, dtype=F64)
    h2 = torch.where(keep.unsqueeze(-1), hidden.detach(), noise)
    m = pk.response_mask(labels).unsqueeze(-1)
    ids2 = torch.where(m, ids, torch.full_like(ids, V + 7))
    lps2 = torch.where(m, lps, torch.full_like(lps, float("nan")))
    other, grad2 = run(h2, ids2, lps2)
    torch.testing.assert_close(other, base, rtol=1e-13, atol=1e-13)
    assert torch.isfinite(grad2).all() and grad2[~keep].abs().max() == 0
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-13)


def test_chunked_equals_unchunked_values_and_grads():
    _, labels, hidden, W, ids, lps, weights = _student_setup(13)
    B, T, _ = hidden.shape

    def grads(f):
        out = f()
        return (out,) + torch.autograd.grad(out, (hidden, W))

    for chunk in (1, 5, 7, 1000):  # 1000 > B*(T-1): a single chunk
        pairs = [
            (lambda: pk.token_logps(hidden @ W.T, labels).pow(2).sum(),
             lambda: pk.token_logps_chunked(hidden, W, labels, chunk).pow(2).sum()),
            (lambda: pk.sequence_logps(hidden @ W.T, labels).sum(),
             lambda: pk.sequence_logps_chunked(hidden, W, labels, chunk).sum()),
            (lambda: pk.student_loss(hidden @ W.T, labels, ids, lps, weights).loss,
             lambda: pk.student_loss_chunked(hidden, W, labels, ids, lps, weights, chunk_size=chunk).loss),
        ]
        for ref_f, chk_f in pairs:
            for a, b in zip(grads(ref_f), grads(chk_f)):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)

    # the proxy cache: top-k of log_softmax, and the sequence log-likelihood
    with torch.no_grad():
        ref_lp = (hidden @ W.T)[:, :-1].log_softmax(-1)
        ref_vals, ref_ids = ref_lp.topk(5, -1)
        ids_c, lps_c, seq_c = pk.topk_logps_chunked(hidden, W, labels, k=5, chunk_size=4)
    assert ids_c.dtype == torch.int32 and ids_c.shape == (B, T - 1, 5)
    assert torch.equal(ids_c.long(), ref_ids)
    torch.testing.assert_close(lps_c, ref_vals, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq_c, pk.sequence_logps(hidden @ W.T, labels))


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
             lambda: pk.token_logps_fused(hidden, W, labels, chunk).pow(2).sum()),
            (lambda: dpo(pk.sequence_logps(hidden @ W.T, labels)),
             lambda: dpo(pk.sequence_logps_fused(hidden, W, labels, chunk))),
            (lambda: pk.student_loss(hidden @ W.T, labels, ids, lps, weights, alpha=3.0, n_tokens=11.0).loss,
             lambda: pk.student_loss_fused(hidden, W, labels, ids, lps, weights, 3.0, 11.0, chunk).loss),
            (lambda: pk.student_loss(hidden @ W.T, labels, ids, lps).loss,
             lambda: pk.student_loss_fused(hidden, W, labels, ids, lps, chunk_size=chunk).loss),
        ]
        for ref_f, fused_f in pairs:
            for a, b in zip(grads(ref_f()), grads(fused_f())):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        ref = pk.student_loss(hidden @ W.T, labels, ids, lps, weights)
        out = pk.student_loss_fused(hidden, W, labels, ids, lps, weights, chunk_size=chunk)
        for a, b in zip(ref, out):
            torch.testing.assert_close(b, a.detach(), rtol=1e-10, atol=1e-12)
        assert not (out.nll.requires_grad or out.wkl.requires_grad or out.kl.requires_grad)
    with torch.no_grad():  # no gradient wanted: values only
        torch.testing.assert_close(pk.sequence_logps_fused(hidden, W, labels, 4), pk.sequence_logps(hidden @ W.T, labels))


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
        out = pk.student_loss_fused(h, eye.to(dtype), labels, ids, lps, chunk_size=4)
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
    out = pk.sequence_logps_fused(h, W, labels, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pk.sequence_logps((h @ W.T).float(), labels), rtol=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), h)
    h64 = h.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(pk.sequence_logps(h64 @ W.double().T, labels).sum(), h64)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_chunked_bf16_inputs_are_upcast():
    g = torch.Generator().manual_seed(14)
    B, T, V, D = 2, 6, 50, 16
    h = torch.randn(B, T, D, generator=g).bfloat16()
    W = torch.randn(V, D, generator=g).bfloat16()
    labels = make_labels(g, [(1, 6), (2, 5)], T, V)
    out = pk.sequence_logps_chunked(h, W, labels, chunk_size=3)
    assert out.dtype == torch.float32
    ref = pk.sequence_logps(h.double() @ W.double().T, labels)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)  # bf16 logits would be ~1e-1 off


def test_chunked_keeps_no_vocab_sized_tensor_for_backward():
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
    chunked = saved_shapes(
        lambda: pk.student_loss_chunked(hidden, W, labels, ids, lps, weights, chunk_size=4).loss
    )
    fused = saved_shapes(lambda: pk.student_loss_fused(hidden, W.detach(), labels, ids, lps, weights, chunk_size=4).loss)
    assert any(s and s[-1] == V for s in unchunked)  # the probe sees full logits when they are kept
    assert chunked and not any(s and s[-1] == V for s in chunked)
    assert fused and not any(s and s[-1] == V for s in fused)


@pytest.mark.parametrize("head", ["full", "chunked", "fused"])
def test_gradient_accumulation_equals_big_batch(head):
    g = torch.Generator().manual_seed(16)
    V, D, k = 14, 5, 3
    E = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)  # a one-layer "model"
    W = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    micro = []
    for B, T, spans in ((2, 6, [(2, 6), (1, 4)]), (3, 10, [(3, 10), (2, 7), (4, 9)])):
        tokens = torch.randint(0, V, (B, T), generator=g)
        labels = make_labels(g, spans, T, V)
        _, ids, lps = random_topk(g, B, T - 1, V, k)
        micro.append((tokens, labels, ids, lps.half(), torch.rand(B, generator=g)))  # fp16 cache as on disk

    def loss(tokens, labels, ids, lps, w, n):
        h = E[tokens]
        if head == "chunked":
            return pk.student_loss_chunked(h, W, labels, ids, lps, w, alpha=100.0, n_tokens=n, chunk_size=4)
        if head == "fused":  # W trainable: its gradient takes the recompute path
            return pk.student_loss_fused(h, W, labels, ids, lps, w, alpha=100.0, n_tokens=n, chunk_size=4)
        return pk.student_loss(h @ W.T, labels, ids, lps, w, alpha=100.0, n_tokens=n)

    n = sum(pk.num_response_tokens(m[1]) for m in micro)  # the step's global token count
    total = 0.0
    for m in micro:
        out = loss(*m, n)
        out.loss.backward()
        total = total + out.loss.detach()
    acc = (E.grad.clone(), W.grad.clone())
    E.grad = W.grad = None

    T = max(m[0].shape[1] for m in micro)
    big = loss(
        torch.cat([pad_dim1(m[0], T, 0) for m in micro]),
        torch.cat([pad_dim1(m[1], T, -100) for m in micro]),
        torch.cat([pad_dim1(m[2], T - 1, 0) for m in micro]),
        torch.cat([pad_dim1(m[3], T - 1, 0.0) for m in micro]),
        torch.cat([m[4] for m in micro]),
        None,  # default: this (big) batch's own token count
    )
    big.loss.backward()
    torch.testing.assert_close(total, big.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc[0], E.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc[1], W.grad, rtol=1e-10, atol=1e-12)


def test_proxy_cache_roundtrip_and_self_distillation():
    g = torch.Generator().manual_seed(17)
    B, T, V, D, k = 3, 9, 30, 8, 6
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g)
    labels = make_labels(g, [(2, 9), (4, 8), (1, 5)], T, V)
    ids, lps, seq = pk.topk_logps_chunked(h, W, labels, k)
    rows = pk.topk_rows(ids, lps.half(), labels)  # what a cache file stores
    assert [r[0].shape[0] for r in rows] == pk.response_mask(labels).sum(1).tolist()
    ids2, lps2 = pk.pad_topk(rows, labels)
    mask = pk.response_mask(labels)
    assert torch.equal(ids2[mask], ids[mask]) and torch.equal(lps2[mask], lps.half()[mask])
    # a student identical to the proxy: KL ~ 0 up to the fp16 rounding of the cache
    kl = pk.topk_kl(h @ W.T, ids2, lps2, mask)
    assert (kl >= 0).all() and (kl < 1e-3).all()
    with pytest.raises(ValueError):
        pk.pad_topk(rows, make_labels(g, [(1, 9), (4, 8), (1, 5)], T, V))
