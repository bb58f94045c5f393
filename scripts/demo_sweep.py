"""scripts/demo.py --sweep and --dpo_sweep (RESULTS.md): black-box KD against Proxy-KD in the paper's
regime over teacher-data budgets, and the balance of Eq. 6 in that world."""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's modules and the other demo_*.py, also when this file is loaded by path (the tests)
for _dir in (ROOT, os.path.join(ROOT, "scripts")):
    if _dir not in sys.path:
        sys.path.append(_dir)

import data  # noqa: E402
from demo_eval import evaluate_all, exact_teacher, write_results  # noqa: E402
from demo_pipeline import (PROXY, Job, make_world, pretrain, proxy_args, run_jobs, run_students,  # noqa: E402
                           student_job)
from demo_stats import exact_kl_footer, fmt, fmt_paired, holm, mean_std, paired, paired_footer  # noqa: E402


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
