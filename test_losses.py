"""Property tests for proxykd.py, the reference losses, against brute-force references computed another
way (Python loops, torch.distributions, F.cross_entropy). fp64 wherever values are compared tightly. The
fast paths (fast.py) are tested equal to these references in test_fast.py."""

import inspect
import math
import os
import subprocess
import sys
import types

import pytest
import torch
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
        lp = pk.sequence_logps(h @ W.T, labels)
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
# mu and gamma are the moments of the scores over all of D_s, which the caller reduces across ranks; here
# they are computed brute force over the whole set.


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 9's mu and gamma of x, brute force in fp64: the mean and the population std (Var over D_s)."""
    x = x.double()
    return x.mean(), x.std(unbiased=False)


def test_sample_weights_standardise_over_the_set():
    x = torch.tensor([-40.0, -20.0, -30.0, -10.0, -50.0], dtype=F64)
    mu, gamma = moments(x)
    w = pk.sample_weights(pk.weight_scores(x), mu, gamma)
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w.double(), torch.sigmoid((x - mu) / gamma), rtol=1e-6, atol=1e-7)
    assert w[2] == 0.5  # the mean sample
    m, s = -123.0, 7.5
    x = torch.tensor([m - s, m + s])  # mean m, population std s
    w = pk.sample_weights(pk.weight_scores(x), *moments(x))
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([-1.0, 1.0])))
    # the moments are D_s's, passed in, not this batch's
    w = pk.sample_weights(torch.tensor([-5.0, -3.0]), mu=-4.0, gamma=2.0)
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([-0.5, 0.5])))


@pytest.mark.parametrize("x", [[-12345.678] * 7, [3.0], [0.0, 0.0], [-0.1] * 1000])
def test_sample_weights_zero_spread_is_half_without_nan(x):
    s = pk.weight_scores(torch.tensor(x, dtype=torch.float32))
    n = s.numel()
    # moments from fp64 (sum, sum of squares, count), as a reduction over ranks forms them: a constant
    # input can leave a variance of a few ulps instead of 0
    mu_r = s.sum() / n
    gamma_r = ((s * s).sum() / n - mu_r * mu_r).clamp(min=0).sqrt()
    mu, gamma = moments(s)
    for m, g in ((mu, gamma), (mu_r, gamma_r), (mu, torch.zeros((), dtype=F64)), (mu, 1e-9 * (1 + mu.abs()))):
        assert torch.equal(pk.sample_weights(s, m, g), torch.full((n,), 0.5))


def test_sample_weights_per_token_option():
    lp = torch.tensor([-10.0, -40.0, -90.0])
    n = torch.tensor([2, 20, 30])  # per-token: -5, -2, -3 -> a different order than the sums
    s_seq, s_tok = pk.weight_scores(lp), pk.weight_scores(lp, n_tokens=n, per_token=True)
    assert s_seq.dtype == s_tok.dtype == F64
    w_seq = pk.sample_weights(s_seq, *moments(s_seq))
    w_tok = pk.sample_weights(s_tok, *moments(s_tok))
    s = (lp / n).double()
    ref = torch.sigmoid((s - s.mean()) / s.std(unbiased=False))
    torch.testing.assert_close(w_tok.double(), ref, rtol=1e-6, atol=1e-7)
    assert w_seq.argmax() == 0 and w_tok.argmax() == 1
    with pytest.raises(ValueError):
        pk.weight_scores(lp, per_token=True)


def test_sample_weights_of_shards_use_the_moments_of_the_whole_set():
    """Each rank weights its own shard of D_s with the moments of ALL of D_s (brute force here; in
    training a cross-rank reduction): together that equals weighting D_s in one pass, which a shard's
    own moments would not."""
    g = torch.Generator().manual_seed(6)
    full = -200 + 30 * torch.randn(11, generator=g, dtype=F64)
    shards = [full[:3], full[3:]]  # unequal shards
    mu, gamma = moments(full)
    w_all = torch.cat([pk.sample_weights(s, mu, gamma) for s in shards])
    assert torch.equal(w_all, pk.sample_weights(full, mu, gamma))
    torch.testing.assert_close(w_all.double(), torch.sigmoid((full - mu) / gamma), rtol=1e-6, atol=1e-7)
    local = torch.cat([pk.sample_weights(s, *moments(s)) for s in shards])
    assert (local - w_all).abs().max() > 1e-2


# --------------------------------------------------------------------------- the proxy's top-k (Eq. 8-9)


def test_topk_logps_is_the_proxys_k_most_likely_tokens():
    g = torch.Generator().manual_seed(20)
    B, T, V, k = 2, 7, 13, 4
    logits = 3 * torch.randn(B, T, V, generator=g, dtype=F64)
    labels = make_labels(g, [(2, 7), (1, 5)], T, V)
    ids, lps, seq = pk.topk_logps(logits, labels, k)
    assert ids.dtype == torch.int32 and ids.shape == lps.shape == (B, T - 1, k)
    for b in range(B):
        for t in range(T - 1):
            p = Categorical(logits=logits[b, t])  # normalised over the full vocabulary
            top = sorted(range(V), key=lambda j: -p.probs[j].item())[:k]
            assert ids[b, t].tolist() == top
            torch.testing.assert_close(lps[b, t], p.log_prob(torch.tensor(top)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seq, pk.sequence_logps(logits, labels), rtol=0, atol=0)
    # k = 1: the top-1 id is the label exactly where the proxy's argmax agrees with it
    top1, _, _ = pk.topk_logps(logits, labels, 1)
    assert torch.equal(top1[..., 0].long() == labels[:, 1:], logits[:, :-1].argmax(-1) == labels[:, 1:])
    # bf16 logits: upcast, the cache is fp32
    assert pk.topk_logps(logits.bfloat16(), labels, k)[1].dtype == torch.float32


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


def check_masked_positions_contribute_nothing(student_loss_fn, seed=12):
    """student_loss_fn(hidden, W, labels, ids, lps, weights) -> StudentLoss. Garbage everywhere that is
    masked out (other hidden states, NaN log-probs, out-of-range ids) changes neither the loss nor the
    gradient, and leaves no NaN in it."""
    g, labels, hidden, W, ids, lps, weights = _student_setup(seed)
    B, V = labels.shape[0], W.shape[0]
    keep = torch.cat([pk.response_mask(labels), torch.zeros(B, 1, dtype=torch.bool)], 1)  # (B, T)

    def run(h, ids_, lps_):
        h = h.detach().requires_grad_()
        out = student_loss_fn(h, W.detach(), labels, ids_, lps_, weights)
        out.loss.backward()
        return out.loss.detach(), h.grad

    base, grad = run(hidden, ids, lps)
    noise = 5 * torch.randn(hidden.shape, generator=g, dtype=F64)
    h2 = torch.where(keep.unsqueeze(-1), hidden.detach(), noise)
    m = pk.response_mask(labels).unsqueeze(-1)
    ids2 = torch.where(m, ids, torch.full_like(ids, V + 7))
    lps2 = torch.where(m, lps, torch.full_like(lps, float("nan")))
    other, grad2 = run(h2, ids2, lps2)
    torch.testing.assert_close(other, base, rtol=1e-13, atol=1e-13)
    assert torch.isfinite(grad2).all() and grad2[~keep].abs().max() == 0
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-13)


def test_masked_positions_contribute_nothing():
    check_masked_positions_contribute_nothing(lambda h, W, *rest: pk.student_loss(h @ W.T, *rest))


def check_gradient_accumulation_equals_big_batch(student_loss_fn, seed=16):
    """student_loss_fn(hidden, W, labels, ids, lps, weights, alpha, n_tokens) -> StudentLoss. Micro-batches
    of different lengths, each divided by the step's token count, sum to one padded big batch: the loss
    and the gradients of a one-layer model (E, W), with an fp16 cache as on disk."""
    g = torch.Generator().manual_seed(seed)
    V, D, k = 14, 5, 3
    E = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)  # a one-layer "model"
    W = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    micro = []
    for B, T, spans in ((2, 6, [(2, 6), (1, 4)]), (3, 10, [(3, 10), (2, 7), (4, 9)])):
        tokens = torch.randint(0, V, (B, T), generator=g)
        labels = make_labels(g, spans, T, V)
        _, ids, lps = random_topk(g, B, T - 1, V, k)
        micro.append((tokens, labels, ids, lps.half(), torch.rand(B, generator=g)))

    def loss(tokens, labels, ids, lps, w, n):
        return student_loss_fn(E[tokens], W, labels, ids, lps, w, 100.0, n)

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


def test_gradient_accumulation_equals_big_batch():
    check_gradient_accumulation_equals_big_batch(lambda h, W, *rest: pk.student_loss(h @ W.T, *rest))


# --------------------------------------------------------------------------- the module itself


def test_proxykd_is_pure_tensor_code():
    """The reference module stands alone: no torch.distributed (no collective hides in a loss) and no
    import of the fast paths."""
    src = inspect.getsource(pk)
    assert "torch.distributed" not in src and "dist." not in src
    for line in src.splitlines():
        words = line.split()
        assert not (words[:1] in (["import"], ["from"]) and words[1:2] == ["fast"]), line
    modules = {v.__name__ for v in vars(pk).values() if isinstance(v, types.ModuleType)}
    assert not any(m.startswith("torch.distributed") or m == "fast" for m in modules), modules
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import sys, proxykd; assert 'fast' not in sys.modules, 'proxykd imported fast'"
    subprocess.run([sys.executable, "-c", code], cwd=here, check=True)
