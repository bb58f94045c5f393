"""The proxy's alignment rounds: the preference pairs [y; y_hat] and the round files that hold a round's
reference side.

A round's reference pass (train_proxy.reference_pass) samples the proxy's own reply y_hat for every prompt
and scores log pi_p^(i-1) of y and y_hat under the weights the round starts from. Each rank writes its
rows to a round file, so a resume inside the round needs neither those weights (gone by then) nor a
second sampling pass. A file holds, in the rank's plan order: example_ids (E,) int64, rejected_tokens
(N,) int32 and rejected_offsets (E+1,) int64 (example e's rejected sequence, prompt included, is
tokens[offsets[e]:offsets[e+1]]), rejected_prompt_len (E,) int64, ref_chosen / ref_rejected (E,) fp32
sequence log-probs over response tokens.
"""

import itertools
import os

from safetensors import safe_open
from safetensors.torch import save_file

import data
import proxykd as pk

FORMAT = "proxykd-round/1"


# ---------------------------------------------------------------------------------------------------
# the pairs


def prompt_len(enc: dict) -> int:
    """Number of prompt tokens of an encoded example (labels are -100 up to the reply)."""
    labels = enc["labels"]
    return next((t for t, y in enumerate(labels) if y != pk.IGNORE_INDEX), len(labels))


def rejected_example(enc: dict, y_hat: list[int], eos_id: int, max_new_tokens: int, max_len: int) -> dict:
    """The proxy's own reply as an encoded example: x's prompt tokens + y_hat (+ eos when the sampler
    stopped on it, as the teacher's reply ends in eos), labels -100 on the prompt, cut at max_len."""
    n = prompt_len(enc)
    reply = list(y_hat) + ([eos_id] if len(y_hat) < max_new_tokens else [])
    ids = (list(enc["input_ids"][:n]) + reply)[:max_len]
    return {"input_ids": ids, "labels": [pk.IGNORE_INDEX] * n + ids[n:]}


def rejected_row(pairs: dict, e: int) -> dict:
    """Row e of a round file -> the rejected example (input_ids, labels) for data.collate."""
    o = pairs["rejected_offsets"]
    ids = pairs["rejected_tokens"][o[e] : o[e + 1]].tolist()
    n = int(pairs["rejected_prompt_len"][e])
    return {"input_ids": ids, "labels": [pk.IGNORE_INDEX] * n + ids[n:]}


def pair_batch(ids: list[int], rows: list[int], encoded: dict, pairs: dict, pad_id: int, device) -> dict:
    """A micro-batch of preference pairs: input_ids / labels (2B, T) stacking [y_1..y_B; y_hat_1..y_hat_B]
    for one forward (the chosen half also serves Eq. 3's NLL), ref_chosen / ref_rejected (B,) the
    reference log-probs; `rows` are the ids' rows in the round file. Counts as data.make_batch's, over
    the teacher's replies y."""
    batch = data.make_batch(ids, encoded, pad_id, device, extra=[rejected_row(pairs, e) for e in rows])
    batch["ref_chosen"] = data.to_device(pairs["ref_chosen"][rows], device)
    batch["ref_rejected"] = data.to_device(pairs["ref_rejected"][rows], device)
    return batch


def file_rows(steps: list) -> list[list[list[int]]]:
    """A rank's steps (lists of micro-batches of example ids) -> the same shape holding each example's
    row in the round file, which lists the rank's examples in plan order."""
    sizes = [len(ids) for s in steps for ids in s]
    rows = iter([list(range(a - n, a)) for a, n in zip(itertools.accumulate(sizes), sizes)])
    return [[next(rows) for _ in s] for s in steps]


def pair_stats(pairs: dict, encoded: dict) -> list[float]:
    """Sum of rejected reply lengths, number of y_hat equal to the teacher's y (such pairs give DPO
    no gradient: the two log-ratios cancel)."""
    o, plen = pairs["rejected_offsets"], pairs["rejected_prompt_len"]
    length, same = 0.0, 0.0
    for e, x in enumerate(pairs["example_ids"].tolist()):
        seq = pairs["rejected_tokens"][o[e] : o[e + 1]].tolist()
        length += len(seq) - int(plen[e])
        same += float(seq == list(encoded[x]["input_ids"]))
    return [length, same]


# ---------------------------------------------------------------------------------------------------
# round files


def path(out: str, rnd: int, rank: int, world: int) -> str:
    return os.path.join(out, "rounds", f"round-{rnd:02d}-rank{rank}-of-{world}.safetensors")


def remove(out: str, rnd: int, rank: int, world: int) -> None:
    p = path(out, rnd, rank, world)
    if os.path.exists(p):
        os.remove(p)


def meta(cfg, rnd: int, rank: int, world: int) -> dict[str, str]:
    """What a round file is bound to; a file whose metadata differs is not reused."""
    keys = ("data", "split_seed", "seed", "max_len", "batch_size", "grad_accum", "rounds", "temperature",
            "top_p", "greedy", "max_new_tokens", "base", "base_dtype", "prompt_field", "response_field",
            "system_field")
    bound = {k: str(getattr(cfg, k)) for k in keys}
    return {"format": FORMAT, "round": str(rnd), "rank": str(rank), "world_size": str(world), **bound}


def save(cfg, rnd: int, rank: int, world: int, pairs: dict) -> None:
    """Write one rank's round file atomically (temp file + os.replace: whole or absent)."""
    p = path(cfg.out, rnd, rank, world)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    save_file({k: v.contiguous() for k, v in pairs.items()}, p + ".tmp", metadata=meta(cfg, rnd, rank, world))
    os.replace(p + ".tmp", p)


def load(cfg, rnd: int, rank: int, world: int, example_ids: list[int]) -> dict | None:
    """This rank's round file, or None when it is absent or bound to another run or plan."""
    p = path(cfg.out, rnd, rank, world)
    if not os.path.exists(p):
        return None
    with safe_open(p, "pt") as f:
        if f.metadata() != meta(cfg, rnd, rank, world):
            return None
        pairs = {k: f.get_tensor(k) for k in f.keys()}
    return pairs if pairs["example_ids"].tolist() == example_ids else None
