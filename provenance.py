"""What data trained a proxy, and the student's check that its proxy belongs to its run.

train_proxy.py writes final/provenance.json: the data file's sha256, the split seed and sizes, and the
tokenizer's sha256. train_student.py refuses a proxy that saw another split (part of its D_s would then be
the proxy's D_w / D_p, whose soft labels and Eq. 9 weights are memorised, not generalised) or that speaks
another vocabulary (its cached top-k ids would name other tokens).
"""

import json
import os
import sys

import data
import ranks
import sharding
from model import read_hf_config

PROVENANCE = "provenance.json"


def data_provenance(data_path: str, split_seed: int, n_examples: int, tok: data.Tokenizer) -> dict:
    """What a proxy's training data was, for final/provenance.json: train_student.py checks that its D_s
    is the slice this proxy never saw (same file, split seed and sizes) and that the tokenizer is the same."""
    ranks.crash_point("provenance")  # hashing a large data file takes a while
    split = data.split_indices(n_examples, split_seed)
    return {"data_sha256": data.sha256_file(data_path), "split_seed": split_seed,
            "split_sizes": {k: len(v) for k, v in split.items()}, "tokenizer_sha256": tok.fingerprint}


def check_provenance(cfg, n_examples: int, tok: data.Tokenizer) -> tuple[str | None, str | None]:
    """Compare the student run's data split with the one its proxy was trained on (<proxy>/provenance.json)
    -> (problem, note): a problem when the proxy saw another file, split seed or split sizes (then part
    of this D_s was the proxy's D_w / D_p: its soft labels and Eq. 9 weights there are memorised, not
    generalised) or used another tokenizer; a note when the proxy has no provenance (a raw base
    checkpoint, the "-align" ablation), which is allowed."""
    path = os.path.join(cfg.proxy, PROVENANCE)
    if not os.path.exists(path):
        return None, (f"{path} not found (a raw base checkpoint, the -align ablation?): "
                      f"cannot check that D_s is data the proxy never trained on")
    try:
        with open(path) as f:
            theirs = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path}: unreadable ({e}); expected train_proxy.py's provenance.json", None
    ours = data_provenance(cfg.data, cfg.split_seed, n_examples, tok)
    diff = [f"{k}: proxy {theirs.get(k)!r}, this run {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if not diff:
        return None, None
    return (f"the proxy {cfg.proxy} was trained on another split of the data than this run's D_s ("
            + "; ".join(diff)
            + "): pass train_proxy.py's --data and --split_seed, or the proxy trained for them"), None


def check_proxy_or_exit(cfg, tok: data.Tokenizer, student_vocab: int, n_examples: int,
                        rank: int) -> str | None:
    """Collective. Stops every rank, in one line saying what is wrong, unless cfg.proxy is a readable
    HF-format checkpoint that shares the student's tokenizer and vocabulary (the cached top-k ids must
    mean the same tokens to the student) and was trained on a split whose D_s is this run's
    (check_provenance). Returns the note for a proxy without provenance."""
    try:
        proxy_vocab = read_hf_config(cfg.proxy)["vocab_size"]
        sharding.check_weights(cfg.proxy)
    except (ValueError, OSError, KeyError) as e:
        ranks.fail(rank, f"bad input: --proxy {e}")
    try:
        data.check_same_vocab(tok, data.Tokenizer(os.path.join(cfg.proxy, "tokenizer.model")))
        if proxy_vocab != student_vocab:
            raise ValueError(f"proxy vocab_size {proxy_vocab} != student vocab_size {student_vocab}")
    except (ValueError, OSError) as e:
        ranks.fail(rank, f"proxy {cfg.proxy} and student {cfg.base} must share the tokenizer "
                         f"and vocabulary: {e}")
    # rank 0 hashes the data file once and tells the others: every rank stops alike on a mismatch
    problem, note = ranks.agree(check_provenance(cfg, n_examples, tok) if rank == 0 else None, long=True)
    if problem:
        ranks.fail(rank, problem)
    if note and rank == 0:
        print(f"{os.path.basename(sys.argv[0])}: note: {note}", file=sys.stderr)
    return note
