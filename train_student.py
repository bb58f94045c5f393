"""Proxy-KD stage 3: distil the black-box teacher into the student through the aligned proxy.
Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language Models" (arXiv 2401.07013),
Section 3.4, Eq. 7-11, Appendix A.1.

Two phases in one script:

  1. cache   The frozen aligned proxy pi_p (train_proxy.py's <out>/final) reads D_s teacher-forced on the
             teacher's replies y and stores, per response token, its top-k token ids and log-probs
             (normalised over the full vocabulary), plus log pi_p(y|x) per sample (Appendix A.1: "only the
             top 10 token indices and their logits are retained"). Offline, once; ~60 bytes/token at k=10.
  2. student LoRA on the student: L = L_Student-NLL (Eq. 7) + alpha * L_Weight-KL (Eq. 10), Eq. 11, with
             the per-sample trust weight w = sigmoid((log pi_p(y|x) - mu) / gamma) of Eq. 9, mu / gamma the
             mean / std over all of D_s. Adam, constant lr 1e-5, max_len 1024, one epoch, alpha = 100.

D_s is data.split_indices(n, split_seed)["student"]: the same --data and --split_seed as train_proxy.py (the proxy
never trained on it).

Runbook
-------
Full Proxy-KD (8 GPUs, one node). The proxy is sharded with FSDP2 too, so each GPU holds 1/8 of it
(a 70B bf16 proxy: ~17.5 GB per GPU), each rank reading only its own shard from the safetensors files;
it is freed before the student loads. --plan prints the per-GPU memory of both phases without loading
any weight. The cache costs ~60 bytes per response token at k = 10 (6 GB per 100M tokens).

    torchrun --standalone --nproc_per_node 8 train_student.py \
        --base llama-2-7b --proxy runs/proxy/final --tokenizer llama-2-7b/tokenizer.model \
        --data teacher.jsonl --eval_data teacher_heldout.jsonl --out runs/student

Build the cache on its own (e.g. on the big-memory node), then train anywhere: the cache is read by
example id, so the world size may differ between the two runs.

    torchrun --standalone --nproc_per_node 8 train_student.py <same args> --cache_only
    torchrun --standalone --nproc_per_node 4 train_student.py <same args>

Baselines and ablations (paper Table 1 / Table 2), all from this script:

    --alpha 0                        black-box KD: plain SFT on the teacher's text (Eq. 7 alone); the proxy
                                     and the cache are never touched (--proxy may be omitted)
    --no_weights                     unweighted KL, Eq. 8 instead of Eq. 10: w = 1
    --weight_per_token               Eq. 9 on log pi_p(y|x) / |y| instead of the sequence sum (not in the
                                     paper; removes the bias towards short replies)
    --proxy runs/proxy/warmup/final  "-align": a proxy that skipped alignment is just another HF dir
                                     (train_proxy.py's warmed-up proxy, or the raw proxy checkpoint with a
                                     copy of tokenizer.model); the cache is bound to the proxy's hash, so
                                     give it its own --cache_dir (or --rebuild_cache)

Single process (CPU smoke test; without torchrun a one-rank process group runs the same code path):

    python train_student.py --base demo/student --proxy demo/proxy/final --tokenizer demo/tok.model \
        --data demo/teacher.jsonl --out demo/student_run --batch_size 8

Resume: rerun the same command with --resume; training continues from <out>/checkpoints/latest (a fresh
run refuses to overwrite existing checkpoints). Caching always resumes by itself: parts already written
for the same meta.json are kept. --stop_after_steps N checkpoints and exits after N steps (testing).

Outputs in --out: metrics.jsonl (config, cache stats incl. bytes/token, Eq. 9 moments, per-step loss /
nll / wkl / tokens_per_s, held-out eval_nll / eval_top1_agreement before and after training),
checkpoints/, adapter/ (PEFT layout: adapter_model.safetensors + adapter_config.json), final/ (merged
student, HF format, + tokenizer.model), cache/ (unless --cache_dir).

Proxy cache (--cache_dir, default <out>/cache)
    meta.json                   what the cache is bound to: sha256 of --data, field names, split seed,
                                tokenizer fingerprint, sha256 of the proxy checkpoint, k, max_len,
                                prompt template / special-token fingerprint, logp dtype. A cache whose
                                meta.json differs from the current run is refused (message says what
                                differs); rebuild with --rebuild_cache or delete the directory.
    part-<first id>.safetensors written every --cache_flush_every batches by each rank (temp file + os.replace,
                                so a part is either whole or absent). Tensors:
                                  example_ids (E,) int64   row of the example in --data
                                  offsets     (E+1,) int64 rows of example e: offsets[e]:offsets[e+1]
                                  seq_logps   (E,) fp32    log pi_p(y|x), summed over response tokens
                                  topk_ids    (N, k) int32 pi_p's top-k for each response token, in order
                                  topk_logps  (N, k) fp16  (or bf16) log pi_p, normalised over all of V
                                Row j of an example is pi_p's distribution for its j-th response token
                                (proxykd's shifted grid, response positions only).
    COMPLETE                    written last by rank 0 after every rank finished; without it the cache is
                                partial: never read, and a rerun only computes the missing examples.
"""

import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data
import fast
import parallel
import proxykd as pk
from model import ModelArgs, read_hf_config
from train_proxy import (  # the shared plumbing: launch, FSDP2, checkpoints, metrics, eval, outputs
    agree,
    crash_point,
    eval_batches,
    evaluate,
    fail,
    finish,
    flags_parser,
    PROVENANCE,
    data_provenance,
    init_distributed,
    load_base,
    load_lora_model,
    make_batch,
    make_optimizer,
    plan_steps,
    print_plan,
    reduce_mean_std,
    save_checkpoint,
    save_final,
    shard_model,
    start_or_resume,
)

CACHE_FORMAT = "proxykd-topk-cache/1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Config:
    base: str = ""  # student base checkpoint, HF format (config.json + *.safetensors)
    proxy: str = ""  # aligned proxy, HF format (train_proxy.py's <out>/final, with tokenizer.model); unused at alpha 0
    tokenizer: str = ""  # sentencepiece tokenizer.model shared by proxy and student
    data: str = ""  # teacher jsonl, the same file train_proxy.py read; D_s is its "student" split
    eval_data: str = ""  # held-out teacher jsonl for NLL / top-1 agreement ("" = no eval)
    out: str = "runs/student"  # output dir: metrics.jsonl, checkpoints/, cache/, adapter/, final/
    cache_dir: str = ""  # proxy top-k cache ("" = <out>/cache)
    prompt_field: str = "prompt"  # jsonl field of x (OpenOrca: question)
    response_field: str = "response"  # jsonl field of the teacher's reply y
    system_field: str = ""  # jsonl field of a system prompt ("" = none; OpenOrca: system_prompt)
    split_seed: int = 0  # data split: must equal train_proxy.py's, so D_s is the slice the proxy never saw
    seed: int = 0  # batch order, LoRA init (vary it for repeated runs on the same split and cache)
    max_len: int = 1024  # tokens per example, prompt + reply (paper: 1024)
    batch_size: int = 4  # examples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * world
    lr: float = 1e-5  # Adam, constant (paper)
    optimizer: str = "adam"  # adam (paper) or sgd (tests: its update is proportional to the gradient, Adam's is not)
    epochs: int = 1  # passes over D_s (paper: one epoch)
    alpha: float = 100.0  # weight of the KL term in Eq. 11 (paper: 100); 0 = black-box KD, plain SFT, no proxy
    no_weights: bool = False  # w = 1: unweighted KL, Eq. 8 instead of Eq. 10 (ablation)
    weight_per_token: bool = False  # Eq. 9 on log pi_p(y|x) / |y| instead of the sequence sum (not in the paper)
    topk: int = 10  # cached proxy tokens per position (paper: 10)
    cache_dtype: str = "float16"  # dtype of the cached log-probs: float16 or bfloat16
    cache_batch_size: int = 8  # examples per proxy forward per rank while caching
    cache_flush_every: int = 50  # proxy batches per cache part file (the granularity of a caching resume)
    rebuild_cache: bool = False  # delete --cache_dir and build it again (drop the flag when resuming)
    cache_only: bool = False  # stop once the cache is complete (build it on one machine, train on another)
    proxy_dtype: str = "bfloat16"  # dtype the proxy runs in while caching; float32 for exactness tests
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = lora_alpha / lora_r = 2)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    base_dtype: str = "bfloat16"  # dtype of the frozen student base (paper: bf16); float32 for exactness tests
    merged_dtype: str = ""  # dtype of final/model.safetensors ("" = the base checkpoint's dtype)
    activation_checkpointing: bool = False  # recompute each block in backward (long sequences / big models)
    chunk_size: int = 0  # positions per (chunk, V) logits block in the loss head (0: 1024 on a GPU, 16 MiB blocks on the CPU)
    eval_batch_size: int = 8  # examples per eval forward per rank
    eval_every: int = 0  # optimizer steps between held-out evals (0 = only before and after training)
    log_every: int = 1  # optimizer steps between metrics lines
    save_every: int = 200  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    resume: bool = False  # continue from <out>/checkpoints/latest; fresh start if none
    stop_after_steps: int = 0  # testing/debugging: checkpoint and exit after this many optimizer steps (0 = off)
    plan: bool = False  # print the per-GPU memory plan from the config.json files and the flags, and exit (no weights loaded)
    plan_world_size: int = 0  # --plan: GPUs to plan for (0 = this launch's world size)


def parse_args(argv=None) -> Config:
    p = flags_parser(Config, __doc__)
    cfg = Config(**vars(p.parse_args(argv)))
    if not (cfg.base and (cfg.plan or (cfg.tokenizer and cfg.data))):
        p.error("--base, --tokenizer and --data are required (--plan needs only --base)")
    if cfg.alpha != 0 and not cfg.proxy:
        p.error("--proxy is required unless --alpha 0 (black-box KD)")
    for name in ("base_dtype", "proxy_dtype") + (("merged_dtype",) if cfg.merged_dtype else ()):
        if getattr(cfg, name) not in DTYPES:
            p.error(f"--{name} must be bfloat16, float16 or float32")
    if cfg.optimizer not in ("adam", "sgd"):
        p.error("--optimizer must be adam or sgd")
    if cfg.cache_only and cfg.alpha == 0:
        p.error("--cache_only with --alpha 0: black-box KD uses no proxy cache")
    if cfg.cache_dtype not in ("float16", "bfloat16"):
        p.error("--cache_dtype must be float16 or bfloat16")
    if cfg.alpha < 0 or cfg.topk < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.cache_flush_every < 1:
        p.error("--alpha >= 0, --topk, --batch_size, --grad_accum and --cache_flush_every >= 1")
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.out, "cache")
    return cfg


# ---------------------------------------------------------------------------------------------------
# proxy top-k cache (format in the module docstring)


class CacheError(RuntimeError):
    """A cache that must not be used; the message says why and how to rebuild."""


def proxy_fingerprint(proxy_dir: str) -> str:
    """sha256 over the proxy's config and weight files (names and contents): the checkpoint identity.
    Reads every weight byte (minutes for 70B, once per run, on rank 0): cheaper stand-ins such as
    mtimes or safetensors headers do not change when only the weights do."""
    names = sorted(n for n in os.listdir(proxy_dir) if n == "config.json" or n.endswith((".safetensors", ".index.json")))
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{proxy_dir}: no *.safetensors weights (expected an HF-format proxy dir)")
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\0{data.sha256_file(os.path.join(proxy_dir, n))}\0".encode())
    return h.hexdigest()


def check_provenance(cfg: Config, n_examples: int, tok: data.Tokenizer) -> tuple[str | None, str | None]:
    """Compare this run's data split with the one the proxy was trained on (<proxy>/provenance.json,
    written by train_proxy.py) -> (problem, note): a problem when the proxy saw another file, split seed
    or split sizes (then part of this D_s was the proxy's D_w / D_p: its soft labels and Eq. 9 weights
    there are memorised, not generalised) or used another tokenizer; a note when the proxy has no
    provenance (a raw base checkpoint, the "-align" ablation), which is allowed."""
    path = os.path.join(cfg.proxy, PROVENANCE)
    if not os.path.exists(path):
        return None, (f"{path} not found (a raw base checkpoint, the -align ablation?): cannot check that D_s "
                      f"is data the proxy never trained on")
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
            + "; ".join(diff) + "): pass train_proxy.py's --data and --split_seed, or the proxy trained for them"), None


def template_fingerprint(tok: data.Tokenizer, max_len: int) -> str:
    """sha256 of how probe examples are tokenised (prompt template, system line, bos/eos, label mask):
    a cache is only valid for the token sequences it was computed on."""
    probes = [data.Example("probe prompt", "probe reply", "probe", system) for system in (None, "probe system")]
    blob = json.dumps([data.encode_example(tok, p, max_len) for p in probes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_meta(cfg: Config, tok: data.Tokenizer, n_student: int, proxy_hash: str) -> dict:
    return {
        "format": CACHE_FORMAT,
        "data_sha256": data.sha256_file(cfg.data),
        "fields": [cfg.prompt_field, cfg.response_field, cfg.system_field],
        "split_seed": cfg.split_seed,
        "n_student_examples": n_student,
        "tokenizer": tok.fingerprint,
        "proxy_sha256": proxy_hash,
        "k": cfg.topk,
        "max_len": cfg.max_len,
        "template": template_fingerprint(tok, cfg.max_len),
        "logp_dtype": cfg.cache_dtype,
        "proxy_dtype": cfg.proxy_dtype,
    }


def meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _part_files(cache_dir: str) -> list[str]:
    return sorted(os.path.join(cache_dir, n) for n in os.listdir(cache_dir) if n.startswith("part-") and n.endswith(".safetensors"))


def prepare_cache_dir(cache_dir: str, meta: dict, rebuild: bool) -> None:
    """Rank 0, before caching: create the dir and its meta.json, or check that an existing (possibly
    partial) cache belongs to this run. Raises CacheError naming what differs."""
    if rebuild and os.path.isdir(cache_dir):
        shutil.rmtree(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    for n in os.listdir(cache_dir):
        if n.startswith(".tmp-"):  # a part whose writer died before its os.replace
            os.remove(os.path.join(cache_dir, n))
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.exists(path):
        if _part_files(cache_dir) or os.path.exists(os.path.join(cache_dir, "COMPLETE")):
            raise CacheError(f"{cache_dir} holds cache files but no meta.json; delete it or pass --rebuild_cache")
        data.atomic_write(path, json.dumps(meta, indent=1, sort_keys=True))
        return
    check_meta(cache_dir, meta)


def check_meta(cache_dir: str, meta: dict) -> None:
    """Raise CacheError listing every field where cache_dir/meta.json differs from this run's `meta`."""
    with open(os.path.join(cache_dir, "meta.json")) as f:
        old = json.load(f)
    diff = [f"  {k}: cache has {old.get(k)!r}, this run needs {meta.get(k)!r}"
            for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
    if diff:
        raise CacheError(
            f"proxy cache {cache_dir} was built for a different run:\n" + "\n".join(diff) +
            f"\nRebuild it with --rebuild_cache (or delete {cache_dir}), or point --cache_dir elsewhere."
        )


def cached_example_ids(cache_dir: str) -> set[int]:
    """Example ids already in whole parts (a crashed run leaves only *.tmp files behind, never parts)."""
    done: set[int] = set()
    for path in _part_files(cache_dir):
        with safe_open(path, framework="pt") as f:
            done.update(f.get_tensor("example_ids").tolist())
    return done


def write_part(cache_dir: str, digest: str, records: list[tuple[int, torch.Tensor, torch.Tensor, float]]) -> None:
    """records: (example id, topk_ids (n, k) int32, topk_logps (n, k), seq_logp) -> one part file."""
    if not records:
        return
    records = sorted(records, key=lambda r: r[0])
    lengths = torch.tensor([r[1].shape[0] for r in records], dtype=torch.int64)
    tensors = {
        "example_ids": torch.tensor([r[0] for r in records], dtype=torch.int64),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "seq_logps": torch.tensor([r[3] for r in records], dtype=torch.float32),
        "topk_ids": torch.cat([r[1] for r in records]).to(torch.int32).contiguous(),
        "topk_logps": torch.cat([r[2] for r in records]).contiguous(),
    }
    path = os.path.join(cache_dir, f"part-{records[0][0]:09d}.safetensors")
    tmp = os.path.join(cache_dir, f".tmp-{records[0][0]:09d}-{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"format": CACHE_FORMAT, "meta_sha256": digest})
    os.replace(tmp, path)


def finalise_cache(cache_dir: str, digest: str, student_ids: list[int]) -> dict:
    """Rank 0, after every rank wrote its parts: check coverage, then write COMPLETE (last)."""
    seen: dict[int, str] = {}
    n_tokens = n_bytes = 0
    for path in _part_files(cache_dir):
        with safe_open(path, framework="pt") as f:
            if f.metadata().get("meta_sha256") != digest:
                raise CacheError(f"{path} belongs to another cache; delete {cache_dir} or pass --rebuild_cache")
            for i in f.get_tensor("example_ids").tolist():
                if i in seen:
                    raise CacheError(f"example {i} is in both {seen[i]} and {path}; delete {cache_dir}")
                seen[i] = path
            n_tokens += int(f.get_tensor("offsets")[-1])
        n_bytes += os.path.getsize(path)
    missing = set(student_ids) - set(seen)
    if missing or len(seen) != len(student_ids):
        raise CacheError(f"{cache_dir}: {len(missing)} examples of D_s missing, {len(set(seen) - set(student_ids))} foreign")
    stats = {"meta_sha256": digest, "examples": len(seen), "tokens": n_tokens, "bytes": n_bytes,
             "bytes_per_token": n_bytes / max(n_tokens, 1), "parts": len(_part_files(cache_dir))}
    data.atomic_write(os.path.join(cache_dir, "COMPLETE"), json.dumps(stats, indent=1))
    return stats


class ProxyCache:
    """Read side of a COMPLETE cache, by example id, whatever world size wrote it. The top-k tensors
    stay memory-mapped; only the rows of the current batch are read."""

    def __init__(self, cache_dir: str, meta: dict):
        complete = os.path.join(cache_dir, "COMPLETE")
        if not os.path.exists(complete):
            raise CacheError(f"{cache_dir} is incomplete (no COMPLETE marker): rerun train_student.py with the same "
                             f"arguments to finish it, or --rebuild_cache to start over")
        check_meta(cache_dir, meta)
        with open(complete) as f:
            self.stats = json.load(f)
        digest = meta_digest(meta)
        self.files = []
        self.where: dict[int, tuple[int, int, int]] = {}  # example id -> (file, first row, last row + 1)
        self.seq: dict[int, float] = {}
        for fi, path in enumerate(_part_files(cache_dir)):
            f = safe_open(path, framework="pt")
            if f.metadata().get("meta_sha256") != digest:
                raise CacheError(f"{path} belongs to another cache; delete {cache_dir} or pass --rebuild_cache")
            self.files.append(f)
            off = f.get_tensor("offsets").tolist()
            for e, (i, s) in enumerate(zip(f.get_tensor("example_ids").tolist(), f.get_tensor("seq_logps").tolist())):
                self.where[i] = (fi, off[e], off[e + 1])
                self.seq[i] = s

    def n_tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.where[i][2] - self.where[i][1] for i in ids], dtype=torch.int64)

    def seq_logps(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.seq[i] for i in ids], dtype=torch.float64)

    def rows(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> per example (topk_ids (n_i, k) int32, topk_logps (n_i, k)), the input of fast.pad_topk."""
        out = []
        for i in ids:
            fi, a, b = self.where[i]
            f = self.files[fi]
            out.append((f.get_slice("topk_ids")[a:b], f.get_slice("topk_logps")[a:b]))
        return out


# ---------------------------------------------------------------------------------------------------
# phase 1 and phase 2 steps


@torch.no_grad()
def build_cache(cfg: Config, proxy, encoded: dict, todo: list[int], digest: str, pad_id: int, rank: int, world: int, device) -> int:
    """Phase 1 on every rank: the proxy's top-k over this rank's share of the uncached examples `todo`,
    written as parts of cfg.cache_dir. Examples go longest first (less padding; an out-of-memory shows
    in the first batch) and are dealt round-robin; a rank with fewer batches runs throw-away forwards
    so every rank issues the same FSDP collectives. Returns the response tokens cached by this rank."""
    todo = sorted(todo, key=lambda i: (-len(encoded[i]["input_ids"]), i))
    mine, bs = todo[rank::world], cfg.cache_batch_size
    n_batches = math.ceil(math.ceil(len(todo) / world) / bs)
    records, n_tok = [], 0
    for j in tqdm(range(n_batches), desc="proxy cache", disable=rank != 0, dynamic_ncols=True):
        ids = mine[j * bs : (j + 1) * bs]
        b = make_batch(ids or todo[:1], encoded, pad_id, device)
        labels = b["labels"]
        top_ids, top_lps, seq = proxy(b["input_ids"], head_fn=lambda h, w: fast.topk_logps_chunked(h, w, labels, cfg.topk, cfg.chunk_size))
        if ids:
            rows = fast.topk_rows(top_ids.cpu(), top_lps.to(DTYPES[cfg.cache_dtype]).cpu(), labels.cpu())
            records += [(i, r_ids, r_lps, s) for i, (r_ids, r_lps), s in zip(ids, rows, seq.tolist())]
            n_tok += sum(r[0].shape[0] for r in rows)
        if (j + 1) % cfg.cache_flush_every == 0:
            write_part(cfg.cache_dir, digest, records)
            records = []
            crash_point("cache_part")
    write_part(cfg.cache_dir, digest, records)
    return n_tok


def student_step(model, optimizer, batches: list[dict], cache, weights: dict | None, world: int, cfg: Config, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (train_proxy.make_batch dicts plus "ids"); every
    rank calls it with the same number of micro-batches.

    Minimises Eq. 11 = Eq. 7 + alpha * Eq. 10 on the cached proxy top-k (cache None: Eq. 7 alone, plain
    SFT on the teacher's text). Each micro-batch's sums are divided by the step's GLOBAL response-token
    count, so micro-batches and ranks add up to exactly one big batch; the count is divided by `world`
    because FSDP2 averages gradients over ranks (gloo cannot pre-scale with set_gradient_divide_factor).
    Returns the all_reduced step metrics (4,) fp64, identical on every rank: loss, nll, wkl (Eq. 10
    before alpha), forwarded tokens. The optimizer steps only when the loss is finite on every rank.
    """
    n = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        n += pk.num_response_tokens(b["labels"])
    dist.all_reduce(n)
    n_tokens = (n.clamp(min=1) / world).float()

    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for b in batches:
        labels = b["labels"]
        if cache is None:
            loss = model(b["input_ids"], head_fn=lambda h, w: -fast.token_logps_fused(h, w, labels, cfg.chunk_size).sum() / n_tokens)
            nll, wkl = loss.detach(), torch.zeros((), device=device)
        else:
            top_ids, top_lps = fast.pad_topk(cache.rows(b["ids"]), labels)  # (B, T-1, k) on the shifted grid
            w = None if weights is None else torch.tensor([weights[i] for i in b["ids"]], device=device)
            out = model(b["input_ids"], head_fn=lambda h, wt: fast.student_loss_fused(
                h, wt, labels, top_ids, top_lps, w, cfg.alpha, n_tokens, cfg.chunk_size))
            loss, nll, wkl = out.loss, out.nll, out.wkl
        loss.backward()
        fwd = torch.tensor(float(b["n_fwd"]), dtype=torch.float64, device=device)
        sums += torch.stack([loss.detach().double(), nll.double(), wkl.double(), fwd])
    dist.all_reduce(sums)
    sums[:3] /= world  # each rank's losses were scaled up by world (see above)
    if torch.isfinite(sums[:3]).all():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def first_error(err: str | None) -> str | None:
    """The first error message of any rank, on every rank (a collective), or None."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e), None)


def memory_plan(cfg: Config, world: int) -> parallel.Plan:
    """This run's per-GPU memory plan (parallel.plan_student) from the config.json files and the flags."""
    args = {}
    for name in ("base", "proxy") if cfg.alpha != 0 else ("base",):
        args[name] = ModelArgs.from_hf_config(read_hf_config(getattr(cfg, name)))
    return parallel.plan_student(
        args.get("proxy"), args["base"], world, proxy_itemsize=DTYPES[cfg.proxy_dtype].itemsize,
        base_itemsize=DTYPES[cfg.base_dtype].itemsize, lora_r=cfg.lora_r, batch_size=cfg.batch_size,
        max_len=cfg.max_len, cache_batch_size=cfg.cache_batch_size, chunk_size=cfg.chunk_size,
        activation_checkpointing=cfg.activation_checkpointing)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:
        print_plan(cfg, memory_plan, f"train_student.py memory plan: {cfg.base}, proxy {cfg.proxy if cfg.alpha else '(none)'}")
        return
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank (and for every world size)
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.resume and agree(rank == 0 and os.path.exists(os.path.join(ckpt_dir, "latest"))):
        fail(rank, f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or use a new --out")
    pending = []  # metrics lines of phase 1, logged once the resume step is known

    # data: D_s is the "student" slice of the split train_proxy.py made with the same --data / --split_seed
    fields = dict(prompt_field=cfg.prompt_field, response_field=cfg.response_field, system_field=cfg.system_field or None)
    try:  # every rank reads the same files and fails alike (one line, no traceback): no rank hangs
        student_vocab = read_hf_config(cfg.base)["vocab_size"]
        tok = data.Tokenizer(cfg.tokenizer)
        examples = data.read_jsonl(cfg.data, **fields)
        held_out = data.read_jsonl(cfg.eval_data, **fields) if cfg.eval_data else []
    except (ValueError, OSError, KeyError) as e:
        fail(rank, f"bad input: {e}")
    d_s = data.split_indices(len(examples), cfg.split_seed)["student"]
    encoded = {i: data.encode_example(tok, examples[i], cfg.max_len) for i in d_s}
    evals = eval_batches([data.encode_example(tok, e, cfg.max_len) for e in held_out], cfg.eval_batch_size, rank, world, tok.pad_id)

    # vocabularies: the cached top-k ids must mean the same tokens to the student
    if tok.vocab_size > student_vocab:
        fail(rank, f"tokenizer has {tok.vocab_size} tokens, {cfg.base} only {student_vocab}")
    if cfg.alpha != 0:
        try:
            proxy_vocab = read_hf_config(cfg.proxy)["vocab_size"]
            data.check_same_vocab(tok, data.Tokenizer(os.path.join(cfg.proxy, "tokenizer.model")))
            if proxy_vocab != student_vocab:
                raise ValueError(f"proxy vocab_size {proxy_vocab} != student vocab_size {student_vocab}")
        except (ValueError, OSError) as e:
            fail(rank, f"proxy {cfg.proxy} and student {cfg.base} must share the tokenizer and vocabulary: {e}")
        # D_s must be data the proxy never trained on (its soft labels and Eq. 9 weights assume it)
        # rank 0 hashes the data file once and tells the others: every rank stops alike on a mismatch
        problem, note = agree(check_provenance(cfg, len(examples), tok) if rank == 0 else None)
        if problem:
            fail(rank, problem)
        if note:
            pending.append({"step": 0, "note": note})
            if rank == 0:
                print(f"train_student.py: note: {note}", file=sys.stderr)

    # ---- phase 1: the proxy's top-k on D_s, cached once (skipped for black-box KD, alpha == 0)
    cache, weights = None, None
    if cfg.alpha != 0:
        meta = err = None
        if rank == 0:  # rank 0 hashes the proxy and owns the directory; the others wait for its verdict
            try:
                meta = cache_meta(cfg, tok, len(d_s), proxy_fingerprint(cfg.proxy))
                prepare_cache_dir(cfg.cache_dir, meta, cfg.rebuild_cache)
            except (CacheError, OSError) as e:
                err = str(e)
        meta, err = agree((meta, err))
        if err is not None:
            fail(rank, err)
        digest = meta_digest(meta)
        todo = None
        if rank == 0 and not os.path.exists(os.path.join(cfg.cache_dir, "COMPLETE")):
            todo = sorted(set(d_s) - cached_example_ids(cfg.cache_dir))  # resume: whole parts already written stay
        if (todo := agree(todo)) is not None:
            if todo:  # empty when a run died between its last part and COMPLETE
                t0 = time.time()
                # rank 0 reads the proxy on the host, the others build it on the meta device; shard_model
                # broadcasts it shard by shard, so no GPU and no other rank ever holds the whole proxy
                proxy = load_base(cfg.proxy, getattr(torch, cfg.proxy_dtype)).requires_grad_(False).eval()
                proxy = shard_model(proxy)
                n_tok = torch.tensor(float(build_cache(cfg, proxy, encoded, todo, digest, tok.pad_id, rank, world, device)), device=device)
                # free the proxy before the student is loaded: FSDP2 keeps the module in a reference
                # cycle, so `del` alone leaves every shard allocated until the cycle collector runs
                del proxy
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                dist.all_reduce(n_tok)
                dt = time.time() - t0
                pending.append({"step": 0, "phase": "cache", "examples": len(todo), "tokens": int(n_tok.item()),
                                "seconds": dt, "tokens_per_s": n_tok.item() / max(dt, 1e-9)})
            dist.barrier()
            if rank == 0:
                try:
                    finalise_cache(cfg.cache_dir, digest, d_s)
                except CacheError as e:
                    err = str(e)
            if (err := agree(err)) is not None:
                fail(rank, err)
        try:  # every rank opens the cache itself (a node without the shared filesystem fails here, together)
            cache, err = ProxyCache(cfg.cache_dir, meta), None
        except (CacheError, OSError) as e:
            cache, err = None, f"rank {rank}: {e}"
        if (err := first_error(err)) is not None:
            fail(rank, err)
        pending.append({"step": 0, "phase": "cache_ready", "cache_dir": cfg.cache_dir, **cache.stats})
        if rank == 0:
            print(f"proxy cache {cfg.cache_dir}: {cache.stats['examples']} examples, {cache.stats['tokens']} tokens, "
                  f"{cache.stats['bytes_per_token']:.1f} bytes/token", file=sys.stderr)

        # Eq. 9: mu, gamma over all of D_s; each rank contributes a disjoint slice, all_reduced.
        # Examples cut to no response tokens (prompt >= max_len) have no KL term and are left out.
        scored = [i for i, n in zip(d_s, cache.n_tokens(d_s).tolist()) if n > 0]
        mine = scored[rank::world]
        scores = pk.weight_scores(cache.seq_logps(mine).to(device), cache.n_tokens(mine).to(device), cfg.weight_per_token)
        mu, gamma = reduce_mean_std(scores)
        w = pk.sample_weights(pk.weight_scores(cache.seq_logps(scored), cache.n_tokens(scored), cfg.weight_per_token), mu.cpu(), gamma.cpu())
        pending.append({"step": 0, "phase": "weights", "mu": mu.item(), "gamma": gamma.item(), "per_token": cfg.weight_per_token,
                        "used": not cfg.no_weights, "w_mean": w.mean().item(), "w_min": w.min().item(), "w_max": w.max().item()})
        if not cfg.no_weights:
            weights = {i: 0.0 for i in d_s} | dict(zip(scored, w.tolist()))
        if cfg.cache_only:
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in pending)
            finish(0)

    # ---- phase 2: the student, frozen bf16 base + fp32 LoRA, FSDP2-sharded; Adam on the LoRA tensors
    model = load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, device, getattr(torch, cfg.base_dtype))
    model = shard_model(model, cfg.activation_checkpointing)
    optimizer = make_optimizer(model, cfg)
    steps = plan_steps(d_s, cfg, rank, world, range(cfg.epochs))
    global_batch = cfg.batch_size * cfg.grad_accum * world

    # resume
    state, step, log = start_or_resume(cfg.resume, ckpt_dir, metrics_path, model, optimizer, global_batch, rank)
    if state:
        log.log({"step": step, "resumed_from": step})  # the step-0 lines (config, cache, weights) are kept
    else:
        log.log({"step": 0, "config": dataclasses.asdict(cfg), "world_size": world, "n_student": len(d_s), "steps": len(steps)})
        for r in pending:
            log.log(r)
        if evals:
            log.log({"step": 0, "stage": "init", **{f"eval_{k}": v for k, v in evaluate(model, evals, device).items()}})

    pbar = tqdm(total=len(steps), initial=step, desc="student", disable=rank != 0, dynamic_ncols=True)
    t_log, fwd = time.time(), 0.0
    while step < len(steps):
        batches = [make_batch(ids, encoded, tok.pad_id, device) | {"ids": ids} for ids in steps[step]]
        sums = student_step(model, optimizer, batches, cache, weights, world, cfg, device)
        step += 1
        pbar.update(1)
        # NaN stop: the step was not applied on any rank; the last checkpoint is the last good state
        if not torch.isfinite(sums[:3]).all():
            log.log({"step": step, "error": "non-finite loss", "loss": sums[0].item()})
            fail(rank, f"non-finite loss at step {step}; no update applied; resume from {ckpt_dir} with a lower --lr", 3)
        # log
        fwd += sums[3].item()
        if step % cfg.log_every == 0 or step == len(steps):
            loss, nll, wkl, _ = sums.tolist()
            log.log({"step": step, "loss": loss, "nll": nll, "wkl": wkl, "tokens_per_s": fwd / max(time.time() - t_log, 1e-9)})
            pbar.set_postfix(loss=f"{loss:.4f}")
            t_log, fwd = time.time(), 0.0
        # eval
        if evals and cfg.eval_every and step % cfg.eval_every == 0 and step < len(steps):
            log.log({"step": step, **{f"eval_{k}": v for k, v in evaluate(model, evals, device).items()}})
        # checkpoint
        stopping = cfg.stop_after_steps and step == cfg.stop_after_steps and step < len(steps)
        if (cfg.save_every and step % cfg.save_every == 0) or stopping:
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "global_batch": global_batch}, cfg.keep_checkpoints)
            t_log = time.time()
        if stopping:
            pbar.close()
            log.log({"step": step, "stopped_after_steps": step})
            finish(0)
    pbar.close()

    # outputs: held-out NLL / top-1 agreement, the adapter (PEFT layout) and the merged student (HF format)
    if evals:
        log.log({"step": step, "stage": "final", **{f"eval_{k}": v for k, v in evaluate(model, evals, device).items()}})
    save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "global_batch": global_batch}, cfg.keep_checkpoints)
    save_final(cfg.out, model, cfg.tokenizer, cfg, getattr(torch, cfg.merged_dtype) if cfg.merged_dtype else None)
    log.log({"step": step, "done": True, "final": os.path.join(cfg.out, "final")})
    finish(0)


if __name__ == "__main__":
    main()
