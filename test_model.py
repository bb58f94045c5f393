"""model.py properties: HF parity (fixture from scripts/make_hf_fixture.py), attention against a brute-force
reference, KV cache == recomputation, batched == alone, checkpoint round trips, and generation
under FSDP2 with two ranks that stop at different steps."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import model as model_module
from model import (KVCache, Llama, ModelArgs, apply_rope, attention_extra_bytes, generate, rope_cos_sin,
                   rope_inv_freq, sample_next)

HERE = os.path.dirname(os.path.abspath(__file__))
HF_TINY = os.path.join(HERE, "testdata", "hf_tiny")


def tiny(seed=0, dtype=torch.float32, **kw) -> Llama:
    torch.manual_seed(seed)
    args = dataclasses.replace(ModelArgs.from_name("tiny"), **kw)
    model = Llama(args).to(dtype).eval()
    # unit-scale weights: with HF's std 0.02 init all logits are ~0 and every comparison is trivially close
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if "embed" in n else p.shape[1] ** -0.5)
    return model


# ---- parity with transformers ----


def test_hf_logits_parity():
    ref = load_file(os.path.join(HF_TINY, "reference.safetensors"))
    model = Llama.from_pretrained(HF_TINY, dtype=torch.float32).eval()
    assert model.args.rope_theta == 500.0 and model.args.n_kv_heads == 2  # the fixture's non-defaults
    with torch.no_grad():
        logits = model(ref["input_ids"])
        assert ref["logits"].abs().max() > 1.0  # a 1e-4 tolerance means something at this scale
        assert (logits - ref["logits"]).abs().max() <= 1e-4

        # left padding: HF with attention_mask + position_ids vs our key-padding mask; real positions only
        pad_logits = model(ref["pad_input_ids"], position_ids=ref["pad_position_ids"],
                           attn_mask=ref["pad_mask"].bool())
    real = ref["pad_mask"].bool()
    assert (pad_logits[real] - ref["pad_logits"][real]).abs().max() <= 1e-4


def test_hf_config_round_trip():
    for name in ("tiny", "llama-2-7b", "llama-2-70b"):
        a = ModelArgs.from_name(name)
        assert ModelArgs.from_hf_config(a.to_hf_config()) == a
    with pytest.raises(NotImplementedError):
        ModelArgs.from_hf_config({**ModelArgs.from_name("tiny").to_hf_config(),
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize("name,n_params", [("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320),
                                           ("llama-2-70b", 68_976_648_192)])
def test_llama2_presets_have_the_published_parameter_counts(name, n_params):
    with torch.device("meta"):
        model = Llama(ModelArgs.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == n_params


# ---- attention and heads ----


def reference_attention(attn, x, position_ids, key_valid=None):
    """Brute force: kv heads repeated explicitly, softmax(q k^T / sqrt(hd) + mask) v, causal
    (+ key padding)."""
    B, T, _ = x.shape
    H, G, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, G, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, G, hd).transpose(1, 2)
    cos, sin = rope_cos_sin(position_ids, hd, 10000.0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    att = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return attn.o_proj((att @ v).transpose(1, 2).reshape(B, T, H * hd))


def test_gqa_attention_matches_bruteforce():
    model = tiny()
    attn = model.model.layers[0].self_attn
    assert attn.n_heads == 2 * attn.n_kv_heads
    torch.manual_seed(1)
    B, T = 3, 7
    x = torch.randn(B, T, model.args.dim)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope_cos_sin(pos, attn.head_dim, 10000.0)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, pos), atol=1e-5, rtol=1e-5)

        # left padding (rows padded by 0, 2, 4): real query rows must match the brute force with key padding
        valid = torch.arange(T)[None, :] >= torch.tensor([0, 2, 4])[:, None]  # (B, T)
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = rope_cos_sin(pos, attn.head_dim, 10000.0)
        k_pos, q_pos = torch.arange(T)[None, :], torch.arange(T)[:, None]
        mask = ((k_pos <= q_pos)[None, None] & valid[:, None, None, :]) | (k_pos == q_pos)
        out = attn(x, cos, sin, mask)
        ref = reference_attention(attn, x, pos, valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_masked_gqa_attention_repeats_kv_heads_bitwise_on_cpu():
    """A masked GQA call repeats the kv heads itself (so a GPU can run a fused kernel); on the CPU that
    gives bitwise what SDPA's own enable_gqa gives, so CPU decoding is unchanged by the route. Its extra
    transient is the repeated k and v: attention_extra_bytes."""
    model = tiny()
    attn = model.model.layers[0].self_attn
    H, G, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    torch.manual_seed(2)
    B, T, S = 3, 5, 9
    x = torch.randn(B, T, model.args.dim)
    cache = KVCache(S)
    cache.update(0, torch.randn(B, G, S - T, hd), torch.randn(B, G, S - T, hd))
    cache.len = S - T
    pos = torch.arange(S - T, S).expand(B, T)
    cos, sin = rope_cos_sin(pos, hd, 10000.0)
    mask = torch.rand(B, 1, T, S) > 0.3
    mask[..., S - T :] |= torch.eye(T, dtype=torch.bool)  # every query keeps a key
    with torch.no_grad():
        got = attn(x, cos, sin, mask, cache)
        q = apply_rope(attn.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin)
        k, v = cache.k[0][:, :, :S], cache.v[0][:, :, :S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        want = attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))
    assert torch.equal(got, want)
    repeated = k.repeat_interleave(H // G, 1).nbytes + v.repeat_interleave(H // G, 1).nbytes
    assert attention_extra_bytes(model.args, B, S, 4) == repeated
    assert attention_extra_bytes(dataclasses.replace(model.args, n_kv_heads=H), B, S, 4) == 0


def test_rope_frequencies_are_computed_once_per_device_and_stay_fp32():
    """The inverse frequencies live in a plain attribute: not in the state dict (checkpoints unchanged),
    not cast by .to(bfloat16), recomputed when the model's device changes."""
    model = tiny()
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        first = model(tokens)
        assert torch.equal(model(tokens), first)
    inv = model._inv_freq
    assert torch.equal(inv, rope_inv_freq(model.args.head_dim, model.args.rope_theta))
    assert not any(t is inv for t in model.state_dict().values())
    assert model.to(torch.bfloat16)._inv_freq.dtype == torch.float32
    model._inv_freq = inv.to("meta")  # as if left on another device: replaced at the next forward
    with torch.no_grad():
        model(tokens)
    assert model._inv_freq.device.type == "cpu"


@pytest.mark.parametrize("tied", [False, True])
def test_head_fn_equals_plain_logits(tied):
    model = tiny(tie_word_embeddings=tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, head_fn=lambda h, w: h @ w.T), model(tokens))


def test_right_padding_needs_no_mask():
    """Training convention: right-padded rows give the same logits at real positions as the row alone."""
    model = tiny()
    short, long_ = torch.randint(1, 64, (5,)), torch.randint(1, 64, (9,))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short, long_
    with torch.no_grad():
        out = model(batch)
        torch.testing.assert_close(out[0, :5], model(short[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], model(long_[None])[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_forward_matches_full_forward():
    model = tiny()
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(max_len=10)
        steps = ([model(tokens[:, :6], cache=cache)]
                 + [model(tokens[:, t : t + 1], cache=cache) for t in range(6, 10)])
    assert cache.len == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ---- generation ----


def greedy_without_cache(model, prompt, max_new_tokens, eos_id):
    """Reference: one prompt alone, the whole sequence recomputed for every new token, argmax."""
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
        if nxt == eos_id:
            break
        seq.append(nxt)
        new.append(nxt)
    return new


def test_greedy_generate_matches_uncached_reference_and_batch_equals_alone():
    # float64: greedy equality across different kernels must not hinge on an fp32 near-tie of two logits
    model = tiny(seed=3, dtype=torch.float64)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 64, (n,)).tolist() for n in (5, 1, 8, 3)]
    # pick an eos that prompt 0 emits at its 3rd step, so rows stop at different steps
    eos_id = greedy_without_cache(model, prompts[0], 3, eos_id=-1)[2]
    refs = [greedy_without_cache(model, p, 12, eos_id) for p in prompts]
    assert len(refs[0]) == 2 and any(len(r) == 12 for r in refs)

    batched = generate(model, prompts, 12, eos_id=eos_id, pad_id=0, greedy=True)
    assert batched == refs
    assert [generate(model, [p], 12, eos_id=eos_id, pad_id=0, greedy=True)[0] for p in prompts] == refs


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    model = tiny(seed=5)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 8, eos_id=63, pad_id=0, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompts, 8, eos_id=63, pad_id=0, generator=torch.Generator().manual_seed(7))
    assert a == b
    # a nucleus this small is the top token alone: sampling = greedy
    assert generate(model, prompts, 8, eos_id=63, pad_id=0, top_p=1e-6, generator=torch.Generator()) == \
        generate(model, prompts, 8, eos_id=63, pad_id=0, greedy=True)

    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_p=0.75, generator=g).item() for _ in range(300)}
    assert draws == {0, 2}  # 0.5 + 0.3 is the smallest set reaching 0.75
    draws = {sample_next(logits, top_p=0.85, generator=g).item() for _ in range(300)}
    assert draws == {0, 2, 3}


def test_sample_next_draws_from_the_softmax():
    """Frequencies of 40,000 draws (20,000 steps x 2 rows) match softmax(logits / temperature) within 5
    standard errors per token, and a zero-probability token (-inf logit) is never drawn."""
    logits = torch.tensor([[2.0, -float("inf"), 0.5, 1.0, -1.0, 0.0]]).repeat(2, 1)
    g = torch.Generator().manual_seed(1)
    for temperature in (1.0, 0.7):
        p = torch.softmax(logits[0] / temperature, -1).double()
        draws = torch.stack([sample_next(logits, temperature, generator=g) for _ in range(20000)]).flatten()
        freq = torch.bincount(draws, minlength=6).double() / draws.numel()
        assert freq[1] == 0
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / draws.numel()).sqrt()).all(), (freq, p)


def test_sample_next_draws_its_uniforms_on_the_host_and_searches_on_the_device():
    """The same CPU generator state gives the same samples whatever device the logits are on: the
    uniforms are drawn on the host (the generator advances alike), the search runs on the logits' device
    and returns there. The meta device stands in for a GPU (shapes only); on the CPU the draws are the
    inverse-CDF samples of the softmax."""
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    g_cpu, g_meta = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = sample_next(logits, generator=g_cpu)
    on_meta = sample_next(logits.to("meta"), generator=g_meta)
    assert on_meta.device.type == "meta" and on_meta.shape == got.shape == (3,) and on_meta.dtype == got.dtype
    assert torch.equal(g_cpu.get_state(), g_meta.get_state())
    u = torch.rand(3, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cdf = torch.softmax(logits, -1).double().cumsum(-1)
    assert got.tolist() == [int((c <= x * c[-1]).sum()) for c, x in zip(cdf, u[:, 0])]


def reference_generate(model, prompts, max_new_tokens, eos_id, pad_id, generator=None, **sampling):
    """The decode loop written plainly: per-prompt copies, B uniforms drawn by sample_next at every step,
    the key-padding mask extended per step and passed as (B, S), and a host read of "every row done"
    after every step (a loop that stops at once)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :] = torch.tensor(p)
        valid[i, L - len(p) : L] = True
    pos = (valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)
    last = lambda h, w: F.linear(h[:, -1], w)  # noqa: E731  generate's head: the last position only
    cache, out = KVCache(L + max_new_tokens), []
    with torch.no_grad():
        logits = model(tokens, position_ids=pos, attn_mask=valid[:, :L], cache=cache, head_fn=last)
        done = torch.zeros(B, dtype=torch.bool)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, generator=generator, **sampling).masked_fill(done, pad_id)
            out.append(nxt)
            done = done | (nxt == eos_id)
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            valid[:, L + t] = True
            logits = model(nxt[:, None], position_ids=pos[:, -1:] + 1 + t, attn_mask=valid[:, : L + t + 1],
                           cache=cache, head_fn=last)
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def test_generate_equals_the_plain_per_step_loop_and_leaves_the_generator_alike():
    """generate (uniforms drawn per call, the stop read one step late, a preallocated decode mask) returns
    what the plain loop returns, bitwise, for greedy and sampled decoding, ragged prompts, eos early,
    late or never, max_new_tokens 1; and leaves the generator where the plain loop leaves it, so several
    calls in a row on one generator (and on torch's global one) draw the same numbers."""
    model = tiny(seed=5, vocab_size=8)  # 8 tokens: an eos ends rows within a few steps
    prompts = [[1, 2, 3], [4], [5, 6, 7, 1, 2, 3, 4], [3, 3]]
    stopped_early = 0
    samplings = (dict(greedy=True), dict(), dict(temperature=0.8, top_p=0.7))
    cases = [(sampling, eos, n, prompts) for sampling in samplings for eos in (2, -1) for n in (1, 12)]
    cases += [(dict(), 2, 12, prompts[1:2]), (dict(), -1, 5, prompts[1:2])]  # one row
    for sampling, eos, n, ps in cases:
        g_ref, g = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        want = [reference_generate(model, ps, n, eos, 0, generator=g_ref, **sampling) for _ in range(2)]
        got = [generate(model, ps, n, eos, 0, generator=g, **sampling) for _ in range(2)]
        assert got == want, (sampling, eos, n, len(ps))
        assert torch.equal(g.get_state(), g_ref.get_state())
        stopped_early += sum(max(map(len, w)) < n - 1 for w in want)
    assert stopped_early >= 4, stopped_early  # the one-step-late stop ran
    torch.manual_seed(4)
    want = [reference_generate(model, prompts, 9, 2, 0) for _ in range(2)] + [torch.rand(3)]
    torch.manual_seed(4)
    got = [generate(model, prompts, 9, 2, 0) for _ in range(2)] + [torch.rand(3)]
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_generate_waits_for_no_device_value_and_copies_per_call(monkeypatch):
    """In generate nothing reads a device value into Python (no _local_scalar_dense: .item(), bool(t);
    no nonzero), and the host-to-device copies (model.to_device; torch.tensor builds host tensors) are
    a fixed number per call, whatever max_new_tokens: the CPU side of the CUDA suite's sync count."""
    model = tiny(seed=5)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 1, 2]]
    calls = Counter()
    to_device, tensor = model_module.to_device, torch.tensor

    def count(name, fn):
        def spy(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return spy
    monkeypatch.setattr(model_module, "to_device", count("to_device", to_device))
    monkeypatch.setattr(torch, "tensor", count("tensor", tensor))
    seen = {}
    for n in (3, 17):
        for sampling in (dict(greedy=True), dict(generator=torch.Generator().manual_seed(0))):
            calls.clear()
            with _OpCounter() as c:
                out = generate(model, prompts, n, eos_id=-1, pad_id=0, **sampling)
            assert [len(r) for r in out] == [n] * 3
            assert c.ops["_local_scalar_dense"] == 0 and c.ops["nonzero"] == 0, c.ops
            seen[n, "generator" in sampling] = dict(calls)
    assert seen[3, False] == seen[17, False] and seen[3, True] == seen[17, True]
    assert seen[3, False]["to_device"] == 2 and seen[3, True]["to_device"] == 3  # + the call's uniforms
    with _OpCounter() as c:  # the reference's per-step host read is what the counter catches
        reference_generate(model, prompts, 3, -1, 0)
    assert c.ops["_local_scalar_dense"] == 2  # steps 0 and 1; the last step needs no check


def test_sampling_cumsums_are_unchanged_under_deterministic_mode():
    """sample_next under torch.use_deterministic_algorithms draws what it draws without (on a GPU its
    cumulative sums leave deterministic mode for a row-wise scan, not a (B, V, V) decomposition), one
    row or several, with and without top-p; the caller's setting, warn_only included, is restored."""
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    for rows in (slice(0, 1), slice(0, 3)):
        for top_p in (1.0, 0.8):
            want = [sample_next(logits[rows], top_p=top_p, generator=torch.Generator().manual_seed(s))
                    for s in range(20)]
            for warn_only in (False, True):
                torch.use_deterministic_algorithms(True, warn_only=warn_only)
                try:
                    got = [sample_next(logits[rows], top_p=top_p, generator=torch.Generator().manual_seed(s))
                           for s in range(20)]
                    assert torch.are_deterministic_algorithms_enabled()
                    assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only
                finally:
                    torch.use_deterministic_algorithms(False)
                assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.are_deterministic_algorithms_enabled()


# ---- checkpoints ----


def test_save_load_round_trip(tmp_path):
    model = tiny(seed=6)
    tokens = torch.randint(0, 64, (2, 7))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    back = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert back.args == model.args
    for (n, p), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))

    bf16 = Llama.from_pretrained(str(tmp_path))  # default dtype
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert not list(tmp_path.glob("*.tmp"))


def test_sharded_save_load_round_trip(tmp_path):
    model = tiny(seed=7)
    model.save_pretrained(tmp_path, max_shard_size=20_000)  # ~100 KB of fp32 -> several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    back = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    for n, p in model.state_dict().items():
        assert torch.equal(p, back.state_dict()[n]), n

    # a later single-file save into the same directory must win over the stale index
    other = tiny(seed=8)
    other.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    again = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert torch.equal(again.lm_head.weight, other.lm_head.weight)


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny(seed=9, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    back = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    tokens = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


# ---- FSDP2: generate gathers once, then each rank decodes its own rows to their end ----

FSDP_SCRIPT = textwrap.dedent("""
    import datetime, os, sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, {here!r})
    from test_model import tiny
    from model import generate
    rank = int(sys.argv[1])
    model = tiny(seed=3, dtype=torch.float64)
    prompts = [[[5, 6, 7], [9]], [[10, 11, 12, 13]]][rank]
    # references before the process group exists (generate would otherwise be collective)
    want = [generate(model, [p], 6, eos_id=-1, pad_id=0, greedy=True)[0] for p in prompts]
    # rank 0 stops at once (eos = its first greedy token), rank 1 runs to max_new_tokens
    eos = want[0][0] if rank == 0 else -1
    want = [w[: w.index(eos)] if eos in w else w for w in want]
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))  # the mesh of the device the tensors are on, as sharding.py does
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    got = generate(model, prompts, 6, eos_id=eos, pad_id=0, greedy=True)
    assert got == want, (rank, got, want)
    # parameters resharded afterwards, and a training-style forward/backward still works
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    dist.barrier()
    dist.destroy_process_group()
    print("ok", rank, flush=True)
    os._exit(0)
""")


def test_generate_under_fsdp2_lets_ranks_stop_independently(tmp_path):
    script = tmp_path / "fsdp_gen.py"
    script.write_text(FSDP_SCRIPT.format(here=HERE, store=str(tmp_path / "store")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for r in range(2)]
    try:
        # a hang (a decode forward doing a collective) fails here
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {r}" in out, out
