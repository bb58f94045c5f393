"""The student's proxy cache: pi_p's top-k next-token log-probs at every response token of D_s, and
log pi_p(y|x) per example, computed once by the frozen aligned proxy (train_student.build_cache) and read
by every training step (Eq. 8's soft labels, Eq. 9's scores). Files in --cache_dir:

  meta.json                    what it is bound to (cache_meta): sha256 of the data, field names, split
                               seed, tokenizer and template fingerprints, sha256 of the proxy checkpoint,
                               k, max_len, dtypes. A cache whose meta.json differs is refused, naming the
                               fields.
  part-<first id>.safetensors  written by each rank every --cache_flush_every batches (temp file +
                               os.replace: whole or absent): example_ids (E,) int64, offsets (E+1,)
                               int64, seq_logps (E,) fp32 = log pi_p(y|x), topk_ids (N, k) int32 and
                               topk_logps (N, k) fp16 or bf16 (log pi_p over the full vocabulary). Rows
                               offsets[e]:offsets[e+1] are example e's response tokens, in order.
  COMPLETE                     written last by rank 0; without it the cache is partial: never read, and
                               a rerun computes only the examples no whole part holds.

On the device the rows of a micro-batch are laid out on the shifted (B, T-1, k) grid of proxykd.topk_kl
(pad_topk); topk_rows is the inverse, from the producer's grid to the stored rows.
"""

import hashlib
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import data
import proxykd as pk
import ranks

CACHE_FORMAT = "proxykd-topk-cache/1"


class CacheError(RuntimeError):
    """A cache that must not be used; the message says why and how to rebuild."""


def proxy_fingerprint(proxy_dir: str) -> str:
    """sha256 over the proxy's config and weight files (names and contents): the checkpoint identity.
    Reads every weight byte (minutes for 70B, once per run, on rank 0): cheaper stand-ins such as
    mtimes or safetensors headers do not change when only the weights do."""
    names = sorted(n for n in os.listdir(proxy_dir)
                   if n == "config.json" or n.endswith((".safetensors", ".index.json")))
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{proxy_dir}: no *.safetensors weights (expected an HF-format proxy dir)")
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}\0{data.sha256_file(os.path.join(proxy_dir, n))}\0".encode())
    return h.hexdigest()


def template_fingerprint(tok: data.Tokenizer, max_len: int) -> str:
    """sha256 of how probe examples are tokenised (prompt template, system line, bos/eos, label mask):
    a cache is only valid for the token sequences it was computed on."""
    probes = [data.Example("probe prompt", "probe reply", "probe", system)
              for system in (None, "probe system")]
    blob = json.dumps([data.encode_example(tok, p, max_len) for p in probes], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_meta(cfg, tok: data.Tokenizer, n_student: int, proxy_hash: str) -> dict:
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


def part_files(cache_dir: str) -> list[str]:
    return sorted(os.path.join(cache_dir, n) for n in os.listdir(cache_dir)
                  if n.startswith("part-") and n.endswith(".safetensors"))


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
        if part_files(cache_dir) or os.path.exists(os.path.join(cache_dir, "COMPLETE")):
            raise CacheError(f"{cache_dir} holds cache files but no meta.json; "
                             f"delete it or pass --rebuild_cache")
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
    for path in part_files(cache_dir):
        with safe_open(path, framework="pt") as f:
            done.update(f.get_tensor("example_ids").tolist())
    return done


def write_part(cache_dir: str, digest: str,
               records: list[tuple[int, torch.Tensor, torch.Tensor, float]]) -> None:
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
    for path in part_files(cache_dir):
        with safe_open(path, framework="pt") as f:
            if f.metadata().get("meta_sha256") != digest:
                raise CacheError(f"{path} belongs to another cache; "
                                 f"delete {cache_dir} or pass --rebuild_cache")
            for i in f.get_tensor("example_ids").tolist():
                if i in seen:
                    raise CacheError(f"example {i} is in both {seen[i]} and {path}; delete {cache_dir}")
                seen[i] = path
            n_tokens += int(f.get_tensor("offsets")[-1])
        n_bytes += os.path.getsize(path)
    missing = set(student_ids) - set(seen)
    if missing or len(seen) != len(student_ids):
        raise CacheError(f"{cache_dir}: {len(missing)} examples of D_s missing, "
                         f"{len(set(seen) - set(student_ids))} foreign")
    stats = {"meta_sha256": digest, "examples": len(seen), "tokens": n_tokens, "bytes": n_bytes,
             "bytes_per_token": n_bytes / max(n_tokens, 1), "parts": len(part_files(cache_dir))}
    data.atomic_write(os.path.join(cache_dir, "COMPLETE"), json.dumps(stats, indent=1))
    return stats


class ProxyCache:
    """Read side of a COMPLETE cache, by example id, whatever world size wrote it. The top-k tensors
    stay memory-mapped; only the rows of the current batch are read."""

    def __init__(self, cache_dir: str, meta: dict):
        complete = os.path.join(cache_dir, "COMPLETE")
        if not os.path.exists(complete):
            raise CacheError(f"{cache_dir} is incomplete (no COMPLETE marker): rerun train_student.py "
                             f"with the same arguments to finish it, or --rebuild_cache to start over")
        check_meta(cache_dir, meta)
        with open(complete) as f:
            self.stats = json.load(f)
        digest = meta_digest(meta)
        self.files = []
        self.where: dict[int, tuple[int, int, int]] = {}  # example id -> (file, first row, last row + 1)
        self.seq: dict[int, float] = {}
        for fi, path in enumerate(part_files(cache_dir)):
            f = safe_open(path, framework="pt")
            if f.metadata().get("meta_sha256") != digest:
                raise CacheError(f"{path} belongs to another cache; "
                                 f"delete {cache_dir} or pass --rebuild_cache")
            self.files.append(f)
            off = f.get_tensor("offsets").tolist()
            for e, (i, s) in enumerate(zip(f.get_tensor("example_ids").tolist(),
                                           f.get_tensor("seq_logps").tolist())):
                self.where[i] = (fi, off[e], off[e + 1])
                self.seq[i] = s

    def n_tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.where[i][2] - self.where[i][1] for i in ids], dtype=torch.int64)

    def seq_logps(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.seq[i] for i in ids], dtype=torch.float64)

    def rows(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> per example (topk_ids (n_i, k) int32, topk_logps (n_i, k)), the input of pad_topk."""
        out = []
        for i in ids:
            fi, a, b = self.where[i]
            f = self.files[fi]
            out.append((f.get_slice("topk_ids")[a:b], f.get_slice("topk_logps")[a:b]))
        return out


def prepare_cache_or_exit(cfg, tok: data.Tokenizer, d_s: list[int],
                          rank: int) -> tuple[dict, list[int] | None]:
    """Collective; a cache of another run stops every rank with one message. Rank 0 hashes the proxy and
    creates or checks cfg.cache_dir; every rank gets (the cache's meta, the examples of D_s it still
    lacks: None when it is COMPLETE, [] when every part is written but COMPLETE is not)."""
    meta = todo = err = None
    if rank == 0:  # rank 0 owns the directory; the others wait for its verdict
        try:
            meta = cache_meta(cfg, tok, len(d_s), proxy_fingerprint(cfg.proxy))
            prepare_cache_dir(cfg.cache_dir, meta, cfg.rebuild_cache)
            if not os.path.exists(os.path.join(cfg.cache_dir, "COMPLETE")):
                # whole parts already written stay
                todo = sorted(set(d_s) - cached_example_ids(cfg.cache_dir))
        except (CacheError, OSError) as e:
            err = str(e)
    meta, todo, err = ranks.agree((meta, todo, err), long=True)
    if err is not None:
        ranks.fail(rank, err)
    return meta, todo


def open_cache_or_exit(cache_dir: str, meta: dict, d_s: list[int], rank: int, finalise: bool) -> ProxyCache:
    """Collective; a cache that does not cover D_s, or that some rank cannot open, stops every rank with
    one message. With finalise (after every rank wrote its parts) rank 0 checks that the parts cover D_s
    and writes COMPLETE; then every rank opens the cache itself (a node that does not see the shared
    filesystem fails here, together with the others)."""
    if finalise:
        ranks.long_barrier()  # every rank's parts are written
        err = None
        if rank == 0:
            try:
                finalise_cache(cache_dir, meta_digest(meta), d_s)
            except CacheError as e:
                err = str(e)
        if (err := ranks.agree(err, long=True)) is not None:
            ranks.fail(rank, err)
    try:
        cache, err = ProxyCache(cache_dir, meta), None
    except (CacheError, OSError) as e:
        cache, err = None, f"rank {rank}: {e}"
    if (err := ranks.first_error(err)) is not None:
        ranks.fail(rank, err)
    return cache


def topk_rows(topk_ids: torch.Tensor, topk_logps: torch.Tensor,
              labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, T-1, k) batch cache -> per example (ids (n_i, k), logps (n_i, k)) at its n_i response
    positions, in order: the compact form to store. Inverse of pad_topk for the same labels."""
    m = pk.response_mask(labels)
    return [(topk_ids[b][m[b]], topk_logps[b][m[b]]) for b in range(labels.shape[0])]


def pad_topk(rows: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cache rows (ids (n_i, k), logps (n_i, k)) + the batch labels (B, T) ->
    (topk_ids (B, T-1, k) int32, topk_logps (B, T-1, k)) on the shifted grid, zeros where masked, on
    `device` (default the labels'). Built on the host: give it host labels (make_batch's labels_cpu) and
    it never waits on the device. Raises ValueError if an example's row count differs from its
    response-token count (the cache was built with another tokenizer / max_len)."""
    device = labels.device if device is None else device
    m = pk.response_mask(labels.cpu()).tolist()  # positions in Python: no op here reads from a device
    B, Tm1, k = len(m), len(m[0]), rows[0][0].shape[-1]
    ids = torch.zeros(B, Tm1, k, dtype=torch.int32)
    lps = torch.zeros(B, Tm1, k, dtype=rows[0][1].dtype)
    for b, (i, lp) in enumerate(rows):
        pos = [t for t, scored in enumerate(m[b]) if scored]
        if len(pos) != i.shape[0]:
            raise ValueError(f"example {b}: cache has {i.shape[0]} positions, labels have {len(pos)}")
        pos = torch.tensor(pos, dtype=torch.long)
        ids[b, pos] = i.to(torch.int32).cpu()
        lps[b, pos] = lp.cpu()
    return data.to_device(ids, device), data.to_device(lps, device)
