"""train_proxy.py end to end on CPU: real torchrun launches (gloo, FSDP2) of a tiny random Llama on the
embedded demo data. Each run is a subprocess with a timeout, so a rank that hangs fails the test instead
of blocking the suite. The runs are module-scoped fixtures shared by the tests that inspect them.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import proxykd as pk
from model import Llama, ModelArgs
from scripts import demo_world

ROOT = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 180  # seconds per launch; a normal one takes a few
MAX_LEN = 128


def launch(args: list[str], nproc: int = 2, script: str = "train_proxy.py", env: dict | None = None,
           device: str = "cpu") -> subprocess.CompletedProcess:
    """`script` under torchrun with `nproc` ranks, or as a plain process when nproc == 0
    (test_train_student.py uses it too); `env` adds environment variables."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (torchrun if nproc else [sys.executable]) + [os.path.join(ROOT, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_in_session(cmd, env, TIMEOUT, device)


def run_in_session(cmd: list[str], env: dict, timeout: float,
                   device: str = "cpu") -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, so a timeout kills every process the command started
    (torchrun's ranks, the demo's training runs), not the command alone, leaving the rest spinning. The
    runs are on the CPU (gloo) whatever GPUs the machine has, unless `device` says otherwise
    (test_cuda.py)."""
    env = {**env, "PROXYKD_DEVICE": device}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, (f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                               f"--- stderr\n{p.stderr[-6000:]}")
    return p


def own_frames(stderr: str) -> list[str]:
    """Traceback frames in this project's own files (not torch's or the virtualenv's, wherever it sits)."""
    ours = {os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    ours |= {os.path.join(ROOT, "scripts", f) for f in os.listdir(os.path.join(ROOT, "scripts"))}
    return [line for line in stderr.splitlines() if line.strip().startswith('File "')
            and line.strip().split('"')[1] in ours]


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo teacher data (80 examples: D_w 8, D_p 36 -> 3 rounds of 12, multiples of the global batch 4,
    so no batch is wrap-padded and plans for different world sizes match), a held-out file, a small
    sentencepiece tokenizer and a tiny random base model saved in HF format (fp32)."""
    d = tmp_path_factory.mktemp("world")
    train, held_out = str(d / "teacher.jsonl"), str(d / "heldout.jsonl")
    demo_world.write_demo_jsonl(train, 80, seed=0)
    demo_world.write_demo_jsonl(held_out, 8, seed=1)
    tok_path = demo_world.train_demo_tokenizer([train], str(d / "tok"), 320)
    tok = data.Tokenizer(tok_path)
    torch.manual_seed(0)
    base = str(d / "base")
    Llama(dataclasses.replace(ModelArgs.from_name("tiny"), vocab_size=tok.vocab_size)).save_pretrained(base)
    common = ["--base", base, "--tokenizer", tok_path, "--data", train, "--eval_data", held_out,
              "--rounds", "3", "--max_len", str(MAX_LEN), "--max_new_tokens", "16", "--lr", "1e-3",
              "--eval_batch_size", "4", "--seed", "0"]
    return dict(dir=d, base=base, tok=tok_path, data=train, held_out=held_out, common=common)


# exact mode: fp32 base and greedy y_hat, so runs that batch the same examples differently stay equal
# up to float summation order; SGD, whose update is proportional to the gradient, so a wrong gradient
# scale (e.g. FSDP's divide-by-world not compensated) changes the adapter (Adam would hide it)
EXACT = ["--base_dtype", "float32", "--greedy", "--optimizer", "sgd"]


@pytest.fixture(scope="module")
def run_ws2(world):
    # 2 ranks x 1 example x 2 accumulated micro-batches: global batch 4; the paper's losses as written
    # (--loss reference: full logits, proxykd.py), where run_ws1 runs the fused heads; --keep_best
    out = str(world["dir"] / "ws2")
    ok(launch(world["common"] + EXACT + ["--batch_size", "1", "--grad_accum", "2", "--loss", "reference",
                                         "--keep_best", "--out", out]))
    return out


@pytest.fixture(scope="module")
def run_ws1(world):
    # plain `python train_proxy.py` (no torchrun): one rank, one micro-batch of 4, activation checkpointing
    # (recomputing a block must not change the result) and --deterministic (its kernels run on the CPU too)
    out = str(world["dir"] / "ws1")
    ok(launch(world["common"] + EXACT + ["--batch_size", "4", "--activation_checkpointing", "--deterministic",
                                         "--out", out], nproc=0))
    return out


# production mode: bf16 base, sampled y_hat (temperature 1); global batch 8: 1 warm-up step, 2 per round
SAMPLED = ["--batch_size", "2", "--grad_accum", "2"]


@pytest.fixture(scope="module")
def run_sampled(world):
    out = str(world["dir"] / "sampled")
    ok(launch(world["common"] + SAMPLED + ["--out", out]))
    return out


def steps_of(out: str) -> list[dict]:
    return [r for r in metrics(out) if "loss" in r]


def test_run_writes_merged_proxy_and_logs(world, run_ws2):
    """A 2-rank run logs every step, evaluates at init / after warm-up / after each round, starts each
    round's DPO exactly at its reference, and writes a merged proxy, the adapters and no leftovers."""
    recs = metrics(run_ws2)
    steps = steps_of(run_ws2)
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert {r["round"] for r in steps if r["stage"] == "align"} == {1, 2, 3}
    for key in ("nll", "dpo", "reward_margin", "reward_accuracy", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in steps if r["stage"] == "align"), key
    evals = [r for r in recs if "eval_top1_agreement" in r]
    expected = [("init", None), ("warmup", 0)] + [("align", i) for i in (1, 2, 3)]
    assert [(r["stage"], r.get("round")) for r in evals] == expected
    assert all(0 <= r["eval_top1_agreement"] <= 1 and r["eval_tokens"] > 0 for r in evals)
    # at a round start the policy IS the reference pi_p^(i-1): every pair's DPO loss is log 2 (Eq. 4)
    firsts = [next(r for r in steps if r.get("round") == i and r["stage"] == "align") for i in (1, 2, 3)]
    for r in firsts:
        assert r["dpo"] == pytest.approx(math.log(2), abs=1e-5)
        assert r["reward_margin"] == pytest.approx(0, abs=1e-5)
    # outputs: merged HF model + tokenizer, PEFT adapter, warmed-up proxy; round files cleaned up
    final = os.path.join(run_ws2, "final")
    assert os.path.exists(os.path.join(final, "tokenizer.model"))
    with open(os.path.join(final, "provenance.json")) as f:  # what train_student.py checks D_s against
        prov = json.load(f)
    assert prov["split_seed"] == 0 and prov["data_sha256"] == data.sha256_file(world["data"])
    assert (sum(prov["split_sizes"].values()) == 80
            and prov["tokenizer_sha256"] == data.Tokenizer(world["tok"]).fingerprint)
    assert os.path.exists(os.path.join(run_ws2, "adapter", "adapter_config.json"))
    assert os.path.exists(os.path.join(run_ws2, "warmup", "final", "config.json"))
    assert not os.listdir(os.path.join(run_ws2, "rounds"))
    # --keep_best: the evaluation of the lowest held-out NLL is named, and its model written beside the last
    best = next(r for r in recs if "best_step" in r)
    lowest = min(evals, key=lambda r: r["eval_nll"])
    assert (best["best_step"], best["best_eval_nll"]) == (lowest["step"], lowest["eval_nll"])
    assert os.path.exists(os.path.join(run_ws2, "best", "final", "provenance.json"))


def test_lora_trained_and_merged(world, run_ws2):
    """The adapter moved (B starts at zero; A moved during alignment) and its merged output is exactly
    base + (alpha / r) B A on the adapted linears, the base checkpoint elsewhere."""
    final, warm = (adapter(os.path.join(run_ws2, "adapter")),
                   adapter(os.path.join(run_ws2, "warmup", "adapter")))
    a_keys = sorted(k for k in final if "lora_A" in k)
    assert a_keys and len(final) == 2 * len(a_keys)
    assert all(final[k.replace("lora_A", "lora_B")].abs().max() > 0 for k in a_keys)
    assert any(not torch.equal(final[k], warm[k]) for k in final)

    base = Llama.from_pretrained(world["base"], dtype=torch.float32)
    merged = Llama.from_pretrained(os.path.join(run_ws2, "final"), dtype=torch.float32)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()
    scaling = 16.0 / 8  # the defaults lora_alpha / lora_r
    lora_of = {k.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight"): k for k in a_keys}
    for name, w in base_sd.items():
        if name in lora_of:
            ka = lora_of[name]
            delta = scaling * final[ka.replace("lora_A", "lora_B")] @ final[ka]
            torch.testing.assert_close(merged_sd[name], w + delta, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged_sd[name], w), name
    assert len(lora_of) == 7 * base.args.n_layers  # every linear of every block


def held_out_metrics(model: Llama, world) -> tuple[float, float]:
    """Brute force on one unsharded model and full logits: (per-token NLL, top-1 agreement) of the
    teacher's held-out replies."""
    tok = data.Tokenizer(world["tok"])
    encoded = [data.encode_example(tok, e, MAX_LEN) for e in data.read_jsonl(world["held_out"])]
    batch = data.collate(encoded, tok.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"]).double()
    mask = pk.response_mask(batch["labels"])
    nll = -pk.token_logps(logits, batch["labels"]).sum() / mask.sum()
    agree = ((logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask).sum() / mask.sum()
    return nll.item(), agree.item()


def test_eval_matches_base_and_merged_model(world, run_ws2):
    """The run's held-out eval (sharded, in memory) equals brute force on the base model before training
    (a fresh adapter changes nothing) and on its merged output after it. The latter also shows the
    trained weights are exactly base + adapter: no base weight moved during training."""
    evals = [r for r in metrics(run_ws2) if "eval_nll" in r]
    for rec, path in ((evals[0], world["base"]), (evals[-1], os.path.join(run_ws2, "final"))):
        nll, agree = held_out_metrics(Llama.from_pretrained(path, dtype=torch.float32), world)
        assert rec["eval_nll"] == pytest.approx(nll, rel=1e-5)
        # one argmax near-tie may resolve differently under another summation order
        assert rec["eval_top1_agreement"] == pytest.approx(agree, abs=1.5 / rec["eval_tokens"])
    assert evals[-1]["eval_nll"] != evals[0]["eval_nll"]


def test_world_size_1_matches_2(run_ws1, run_ws2):
    """Same global batch (1 rank x 4 == 2 ranks x 1 x 2 accumulated micro-batches), and the fused heads
    (run_ws1) against the paper's losses on full logits (run_ws2, --loss reference): same losses and the
    same trained adapter, up to float summation order (fp32, greedy y_hat; bf16 or sampling would
    legitimately differ). SGD: each update is lr x the gradient, so this also pins the gradient's scale
    across world sizes (a factor of 2 from FSDP's average over ranks would fail it).
    Tolerances: losses rel 1e-5, margins abs 1e-5, adapter atol 1e-6 + rtol 1e-4."""
    s1, s2 = steps_of(run_ws1), steps_of(run_ws2)
    assert [r["step"] for r in s1] == [r["step"] for r in s2]
    assert any("dpo" in r for r in s1)
    for a, b in zip(s1, s2):
        assert a.keys() == b.keys(), a["step"]  # warm-up steps log no DPO terms, round steps do
        for key in ("loss", "nll", "dpo"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        if "reward_margin" in a:
            assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-5), a["step"]
    a1, a2 = adapter(os.path.join(run_ws1, "adapter")), adapter(os.path.join(run_ws2, "adapter"))
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], rtol=1e-4, atol=1e-6)


def test_checkpoint_layout_is_the_same_at_one_and_two_ranks(run_ws1, run_ws2):
    """shard_model leaves a one-rank model plain and shards it with FSDP2 at two ranks; the checkpoints
    must not tell the two apart (the same parameter names, shapes and optimizer layout), so a run can be
    resumed at another world size."""
    def latest(out):
        d = os.path.join(out, "checkpoints")
        with open(os.path.join(d, "latest")) as f:
            return os.path.join(d, f.read().strip())

    c1, c2 = latest(run_ws1), latest(run_ws2)
    assert sorted(os.listdir(c1)) == sorted(os.listdir(c2))
    a1, a2 = adapter(c1), adapter(c2)
    assert {k: v.shape for k, v in a1.items()} == {k: v.shape for k, v in a2.items()} and a1
    o1, o2 = (torch.load(os.path.join(c, "optimizer.pt"), weights_only=False) for c in (c1, c2))
    assert [g["params"] for g in o1["param_groups"]] == [g["params"] for g in o2["param_groups"]]
    assert all(isinstance(p, str) and p.endswith((".lora_A", ".lora_B"))
               for g in o1["param_groups"] for p in g["params"])


def test_resume_matches_uninterrupted(world, run_sampled):
    """Stop inside round 1 (after its reference pass), resume: same per-step losses and the same final
    adapter as the uninterrupted run, bitwise (same world size, deterministic CPU kernels)."""
    out = str(world["dir"] / "resumed")
    round1 = [r["step"] for r in steps_of(run_sampled) if r.get("round") == 1]
    stop = round1[0]  # after round 1's reference pass and first step, before its last
    assert stop < round1[-1]
    ok(launch(world["common"] + SAMPLED + ["--out", out, "--stop_after_steps", str(stop)]))
    assert max(r["step"] for r in steps_of(out)) == stop
    assert os.listdir(os.path.join(out, "rounds"))  # the round's pairs survive for the resume
    ok(launch(world["common"] + SAMPLED + ["--out", out, "--resume"]))
    s_ref, s_res = steps_of(run_sampled), steps_of(out)
    assert [r["step"] for r in s_res] == [r["step"] for r in s_ref]
    for a, b in zip(s_ref, s_res):
        for key in ("loss", "nll", "dpo", "reward_margin", "reward_accuracy"):
            assert a.get(key) == b.get(key), (a["step"], key)
    ref, res = adapter(os.path.join(run_sampled, "adapter")), adapter(os.path.join(out, "adapter"))
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k


def same_adapter(a_dir: str, b_dir: str) -> None:
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def crash_and_resume(args: list[str], crash_at: str, script: str = "train_proxy.py") -> None:
    """Run `args` with one rank SIGKILLed at a fault-injection point (train_proxy.crash_point, spec
    "point:n:rank"), check that it died there, then rerun the same command with --resume to the end."""
    p = launch(args, script=script, env={"PROXYKD_CRASH_AT": crash_at})
    assert p.returncode != 0 and "SIGKILL" in p.stdout + p.stderr, (
        f"{crash_at}: no SIGKILL\n{p.stderr[-3000:]}")
    ok(launch(args + ["--resume"], script=script))


def test_resume_when_only_some_ranks_have_their_round_file(world, run_sampled):
    """A crash inside the round's reference pass can leave rank 0's round file written and rank 1's not.
    Resuming from the checkpoint at the round start must agree across ranks to sample again (not hang with
    one rank sampling and the other training) and end bitwise equal to the uninterrupted run."""
    out = str(world["dir"] / "half_round")
    first = max(r["step"] for r in steps_of(run_sampled) if r["stage"] == "warmup")
    ok(launch(world["common"] + SAMPLED + ["--out", out, "--stop_after_steps", str(first + 1)]))
    ckpts = os.path.join(out, "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, f"step-{first:08d}"))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write(f"step-{first:08d}")  # back to the round start
    os.remove(os.path.join(out, "rounds", "round-01-rank1-of-2.safetensors"))
    assert os.path.exists(os.path.join(out, "rounds", "round-01-rank0-of-2.safetensors"))
    ok(launch(world["common"] + SAMPLED + ["--out", out, "--resume"]))
    same_adapter(os.path.join(run_sampled, "adapter"), os.path.join(out, "adapter"))


# SAMPLED with a checkpoint after every step: 1 warm-up step, then rounds of 2 steps (steps 2-3, 4-5, 6-7)
@pytest.mark.parametrize("crash_at", [
    "step:1:1",  # during warm-up: rank 1 dies after the first update, before its checkpoint
    "sample:2:1",  # inside round 1's reference pass: rank 1 dies before its second micro-batch of samples
    "step:3:0",  # mid-round: rank 0 dies after round 1's second update (resumes inside round 1)
    "checkpoint:3:0",  # during a checkpoint write: step 3's dir is renamed into place, `latest` not yet moved
])
def test_sigkill_then_resume_matches_uninterrupted(world, run_sampled, crash_at):
    """SIGKILL one rank of a 2-rank run at a given point, rerun with --resume: the same per-step losses
    and the same final adapter, bitwise, as the uninterrupted run."""
    out = str(world["dir"] / ("crash-" + crash_at.replace(":", "-")))
    crash_and_resume(world["common"] + SAMPLED + ["--out", out, "--save_every", "1"], crash_at)
    s_ref, s_res = steps_of(run_sampled), steps_of(out)
    assert [r["step"] for r in s_res] == [r["step"] for r in s_ref]
    for a, b in zip(s_ref, s_res):
        assert (a["loss"], a["nll"], a.get("dpo")) == (b["loss"], b["nll"], b.get("dpo")), a["step"]
    same_adapter(os.path.join(run_sampled, "adapter"), os.path.join(out, "adapter"))
    assert not os.listdir(os.path.join(out, "rounds"))


def test_fresh_run_refuses_existing_checkpoints(world, run_sampled):
    # exits before any work: 1 rank will do
    p = launch(world["common"] + SAMPLED + ["--out", run_sampled], nproc=0)
    assert p.returncode != 0 and "--resume" in p.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(world):
    """An absurd lr makes the weights overflow after the first update: the run stops with a message
    naming the step, exits non-zero, applies no update from the bad step and leaves the last good
    checkpoint as `latest`."""
    out = str(world["dir"] / "nan")
    args = ["--out", out, "--lr", "1e30", "--save_every", "1", "--rounds", "0", "--batch_size", "2"]
    p = launch(world["common"] + args, nproc=0)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "non-finite loss at step 2" in p.stderr
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step-00000001"


def test_malformed_data_fails_with_file_and_line(world):
    bad = str(world["dir"] / "bad.jsonl")
    with open(world["data"]) as f:
        lines = f.readlines()[:5]
    lines[2] = '{"prompt": "unterminated\n'
    with open(bad, "w") as f:
        f.writelines(lines)
    args = world["common"] + ["--data", bad, "--out", str(world["dir"] / "bad")]
    p = launch(args)
    assert p.returncode != 0
    assert f"{bad}:3" in p.stderr


def test_no_dpo_is_nll_only_alignment(world, run_ws1):
    """--no_dpo (the "-PO" ablation): same plan, no reference pass, and every stage-2 step is Eq. 3
    alone (loss == nll). Its first round step sees the warmed-up proxy, like the DPO run's, so their NLL
    terms agree there (the DPO term adds nothing to the NLL value itself)."""
    out = str(world["dir"] / "no_dpo")
    ok(launch(world["common"] + EXACT + ["--batch_size", "4", "--no_dpo", "--out", out], nproc=0))
    recs, steps = metrics(out), steps_of(out)
    assert not any(r.get("stage") == "sample" for r in recs)
    align = [r for r in steps if r["stage"] == "align"]
    assert align and all("dpo" not in r and r["loss"] == r["nll"] for r in align)
    ref = steps_of(run_ws1)
    assert [r["step"] for r in steps] == [r["step"] for r in ref]
    first = len([r for r in ref if r["stage"] == "warmup"])
    assert steps[first]["nll"] == pytest.approx(ref[first]["nll"], rel=1e-6)
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))


def test_nll_reduction_token_is_per_token_mean(world, run_ws1):
    """--nll_reduction sequence (the default; Eq. 3 as printed: sum over a reply's tokens, mean over
    replies) vs token (sum over tokens / tokens): at the same first step, the per-reply NLL of run_ws1
    is the per-token NLL times the batch's mean reply length."""
    import train_proxy as tp

    out = str(world["dir"] / "per_token")
    ok(launch(world["common"] + EXACT + ["--batch_size", "4", "--rounds", "0", "--nll_reduction", "token",
                                          "--activation_checkpointing", "--out", out], nproc=0))
    cfg = tp.Config(batch_size=4, seed=0)
    first = data.plan_steps(data.split_indices(80, 0)["warmup"], cfg, 0, 1, range(1))[0][0]
    tok = data.Tokenizer(world["tok"])
    examples = data.read_jsonl(world["data"])
    n_resp = sum(sum(y != -100 for y in data.encode_example(tok, examples[i], MAX_LEN)["labels"])
                 for i in first)
    per_token = steps_of(out)[0]["nll"]
    assert steps_of(run_ws1)[0]["nll"] == pytest.approx(per_token * n_resp / len(first), rel=1e-5)
