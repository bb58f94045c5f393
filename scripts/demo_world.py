"""The demo world: a synthetic black-box teacher of short word problems, the embedded default for the
CPU demo (scripts/demo.py) and the tests.

The teacher answers problems like "Mia has 7 apples. She finds 3 more. Then she gives away 2. How many
apples does Mia have?" (make_demo_prompts) with a worked reply (demo_teacher). It samples its phrasing
at random: one of 3 start sentences, one of 3 sentences per step (after the first, led by "Then" with
probability 1/2), one of 4 final-answer forms. So its token distribution branches (the soft-label
information a proxy can pass on), but its arithmetic and final number are always right, checkable with
extract_answer(reply) == reference_answer(prompt). With rich=True it phrases far more freely (16
openings; per step 184 sentence forms from synonyms, number words and units, each after the first led
by one of 7 connectives; 8 answer forms): about three times the entropy per token, and three times the
share of positions where it branches.

Because it is a known grammar, its distribution is computable exactly. A reply is a chain of
independently drawn segments joined by spaces (teacher_segments), and sentencepiece never merges across
a space, so the exact next-token distribution along any reply follows from the segments' own token
sequences (teacher_next_token_dists); demo_teacher_replies enumerates the default teacher's replies
whole, a brute-force check of that computation.

Also here: demo_base_reply (the demo bases' pretraining style), write_demo_jsonl (teacher data as the
JSONL data.read_jsonl reads), write_fresh_jsonl (the same, on prompts no other set holds) and
train_demo_tokenizer (a small sentencepiece model; with real data,
use the base model's own tokenizer.model). Importable as `demo_world` (scripts/ on sys.path, as for
scripts/demo.py) or as `scripts.demo_world` (from the repository root, as in the tests).
"""

import collections
import functools
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

_NAMES = {"Mia": "she", "Ava": "she", "Zoe": "she", "Eva": "she",
          "Leo": "he", "Tom": "he", "Max": "he", "Ben": "he"}
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pens", "cards", "shells")
# verb (3rd person) -> (gerund, sign)
_VERBS = {"finds": ("finding", +1), "buys": ("buying", +1), "gets": ("getting", +1),
          "loses": ("losing", -1), "gives away": ("giving away", -1), "sells": ("selling", -1)}
_GAIN = [v for v, (_, s) in _VERBS.items() if s > 0]
_LOSE = [v for v, (_, s) in _VERBS.items() if s < 0]

_PROMPT_RE = re.compile(r"([A-Z][a-z]+) has (\d+) ([a-z]+)\. (.*) "
                        r"How many ([a-z]+) does ([A-Z][a-z]+) have\?")
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
    out = [[f"{name} starts with {count} {item}.", f"At first, {name} has {count} {item}.",
            f"{name} begins with {count}."]]
    for verb, k in steps:
        gerund, sign = _VERBS[verb]
        op, new = ("+", count + k) if sign > 0 else ("-", count - k)
        more = " more" if sign > 0 else ""
        out.append([f"{P} {verb} {k}, so {pron} has {count} {op} {k} = {new}.",
                    f"After {gerund} {k}{more}: {count} {op} {k} = {new}.",
                    f"{count} {op} {k} = {new}, as {pron} {verb} {k}."])
        count = new
    out.append([f"The answer is {count}.", f"Answer: {count}", f"#### {count}",
                f"In the end, {name} has {count}."])
    return out


# the rich teacher's connectives before each step after the first ("" = none)
_CONNECTIVES = ("", "Then ", "Next, ", "After that, ", "Later, ", "And then ", "Soon after, ")


@functools.lru_cache(maxsize=64)  # a teacher drawing many replies to one prompt builds its options once
def _rich_choices(prompt: str) -> tuple[tuple[str, ...], ...]:
    """The rich teacher's options, each segment drawn uniformly: [openings], per step [its sentences,
    after the first step each led by a connective], [answer forms]. Every option keeps the numbers right,
    and every answer form is one extract_answer reads."""
    name, item, count, steps = _parse_prompt(prompt)
    pron = _NAMES[name]
    P = pron.capitalize()
    out = [[f"{first}, {name} {has} {count} {item}."
            for first in ("At first", "In the beginning", "To start", "Initially")
            for has in ("has", "holds", "owns")]
           + [f"{name} {v} with {count}{rest}." for v in ("starts", "begins") for rest in ("", f" {item}")]]
    for s, (verb, k) in enumerate(steps):
        gerund, sign = _VERBS[verb]
        new = count + sign * k
        more = " more" if sign > 0 else ""
        forms = []
        for op in (("+", "plus") if sign > 0 else ("-", "minus")):
            for eq in ("=", "is", "makes"):
                for unit in ("", f" {item}"):
                    calc = f"{count} {op} {k} {eq} {new}{unit}"
                    forms += [f"{P} {verb} {k}, {so} {pron} {has} {calc}."
                              for so in ("so", "which means", "and now", "so that")
                              for has in ("has", "holds")]
                    forms += [f"{after} {gerund} {k}{more}: {calc}." for after in ("After", "Upon", "On")]
                    forms += [f"{calc}, {why} {pron} {verb} {k}." for why in ("as", "because", "since")]
                    forms.append(f"{calc}.")
        forms += [f"{P} {verb} {k}{more}. {now} {pron} {has} {new}."
                  for now in ("Now", "So") for has in ("has", "holds")]
        out.append(forms if s == 0 else [_lead(c, f) for c in _CONNECTIVES for f in forms])
        count = new
    out.append([f"The answer is {count}.", f"The answer is {count} {item}.", f"Answer: {count}",
                f"Answer: {count} {item}", f"#### {count}", f"In the end, {name} has {count}.",
                f"In the end, {name} has {count} {item}.", f"{P} has {count} now. The answer is {count}."])
    return tuple(tuple(options) for options in out)


def _lead(connective: str, sentence: str) -> str:
    """A connective in front of a sentence, whose capital then drops ("Then she finds 3 ...")."""
    if not connective:
        return sentence
    return connective + (sentence[0].lower() + sentence[1:] if sentence[0].isalpha() else sentence)


def _then(sentence: str) -> str:
    return _lead("Then ", sentence)


def demo_teacher(prompt: str, rng=None, rich: bool = False) -> str:
    """The black-box teacher: a demo prompt -> a worked reply (text only).

    rng: np.random.Generator, an int seed, or None (fresh entropy, as an API would answer). The phrasing
    is sampled: 3 start sentences, 3 sentences per step (after the first, each led by "Then" with
    probability 1/2), 4 answer forms, each choice uniform; with rich=True, _rich_choices' segments, each
    uniform. The arithmetic and the final number are always right. teacher_segments gives every
    segment's options with their exact probabilities.
    """
    rng = np.random.default_rng(rng)
    pick = lambda options: options[rng.integers(len(options))]
    if rich:
        return " ".join(pick(options) for options in _rich_choices(prompt))
    choices = _teacher_choices(prompt)
    out = [pick(choices[0])]
    for s, options in enumerate(choices[1:-1]):
        sentence = pick(options)
        out.append(_then(sentence) if s > 0 and rng.random() < 0.5 else sentence)
    out.append(pick(choices[-1]))
    return " ".join(out)


def teacher_segments(prompt: str, rich: bool = False) -> list[list[tuple[str, float]]]:
    """The teacher's reply as the chain of segments demo_teacher draws independently and joins with
    spaces: per segment, its options (text, probability), the probabilities summing to 1."""
    if rich:
        return [[(o, 1 / len(options)) for o in options] for options in _rich_choices(prompt)]
    choices = _teacher_choices(prompt)
    segments = [[(o, 1 / len(choices[0])) for o in choices[0]]]
    for s, options in enumerate(choices[1:-1]):
        p = 1 / len(options)
        segments.append([(o, p) for o in options] if s == 0 else
                        [(o, p / 2) for o in options] + [(_then(o), p / 2) for o in options])
    segments.append([(o, 1 / len(choices[-1])) for o in choices[-1]])
    return segments


def demo_teacher_replies(prompt: str) -> dict[str, float]:
    """Every reply the default demo_teacher can give to prompt -> its exact probability (the values sum
    to 1): the product of the uniform choices that build it, summed over choice paths giving the same
    text. 3 * 6^(steps - 1) * 3 * 4 replies: 216 for 2 steps, 1,296 for 3, 7,776 for 4."""
    out: dict[str, float] = {}
    for combo in itertools.product(*teacher_segments(prompt)):
        text = " ".join(t for t, _ in combo)
        out[text] = out.get(text, 0.0) + math.prod(p for _, p in combo)
    return out


def teacher_next_token_dists(tok: Tokenizer, prompt: str, response: str,
                             rich: bool = False) -> list[dict[int, float]]:
    """The demo teacher's exact next-token distributions along one of its replies, tokenised as the
    models see it (tok.encode(response, eos=True), encode_example's response part): entry t maps each
    token v to P(token t = v | the reply's tokens before t).

    Exact, from the grammar's structure. The reply's tokens are its segments' tokens in a row (a space
    starts every segment after the first, and sentencepiece never merges across a space), then eos. Let
    a[i][j] be the probability that segments 0..i-1 produce exactly the reply's first j tokens. Token t
    lies in exactly one segment i, starting at some j <= t, so P(token t = v, tokens < t as in the reply)
    = sum over i, j of a[i][j] * P(segment i's tokens start with reply[j:t] + [v]); normalising over v
    gives the distribution. ValueError if response is not a reply the teacher can give."""
    segments = []
    for options in teacher_segments(prompt, rich) + [[(None, 1.0)]]:  # eos: a last segment of one token
        merged: dict[tuple[int, ...], float] = collections.defaultdict(float)
        for text, p in options:  # options of one segment may tokenise alike
            merged[(tok.eos_id,) if text is None else tuple(tok.encode(text))] += p
        segments.append(list(merged.items()))
    target = tuple(tok.encode(response, eos=True))
    a = [collections.defaultdict(float) for _ in range(len(segments) + 1)]
    a[0][0] = 1.0
    for i, options in enumerate(segments):
        for j, a_ij in a[i].items():
            for toks, p in options:
                if target[j : j + len(toks)] == toks:
                    a[i + 1][j + len(toks)] += a_ij * p
    if not a[len(segments)].get(len(target)):
        raise ValueError(f"not a reply the demo teacher gives to {prompt!r}: {response!r}")
    dists = []
    for t in range(len(target)):
        dist: dict[int, float] = collections.defaultdict(float)
        for i, options in enumerate(segments):
            for j, a_ij in a[i].items():
                if j <= t:
                    for toks, p in options:
                        if len(toks) > t - j and toks[: t - j] == target[j:t]:
                            dist[toks[t - j]] += a_ij * p
        z = sum(dist.values())
        dists.append({v: p / z for v, p in dist.items()})
    return dists


def teacher_entropy(dists: list[dict[int, float]]) -> tuple[float, float]:
    """Exact next-token distributions along replies -> (mean entropy per token in nats, share of
    positions where more than one token is possible)."""
    h = sum(-sum(p * math.log(p) for p in d.values() if p > 0) for d in dists)
    return h / max(len(dists), 1), sum(len(d) > 1 for d in dists) / max(len(dists), 1)


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


def write_demo_jsonl(path: str, n: int, seed: int, rich: bool = False, **ranges) -> str:
    """n teacher examples {"prompt", "response"} (deterministic in (n, seed, rich, ranges); ranges go to
    make_demo_prompts) -> path, written atomically."""
    return _write_replies(path, make_demo_prompts(n, seed, **ranges), seed, rich)


def _write_replies(path: str, prompts: list[str], seed: int, rich: bool) -> str:
    """The teacher's reply to each prompt, in order, from one stream seeded by `seed` -> path as JSONL,
    written atomically."""
    rng = np.random.default_rng([seed, 0x7EAC])
    lines = [json.dumps({"prompt": p, "response": demo_teacher(p, rng, rich)}) + "\n" for p in prompts]
    atomic_write(path, "".join(lines).encode("utf-8"))
    return path


def write_fresh_jsonl(path: str, n: int, seed: int, exclude: set[str], rich: bool = False, **ranges) -> str:
    """Like write_demo_jsonl, but no prompt is in `exclude` (prompt texts: the training and test sets')
    and none occurs twice, for a model-selection set that shares no problem with the data it selects
    on or reports. Random problems can repeat, so candidates are make_demo_prompts(m, seed) in order
    (its first prompts stay the same as m grows): a candidate seen before is skipped, and m doubles
    until n are left. Deterministic in (n, seed, exclude, rich, ranges);
    ValueError if the ranges cannot give n new prompts."""
    m, kept = n, []
    while len(kept) < n:
        if m > 64 * (n + len(exclude)):  # a space this crowded would take long to fill, if it can at all
            raise ValueError(f"only {len(kept)} of {n} new prompts in the first {m // 2} draws "
                             f"(ranges {ranges or 'the defaults'})")
        kept, seen = [], set(exclude)
        for p in make_demo_prompts(m, seed, **ranges):
            if p not in seen and len(kept) < n:
                kept.append(p)
            seen.add(p)
        m *= 2
    return _write_replies(path, kept, seed, rich)


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
