"""The demo teacher measured exactly: its enumerated replies and next-token distributions (what
scripts/demo.py's exact KL column uses) against sampling frequencies and the chain rule."""

import collections
import math

import numpy as np
import pytest

import data


def chi2_bound(df: int) -> float:
    """A generous acceptance bound for a chi-square statistic with df degrees of freedom: mean + 8 std.
    The samples are seeded, so a pass is reproducible; a wrong distribution (a missing or mis-weighted
    branch) gives a statistic in the thousands at these sample sizes."""
    return df + 8 * math.sqrt(2 * df)


def chi2(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs), f"sampled outcomes the enumeration lacks: {set(counts) - set(probs)}"
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_exact")
    path = data.write_demo_jsonl(str(d / "teacher.jsonl"), 300, seed=0)
    return data.Tokenizer(data.train_demo_tokenizer([path], str(d / "tok"), 320))


@pytest.mark.parametrize("steps", [(2, 2), (3, 3)])
def test_enumerated_replies_match_sampling_frequencies(steps):
    prompt = data.make_demo_prompts(1, seed=11, steps=steps)[0]
    replies = data.demo_teacher_replies(prompt)
    assert len(replies) == 3 * 6 ** (steps[0] - 1) * 3 * 4
    assert math.isclose(sum(replies.values()), 1.0, rel_tol=1e-12)
    n = 30_000
    rng = np.random.default_rng(0)
    counts = collections.Counter(data.demo_teacher(prompt, rng) for _ in range(n))
    assert chi2(counts, replies, n) < chi2_bound(len(replies) - 1)


def test_next_token_dists_chain_rule_and_sampling(tok):
    prompt = data.make_demo_prompts(1, seed=3, steps=(3, 3))[0]
    replies = data.demo_teacher_replies(prompt)
    seq_probs = collections.defaultdict(float)  # token sequence -> probability (texts may share one)
    for text, p in replies.items():
        seq_probs[tuple(tok.encode(text, eos=True))] += p
    # chain rule, exactly: the product of a reply's next-token probabilities is the reply's probability
    for text in list(replies)[::37]:
        dists = data.teacher_next_token_dists(tok, prompt, text)
        ids = tok.encode(text, eos=True)
        assert len(dists) == len(ids)
        assert all(math.isclose(sum(d.values()), 1.0, rel_tol=1e-12) for d in dists)
        assert math.isclose(math.prod(d[y] for d, y in zip(dists, ids)), seq_probs[tuple(ids)], rel_tol=1e-9)
    # sampling: along one sampled reply, the next-token frequencies among samples sharing its prefix
    rng = np.random.default_rng(1)
    samples = [tuple(tok.encode(data.demo_teacher(prompt, rng), eos=True)) for _ in range(20_000)]
    target = samples[0]
    dists = data.teacher_next_token_dists(tok, prompt, tok.decode(target))
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
    prompt = data.make_demo_prompts(1, seed=3)[0]
    with pytest.raises(ValueError, match="not a reply"):
        data.teacher_next_token_dists(tok, prompt, data.demo_base_reply(prompt))


def test_prompt_ranges():
    prompts = data.make_demo_prompts(200, seed=4, steps=(4, 5), start=(20, 60), k=(10, 29))
    for p in prompts:
        _, _, count, steps = data._parse_prompt(p)
        assert 20 <= count <= 60 and 4 <= len(steps) <= 5 and all(10 <= k <= 29 for _, k in steps)
        running = count
        for verb, k in steps:
            running += data._VERBS[verb][1] * k
            assert running >= 0
        assert data.reference_answer(p) == str(running) == data.extract_answer(data.demo_teacher(p, 0))
    assert data.make_demo_prompts(50, seed=4) == data.make_demo_prompts(50, seed=4, steps=(2, 3), start=(2, 20), k=(1, 9))


def load_demo_script():
    """scripts/demo.py as a module, without letting its kernel pins (os.environ.setdefault at import) leak
    into the environment of later tests' subprocesses."""
    import importlib.util
    import os
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("demo_script", os.path.join(os.path.dirname(__file__), "scripts", "demo.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


def test_demo_exact_kl_equals_a_plain_loop(tok, tmp_path):
    """demo.exact_metrics (one gather over a dense teacher matrix) against a loop over each position's
    teacher distribution, on a random model whose argmax sometimes hits the teacher's."""
    import torch
    from model import Llama, ModelArgs
    demo = load_demo_script()
    heldout = data.write_demo_jsonl(str(tmp_path / "heldout.jsonl"), 5, seed=9)
    ex = demo.exact_teacher({"heldout": heldout}, tok, 5)
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=256,
                            vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        got = demo.exact_metrics(model, ex, "cpu")
        kl, agree, n = 0.0, 0, 0
        for e in data.read_jsonl(heldout):
            enc = data.encode_example(tok, e, 256)
            logq = torch.log_softmax(model(torch.tensor([enc["input_ids"]]))[0].double(), -1)
            start = enc["labels"].index(tok.encode(e.response)[0])  # first response position
            for j, dist in enumerate(data.teacher_next_token_dists(tok, e.prompt, e.response)):
                q = logq[start + j - 1]
                kl += sum(p * (math.log(p) - q[v].item()) for v, p in dist.items())
                agree += dist.get(int(q.argmax()), 0.0) == max(dist.values())
                n += 1
    assert n == len(ex["rows"])
    assert got["kl"] == pytest.approx(kl / n, rel=1e-9)
    assert got["teacher_top1"] == pytest.approx(agree / n, abs=1e-12)
