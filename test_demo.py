"""The demo world (scripts/demo_world.py): the teacher's grammar (always right, really branching, its
answer forms), its enumerated replies and exact next-token distributions (what scripts/demo.py's exact KL
column uses) against sampling frequencies and the chain rule, and the demo tokenizer."""

import collections
import hashlib
import itertools
import json
import math
import os
import re

import numpy as np
import pytest

import data
from scripts import demo_world


def chi2_bound(df: int) -> float:
    """A generous acceptance bound for a chi-square statistic with df degrees of freedom: mean + 8 std.
    The samples are seeded, so a pass is reproducible; a wrong distribution (a missing or mis-weighted
    branch) gives a statistic in the thousands at these sample sizes."""
    return df + 8 * math.sqrt(2 * df)


def chi2(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs), f"sampled outcomes the enumeration lacks: {set(counts) - set(probs)}"
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """300 demo examples and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("demo")
    path = demo_world.write_demo_jsonl(str(d / "teacher.jsonl"), 300, seed=0)
    tok_path = demo_world.train_demo_tokenizer([path], str(d / "tok"), 320)
    return {"dir": d, "path": path, "tok": data.Tokenizer(tok_path), "examples": data.read_jsonl(path)}


@pytest.fixture(scope="module")
def tok(demo):
    return demo["tok"]


@pytest.fixture(scope="module")
def rich_tok(tmp_path_factory):
    """A tokenizer trained on 300 replies of the rich teacher."""
    d = tmp_path_factory.mktemp("rich")
    path = demo_world.write_demo_jsonl(str(d / "teacher.jsonl"), 300, seed=0, rich=True)
    return data.Tokenizer(demo_world.train_demo_tokenizer([path], str(d / "tok"), 320))


def toks(request, rich: bool) -> data.Tokenizer:
    return request.getfixturevalue("rich_tok" if rich else "tok")


# ---------------------------------------------------------------------------------------------------
# the teacher's grammar


def brute_force_answer(prompt: str) -> int:
    """Independent of demo_world's parser: the first number is the start; every later number is a step
    whose sign is set by the word in front of it."""
    sign = {"finds": 1, "buys": 1, "gets": 1, "loses": -1, "away": -1, "sells": -1}
    words = prompt.replace(".", " ").replace("?", " ").split()
    nums = [(j, int(w)) for j, w in enumerate(words) if w.isdigit()]
    return nums[0][1] + sum(sign[words[j - 1]] * k for j, k in nums[1:])


@pytest.mark.parametrize("rich", [False, True])
def test_teacher_always_right_and_arithmetic_checks(rich):
    prompts = demo_world.make_demo_prompts(600, seed=11)
    assert (prompts == demo_world.make_demo_prompts(600, seed=11)
            and prompts != demo_world.make_demo_prompts(600, seed=12))
    rng = np.random.default_rng(0)
    for p in prompts:
        truth = brute_force_answer(p)
        assert demo_world.reference_answer(p) == str(truth) and 0 <= truth <= 47
        assert demo_world.extract_answer(p) is None
        reply = demo_world.demo_teacher(p, rng, rich)
        assert demo_world.extract_answer(reply) == str(truth), (p, reply)
        eqs = re.findall(r"(\d+) ([+-]|plus|minus) (\d+) (?:=|is|makes) (\d+)", reply)
        steps = len(re.findall(r"\d+", p)) - 1
        if rich:  # a step may also be told as "... Now she has N." without its equation
            assert len(eqs) + len(re.findall(r"\. (?:Now|So) [sh]*e (?:has|holds) \d+\.", reply)) == steps
        else:
            assert len(eqs) == steps, "one equation per step"
        for a, op, b, c in eqs:
            assert int(c) == (int(a) + int(b) if op in ("+", "plus") else int(a) - int(b)) >= 0
        assert [int(a) for a, *_ in eqs[1:]] == [int(c) for *_, c in eqs[:-1]] or rich, (
            "each step starts from the last")


def test_base_reply_right_but_not_in_teacher_form():
    """The demo bases' pretraining style: the same chain of equations as the teacher, ending in the true
    answer, in a form extract_answer (the teacher's answer forms) does not accept."""
    for p in demo_world.make_demo_prompts(200, seed=13):
        reply = demo_world.demo_base_reply(p)
        eqs = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", reply)
        assert len(eqs) == len(re.findall(r"\d+", p)) - 1
        for a, op, b, c in eqs:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert eqs[-1][3] == str(brute_force_answer(p)) == re.search(r"Total: (\d+)", reply).group(1)
        assert demo_world.extract_answer(reply) is None


def test_rich_teacher_branches_more():
    """The rich teacher draws from several times as many phrasings, every one of them right."""
    prompt = demo_world.make_demo_prompts(1, seed=5, steps=(3, 3))[0]
    default, rich = demo_world.teacher_segments(prompt), demo_world.teacher_segments(prompt, rich=True)
    assert len(rich) == len(default) and all(len(r) >= 2 * len(d) for r, d in zip(rich, default))
    assert all(math.isclose(sum(p for _, p in options), 1.0) for options in rich)
    replies = {demo_world.demo_teacher(prompt, np.random.default_rng(s), rich=True) for s in range(60)}
    assert len(replies) == 60 and ({demo_world.extract_answer(r) for r in replies}
                                   == {demo_world.reference_answer(prompt)})


def test_teacher_phrasing_branches():
    prompt = demo_world.make_demo_prompts(1, seed=5)[0]
    replies = [demo_world.demo_teacher(prompt, np.random.default_rng(s)) for s in range(60)]
    assert len(set(replies)) > 10
    assert {demo_world.extract_answer(r) for r in replies} == {demo_world.reference_answer(prompt)}
    endings = {re.sub(r"\d+", "N", r.rsplit(". ", 1)[-1]).replace(prompt.split()[0], "NAME") for r in replies}
    assert len(endings) == 4, endings  # all four answer forms occur
    assert demo_world.demo_teacher(prompt, 3) == demo_world.demo_teacher(prompt, 3), (
        "a seeded teacher is reproducible")


def test_extract_answer_forms():
    for text, want in [("The answer is 12.", "12"), ("x. Answer: 7", "7"), ("#### 40", "40"),
                       ("In the end, Mia has 3.", "3"), ("The answer is 4. No wait, #### 05", "5"),
                       ("Mia has 3 apples.", None), ("", None)]:
        assert demo_world.extract_answer(text) == want, text


def test_teacher_rejects_other_prompts():
    for bad in ["What is 2 + 2?", "Mia has 3 apples. She dances 2. How many apples does Mia have?",
                "Mia has 3 apples. She finds 2 more. How many apples does Leo have?"]:
        with pytest.raises(ValueError):
            demo_world.demo_teacher(bad, 0)
        with pytest.raises(ValueError):
            demo_world.reference_answer(bad)


def test_write_demo_jsonl_deterministic(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "b.jsonl")
    demo_world.write_demo_jsonl(a, 50, seed=2)
    demo_world.write_demo_jsonl(b, 50, seed=2)
    assert open(a, "rb").read() == open(b, "rb").read()
    exs = data.read_jsonl(a)
    assert len(exs) == 50 and [e.prompt for e in exs] == demo_world.make_demo_prompts(50, 2)
    assert all(demo_world.extract_answer(e.response) == demo_world.reference_answer(e.prompt) for e in exs)
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "sub"], "no temp files left"


# ---------------------------------------------------------------------------------------------------
# exact distributions


@pytest.mark.parametrize("steps", [(2, 2), (3, 3)])
def test_enumerated_replies_match_sampling_frequencies(steps):
    prompt = demo_world.make_demo_prompts(1, seed=11, steps=steps)[0]
    replies = demo_world.demo_teacher_replies(prompt)
    assert len(replies) == 3 * 6 ** (steps[0] - 1) * 3 * 4
    assert math.isclose(sum(replies.values()), 1.0, rel_tol=1e-12)
    n = 30_000
    rng = np.random.default_rng(0)
    counts = collections.Counter(demo_world.demo_teacher(prompt, rng) for _ in range(n))
    assert chi2(counts, replies, n) < chi2_bound(len(replies) - 1)


def enumerate_replies(prompt: str, rich: bool) -> dict[str, float]:
    """Brute force: every reply, the product of its segments' probabilities, summed over equal texts."""
    out = collections.defaultdict(float)
    for combo in itertools.product(*demo_world.teacher_segments(prompt, rich)):
        out[" ".join(t for t, _ in combo)] += math.prod(p for _, p in combo)
    return out


@pytest.mark.parametrize("rich,steps", [(False, (3, 3)), (True, (1, 1))])
def test_next_token_dists_equal_brute_force(request, rich, steps):
    """Along replies of a prompt small enough to enumerate (the rich teacher's one-step problems: 23,552
    replies), each position's distribution is the enumeration's: the replies sharing the prefix,
    grouped by their next token; and by the chain rule a reply's next-token probabilities multiply to
    its probability."""
    tok = toks(request, rich)
    prompt = demo_world.make_demo_prompts(1, seed=3, steps=steps)[0]
    replies = enumerate_replies(prompt, rich)
    assert math.isclose(sum(replies.values()), 1.0, rel_tol=1e-9)
    if not rich:
        assert replies == pytest.approx(demo_world.demo_teacher_replies(prompt), rel=1e-12)
    seqs = collections.defaultdict(float)  # token sequence -> probability (texts may share one)
    for text, p in replies.items():
        seqs[tuple(tok.encode(text, eos=True))] += p
    for n, text in enumerate(list(replies)[:: max(1, len(replies) // 24)]):
        dists = demo_world.teacher_next_token_dists(tok, prompt, text, rich)
        ids = tuple(tok.encode(text, eos=True))
        assert len(dists) == len(ids)
        assert math.isclose(math.prod(d[y] for d, y in zip(dists, ids)), seqs[ids], rel_tol=1e-9)
        alive = list(seqs.items()) if n % 4 == 0 else []  # every position of every 4th reply, brute force
        for t, d in enumerate(dists if alive else []):
            brute = collections.defaultdict(float)
            for s, p in alive:
                brute[s[t]] += p
            z = sum(brute.values())
            assert d == pytest.approx({v: p / z for v, p in brute.items()}, rel=1e-9, abs=1e-15)
            alive = [(s, p) for s, p in alive if s[t] == ids[t]]


@pytest.mark.parametrize("rich", [False, True])
def test_next_token_dists_match_sampling(request, rich):
    """Along one sampled reply of a three-step problem, the next-token frequencies among samples
    sharing its prefix follow the exact distributions (chi-square)."""
    tok = toks(request, rich)
    prompt = demo_world.make_demo_prompts(1, seed=3, steps=(3, 3))[0]
    rng = np.random.default_rng(1)
    samples = [tuple(tok.encode(demo_world.demo_teacher(prompt, rng, rich), eos=True)) for _ in range(20_000)]
    target = samples[0]
    dists = demo_world.teacher_next_token_dists(tok, prompt, tok.decode(target), rich)
    stat = df = branches = 0
    alive = samples
    for t, d in enumerate(dists):
        if len(d) > 1 and len(alive) >= 200:
            branches += 1
            stat += chi2(collections.Counter(s[t] for s in alive), d, len(alive))
            df += len(d) - 1
        alive = [s for s in alive if s[t] == target[t]]
    assert branches >= 2, "the sampled reply should pass several well-sampled branch points"
    assert stat < chi2_bound(df)


def test_next_token_dists_refuse_other_replies(tok):
    prompt = demo_world.make_demo_prompts(1, seed=3)[0]
    with pytest.raises(ValueError, match="not a reply"):
        demo_world.teacher_next_token_dists(tok, prompt, demo_world.demo_base_reply(prompt))
    rich = demo_world.demo_teacher(prompt, 0, rich=True)
    with pytest.raises(ValueError, match="not a reply"):
        demo_world.teacher_next_token_dists(tok, prompt, rich)  # the rich teacher's reply, not the default's


def test_rich_teacher_entropy_rises_several_fold(tok, rich_tok):
    """Measured exactly on 30 replies each: the rich teacher's entropy per token and its share of
    branching positions are at least 2.5 times the default teacher's."""
    measured = {}
    for rich, t in ((False, tok), (True, rich_tok)):
        prompts = demo_world.make_demo_prompts(30, seed=8)
        rng = np.random.default_rng(2)
        dists = [d for p in prompts for d in demo_world.teacher_next_token_dists(
            t, p, demo_world.demo_teacher(p, rng, rich), rich)]
        measured[rich] = demo_world.teacher_entropy(dists)
    assert all(r >= 2.5 * d > 0 for r, d in zip(measured[True], measured[False])), measured


def test_prompt_ranges():
    prompts = demo_world.make_demo_prompts(200, seed=4, steps=(4, 5), start=(20, 60), k=(10, 29))
    for p in prompts:
        _, _, count, steps = demo_world._parse_prompt(p)
        assert 20 <= count <= 60 and 4 <= len(steps) <= 5 and all(10 <= k <= 29 for _, k in steps)
        running = count
        for verb, k in steps:
            running += demo_world._VERBS[verb][1] * k
            assert running >= 0
        assert (demo_world.reference_answer(p) == str(running)
                == demo_world.extract_answer(demo_world.demo_teacher(p, 0)))
    assert demo_world.make_demo_prompts(50, seed=4) == demo_world.make_demo_prompts(
        50, seed=4, steps=(2, 3), start=(2, 20), k=(1, 9))


# ---------------------------------------------------------------------------------------------------
# the demo tokenizer


def test_demo_tokenizer(demo):
    tok = demo["tok"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.vocab_size <= 320
    assert tok.fingerprint == hashlib.sha256(open(tok.path, "rb").read()).hexdigest()
    for ex in demo["examples"]:
        for text in (data.format_prompt(ex.system, ex.prompt), ex.response):
            ids = tok.encode(text)
            assert tok.decode(ids) == text and 0 not in ids, "round trip, no unk"
            assert all(len(s) == 1 for s in map(tok.sp.id_to_piece, ids)
                       if any(c.isdigit() for c in s)), "digits split"
        assert tok.encode("x", bos=True, eos=True) == [tok.bos_id, *tok.encode("x"), tok.eos_id]
        # the demo data fits the demo's max_len with room to spare
        assert len(data.encode_example(tok, ex, 10_000)["input_ids"]) <= 128


def test_demo_tokenizer_deterministic(demo, tmp_path):
    again = demo_world.train_demo_tokenizer([demo["path"]], str(tmp_path / "elsewhere" / "tok2"), 320)
    assert data.Tokenizer(again).fingerprint == demo["tok"].fingerprint


# ---------------------------------------------------------------------------------------------------
# scripts/demo_eval.py's exact metrics


def load_script(name: str):
    """scripts/<name>.py as a module, without letting its settings (the demo's kernel pins:
    os.environ.setdefault at import) leak into the environment of later tests' subprocesses."""
    import importlib.util
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location(
            f"{name}_script", os.path.join(os.path.dirname(__file__), "scripts", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


def test_demo_exact_kl_equals_a_plain_loop(tok, tmp_path):
    """demo_eval.exact_metrics (one gather over a dense teacher matrix) against a loop over each position's
    teacher distribution, on a random model whose argmax sometimes hits the teacher's."""
    import torch
    from model import Llama, ModelArgs
    demo_eval = load_script("demo_eval")
    heldout = demo_world.write_demo_jsonl(str(tmp_path / "heldout.jsonl"), 5, seed=9)
    ex = demo_eval.exact_teacher({"heldout": heldout}, tok, 5)
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=256,
                            vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        got = demo_eval.exact_metrics(model, ex, "cpu")
        kl, agree, n = 0.0, 0, 0
        for e in data.read_jsonl(heldout):
            enc = data.encode_example(tok, e, 256)
            logq = torch.log_softmax(model(torch.tensor([enc["input_ids"]]))[0].double(), -1)
            start = enc["labels"].index(tok.encode(e.response)[0])  # first response position
            for j, dist in enumerate(demo_world.teacher_next_token_dists(tok, e.prompt, e.response)):
                q = logq[start + j - 1]
                kl += sum(p * (math.log(p) - q[v].item()) for v, p in dist.items())
                agree += dist.get(int(q.argmax()), 0.0) == max(dist.values())
                n += 1
    assert n == len(ex["rows"])
    assert got["kl"] == pytest.approx(kl / n, rel=1e-9)
    assert got["teacher_top1"] == pytest.approx(agree / n, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# the demo's validation set (demo_pipeline.py), paired statistics (demo_stats.py) and --regime bookkeeping
# (demo_regime.py)


def test_validation_set_shares_no_prompt_with_d_s_or_the_held_out_set(tmp_path):
    """make_world's validation.jsonl, in a world whose problems are few enough that the validation seed's
    own draw repeats teacher and held-out prompts: none of those survive, and the set is still full,
    of distinct prompts, the teacher's replies, and the same when written again."""
    demo, pipeline = load_script("demo"), load_script("demo_pipeline")
    ranges = dict(steps=(1, 1), start=(2, 4), k=(1, 3))
    a = demo.parse_args(["--n_teacher", "300", "--n_eval", "100", "--n_val", "100", "--n_pretrain", "60"])
    w = pipeline.make_world(a, str(tmp_path / "world"), ranges)
    teacher, heldout, val = (data.read_jsonl(w[k]) for k in ("teacher", "heldout", "validation"))
    d_s = {teacher[i].prompt for i in data.split_indices(len(teacher), 0)["student"]}
    test = {e.prompt for e in heldout}
    raw = demo_world.make_demo_prompts(100, seed=3, **ranges)
    assert set(raw) & d_s and set(raw) & test, "the raw draw must collide with both, or this shows nothing"
    prompts = [e.prompt for e in val]
    assert len(prompts) == len(set(prompts)) == 100
    assert not set(prompts) & (d_s | test | {e.prompt for e in teacher})
    assert all(e.response in demo_world.demo_teacher_replies(e.prompt) for e in val)
    taken = {e.prompt for e in teacher + heldout}
    again = demo_world.write_fresh_jsonl(str(tmp_path / "again.jsonl"), 100, 3, taken, **ranges)
    assert open(again, "rb").read() == open(w["validation"], "rb").read()
    with pytest.raises(ValueError, match="new prompts"):  # 8 names x 8 items x 6 verbs: 384 prompts in all
        demo_world.write_fresh_jsonl(str(tmp_path / "full.jsonl"), 385, 3, set(), steps=(1, 1), start=(2, 2),
                                     k=(1, 1))


def t_density_integral(t: float, df: int, n: int = 20_001) -> float:
    """P(|T| >= |t|) by Simpson's rule on Student's t density over [0, |t|] (the density from its
    definition with math.lgamma; nothing shared with the closed forms under test)."""
    x = np.linspace(0.0, abs(t), n)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    inside = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 1.0 - 2.0 * inside


def test_t_test_p_value_equals_integrated_density():
    stats = load_script("demo_stats")
    for df in range(1, 13):
        for t in (0.0, 0.3, -1.0, 2.0, 2.776, -4.5, 9.0):
            assert stats.t_two_sided_p(t, df) == pytest.approx(t_density_integral(t, df), abs=1e-9), (t, df)
    assert stats.t_two_sided_p(math.inf, 3) == 0.0
    with pytest.raises(ValueError):
        stats.t_two_sided_p(1.0, 2.5)


def test_paired_differences_against_a_plain_loop():
    """mean, se, t, df and p of demo_stats.paired against the textbook formulas written out, over seeds
    whose values differ across the two arms by a seed effect both share (which pairing removes)."""
    stats = load_script("demo_stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        seed_effect = rng.normal(size=n)
        runs = [{"kl": float(s + 0.3 + 0.1 * rng.normal())} for s in seed_effect]
        ref = [{"kl": float(s + 0.1 * rng.normal())} for s in seed_effect]
        got = stats.paired(runs, ref, "kl")
        d = [r["kl"] - q["kl"] for r, q in zip(runs, ref)]
        mean = sum(d) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
        assert (got["n"], got["df"]) == (n, n - 1)
        assert got["mean"] == pytest.approx(mean, rel=1e-12) and got["se"] == pytest.approx(se, rel=1e-12)
        assert got["t"] == pytest.approx(mean / se, rel=1e-12)
        assert got["p"] == pytest.approx(t_density_integral(mean / se, n - 1), abs=1e-9)
    one = stats.paired([{"kl": 1.0}], [{"kl": 0.5}], "kl")
    assert one["mean"] == 0.5 and one["se"] is one["t"] is one["p"] is None, "one seed: no se, no test"
    assert stats.fmt_paired(one, pct=False) == "0.500"
    same = stats.paired([{"kl": 1.0}, {"kl": 2.0}], [{"kl": 0.5}, {"kl": 1.5}], "kl")
    assert same["se"] == 0 and same["t"] == math.inf and same["p"] == 0.0


def test_holm_against_adjusted_p_values():
    """demo_stats.holm rejects exactly the hypotheses whose Holm-adjusted p-value, max over the j-th
    smallest p up to this one of min(1, (m - j) p_j), is at most the level."""
    stats = load_script("demo_stats")
    rng = np.random.default_rng(1)
    for trial in range(200):
        m = int(rng.integers(1, 12))
        ps = {f"c{i}": float(p) for i, p in enumerate(rng.uniform(0, 0.2, m) ** 2)}
        ps["no test"] = None  # a comparison with one seed: not counted
        ranked = sorted((p, k) for k, p in ps.items() if p is not None)
        adjusted, running = {}, 0.0
        for j, (p, k) in enumerate(ranked):
            running = max(running, min(1.0, (m - j) * p))
            adjusted[k] = running
        assert stats.holm(ps, 0.05) == {k for k, v in adjusted.items() if v <= 0.05}, (trial, ps)


def test_regime_schedule_counts_train_students_steps():
    """demo_regime.regime_schedule's epochs and steps per epoch give the optimizer steps train_student.py
    takes (data.plan_steps over the first N examples), and its first evaluation interval falls at least
    once per epoch and at least about REGIME_MIN_EVALS times per run."""
    demo, regime = load_script("demo"), load_script("demo_regime")
    for n_teacher, batch, nproc in ((3000, 16, 1), (600, 16, 1), (3000, 8, 2)):
        a = demo.parse_args(["--n_teacher", str(n_teacher), "--batch_size", str(batch),
                             "--nproc", str(nproc)])
        d_s = data.split_indices(n_teacher, 0)["student"]
        for n in [n for n in (1, 40, 150, 450) if n < len(d_s)] + [len(d_s)]:
            epochs, per_epoch, every = regime.regime_schedule(a, n, len(d_s))
            cfg = type("Cfg", (), {"batch_size": batch, "grad_accum": 1, "seed": 0})
            steps = len(data.plan_steps(d_s[:n], cfg, 0, nproc, range(epochs)))
            assert steps == epochs * per_epoch and abs(epochs * n - len(d_s)) <= n / 2
            assert 1 <= every <= per_epoch and (every == 1 or steps // every >= regime.REGIME_MIN_EVALS)


def test_kept_evaluation_read_from_metrics(tmp_path):
    """demo_regime.kept_eval / kept_too_early / kept_model / weights_mean on the metrics.jsonl lines a
    --keep_best student writes: the kept step is flagged exactly when it is the first or second evaluation."""
    regime = load_script("demo_regime")
    for best in (0, 3, 6, 9, 12):
        run = tmp_path / f"best{best}"
        run.mkdir()
        lines = [{"step": 0, "config": {}}, {"step": 0, "phase": "weights", "w_mean": 0.47, "mu": -9.0}]
        lines += [{"step": s, "eval_nll": 1.0 - 0.1 * (s == best)} for s in (0, 3, 6, 9)]
        lines += [{"step": 12, "eval_nll": 1.0 - 0.1 * (best == 12)}, {"step": 12, "best_step": best,
                                                                          "best_eval_nll": 0.9}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        kept = regime.kept_eval(str(run))
        assert kept == dict(best_step=best, best_eval_nll=0.9, last_step=12, eval_steps=[0, 3, 6, 9, 12])
        assert regime.kept_too_early(kept) == (best in (0, 3))
        assert regime.kept_model(str(run)) == f"{run}/" + ("final" if best == 12 else "best/final")
        assert regime.weights_mean(str(run)) == 0.47


def test_regime_tables_star_exactly_holms_rejections(tmp_path, monkeypatch):
    """demo_regime.write_regime on synthetic per-seed metrics (2 teachers x 2 sizes x 5 seeds, the -weights
    arms in one cell, one run keeping its first evaluation): the comparisons it counts are every Δ of the
    early-stopped and -weights tables, each Δ is the per-seed mean difference of its rows, it stars what
    Holm-Bonferroni (written out as adjusted p-values) rejects, and it marks the cell it cannot judge."""
    demo, regime = load_script("demo"), load_script("demo_regime")
    teacher = dict(entropy=0.1, branching=0.1, n_branching=5, n_positions=50)
    monkeypatch.setattr(regime, "exact_teacher", lambda w, tok, n: teacher)
    a = demo.parse_args(["--out", str(tmp_path), "--n_teacher", "600", "--regime_seeds", "5"])
    rng = np.random.default_rng(3)
    sizes, seeds, n_s = [40, 270], 5, 270
    worlds = {name: {"w": None, "tok": None, "w_mean": 0.5} for name in ("default", "rich")}
    shift = {"bbkd": 0.0, "proxykd": -0.02, "no_weights": -0.03, "scaled": -0.021}  # some Δ clear, some not
    rows, jobs, every = {}, {}, {}
    for name in worlds:
        rows[name] = {k: [{"kl": 0.1, "exact_match": 0.5}]
                      for k in ("proxy base", "proxy aligned", "student base")}
        for n in sizes:
            every[name, n] = 3
            arms = ["bbkd", "proxykd"] + ["no_weights", "scaled"] * (name == "rich" and n == 40)
            seed_effect = rng.normal(0, 0.01, seeds)
            jobs[name, n] = {}
            for arm in arms:
                runs = []
                for s in range(seeds):
                    run = tmp_path / f"{name}_{n}_{arm}_{s}"
                    run.mkdir()
                    best = 0 if (name, n, arm, s) == ("default", 40, "bbkd", 1) else 9
                    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
                        [{"step": t, "eval_nll": 1.0} for t in (0, 3, 6, 9)] + [{"step": 9, "best_step": best,
                                                                                 "best_eval_nll": 0.9}])))
                    runs.append(type("Job", (), {"out": str(run)}))
                    kl = 0.2 + shift[arm] + seed_effect[s] + rng.normal(0, 0.004)
                    for which in ("kept", "last"):
                        rows[name].setdefault(f"{arm} n{n} {which}", []).append(
                            {"kl": kl, "nll": kl + 0.1, "exact_match": 0.5 - kl, "best_step": best})
                jobs[name, n][arm] = runs
    regime.write_regime(a, str(tmp_path), worlds, sizes, n_s, rows, jobs, every, [], 0.0)
    res = json.load(open(tmp_path / "regime" / "results.json"))
    md = open(tmp_path / "regime" / "results.md").read()
    comps = res["comparisons"]
    assert len(comps) == res["comparisons_tested"] == 4 * 3 + 2 * 3
    assert f"over the table's {len(comps)} comparisons" in md
    ps = {}
    for c in comps:
        ref = regime.REGIME_REFERENCE[c["arm"]]
        runs, refs = (rows[c["teacher"]][f"{arm} n{c['size']} kept"] for arm in (c["arm"], ref))
        d = [x[c["metric"]] - y[c["metric"]] for x, y in zip(runs, refs)]
        assert c["mean"] == pytest.approx(sum(d) / seeds, abs=1e-12) and c["df"] == seeds - 1
        assert c["se"] == pytest.approx(float(np.std(d, ddof=1)) / math.sqrt(seeds), rel=1e-9)
        ps[c["teacher"], c["size"], c["arm"], c["metric"]] = c["p"]
    ranked, adjusted, running = sorted((p, k) for k, p in ps.items()), {}, 0.0
    for j, (p, k) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - j) * p))
        adjusted[k] = running
    starred = {(c["teacher"], c["size"], c["arm"], c["metric"]) for c in comps if c["star"]}
    assert starred == {k for k, v in adjusted.items() if v <= 0.05}
    assert 0 < len(starred) < len(comps), "the synthetic effects should give both outcomes"
    assert md.count(" * |") == len(starred)
    assert "| default | 40 (7) † |" in md and "black-box KD 1 of 5" in md and md.count("†") == 2
    weights_table = [line for line in md.splitlines() if line.startswith("| rich | 40 | Proxy-KD")]
    assert len(weights_table) == 3 and weights_table[0].count("| - |") == 3, "Proxy-KD: the reference, no Δ"
