"""scripts/demo.py --regime (RESULTS.md): where Proxy-KD beats black-box KD, over the student's data
budget, for the default teacher and a richer one; early-stopped students and their paired tests."""

import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's modules and the other demo_*.py, also when this file is loaded by path (the tests)
for _dir in (ROOT, os.path.join(ROOT, "scripts")):
    if _dir not in sys.path:
        sys.path.append(_dir)

import numpy as np  # noqa: E402

import data  # noqa: E402
from demo_eval import evaluate_all, exact_teacher, write_results  # noqa: E402
from demo_pipeline import (PROXY, STUDENT, Job, make_world, pretrain, prepare_main, proxy_jobs,  # noqa: E402
                           run_jobs, run_students, student_job)
from demo_stats import exact_kl_footer, fmt, fmt_paired, holm, mean_std, paired, paired_footer  # noqa: E402


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


def read_metrics(run_dir: str) -> list[dict]:
    """A run's metrics.jsonl, one dict per line."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def kept_eval(run_dir: str) -> dict:
    """What a --keep_best run kept, from its metrics.jsonl: best_step, best_eval_nll, last_step and
    eval_steps (the steps of its validation evaluations, in order)."""
    records = read_metrics(run_dir)
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
    for r in read_metrics(run_dir):
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
