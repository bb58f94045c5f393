"""Proxy-KD losses: Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language Models"
(arXiv 2401.07013), Sections 3.2-3.4, Eq. 1-11 in equation order, as pure tensor functions. The
training scripts run these on the full logits with `--loss reference`; by default they run fast.py's
fused heads, which give the same numbers without (B, T, V) logits and are tested equal to these.

Notation (the paper's): pi_t the black-box teacher, pi_p the proxy, pi_s the student, x the prompt,
y the teacher's response (DPO "chosen"), y_hat the proxy's own sample (DPO "rejected"), beta the DPO
temperature, w the per-sample trust weight with mu / gamma the mean / std of log pi_p(y|x) over D_s,
alpha the weight of the KL term.

Shapes: logits (B, T, V) and labels (B, T) as data.collate makes them, labels aligned with input_ids
and -100 (IGNORE_INDEX) on prompt and pad. logits[:, t] predicts labels[:, t+1], so per-position
outputs, masks and the proxy's top-k cache are (B, T-1). Math is at least fp32 (fp64 stays fp64).
No .item(), no host syncs.

Sequence reduction: every loss divides by a count the caller can fix for a whole optimizer step, so
that the micro-batch losses sum to one big batch's loss, values and gradients. With N the response
tokens and P the preference pairs of the step (all micro-batches, all ranks), KL_i sequence i's summed
per-token KL:
    Eq. 3 / 7   NLL         = sum_tokens -log pi(y_t | x, y_<t) / N
    Eq. 5       L_Pref      = sum_pairs L_DPO / P
    Eq. 10      L_Weight-KL = sum_i w_i * KL_i / N
    Eq. 11      L_Student   = NLL + alpha * L_Weight-KL
Pass N as `n_tokens` and P as `n_pairs` to every micro-batch call; the default is this batch's own count
(a plain mean). FSDP/DDP average gradients over ranks, so under them pass N / world_size (and P / world_size).
The paper writes Eq. 1/3/7 per sequence; N = number of sequences reproduces that literally. Per token,
Eq. 7 and Eq. 10 scale alike, so alpha keeps its meaning (alpha = 100 as in the paper), while Eq. 6's
NLL-vs-DPO balance moves by 1 / mean response length.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# gamma below GAMMA_EPS * (1 + |mu|) counts as zero spread: fp64 moments of a constant input leave a
# variance of a few ulps, which would otherwise turn rounding noise into +-1 z-scores.
GAMMA_EPS = 1e-6


def shift_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels (B, T) -> targets (B, T-1) long, ignored positions set to 0 (a valid index to gather),
    mask (B, T-1) bool, True where labels[:, t+1] is a response token."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return labels[:, 1:].masked_fill(~mask, 0), mask


def response_mask(labels: Tensor) -> Tensor:
    """labels (B, T) -> (B, T-1) bool: True where labels[:, t+1] is a response token to score."""
    return labels[:, 1:] != IGNORE_INDEX


def num_response_tokens(labels: Tensor) -> Tensor:
    """labels (B, T) -> () long: the scored positions. Summed over a step's micro-batches (and ranks),
    the `n_tokens` divisor."""
    return response_mask(labels).sum()


# ---------------------------------------------------------------------------------------------------
# log-likelihoods and NLL (Eq. 1 / 3 / 7)


def token_logps(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """log pi(y_t | x, y_<t) per position, Eq. 1 inside the expectation.

    logits (B, T, V) any float dtype, labels (B, T), optional mask (B, T-1) bool ANDed with the response
    mask -> (B, T-1) fp32 (fp64 for fp64 logits), 0 where masked.
    """
    y, m = shift_labels(labels)
    if mask is not None:
        m = m & mask
    logits = logits[:, :-1]
    # a bf16 log-softmax over a large vocabulary is off by ~0.1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logps.masked_fill(~m, 0.0)


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t), Eq. 1 (and inside Eq. 3, 4, 9).

    logits (B, T, V), labels (B, T), optional mask (B, T-1) -> (B,) fp32.
    """
    return token_logps(logits, labels, mask).sum(-1)


def nll_loss(logits: Tensor, labels: Tensor, n_tokens: Tensor | float | None = None) -> Tensor:
    """Hard-label NLL, Eq. 1 / 3 / 7: sum_tokens -log pi(y_t | x, y_<t) / n_tokens.

    logits (B, T, V), labels (B, T) -> () fp32. n_tokens: see "Sequence reduction"; default this
    batch's response-token count (a per-token mean).
    """
    if n_tokens is None:
        n_tokens = shift_labels(labels)[1].sum().clamp(min=1)  # this batch's response tokens
    return -token_logps(logits, labels).sum() / n_tokens


# ---------------------------------------------------------------------------------------------------
# proxy alignment (Eq. 4-6)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO loss, Eq. 4, with the standard minus sign.

    L_DPO = -log sigma(beta * log[pi_p^(i)(y|x) / pi_p^(i-1)(y|x)] - beta * log[pi_p^(i)(y_hat|x) /
    pi_p^(i-1)(y_hat|x)]). The paper prints Eq. 4 without the leading minus; minimising that would push
    the proxy *away* from the teacher, so we use -logsigmoid as in Rafailov et al. (2023) and the
    reference implementation (eric-mitchell/direct-preference-optimization, preference_loss).

    All inputs (B,): sequence log-probs (sequence_logps) of y (chosen, the teacher's response) and
    y_hat (rejected, the proxy's own sample) under the trained proxy pi_p^(i) and the frozen previous
    iteration pi_p^(i-1) (constants). Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,));
    rewards are beta * log(pi_p^(i) / pi_p^(i-1)), detached, for logging. At policy == reference every
    loss is log 2.
    """
    dtype = torch.promote_types(torch.promote_types(policy_chosen_logps.dtype, policy_rejected_logps.dtype),
                                torch.float32)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    pi_logratios = pc - pr  # log pi_p^(i)(y|x) - log pi_p^(i)(y_hat|x)
    ref_logratios = rc - rr  # same under pi_p^(i-1)
    losses = -F.logsigmoid(beta * (pi_logratios - ref_logratios))
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards


class ProxyLoss(NamedTuple):
    loss: Tensor  # () differentiable: Eq. 6 = nll + pref
    nll: Tensor  # () detached: Eq. 3, sum_tokens -log pi_p(y) / n_tokens
    pref: Tensor  # () detached: Eq. 5, sum_pairs L_DPO / n_pairs
    chosen_rewards: Tensor  # (B,) detached, beta * log pi_p^(i)(y|x) / pi_p^(i-1)(y|x)
    rejected_rewards: Tensor  # (B,) detached, same for y_hat


def proxy_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    n_tokens: Tensor | float,
    beta: float = 0.1,
    n_pairs: Tensor | float | None = None,
) -> ProxyLoss:
    """Proxy alignment objective, Eq. 6 = Eq. 3 (NLL on the teacher's y) + Eq. 5 (DPO, y over y_hat).

    Inputs (B,) as in dpo_loss. The chosen responses are the teacher's, so Eq. 3's NLL is
    -sum(policy_chosen_logps) and one forward over [y; y_hat] serves both terms. n_tokens: response
    tokens of the chosen y (the number of pairs gives the literal per-sequence Eq. 3); n_pairs: default
    B (a per-pair mean). See "Sequence reduction".
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    nll = -policy_chosen_logps.to(losses.dtype).sum() / n_tokens
    pref = losses.sum() / (losses.shape[0] if n_pairs is None else n_pairs)
    return ProxyLoss(nll + pref, nll.detach(), pref.detach(), chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------------------
# the proxy's soft labels and the KL to them (Eq. 8)


@torch.no_grad()
def topk_logps(logits: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What the proxy cache holds for Eq. 8-9: pi_p's k most likely next tokens at every position, and
    log pi_p(y|x). No gradients.

    logits (B, T, V) of pi_p, labels (B, T) -> (topk_ids (B, T-1, k) int32, topk_logps (B, T-1, k) fp32
    (fp64 for fp64 logits) log pi_p normalised over the FULL vocabulary, sorted descending, seq_logps (B,)
    = sequence_logps).
    Only response positions are meaningful. With k = 1, topk_ids[..., 0] == labels[:, 1:] is top-1
    agreement.
    """
    seq = sequence_logps(logits, labels)
    logits = logits[:, :-1]
    vals, ids = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).topk(k, dim=-1)
    return ids.to(torch.int32), vals, seq


def topk_kl(student_logits: Tensor, topk_ids: Tensor, topk_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence forward KL(pi_p || pi_s) from the proxy's cached top-k, Eq. 8.

    student_logits (B, T, V) (position t predicts labels[:, t+1]); topk_ids (B, T-1, k) int; topk_logps
    (B, T-1, k) log pi_p normalised over the FULL vocabulary (fp16/bf16 ok; constants); mask (B, T-1)
    bool, normally response_mask(labels) -> (B,) KL_i summed over masked-in positions.
    Only k entries of pi_p are known, so both distributions are coarsened to k + 1 buckets (bucket_kl):
    the k cached tokens plus one tail holding the rest. Masked positions contribute nothing, whatever
    they hold.
    """
    logits = student_logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # padding may hold anything (NaN, out-of-range ids): make it harmless so no NaN reaches a gradient
    pad = ~mask.unsqueeze(-1)
    ids = topk_ids.long().masked_fill(pad, 0)
    p_lp = topk_logps.detach().to(logits.dtype).masked_fill(pad, 0.0)
    lse = logits.logsumexp(-1)
    log_q_k = logits.gather(-1, ids) - lse.unsqueeze(-1)  # log pi_s on the k cached ids
    log_q_tail = None
    if ids.shape[-1] < logits.shape[-1]:
        # pi_s's tail by masking the k ids, not log(1 - sum_k q_k): exact even when pi_s puts all but
        # 1e-9 of its mass on them
        log_q_tail = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - lse
    return bucket_kl(log_q_k, log_q_tail, p_lp).masked_fill(~mask, 0.0).sum(-1)


def bucket_kl(log_q_k: Tensor, log_q_tail: Tensor | None, p_lp: Tensor) -> Tensor:
    """Eq. 8 at each position on k + 1 buckets: KL(pi_p || pi_s) of the two distributions coarsened to the k
    cached tokens and one tail bucket holding everything else (topk_kl, and fast.py's fused head).

    log_q_k (..., k) log pi_s on the cached ids, log_q_tail (...) log pi_s of the tail (None when k = V:
    no tail), p_lp (..., k) log pi_p on the cached ids, normalised over the full vocabulary -> (...) KL.
    The result is >= 0, the exact full-vocabulary KL when k = V, and (data processing inequality) at
    most that KL when k < V.
    """
    if log_q_tail is not None:
        lse_p = p_lp.logsumexp(-1)
        # fp16 rounding can push sum_k p_k slightly above 1: renormalise only then (tail = 0), so the
        # coarse pi_p is always a proper distribution
        p_k = (p_lp - lse_p.clamp(min=0).unsqueeze(-1)).exp()
        p_tail = -torch.expm1(lse_p.clamp(max=0))  # 1 - sum_k p_k, exact for tiny tails
        kl = ((torch.xlogy(p_k, p_k) - p_k * log_q_k).sum(-1)
              + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail)
    else:
        # no tail: renormalise pi_p so that the rounding of the cache cannot make sum_k p_k != 1
        p_k = p_lp.log_softmax(-1).exp()
        kl = (torch.xlogy(p_k, p_k) - p_k * log_q_k).sum(-1)
    # the true value is >= 0; at pi_s ~= pi_p rounding leaves ~-1e-16, where the gradient is ~0 anyway
    return kl.clamp(min=0)


# ---------------------------------------------------------------------------------------------------
# sample weights (Eq. 9)


def weight_scores(proxy_logps: Tensor, n_tokens: Tensor | None = None, per_token: bool = False) -> Tensor:
    """The quantity Eq. 9 standardises: log pi_p(y|x) (paper, per_token=False) or its per-token mean
    log pi_p(y|x) / |y| (per_token=True, removes the length bias of sequence sums).

    proxy_logps (N,), n_tokens (N,) response lengths (required when per_token) -> (N,) fp64.
    """
    s = proxy_logps.detach().to(torch.float64)
    if per_token:
        if n_tokens is None:
            raise ValueError("per_token=True needs n_tokens (the response length of each sample)")
        s = s / n_tokens.to(torch.float64).clamp(min=1)
    return s


def sample_weights(scores: Tensor, mu: Tensor | float, gamma: Tensor | float) -> Tensor:
    """Per-sample trust weights, Eq. 9: w = sigmoid((s - mu) / gamma).

    scores (N,) from weight_scores; mu, gamma () the mean and population std of the scores over the
    WHOLE D_s, not this batch (the caller reduces them over every rank's shard) -> (N,) fp32 in (0, 1),
    detached. gamma <= GAMMA_EPS * (1 + |mu|) (constant scores, N = 1) gives w = 0.5, never NaN.
    """
    s = scores.detach().to(torch.float64)
    mu = torch.as_tensor(mu, dtype=torch.float64, device=s.device)
    gamma = torch.as_tensor(gamma, dtype=torch.float64, device=s.device)
    spread = gamma > GAMMA_EPS * (1 + mu.abs())
    safe_gamma = torch.where(spread, gamma, torch.ones_like(gamma))  # no 0/0 even in the unused branch
    z = torch.where(spread, (s - mu) / safe_gamma, torch.zeros_like(s))
    return torch.sigmoid(z).float()


# ---------------------------------------------------------------------------------------------------
# the student (Eq. 10-11)


class StudentLoss(NamedTuple):
    loss: Tensor  # () differentiable: Eq. 11 = nll + alpha * wkl
    nll: Tensor  # () detached: Eq. 7, sum_tokens -log pi_s(y) / n_tokens
    wkl: Tensor  # () detached: Eq. 10, sum_i w_i * KL_i / n_tokens (before alpha)
    kl: Tensor  # (B,) detached: unweighted per-sequence KL_i, for logging


def student_loss(
    student_logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logps: Tensor,
    weights: Tensor | None = None,
    alpha: float = 100.0,
    n_tokens: Tensor | float | None = None,
) -> StudentLoss:
    """Student objective, Eq. 11 = Eq. 7 + alpha * Eq. 10:
    loss = (sum_tokens -log pi_s(y_t) + alpha * sum_i w_i * KL_i) / n_tokens.

    student_logits (B, T, V), labels (B, T) (the teacher's y), topk_ids / topk_logps (B, T-1, k) the
    proxy cache, weights (B,) from sample_weights (None = all 1: the unweighted ablation), n_tokens
    the divisor (see "Sequence reduction"; default this batch's response-token count).
    """
    _, mask = shift_labels(labels)
    lp = token_logps(student_logits, labels)
    kl_seq = topk_kl(student_logits, topk_ids, topk_logps, mask)
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    nll = -lp.sum() / n
    w = torch.ones_like(kl_seq) if weights is None else weights.detach().to(kl_seq.dtype)
    wkl = (w * kl_seq).sum() / n  # Eq. 10: w(x, y) * KL(pi_p || pi_s), per token
    return StudentLoss(nll + alpha * wkl, nll.detach(), wkl.detach(), kl_seq.detach())
