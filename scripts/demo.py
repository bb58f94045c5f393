"""Proxy-KD end to end on the embedded demo world, on CPU, in minutes; prints and writes the results table.

    pip install -r requirements.txt && python scripts/demo.py

The demo world (data.py): a black-box "teacher" answers short word problems with a worked reply, its
phrasing sampled from several options, its final number always right. Every model here is a tiny
Llama (model.py); the pipeline and the two training scripts are the real ones.

  1. world     teacher data (split D_w / D_p / D_s by train_*.py), a held-out set, a tokenizer, and a
               pretraining corpus: the same kind of problems worked in a fixed terse style unlike the
               teacher's (data.demo_base_reply), standing in for what a pretrained Llama knows.
  2. bases     full-parameter pretraining of a proxy base (larger) and a student base (smaller) on that
               corpus: both can do the arithmetic; both know the teacher's style only as a minority
               of their pretraining text (--teacher_share), so their greedy replies are in the base style.
  3. proxies   train_proxy.py: warm-up on D_w, then k rounds of NLL + DPO on D_p (Proxy-KD's proxy);
               the same with --no_dpo ("-PO"); the raw pretrained proxy stands for "-align" (the
               paper's "w/o L_Proxy": the Llama-2-70B checkpoint, never aligned).
  4. students  train_student.py on D_s, several seeds each: --alpha 0 (black-box KD: SFT on the
               teacher's text), Proxy-KD, and the ablations -PO, -align, -weights (--no_weights).
  5. eval      on held-out prompts: exact match of the final answer with greedy decoding (the reply must
               end in one of the teacher's answer forms with the right number), and teacher-forced top-1
               agreement with the teacher's tokens (the paper's Fig. 5) and per-token NLL.

Outputs in --out (default demo_out/): results.md and results.json (the table, per-seed values), the
data, tokenizer, bases and every run's directory (metrics.jsonl, adapter/, final/). A rerun skips every
finished step (a crashed or interrupted demo continues where it stopped); --fresh starts over.

The demo departs from the paper's hyperparameters where toy scale needs it (all are flags): lr 2e-3
instead of 1e-5 (tiny LoRA models, a few hundred steps), k = 4 rounds instead of 16, alpha 1 instead of
100 (measured here: the larger alpha, the further the student's held-out NLL moves from the teacher's
text; the table has an alpha = 100 row), beta 0.1 as in the DPO default, fp32 bases instead of bf16
(CPU bf16 matmuls are slower, not faster).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import proxykd as pk  # noqa: E402
from model import Llama, ModelArgs, generate  # noqa: E402
from train_proxy import eval_batches, evaluate, finish, init_distributed  # noqa: E402

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
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished steps")
    p.add_argument("--n_teacher", type=int, default=3000, help="teacher examples (D_w 10%%, D_p 45%%, D_s 45%%)")
    p.add_argument("--n_eval", type=int, default=500, help="held-out prompts")
    p.add_argument("--n_pretrain", type=int, default=20000, help="pretraining corpus size (base style)")
    p.add_argument("--teacher_share", type=float, default=0.2, help="share of teacher-style replies in pretraining")
    p.add_argument("--pretrain_steps", type=int, default=800, help="optimizer steps of each base (batch 64)")
    p.add_argument("--rounds", type=int, default=4, help="k alignment rounds (paper: 16)")
    p.add_argument("--proxy_lr", type=float, default=2e-3)
    p.add_argument("--student_lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="KL weight of Eq. 11 (paper: 100)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature")
    p.add_argument("--nll_reduction", default="sequence", help="train_proxy.py --nll_reduction (sequence or token)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3, help="student runs per variant (seeds 0..n-1)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (each gets cores / jobs threads)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per training run (>1: torchrun, gloo)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# 1-2. the world and the pretrained bases


def make_world(a, d: str) -> dict:
    """Teacher data, held-out set, pretraining corpus, tokenizer -> paths (each written once)."""
    paths = dict(teacher=f"{d}/teacher.jsonl", heldout=f"{d}/heldout.jsonl", pretrain=f"{d}/pretrain.jsonl",
                 tok=f"{d}/tok.model")
    if not os.path.exists(paths["teacher"]):
        data.write_demo_jsonl(paths["teacher"], a.n_teacher, seed=0)
    if not os.path.exists(paths["heldout"]):
        data.write_demo_jsonl(paths["heldout"], a.n_eval, seed=1)
    if not os.path.exists(paths["pretrain"]):
        # mostly the terse base style; a minority in the teacher's own style, so the bases know its words
        # (as a pretrained Llama knows GPT-4's) without preferring its way of answering
        rng = np.random.default_rng([2, 0xBA5E])
        lines = [json.dumps({"prompt": p, "response": data.demo_teacher(p, rng) if rng.random() < a.teacher_share
                             else data.demo_base_reply(p)}) + "\n" for p in data.make_demo_prompts(a.n_pretrain, seed=2)]
        data.atomic_write(paths["pretrain"], "".join(lines))
    if not os.path.exists(paths["tok"]):
        data.train_demo_tokenizer([paths["teacher"], paths["pretrain"]], paths["tok"][: -len(".model")])
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
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))  # warm-up, cosine
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
    threads = max(1, (os.cpu_count() or 1) // max(1, a.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}

    def one(job: Job) -> tuple[Job, int, float]:
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


def proxy_jobs(a, w: dict, bases: dict, out: str) -> list[Job]:
    args = ["--base", bases["proxy"], "--tokenizer", w["tok"], "--data", w["teacher"], "--eval_data", w["heldout"],
            "--rounds", str(a.rounds), "--lr", str(a.proxy_lr), "--beta", str(a.beta), "--nll_reduction", a.nll_reduction,
            "--batch_size", str(a.batch_size), "--max_len", "256", "--max_new_tokens", "96", "--base_dtype", "float32",
            "--eval_batch_size", "64", "--save_every", "0", "--log_every", "10"]
    return [Job("proxy", "train_proxy.py", args, f"{out}/proxy"),
            Job("proxy_no_po", "train_proxy.py", args + ["--no_dpo"], f"{out}/proxy_no_po")]


def student_jobs(a, w: dict, bases: dict, out: str) -> list[Job]:
    proxies = {"proxy": f"{out}/proxy/final", "proxy_no_po": f"{out}/proxy_no_po/final", "proxy_base": bases["proxy"]}
    jobs = []
    for seed in range(a.seeds):
        for variant, (_, proxy, extra) in STUDENTS.items():
            args = ["--base", bases["student"], "--tokenizer", w["tok"], "--data", w["teacher"], "--eval_data", w["heldout"],
                    "--lr", str(a.student_lr), "--alpha", str(a.alpha), "--batch_size", str(a.batch_size),
                    "--max_len", "256", "--base_dtype", "float32", "--eval_batch_size", "64", "--save_every", "0",
                    "--log_every", "10", "--seed", str(seed)]
            if proxy:  # one cache per proxy, shared by seeds and variants (it does not depend on either)
                args += ["--proxy", proxies[proxy], "--cache_dir", f"{out}/cache_{proxy}", "--proxy_dtype", "float32"]
            jobs.append(Job(f"{variant}_seed{seed}", "train_student.py", args + extra, f"{out}/students/{variant}_seed{seed}"))
    return jobs


# ---------------------------------------------------------------------------------------------------
# 5. evaluation


@torch.no_grad()
def eval_model(path: str, w: dict, tok: data.Tokenizer, device) -> dict:
    """Held-out metrics of an HF-format model dir: exact_match (greedy reply's final answer in a
    teacher answer form == the true answer), top1_agreement and nll (teacher-forced on the teacher's
    replies, train_proxy.evaluate)."""
    model = Llama.from_pretrained(path, dtype=torch.float32).to(device).eval()
    held_out = data.read_jsonl(w["heldout"])
    encoded = [data.encode_example(tok, e, 256) for e in held_out]
    tf = evaluate(model, eval_batches(encoded, 100, 0, 1, tok.pad_id), device)
    correct = anyform = 0
    for s in range(0, len(held_out), 250):
        chunk = held_out[s : s + 250]
        replies = generate(model, [data.encode_prompt(tok, e.system, e.prompt) for e in chunk], 96, tok.eos_id,
                           tok.pad_id, greedy=True)
        for r, e in zip(replies, chunk):
            text, truth = tok.decode(r), data.reference_answer(e.prompt)
            correct += data.extract_answer(text) == truth
            anyform += (data.extract_answer(text) or _base_answer(text)) == truth
    n_params = sum(p.numel() for p in model.parameters())
    return dict(exact_match=correct / len(held_out), any_form=anyform / len(held_out), top1_agreement=tf["top1_agreement"],
                nll=tf["nll"], params=n_params)


def _base_answer(text: str) -> str | None:
    """The final number of a base-style reply ("... Total: 8 apples."), for the any-form accuracy."""
    hits = re.findall(r"Total: (-?\d+)", text)
    return str(int(hits[-1])) if hits else None


def teacher_row(w: dict) -> dict:
    """The black box itself: its held-out replies scored by the same exact-match check."""
    held_out = data.read_jsonl(w["heldout"])
    em = np.mean([data.extract_answer(e.response) == data.reference_answer(e.prompt) for e in held_out])
    return dict(exact_match=float(em), any_form=float(em), top1_agreement=None, nll=None, params=None)


def fmt(x, spread=None, pct=True) -> str:
    if x is None:
        return "-"
    s = f"{100 * x:.1f}" if pct else f"{x:.3f}"
    if spread is not None:
        s += f" ± {100 * spread:.1f}" if pct else f" ± {spread:.3f}"
    return s


def summarise(rows: dict, seeds: int, n_eval: int) -> tuple[str, dict]:
    """rows: label -> list of per-run metric dicts -> (markdown table, JSON-able dict)."""
    lines = ["| model | params | exact match % | right answer, any form % | top-1 agreement % | held-out NLL | runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    out = {}
    for label, runs in rows.items():
        agg = {}
        for k in ("exact_match", "any_form", "top1_agreement", "nll"):
            vals = [r[k] for r in runs if r[k] is not None]
            agg[k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None) if vals else (None, None)
        out[label] = dict(runs=runs, **{k: dict(mean=m, std=s) for k, (m, s) in agg.items()})
        params = runs[0]["params"]
        lines.append(f"| {label} | {params if params else '-'} | {fmt(*agg['exact_match'])} | {fmt(*agg['any_form'])} | "
                     f"{fmt(*agg['top1_agreement'])} | {fmt(*agg['nll'], pct=False)} | {len(runs)} |")
    lines.append("")
    lines.append(f"Held-out: {n_eval} prompts. Student rows: mean ± std over {seeds} seeds (LoRA init and batch "
                 f"order; same proxy and cache). One run's exact match on {n_eval} prompts has a binomial standard "
                 f"error of about {100 * math.sqrt(0.25 / n_eval):.1f} points at 50%.")
    return "\n".join(lines), out


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(a.out)
    if a.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    _, _, device = init_distributed()  # one-rank group: train_proxy.evaluate all_reduces its sums

    print("1. world: teacher data, held-out set, pretraining corpus, tokenizer", flush=True)
    w = make_world(a, f"{out}/data")
    tok = data.Tokenizer(w["tok"])
    print("2. bases: pretraining the proxy base (larger) and the student base (smaller)", flush=True)
    bases = {"proxy": f"{out}/bases/proxy", "student": f"{out}/bases/student"}
    pretrain(bases["proxy"], PROXY, w["pretrain"], tok, a.pretrain_steps, seed=0)
    pretrain(bases["student"], STUDENT, w["pretrain"], tok, a.pretrain_steps, seed=1)
    print(f"3. proxies: warm-up + {a.rounds} rounds of NLL + DPO, and NLL only (-PO)  [{time.time() - t0:.0f} s]", flush=True)
    run_jobs(proxy_jobs(a, w, bases, out), a, "proxies")
    print(f"4. students: {len(STUDENTS)} variants x {a.seeds} seeds  [{time.time() - t0:.0f} s]", flush=True)
    s_jobs = student_jobs(a, w, bases, out)
    # one run per proxy first, alone: it builds that proxy's cache, which the others then share
    firsts = {}
    for j in s_jobs:
        cache = j.args[j.args.index("--cache_dir") + 1] if "--cache_dir" in j.args else None
        firsts.setdefault(cache, j)
    run_jobs([j for c, j in firsts.items() if c is not None], a, "students (building caches)")
    run_jobs(s_jobs, a, "students")

    print(f"5. eval: greedy exact match and teacher-forced agreement on {a.n_eval} held-out prompts  "
          f"[{time.time() - t0:.0f} s]", flush=True)
    evals_path = f"{out}/evals.json"
    cached = json.load(open(evals_path)) if os.path.exists(evals_path) else {}
    models = {"proxy base (pretrained; the -align proxy)": [bases["proxy"]],
              "proxy after warm-up on D_w only": [f"{out}/proxy/warmup/final"],
              "proxy aligned by NLL only on D_p (-PO)": [f"{out}/proxy_no_po/final"],
              "proxy aligned: warm-up + NLL + DPO rounds (Proxy-KD)": [f"{out}/proxy/final"],
              "student base (pretrained)": [bases["student"]]}
    for variant, (label, _, _) in STUDENTS.items():
        models[label] = [f"{out}/students/{variant}_seed{s}/final" for s in range(a.seeds)]
    rows = {"teacher (black box)": [teacher_row(w)]}
    for label, paths in tqdm(models.items(), desc="eval", dynamic_ncols=True):
        for p in paths:
            if p not in cached:
                cached[p] = eval_model(p, w, tok, device)
                data.atomic_write(evals_path, json.dumps(cached, indent=1))
        rows[label] = [cached[p] for p in paths]
    table, summary = summarise(rows, a.seeds, a.n_eval)
    minutes = (time.time() - t0) / 60
    header = (f"Proxy-KD demo ({a.n_teacher} teacher examples, k = {a.rounds} rounds, alpha = {a.alpha}, "
              f"{os.cpu_count()} CPU cores, {minutes:.1f} min)\n")
    data.atomic_write(f"{out}/results.md", header + "\n" + table + "\n")
    data.atomic_write(f"{out}/results.json", json.dumps({"args": vars(a), "minutes": minutes, "rows": summary},
                                                          indent=1).encode())
    print("\n" + header + "\n" + table + f"\n\nwritten: {out}/results.md, {out}/results.json", flush=True)
    finish(0)


if __name__ == "__main__":
    main()
