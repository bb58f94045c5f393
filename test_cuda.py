"""The GPU suite: what the CPU suite cannot show, on one CUDA GPU (NCCL at world size 1). Skipped where
CUDA is absent; written for torch 2.11 as well as 2.13. About 5 minutes on one H200.

- train_proxy.py with a bf16 base, both samplers, and a stop and --resume inside a round with
  --deterministic that ends bitwise equal to the uninterrupted run;
- train_student.py's cache build on the GPU and Eq. 9's moments;
- the fused heads on CUDA, in bf16 and fp32, against an fp64 CPU reference;
- scripts/benchmark.py on one config, with MFU.
"""

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

import data
import fast
import proxykd as pk
from model import Llama, ModelArgs
from scripts import demo_world
from test_losses import _student_setup
from test_train_proxy import ROOT, adapter, launch, metrics, ok, run_in_session, steps_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_launch(args: list[str], script: str = "train_proxy.py"):
    return launch(args + ["--device", "cuda"], nproc=0, script=script, device="cuda")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """80 demo examples (D_w 8, D_p 36: 3 rounds of 12), a tokenizer and two small random Llamas (proxy,
    student) saved in fp32; the runs load them in bf16."""
    d = tmp_path_factory.mktemp("cuda")
    train, held_out = str(d / "teacher.jsonl"), str(d / "heldout.jsonl")
    demo_world.write_demo_jsonl(train, 80, seed=0)
    demo_world.write_demo_jsonl(held_out, 8, seed=1)
    tok_path = demo_world.train_demo_tokenizer([train], str(d / "tok"), 320)
    vocab = data.Tokenizer(tok_path).vocab_size
    torch.manual_seed(0)
    proxy, student = str(d / "proxy_base"), str(d / "student_base")
    Llama(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=256, vocab_size=vocab)).save_pretrained(proxy)
    Llama(dataclasses.replace(ModelArgs.from_name("tiny"), vocab_size=vocab)).save_pretrained(student)
    common = ["--tokenizer", tok_path, "--data", train, "--eval_data", held_out, "--max_len", "128", "--lr", "1e-3",
              "--batch_size", "4", "--eval_batch_size", "4", "--seed", "0"]
    return dict(dir=d, proxy=proxy, student=student, tok=tok_path, data=train, common=common)


PROXY = ["--rounds", "3", "--max_new_tokens", "16", "--deterministic", "--save_every", "1"]


@pytest.fixture(scope="module")
def proxy_run(world):
    out = str(world["dir"] / "proxy_gathered")
    ok(cuda_launch(["--base", world["proxy"], *world["common"], *PROXY, "--sampler", "gathered", "--out", out]))
    return out


def test_proxy_trains_on_cuda_with_both_samplers(world, proxy_run):
    """bf16 base, NCCL at one rank: every step finite, each round's DPO starting at log 2 (the policy is
    its reference), a merged proxy written; the tensor-parallel sampler (a whole copy at one rank,
    which auto never picks) trains too."""
    for out in (proxy_run, str(world["dir"] / "proxy_tp")):
        if out != proxy_run:
            ok(cuda_launch(["--base", world["proxy"], *world["common"], *PROXY, "--sampler", "tensor_parallel", "--out", out]))
        steps = steps_of(out)
        assert steps and all(math.isfinite(r["loss"]) for r in steps)
        firsts = [next(r for r in steps if r.get("round") == i) for i in (1, 2, 3)]
        assert all(r["dpo"] == pytest.approx(math.log(2), abs=2e-3) for r in firsts)
        config = next(r for r in metrics(out) if "config" in r)["config"]
        assert config["device"] == "cuda" and config["base_dtype"] == "bfloat16"
        assert os.path.exists(os.path.join(out, "final", "model.safetensors"))


def test_proxy_resume_inside_a_round_is_bitwise_with_deterministic(world, proxy_run):
    """Stopped after round 1's first step and resumed, with --deterministic: the same per-step losses and
    the same adapter, bitwise, as the uninterrupted run."""
    out = str(world["dir"] / "proxy_resumed")
    stop = next(r["step"] for r in steps_of(proxy_run) if r.get("round") == 1)
    args = ["--base", world["proxy"], *world["common"], *PROXY, "--sampler", "gathered", "--out", out]
    ok(cuda_launch(args + ["--stop_after_steps", str(stop)]))
    ok(cuda_launch(args + ["--resume"]))
    ref, res = steps_of(proxy_run), steps_of(out)
    assert [(r["step"], r["loss"]) for r in ref] == [(r["step"], r["loss"]) for r in res]
    a, b = adapter(os.path.join(proxy_run, "adapter")), adapter(os.path.join(out, "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_caches_on_cuda_and_standardises_over_d_s(world, proxy_run):
    """The cache is built by the bf16 proxy on the GPU; Eq. 9's logged moments are those of the cached
    log pi_p(y|x) over all of D_s; the student trains with finite losses."""
    out = str(world["dir"] / "student")
    ok(cuda_launch(["--base", world["student"], "--proxy", os.path.join(proxy_run, "final"), *world["common"],
                    "--out", out], script="train_student.py"))
    with open(os.path.join(out, "cache", "meta.json")) as f:
        from topk_cache import ProxyCache
        cache = ProxyCache(os.path.join(out, "cache"), json.load(f))
    d_s = data.split_indices(80, 0)["student"]
    assert set(cache.where) == set(d_s)
    s = torch.tensor([cache.seq[i] for i in d_s], dtype=torch.float64)
    rec = next(r for r in metrics(out) if r.get("phase") == "weights")
    assert rec["mu"] == pytest.approx(s.mean().item(), rel=1e-9) and rec["gamma"] == pytest.approx(s.std(unbiased=False).item(), rel=1e-9)
    assert all(math.isfinite(r["loss"]) and r["wkl"] > 0 for r in steps_of(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_heads_on_cuda_match_fp64_cpu(dtype):
    """fast's fused heads on the GPU against proxykd's references in fp64 on the CPU, from the same
    (rounded) hidden states and weight: values and hidden-state gradients. bf16 rounds the logits the
    matmul produces, hence its looser bound."""
    _, labels, hidden, W, ids, lps, weights = _student_setup(31, B=3, T=12, V=40, D=16, k=5)
    h, w = hidden.detach().to(dtype), W.detach().to(dtype)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)

    h_ref = h.double().requires_grad_()
    ref = pk.student_loss(h_ref @ w.double().T, labels, ids, lps, weights, alpha=10.0)
    ref.loss.backward()
    ref_lp = pk.sequence_logps(h.double() @ w.double().T, labels)

    h_gpu = h.cuda().requires_grad_()
    out = fast.student_loss_fused(h_gpu, w.cuda(), labels.cuda(), ids.cuda(), lps.cuda(), weights.cuda(), alpha=10.0)
    out.loss.backward()
    lp = fast.sequence_logps_fused(h.cuda(), w.cuda(), labels.cuda())
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss.detach(), **tol)
    torch.testing.assert_close(out.kl.double().cpu(), ref.kl, **tol)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, **tol)
    torch.testing.assert_close(h_gpu.grad.double().cpu(), h_ref.grad, **tol)


def test_benchmark_on_cuda_reports_mfu(tmp_path):
    out = str(tmp_path / "bench.md")
    p = run_in_session([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--configs", "tiny", "--steps", "2",
                        "--out", out], {**os.environ, "PYTHONUNBUFFERED": "1"}, 600, device="cuda")
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.splitext(out)[0] + ".json") as f:
        (row,) = json.load(f)["rows"]
    assert row["dtype"] == "bfloat16" and row["proxy_tok_s"] > 0
    if row["proxy_mfu"] is not None:  # a GPU whose peak the script knows (A100, H100, H200)
        assert 0 < row["proxy_mfu"] < 1 and 0 < row["student_mfu"] < 1


# ---- model.py on the GPU: sampling under deterministic mode, the masked GQA route, syncs per decode ----


def test_fused_heads_on_cuda_match_fp64_cpu_over_several_chunks():
    """fp32 at a vocabulary of 1,536 with chunks of 7 rows: several chunks, the last one partial, all
    through the (chunk, V) buffers allocated once per call, against the fp64 CPU references."""
    _, labels, hidden, W, ids, lps, weights = _student_setup(32, B=3, T=24, V=1536, D=32, k=10)
    h, w = hidden.detach().float(), W.detach().float()
    assert int(pk.response_mask(labels).sum()) > 3 * 7  # at least four chunks
    tol = dict(rtol=2e-4, atol=2e-4)

    h_ref = h.double().requires_grad_()
    ref = pk.student_loss(h_ref @ w.double().T, labels, ids, lps, weights, alpha=10.0)
    ref.loss.backward()
    ref_lp = pk.sequence_logps(h.double() @ w.double().T, labels)

    h_gpu = h.cuda().requires_grad_()
    out = fast.student_loss_fused(h_gpu, w.cuda(), labels.cuda(), ids.cuda(), lps.cuda(), weights.cuda(),
                                  alpha=10.0, chunk_size=7)
    out.loss.backward()
    lp = fast.sequence_logps_fused(h.cuda(), w.cuda(), labels.cuda(), chunk_size=7)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss.detach(), **tol)
    torch.testing.assert_close(out.kl.double().cpu(), ref.kl, **tol)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, **tol)
    torch.testing.assert_close(h_gpu.grad.double().cpu(), h_ref.grad, **tol)


def _peak_bytes(fn):
    """fn() and the most bytes the CUDA caching allocator held for it beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def test_sampling_under_deterministic_mode_stays_small_on_cuda():
    """model.sample_next at a 32,000 vocabulary under torch.use_deterministic_algorithms(True): at most
    64 MiB above what was allocated (its working set is O(rows x V), about 1 MiB per row in fp64 copies;
    a cumsum decomposed into a (rows, V, V) tensor needs 8 GB per fp64 row), and the same draws as with
    deterministic mode off. The probe: what a plain deterministic cumsum of one fp64 row takes in this torch
    (printed; above the bound where it takes the decomposition)."""
    from model import sample_next

    V, bound = 32000, 64 << 20
    logits = (torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3).cuda()
    row = torch.rand(1, V, dtype=torch.float64, device="cuda")
    draws = lambda rows, top_p: [sample_next(logits[:rows], top_p=top_p,  # noqa: E731
                                             generator=torch.Generator().manual_seed(s)) for s in range(5)]
    cases = [(1, 1.0), (4, 1.0), (1, 0.9), (4, 0.9)]
    want = [draws(*c) for c in cases]
    try:
        torch.use_deterministic_algorithms(True)
        _, probe = _peak_bytes(lambda: row.cumsum(-1))
        print(f"torch {torch.__version__}: a deterministic cumsum of one fp64 row of {V} took "
              f"{probe / 2**20:.1f} MiB", flush=True)
        for case, w in zip(cases, want):
            got, used = _peak_bytes(lambda: draws(*case))
            assert used < bound, (case, used, probe)
            assert all(torch.equal(a, b) for a, b in zip(got, w)), case
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def _gqa_model(dtype=torch.bfloat16) -> Llama:
    """A random GQA Llama (8 query heads on 2 kv heads, head_dim 32) on the GPU with unit-scale weights, so
    its logits are far from uniform and greedy choices rarely tie."""
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=512, vocab_size=512))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0.0, 1.0 if "embed" in n else p.shape[1] ** -0.5)
    return model.to("cuda", dtype).eval()


def test_masked_gqa_prefill_and_decode_run_without_the_math_kernel():
    """A bf16 GQA model's masked prefill and decode steps (ragged prompts) run with SDPA restricted to
    flash, memory-efficient and cuDNN (SDPA raises when no enabled kernel takes a call, so the math kernel
    is not needed), also with the memory-efficient kernel alone and under deterministic mode: generate
    runs, and teacher-forced logits, fed as generate feeds the model (a key-padding mask for the prefill,
    (B, 1, 1, S) masks for the steps), match the unrestricted run's and the math kernel's to bf16
    tolerance (3% of the largest logit)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import KVCache, generate

    model = _gqa_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
    B, L, n = len(prompts), 11, 6
    tokens = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device="cuda")
    starts = torch.tensor([L - len(p) for p in prompts], device="cuda")
    valid = torch.arange(L + n, device="cuda") >= starts[:, None]
    pos = (valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)
    forced = torch.randint(1, 512, (B, n), generator=torch.Generator().manual_seed(1)).cuda()

    def run(backends=None, deterministic=False):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            with nullcontext() if backends is None else sdpa_kernel(backends), torch.no_grad():
                out = generate(model, prompts, n, eos_id=-1, pad_id=0, greedy=True)
                assert [len(r) for r in out] == [n] * B
                cache = KVCache(L + n)
                logits = [model(tokens, position_ids=pos, attn_mask=valid[:, :L], cache=cache)[:, -1]]
                for t in range(n - 1):
                    logits.append(model(forced[:, t : t + 1], position_ids=pos[:, -1:] + 1 + t,
                                        attn_mask=valid[:, None, None, : L + t + 1], cache=cache)[:, -1])
        finally:
            torch.use_deterministic_algorithms(False)
        return torch.stack(logits, 1).float()

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    want = run()
    assert want.abs().max() > 1.0
    for ref in (want, run([SDPBackend.MATH])):
        for backends, det in ((fused, False), ([SDPBackend.EFFICIENT_ATTENTION], False), (fused, True)):
            got = run(backends, det)
            assert (got - ref).abs().max() <= 0.03 * ref.abs().max(), (backends, det)


def test_generate_syncs_a_fixed_few_times_per_call_on_cuda():
    """model.generate on CUDA under torch.cuda.set_sync_debug_mode("warn"): the synchronizing calls per
    call (reading the new tokens back at the end) do not grow with max_new_tokens, greedy or sampled, and
    stopping early when every row is done adds none (the stop flag is read from pinned memory after an
    event)."""
    import warnings

    from model import generate

    model = _gqa_model(torch.float32)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    first = generate(model, prompts[:1], 1, eos_id=-1, pad_id=0, greedy=True)[0][0]
    cases = {"greedy": (prompts, -1, dict(greedy=True)),
             "sampled": (prompts, -1, dict(generator=torch.Generator().manual_seed(0))),
             "all done at step 0": (prompts[:1], first, dict(greedy=True))}
    counts = {}
    for n in (4, 24):
        for name, (ps, eos, sampling) in cases.items():
            generate(model, ps, n, eos_id=eos, pad_id=0, **sampling)  # warm: allocator, kernels
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = generate(model, ps, n, eos_id=eos, pad_id=0, **sampling)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            counts[name, n] = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                               if "called a synchronizing CUDA operation" in str(w.message)]
            assert [len(r) for r in out] == ([0] if eos == first else [n] * len(ps))
    assert all(len(counts[name, 4]) == len(counts[name, 24]) for name in cases), counts
    assert max(map(len, counts.values())) <= 2, counts
