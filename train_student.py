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
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import fast
import memory_plan
import plan_trace
import provenance
import proxykd as pk
import ranks
import sharding
import topk_cache
from model import ModelArgs, read_hf_config
from run import Run, flags_parser, head

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Config(ranks.Launch):  # + device, deterministic, timeout_min, long_timeout_min
    base: str = ""  # student base checkpoint, HF format (config.json + *.safetensors)
    # aligned proxy, HF format (train_proxy.py's <out>/final, with tokenizer.model); unused at alpha 0
    proxy: str = ""
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
    optimizer: str = "adam"  # adam (paper) or sgd (tests: its update is proportional to the gradient)
    # fused (fast.py's heads) or reference (full logits, proxykd.py as written): same numbers
    loss: str = "fused"
    epochs: int = 1  # passes over D_s (paper: one epoch)
    max_examples: int = 0  # train on the first N examples of D_s only (0 = all); cache and Eq. 9 keep all D_s
    # weight of the KL term in Eq. 11 (paper: 100); 0 = black-box KD, plain SFT, no proxy
    alpha: float = 100.0
    no_weights: bool = False  # w = 1: unweighted KL, Eq. 8 instead of Eq. 10 (ablation)
    weight_per_token: bool = False  # Eq. 9 on log pi_p(y|x) / |y| instead of the sequence sum (not in paper)
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
    base_dtype: str = "bfloat16"  # dtype of the frozen base (paper: bf16); float32 for exactness tests
    merged_dtype: str = ""  # dtype of final/model.safetensors ("" = the base checkpoint's dtype)
    activation_checkpointing: bool = False  # recompute each block in backward (long sequences / big models)
    chunk_size: int = 0  # rows per (rows, V) logits block of a fused head (0: fast.default_chunk_size)
    eval_batch_size: int = 8  # examples per eval forward per rank
    eval_every: int = 0  # optimizer steps between held-out evals (0 = only before and after training)
    keep_best: bool = False  # also keep the adapter and merged model of the lowest held-out NLL in <out>/best
    log_every: int = 1  # optimizer steps between metrics lines
    save_every: int = 200  # optimizer steps between checkpoints (also saved at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    resume: bool = False  # continue from <out>/checkpoints/latest; fresh start if none
    stop_after_steps: int = 0  # testing/debugging: checkpoint and exit after this many optimizer steps
    plan: bool = False  # print the per-GPU memory plan from the config.json files and the flags, and exit
    plan_world_size: int = 0  # --plan: GPUs to plan for (0 = this launch's world size)
    trace: bool = False  # --plan: also run each phase on fake tensors at full size (CPU, minutes) and compare


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:  # both phases' per-GPU memory from the config.json files and the flags; no weight is loaded
        proxy = cfg.proxy if cfg.alpha else "(none)"
        trace = (lambda c, world: plan_trace.trace_student(c, world, student_step)) if cfg.trace else None
        title = f"train_student.py memory plan: {cfg.base}, proxy {proxy}"
        return memory_plan.print_plan(cfg, plan_memory, title, trace)

    # setup: the ranks and D_s, the slice of the teacher's data the proxy never saw
    run = Run.launch(cfg)  # stops every rank when --out holds checkpoints and --resume is not given
    examples, held_out, vocab = run.read_inputs_or_exit()
    d_s = data.split_indices(len(examples), cfg.split_seed)["student"]  # never empty: it takes the remainder
    run.encode(d_s, examples, held_out)
    records = []  # metrics lines of the cache and weights, logged once the run starts

    # cache (Eq. 8's pi_p) and weights (Eq. 9), once over all of D_s; black-box KD (alpha 0) needs neither
    cache, weights = None, None
    if cfg.alpha != 0:
        note = provenance.check_proxy_or_exit(cfg, run.tok, vocab, len(examples), run.rank)
        records += [{"step": 0, "note": note}] if note else []
        cache = cache_proxy(run, d_s, records)
        weights = example_weights(run, cache, d_s, records)
        if cfg.cache_only:  # the cache is complete: train from it elsewhere, at any world size
            run.start(0, [{"step": 0, "config": dataclasses.asdict(cfg)}, *records], "cache", evaluate=False)
            return

    # distil: the student, frozen bf16 base + fp32 LoRA (FSDP2), trained on Eq. 11 over D_s
    model = sharding.load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                     DTYPES[cfg.base_dtype])
    run.model = sharding.shard_model(model, cfg.activation_checkpointing)
    run.optimizer = run.make_optimizer()
    train_ids = d_s[: cfg.max_examples] if cfg.max_examples else d_s  # a student-only data budget, in order
    steps = data.plan_steps(train_ids, cfg, run.rank, run.world, range(cfg.epochs))
    if cfg.resume:
        run.restore_checkpoint_or_exit()  # the newest checkpoint: step, LoRA, Adam, RNG, the best evaluation
    config = {"step": 0, "config": dataclasses.asdict(cfg), "world_size": run.world, "n_student": len(d_s),
              "n_train": len(train_ids), "steps": len(steps)}
    run.start(len(steps), [config, *records], "student")
    distil(run, steps, cache, weights)

    # outputs: held-out NLL / top-1 agreement, the adapter (PEFT layout) and a merged student (HF format)
    run.evaluate({"stage": "final"})
    run.save_outputs()


# ---------------------------------------------------------------------------------------------------
# the proxy's top-k cache (Eq. 8) and the sample weights (Eq. 9)


def cache_proxy(run: Run, d_s: list[int], records: list[dict]) -> topk_cache.ProxyCache:
    """The cache phase: the examples of D_s the cache lacks go through the proxy (build_cache), then every
    rank opens the complete cache. A cache holds what it was built from (data, split, tokenizer, proxy
    hashes) and resumes by itself: whole parts are kept, a cache without COMPLETE is never read. A cache
    of another run, or one that does not cover D_s, stops every rank with one line."""
    cfg = run.cfg
    meta, todo = topk_cache.prepare_cache_or_exit(cfg, run.tok, d_s, run.rank)
    if todo:  # [] when a run died between its last part and COMPLETE; None when the cache is complete
        t0 = time.time()
        # every rank builds the proxy on the meta device and reads only its own shard of each tensor, so
        # no GPU and no rank ever holds the whole proxy
        proxy = sharding.shard_model(
            sharding.load_base(cfg.proxy, DTYPES[cfg.proxy_dtype]).requires_grad_(False).eval())
        n_tok = build_cache(run, proxy, todo, topk_cache.meta_digest(meta))
        # free the proxy before the student loads: FSDP2 keeps the module in a reference cycle, so `del`
        # alone leaves every shard allocated until the cycle collector runs
        del proxy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n_tok = data.to_device(torch.tensor(float(n_tok)), run.device)
        dist.all_reduce(n_tok)
        dt = time.time() - t0
        records.append({"step": 0, "phase": "cache", "examples": len(todo), "tokens": int(n_tok.item()),
                        "seconds": dt, "tokens_per_s": n_tok.item() / max(dt, 1e-9)})
    cache = topk_cache.open_cache_or_exit(cfg.cache_dir, meta, d_s, run.rank, finalise=todo is not None)
    records.append({"step": 0, "phase": "cache_ready", "cache_dir": cfg.cache_dir, **cache.stats})
    if run.rank == 0:
        print(f"proxy cache {cfg.cache_dir}: {cache.stats['examples']} examples, "
              f"{cache.stats['tokens']} tokens, {cache.stats['bytes_per_token']:.1f} bytes/token",
              file=sys.stderr)
    return cache


@torch.no_grad()
def build_cache(run: Run, proxy, todo: list[int], digest: str) -> int:
    """The proxy's top-k (proxykd.topk_logps) over this rank's share of the uncached examples `todo`,
    written as part files of --cache_dir (topk_cache.py). Examples go longest first (less padding; an
    out-of-memory shows in the first batch) and are dealt round-robin; a rank with fewer batches runs
    throw-away forwards so every rank issues the same FSDP collectives. Returns the response tokens
    cached by this rank."""
    cfg = run.cfg
    todo = sorted(todo, key=lambda i: (-len(run.encoded[i]["input_ids"]), i))
    mine, bs = todo[run.rank :: run.world], cfg.cache_batch_size
    n_batches = math.ceil(math.ceil(len(todo) / run.world) / bs)
    records, n_tok, behind = [], 0, None
    # one batch behind: batch j's top-k travels to the host while batch j + 1's forward runs on the device
    for j in tqdm(range(n_batches + 1), desc="proxy cache", disable=run.rank != 0, dynamic_ncols=True):
        ahead = None
        if j < n_batches:
            ids = mine[j * bs : (j + 1) * bs]
            b = data.make_batch(ids or todo[:1], run.encoded, run.tok.pad_id, run.device)
            labels = b["labels"]
            top_ids, top_lps, seq = head(proxy, b["input_ids"], cfg.loss,
                                         lambda logits: pk.topk_logps(logits, labels, cfg.topk),
                                         lambda h, w: fast.topk_logps_chunked(h, w, labels, cfg.topk,
                                                                              cfg.chunk_size))
            if ids:
                ahead = ids, b["labels_cpu"], *data.to_host(top_ids, top_lps.to(DTYPES[cfg.cache_dtype]), seq)
        if behind is not None:
            ids, labels_cpu, (top_ids, top_lps, seq), wait = behind
            wait()
            rows = topk_cache.topk_rows(top_ids, top_lps, labels_cpu)
            records += [(i, r_ids, r_lps, s) for i, (r_ids, r_lps), s in zip(ids, rows, seq.tolist())]
            n_tok += sum(r[0].shape[0] for r in rows)
        if j > 0 and j % cfg.cache_flush_every == 0:  # batches j - flush_every ... j - 1 are in
            topk_cache.write_part(cfg.cache_dir, digest, records)
            records = []
            ranks.crash_point("cache_part")
        behind = ahead
    topk_cache.write_part(cfg.cache_dir, digest, records)
    return n_tok


def example_weights(run: Run, cache: topk_cache.ProxyCache, d_s: list[int],
                    records: list[dict]) -> dict | None:
    """Eq. 9 per example id (None with --no_weights: w = 1). mu and gamma are over all of D_s: each rank
    contributes a disjoint slice to their all_reduce. Examples cut to no response tokens (prompt >=
    max_len) have no KL term; they are left out of the moments and weigh 0."""
    cfg = run.cfg
    scored = [i for i, n in zip(d_s, cache.n_tokens(d_s).tolist()) if n > 0]
    scores = pk.weight_scores(cache.seq_logps(scored), cache.n_tokens(scored), cfg.weight_per_token)
    mu, gamma = mean_std_over_ranks(data.to_device(scores[run.rank :: run.world].contiguous(), run.device))
    w = pk.sample_weights(scores, mu.cpu(), gamma.cpu())
    records.append({"step": 0, "phase": "weights", "mu": mu.item(), "gamma": gamma.item(),
                    "per_token": cfg.weight_per_token, "used": not cfg.no_weights, "w_mean": w.mean().item(),
                    "w_min": w.min().item(), "w_max": w.max().item()})
    return None if cfg.no_weights else {i: 0.0 for i in d_s} | dict(zip(scored, w.tolist()))


def mean_std_over_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective. Eq. 9's moments: mean mu and population std gamma of x over all ranks, each holding a
    disjoint slice of D_s's scores. x (N_r,) -> (mu (), gamma ()) fp64, the same on every rank. One
    all_reduce of (sum, sum of squares, count) in fp64, which keeps ss / n - mu^2 free of cancellation
    for log-likelihoods of any realistic size."""
    x = x.detach().to(torch.float64).reshape(-1)
    moments = torch.stack([x.sum(), (x * x).sum(), torch.ones_like(x).sum()])
    dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    s, ss, n = moments.unbind()
    n = n.clamp(min=1)
    mu = s / n
    gamma = (ss / n - mu * mu).clamp(min=0).sqrt()
    return mu, gamma


# ---------------------------------------------------------------------------------------------------
# distillation (Eq. 7, 10, 11)


def distil(run: Run, steps: list, cache: topk_cache.ProxyCache | None, weights: dict | None) -> None:
    """The student's optimizer steps on Eq. 11, from where the run stands (cache None: Eq. 7 alone)."""
    cfg = run.cfg
    while run.step < len(steps):
        batches = [data.make_batch(ids, run.encoded, run.tok.pad_id, run.device) for ids in steps[run.step]]
        out = student_step(run, batches, cache, weights)
        end = run.step + 1 == len(steps)
        run.log_step(out.logged(), out.tokens, {}, end)
        if not out.finite:
            run.exit_non_finite(out.loss, {})
        if cfg.eval_every and run.step % cfg.eval_every == 0 and not end:  # the end's is the final one
            run.evaluate({})
        if run.checkpoint_due(end):
            run.save_checkpoint()
        run.exit_if_stopping()


class StudentStep(NamedTuple):
    """One optimizer step's values, summed over micro-batches and ranks: the same on every rank."""
    loss: float  # Eq. 11
    nll: float  # Eq. 7
    wkl: float  # Eq. 10, before alpha
    tokens: float  # tokens forwarded, for tokens/s

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.loss, self.nll, self.wkl))

    def logged(self) -> dict:
        return {"loss": self.loss, "nll": self.nll, "wkl": self.wkl}


def student_step(run: Run, batches: list[dict], cache: topk_cache.ProxyCache | None, weights: dict | None
                 ) -> StudentStep:
    """One optimizer step over this rank's micro-batches (data.make_batch); every rank calls it with the
    same number of micro-batches.

    Minimises Eq. 11 = Eq. 7 + alpha * Eq. 10 on the cached proxy top-k (cache None: Eq. 7 alone, plain
    SFT on the teacher's text). Each micro-batch's sums are divided by the step's GLOBAL response-token
    count, so micro-batches and ranks add up to exactly one big batch; the count is divided by the world
    size because FSDP2 averages gradients over ranks (gloo cannot pre-scale with
    set_gradient_divide_factor). The optimizer steps only when the loss is finite on every rank.
    """
    cfg, device = run.cfg, run.device
    n = data.to_device(torch.tensor(float(sum(b["n_tokens"] for b in batches)), dtype=torch.float64), device)
    dist.all_reduce(n)
    n_tokens = (n.clamp(min=1) / run.world).float()

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # the StudentStep fields, in order
    for b in batches:
        labels, rows = b["labels"], b["n_rows"]
        if cache is None:  # black-box KD: Eq. 7, this micro-batch's share of the step's mean
            loss = head(run.model, b["input_ids"], cfg.loss,
                        lambda logits: pk.nll_loss(logits, labels, n_tokens),
                        lambda h, w: fast.nll_loss_fused(h, w, labels, n_tokens, cfg.chunk_size, rows))
            nll, wkl = loss.detach(), torch.zeros((), device=device)
        else:
            # (B, T-1, k)
            top_ids, top_lps = topk_cache.pad_topk(cache.rows(b["ids"]), b["labels_cpu"], device)
            w = (None if weights is None
                 else data.to_device(torch.tensor([weights[i] for i in b["ids"]]), device))
            out = head(run.model, b["input_ids"], cfg.loss,
                       lambda logits: pk.student_loss(logits, labels, top_ids, top_lps, w, cfg.alpha,
                                                      n_tokens),
                       lambda h, wt: fast.student_loss_fused(h, wt, labels, top_ids, top_lps, w, cfg.alpha,
                                                             n_tokens, cfg.chunk_size, rows))
            loss, nll, wkl = out.loss, out.nll, out.wkl
        loss.backward()
        sums[:3] += torch.stack([loss.detach(), nll, wkl]).double()
    return run.end_step(sums, 3, sum(b["n_fwd"] for b in batches), StudentStep)  # all ranks; optimizer step


# ---------------------------------------------------------------------------------------------------
# flags and the memory plan


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
    if cfg.loss not in ("fused", "reference"):
        p.error("--loss must be fused or reference")
    if cfg.cache_only and cfg.alpha == 0:
        p.error("--cache_only with --alpha 0: black-box KD uses no proxy cache")
    if cfg.cache_dtype not in ("float16", "bfloat16"):
        p.error("--cache_dtype must be float16 or bfloat16")
    if cfg.alpha < 0 or cfg.topk < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.cache_flush_every < 1:
        p.error("--alpha >= 0, --topk, --batch_size, --grad_accum and --cache_flush_every >= 1")
    if cfg.max_examples < 0 or cfg.epochs < 1:
        p.error("--max_examples >= 0 and --epochs >= 1")
    if cfg.keep_best and not cfg.eval_data:
        p.error("--keep_best needs --eval_data (the held-out NLL it selects by)")
    if cfg.trace and not cfg.plan:
        p.error("--trace traces the memory plan: give it with --plan")
    cfg.cache_dir = cfg.cache_dir or os.path.join(cfg.out, "cache")
    return cfg


def plan_memory(cfg: Config, world: int) -> memory_plan.Plan:
    """This run's per-GPU memory plan (memory_plan.plan_student) from the config.json files and the flags."""
    args = {}
    for name in ("base", "proxy") if cfg.alpha != 0 else ("base",):
        args[name] = ModelArgs.from_hf_config(read_hf_config(getattr(cfg, name)))
    return memory_plan.plan_student(
        args.get("proxy"), args["base"], world, proxy_itemsize=DTYPES[cfg.proxy_dtype].itemsize,
        base_itemsize=DTYPES[cfg.base_dtype].itemsize, lora_r=cfg.lora_r, batch_size=cfg.batch_size,
        max_len=cfg.max_len, cache_batch_size=cfg.cache_batch_size, chunk_size=cfg.chunk_size,
        activation_checkpointing=cfg.activation_checkpointing)


if __name__ == "__main__":
    main()
    ranks.finish(0)  # FSDP2 + gloo processes can abort in interpreter teardown: end without it
