"""Proxy-KD stages 1-2: warm the proxy up on the black-box teacher's text, then align it to the teacher
with k rounds of NLL + DPO. Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language
Models" (arXiv 2401.07013), Section 3.3, Eq. 3-6.

  warm-up    Eq. 3: NLL of the teacher's replies y on D_w (10% of the teacher's data).
  align      k rounds (paper: 16); round i takes shard i of D_p (45%). The current proxy IS the reference
             pi_p^(i-1) of the round, so a reference pass samples its own reply y_hat for every prompt and
             scores log pi_p^(i-1) of y and y_hat, once, into a round file. The alignment pass then trains
             Eq. 6 = NLL(y) + DPO(y chosen over y_hat, Eq. 4-5, with the standard minus sign) and ends at
             pi_p^(i). No second model is ever held. --no_dpo keeps only the NLL term (the "-PO" ablation).

The proxy: a frozen bf16 base with fp32 LoRA on every linear of every block, sharded with FSDP2, Adam at
a constant lr. Launch with torchrun (NCCL on GPUs, gloo on CPU) or as a plain one-process `python`; the
README is the runbook (commands, outputs, resume, the memory plan), `--help` lists every flag, and
train_student.py takes <out>/final as its --proxy.
"""

import dataclasses
import itertools
import os
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
from model import ModelArgs, gathered, generate, read_hf_config


@dataclass
class Config(plumbing.Launch):  # + device, deterministic, timeout_min, long_timeout_min
    base: str = ""  # proxy base checkpoint, HF format (config.json + *.safetensors)
    tokenizer: str = ""  # sentencepiece tokenizer.model shared by proxy and student
    data: str = ""  # teacher jsonl: prompt x and black-box teacher reply y per line
    eval_data: str = ""  # held-out teacher jsonl for per-round NLL / top-1 agreement ("" = no eval)
    out: str = "runs/proxy"  # output dir: metrics.jsonl, checkpoints/, rounds/, adapter/, final/, warmup/
    prompt_field: str = "prompt"  # jsonl field of x (OpenOrca: question)
    response_field: str = "response"  # jsonl field of the teacher's reply y
    system_field: str = ""  # jsonl field of a system prompt ("" = none; OpenOrca: system_prompt)
    split_seed: int = 0  # data split D_w / D_p / D_s: give train_student.py the same value
    seed: int = 0  # batch order, LoRA init, sampling of y_hat
    max_len: int = 1024  # tokens per example, prompt + reply (paper: 1024)
    batch_size: int = 4  # examples (stage 2: preference pairs) per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * world
    lr: float = 1e-5  # Adam, constant (paper)
    optimizer: str = "adam"  # adam (paper) or sgd (tests: its update is proportional to the gradient, Adam's is not)
    warmup_epochs: int = 1  # stage 1 passes over D_w (paper: one epoch)
    rounds: int = 16  # k, alignment iterations over D_p (paper: 16); round i trains on shard i of D_p
    beta: float = 0.1  # DPO temperature of Eq. 4
    no_dpo: bool = False  # ablation "-PO": stage 2 trains Eq. 3 (NLL on D_p) only; no sampling, no reference
    nll_reduction: str = "sequence"  # Eq. 3 as printed: per reply ("sequence"), or per token ("token"); see train_step
    temperature: float = 1.0  # sampling temperature of the proxy's own reply y_hat
    top_p: float = 1.0  # nucleus sampling of y_hat (1.0 = plain sampling)
    greedy: bool = False  # y_hat = greedy decode instead of sampling (debugging, exactness tests)
    max_new_tokens: int = 512  # length cap of y_hat (also cut to max_len - prompt length)
    sampler: str = "auto"  # reference-pass decode: gathered (whole model per GPU), tensor_parallel, or auto (by the memory plan)
    gen_batch_size: int = 0  # prompts per decode batch: per rank (gathered), across all ranks (tensor_parallel); 0 = batch_size
    plan: bool = False  # print the per-GPU memory plan from config.json and the flags, and exit (no weights loaded)
    plan_world_size: int = 0  # --plan: GPUs to plan for (0 = this launch's world size)
    gpu_memory_gib: float = 0.0  # per-GPU memory the plan and --sampler auto hold against (0 = this GPU's; none on CPU)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = lora_alpha / lora_r = 2)
    lora_dropout: float = 0.0  # dropout on the LoRA branch; 0 as in DPO practice, so pi^(i) == pi^(i-1) at a round start
    base_dtype: str = "bfloat16"  # dtype of the frozen base (paper: bf16); float32 for exactness tests
    merged_dtype: str = ""  # dtype of final/model.safetensors ("" = the base checkpoint's dtype)
    activation_checkpointing: bool = False  # recompute each block in backward (long sequences / big models)
    chunk_size: int = 0  # positions per (chunk, V) logits block in the loss head (0: 1024 on a GPU, 16 MiB blocks on the CPU)
    eval_batch_size: int = 8  # examples per eval forward per rank
    log_every: int = 1  # optimizer steps between metrics lines
    save_every: int = 200  # optimizer steps between checkpoints (also saved after warm-up and each round)
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    resume: bool = False  # continue from <out>/checkpoints/latest (mid-round included); fresh start if none
    stop_after_steps: int = 0  # testing/debugging: checkpoint and exit after this many optimizer steps (0 = off)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:  # every phase's per-GPU memory from config.json and the flags; no weight is loaded
        return plumbing.print_plan(cfg, memory_plan, f"train_proxy.py memory plan: {cfg.base}")

    # setup: the ranks, D_w and D_p (D_s is left to the student), the proxy with fresh LoRA, the step plan
    rank, world, device = plumbing.init_distributed(cfg)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank and for every world size
    plumbing.check_out_dir(cfg.out, cfg.resume, rank)
    tok, examples, held_out, _ = plumbing.read_inputs(cfg, rank)
    # what trained this proxy, for its final/provenance.json: rank 0 hashes the data file
    provenance = plumbing.agree(plumbing.data_provenance(cfg.data, cfg.split_seed, len(examples), tok) if rank == 0
                                else None, long=True)
    split = data.split_indices(len(examples), cfg.split_seed)
    d_w, d_p = split["warmup"], split["proxy"]
    encoded = {i: data.encode_example(tok, examples[i], cfg.max_len) for i in d_w + d_p}
    evals = plumbing.eval_batches([data.encode_example(tok, e, cfg.max_len) for e in held_out], cfg.eval_batch_size,
                                  rank, world, tok.pad_id)
    choose_sampler(cfg, world, rank, device)
    model = plumbing.load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, getattr(torch, cfg.base_dtype))
    model = plumbing.shard_model(model, cfg.activation_checkpointing)
    optimizer = plumbing.make_optimizer(model, cfg)
    warm_steps = plumbing.plan_steps(d_w, cfg, rank, world, range(cfg.warmup_epochs))
    # the epoch offset keeps each round's shuffle distinct from the warm-up's
    shards = data.round_shards(d_p, cfg.rounds) if cfg.rounds else []
    round_steps = [plumbing.plan_steps(s, cfg, rank, world, [cfg.warmup_epochs + i]) for i, s in enumerate(shards)]
    total = len(warm_steps) + sum(len(s) for s in round_steps)
    config = {"step": 0, "config": dataclasses.asdict(cfg), "world_size": world, "n_warmup": len(d_w),
              "n_proxy": len(d_p), "steps": total}
    run = plumbing.Run(cfg, model, optimizer, total, "proxy", rank, world, device, evals, [config])

    # stage 1, warm-up: Eq. 3 on D_w. The warmed-up proxy, before any alignment, is an output too
    train(run, cfg, warm_steps, 0, "warmup", 0, encoded, tok.pad_id, world, device)
    if warm_steps and run.step == len(warm_steps):
        plumbing.save_final(os.path.join(cfg.out, "warmup"), model, cfg.tokenizer, cfg.base, provenance=provenance)

    # stage 2, align: round i = a reference pass under pi_p^(i-1), then an alignment pass to pi_p^(i)
    first = len(warm_steps)
    for rnd, steps in enumerate(round_steps, start=1):
        if run.step < first + len(steps):  # not finished before a resume
            pairs = None if cfg.no_dpo else reference_pass(run, cfg, rnd, steps, run.step > first, encoded, tok, device)
            train(run, cfg, steps, first, "align", rnd, encoded, tok.pad_id, world, device, pairs)
        plumbing.remove_round(cfg.out, rnd, rank, world)  # checkpointed: its reference is never needed again
        first += len(steps)

    # outputs: the aligned proxy's adapter, and the proxy merged in HF format with its provenance
    run.finish(cfg.out, provenance)


def train(run: plumbing.Run, cfg: Config, steps: list, first: int, stage: str, rnd: int, encoded: dict, pad_id: int,
          world: int, device, pairs: dict | None = None) -> None:
    """The optimizer steps of one stage (steps[j] is global step first + j + 1), from where the run stands:
    Eq. 3 on the teacher's replies, or with a round's pairs Eq. 6 on (y, y_hat)."""
    # the round file holds this rank's examples in plan order: micro-batch m of step j is a run of rows
    sizes = [len(ids) for s in steps for ids in s]
    rows = iter([list(range(a - n, a)) for a, n in zip(itertools.accumulate(sizes), sizes)])
    rows_of = [[next(rows) for _ in s] for s in steps]
    for j in range(run.step - first, len(steps)):
        batches = [plumbing.make_batch(ids, encoded, pad_id, device, pairs, r) for ids, r in zip(steps[j], rows_of[j])]
        loss, nll, dpo, rc, rr, correct, n_pairs, fwd = train_step(run.model, run.optimizer, batches, world, cfg, device).tolist()
        losses = {"loss": loss, "nll": nll}
        if n_pairs:  # with DPO: rewards are beta * log(pi_p^(i) / pi_p^(i-1)), means over pairs
            losses.update(dpo=dpo, reward_chosen=rc / n_pairs, reward_rejected=rr / n_pairs,
                          reward_margin=(rc - rr) / n_pairs, reward_accuracy=correct / n_pairs)
        end = j == len(steps) - 1
        run.step_done(losses, fwd, {"stage": stage, "round": rnd}, stage_end=end, eval_now=end)


def reference_pass(run: plumbing.Run, cfg: Config, rnd: int, steps: list, mid_round: bool, encoded: dict,
                   tok: data.Tokenizer, device) -> dict:
    """Round rnd's reference side, computed once under the current weights, which ARE pi_p^(i-1): y_hat
    and log pi_p^(i-1) of y and y_hat for this rank's pairs (sample_round), frozen in a round file. A
    resume inside the round reads the file back, because the reference weights no longer exist by then."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path, meta = plumbing.round_path(cfg.out, rnd, rank, world), plumbing.round_meta(cfg, rnd, rank, world)
    my_ids = [x for s in steps for ids in s for x in ids]
    pairs = plumbing.load_round(path, meta, my_ids) if cfg.resume else None
    if plumbing.must_sample(pairs, mid_round, path, rank, device):
        t0 = time.time()
        # a CPU generator per (seed, round, rank): the same y_hat on any device, and on resume
        gen = torch.Generator().manual_seed(data.seed_of("sample", cfg.seed, rnd, rank))
        pairs = sample_round(run.model, steps, encoded, tok, cfg, gen, device, rank == 0)
        plumbing.save_round(path, pairs, meta)
        stats = [time.time() - t0, float(len(my_ids)), *plumbing.pair_stats(pairs, encoded)]
        stats = torch.tensor(stats, dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        run.log({"step": run.step, "stage": "sample", "round": rnd, "seconds": stats[0].item() / world,
                 "pairs": int(stats[1].item()), "rejected_len_mean": stats[2].item() / stats[1].item(),
                 "identical_to_teacher": stats[3].item() / stats[1].item()})
    dist.barrier()
    run.reset_clock()  # tokens/s leaves the reference pass out
    return pairs


@torch.no_grad()
def sample_round(model, steps: list, encoded: dict, tok: data.Tokenizer, cfg: Config, generator, device, show: bool) -> dict:
    """For this rank's examples of the round, in step order: sample y_hat ~ pi_p^(i-1)(.|x) (batched
    KV-cache generation, cfg.gen_batch_size rows per batch), then score the teacher's y and y_hat
    teacher-forced: log pi_p^(i-1)(y|x), log pi_p^(i-1)(y_hat|x), one forward per micro-batch.
    cfg.sampler "gathered": the whole model is gathered on every rank once and each rank decodes its own
    rows to their end, with no collective per token. "tensor_parallel": a tensor-parallel copy of the
    model with the LoRA merged (parallel.tensor_parallel_copy, 1/world of every block per rank) decodes
    all ranks' rows together; the generator's state is taken from rank 0, so the draws are one stream.
    Returns the round file's tensors: example_ids (E,) int64, rejected_tokens (N,) int32 and
    rejected_offsets (E+1,) int64 (example e's rejected sequence, prompt included, is
    tokens[offsets[e]:offsets[e+1]]), rejected_prompt_len (E,) int64, ref_chosen / ref_rejected (E,)
    fp32 sequence log-probs over response tokens.
    """
    model.eval()
    ids_all, seqs, plens, ref_c, ref_r = [], [], [], [], []
    micro = [ids for step in steps for ids in step]
    prompts = [list(encoded[i]["input_ids"][: prompt_len(encoded[i])]) for ids in micro for i in ids]
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, greedy=cfg.greedy, generator=generator)
    n = cfg.gen_batch_size
    if cfg.sampler == "tensor_parallel":
        if generator is not None:
            generator.set_state(plumbing.agree(generator.get_state()))
        tp = parallel.tensor_parallel_copy(model)
        y_hats = parallel.tp_generate(tp, prompts, n, cfg.max_new_tokens, tok.eos_id, tok.pad_id, **sampling)
        del tp
    else:
        with gathered(model):  # one all-gather per unit here; the decode forwards below issue none
            y_hats = [y for i in tqdm(range(0, len(prompts), n), desc="sample", leave=False, disable=not show)
                      for y in generate(model, prompts[i : i + n], cfg.max_new_tokens, tok.eos_id, tok.pad_id, **sampling)]
        plumbing.long_barrier()  # each rank decoded its own rows to their own ends: the first done waits here
    y_hats = iter(y_hats)
    for ids in micro:  # every rank has the same number of micro-batches: the same FSDP forwards
        plumbing.crash_point("sample")
        encs = [encoded[i] for i in ids]
        rej = [rejected_example(e, next(y_hats), tok.eos_id, cfg.max_new_tokens, cfg.max_len) for e in encs]
        batch = data.collate(encs + rej, tok.pad_id)  # rows [y_1..y_B; y_hat_1..y_hat_B]
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        lp = model(input_ids, head_fn=lambda h, w: fast.sequence_logps_fused(h, w, labels, cfg.chunk_size))
        ref_c.append(lp[: len(ids)].float().cpu())
        ref_r.append(lp[len(ids) :].float().cpu())
        ids_all += ids
        seqs += [r["input_ids"] for r in rej]
        plens += [prompt_len(e) for e in encs]
    model.train()
    lengths = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int64)
    return {
        "example_ids": torch.tensor(ids_all, dtype=torch.int64),
        "rejected_tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
        "rejected_offsets": lengths.cumsum(0),
        "rejected_prompt_len": torch.tensor(plens, dtype=torch.int64),
        "ref_chosen": torch.cat(ref_c) if ref_c else torch.zeros(0),
        "ref_rejected": torch.cat(ref_r) if ref_r else torch.zeros(0),
    }


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


def train_step(model, optimizer, batches: list[dict], world: int, cfg: Config, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (plumbing.make_batch); every rank calls it with
    the same number of micro-batches.

    Stage 1 minimises Eq. 3 (NLL on the teacher's y); stage 2 Eq. 6 = Eq. 3 + Eq. 5 (DPO with chosen y,
    rejected y_hat, reference log-probs from the round's reference pass). Each micro-batch's sums are
    divided by the step's GLOBAL divisors, so micro-batches and ranks add up to exactly one big batch.
    Eq. 3 as printed (--nll_reduction sequence) sums each reply's tokens and averages over replies, so
    DPO weighs about 1 / (mean reply length) of what it would against a per-token NLL (--nll_reduction
    token). The divisors are divided by `world` because FSDP2 averages gradients over ranks (and gloo
    cannot pre-scale: set_gradient_divide_factor needs PREMUL_SUM).
    Returns the all_reduced step metrics (8,) fp64, identical on every rank: loss, nll, dpo,
    chosen_reward_sum, rejected_reward_sum, correct_pairs, pairs, forwarded tokens. The optimizer steps
    only when the loss is finite on every rank (otherwise the caller stops the run).
    """
    dpo = "ref_chosen" in batches[0]
    # the step's global divisors: response tokens of the teacher's replies y, and pairs (examples)
    counts = torch.tensor([[float(b["n_tokens"]), float(b["n"])] for b in batches], dtype=torch.float64, device=device).sum(0)
    dist.all_reduce(counts)
    n_tokens, n_pairs = (counts.clamp(min=1) / world).float().unbind()
    if cfg.nll_reduction == "sequence":  # the paper's literal Eq. 3: sum over a reply's tokens, mean over replies
        n_tokens = n_pairs

    sums = torch.zeros(8, dtype=torch.float64, device=device)
    for b in batches:
        labels, n = b["labels"], b["n"]
        rewards = torch.zeros(4, dtype=torch.float64, device=device)
        if dpo:
            # one forward over [y; y_hat]: the chosen half serves both Eq. 3 and Eq. 4
            lp = model(b["input_ids"], head_fn=lambda h, w: fast.sequence_logps_fused(h, w, labels, cfg.chunk_size))
            out = pk.proxy_loss(lp[:n], lp[n:], b["ref_chosen"], b["ref_rejected"], n_tokens, cfg.beta, n_pairs)
            loss, nll, pref = out.loss, out.nll, out.pref
            rc, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
            rewards += torch.stack([rc.sum(), rr.sum(), (rc > rr).double().sum(), torch.ones_like(rc).sum()])
        else:
            lp = model(b["input_ids"], head_fn=lambda h, w: fast.token_logps_fused(h, w, labels, cfg.chunk_size))
            loss = -lp.sum() / n_tokens  # Eq. 3, this micro-batch's share of the step's mean
            nll, pref = loss.detach(), torch.zeros((), device=device)
        loss.backward()
        sums += torch.cat([torch.stack([loss.detach(), nll, pref]).double(), rewards, rewards.new_tensor([b["n_fwd"]])])
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
    if cfg.optimizer not in ("adam", "sgd"):
        p.error("--optimizer must be adam or sgd")
    if cfg.nll_reduction not in ("token", "sequence"):
        p.error("--nll_reduction must be token or sequence")
    for name in ("base_dtype",) + (("merged_dtype",) if cfg.merged_dtype else ()):
        if getattr(cfg, name) not in ("bfloat16", "float16", "float32"):
            p.error(f"--{name} must be bfloat16, float16 or float32")
    if cfg.rounds < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.gen_batch_size < 0:
        p.error("--rounds >= 0, --batch_size >= 1, --grad_accum >= 1 and --gen_batch_size >= 0")
    cfg.gen_batch_size = cfg.gen_batch_size or cfg.batch_size  # 0: decode in micro-batches
    if cfg.sampler not in ("auto", "gathered", "tensor_parallel"):
        p.error("--sampler must be auto, gathered or tensor_parallel")
    return cfg


def memory_plan(cfg: Config, world: int, device: torch.device | None = None) -> parallel.Plan:
    """This run's per-GPU memory plan (parallel.plan_proxy) from --base's config.json and the flags, held
    against the memory of `device` (None: this machine's first GPU, if any) unless --gpu_memory_gib."""
    args = ModelArgs.from_hf_config(read_hf_config(cfg.base))
    return parallel.plan_proxy(
        args, world, base_itemsize=getattr(torch, cfg.base_dtype).itemsize, lora_r=cfg.lora_r,
        batch_size=cfg.batch_size, max_len=cfg.max_len, gen_batch_size=cfg.gen_batch_size,
        max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
        activation_checkpointing=cfg.activation_checkpointing, budget=parallel.gpu_budget(cfg.gpu_memory_gib, device))


def choose_sampler(cfg: Config, world: int, rank: int, device) -> None:
    """--sampler auto: the whole model per GPU when the memory plan fits it, else tensor-parallel (never
    at one rank); when the pick does not fit either, the run stops with the plan printed."""
    plan = memory_plan(cfg, world, device)
    if cfg.sampler == "auto":
        cfg.sampler = plan.sampler
        decode = "TP decode" if cfg.sampler == "tensor_parallel" else "gathered decode"
        if not plan.fits(decode):
            plumbing.fail(rank, f"no sampler fits the memory plan at {world} rank(s) (lower --gen_batch_size, add GPUs, "
                                f"or pass --sampler to try one anyway):\n"
                                + parallel.format_plan(plan, f"train_proxy.py memory plan: {cfg.base}, {world} GPUs"))
    if cfg.sampler == "tensor_parallel" and "TP decode" not in plan.phases:
        plumbing.fail(rank, f"--sampler tensor_parallel needs the heads and hidden_dim of {cfg.base} divisible by {world} ranks")


if __name__ == "__main__":
    main()
