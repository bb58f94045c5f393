"""Proxy-KD stage 3: distil the black-box teacher into the student through the aligned proxy.
Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language Models" (arXiv 2401.07013),
Section 3.4, Eq. 7-11, Appendix A.1.

  cache      The frozen aligned proxy pi_p (train_proxy.py's <out>/final) reads D_s teacher-forced on the
             teacher's replies y and stores, per response token, its top-k token ids and log-probs
             (normalised over the full vocabulary), plus log pi_p(y|x) per example (Appendix A.1: "only
             the top 10 token indices and their logits are retained"). Offline, once.
  weights    Eq. 9: w = sigmoid((log pi_p(y|x) - mu) / gamma), mu / gamma the mean / std over all of D_s.
  distil     LoRA on the student: L = L_Student-NLL (Eq. 7) + alpha * L_Weight-KL (Eq. 10), Eq. 11.
             Adam at a constant lr, one epoch, alpha = 100 in the paper.

D_s is data.split_indices(n, split_seed)["student"]: give the same --data and --split_seed as
train_proxy.py, so it is the slice the proxy never trained on (checked against the proxy's
provenance.json). --alpha 0 is black-box KD (Eq. 7 alone, no proxy); --no_weights sets w = 1;
--max_examples N trains on the first N examples of D_s only, while the cache and Eq. 9 stay those of all
of D_s. The README is the runbook (commands, outputs, the cache's files, resume); `--help` lists every
flag.
"""

import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import fast
import parallel
import plumbing
import proxykd as pk
from model import ModelArgs, read_hf_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Config(plumbing.Launch):  # + device, deterministic, timeout_min, long_timeout_min
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
    max_examples: int = 0  # train on the first N examples of D_s only (0 = all); the cache and Eq. 9 stay all of D_s's
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
    save_every: int = 200  # optimizer steps between checkpoints (also saved at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    resume: bool = False  # continue from <out>/checkpoints/latest; fresh start if none
    stop_after_steps: int = 0  # testing/debugging: checkpoint and exit after this many optimizer steps (0 = off)
    plan: bool = False  # print the per-GPU memory plan from the config.json files and the flags, and exit (no weights loaded)
    plan_world_size: int = 0  # --plan: GPUs to plan for (0 = this launch's world size)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:  # both phases' per-GPU memory from the config.json files and the flags; no weight is loaded
        proxy = cfg.proxy if cfg.alpha else "(none)"
        return plumbing.print_plan(cfg, memory_plan, f"train_student.py memory plan: {cfg.base}, proxy {proxy}")

    # setup: the ranks and D_s, the slice of the teacher's data the proxy never saw
    rank, world, device = plumbing.init_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank and for every world size
    plumbing.check_out_dir(cfg.out, cfg.resume, rank)
    tok, examples, held_out, vocab = plumbing.read_inputs(cfg, rank)
    d_s = data.split_indices(len(examples), cfg.split_seed)["student"]
    encoded = {i: data.encode_example(tok, examples[i], cfg.max_len) for i in d_s}
    evals = plumbing.eval_batches([data.encode_example(tok, e, cfg.max_len) for e in held_out], cfg.eval_batch_size,
                                  rank, world, tok.pad_id)
    records = []  # metrics lines of the cache and weights, logged once the run starts

    # cache (Eq. 8's pi_p) and weights (Eq. 9), once over all of D_s; black-box KD (alpha 0) needs neither
    cache, weights = None, None
    if cfg.alpha != 0:
        note = plumbing.check_proxy(cfg, tok, vocab, len(examples), rank)
        records += [{"step": 0, "note": note}] if note else []
        cache = cache_proxy(cfg, encoded, d_s, tok, rank, world, device, records)
        weights = example_weights(cfg, cache, d_s, rank, world, device, records)
        if cfg.cache_only:
            if rank == 0:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
            plumbing.finish(0)

    # distil: the student, frozen bf16 base + fp32 LoRA (FSDP2), trained on Eq. 11 over D_s
    model = plumbing.load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, DTYPES[cfg.base_dtype])
    model = plumbing.shard_model(model, cfg.activation_checkpointing)
    optimizer = plumbing.make_optimizer(model, cfg)
    train_ids = d_s[: cfg.max_examples] if cfg.max_examples else d_s  # a student-only data budget, in the data's order
    steps = plumbing.plan_steps(train_ids, cfg, rank, world, range(cfg.epochs))
    config = {"step": 0, "config": dataclasses.asdict(cfg), "world_size": world, "n_student": len(d_s),
              "n_train": len(train_ids), "steps": len(steps)}
    run = plumbing.Run(cfg, model, optimizer, len(steps), "student", rank, world, device, evals, [config, *records])
    distil(run, cfg, steps, encoded, cache, weights, tok.pad_id, world, device)

    # outputs: held-out NLL / top-1 agreement, the adapter (PEFT layout) and a merged student (HF format)
    run.log_eval({"stage": "final"})
    run.finish(cfg.out)


@torch.no_grad()
def build_cache(cfg: Config, proxy, encoded: dict, todo: list[int], digest: str, pad_id: int, rank: int, world: int,
                device) -> int:
    """The proxy's top-k over this rank's share of the uncached examples `todo`, written as part files of
    cfg.cache_dir. Examples go longest first (less padding; an out-of-memory shows in the first batch)
    and are dealt round-robin; a rank with fewer batches runs throw-away forwards so every rank issues
    the same FSDP collectives. Returns the response tokens cached by this rank."""
    todo = sorted(todo, key=lambda i: (-len(encoded[i]["input_ids"]), i))
    mine, bs = todo[rank::world], cfg.cache_batch_size
    n_batches = math.ceil(math.ceil(len(todo) / world) / bs)
    records, n_tok = [], 0
    for j in tqdm(range(n_batches), desc="proxy cache", disable=rank != 0, dynamic_ncols=True):
        ids = mine[j * bs : (j + 1) * bs]
        b = plumbing.make_batch(ids or todo[:1], encoded, pad_id, device)
        labels = b["labels"]
        top_ids, top_lps, seq = proxy(b["input_ids"], head_fn=lambda h, w: fast.topk_logps_chunked(h, w, labels, cfg.topk, cfg.chunk_size))
        if ids:
            rows = plumbing.topk_rows(top_ids.cpu(), top_lps.to(DTYPES[cfg.cache_dtype]).cpu(), labels.cpu())
            records += [(i, r_ids, r_lps, s) for i, (r_ids, r_lps), s in zip(ids, rows, seq.tolist())]
            n_tok += sum(r[0].shape[0] for r in rows)
        if (j + 1) % cfg.cache_flush_every == 0:
            plumbing.write_part(cfg.cache_dir, digest, records)
            records = []
            plumbing.crash_point("cache_part")
    plumbing.write_part(cfg.cache_dir, digest, records)
    return n_tok


def cache_proxy(cfg: Config, encoded: dict, d_s: list[int], tok: data.Tokenizer, rank: int, world: int, device,
                records: list[dict]) -> plumbing.ProxyCache:
    """The cache phase: the examples of D_s the cache lacks go through the proxy (build_cache), then every
    rank opens the complete cache. A cache holds what it was built from (data, split, tokenizer, proxy
    hashes) and resumes by itself: whole parts are kept, a cache without COMPLETE is never read."""
    meta, todo = plumbing.prepare_cache(cfg, tok, d_s, rank)
    if todo:  # [] when a run died between its last part and COMPLETE; None when the cache is complete
        t0 = time.time()
        # every rank builds the proxy on the meta device and reads only its own shard of each tensor, so
        # no GPU and no rank ever holds the whole proxy
        proxy = plumbing.shard_model(plumbing.load_base(cfg.proxy, DTYPES[cfg.proxy_dtype]).requires_grad_(False).eval())
        n_tok = torch.tensor(float(build_cache(cfg, proxy, encoded, todo, plumbing.meta_digest(meta), tok.pad_id,
                                               rank, world, device)), device=device)
        # free the proxy before the student loads: FSDP2 keeps the module in a reference cycle, so `del`
        # alone leaves every shard allocated until the cycle collector runs
        del proxy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        dist.all_reduce(n_tok)
        dt = time.time() - t0
        records.append({"step": 0, "phase": "cache", "examples": len(todo), "tokens": int(n_tok.item()),
                        "seconds": dt, "tokens_per_s": n_tok.item() / max(dt, 1e-9)})
    cache = plumbing.open_cache(cfg.cache_dir, meta, d_s, rank, finalise=todo is not None)
    records.append({"step": 0, "phase": "cache_ready", "cache_dir": cfg.cache_dir, **cache.stats})
    if rank == 0:
        print(f"proxy cache {cfg.cache_dir}: {cache.stats['examples']} examples, {cache.stats['tokens']} tokens, "
              f"{cache.stats['bytes_per_token']:.1f} bytes/token", file=sys.stderr)
    return cache


def example_weights(cfg: Config, cache: plumbing.ProxyCache, d_s: list[int], rank: int, world: int, device,
                   records: list[dict]) -> dict[int, float] | None:
    """Eq. 9 per example id (None with --no_weights: w = 1). mu and gamma are over all of D_s: each rank
    contributes a disjoint slice to their all_reduce. Examples cut to no response tokens (prompt >=
    max_len) have no KL term; they are left out of the moments and weigh 0."""
    scored = [i for i, n in zip(d_s, cache.n_tokens(d_s).tolist()) if n > 0]
    scores = pk.weight_scores(cache.seq_logps(scored), cache.n_tokens(scored), cfg.weight_per_token)
    mu, gamma = plumbing.reduce_mean_std(scores[rank::world].contiguous().to(device))
    w = pk.sample_weights(scores, mu.cpu(), gamma.cpu())
    records.append({"step": 0, "phase": "weights", "mu": mu.item(), "gamma": gamma.item(), "per_token": cfg.weight_per_token,
                    "used": not cfg.no_weights, "w_mean": w.mean().item(), "w_min": w.min().item(), "w_max": w.max().item()})
    return None if cfg.no_weights else {i: 0.0 for i in d_s} | dict(zip(scored, w.tolist()))


def distil(run: plumbing.Run, cfg: Config, steps: list, encoded: dict, cache, weights: dict | None, pad_id: int,
           world: int, device) -> None:
    """The student's optimizer steps on Eq. 11, from where the run stands."""
    while run.step < len(steps):
        batches = [plumbing.make_batch(ids, encoded, pad_id, device) for ids in steps[run.step]]
        loss, nll, wkl, fwd = student_step(run.model, run.optimizer, batches, cache, weights, world, cfg, device).tolist()
        end = run.step + 1 == len(steps)
        eval_now = bool(cfg.eval_every) and (run.step + 1) % cfg.eval_every == 0 and not end
        run.step_done({"loss": loss, "nll": nll, "wkl": wkl}, fwd, {}, stage_end=end, eval_now=eval_now)


def student_step(model, optimizer, batches: list[dict], cache, weights: dict | None, world: int, cfg: Config, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (plumbing.make_batch); every rank calls it with
    the same number of micro-batches.

    Minimises Eq. 11 = Eq. 7 + alpha * Eq. 10 on the cached proxy top-k (cache None: Eq. 7 alone, plain
    SFT on the teacher's text). Each micro-batch's sums are divided by the step's GLOBAL response-token
    count, so micro-batches and ranks add up to exactly one big batch; the count is divided by `world`
    because FSDP2 averages gradients over ranks (gloo cannot pre-scale with set_gradient_divide_factor).
    Returns the all_reduced step metrics (4,) fp64, identical on every rank: loss, nll, wkl (Eq. 10
    before alpha), forwarded tokens. The optimizer steps only when the loss is finite on every rank.
    """
    n = torch.tensor(float(sum(b["n_tokens"] for b in batches)), dtype=torch.float64, device=device)
    dist.all_reduce(n)
    n_tokens = (n.clamp(min=1) / world).float()

    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for b in batches:
        labels = b["labels"]
        if cache is None:
            loss = model(b["input_ids"], head_fn=lambda h, w: -fast.token_logps_fused(h, w, labels, cfg.chunk_size).sum() / n_tokens)
            nll, wkl = loss.detach(), torch.zeros((), device=device)
        else:
            top_ids, top_lps = plumbing.pad_topk(cache.rows(b["ids"]), b["labels_cpu"], device)  # (B, T-1, k), shifted grid
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


# ---------------------------------------------------------------------------------------------------
# flags and the memory plan


def parse_args(argv=None) -> Config:
    p = plumbing.flags_parser(Config, __doc__)
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
    if cfg.max_examples < 0 or cfg.epochs < 1:
        p.error("--max_examples >= 0 and --epochs >= 1")
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.out, "cache")
    return cfg


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


if __name__ == "__main__":
    main()
