"""data.py properties: reader errors, template/label mask, truncation, collate, splits and rank batches,
atomic writes, and the tokenizer; the demo world (scripts/demo_world.py) supplies the data they run on."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

import data
from scripts import demo_world

ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """300 demo examples and a tokenizer trained on them."""
    d = tmp_path_factory.mktemp("demo")
    path = demo_world.write_demo_jsonl(str(d / "teacher.jsonl"), 300, seed=0)
    tok_path = demo_world.train_demo_tokenizer([path], str(d / "tok"), 320)
    return {"dir": d, "path": path, "tok": data.Tokenizer(tok_path), "examples": data.read_jsonl(path)}


# ---------------------------------------------------------------------------------------------------
# reader


GOOD = json.dumps({"prompt": "p", "response": "r"})


@pytest.mark.parametrize("line, what", [
    ('{"prompt": "p", "response": ', "invalid JSON"),
    ('["p", "r"]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"prompt": "p"}', "missing field 'response'"),
    ('{"response": "r"}', "missing field 'prompt'"),
    ('{"prompt": "p", "response": 5}', "field 'response' must be a string, got int"),
    ('{"prompt": null, "response": "r"}', "field 'prompt' must be a string, got NoneType"),
    ('{"prompt": "p", "response": ""}', "empty response"),
    ('{"prompt": "p", "response": " \\n "}', "empty response"),
    ('{"prompt": "", "response": "r"}', "empty prompt"),
])
def test_reader_errors_name_file_line_and_what(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n" + GOOD + "\n")  # the bad line is line 3
    with pytest.raises(ValueError) as e:
        data.read_jsonl(str(path))
    assert f"{path}:3: " in str(e.value) and what in str(e.value), str(e.value)


def test_reader_rejects_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "caf\u00e9", "response": "r"}'.encode("latin-1")
                     + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8")):
        data.read_jsonl(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no examples")):
        data.read_jsonl(str(empty))


def test_reader_counts_blank_lines_and_keeps_order(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "extra": i} for i in range(5)]
    lines = [json.dumps(rows[0]), "", json.dumps(rows[1]), "   ", json.dumps(rows[2]), json.dumps(rows[3]),
             "", json.dumps(rows[4])]
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = {}
    exs = data.read_jsonl(str(path), stats=stats)
    assert stats == {"lines": len(lines), "blank": 3, "examples": 5}
    assert ([(e.prompt, e.response, e.system) for e in exs]
            == [(r["prompt"], r["response"], None) for r in rows])
    assert [e.where for e in exs] == [f"{path}:{i + 1}" for i, l in enumerate(lines) if l.strip()]


def test_openorca_fields(tmp_path):
    rows = [{"id": "a", "system_prompt": "You are helpful.", "question": "Q1?", "response": "R1."},
            {"id": "b", "system_prompt": "", "question": "Q2?", "response": "R2."},
            {"id": "c", "system_prompt": None, "question": "Q3?", "response": "R3."}]
    path = tmp_path / "orca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = data.read_jsonl(str(path), prompt_field="question", response_field="response",
                          system_field="system_prompt")
    assert [(e.system, e.prompt, e.response) for e in exs] == [("You are helpful.", "Q1?", "R1."),
                                                                (None, "Q2?", "R2."), (None, "Q3?", "R3.")]
    assert data.format_prompt(exs[0].system, exs[0].prompt).startswith(
        "You are helpful.\n\n### Question:\nQ1?")
    assert data.format_prompt(exs[1].system, exs[1].prompt) == "### Question:\nQ2?\n\n### Answer:\n"
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: missing field 'prompt'")):
        data.read_jsonl(str(path))  # default field names do not fit OpenOrca
    path.write_text(json.dumps({"system_prompt": 3, "question": "q", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match="field 'system_prompt' must be a string, got int"):
        data.read_jsonl(str(path), prompt_field="question", system_field="system_prompt")


# ---------------------------------------------------------------------------------------------------
# encoding, truncation, collate


def test_labels_mask_exactly_the_prompt(demo):
    tok = demo["tok"]
    for ex in demo["examples"][:100] + [data.Example("Why?", "Because.", "x:1", system="Be brief.")]:
        enc = data.encode_example(tok, ex, 10_000)
        prompt = tok.encode(data.format_prompt(ex.system, ex.prompt), bos=True)
        reply = tok.encode(ex.response, eos=True)
        assert enc["input_ids"] == prompt + reply
        assert enc["labels"] == [data.IGNORE_INDEX] * len(prompt) + reply
        assert enc["input_ids"][: len(prompt)] == data.encode_prompt(tok, ex.system, ex.prompt)
        scored = [t for t in enc["labels"] if t != data.IGNORE_INDEX]
        assert scored[-1] == tok.eos_id and tok.decode(scored) == ex.response


def test_truncation_policy_and_counts(demo):
    tok = demo["tok"]
    rng = random.Random(0)
    for ex in rng.sample(demo["examples"], 20):
        p = tok.encode(data.format_prompt(ex.system, ex.prompt))
        r = tok.encode(ex.response, eos=True)
        full = 1 + len(p) + len(r)
        for max_len in sorted({2, 3, 5, len(r), len(p), full - 1, full, full + 3,
                               *rng.sample(range(2, full + 5), 8)}):
            if max_len < 2:
                continue
            stats, before = {}, data.COUNTS["truncated"]
            enc = data.encode_example(tok, ex, max_len, stats=stats)
            ids, labels = enc["input_ids"], enc["labels"]
            n_prompt = sum(1 for t in labels if t == data.IGNORE_INDEX) - 1
            kept_p, kept_r = ids[1 : 1 + n_prompt], ids[1 + n_prompt :]
            assert len(ids) == len(labels) == min(full, max_len)
            assert ids[0] == tok.bos_id and labels[1 + n_prompt :] == kept_r
            assert kept_p == p[len(p) - len(kept_p) :], "prompt keeps its tail"
            assert kept_r == r[: len(kept_r)] and len(kept_r) >= 1, "response keeps its head, never empty"
            if full > max_len:  # response kept whole when cutting the prompt is enough, else prompt >= half
                assert len(kept_r) == len(r) or len(kept_p) >= min(len(p), (max_len - 1) // 2)
            truncated = full > max_len
            assert stats.get("truncated", 0) == int(truncated) and stats["examples"] == 1
            assert data.COUNTS["truncated"] - before == int(truncated)
    with pytest.raises(ValueError):
        data.encode_example(tok, demo["examples"][0], 1)


def test_collate_right_pads(demo):
    tok = demo["tok"]
    encs = [data.encode_example(tok, ex, 64) for ex in demo["examples"][:7]]
    encs.append({"input_ids": [tok.bos_id, 9], "labels": [data.IGNORE_INDEX, 9]})
    batch = data.collate(encs, tok.pad_id)
    T = max(len(e["input_ids"]) for e in encs)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(encs), T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, e in enumerate(encs):
        n = len(e["input_ids"])
        assert (batch["input_ids"][b, :n].tolist() == e["input_ids"]
                and batch["labels"][b, :n].tolist() == e["labels"])
        assert ((batch["input_ids"][b, n:] == tok.pad_id).all()
                and (batch["labels"][b, n:] == data.IGNORE_INDEX).all())


# ---------------------------------------------------------------------------------------------------
# splits and rank batches


@pytest.mark.parametrize("n", [0, 1, 9, 10, 80, 1000, 12345])
def test_split_sizes_disjoint_complete_seeded(n):
    s = data.split_indices(n, seed=3)
    w, p, st = s["warmup"], s["proxy"], s["student"]
    assert sorted(w + p + st) == list(range(n)), "disjoint and complete"
    assert len(w) == n // 10 and len(p) == (n - n // 10) // 2 and len(st) - len(p) in (0, 1)
    assert all(part == sorted(part) for part in (w, p, st))
    assert data.split_indices(n, seed=3) == s
    if n >= 80:
        assert data.split_indices(n, seed=4) != s
        assert w != list(range(len(w))), "the split is shuffled, not the file's head"


def test_split_and_batches_independent_of_python_hash_seed():
    # this process runs under a random hash seed (unless the caller fixed one); the child under a fixed one
    code = ("import json; import data; "
            "print(json.dumps([data.split_indices(500, 7), "
            "data.rank_batches(list(range(50)), 4, 1, 3, 7, epoch=2)]))")
    env = {**os.environ,
           "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [data.split_indices(500, 7),
                               data.rank_batches(list(range(50)), 4, 1, 3, 7, epoch=2)]


@pytest.mark.parametrize("n, k", [(0, 3), (5, 1), (36, 2), (37, 4), (100, 16), (3, 5)])
def test_round_shards(n, k):
    indices = data.split_indices(max(n * 3, 1), 0)["proxy"][:n]
    shards = data.round_shards(indices, k)
    assert len(shards) == k
    assert sorted(i for s in shards for i in s) == sorted(indices)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("n, batch_size, world", [(1, 1, 1), (7, 2, 3), (36, 4, 2), (37, 4, 2), (100, 8, 1),
                                                  (10, 3, 4), (64, 8, 8)])
def test_rank_batches_lockstep_and_cover(n, batch_size, world):
    indices = sorted(random.Random(n).sample(range(1000), n))
    per_rank = [data.rank_batches(indices, batch_size, r, world, seed=1, epoch=0) for r in range(world)]
    G = batch_size * world
    n_batches = -(-n // G)
    assert all(len(bs) == n_batches for bs in per_rank), "every rank has the same number of batches"
    assert all(len(b) == batch_size for bs in per_rank for b in bs)
    seen = [i for bs in per_rank for b in bs for i in b]
    assert set(seen) == set(indices) and len(seen) == n_batches * G
    assert len(seen) - len(set(seen)) <= G - 1, "only the wrap-padding repeats"
    # the global batches depend on G only: the same sets with G on one rank
    one = data.rank_batches(indices, G, 0, 1, seed=1, epoch=0)
    assert [sorted(sum((bs[j] for bs in per_rank), [])) for j in range(n_batches)] == [sorted(b) for b in one]
    # stable for (seed, epoch), independent of the input order; another epoch reshuffles
    assert data.rank_batches(indices[::-1], batch_size, 0, world, seed=1, epoch=0) == per_rank[0]
    if n >= 30:
        assert data.rank_batches(indices, batch_size, 0, world, seed=1, epoch=1) != per_rank[0]
        assert data.rank_batches(indices, batch_size, 0, world, seed=2, epoch=0) != per_rank[0]


def test_rank_batches_empty_and_bad_args():
    assert data.rank_batches([], 4, 1, 2, seed=0) == []
    with pytest.raises(ValueError):
        data.rank_batches([1, 2], 2, 2, 2, seed=0)


# ---------------------------------------------------------------------------------------------------
# files


def test_atomic_write_whole_or_absent(tmp_path, monkeypatch):
    path = str(tmp_path / "f.txt")
    data.atomic_write(path, "old")
    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "replace", boom)
    with pytest.raises(OSError):
        data.atomic_write(path, "new")
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


# ---------------------------------------------------------------------------------------------------
# tokenizer


def test_check_same_vocab(demo, tmp_path):
    tok = demo["tok"]
    copy = shutil.copy(tok.path, tmp_path / "copy.model")
    data.check_same_vocab(tok, data.Tokenizer(copy))
    smaller = data.Tokenizer(demo_world.train_demo_tokenizer([demo["path"]], str(tmp_path / "small"), 200))
    with pytest.raises(ValueError) as e:
        data.check_same_vocab(tok, smaller)
    assert tok.path in str(e.value) and smaller.path in str(e.value)
    # same size, different pieces: trained on other text
    other_path = str(tmp_path / "other.jsonl")
    with open(other_path, "w") as f:
        for i in range(300):
            f.write(json.dumps({"prompt": f"Spell the word number {i} backwards.",
                                "response": f"Reversed: {str(i)[::-1]} xyz qrs."}) + "\n")
    other = data.Tokenizer(demo_world.train_demo_tokenizer([other_path], str(tmp_path / "other"), 120))
    small2 = data.Tokenizer(demo_world.train_demo_tokenizer([demo["path"]], str(tmp_path / "small2"),
                                                            other.vocab_size))
    assert small2.vocab_size == other.vocab_size
    with pytest.raises(ValueError, match="first difference at id"):
        data.check_same_vocab(small2, other)


def test_tokenizer_without_pad_falls_back_to_eos(demo, tmp_path):
    import sentencepiece as spm
    texts = [e.response for e in demo["examples"]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "nopad"),
                                   vocab_size=80, model_type="bpe", pad_id=-1, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    tok = data.Tokenizer(str(tmp_path / "nopad.model"))
    assert tok.sp.pad_id() == -1 and tok.pad_id == tok.eos_id


def test_seed_of_is_fixed_and_separates_keys():
    """seed_of: a pure function of its key (no Python hash seed), distinct across nearby keys, and a valid
    torch seed."""
    keys = [("sample", s, r, k) for s in range(3) for r in range(1, 5) for k in range(4)]
    seeds = [data.seed_of(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))
    # another interpreter with another hash seed gives the same value
    code = "import data; print(data.seed_of('sample', 0, 1, 1))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "123"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == data.seed_of("sample", 0, 1, 1)


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/missing.model: cannot read the tokenizer")):
        data.Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not a sentencepiece model")):
        data.Tokenizer(str(bad))
