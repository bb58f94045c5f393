"""train_student.py end to end on CPU: real torchrun launches (gloo, FSDP2) of tiny random Llamas on the
embedded demo data. A random "proxy" is enough for the mechanics (cache, weights, losses, resume). Each
run is a subprocess with a timeout, so a rank that hangs fails the test instead of blocking the suite;
the runs are module-scoped fixtures shared by the tests that inspect them.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

import data
import lora
import provenance
import proxykd as pk
import test_train_proxy
import topk_cache
import train_student as ts
from model import Llama, ModelArgs
from run import Run
from scripts import demo_world
from test_train_proxy import metrics, ok, steps_of

N_EXAMPLES, SEED, K, MAX_LEN = 60, 0, 10, 200


def launch(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return test_train_proxy.launch(args, nproc, script="train_student.py")


def adapter(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def open_cache(cache_dir: str) -> topk_cache.ProxyCache:
    with open(os.path.join(cache_dir, "meta.json")) as f:
        return topk_cache.ProxyCache(cache_dir, json.load(f))


def save_model(path: str, vocab: int, seed: int, tok_path: str | None = None) -> str:
    torch.manual_seed(seed)
    Llama(dataclasses.replace(ModelArgs.from_name("tiny"), vocab_size=vocab)).save_pretrained(path)
    if tok_path:
        shutil.copyfile(tok_path, os.path.join(path, "tokenizer.model"))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo teacher data (60 examples: D_s = 27), a held-out file, a tiny sentencepiece tokenizer, a tiny
    random student and two tiny random proxies (A, B: different weights) in HF format (fp32)."""
    d = tmp_path_factory.mktemp("world")
    train, held_out = str(d / "teacher.jsonl"), str(d / "heldout.jsonl")
    demo_world.write_demo_jsonl(train, N_EXAMPLES, seed=0)
    demo_world.write_demo_jsonl(held_out, 8, seed=1)
    tok_path = demo_world.train_demo_tokenizer([train], str(d / "tok"), 96)
    tok = data.Tokenizer(tok_path)
    student = save_model(str(d / "student"), tok.vocab_size, 0)
    proxy_a = save_model(str(d / "proxy_a"), tok.vocab_size, 1, tok_path)
    proxy_b = save_model(str(d / "proxy_b"), tok.vocab_size, 2, tok_path)
    # 2 ranks x 2 examples -> 7 steps; caching: 14 + 13 examples per rank in batches of 3, a part every 2
    # batches -> 3 parts per rank; the proxy runs in fp32 so the cache can be checked tightly
    common = ["--base", student, "--tokenizer", tok_path, "--data", train, "--max_len", str(MAX_LEN),
              "--lr", "1e-3", "--batch_size", "2", "--split_seed", str(SEED), "--seed", str(SEED),
              "--topk", str(K), "--proxy_dtype", "float32", "--cache_batch_size", "3",
              "--cache_flush_every", "2"]
    # held-out evaluations after every step, keeping the best
    keep_best = ["--keep_best", "--eval_every", "1", "--eval_data", held_out, "--eval_batch_size", "4"]
    d_s = data.split_indices(N_EXAMPLES, SEED)["student"]
    return dict(dir=d, keep_best=keep_best, student=student, proxy_a=proxy_a, proxy_b=proxy_b, tok=tok,
                tok_path=tok_path, data=train, held_out=held_out, common=common, d_s=d_s,
                steps=math.ceil(len(d_s) / 4))


@pytest.fixture(scope="module")
def run_kd(world):
    """Full Proxy-KD: cache with proxy A, then the weighted-KL student (alpha 100, bf16 base); held-out
    evaluations after every step with --keep_best, and every step's checkpoint kept."""
    out = str(world["dir"] / "kd")
    ok(launch(world["common"] + ["--proxy", world["proxy_a"], "--out", out, *world["keep_best"],
                                 "--save_every", "1", "--keep_checkpoints", "0"]))
    return out


@pytest.fixture(scope="module")
def run_sft(world):
    """Black-box KD: --alpha 0 and no proxy at all."""
    out = str(world["dir"] / "sft")
    ok(launch(world["common"] + ["--alpha", "0", "--out", out]))
    return out


def fresh_proxy_rows(proxy: Llama, enc: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Brute force, one example, full logits: -> (log pi_p over V at each response position (n, V) fp64,
    the teacher's tokens there (n,), log pi_p(y|x))."""
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor(enc["labels"])
    with torch.no_grad():
        logp = proxy(ids)[0, :-1].double().log_softmax(-1)
    pos = labels[1:] != -100
    y = labels[1:][pos]
    lp = logp[pos]
    return lp, y, lp.gather(-1, y[:, None]).sum().item()


def assert_rows_are_proxy_topk(world: dict, cache: topk_cache.ProxyCache, ids: list[int]) -> None:
    """Each cached row holds proxy A's k most likely tokens with their full-vocabulary log-probs (within
    fp16 rounding), in descending order. Tie-robust: the fresh log-probs of the cached ids, in cache
    order, are the sorted top-k values."""
    proxy = Llama.from_pretrained(world["proxy_a"], dtype=torch.float32)
    examples = data.read_jsonl(world["data"])
    for i in ids:
        lp, y, seq = fresh_proxy_rows(proxy, data.encode_example(world["tok"], examples[i], MAX_LEN))
        (c_ids, c_lps), = cache.rows([i])
        assert c_ids.dtype == torch.int32 and c_lps.dtype == torch.float16
        assert c_ids.shape == (y.shape[0], K), i
        ref_vals = lp.topk(K, dim=-1).values
        torch.testing.assert_close(lp.gather(-1, c_ids.long()), ref_vals, rtol=0, atol=1e-5)
        torch.testing.assert_close(c_lps.double(), ref_vals, rtol=1e-3, atol=2e-3)
        assert cache.seq[i] == pytest.approx(seq, rel=1e-5, abs=1e-4), i
        assert cache.n_tokens([i]).item() == y.shape[0]


# --------------------------------------------------------------------------- phase 1: the proxy cache


def test_cache_equals_fresh_proxy_forward(world, run_kd):
    cache_dir = os.path.join(run_kd, "cache")
    cache = open_cache(cache_dir)
    assert set(cache.where) == set(world["d_s"])  # every example of D_s once, nothing else
    assert len(os.listdir(cache_dir)) == 2 + 6  # meta.json, COMPLETE, 2 ranks x 3 parts
    assert_rows_are_proxy_topk(world, cache, world["d_s"])
    # 10 int32 ids + 10 fp16 log-probs = 60 bytes per token, plus per-example and header overhead
    stats = next(r for r in metrics(run_kd) if r.get("phase") == "cache_ready")
    assert stats["tokens"] == sum(cache.n_tokens(world["d_s"]).tolist())
    assert 60 <= stats["bytes_per_token"] < 60 * 1.5


def test_stale_cache_is_refused(world, run_kd):
    """Another proxy and a changed data file: the complete cache of run_kd is refused, naming both
    differences and how to rebuild, and left untouched."""
    changed = str(world["dir"] / "teacher_changed.jsonl")
    shutil.copyfile(world["data"], changed)
    with open(world["data"]) as f:
        first = f.readline()
    with open(changed, "a") as f:
        f.write(first)
    cache_dir = os.path.join(run_kd, "cache")
    before = sorted(os.listdir(cache_dir))
    args = world["common"] + ["--data", changed, "--proxy", world["proxy_b"], "--cache_dir", cache_dir,
                              "--out", str(world["dir"] / "stale")]
    p = launch(args, nproc=0)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "--rebuild_cache" in p.stderr
    # exactly the real differences are named: the data (and so the size of D_s) and the proxy
    listed = {line.split(":")[0].strip() for line in p.stderr.splitlines() if ": cache has " in line}
    assert listed == {"data_sha256", "n_student_examples", "proxy_sha256"}
    assert sorted(os.listdir(cache_dir)) == before


def test_partial_cache_is_never_read_and_caching_resumes(world, run_kd):
    """A cache without COMPLETE (one part lost, a crashed write left a temp file) is refused by the
    reader; a rerun (1 process: the world size may change) keeps the whole parts byte for byte and
    recomputes only the missing examples."""
    partial = str(world["dir"] / "partial_cache")
    shutil.copytree(os.path.join(run_kd, "cache"), partial)
    os.remove(os.path.join(partial, "COMPLETE"))
    parts = topk_cache.part_files(partial)
    lost = parts[1]
    with safe_open(lost, framework="pt") as f:
        lost_ids = f.get_tensor("example_ids").tolist()
    os.remove(lost)
    crashed = os.path.join(partial, ".tmp-000000000-1.tmp")
    with open(crashed, "wb") as f:
        f.write(b"half a part")
    with pytest.raises(topk_cache.CacheError, match="incomplete"):
        open_cache(partial)
    kept = {p: os.stat(p).st_mtime_ns for p in parts if p != lost}

    out = str(world["dir"] / "cache_only")
    ok(launch(world["common"] + ["--proxy", world["proxy_a"], "--cache_dir", partial, "--out", out,
                                 "--cache_only"], nproc=0))
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept
    assert not os.path.exists(crashed)
    cache = open_cache(partial)
    assert set(cache.where) == set(world["d_s"])
    assert next(r for r in metrics(out) if r.get("phase") == "cache")["examples"] == len(lost_ids)
    assert_rows_are_proxy_topk(world, cache, lost_ids)


def test_weights_standardise_over_all_of_d_s(world, run_kd):
    """Eq. 9 from two ranks' disjoint slices (all_reduced moments) equals the brute-force moments over
    the whole of D_s; the weights then average about 0.5 (exactly 0.5 for symmetric scores)."""
    cache = open_cache(os.path.join(run_kd, "cache"))
    s = torch.tensor([cache.seq[i] for i in world["d_s"]], dtype=torch.float64)
    mu, gamma = s.mean(), s.std(unbiased=False)
    w = torch.sigmoid((s - mu) / gamma)
    rec = next(r for r in metrics(run_kd) if r.get("phase") == "weights")
    assert rec["mu"] == pytest.approx(mu.item(), rel=1e-9)
    assert rec["gamma"] == pytest.approx(gamma.item(), rel=1e-9)
    assert rec["w_mean"] == pytest.approx(w.mean().item(), rel=1e-6)
    assert 0.4 < rec["w_mean"] < 0.6 and rec["w_min"] < 0.5 < rec["w_max"]


def _moments_worker(rank: int, world: int, path: str, shards, q) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    mu, gamma = ts.mean_std_over_ranks(shards[rank])
    q.put((rank, float(mu), float(gamma), pk.sample_weights(shards[rank], mu, gamma).tolist()))
    dist.destroy_process_group()


def test_reduce_mean_std_across_ranks(tmp_path):
    """Eq. 9's moments from two ranks' unequal shards (one all_reduce) are the whole set's, and the
    weights each rank computes from them are one process's weights over all of D_s."""
    import multiprocessing as mp

    g = torch.Generator().manual_seed(6)
    full = -200 + 30 * torch.randn(11, generator=g, dtype=torch.float64)
    shards = [full[:3], full[3:]]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_moments_worker, args=(r, 2, str(tmp_path / "store"), shards, q))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    mu, gamma = full.mean(), full.std(unbiased=False)
    for rank, m, s, w in results:
        assert abs(m - mu.item()) < 1e-9 and abs(s - gamma.item()) < 1e-9
    torch.testing.assert_close(torch.tensor(results[0][3] + results[1][3]),
                               pk.sample_weights(full, mu, gamma))


# --------------------------------------------------------------------------- phase 2: the student


def test_student_trains_only_lora(world, run_kd):
    """The run logs every step with a positive KL term and held-out evals before, during and after; the
    adapter moved, and its merged student is exactly base + (alpha / r) B A: base weights never changed."""
    recs, steps = metrics(run_kd), steps_of(run_kd)
    assert [r["step"] for r in steps] == list(range(1, world["steps"] + 1))
    assert all(math.isfinite(r["loss"]) and r["wkl"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["nll"] + 100 * r["wkl"], rel=1e-5) for r in steps)
    evals = [r for r in recs if "eval_top1_agreement" in r]
    assert (evals[0]["stage"], evals[-1]["stage"]) == ("init", "final") and len(evals) == world["steps"] + 1
    assert all(0 <= r["eval_top1_agreement"] <= 1 for r in evals)
    assert os.path.exists(os.path.join(run_kd, "final", "tokenizer.model"))

    final = adapter(run_kd)
    a_keys = sorted(k for k in final if "lora_A" in k)
    assert a_keys and len(final) == 2 * len(a_keys)
    assert all(final[k.replace("lora_A", "lora_B")].abs().max() > 0 for k in a_keys)
    base = Llama.from_pretrained(world["student"], dtype=torch.float32).state_dict()
    merged = Llama.from_pretrained(os.path.join(run_kd, "final"), dtype=torch.float32).state_dict()
    assert base.keys() == merged.keys()
    lora_of = {k.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight"): k for k in a_keys}
    assert len(lora_of) == 7 * 2  # every linear of both blocks
    for name, w in base.items():
        if name in lora_of:
            ka = lora_of[name]
            delta = (16.0 / 8) * final[ka.replace("lora_A", "lora_B")] @ final[ka]
            torch.testing.assert_close(merged[name], w + delta, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], w), name


def eq11_of_first_step(world: dict, cache: topk_cache.ProxyCache,
                       train_ids: list[int]) -> tuple[float, float, float]:
    """Brute force: (loss, nll, wkl) of a 2-rank run's first step over train_ids at the initial student
    (LoRA B = 0: the bf16 base), from full fp32 logits over BOTH ranks' micro-batches divided by their
    total token count, with the cache's rows, and Eq. 9 weights standardised over ALL of D_s."""
    s = torch.tensor([cache.seq[i] for i in world["d_s"]], dtype=torch.float64)
    w_of = dict(zip(world["d_s"], torch.sigmoid((s - s.mean()) / s.std(unbiased=False)).tolist()))
    cfg = ts.Config(batch_size=2, grad_accum=1, seed=SEED)
    micro = [m for r in range(2) for m in data.plan_steps(train_ids, cfg, r, 2, range(1))[0]]
    examples = data.read_jsonl(world["data"])
    tok = world["tok"]
    batches = [data.collate([data.encode_example(tok, examples[i], MAX_LEN) for i in m], tok.pad_id)
               for m in micro]
    n_total = sum(pk.num_response_tokens(b["labels"]) for b in batches)
    model = Llama.from_pretrained(world["student"], dtype=torch.bfloat16)
    loss = nll = wkl = 0.0
    with torch.no_grad():
        for m, b in zip(micro, batches):
            h, w = model(b["input_ids"], head_fn=lambda h, w: (h, w))
            logits = (h @ w.T).float()  # (B, T, V): bf16 matmul, fp32 loss, as the fused head computes it
            top_ids, top_lps = topk_cache.pad_topk(cache.rows(m), b["labels"])
            out = pk.student_loss(logits, b["labels"], top_ids, top_lps, torch.tensor([w_of[i] for i in m]),
                                  100.0, n_total)
            loss, nll, wkl = loss + out.loss.item(), nll + out.nll.item(), wkl + out.wkl.item()
    return loss, nll, wkl


def test_first_step_loss_is_eq11_over_both_ranks(world, run_kd):
    """Step 1's logged loss / nll / wkl equal Eq. 11 by brute force (eq11_of_first_step): the cross-rank
    normalisation, the cache-to-position alignment and the weight lookup of the real 2-rank run."""
    loss, nll, wkl = eq11_of_first_step(world, open_cache(os.path.join(run_kd, "cache")), world["d_s"])
    first = steps_of(run_kd)[0]
    assert first["loss"] == pytest.approx(loss, rel=1e-5)
    assert first["nll"] == pytest.approx(nll, rel=1e-5)
    assert first["wkl"] == pytest.approx(wkl, rel=1e-4)


def test_max_examples_trains_on_the_first_n_with_the_full_cache_and_weights(world, run_kd):
    """--max_examples 5 --epochs 2: the cache it builds holds all of D_s, row for row the full run's, and
    Eq. 9's moments and weights are the full run's; the student trains on the first 5 examples of D_s
    only (2 epochs of 2 global batches of 4, wrap-padded), and its first step is Eq. 11 on them."""
    out, cache_dir = str(world["dir"] / "max5"), str(world["dir"] / "max5_cache")
    ok(launch(world["common"] + ["--proxy", world["proxy_a"], "--out", out, "--cache_dir", cache_dir,
                                 "--max_examples", "5", "--epochs", "2"]))
    full, small = open_cache(os.path.join(run_kd, "cache")), open_cache(cache_dir)
    assert set(small.where) == set(full.where) == set(world["d_s"])
    for (a_ids, a_lps), (b_ids, b_lps) in zip(full.rows(world["d_s"]), small.rows(world["d_s"])):
        assert torch.equal(a_ids, b_ids) and torch.equal(a_lps, b_lps)
    assert small.seq == full.seq
    weights = [next(r for r in metrics(o) if r.get("phase") == "weights") for o in (run_kd, out)]
    assert weights[0] == weights[1]
    config = next(r for r in metrics(out) if "config" in r)
    assert (config["n_student"], config["n_train"], config["steps"]) == (len(world["d_s"]), 5, 4)
    steps = steps_of(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    loss, nll, wkl = eq11_of_first_step(world, small, world["d_s"][:5])
    assert (steps[0]["loss"] == pytest.approx(loss, rel=1e-5)
            and steps[0]["wkl"] == pytest.approx(wkl, rel=1e-4))


def test_resume_matches_uninterrupted(world, run_kd):
    """Stop after 4 of 7 steps, resume: the same per-step losses, the same held-out evaluations and the
    same adapter, bitwise, and --keep_best's choice survives the stop: the checkpoint holds the best
    evaluation so far, the resumed run keeps run_kd's best adapter. Reuses run_kd's complete cache (no
    proxy forward in either launch)."""
    out = str(world["dir"] / "resumed")
    args = world["common"] + ["--proxy", world["proxy_a"], "--cache_dir", os.path.join(run_kd, "cache"),
                              "--out", out, *world["keep_best"]]
    ok(launch(args + ["--stop_after_steps", "4"]))
    assert max(r["step"] for r in steps_of(out)) == 4
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        state = torch.load(os.path.join(out, "checkpoints", f.read().strip(), "state.pt"), weights_only=True)
    so_far = min((r for r in metrics(run_kd) if "eval_nll" in r and r["step"] <= 4),
                 key=lambda r: r["eval_nll"])
    assert state["best"] == {"step": so_far["step"], "eval_nll": so_far["eval_nll"]}
    ok(launch(args + ["--resume"]))
    evals = [[(r["step"], r["eval_nll"]) for r in metrics(o) if "eval_nll" in r] for o in (run_kd, out)]
    assert evals[0] == evals[1]
    best = [load_file(os.path.join(o, "best", "adapter", "adapter_model.safetensors")) for o in (run_kd, out)]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    assert not any(r.get("phase") == "cache" for r in metrics(out))
    ref, res = steps_of(run_kd), steps_of(out)
    assert [r["step"] for r in res] == [r["step"] for r in ref]
    for a, b in zip(ref, res):
        assert (a["loss"], a["nll"], a["wkl"]) == (b["loss"], b["nll"], b["wkl"]), a["step"]
    a, b = adapter(run_kd), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_keeps_the_lowest_held_out_nll(world, run_kd):
    """--keep_best: the kept evaluation is the one whose logged held-out NLL is lowest (the first of any
    tie), and its adapter is bitwise the checkpoint of that step (the adapter of a run stopped there);
    best/final is that adapter merged, final/ the last step's."""
    recs = metrics(run_kd)
    evals = [r for r in recs if "eval_nll" in r]
    assert [r["step"] for r in evals] == list(range(world["steps"] + 1))  # init, every step (the last: final)
    lowest = min(evals, key=lambda r: r["eval_nll"])
    best = next(r for r in recs if "best_step" in r)
    assert (best["best_step"], best["best_eval_nll"]) == (lowest["step"], lowest["eval_nll"])
    kept = load_file(os.path.join(run_kd, "best", "adapter", "adapter_model.safetensors"))
    if lowest["step"] == 0:  # the untrained student: a fresh adapter, B = 0
        assert all(not v.any() for k, v in kept.items() if "lora_B" in k)
    else:
        ckpt = load_file(os.path.join(run_kd, "checkpoints", f"step-{lowest['step']:08d}",
                                      "adapter_model.safetensors"))
        assert kept.keys() == ckpt.keys() and all(torch.equal(kept[k], ckpt[k]) for k in kept)
    merged = Llama.from_pretrained(os.path.join(run_kd, "best", "final"), dtype=torch.float32).state_dict()
    base = Llama.from_pretrained(world["student"], dtype=torch.float32).state_dict()
    name = "model.layers.0.self_attn.q_proj"
    delta = (16.0 / 8) * (kept[f"base_model.model.{name}.lora_B.weight"]
                          @ kept[f"base_model.model.{name}.lora_A.weight"])
    torch.testing.assert_close(merged[name + ".weight"], base[name + ".weight"] + delta)  # fp32, as stored


def test_alpha0_is_plain_sft_whatever_the_proxy(world, run_kd, run_sft):
    """--alpha 0 is black-box KD: with proxy B given it trains bitwise the same student as with no proxy
    at all, builds no cache, and logs loss == nll; with alpha 100 (run_kd) the student differs."""
    out = str(world["dir"] / "sft_b")
    cache_dir = str(world["dir"] / "never")
    ok(launch(world["common"] + ["--alpha", "0", "--proxy", world["proxy_b"], "--cache_dir", cache_dir,
                                 "--out", out]))
    assert not os.path.exists(cache_dir)
    a, b = adapter(run_sft), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["wkl"] == 0 and r["loss"] == r["nll"] for r in steps_of(run_sft))
    kd = adapter(run_kd)
    assert any(not torch.equal(a[k], kd[k]) for k in a)


def test_student_step_gradient_is_one_big_batch(world, run_kd):
    """student_step over uneven micro-batches (3 + 2 examples) with cache rows and weights gives the
    gradient of ONE batch's Eq. 11 loss computed from full logits: (sum NLL + alpha sum_i w_i KL_i) / N.
    SGD with lr 1 makes the update equal to minus the gradient. One rank (a HashStore group)."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cache = open_cache(os.path.join(run_kd, "cache"))
        tok, ids = world["tok"], world["d_s"][:5]
        examples = data.read_jsonl(world["data"])
        encoded = {i: data.encode_example(tok, examples[i], MAX_LEN) for i in ids}
        weights = {i: 0.1 + 0.2 * j for j, i in enumerate(ids)}
        cfg = ts.Config(alpha=100.0, chunk_size=7)

        torch.manual_seed(0)
        model = lora.apply_lora(Llama.from_pretrained(world["student"], dtype=torch.float32), r=4, alpha=8.0)
        for n, p in model.named_parameters():
            if p.requires_grad:  # random B too, so every LoRA tensor gets a gradient
                torch.nn.init.normal_(p, std=0.1)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        start = {n: p.detach().clone() for n, p in params.items()}

        # brute force: one batch, full logits, the non-chunked losses
        batch = data.collate([encoded[i] for i in ids], tok.pad_id)
        top_ids, top_lps = topk_cache.pad_topk(cache.rows(ids), batch["labels"])
        w = torch.tensor([weights[i] for i in ids])
        ref = pk.student_loss(model(batch["input_ids"]), batch["labels"], top_ids, top_lps, w, 100.0)
        grads = torch.autograd.grad(ref.loss, list(params.values()))

        opt = torch.optim.SGD(list(params.values()), lr=1.0)
        micro = [data.make_batch(m, encoded, tok.pad_id, "cpu") for m in (ids[:3], ids[3:])]
        out = ts.student_step(Run(cfg, model=model, optimizer=opt), micro, cache, weights)
        for (n, p), g in zip(params.items(), grads):
            torch.testing.assert_close(start[n] - p.detach(), g, rtol=1e-4, atol=1e-6)
        assert out.loss == pytest.approx(ref.loss.item(), rel=1e-5)
        assert out.wkl == pytest.approx(ref.wkl.item(), rel=1e-5)
    finally:
        if own_group:
            dist.destroy_process_group()


def test_world_size_1_matches_2(world, run_kd):
    """Same global batch (1 rank x 4 == 2 ranks x 2), fp32 base, run_kd's cache: the same losses and the
    same adapter up to float summation order. SGD, whose update is lr x the gradient, so the gradient's
    scale across world sizes is pinned too (Adam would hide a wrong factor). The 2-rank run stops after
    3 steps and resumes (SGD has no optimizer state to restore)."""
    args = world["common"] + ["--proxy", world["proxy_a"], "--cache_dir", os.path.join(run_kd, "cache"),
                              "--base_dtype", "float32", "--optimizer", "sgd"]
    ws1, ws2 = str(world["dir"] / "sgd_ws1"), str(world["dir"] / "sgd_ws2")
    ok(launch(args + ["--out", ws2, "--stop_after_steps", "3"]))
    ok(launch(args + ["--out", ws2, "--resume"]))
    ok(launch(args + ["--out", ws1, "--batch_size", "4"], nproc=0))
    s1, s2 = steps_of(ws1), steps_of(ws2)
    assert [r["step"] for r in s1] == [r["step"] for r in s2] == list(range(1, world["steps"] + 1))
    for a, b in zip(s1, s2):
        for key in ("loss", "nll", "wkl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    a1, a2 = adapter(ws1), adapter(ws2)
    assert a1.keys() == a2.keys()
    assert any(a1[k].abs().max() > 0 for k in a1 if "lora_B" in k)  # SGD moved B off zero
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("crash_at,extra", [
    ("cache_part:2:1", []),  # during the cache build: rank 1 dies after writing its second part
    ("checkpoint:2:0", ["--save_every", "1"]),  # during a checkpoint write (run_kd's complete cache)
])
def test_sigkill_then_resume_matches_uninterrupted(world, run_kd, crash_at, extra):
    """SIGKILL one rank at a given point, rerun with --resume: the same student adapter as the
    uninterrupted run_kd, bitwise (the cache build keeps the whole parts and computes the rest)."""
    out = str(world["dir"] / ("crash-" + crash_at.replace(":", "-")))
    cache = [] if crash_at.startswith("cache") else ["--cache_dir", os.path.join(run_kd, "cache")]
    args = world["common"] + ["--proxy", world["proxy_a"], "--out", out, *cache, *extra]
    test_train_proxy.crash_and_resume(args, crash_at, script="train_student.py")
    ref, res = steps_of(run_kd), steps_of(out)
    assert [(r["step"], r["loss"]) for r in ref] == [(r["step"], r["loss"]) for r in res]
    test_train_proxy.same_adapter(os.path.join(run_kd, "adapter"), os.path.join(out, "adapter"))


def test_provenance_guards_d_s(world, tmp_path):
    """A proxy's provenance.json (train_proxy.py) must describe this run's split: the same split seed and
    data file pass; another split seed or another file is a problem naming what differs; a proxy without
    provenance (a raw base, the -align ablation) only gets a note."""
    proxy = str(tmp_path / "proxy")
    shutil.copytree(world["proxy_a"], proxy)
    n = len(data.read_jsonl(world["data"]))
    cfg = ts.Config(data=world["data"], proxy=proxy, split_seed=SEED)
    assert provenance.check_provenance(cfg, n, world["tok"])[0] is None
    assert "-align" in provenance.check_provenance(cfg, n, world["tok"])[1]

    def write(**kw):
        with open(os.path.join(proxy, provenance.PROVENANCE), "w") as f:
            json.dump(provenance.data_provenance(**{"data_path": world["data"], "split_seed": SEED,
                                                    "n_examples": n, "tok": world["tok"], **kw}), f)

    write()
    assert provenance.check_provenance(cfg, n, world["tok"]) == (None, None)
    write(split_seed=SEED + 7)
    problem, _ = provenance.check_provenance(cfg, n, world["tok"])
    assert "split_seed: proxy 7, this run 0" in problem and "data_sha256" not in problem
    other = str(tmp_path / "other.jsonl")
    demo_world.write_demo_jsonl(other, n + 10, seed=5)
    write(data_path=other, n_examples=n + 10)
    problem, _ = provenance.check_provenance(cfg, n, world["tok"])
    assert "data_sha256" in problem and "split_sizes" in problem

    # end to end: one line on stderr, exit 2, before any proxy forward
    write(split_seed=SEED + 7)
    p = launch(world["common"] + ["--proxy", proxy, "--out", str(tmp_path / "out")], nproc=0)
    assert p.returncode == 2 and "split_seed" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not os.path.exists(str(tmp_path / "out" / "cache"))


@pytest.mark.parametrize("flag,value,what,nproc", [
    ("--base", "no/such/dir", "no such directory; expected an HF-format checkpoint dir", 2),
    ("--tokenizer", "no/such/tokenizer.model", "cannot read the tokenizer", 0),
    ("--tokenizer", "DATA", "not a sentencepiece model", 0),  # a JSONL file given as the tokenizer
])
def test_bad_paths_give_one_line_errors(world, tmp_path, flag, value, what, nproc):
    """A missing base dir or an unreadable tokenizer stops every rank (at 2 ranks torchrun then exits
    non-zero) with one line naming the path and what was expected, and no traceback through our code."""
    value = world["data"] if value == "DATA" else value
    args = ["--base", world["student"], "--tokenizer", world["tok_path"], "--data", world["data"], "--out",
            str(tmp_path / "out"), flag, value]
    for script, extra in (("train_student.py", ["--alpha", "0"]), ("train_proxy.py", [])):
        p = test_train_proxy.launch(args + extra, nproc=nproc, script=script)
        assert p.returncode != 0, p.stderr[-3000:]
        lines = [line for line in p.stderr.splitlines() if what in line]
        assert len(lines) == 1 and value in lines[0], p.stderr[-3000:]
        # no traceback through our code (torchrun prints its own)
        assert not test_train_proxy.own_frames(p.stderr), p.stderr[-3000:]


def test_plan_with_a_bad_base_is_one_line():
    """--plan reads only config.json: a missing dir stops it with the same one-line error, no traceback."""
    for script, extra in (("train_proxy.py", []), ("train_student.py", ["--proxy", "no/such/dir"])):
        p = subprocess.run([sys.executable, script, "--plan", "--base", "no/such/dir", *extra],
                           cwd=test_train_proxy.ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.strip().splitlines() == [
            f"{script}: bad input: no/such/dir: no such directory; expected an "
            "HF-format checkpoint dir (config.json + *.safetensors)"]


@pytest.mark.parametrize("nproc", [0, 2])
@pytest.mark.parametrize("case", ["truncated weights", "missing proxy", "three examples"])
def test_bad_inputs_stop_in_one_line(world, tmp_path, case, nproc):
    """What a new user gets wrong stops every rank with exit 2 and one line saying what is wrong, and no
    traceback through our code: a truncated *.safetensors (the proxy's --base, the student's --proxy), a
    --proxy directory that does not exist, and teacher data too small for the 10 / 45 / 45 split."""
    if case == "truncated weights":
        for flag, src in (("--base", world["student"]), ("--proxy", world["proxy_a"])):
            shutil.copytree(src, str(tmp_path / flag[2:]))
            weights = str(tmp_path / flag[2:] / "model.safetensors")
            with open(weights, "r+b") as f:
                f.truncate(os.path.getsize(weights) // 2)  # a copy that stopped half-way
        runs = [("train_proxy.py", ["--base", str(tmp_path / "base")],
                 "model.safetensors: not a whole safetensors file"),
                ("train_student.py", ["--proxy", str(tmp_path / "proxy")],
                 "model.safetensors: not a whole safetensors file")]
    elif case == "missing proxy":
        runs = [("train_student.py", ["--proxy", "no/such/dir"],
                 "bad input: --proxy no/such/dir: no such directory; expected an HF-format checkpoint dir")]
    else:
        tiny = str(tmp_path / "tiny.jsonl")
        demo_world.write_demo_jsonl(tiny, 3, seed=0)
        runs = [("train_proxy.py", ["--data", tiny], "3 examples leave the warm-up (D_w, 10%)")]
    base = ["--base", world["student"], "--tokenizer", world["tok_path"], "--data", world["data"],
            "--rounds", "2", "--proxy", world["proxy_a"], "--out", str(tmp_path / "out")]
    for script, args, what in runs:
        if script == "train_proxy.py":
            base = [a for a in base if a not in ("--proxy", world["proxy_a"])]
        else:
            base = [a for a in base if a not in ("--rounds", "2")]
        p = test_train_proxy.launch(base + args, nproc=nproc, script=script)
        assert p.returncode != 0, p.stderr[-3000:]
        lines = [line for line in p.stderr.splitlines() if what in line]
        assert len(lines) == 1 and lines[0].startswith(f"{script}: "), p.stderr[-3000:]
        assert not test_train_proxy.own_frames(p.stderr), p.stderr[-3000:]
        if nproc == 0:
            assert p.returncode == 2 and p.stderr.strip().splitlines() == lines, p.stderr[-3000:]
