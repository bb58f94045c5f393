"""Proxy-KD end to end on the embedded demo world, on CPU, in minutes; prints and writes the results table.

    pip install -r requirements.txt && python scripts/demo.py

The demo world (demo_world.py): a black-box "teacher" answers short word problems with a worked reply, its
phrasing sampled from several options, its final number always right. Every model here is a tiny
Llama (model.py); the pipeline and the two training scripts are the real ones.

  1. world     teacher data (split D_w / D_p / D_s by train_*.py), a held-out set, a validation set (model
               selection; none of its prompts in the other two), a tokenizer, and a pretraining corpus:
               the same kind of problems worked in a fixed terse style unlike the teacher's
               (demo_world.demo_base_reply), standing in for what a pretrained Llama knows.
  2. bases     full-parameter pretraining of a proxy base (larger) and a student base (smaller) on that
               corpus: both can do the arithmetic; both know the teacher's style only as a minority
               of their pretraining text (--teacher_share), so their greedy replies are in the base style.
  3. proxies   train_proxy.py: warm-up on D_w, then k rounds of NLL + DPO on D_p (Proxy-KD's proxy);
               the same with --no_dpo ("-PO"); the raw pretrained proxy stands for "-align" (the
               paper's "w/o L_Proxy": the Llama-2-70B checkpoint, never aligned).
  4. students  train_student.py on D_s, several seeds each: --alpha 0 (black-box KD: SFT on the
               teacher's text), Proxy-KD, and the ablations -PO, -align, -weights (--no_weights).
  5. eval      on held-out prompts: exact match of the final answer with greedy decoding (the reply must
               end in one of the teacher's answer forms with the right number), teacher-forced top-1
               agreement with the teacher's tokens and per-token NLL, and, because the teacher is a known
               grammar, the exact per-token KL(teacher || model) and agreement with the teacher's own
               argmax (the paper's Table 4 and Fig. 5) on the first --n_exact prompts
               (demo_world.teacher_next_token_dists).

Three studies sit behind flags (RESULTS.md), each instead of the main table:
  --regime     where Proxy-KD beats black-box KD: the default teacher and a richer one (demo_world's
               rich=True, several times its entropy), one aligned proxy each, and students trained on the
               first N examples of D_s for N in --regime_sizes (epochs scaled so every cell sees about
               |D_s| example-passes), --regime_seeds per cell, each early-stopped on the validation set;
               where Proxy-KD wins, students with w = 1 at alpha and at alpha times the mean weight;
               paired t-tests, Holm-Bonferroni over the table.
  --sweep      a proxy 8.5x the student, 3-4 step problems the small base gets wrong, |D| in
               --sweep_budgets (one proxy each), black-box KD and Proxy-KD students x --seeds.
  --dpo_sweep  the balance of Eq. 6 (NLL reduction, beta, lr) in --sweep's world at its middle budget:
               the proxy's exact KL and exact match, and its Proxy-KD students.

Outputs in --out (default demo_out/): results.md and results.json (the table, per-seed values), the
data, tokenizer, bases and every run's directory (metrics.jsonl, adapter/, final/). A rerun skips every
finished step (a crashed or interrupted demo continues where it stopped); --fresh starts over.

The demo departs from the paper's hyperparameters where toy scale needs it (all are flags): lr 2e-3
instead of 1e-5 (tiny LoRA models, a few hundred steps), k = 4 rounds instead of 16, alpha 1 instead of
100 (measured here: the larger alpha, the further the student's held-out NLL moves from the teacher's
text; the table has an alpha = 100 row), beta 0.1 as in the DPO default, fp32 bases instead of bf16
(CPU bf16 matmuls are slower, not faster). Kernels are pinned to AVX2 and the thread count to --threads so
that other x86 CPUs compute the same numbers (see below the imports).
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# demo_world, also when this file is loaded by path (the tests)
if os.path.join(ROOT, "scripts") not in sys.path:
    sys.path.append(os.path.join(ROOT, "scripts"))

# The same numbers on any x86-64 CPU with AVX2 (read before torch loads; the training runs inherit them;
# a value the user set wins). torch picks its vectorised CPU kernels (reductions, softmax, norms, Adam) by
# the CPU's widest ISA, and MKL its GEMM code path by ISA and vendor; each choice rounds differently and
# training amplifies the difference (RESULTS.md, "Which numbers hold on another CPU": AVX-512 and AVX2
# kernels gave different weights after 30 steps on the same machine). Pinning both to AVX2 removes that
# source. The demo is a CPU pipeline, GPUs or not (PROXYKD_DEVICE: ranks.init_distributed).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("MKL_CBWR", "AVX2")
os.environ.setdefault("PROXYKD_DEVICE", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import demo_world  # noqa: E402
import proxykd as pk  # noqa: E402
from model import Llama, ModelArgs, generate  # noqa: E402
from ranks import finish, init_distributed  # noqa: E402
from run import eval_batches, evaluate  # noqa: E402

# the demo's two base sizes (vocab_size is set from the tokenizer)
PROXY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=256)
STUDENT = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=176, max_seq_len=256)

STUDENTS = {  # variant -> (table label, proxy run or None, extra train_student.py flags)
    "bbkd": ("student, black-box KD (alpha 0: SFT on teacher text)", None, ["--alpha", "0"]),
    "proxykd": ("student, Proxy-KD", "proxy", []),
    "proxykd_alpha100": ("student, Proxy-KD at the paper's alpha = 100", "proxy", ["--alpha", "100"]),
    "no_po": ("student, Proxy-KD -PO (proxy aligned by NLL only)", "proxy_no_po", []),
    "no_align": ("student, Proxy-KD -align (raw pretrained proxy)", "proxy_base", []),
    "no_weights": ("student, Proxy-KD -weights (w = 1)", "proxy", ["--no_weights"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"), help="output directory")
    p.add_argument("--fresh", action="store_true",
                   help="delete --out first instead of reusing finished steps")
    p.add_argument("--n_teacher", type=int, default=3000,
                   help="teacher examples (D_w 10%%, D_p 45%%, D_s 45%%)")
    p.add_argument("--n_eval", type=int, default=500, help="held-out prompts")
    p.add_argument("--n_val", type=int, default=200,
                   help="validation prompts (model selection; none in the teacher data or the held-out set)")
    p.add_argument("--n_pretrain", type=int, default=20000, help="pretraining corpus size (base style)")
    p.add_argument("--teacher_share", type=float, default=0.2,
                   help="share of teacher-style replies in pretraining")
    p.add_argument("--pretrain_steps", type=int, default=800, help="optimizer steps of each base (batch 64)")
    p.add_argument("--rounds", type=int, default=4, help="k alignment rounds (paper: 16)")
    p.add_argument("--proxy_lr", type=float, default=2e-3)
    p.add_argument("--student_lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="KL weight of Eq. 11 (paper: 100)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    p.add_argument("--nll_reduction", default="sequence",
                   help="train_proxy.py --nll_reduction (sequence or token)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="student runs per variant (seeds 0..n-1)")
    p.add_argument("--jobs", type=int, default=2,
                   help="training runs at once (each gets threads / jobs threads)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads in all, fixed rather than the machine's core count "
                        "so results do not depend on it")
    p.add_argument("--max_new_tokens", type=int, default=160,
                   help="reply cap of the proxy's DPO samples and of the eval generations "
                        "(the longest teacher reply: 100)")
    p.add_argument("--n_exact", type=int, default=100, help="held-out prompts scored by the exact teacher KL")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the main table: the paper's regime (8x capacity gap, harder problems), "
                        "black-box KD vs Proxy-KD over teacher-data budgets")
    p.add_argument("--sweep_budgets", default="333,1000,3000",
                   help="--sweep: teacher examples |D| per point (D_s = 45%%)")
    p.add_argument("--sweep_pretrain_steps", type=int, default=800,
                   help="--sweep / --dpo_sweep: optimizer steps of each base")
    p.add_argument("--dpo_sweep", action="store_true",
                   help="instead of the main table: the Eq. 6 balance (NLL reduction, beta, lr) "
                        "of the proxy, in --sweep's world at its middle budget")
    p.add_argument("--regime", action="store_true",
                   help="instead of the main table: black-box KD vs Proxy-KD over the student's data budget, "
                        "for the default teacher and a richer one")
    p.add_argument("--regime_sizes", default="40,150,450,1350",
                   help="--regime: examples of D_s the students train on "
                        "(the first N; the largest is all of D_s)")
    p.add_argument("--regime_seeds", type=int, default=5, help="--regime: students per cell")
    p.add_argument("--nproc", type=int, default=1, help="ranks per training run (>1: torchrun, gloo)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# 1-2. the world and the pretrained bases


def make_world(a, d: str, ranges: dict | None = None, rich: bool = False) -> dict:
    """Teacher data, held-out set, validation set, pretraining corpus, tokenizer -> paths (each written
    once; the validation set after the others, so they are the same with or without it). ranges:
    demo_world.make_demo_prompts's problem sizes (None: the main world's); rich: the richer teacher."""
    ranges = ranges or {}
    paths = dict(teacher=f"{d}/teacher.jsonl", heldout=f"{d}/heldout.jsonl", pretrain=f"{d}/pretrain.jsonl",
                 tok=f"{d}/tok.model", rich=rich, validation=f"{d}/validation.jsonl")
    if not os.path.exists(paths["teacher"]):
        demo_world.write_demo_jsonl(paths["teacher"], a.n_teacher, seed=0, rich=rich, **ranges)
    if not os.path.exists(paths["heldout"]):
        demo_world.write_demo_jsonl(paths["heldout"], a.n_eval, seed=1, rich=rich, **ranges)
    if not os.path.exists(paths["pretrain"]):
        # mostly the terse base style; a minority in the teacher's own style, so the bases know its words
        # (as a pretrained Llama knows GPT-4's) without preferring its way of answering
        rng = np.random.default_rng([2, 0xBA5E])
        lines = [json.dumps({"prompt": p, "response": (demo_world.demo_teacher(p, rng, rich)
                                                       if rng.random() < a.teacher_share
                                                       else demo_world.demo_base_reply(p))}) + "\n"
                 for p in demo_world.make_demo_prompts(a.n_pretrain, seed=2, **ranges)]
        data.atomic_write(paths["pretrain"], "".join(lines))
    if not os.path.exists(paths["tok"]):
        demo_world.train_demo_tokenizer([paths["teacher"], paths["pretrain"]], paths["tok"][: -len(".model")])
    if not os.path.exists(paths["validation"]):
        # for model selection (--regime's early stopping): problems neither trained on nor reported
        taken = {e.prompt for path in (paths["teacher"], paths["heldout"]) for e in data.read_jsonl(path)}
        demo_world.write_fresh_jsonl(paths["validation"], a.n_val, seed=3, exclude=taken, rich=rich, **ranges)
    return paths


def pretrain(path: str, shape: dict, corpus: str, tok: data.Tokenizer, steps: int, seed: int) -> None:
    """Full-parameter NLL training of a fresh Llama on the base-style corpus -> path (HF format). Plain
    single-process PyTorch: this only manufactures the "pretrained checkpoint" the method starts from."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(seed)
    model = Llama(ModelArgs(**shape, vocab_size=tok.vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    encoded = [data.encode_example(tok, e, 256) for e in data.read_jsonl(corpus)]
    order = np.random.default_rng(seed).permutation(len(encoded))
    for step in tqdm(range(steps), desc=f"pretrain {os.path.basename(path)}", dynamic_ncols=True):
        # warm-up, cosine
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [order[(step * 64 + j) % len(order)] for j in range(64)]
        batch = data.collate([encoded[i] for i in idx], tok.pad_id)
        loss = pk.nll_loss(model(batch["input_ids"]), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.save_pretrained(path)
    shutil.copyfile(tok.path, os.path.join(path, "tokenizer.model"))


# ---------------------------------------------------------------------------------------------------
# 3-4. the training runs: the real scripts, as subprocesses


@dataclasses.dataclass
class Job:
    name: str
    script: str
    args: list[str]
    out: str

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.out, "final", "model.safetensors"))


def run_jobs(jobs: list[Job], a, desc: str) -> None:
    """Run the unfinished jobs, a.jobs at a time; each writes its output to <out>/log.txt. A failed job
    stops the demo with the tail of its log."""
    todo = [j for j in jobs if not j.done]
    threads = max(1, a.threads // max(1, a.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    def one(job: Job) -> tuple[Job, int, float]:
        if job.done:  # finished meanwhile (by another demo command sharing this run)
            return job, 0, 0.0
        if os.path.isdir(job.out):  # an unfinished run: start it over (its checkpoints may be mid-stage)
            shutil.rmtree(job.out)
        os.makedirs(job.out)
        launcher = [sys.executable]
        if a.nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
        t0 = time.time()
        with open(os.path.join(job.out, "log.txt"), "w") as log:
            rc = subprocess.run(launcher + [os.path.join(ROOT, job.script), *job.args, "--out", job.out],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        return job, rc, time.time() - t0

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool, \
            tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar:
        for job, rc, dt in pool.map(one, todo):
            bar.update(1)
            bar.write(f"  {job.name}: {dt:.0f} s")
            if rc != 0:
                with open(os.path.join(job.out, "log.txt")) as f:
                    tail = f.read()[-3000:]
                sys.exit(f"{job.name} failed (exit {rc}); log {job.out}/log.txt:\n{tail}")


def proxy_args(a, w: dict, base: str, teacher: str, lr: float, beta: float, nll_reduction: str) -> list[str]:
    return ["--base", base, "--tokenizer", w["tok"], "--data", teacher, "--eval_data", w["heldout"],
            "--rounds", str(a.rounds), "--lr", str(lr), "--beta", str(beta), "--nll_reduction", nll_reduction,
            "--batch_size", str(a.batch_size), "--max_len", "256", "--max_new_tokens", str(a.max_new_tokens),
            "--base_dtype", "float32", "--eval_batch_size", "64", "--save_every", "0", "--log_every", "10"]


def proxy_jobs(a, w: dict, bases: dict, out: str) -> list[Job]:
    args = proxy_args(a, w, bases["proxy"], w["teacher"], a.proxy_lr, a.beta, a.nll_reduction)
    return [Job("proxy", "train_proxy.py", args, f"{out}/proxy"),
            Job("proxy_no_po", "train_proxy.py", args + ["--no_dpo"], f"{out}/proxy_no_po")]


def student_job(a, w: dict, base: str, teacher: str, proxy: str | None, cache: str | None, seed: int,
                extra: list[str], name: str, out: str, eval_data: str = "") -> Job:
    args = ["--base", base, "--tokenizer", w["tok"], "--data", teacher,
            "--eval_data", eval_data or w["heldout"],
            "--lr", str(a.student_lr), "--alpha", str(a.alpha), "--batch_size", str(a.batch_size),
            "--max_len", "256", "--base_dtype", "float32", "--eval_batch_size", "64", "--save_every", "0",
            "--log_every", "10", "--seed", str(seed)]
    if proxy:  # one cache per proxy, shared by seeds and variants (it does not depend on either)
        args += ["--proxy", proxy, "--cache_dir", cache, "--proxy_dtype", "float32"]
    return Job(name, "train_student.py", args + extra, out)


def student_jobs(a, w: dict, bases: dict, out: str) -> list[Job]:
    proxies = {"proxy": f"{out}/proxy/final", "proxy_no_po": f"{out}/proxy_no_po/final",
               "proxy_base": bases["proxy"]}
    return [student_job(a, w, bases["student"], w["teacher"], proxy and proxies[proxy],
                        proxy and f"{out}/cache_{proxy}", seed, extra, f"{variant}_seed{seed}",
                        f"{out}/students/{variant}_seed{seed}")
            for seed in range(a.seeds) for variant, (_, proxy, extra) in STUDENTS.items()]


def run_students(jobs: list[Job], a, desc: str) -> None:
    """One run per proxy cache first (they build the caches, which the others then share), then the rest."""
    firsts = {}
    for j in jobs:
        cache = j.args[j.args.index("--cache_dir") + 1] if "--cache_dir" in j.args else None
        firsts.setdefault(cache, j)
    run_jobs([j for c, j in firsts.items() if c is not None], a, f"{desc} (building caches)")
    run_jobs(jobs, a, desc)


# ---------------------------------------------------------------------------------------------------
# 5. evaluation


def exact_teacher(w: dict, tok: data.Tokenizer, n: int) -> dict:
    """The teacher's exact next-token distributions on the teacher's replies to the first n held-out
    prompts (demo_world.teacher_next_token_dists) -> dict(batch: collate dict, rows (N,) and cols (N,):
    where each response token's prediction sits in the (B, T - 1) shifted grid, probs (N, V) fp64: the
    teacher's distribution there, entropy and branching: demo_world.teacher_entropy of them, n_positions
    N and n_branching: how many of them have more than one possible token)."""
    held_out = data.read_jsonl(w["heldout"])[:n]
    encoded, rows, cols, dists = [], [], [], []
    for b, e in enumerate(held_out):
        enc = data.encode_example(tok, e, 256)
        d = demo_world.teacher_next_token_dists(tok, e.prompt, e.response, w.get("rich", False))
        # logits at t-1 predict t
        pos = [t - 1 for t, y in enumerate(enc["labels"]) if y != data.IGNORE_INDEX]
        assert len(pos) == len(d), "a truncated held-out reply"
        encoded.append(enc)
        rows += [b] * len(pos)
        cols += pos
        dists += d
    probs = torch.zeros(len(dists), tok.vocab_size, dtype=torch.float64)
    for i, d in enumerate(dists):
        probs[i, list(d)] = torch.tensor(list(d.values()), dtype=torch.float64)
    entropy, branching = demo_world.teacher_entropy(dists)
    return dict(batch=data.collate(encoded, tok.pad_id), rows=torch.tensor(rows), cols=torch.tensor(cols),
                probs=probs, entropy=entropy, branching=branching, n_positions=len(dists),
                n_branching=sum(len(d) > 1 for d in dists))


def exact_metrics(model, ex: dict, device) -> dict:
    """kl: mean over response tokens of KL(teacher || model) of the next-token distributions, exact (the
    paper's Table 4 quantity, which it could only estimate); teacher_top1: fraction of those positions
    where the model's argmax is (one of) the teacher's most likely next token(s) (the paper's Fig. 5)."""
    logits = model(ex["batch"]["input_ids"].to(device)).cpu()  # (B, T, V)
    logq = torch.log_softmax(logits[ex["rows"], ex["cols"]].double(), -1)  # (N, V)
    p = ex["probs"]
    kl = (torch.xlogy(p, p) - torch.where(p > 0, p * logq, torch.zeros_like(p))).sum(-1)  # 0 log 0 = 0
    best = p.max(-1, keepdim=True).values
    # ties: any of the teacher's argmaxes
    agree = p.gather(-1, logq.argmax(-1, keepdim=True)) >= best * (1 - 1e-9)
    return dict(kl=float(kl.mean()), teacher_top1=float(agree.double().mean()))


@torch.no_grad()
def eval_model(path: str, w: dict, tok: data.Tokenizer, device, ex: dict) -> dict:
    """Held-out metrics of an HF-format model dir: exact_match (greedy reply's final answer in a
    teacher answer form == the true answer), top1_agreement and nll (teacher-forced on the teacher's
    replies, train_proxy.evaluate), kl and teacher_top1 against the teacher's exact distributions
    (exact_metrics on exact_teacher's prompts)."""
    model = Llama.from_pretrained(path, dtype=torch.float32).to(device).eval()
    held_out = data.read_jsonl(w["heldout"])
    encoded = [data.encode_example(tok, e, 256) for e in held_out]
    tf = evaluate(model, eval_batches(encoded, 100, 0, 1, tok.pad_id), device)
    correct = anyform = 0
    for s in range(0, len(held_out), 250):
        chunk = held_out[s : s + 250]
        replies = generate(model, [data.encode_prompt(tok, e.system, e.prompt) for e in chunk], 160,
                           tok.eos_id, tok.pad_id, greedy=True)
        for r, e in zip(replies, chunk):
            text, truth = tok.decode(r), demo_world.reference_answer(e.prompt)
            correct += demo_world.extract_answer(text) == truth
            anyform += (demo_world.extract_answer(text) or _base_answer(text)) == truth
    n_params = sum(p.numel() for p in model.parameters())
    return dict(exact_match=correct / len(held_out), any_form=anyform / len(held_out),
                top1_agreement=tf["top1_agreement"], nll=tf["nll"], params=n_params,
                **exact_metrics(model, ex, device))


def _base_answer(text: str) -> str | None:
    """The final number of a base-style reply ("... Total: 8 apples."), for the any-form accuracy."""
    hits = re.findall(r"Total: (-?\d+)", text)
    return str(int(hits[-1])) if hits else None


def teacher_row(w: dict) -> dict:
    """The black box itself: its held-out replies scored by the same exact-match check."""
    held_out = data.read_jsonl(w["heldout"])
    em = np.mean([demo_world.extract_answer(e.response) == demo_world.reference_answer(e.prompt)
                  for e in held_out])
    return dict(exact_match=float(em), any_form=float(em), top1_agreement=None, nll=None, params=None, kl=0.0,
                teacher_top1=1.0)


def fmt(x, spread=None, pct=True) -> str:
    if x is None:
        return "-"
    s = f"{100 * x:.1f}" if pct else f"{x:.3f}"
    if spread is not None:
        s += f" ± {100 * spread:.1f}" if pct else f" ± {spread:.3f}"
    return s


def summarise(rows: dict, seeds: int, n_eval: int, n_exact: int) -> tuple[str, dict]:
    """rows: label -> list of per-run metric dicts -> (markdown table, JSON-able dict)."""
    lines = ["| model | params | exact match % | right answer, any form % | top-1 agreement % | held-out NLL "
             "| exact KL(teacher ‖ model) / token | top-1 = teacher's argmax % | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out = {}
    for label, runs in rows.items():
        agg = {k: mean_std(runs, k)
               for k in ("exact_match", "any_form", "top1_agreement", "nll", "kl", "teacher_top1")}
        out[label] = dict(runs=runs, **{k: dict(mean=m, std=s) for k, (m, s) in agg.items()})
        params = runs[0]["params"]
        lines.append(f"| {label} | {params if params else '-'} | {fmt(*agg['exact_match'])} | "
                     f"{fmt(*agg['any_form'])} | {fmt(*agg['top1_agreement'])} | "
                     f"{fmt(*agg['nll'], pct=False)} | {fmt(*agg['kl'], pct=False)} | "
                     f"{fmt(*agg['teacher_top1'])} | {len(runs)} |")
    lines.append("")
    lines.append(f"Held-out: {n_eval} prompts (exact KL and teacher's-argmax agreement: the first {n_exact}, "
                 f"from the teacher's exact next-token distributions). Student rows: mean ± std over "
                 f"{seeds} seeds (LoRA init and batch order; same proxy and cache). One run's exact match on "
                 f"{n_eval} prompts has a binomial standard error of about "
                 f"{100 * math.sqrt(0.25 / n_eval):.1f} points at 50%.")
    return "\n".join(lines), out


def mean_std(runs: list[dict], k: str) -> tuple:
    vals = [r[k] for r in runs if r.get(k) is not None]
    return ((float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None) if vals
            else (None, None))


# ---------------------------------------------------------------------------------------------------
# paired statistics: the arms of a study share their seeds (LoRA init and batch order), so a difference
# is taken seed by seed and tested by the paired t-test


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df (integer >= 1) degrees of freedom. Closed forms in theta =
    atan(|t| / sqrt(df)) (Abramowitz & Stegun 26.7.3-4): P(|T| < |t|) is 2/pi (theta + sin cos (1 +
    2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))) for odd df, sin (1 + 1/2 cos^2 + 1*3/(2*4)
    cos^4 + ... up to cos^(df-2)) for even df."""
    if df < 1 or df != int(df):
        raise ValueError(f"df must be a positive integer, got {df}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, series, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:
        for j in range(1, (df - 1) // 2):
            term *= 2 * j / (2 * j + 1) * c2
            series += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:
        for j in range(1, df // 2):
            term *= (2 * j - 1) / (2 * j) * c2
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def paired(runs: list[dict], ref: list[dict], k: str) -> dict:
    """runs[i][k] - ref[i][k] over the seeds i the two lists share (same order) -> n, mean, se (standard
    error of the mean difference), t = mean / se, df = n - 1 and p (two-sided paired t-test); se, t, df
    and p are None under two seeds. All-equal differences: p 1 when they are 0, else 0."""
    diffs = [r[k] - q[k] for r, q in zip(runs, ref) if r.get(k) is not None and q.get(k) is not None]
    n = len(diffs)
    out = dict(n=n, mean=float(np.mean(diffs)) if diffs else None, se=None, t=None, df=None, p=None)
    if n >= 2:
        se = float(np.std(diffs, ddof=1)) / math.sqrt(n)
        t = out["mean"] / se if se > 0 else (math.inf if out["mean"] else 0.0)
        out.update(se=se, t=t, df=n - 1, p=t_two_sided_p(t, n - 1))
    return out


def holm(pvalues: dict, level: float = 0.05) -> set:
    """Holm-Bonferroni over the m comparisons with a p-value: the keys whose test rejects, the family-wise
    error rate held at `level`. Sorted by p, the i-th smallest (i from 0) is rejected while every p up
    to it is at most level / (m - i)."""
    ranked = sorted((p, i, key) for i, (key, p) in enumerate(pvalues.items()) if p is not None)
    out = set()
    for i, (p, _, key) in enumerate(ranked):
        if p > level / (len(ranked) - i):
            break
        out.add(key)
    return out


def fmt_paired(d: dict, pct: bool = True, star: bool = False) -> str:
    """A paired difference: mean ± se (t, p), starred where its test rejects; under two seeds the mean."""
    if d["mean"] is None:
        return "-"
    if d["se"] is None:
        return fmt(d["mean"], pct=pct)
    t = "∞" if math.isinf(d["t"]) else f"{d['t']:.1f}"
    p = "p < 0.001" if d["p"] < 0.001 else f"p {d['p']:.3f}"
    return fmt(d["mean"], d["se"], pct=pct) + f" (t {t}, {p})" + (" *" if star else "")


def paired_footer(what: str, seeds: int, comps: dict, family: str) -> str:
    """The table footer's account of its Δ columns and their test (comps: the table's paired() results)."""
    if seeds < 2:
        return f"Δ = {what}; one seed: no standard error, no test, no star."
    m = sum(d["p"] is not None for d in comps.values())
    df = f"{seeds - 1} degree" + "s" * (seeds > 2)
    return (f"Δ = {what}: the mean over seeds of the per-seed difference (the arms share each seed's LoRA "
            f"init and batch order) ± its standard error; t = Δ / se on {df} of freedom, p two-sided; * "
            f"where the paired t-test rejects at 5% after Holm-Bonferroni over the table's {m} comparisons "
            f"({family}).")


def exact_kl_footer(n_exact: int) -> str:
    return (f"Exact KL is averaged over the teacher's sampled replies to the first {n_exact} held-out "
            f"prompts, the same replies for every model: the seed spread, the se and the tests do not "
            f"include the sampling error of those replies (nor, for any metric, that of the held-out "
            f"prompts).")


def evaluate_all(models: dict, w: dict, tok: data.Tokenizer, device, a, evals_path: str) -> dict:
    """label -> [model dirs] -> label -> [metric dicts]; each model evaluated once (cached in evals_path)."""
    cached = json.load(open(evals_path)) if os.path.exists(evals_path) else {}
    ex = None
    rows = {}
    for label, paths in tqdm(models.items(), desc="eval", dynamic_ncols=True):
        for p in paths:
            if p not in cached or "kl" not in cached[p]:
                ex = ex or exact_teacher(w, tok, a.n_exact)
                cached[p] = eval_model(p, w, tok, device, ex)
                data.atomic_write(evals_path, json.dumps(cached, indent=1))
        rows[label] = [cached[p] for p in paths]
    return rows


def write_results(out: str, name: str, header: str, table: str, payload: dict) -> None:
    data.atomic_write(f"{out}/{name}.md", header + "\n" + table + "\n")
    data.atomic_write(f"{out}/{name}.json", json.dumps(payload, indent=1).encode())
    print("\n" + header + "\n" + table + f"\n\nwritten: {out}/{name}.md, {out}/{name}.json", flush=True)


def prepare_main(a, out: str) -> tuple:
    """Steps 1-2 of the main pipeline (each skipped when done) -> (world paths, tokenizer, base dirs)."""
    print("1. world: teacher data, held-out set, pretraining corpus, tokenizer", flush=True)
    w = make_world(a, f"{out}/data")
    tok = data.Tokenizer(w["tok"])
    print("2. bases: pretraining the proxy base (larger) and the student base (smaller)", flush=True)
    bases = {"proxy": f"{out}/bases/proxy", "student": f"{out}/bases/student"}
    pretrain(bases["proxy"], PROXY, w["pretrain"], tok, a.pretrain_steps, seed=0)
    pretrain(bases["student"], STUDENT, w["pretrain"], tok, a.pretrain_steps, seed=1)
    return w, tok, bases


def run_main(a, out: str, device, t0: float) -> None:
    w, tok, bases = prepare_main(a, out)
    print(f"3. proxies: warm-up + {a.rounds} rounds of NLL + DPO, and NLL only (-PO)  "
          f"[{time.time() - t0:.0f} s]", flush=True)
    run_jobs(proxy_jobs(a, w, bases, out), a, "proxies")
    print(f"4. students: {len(STUDENTS)} variants x {a.seeds} seeds  [{time.time() - t0:.0f} s]", flush=True)
    run_students(student_jobs(a, w, bases, out), a, "students")

    print(f"5. eval: greedy exact match and teacher-forced agreement on {a.n_eval} held-out prompts, "
          f"exact teacher KL on {a.n_exact}  [{time.time() - t0:.0f} s]", flush=True)
    models = {"proxy base (pretrained; the -align proxy)": [bases["proxy"]],
              "proxy after warm-up on D_w only": [f"{out}/proxy/warmup/final"],
              "proxy aligned by NLL only on D_p (-PO)": [f"{out}/proxy_no_po/final"],
              "proxy aligned: warm-up + NLL + DPO rounds (Proxy-KD)": [f"{out}/proxy/final"],
              "student base (pretrained)": [bases["student"]]}
    for variant, (label, _, _) in STUDENTS.items():
        models[label] = [f"{out}/students/{variant}_seed{s}/final" for s in range(a.seeds)]
    rows = {"teacher (black box)": [teacher_row(w)],
            **evaluate_all(models, w, tok, device, a, f"{out}/evals.json")}
    table, summary = summarise(rows, a.seeds, a.n_eval, a.n_exact)
    minutes = (time.time() - t0) / 60
    header = (f"Proxy-KD demo ({a.n_teacher} teacher examples, k = {a.rounds} rounds, alpha = {a.alpha}, "
              f"{a.threads} CPU threads, {minutes:.1f} min)\n")
    write_results(out, "results", header, table, {"args": vars(a), "minutes": minutes, "rows": summary})


# ---------------------------------------------------------------------------------------------------
# --sweep: the paper's regime. A proxy 8.5x the student (0.45M against 0.05M parameters; the paper: 70B
# against 7B), longer chains than the main world's (3-4 steps, same numbers), where the small base errs,
# and the teacher-data budget varied: |D| examples, of which the student's D_s is 45% (train_*.py's split).

SWEEP_RANGES = dict(steps=(3, 4), start=(2, 20), k=(1, 9))
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, max_seq_len=256)


def sweep_world(a, d: str) -> tuple:
    """--sweep's world, teacher sets (each smaller D is the first n examples of the largest) and bases."""
    budgets = sorted(int(b) for b in a.sweep_budgets.split(","))
    a.n_teacher = max(budgets)
    print(f"sweep 1. world: {SWEEP_RANGES}, |D| in {budgets}", flush=True)
    w = make_world(a, f"{d}/data", SWEEP_RANGES)
    tok = data.Tokenizer(w["tok"])
    teachers = {}
    for n in budgets:
        teachers[n] = f"{d}/data/teacher_{n}.jsonl"
        if not os.path.exists(teachers[n]):
            with open(w["teacher"]) as f:
                data.atomic_write(teachers[n], "".join(f.readlines()[:n]))
    print("sweep 2. bases: proxy (dim 128) and student (dim 32)", flush=True)
    bases = {"proxy": f"{d}/bases/proxy", "student": f"{d}/bases/student"}
    pretrain(bases["proxy"], PROXY, w["pretrain"], tok, a.sweep_pretrain_steps, seed=0)
    pretrain(bases["student"], TINY, w["pretrain"], tok, a.sweep_pretrain_steps, seed=1)
    return budgets, w, tok, teachers, bases


def run_sweep(a, out: str, device, t0: float) -> None:
    d = f"{out}/sweep"
    budgets, w, tok, teachers, bases = sweep_world(a, d)
    print(f"sweep 3. one proxy per budget  [{time.time() - t0:.0f} s]", flush=True)
    run_jobs([Job(f"proxy_n{n}", "train_proxy.py",
                  proxy_args(a, w, bases["proxy"], teachers[n], a.proxy_lr, a.beta, a.nll_reduction),
                  f"{d}/n{n}/proxy") for n in budgets],
             a, "sweep proxies")
    print(f"sweep 4. students: black-box KD and Proxy-KD x {a.seeds} seeds per budget  "
          f"[{time.time() - t0:.0f} s]", flush=True)
    jobs = []
    for n in budgets:
        for s in range(a.seeds):
            jobs.append(student_job(a, w, bases["student"], teachers[n], None, None, s, ["--alpha", "0"],
                                    f"bbkd_n{n}_seed{s}", f"{d}/n{n}/students/bbkd_seed{s}"))
            jobs.append(student_job(a, w, bases["student"], teachers[n], f"{d}/n{n}/proxy/final",
                                    f"{d}/n{n}/cache", s, [], f"proxykd_n{n}_seed{s}",
                                    f"{d}/n{n}/students/proxykd_seed{s}"))
    run_students(jobs, a, "sweep students")
    print(f"sweep 5. eval  [{time.time() - t0:.0f} s]", flush=True)
    models = {"proxy base": [bases["proxy"]], "student base": [bases["student"]]}
    for n in budgets:
        models[f"proxy n{n}"] = [f"{d}/n{n}/proxy/final"]
        for v in ("bbkd", "proxykd"):
            models[f"{v} n{n}"] = [f"{d}/n{n}/students/{v}_seed{s}/final" for s in range(a.seeds)]
    rows = evaluate_all(models, w, tok, device, a, f"{d}/evals.json")

    comps = {(n, k): paired(rows[f"proxykd n{n}"], rows[f"bbkd n{n}"], k)
             for n in budgets for k in ("exact_match", "kl")}
    stars = holm({key: d["p"] for key, d in comps.items()})
    ex = exact_teacher(w, tok, a.n_exact)

    def cell(label, k, pct=True):
        return fmt(*mean_std(rows[label], k), pct=pct)

    def diff(k, n, pct=True):  # Proxy-KD minus black-box KD, seed by seed
        return fmt_paired(comps[n, k], pct, (n, k) in stars)

    lines = [f"Teacher: entropy {ex['entropy']:.3f} nat per token; {ex['n_branching']:,} of "
             f"{ex['n_positions']:,} positions ({fmt(ex['branching'])}%) branch, on its replies to the first "
             f"{a.n_exact} held-out prompts.", ""]
    lines += ["| model | params | exact match % | any form % | exact KL / token | top-1 = teacher's argmax % "
              "|", "|---|---:|---:|---:|---:|---:|"]
    for label in ("proxy base", "student base"):
        r = rows[label][0]
        lines.append(f"| {label} (pretrained) | {r['params']} | {fmt(r['exact_match'])} | "
                     f"{fmt(r['any_form'])} | {fmt(r['kl'], pct=False)} | {fmt(r['teacher_top1'])} |")
    lines += ["", "| \\|D\\| | \\|D_s\\| | proxy EM % | proxy KL | black-box KD EM % | "
              "Proxy-KD EM % | Δ EM | black-box KD KL | Proxy-KD KL | Δ KL | black-box KD any form % | "
              "Proxy-KD any form % |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in budgets:
        n_s = len(data.split_indices(n, 0)["student"])
        lines.append(f"| {n} | {n_s} | {cell(f'proxy n{n}', 'exact_match')} | "
                     f"{cell(f'proxy n{n}', 'kl', False)} | {cell(f'bbkd n{n}', 'exact_match')} | "
                     f"{cell(f'proxykd n{n}', 'exact_match')} | {diff('exact_match', n)} | "
                     f"{cell(f'bbkd n{n}', 'kl', False)} | {cell(f'proxykd n{n}', 'kl', False)} | "
                     f"{diff('kl', n, False)} | {cell(f'bbkd n{n}', 'any_form')} | "
                     f"{cell(f'proxykd n{n}', 'any_form')} |")
    test = paired_footer("Proxy-KD minus black-box KD", a.seeds, comps, "exact match and exact KL per budget")
    lines += ["", f"Held-out: {a.n_eval} prompts (exact KL: the first {a.n_exact}). Students: mean ± std "
              f"over {a.seeds} seeds. {test} {exact_kl_footer(a.n_exact)}"]
    minutes = (time.time() - t0) / 60
    header = (f"Proxy-KD demo --sweep ({SWEEP_RANGES}, k = {a.rounds}, alpha = {a.alpha}, "
              f"{a.threads} CPU threads, {minutes:.1f} min)\n")
    teacher = {k: ex[k] for k in ("entropy", "branching", "n_branching", "n_positions")}
    comparisons = [dict(budget=n, metric=k, star=(n, k) in stars, **d) for (n, k), d in comps.items()]
    write_results(d, "results", header, "\n".join(lines), {"args": vars(a), "minutes": minutes,
                                                           "teacher": teacher, "comparisons": comparisons,
                                                           "rows": rows})


# ---------------------------------------------------------------------------------------------------
# --dpo_sweep: the balance of Eq. 6, in --sweep's world at its middle budget. name -> (Eq. 3 reduction,
# beta, lr, --no_dpo); the second is --sweep's own proxy at that budget (the defaults), reused.

DPO_CONFIGS = {
    "NLL only (-PO), lr 2e-3": ("sequence", 0.1, 2e-3, True),
    "sequence NLL + DPO, beta 0.1, lr 2e-3 (default)": ("sequence", 0.1, 2e-3, False),
    "sequence NLL + DPO, beta 1, lr 2e-3": ("sequence", 1.0, 2e-3, False),
    "token NLL + DPO, beta 0.1, lr 2e-3": ("token", 0.1, 2e-3, False),
    "NLL only (-PO), lr 5e-4": ("sequence", 0.1, 5e-4, True),
    "token NLL + DPO, beta 0.1, lr 5e-4": ("token", 0.1, 5e-4, False),
}
DPO_SEEDS = 2


def run_dpo_sweep(a, out: str, device, t0: float) -> None:
    budgets, w, tok, teachers, bases = sweep_world(a, f"{out}/sweep")
    n = budgets[len(budgets) // 2]
    d = f"{out}/sweep/dpo_n{n}"
    dirs, jobs = {}, []
    for i, (name, (red, beta, lr, no_dpo)) in enumerate(DPO_CONFIGS.items()):
        args = proxy_args(a, w, bases["proxy"], teachers[n], lr, beta, red) + ["--no_dpo"] * no_dpo
        dirs[name] = (f"{out}/sweep/n{n}/proxy" if args == proxy_args(a, w, bases["proxy"], teachers[n],
                                                                       a.proxy_lr, a.beta, a.nll_reduction)
                      else f"{d}/c{i}")
        jobs.append(Job(f"dpo_c{i}", "train_proxy.py", args, dirs[name]))
    print(f"dpo sweep 3. {len(jobs)} proxies on |D| = {n}  [{time.time() - t0:.0f} s]", flush=True)
    # --sweep's own proxy last
    run_jobs(sorted(jobs, key=lambda j: not j.out.startswith(d)), a, "dpo proxies")
    students = {name: [f"{d}/students_c{i}_seed{s}" for s in range(DPO_SEEDS)]
                for i, name in enumerate(DPO_CONFIGS)}
    jobs = [student_job(a, w, bases["student"], teachers[n], f"{dirs[name]}/final", f"{d}/cache_c{i}", s, [],
                        os.path.basename(sd), sd)
            for i, name in enumerate(DPO_CONFIGS) for s, sd in enumerate(students[name])]
    print(f"dpo sweep 4. Proxy-KD students, {DPO_SEEDS} seeds per proxy  [{time.time() - t0:.0f} s]",
          flush=True)
    run_students(jobs, a, "dpo students")
    warmups = {"proxy after warm-up only, lr 2e-3": f"{dirs[list(DPO_CONFIGS)[0]]}/warmup/final",
               "proxy after warm-up only, lr 5e-4": f"{dirs[list(DPO_CONFIGS)[4]]}/warmup/final"}
    models = {"proxy base": [bases["proxy"]], **{k: [v] for k, v in warmups.items()}}
    for name, p in dirs.items():
        models[f"proxy: {name}"] = [f"{p}/final"]
        models[f"student: {name}"] = [f"{sd}/final" for sd in students[name]]
    rows = evaluate_all(models, w, tok, device, a, f"{d}/evals.json")
    lines = ["| Eq. 6 setting | proxy EM % | proxy exact KL | proxy top-1 = teacher's argmax % | "
             f"proxy held-out NLL | Proxy-KD student EM % ({DPO_SEEDS} seeds) | student exact KL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ["proxy base", *warmups, *DPO_CONFIGS]:
        p, s = rows.get(f"proxy: {name}", rows.get(name)), rows.get(f"student: {name}", [])
        lines.append(f"| {name} | {fmt(*mean_std(p, 'exact_match'))} | "
                     f"{fmt(*mean_std(p, 'kl'), pct=False)} | "
                     f"{fmt(*mean_std(p, 'teacher_top1'))} | {fmt(*mean_std(p, 'nll'), pct=False)} | "
                     f"{fmt(*mean_std(s, 'exact_match'))} | {fmt(*mean_std(s, 'kl'), pct=False)} |")
    lines += ["", f"|D| = {n} (D_w {len(data.split_indices(n, 0)['warmup'])}, "
              f"D_p {len(data.split_indices(n, 0)['proxy'])}); "
              f"held-out: {a.n_eval} prompts (exact KL: the first {a.n_exact}). "
              f"Student: mean ± std over {DPO_SEEDS} seeds."]
    minutes = (time.time() - t0) / 60
    header = (f"Proxy-KD demo --dpo_sweep ({SWEEP_RANGES}, |D| = {n}, k = {a.rounds}, "
              f"{a.threads} CPU threads, {minutes:.1f} min)\n")
    write_results(d, "results", header, "\n".join(lines), {"args": vars(a), "minutes": minutes, "rows": rows})


# ---------------------------------------------------------------------------------------------------
# --regime: where Proxy-KD beats black-box KD. Two teachers (the default and demo_world's rich one, about
# three times the entropy per token), each with its own world, bases and one proxy aligned as the pipeline
# does; then students of the main world's size on the first N examples of D_s, each early-stopped on its
# world's validation set. The proxy, its cache and the Eq. 9 moments stay those of the full D_s
# (train_student.py --max_examples).

REGIME_ARMS = {  # arm -> (table label, uses the proxy, extra train_student.py flags)
    "bbkd": ("black-box KD", False, ["--alpha", "0"]),
    "proxykd": ("Proxy-KD", True, []),
    "no_weights": ("Proxy-KD -weights (w = 1)", True, ["--no_weights"]),
    # w = 1 at alpha times the mean weight: the KL term weighs about what Proxy-KD's weighs in total, so
    # against -weights (which doubles it) it separates which examples Eq. 9 weighs from how much
    "scaled": ("Proxy-KD w = 1, alpha x mean w", True, ["--no_weights"]),
}
REGIME_REFERENCE = {"proxykd": "bbkd", "no_weights": "proxykd", "scaled": "proxykd"}  # what each Δ subtracts
REGIME_METRICS = (("exact_match", "EM %", True), ("kl", "exact KL", False), ("nll", "NLL", False))
REGIME_MIN_EVALS = 10  # a run evaluated only per epoch would have 2 evaluations at N = |D_s| (one epoch)


def regime_world(a, out: str, rich: bool) -> dict:
    """One teacher's world, bases and aligned proxy: the main pipeline's (shared with it) for the default
    teacher, a world of its own under out/regime/rich for the rich one."""
    root = f"{out}/regime/rich" if rich else out
    if rich:
        print("regime: the rich teacher's world and bases", flush=True)
        w = make_world(a, f"{root}/data", rich=True)
        tok = data.Tokenizer(w["tok"])
        bases = {"proxy": f"{root}/bases/proxy", "student": f"{root}/bases/student"}
        pretrain(bases["proxy"], PROXY, w["pretrain"], tok, a.pretrain_steps, seed=0)
        pretrain(bases["student"], STUDENT, w["pretrain"], tok, a.pretrain_steps, seed=1)
    else:
        w, tok, bases = prepare_main(a, out)
    return dict(w=w, tok=tok, bases=bases, root=root, proxy=proxy_jobs(a, w, bases, root)[0])


def regime_schedule(a, n: int, n_s: int) -> tuple[int, int, int]:
    """A cell's (epochs, optimizer steps per epoch, first evaluation interval): epochs scaled so every
    cell sees about |D_s| example-passes; an evaluation at least once per epoch and about
    REGIME_MIN_EVALS times per run."""
    epochs = max(1, round(n_s / n))
    per_epoch = math.ceil(n / (a.batch_size * a.nproc))
    return epochs, per_epoch, max(1, min(per_epoch, per_epoch * epochs // REGIME_MIN_EVALS))


def regime_job(a, world: dict, arm: str, n: int, n_s: int, every: int, seed: int) -> Job:
    """One student of a cell: trained on the first n examples of D_s, evaluated on the validation set at
    step 0, every `every` steps and at the end, keeping the best evaluation's model in <out>/best/."""
    _, uses_proxy, extra = REGIME_ARMS[arm]
    if arm == "scaled":
        extra = extra + ["--alpha", str(a.alpha * world["w_mean"])]
    flags = extra + ["--max_examples", str(n), "--epochs", str(regime_schedule(a, n, n_s)[0]), "--keep_best",
                     "--eval_every", str(every)]
    name, root = f"{arm}_n{n}_every{every}_seed{seed}", world["root"]
    return student_job(a, world["w"], world["bases"]["student"], world["w"]["teacher"],
                       f"{world['proxy'].out}/final" if uses_proxy else None,
                       f"{root}/cache_proxy" if uses_proxy else None, seed, flags, name,
                       f"{root}/regime_students/{name}", eval_data=world["w"]["validation"])


def kept_eval(run_dir: str) -> dict:
    """What a --keep_best run kept, from its metrics.jsonl: best_step, best_eval_nll, last_step and
    eval_steps (the steps of its validation evaluations, in order)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    best = [r for r in records if "best_step" in r][-1]
    return dict(best_step=best["best_step"], best_eval_nll=best["best_eval_nll"], last_step=best["step"],
                eval_steps=[r["step"] for r in records if "eval_nll" in r])


def kept_too_early(kept: dict) -> bool:
    """The run kept its first or second evaluation (the untrained base, or one interval in): its lr is too
    high for the selection to be judged at that interval."""
    return kept["best_step"] in kept["eval_steps"][:2]


def kept_model(run_dir: str) -> str:
    """The kept model's directory; the last step's when that is the one kept (the same weights)."""
    kept = kept_eval(run_dir)
    return f"{run_dir}/final" if kept["best_step"] == kept["last_step"] else f"{run_dir}/best/final"


def weights_mean(run_dir: str) -> float:
    """Eq. 9's mean weight over D_s, from a Proxy-KD run's metrics.jsonl (its "phase": "weights" line)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") == "weights":
                return r["w_mean"]
    raise ValueError(f"{run_dir}/metrics.jsonl has no weights line")


def run_regime(a, out: str, device, t0: float) -> None:
    sizes = sorted(int(n) for n in a.regime_sizes.split(","))
    worlds = {"default": regime_world(a, out, rich=False), "rich": regime_world(a, out, rich=True)}
    n_s = len(data.split_indices(a.n_teacher, 0)["student"])
    if sizes[-1] > n_s:
        sys.exit(f"--regime_sizes: the largest size, {sizes[-1]}, exceeds |D_s| = {n_s}")
    print(f"regime: one aligned proxy per teacher  [{time.time() - t0:.0f} s]", flush=True)
    run_jobs([wd["proxy"] for wd in worlds.values()], a, "regime proxies")
    cells = [(name, n) for name in worlds for n in sizes]
    every = {c: regime_schedule(a, c[1], n_s)[2] for c in cells}
    arms = {c: ["bbkd", "proxykd"] for c in cells}
    refined = []  # the cells trained again evaluating every step

    def train(desc: str) -> dict:
        """cell -> arm -> its jobs over the seeds, all run. A cell where a run kept its first or second
        evaluation is trained again, every arm alike, evaluating after every step: evaluation does not
        change training, so these are the same runs with more steps to keep."""
        while True:
            jobs = {c: {arm: [regime_job(a, worlds[c[0]], arm, c[1], n_s, every[c], s)
                              for s in range(a.regime_seeds)] for arm in arms[c]} for c in cells}
            run_students([j for c in cells for js in jobs[c].values() for j in js], a, desc)
            finer = [c for c in cells if every[c] > 1 and any(kept_too_early(kept_eval(j.out))
                                                               for js in jobs[c].values() for j in js)]
            if not finer:
                return jobs
            print(f"regime: a run kept its first or second evaluation: {finer} again, evaluating every step",
                  flush=True)
            for c in finer:
                every[c] = 1
                refined.append(c)

    print(f"regime: {len(sizes)} data sizes x {a.regime_seeds} seeds x 2 students x 2 teachers, "
          f"early-stopped  [{time.time() - t0:.0f} s]", flush=True)
    jobs = train("regime students")
    for name, wd in worlds.items():  # Eq. 9's moments are over all of D_s: the same in every cell and seed
        wd["w_mean"] = weights_mean(jobs[name, sizes[0]]["proxykd"][0].out)
    print(f"regime: eval  [{time.time() - t0:.0f} s]", flush=True)
    rows = {name: regime_evaluate(a, wd, {n: jobs[name, n] for n in sizes}, device)
            for name, wd in worlds.items()}
    # Eq. 9's share where early-stopped Proxy-KD beats black-box KD (screened by the uncorrected test):
    # the same students with w = 1, at alpha and at alpha times the mean weight
    screened = [c for c in cells if regime_beats(rows[c[0]], c[1])]
    if screened:
        for c in screened:
            arms[c] += ["no_weights", "scaled"]
        jobs = train("regime -weights students")
        rows = {name: regime_evaluate(a, wd, {n: jobs[name, n] for n in sizes}, device)
                for name, wd in worlds.items()}
    write_regime(a, out, worlds, sizes, n_s, rows, jobs, every, refined, t0)


def regime_evaluate(a, world: dict, jobs: dict, device) -> dict:
    """One teacher's held-out metrics (jobs: N -> arm -> jobs over the seeds) -> label -> per-seed metric
    dicts: the bases, the aligned proxy, and per N and arm the kept students ("<arm> n<N> kept", with
    kept_eval's fields) and, for black-box KD and Proxy-KD, the last step's ("<arm> n<N> last")."""
    models = {"proxy base": [world["bases"]["proxy"]], "proxy aligned": [f"{world['proxy'].out}/final"],
              "student base": [world["bases"]["student"]]}
    for n, by_arm in jobs.items():
        for arm, js in by_arm.items():
            if arm in ("bbkd", "proxykd"):  # the last-step table's arms
                models[f"{arm} n{n} last"] = [f"{j.out}/final" for j in js]
            models[f"{arm} n{n} kept"] = [kept_model(j.out) for j in js]
    rows = evaluate_all(models, world["w"], world["tok"], device, a, f"{world['root']}/evals.json")
    for n, by_arm in jobs.items():
        for arm, js in by_arm.items():
            label = f"{arm} n{n} kept"
            rows[label] = [{**r, **kept_eval(j.out)} for r, j in zip(rows[label], js)]
    return rows


def regime_beats(rows: dict, n: int) -> bool:
    """The screen for the -weights arms: early-stopped Proxy-KD above black-box KD in exact match, or below
    it in exact KL, by the uncorrected two-sided paired t-test at 5%."""
    em, kl = (paired(rows[f"proxykd n{n} kept"], rows[f"bbkd n{n} kept"], k) for k in ("exact_match", "kl"))
    return any(d["p"] is not None and d["p"] < 0.05 and sign * d["mean"] > 0
               for sign, d in ((1, em), (-1, kl)))


def write_regime(a, out: str, worlds: dict, sizes: list[int], n_s: int, rows: dict, jobs: dict, every: dict,
                 refined: list, t0: float) -> None:
    """--regime's tables (the teachers; the early-stopped students; the same runs' last step; Eq. 9's
    share) with their paired tests -> out/regime/results.md and results.json."""
    cells = [(name, n) for name in worlds for n in sizes]
    comps = {}  # (teacher, N, arm, metric) -> paired(): the arm minus its reference, early-stopped
    for name, n in cells:
        for arm in jobs[name, n]:
            for k, _, _ in REGIME_METRICS if arm in REGIME_REFERENCE else ():
                ref = rows[name][f"{REGIME_REFERENCE[arm]} n{n} kept"]
                comps[name, n, arm, k] = paired(rows[name][f"{arm} n{n} kept"], ref, k)
    stars = holm({key: d["p"] for key, d in comps.items()})
    unjudged = {}  # cell -> arm -> seeds that kept their first or second evaluation at the finest interval
    for c in cells:
        counts = {arm: sum(kept_too_early(kept_eval(j.out)) for j in js) for arm, js in jobs[c].items()}
        if any(counts.values()):
            unjudged[c] = {arm: k for arm, k in counts.items() if k}
    stats = {name: exact_teacher(wd["w"], wd["tok"], a.n_exact) for name, wd in worlds.items()}

    def runs(c, arm, which="kept") -> list[dict]:
        return rows[c[0]][f"{arm} n{c[1]} {which}"]

    def kept_step(c, arm) -> str:
        return f"{np.mean([r['best_step'] for r in runs(c, arm)]):.0f}"

    def mean(c, arm, k, pct, which="kept") -> str:
        return fmt(*mean_std(runs(c, arm, which), k), pct=pct)

    lines = ["| teacher | entropy / token (nat) | branching positions | proxy base exact KL | "
             "aligned proxy EM % | aligned proxy exact KL | student base exact KL | mean w over D_s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        st, proxy = stats[name], r["proxy aligned"][0]
        lines.append(f"| {name} | {st['entropy']:.3f} | {st['n_branching']:,} of {st['n_positions']:,} "
                     f"({fmt(st['branching'])}%) | {fmt(r['proxy base'][0]['kl'], pct=False)} | "
                     f"{fmt(proxy['exact_match'])} | {fmt(proxy['kl'], pct=False)} | "
                     f"{fmt(r['student base'][0]['kl'], pct=False)} | {worlds[name]['w_mean']:.3f} |")

    head = "".join(f" black-box KD {lab} | Proxy-KD {lab} | Δ {lab} |" for _, lab, _ in REGIME_METRICS)
    lines += ["", "Early-stopped students (the model of the kept evaluation):", "",
              f"| teacher | N (epochs) | eval every | kept step: black-box KD / Proxy-KD (of) |{head}",
              "|---|---|---:|---|" + "---:|" * 3 * len(REGIME_METRICS)]
    for c in cells:
        epochs, per_epoch, _ = regime_schedule(a, c[1], n_s)
        row = [c[0], f"{c[1]} ({epochs})" + (" †" if c in unjudged else ""), str(every[c]),
               f"{kept_step(c, 'bbkd')} / {kept_step(c, 'proxykd')} ({epochs * per_epoch})"]
        for k, _, pct in REGIME_METRICS:
            key = (*c, "proxykd", k)
            row += [mean(c, "bbkd", k, pct), mean(c, "proxykd", k, pct),
                    fmt_paired(comps[key], pct, key in stars)]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "The same runs' last step (fixed epochs, no early stopping):", "",
              f"| teacher | N (epochs) |{head}", "|---|---|" + "---:|" * 3 * len(REGIME_METRICS)]
    for c in cells:
        row = [c[0], f"{c[1]} ({regime_schedule(a, c[1], n_s)[0]})"]
        for k, _, pct in REGIME_METRICS:
            d = paired(runs(c, "proxykd", "last"), runs(c, "bbkd", "last"), k)
            row += [mean(c, "bbkd", k, pct, "last"), mean(c, "proxykd", k, pct, "last"),
                    fmt(d["mean"], d["se"], pct)]
        lines.append("| " + " | ".join(row) + " |")

    weighed = [c for c in cells if "no_weights" in jobs[c]]
    if weighed:
        head = "".join(f" {lab} | Δ {lab} |" for _, lab, _ in REGIME_METRICS)
        lines += ["", "Eq. 9's weights, which examples they weigh against how much (early-stopped; Δ = the "
                      "arm minus Proxy-KD):", "", f"| teacher | N | students | kept step |{head}",
                  "|---|---|---|---:|" + "---:|" * 2 * len(REGIME_METRICS)]
        for c in weighed:
            for arm in ("proxykd", "no_weights", "scaled"):
                label = REGIME_ARMS[arm][0]
                if arm == "scaled":
                    label += f" (alpha {a.alpha * worlds[c[0]]['w_mean']:.3f})"
                row = [c[0], str(c[1]), label, kept_step(c, arm)]
                for k, _, pct in REGIME_METRICS:
                    key = (*c, arm, k)
                    delta = fmt_paired(comps[key], pct, key in stars) if arm != "proxykd" else "-"
                    row += [mean(c, arm, k, pct), delta]
                lines.append("| " + " | ".join(row) + " |")

    def cell_name(c) -> str:
        return f"{c[0]} N = {c[1]}"

    test = paired_footer("Proxy-KD minus black-box KD (the -weights table: the arm minus Proxy-KD)",
                         a.regime_seeds, comps, "exact match, exact KL and NLL per cell and arm")
    unjudged_text = "; ".join(cell_name(c) + " (" + ", ".join(f"{REGIME_ARMS[arm][0]} {k} of {a.regime_seeds}"
                                                             for arm, k in counts.items()) + ")"
                              for c, counts in unjudged.items())
    notes = [
        f"Held-out (the reported test set): {a.n_eval} prompts per teacher (exact KL, entropy and branching "
        f"positions: the teacher's replies to the first {a.n_exact}). Students: mean ± std over "
        f"{a.regime_seeds} seeds, each trained on the first N examples of D_s (|D_s| = {n_s}) for the epochs "
        f"in brackets (about |D_s| example-passes per cell). {test} Exact match: higher is better; exact KL "
        f"and NLL: lower. {exact_kl_footer(a.n_exact)} Proxy rows are single runs; the seeds vary the "
        f"students only.",
        f"Early stopping: every student is evaluated on its world's validation set ({a.n_val} prompts of the "
        f"same teacher, none in the teacher data or the held-out set) at step 0 (the untrained base), every "
        f"'eval every' optimizer steps (at least once per epoch) and after its last step, and keeps the "
        f"evaluation with the lowest validation NLL ('kept step': its mean over the seeds, of the run's "
        f"steps). Where a run kept its first or second evaluation, its lr is too high for the cell to be "
        f"judged at that interval; the remedy chosen, rather than an lr grid on the validation set, is to "
        f"evaluate more often: such a cell was trained again, every arm alike, evaluating after every step "
        f"(evaluation does not change training). Cells so trained: "
        f"{', '.join(cell_name(c) for c in refined) or 'none'}. † a run kept its first or second "
        f"evaluation even then: {unjudged_text or 'none'}.",
        "The last-step table gives Δ ± se only: it is not tested and not in the count."]
    if weighed:
        notes.append(
            "-weights (w = 1) and w = 1 at alpha x mean w: run where early-stopped Proxy-KD beat black-box "
            "KD in exact match or exact KL by the uncorrected two-sided paired t-test at 5% (a screen, not "
            "one of the table's tests). Mean w is Eq. 9's mean weight over D_s (w_mean of a Proxy-KD run's "
            "metrics.jsonl; the first table), so the KL term of the scaled arm weighs about what Proxy-KD's "
            "weighs in total, and -weights' about 1 / mean w times that: the scaled arm against Proxy-KD is "
            "which examples Eq. 9 weighs, -weights against the scaled arm how much.")
    for note in notes:
        lines += ["", note]
    minutes = (time.time() - t0) / 60
    header = (f"Proxy-KD demo --regime ({a.n_teacher} teacher examples per teacher, k = {a.rounds}, alpha = "
              f"{a.alpha}, {a.threads} CPU threads, {minutes:.1f} min)\n")
    teachers = {name: {k: st[k] for k in ("entropy", "branching", "n_branching", "n_positions")}
                | {"w_mean": worlds[name]["w_mean"]} for name, st in stats.items()}
    comparisons = [dict(teacher=name, size=n, arm=arm, reference=REGIME_REFERENCE[arm], metric=k,
                        star=(name, n, arm, k) in stars, **d) for (name, n, arm, k), d in comps.items()]
    payload = {"args": vars(a), "minutes": minutes, "teachers": teachers, "comparisons": comparisons,
               "comparisons_tested": sum(d["p"] is not None for d in comps.values()),
               "eval_every": {cell_name(c): e for c, e in every.items()},
               "refined": [cell_name(c) for c in refined],
               "unjudged": {cell_name(c): v for c, v in unjudged.items()}, "rows": rows}
    write_results(f"{out}/regime", "results", header, "\n".join(lines), payload)


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(a.out)
    if a.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(a.threads)
    _, _, device = init_distributed()  # one-rank group: train_proxy.evaluate all_reduces its sums
    if a.regime:
        run_regime(a, out, device, t0)
    elif a.sweep:
        run_sweep(a, out, device, t0)
    elif a.dpo_sweep:
        run_dpo_sweep(a, out, device, t0)
    else:
        run_main(a, out, device, t0)
    finish(0)


if __name__ == "__main__":
    main()
