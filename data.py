"""Data for Proxy-KD: tokenizer, the teacher's JSONL, prompt template, batches and splits.

The black-box teacher gives text only: each example is (prompt, teacher's response). Everything here is
plain Python + sentencepiece + torch (collate only); nothing reads the network.

Sequence layout (what the models see)
    input_ids = [bos] + enc(format_prompt(system, prompt)) + enc(response) + [eos]
    labels    = -100 on bos and every prompt token, the token itself on response tokens and eos.
    Labels are aligned with input_ids, NOT shifted: the losses shift (logits[:, :-1] predict labels[:, 1:]).
    Prompt and response are encoded separately, so the label mask is exactly the prompt (no merge of
    a prompt piece with a response piece at the boundary).

Truncation to max_len (counted in COUNTS and logged at 1, 2, 4, 8, ... truncations)
    The prompt keeps its TAIL (the question and the "### Answer:" marker sit at the end), the response
    its HEAD (a cut response has no eos: the teacher's reply did not end there). The response keeps
    all its tokens if the prompt can be cut to make room, otherwise the prompt keeps at least
    (max_len - 1) // 2 tokens and the response gets the rest. So every example keeps >= 1 response
    token for max_len >= 2 and nothing is dropped here: empty responses are refused by read_jsonl.

Splits and batches (stable across runs, Python hash seeds, numpy versions and world sizes: every shuffle
is a sort by blake2b(key, index), never Python's hash() or a numpy stream)
    split_indices(n, seed): D_w 10% / D_p 45% / D_s 45% (paper Section 3.3).
    round_shards(D_p, k): round i of the alignment stage takes shard i.
    rank_batches(...) / plan_steps(...): global batch j = examples [j*G, (j+1)*G) of the epoch's shuffled
    order, G = batch_size * world_size; rank r takes positions [r*B, (r+1)*B) of it. The order is padded by
    wrapping to a multiple of G, so every rank has the same number of full batches (FSDP ranks stay in
    lockstep) and up to G-1 examples are seen twice per epoch. The global batches depend on G, seed and
    epoch only, not on how G is factored into ranks.

The embedded demo's synthetic black-box teacher and its tokenizer trainer live in scripts/demo_world.py.
"""

import collections
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass

import sentencepiece as spm
import torch

from model import to_device  # the scripts and the other modules call it as data.to_device too
from proxykd import IGNORE_INDEX, num_response_tokens

log = logging.getLogger(__name__)


# How many examples encode_example saw / truncated in this process (reported by the log, read by callers).
COUNTS: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A sentencepiece `tokenizer.model` (Llama's, or the demo's from demo_world.train_demo_tokenizer).

    pad_id: the model's pad id when it defines one (the demo tokenizer does), else eos_id. Reusing eos as
    pad is safe here: collate gives pad positions label -100 and right-padded batches put pads after
    every real token, so a pad is never attended to by a real position nor scored.
    """

    def __init__(self, model_path: str):
        self.path = str(model_path)
        expected = "expected a sentencepiece tokenizer.model"
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read the tokenizer ({e.strerror}); {expected}") from None
        self.fingerprint = hashlib.sha256(blob).hexdigest()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=blob)
        except RuntimeError:  # sentencepiece's parse error names no file
            raise ValueError(f"{self.path}: not a sentencepiece model ({len(blob)} bytes that do not parse); "
                             f"{expected}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: tokenizer defines no bos or eos token "
                             f"(bos {self.bos_id}, eos {self.eos_id})")
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Control tokens (bos, eos, pad) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def check_same_vocab(a: Tokenizer, b: Tokenizer) -> None:
    """Raise ValueError unless a and b map ids to the same pieces (same size, pieces, scores, piece types,
    bos/eos/pad): the student reads the proxy's top-k token ids, which only mean the same thing under one
    vocabulary. Byte-identical files pass at once; files differing only in metadata pass too."""
    if a.fingerprint == b.fingerprint:
        return
    what = f"tokenizers {a.path} and {b.path} differ"
    if a.vocab_size != b.vocab_size:
        raise ValueError(f"{what}: vocab sizes {a.vocab_size} vs {b.vocab_size}")
    for name in ("bos_id", "eos_id", "pad_id"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"{what}: {name} {getattr(a, name)} vs {getattr(b, name)}")
    for i in range(a.vocab_size):
        pa = (a.sp.id_to_piece(i), a.sp.get_score(i), a.sp.is_control(i), a.sp.is_unknown(i), a.sp.is_byte(i))
        pb = (b.sp.id_to_piece(i), b.sp.get_score(i), b.sp.is_control(i), b.sp.is_unknown(i), b.sp.is_byte(i))
        if pa != pb:
            raise ValueError(f"{what}: first difference at id {i}: {pa[0]!r} (score {pa[1]}) "
                             f"vs {pb[0]!r} (score {pb[1]})")


# ---------------------------------------------------------------------------------------------------
# Teacher data: JSONL reader, template, encoding, collate


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str  # the teacher's reply
    where: str  # "file:line", for error messages
    system: str | None = None  # system prompt (OpenOrca's system_prompt); None or "" = no system line


def read_jsonl(path: str, prompt_field: str = "prompt", response_field: str = "response",
               system_field: str | None = None, stats: dict | None = None) -> list[Example]:
    """One JSON object per line -> list[Example] in file order. OpenOrca: system_field="system_prompt",
    prompt_field="question" (response_field stays "response").

    Raises ValueError "file:line: what" on the first bad line: not UTF-8, invalid JSON, not an object,
    a missing field, a non-string field (the system field may also be null), an empty (whitespace-only)
    prompt or response; and "file: no examples" for a file without any. Nothing is dropped silently:
    the only lines skipped are blank ones, counted in stats["blank"] (and logged). stats (optional, a
    dict the caller owns) also gets "lines" and "examples".
    """
    examples, blank, n_lines = [], 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            n_lines = lineno
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e})") from None
            if not line.strip():
                blank += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            values = {}
            for field in (prompt_field, response_field) + ((system_field,) if system_field else ()):
                if field not in obj:
                    raise ValueError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
                v = obj[field]
                if not (isinstance(v, str) or (field == system_field and v is None)):
                    raise ValueError(f"{where}: field {field!r} must be a string, got {type(v).__name__}")
                values[field] = v
            if not values[prompt_field].strip():
                raise ValueError(f"{where}: empty prompt (field {prompt_field!r})")
            if not values[response_field].strip():
                raise ValueError(f"{where}: empty response (field {response_field!r})")
            system = values.get(system_field) if system_field else None
            examples.append(Example(values[prompt_field], values[response_field], where, system or None))
    if not examples:
        raise ValueError(f"{path}: no examples ({n_lines} lines, {blank} blank)")
    if blank:
        log.warning("%s: skipped %d blank line(s), read %d examples", path, blank, len(examples))
    if stats is not None:
        stats.update(lines=n_lines, blank=blank, examples=len(examples))
    return examples


def format_prompt(system: str | None, prompt: str) -> str:
    """The plain-text template; the response follows it directly:

        {system}\\n\\n          (only when system is non-empty)
        ### Question:\\n{prompt}\\n\\n### Answer:\\n
    """
    head = f"{system}\n\n" if system else ""
    return f"{head}### Question:\n{prompt}\n\n### Answer:\n"


def encode_prompt(tok: Tokenizer, system: str | None, prompt: str) -> list[int]:
    """[bos] + template tokens: the prefix to generate a reply from (same as encode_example's prompt part)."""
    return tok.encode(format_prompt(system, prompt), bos=True)


def encode_example(tok: Tokenizer, ex: Example, max_len: int, stats: dict | None = None) -> dict:
    """Example -> dict(input_ids: list[int], labels: list[int]) of equal length <= max_len.

    labels: -100 on bos and prompt positions, = input_ids on response tokens and the final eos; NOT
    shifted. Truncation (see the module docstring): prompt keeps its tail, response its head, response
    keeps >= 1 token. Truncations are counted in COUNTS["truncated"] (and stats, if given) and logged.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (bos + one response token), got {max_len}")
    p = tok.encode(format_prompt(ex.system, ex.prompt))
    r = tok.encode(ex.response, eos=True)
    n = max_len - 1  # room after bos
    truncated = len(p) + len(r) > n
    if truncated:
        keep_p = min(len(p), max(n - len(r), n // 2))
        keep_r = n - keep_p
        log_cut = (len(p), keep_p, len(r), keep_r)
        p, r = p[len(p) - keep_p :], r[:keep_r]
    COUNTS["examples"] += 1
    if stats is not None:
        stats["examples"] = stats.get("examples", 0) + 1
    if truncated:
        COUNTS["truncated"] += 1
        if stats is not None:
            stats["truncated"] = stats.get("truncated", 0) + 1
        k = COUNTS["truncated"]
        if k & (k - 1) == 0:  # log at 1, 2, 4, 8, ... so a large dataset gives a count, not a flood
            log.warning("%d of %d examples so far truncated to max_len %d "
                        "(latest %s: prompt %d -> %d, response %d -> %d tokens)",
                        k, COUNTS["examples"], max_len, ex.where, *log_cut)
    ids = [tok.bos_id] + p + r
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * (1 + len(p)) + r}


def collate(batch: list[dict], pad_id: int) -> dict:
    """Encoded examples -> dict(input_ids (B, T) long, labels (B, T) long), T = longest; right-padded with
    pad_id in input_ids and -100 in labels."""
    T = max(len(e["input_ids"]) for e in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e["input_ids"])
        assert len(e["labels"]) == n, "input_ids and labels must have equal length"
        input_ids[b, :n] = torch.as_tensor(list(e["input_ids"]), dtype=torch.long)
        labels[b, :n] = torch.as_tensor(list(e["labels"]), dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------------
# Splits and per-rank batches


def _hash_order(indices, *key) -> list[int]:
    """indices in a pseudo-random order fixed by key: sort by blake2b(key, i). Depends on the index values
    only (not on their input order), and is the same under any Python/numpy version or hash seed."""
    salt = ":".join(map(str, key)).encode()
    return sorted((int(i) for i in indices),
                  key=lambda i: (hashlib.blake2b(b"%s:%d" % (salt, i), digest_size=8).digest(), i))


def seed_of(*key) -> int:
    """A 63-bit RNG seed fixed by key (ints and strings), e.g. seed_of("sample", seed, round, rank): the
    same under any Python hash seed, unlike hash()."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def split_indices(n: int, seed: int) -> dict:
    """range(n) -> dict(warmup=D_w, proxy=D_p, student=D_s), sorted lists, disjoint and complete.
    |D_w| = floor(n / 10), |D_p| = floor((n - |D_w|) / 2), |D_s| = the rest (10/45/45)."""
    order = _hash_order(range(n), "split", seed)
    n_w = n // 10
    n_p = (n - n_w) // 2
    return {"warmup": sorted(order[:n_w]), "proxy": sorted(order[n_w : n_w + n_p]),
            "student": sorted(order[n_w + n_p :])}


def round_shards(indices: list[int], k: int) -> list[list[int]]:
    """Cut indices into k interleaved shards (shard j = indices[j::k]; sizes differ by <= 1): round j of
    the alignment stage trains on shard j. Interleaving keeps each shard spread over the file even when
    indices are sorted and the file is ordered by source."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [list(indices[j::k]) for j in range(k)]


def rank_batches(indices: list[int], batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int = 0) -> list[list[int]]:
    """This rank's micro-batches (lists of example ids) for one epoch over indices.

    The epoch's order is a hash shuffle fixed by (seed, epoch), padded by wrapping to a multiple of the
    global batch G = batch_size * world_size. Global batch j = order[j*G:(j+1)*G]; rank r takes its
    positions [r*batch_size, (r+1)*batch_size). Every rank gets ceil(len(indices) / G) full batches.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size {batch_size} / rank {rank} / world_size {world_size}")
    order = _hash_order(indices, "epoch", seed, epoch)
    if not order:
        return []
    G = batch_size * world_size
    n_batches = math.ceil(len(order) / G)
    padded = [order[t % len(order)] for t in range(n_batches * G)]
    return [padded[j * G + rank * batch_size : j * G + (rank + 1) * batch_size] for j in range(n_batches)]


def plan_steps(indices: list[int], cfg, rank: int, world: int, epochs) -> list[list[list[int]]]:
    """This rank's optimizer steps over `indices` for the given epochs: a list of steps, each a list of
    cfg.grad_accum micro-batches (rank_batches, cfg.batch_size examples each) of example ids. Every rank
    gets the same number, and the global batch is the same set of examples for any world size at equal
    batch_size * world."""
    micro = [b for e in epochs for b in rank_batches(indices, cfg.batch_size, rank, world, cfg.seed, epoch=e)]
    return [micro[j : j + cfg.grad_accum] for j in range(0, len(micro), cfg.grad_accum)]


def make_batch(ids: list[int], encoded: dict, pad_id: int, device, extra: list[dict] = ()) -> dict:
    """Example ids -> a micro-batch: input_ids / labels (B, T) on `device`, and from their host copy
    labels_cpu, "ids", n = len(ids), n_tokens = the examples' response tokens, n_rows = every row's
    response tokens and n_fwd = the tokens forwarded (for tokens/s), so that no step waits on the device
    for a count. `extra`: encoded rows
    stacked after the examples' own (a round's y_hat), forwarded but not in n_tokens."""
    encs = [encoded[i] for i in ids] + list(extra)
    cpu = collate(encs, pad_id)
    batch = {k: to_device(v, device) for k, v in cpu.items()}
    batch["labels_cpu"], batch["ids"], batch["n"] = cpu["labels"], ids, len(ids)
    batch["n_tokens"] = int(num_response_tokens(cpu["labels"][: len(ids)]))
    batch["n_rows"] = int(num_response_tokens(cpu["labels"]))  # every row's: the fused heads' row count
    batch["n_fwd"] = float(sum(len(e["input_ids"]) for e in encs))
    return batch


def to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """Device tensors -> (their host copies, a function that waits for them). From a GPU the copies go
    into pinned memory without the host waiting, so the device can run ahead; read them after the
    wait."""
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    if tensors and tensors[0].is_cuda:
        done = torch.cuda.Event()
        done.record()
        return copies, done.synchronize
    return copies, lambda: None


# ---------------------------------------------------------------------------------------------------
# Files


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str, content: bytes | str) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: the file is whole or absent, even
    after a crash (the training scripts' checkpoint pointers and cache markers rely on it)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
