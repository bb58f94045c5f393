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

Where the code is: this file holds the flags, the main table and the dispatch; demo_pipeline.py steps
1-4 (the world, the bases, the training runs), demo_eval.py step 5 and the results files, demo_stats.py
the tables' statistics (mean ± std, paired tests, Holm-Bonferroni), demo_sweep.py --sweep and
--dpo_sweep, demo_regime.py --regime.

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
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# demo_world and the other demo_*.py, also when this file is loaded by path (the tests)
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

import data  # noqa: E402
import demo_world  # noqa: E402
from demo_eval import evaluate_all, write_results  # noqa: E402
from demo_pipeline import Job, prepare_main, proxy_jobs, run_jobs, run_students, student_job  # noqa: E402
from demo_regime import run_regime  # noqa: E402
from demo_stats import fmt, mean_std  # noqa: E402
from demo_sweep import run_dpo_sweep, run_sweep  # noqa: E402
from ranks import finish, init_distributed  # noqa: E402

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
# the main table: its student variants' runs, the teacher's row, the table and the pipeline


def student_jobs(a, w: dict, bases: dict, out: str) -> list[Job]:
    proxies = {"proxy": f"{out}/proxy/final", "proxy_no_po": f"{out}/proxy_no_po/final",
               "proxy_base": bases["proxy"]}
    return [student_job(a, w, bases["student"], w["teacher"], proxy and proxies[proxy],
                        proxy and f"{out}/cache_{proxy}", seed, extra, f"{variant}_seed{seed}",
                        f"{out}/students/{variant}_seed{seed}")
            for seed in range(a.seeds) for variant, (_, proxy, extra) in STUDENTS.items()]


def teacher_row(w: dict) -> dict:
    """The black box itself: its held-out replies scored by the same exact-match check."""
    held_out = data.read_jsonl(w["heldout"])
    em = np.mean([demo_world.extract_answer(e.response) == demo_world.reference_answer(e.prompt)
                  for e in held_out])
    return dict(exact_match=float(em), any_form=float(em), top1_agreement=None, nll=None, params=None, kl=0.0,
                teacher_top1=1.0)


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
