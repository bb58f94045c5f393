"""The demo's steps 1-4 (scripts/demo.py's docstring): the world, the pretrained bases and the training
runs (the real train_proxy.py and train_student.py, as subprocesses); the main table and the studies
(demo_sweep.py, demo_regime.py) build on them."""

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's modules and demo_world, also when this file is loaded by path (the tests)
for _dir in (ROOT, os.path.join(ROOT, "scripts")):
    if _dir not in sys.path:
        sys.path.append(_dir)

# torch loads here only after scripts/demo.py has pinned its CPU kernels (the pins must precede
# torch's import; demo.py imports this module below them)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import demo_world  # noqa: E402
import proxykd as pk  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402

# the demo's two base sizes (vocab_size is set from the tokenizer)
PROXY = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=352, max_seq_len=256)
STUDENT = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=176, max_seq_len=256)


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


def run_students(jobs: list[Job], a, desc: str) -> None:
    """One run per proxy cache first (they build the caches, which the others then share), then the rest."""
    firsts = {}
    for j in jobs:
        cache = j.args[j.args.index("--cache_dir") + 1] if "--cache_dir" in j.args else None
        firsts.setdefault(cache, j)
    run_jobs([j for c, j in firsts.items() if c is not None], a, f"{desc} (building caches)")
    run_jobs(jobs, a, desc)


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
