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
