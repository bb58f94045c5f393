"""The demo world: a synthetic black-box teacher of short word problems, the embedded default for the
CPU demo (scripts/demo.py) and the tests.

The teacher answers problems like "Mia has 7 apples. She finds 3 more. Then she gives away 2. How many
apples does Mia have?" (make_demo_prompts) with a worked reply (demo_teacher). It samples its phrasing
at random: one of 3 start sentences, one of 3 sentences per step (after the first, led by "Then" with
probability 1/2), one of 4 final-answer forms. So its token distribution branches (the soft-label
information a proxy can pass on), but its arithmetic and final number are always right, checkable with
extract_answer(reply) == reference_answer(prompt). Because it is a known grammar, its distribution is
computable exactly: demo_teacher_replies enumerates every reply with its probability, and
teacher_next_token_dists gives its exact next-token distributions along any reply under a tokenizer.

Also here: demo_base_reply (the demo bases' pretraining style), write_demo_jsonl (teacher data as the
JSONL data.read_jsonl reads) and train_demo_tokenizer (a small sentencepiece model; with real data,
use the base model's own tokenizer.model). Importable as `demo_world` (scripts/ on sys.path, as for
scripts/demo.py) or as `scripts.demo_world` (from the repository root, as in the tests).
"""

import collections
import io
import itertools
import json
import math
import os
import re
import sys

import numpy as np
import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data import Tokenizer, atomic_write, format_prompt, read_jsonl  # noqa: E402

_NAMES = {"Mia": "she", "Ava": "she", "Zoe": "she", "Eva": "she", "Leo": "he", "Tom": "he", "Max": "he", "Ben": "he"}
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pens", "cards", "shells")
# verb (3rd person) -> (gerund, sign)
_VERBS = {"finds": ("finding", +1), "buys": ("buying", +1), "gets": ("getting", +1),
          "loses": ("losing", -1), "gives away": ("giving away", -1), "sells": ("selling", -1)}
_GAIN = [v for v, (_, s) in _VERBS.items() if s > 0]
_LOSE = [v for v, (_, s) in _VERBS.items() if s < 0]

_PROMPT_RE = re.compile(r"([A-Z][a-z]+) has (\d+) ([a-z]+)\. (.*) How many ([a-z]+) does ([A-Z][a-z]+) have\?")
_STEP_RE = re.compile(r"(?:Then )?(?:[Ss]he|[Hh]e) (" + "|".join(_VERBS) + r") (\d+)(?: more)?\.")
_ANSWER_RE = re.compile(r"(?:The answer is|Answer:|####|In the end, [A-Z][a-z]+ has) (-?\d+)")


def make_demo_prompts(n: int, seed: int, steps: tuple[int, int] = (2, 3), start: tuple[int, int] = (2, 20),
                      k: tuple[int, int] = (1, 9)) -> list[str]:
    """n word problems: a named person has start[0]..start[1] items, then steps[0]..steps[1] steps of gaining
    or losing k[0]..k[1] (never below zero). Deterministic in (n, seed, ranges). The defaults (answers <= 47)
    are the demo's main world; scripts/demo.py --sweep asks for longer chains of larger numbers."""
    rng = np.random.default_rng([seed, 0xDE40])
    names = list(_NAMES)
    out = []
    for _ in range(n):
        name = names[rng.integers(len(names))]
        pron, item = _NAMES[name], _ITEMS[rng.integers(len(_ITEMS))]
        count = int(rng.integers(start[0], start[1] + 1))
        text = [f"{name} has {count} {item}."]
        for s in range(int(rng.integers(steps[0], steps[1] + 1))):
            kk = int(rng.integers(k[0], k[1] + 1))
            if count >= kk and rng.random() < 0.5:
                verb, more, count = _LOSE[rng.integers(len(_LOSE))], "", count - kk
            else:
                verb, more, count = _GAIN[rng.integers(len(_GAIN))], " more", count + kk
            text.append(f"{pron.capitalize() if s == 0 else 'Then ' + pron} {verb} {kk}{more}.")
        text.append(f"How many {item} does {name} have?")
        out.append(" ".join(text))
    return out


def _parse_prompt(prompt: str) -> tuple[str, str, int, list[tuple[str, int]]]:
    """Demo prompt -> (name, items, start count, [(verb, k), ...]); ValueError if it is not one."""
    m = _PROMPT_RE.fullmatch(prompt.strip())
    if not m or m.group(1) != m.group(6) or m.group(3) != m.group(5) or m.group(1) not in _NAMES:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    steps = list(_STEP_RE.finditer(m.group(4)))
    if not steps or " ".join(s.group(0) for s in steps) != m.group(4):
        raise ValueError(f"not a demo prompt (steps): {prompt!r}")
    return m.group(1), m.group(3), int(m.group(2)), [(s.group(1), int(s.group(2))) for s in steps]


def reference_answer(prompt: str) -> str:
    """The true final count, computed from the demo prompt's text (not from any reply)."""
    _, _, count, steps = _parse_prompt(prompt)
    return str(count + sum(_VERBS[v][1] * k for v, k in steps))


def _teacher_choices(prompt: str) -> list[list[str]]:
    """The teacher's phrasing options, in the order it draws them: [start sentences], then per step
    [its 3 sentences], then [answer forms]. Shared by demo_teacher (samples) and demo_teacher_replies
    (enumerates), so the two cannot drift apart."""
    name, item, count, steps = _parse_prompt(prompt)
    pron = _NAMES[name]
    P = pron.capitalize()
    out = [[f"{name} starts with {count} {item}.", f"At first, {name} has {count} {item}.", f"{name} begins with {count}."]]
    for verb, k in steps:
        gerund, sign = _VERBS[verb]
        op, new = ("+", count + k) if sign > 0 else ("-", count - k)
        more = " more" if sign > 0 else ""
        out.append([f"{P} {verb} {k}, so {pron} has {count} {op} {k} = {new}.",
                    f"After {gerund} {k}{more}: {count} {op} {k} = {new}.",
                    f"{count} {op} {k} = {new}, as {pron} {verb} {k}."])
        count = new
    out.append([f"The answer is {count}.", f"Answer: {count}", f"#### {count}", f"In the end, {name} has {count}."])
    return out


def _then(sentence: str) -> str:
    return "Then " + sentence[0].lower() + sentence[1:] if sentence[0].isalpha() else "Then " + sentence


def demo_teacher(prompt: str, rng=None) -> str:
    """The black-box teacher: a demo prompt -> a worked reply (text only).

    rng: np.random.Generator, an int seed, or None (fresh entropy, as an API would answer). The phrasing
    is sampled: 3 start sentences, 3 sentences per step (after the first, each led by "Then" with
    probability 1/2), 4 answer forms, each choice uniform; the arithmetic and the final number are always
    right. demo_teacher_replies lists every reply with its exact probability.
    """
    rng = np.random.default_rng(rng)
    choices = _teacher_choices(prompt)
    pick = lambda options: options[rng.integers(len(options))]
    out = [pick(choices[0])]
    for s, options in enumerate(choices[1:-1]):
        sentence = pick(options)
        out.append(_then(sentence) if s > 0 and rng.random() < 0.5 else sentence)
    out.append(pick(choices[-1]))
    return " ".join(out)


def demo_teacher_replies(prompt: str) -> dict[str, float]:
    """Every reply demo_teacher can give to prompt -> its exact probability (the values sum to 1): the
    product of the uniform choices that build it, summed over choice paths giving the same text.
    3 * 6^(steps - 1) * 3 * 4 replies: 216 for 2 steps, 1,296 for 3, 7,776 for 4."""
    choices = _teacher_choices(prompt)
    segments = [[(o, 1 / len(choices[0])) for o in choices[0]]]
    for s, options in enumerate(choices[1:-1]):
        p = 1 / len(options)
        segments.append([(o, p) for o in options] if s == 0 else
                        [(o, p / 2) for o in options] + [(_then(o), p / 2) for o in options])
    segments.append([(o, 1 / len(choices[-1])) for o in choices[-1]])
    out: dict[str, float] = {}
    for combo in itertools.product(*segments):
        text = " ".join(t for t, _ in combo)
        out[text] = out.get(text, 0.0) + math.prod(p for _, p in combo)
    return out


def teacher_next_token_dists(tok: Tokenizer, prompt: str, response: str) -> list[dict[int, float]]:
    """The demo teacher's exact next-token distributions along one of its replies, tokenised as the
    models see it (tok.encode(response, eos=True), encode_example's response part): entry t maps each
    token v to P(token t = v | the reply's tokens before t).

    Exact: enumerate every reply with its probability (demo_teacher_replies), tokenise each, and at each
    position sum the probabilities of the replies that share the prefix, grouped by their next token.
    ValueError if response is not a reply the teacher can give."""
    replies = demo_teacher_replies(prompt)
    seqs = [tok.encode(r, eos=True) for r in replies]
    probs = list(replies.values())
    target = tok.encode(response, eos=True)
    alive = range(len(seqs))
    dists = []
    for t, y in enumerate(target):
        dist: dict[int, float] = collections.defaultdict(float)
        for i in alive:  # every alive sequence shares target[:t] and so is longer than t (eos comes last)
            dist[seqs[i][t]] += probs[i]
        alive = [i for i in alive if seqs[i][t] == y]
        if not alive:
            raise ValueError(f"not a reply the demo teacher gives to {prompt!r}: {response!r}")
        z = sum(dist.values())
        dists.append({v: p / z for v, p in dist.items()})
    return dists


def demo_base_reply(prompt: str) -> str:
    """The demo's stand-in for pretraining text: the same problems worked in one fixed terse style unlike
    the teacher's ("7 + 3 = 10. 10 - 2 = 8. Total: 8 apples."). Base models pretrained on it can do the
    arithmetic but speak unlike the teacher (extract_answer finds no answer form in it), so what the
    proxy and the student learn from the teacher's text is visible in the demo's metrics."""
    _, item, count, steps = _parse_prompt(prompt)
    out = []
    for verb, k in steps:
        new = count + _VERBS[verb][1] * k
        out.append(f"{count} {'+' if _VERBS[verb][1] > 0 else '-'} {k} = {new}.")
        count = new
    return " ".join(out + [f"Total: {count} {item}."])


def extract_answer(text: str) -> str | None:
    """The final number of a reply in any of the teacher's answer forms (the last one if several), as a
    canonical integer string; None if the text has none."""
    hits = _ANSWER_RE.findall(text)
    return str(int(hits[-1])) if hits else None


def write_demo_jsonl(path: str, n: int, seed: int, **ranges) -> str:
    """n teacher examples {"prompt", "response"} (deterministic in (n, seed, ranges); ranges go to
    make_demo_prompts) -> path, written atomically."""
    rng = np.random.default_rng([seed, 0x7EAC])
    lines = [json.dumps({"prompt": p, "response": demo_teacher(p, rng)}) + "\n" for p in make_demo_prompts(n, seed, **ranges)]
    atomic_write(path, "".join(lines).encode("utf-8"))
    return path


def train_demo_tokenizer(jsonl_paths: list[str], model_prefix: str, vocab_size: int = 320) -> str:
    """Train a BPE sentencepiece tokenizer on the templated prompts and the responses of jsonl_paths (read
    with the default fields) -> model_prefix + ".model" (written atomically).

    Ids: unk 0, bos 1, eos 2, pad 3; "\\n" is a user-defined piece (the template needs it and the
    identity normalizer keeps it); digits split; no byte fallback (it would cost 256 pieces: text with
    characters unseen in training maps to unk). vocab_size is a soft cap (small corpora may give fewer
    pieces). Deterministic: same inputs -> same file bytes (single thread, no input sampling, and no
    file paths stored in the model).
    """
    sentences = []
    for path in jsonl_paths:
        for ex in read_jsonl(path):
            sentences += [format_prompt(ex.system, ex.prompt), ex.response]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        split_digits=True, character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["\n"],
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = model_prefix + ".model"
    atomic_write(path, buf.getvalue())
    return path
