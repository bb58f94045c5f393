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
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import fast
import memory_plan
import plan_trace
import provenance
import proxykd as pk
import ranks
import rounds
import sharding
import tensor_parallel
from model import ModelArgs, gathered, generate, read_hf_config
from run import Run, flags_parser, head


@dataclass
class Config(ranks.Launch):  # + device, deterministic, timeout_min, long_timeout_min
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
    optimizer: str = "adam"  # adam (paper) or sgd (tests: its update is proportional to the gradient)
    # fused (fast.py's heads) or reference (full logits, proxykd.py as written): same numbers
    loss: str = "fused"
    warmup_epochs: int = 1  # stage 1 passes over D_w (paper: one epoch)
    rounds: int = 16  # k, alignment iterations over D_p (paper: 16); round i trains on shard i of D_p
    beta: float = 0.1  # DPO temperature of Eq. 4
    no_dpo: bool = False  # ablation "-PO": stage 2 trains Eq. 3 (NLL on D_p) only; no sampling, no reference
    nll_reduction: str = "sequence"  # Eq. 3 per reply ("sequence", as printed) or per token; see train_step
    temperature: float = 1.0  # sampling temperature of the proxy's own reply y_hat
    top_p: float = 1.0  # nucleus sampling of y_hat (1.0 = plain sampling)
    greedy: bool = False  # y_hat = greedy decode instead of sampling (debugging, exactness tests)
    max_new_tokens: int = 512  # length cap of y_hat (also cut to max_len - prompt length)
    sampler: str = "auto"  # reference-pass decode: gathered, tensor_parallel, or auto (by the memory plan)
    # prompts per decode: per rank (gathered), all ranks (tensor_parallel); 0 = batch_size
    gen_batch_size: int = 0
    plan: bool = False  # print the per-GPU memory plan from config.json and the flags, and exit (no weights)
    plan_world_size: int = 0  # --plan: GPUs to plan for (0 = this launch's world size)
    trace: bool = False  # --plan: also run each phase on fake tensors at full size (CPU, minutes) and compare
    gpu_memory_gib: float = 0.0  # per-GPU memory the plan and --sampler auto hold against (0 = this GPU's)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (scaling = lora_alpha / lora_r = 2)
    lora_dropout: float = 0.0  # 0 as in DPO practice, so pi^(i) == pi^(i-1) at a round start
    base_dtype: str = "bfloat16"  # dtype of the frozen base (paper: bf16); float32 for exactness tests
    merged_dtype: str = ""  # dtype of final/model.safetensors ("" = the base checkpoint's dtype)
    activation_checkpointing: bool = False  # recompute each block in backward (long sequences / big models)
    chunk_size: int = 0  # rows per (rows, V) logits block of a fused head (0: fast.default_chunk_size)
    eval_batch_size: int = 8  # examples per eval forward per rank
    keep_best: bool = False  # also keep the adapter and merged model of the lowest held-out NLL in <out>/best
    log_every: int = 1  # optimizer steps between metrics lines
    save_every: int = 200  # optimizer steps between checkpoints (also saved after warm-up and each round)
    keep_checkpoints: int = 2  # newest checkpoints kept in <out>/checkpoints
    resume: bool = False  # continue from <out>/checkpoints/latest (mid-round included); fresh start if none
    stop_after_steps: int = 0  # testing/debugging: checkpoint and exit after this many optimizer steps


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:  # every phase's per-GPU memory from config.json and the flags; no weight is loaded
        trace = (lambda c, world: plan_trace.trace_proxy(c, world, train_step)) if cfg.trace else None
        return memory_plan.print_plan(cfg, plan_memory, f"train_proxy.py memory plan: {cfg.base}", trace)

    # setup: the ranks, D_w and D_p (D_s is left to the student), the proxy with fresh LoRA, the step plan
    run = Run.launch(cfg)  # stops every rank when --out holds checkpoints and --resume is not given
    examples, held_out, _ = run.read_inputs_or_exit()
    split = data.split_indices(len(examples), cfg.split_seed)
    d_w, d_p = split["warmup"], split["proxy"]
    shards = data.round_shards(d_p, cfg.rounds) if cfg.rounds else []
    check_stages_or_exit(run, len(examples), d_w, shards)
    run.encode(d_w + d_p, examples, held_out)
    # what trained this proxy, for its final/provenance.json: rank 0 hashes the data file
    prov = (provenance.data_provenance(cfg.data, cfg.split_seed, len(examples), run.tok)
            if run.rank == 0 else None)
    prov = ranks.agree(prov, long=True)
    choose_sampler_or_exit(run)
    model = sharding.load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                     getattr(torch, cfg.base_dtype))
    run.model = sharding.shard_model(model, cfg.activation_checkpointing)
    run.optimizer = run.make_optimizer()
    warm_steps = data.plan_steps(d_w, cfg, run.rank, run.world, range(cfg.warmup_epochs))
    # the epoch offset keeps each round's shuffle distinct from the warm-up's
    round_steps = [data.plan_steps(s, cfg, run.rank, run.world, [cfg.warmup_epochs + i])
                   for i, s in enumerate(shards)]
    if cfg.resume:
        run.restore_checkpoint_or_exit()  # the newest checkpoint: step, LoRA, Adam, RNG
    total = len(warm_steps) + sum(len(s) for s in round_steps)
    run.start(total, [{"step": 0, "config": dataclasses.asdict(cfg), "world_size": run.world,
                       "n_warmup": len(d_w), "n_proxy": len(d_p), "steps": total}], "proxy")

    # stage 1, warm-up: Eq. 3 on D_w. The warmed-up proxy, before any alignment, is an output too
    train(run, warm_steps, 0, "warmup")
    if warm_steps and run.step == len(warm_steps):
        checkpoints.save_final(os.path.join(cfg.out, "warmup"), run.model, cfg.tokenizer, cfg.base,
                               provenance=prov)

    # stage 2, align: round i = a reference pass under pi_p^(i-1), then an alignment pass to pi_p^(i)
    first = len(warm_steps)
    for rnd, steps in enumerate(round_steps, start=1):
        if run.step < first + len(steps):  # not finished before a resume
            pairs = None
            if not cfg.no_dpo:
                # a resume reads the round's reference side back: the weights it came from change in the round
                pairs = rounds.load(cfg, rnd, run.rank, run.world, plan_ids(steps)) if cfg.resume else None
                if ranks.any_rank(pairs is None, run.device):  # a rank lacks its file: every rank samples
                    if run.step > first:
                        ranks.fail(run.rank, f"resuming inside round {rnd} needs every rank's round file "
                                             f"{rounds.path(cfg.out, rnd, 0, run.world)} ... (written "
                                             f"at the round start by the same world size and settings); "
                                             f"one is missing or stale")
                    pairs = reference_pass(run, rnd, steps)
            train(run, steps, first, "align", rnd, pairs)
        rounds.remove(cfg.out, rnd, run.rank, run.world)  # checkpointed: its reference is never needed again
        first += len(steps)

    # outputs: the aligned proxy's adapter, and the proxy merged in HF format with its provenance
    run.save_outputs(prov)


def train(run: Run, steps: list, first: int, stage: str, rnd: int = 0, pairs: dict | None = None) -> None:
    """The optimizer steps of one stage (steps[j] is global step first + j + 1), from where the run stands:
    Eq. 3 on the teacher's replies, or with a round's pairs Eq. 6 on (y, y_hat)."""
    rows = rounds.file_rows(steps)  # each example's row in the round file
    tags = {"stage": stage, "round": rnd}
    for j in range(run.step - first, len(steps)):
        if pairs is None:
            batches = [data.make_batch(ids, run.encoded, run.tok.pad_id, run.device) for ids in steps[j]]
        else:
            batches = [rounds.pair_batch(ids, r, run.encoded, pairs, run.tok.pad_id, run.device)
                       for ids, r in zip(steps[j], rows[j])]
        out = train_step(run, batches)
        end = j == len(steps) - 1
        run.log_step(out.logged(), out.tokens, tags, end)
        if not out.finite:
            run.exit_non_finite(out.loss, tags)
        if end:
            run.evaluate(tags)
        if run.checkpoint_due(end):
            run.save_checkpoint()
        run.exit_if_stopping()


def plan_ids(steps: list) -> list[int]:
    """This rank's example ids over a stage's steps, in plan order (the order of its round file)."""
    return [x for s in steps for ids in s for x in ids]


def reference_pass(run: Run, rnd: int, steps: list) -> dict:
    """Round rnd's reference side, computed once under the current weights, which ARE pi_p^(i-1): y_hat
    and log pi_p^(i-1) of y and y_hat for this rank's examples (sample_round), written to its round file
    (rounds.py), so that a resume inside the round can read it back."""
    cfg, t0 = run.cfg, time.time()
    # a CPU generator per (seed, round, rank): the same y_hat on any device, and on resume
    gen = torch.Generator().manual_seed(data.seed_of("sample", cfg.seed, rnd, run.rank))
    pairs = sample_round(run, steps, gen)
    rounds.save(cfg, rnd, run.rank, run.world, pairs)
    stats = [time.time() - t0, float(len(pairs["example_ids"])), *rounds.pair_stats(pairs, run.encoded)]
    stats = data.to_device(torch.tensor(stats, dtype=torch.float64), run.device)
    dist.all_reduce(stats)
    seconds, n, length, same = stats.tolist()
    run.log({"step": run.step, "stage": "sample", "round": rnd, "seconds": seconds / run.world,
             "pairs": int(n), "rejected_len_mean": length / n, "identical_to_teacher": same / n})
    run.reset_clock()  # tokens/s leaves the reference pass out
    return pairs


@torch.no_grad()
def sample_round(run: Run, steps: list, generator: torch.Generator) -> dict:
    """For this rank's examples of the round, in step order: sample y_hat ~ pi_p^(i-1)(.|x) (batched
    KV-cache generation, --gen_batch_size rows per batch), then score the teacher's y and y_hat
    teacher-forced: log pi_p^(i-1)(y|x), log pi_p^(i-1)(y_hat|x), one forward per micro-batch.
    --sampler gathered: the whole model is gathered on every rank once and each rank decodes its own
    rows to their end, with no collective per token. tensor_parallel: a tensor-parallel copy of the
    model with the LoRA merged (tensor_parallel.py, 1/world of every block per rank) decodes all ranks'
    rows together; the generator's state is taken from rank 0, so the draws are one stream.
    Returns the round file's tensors (rounds.py).
    """
    cfg, model, tok = run.cfg, run.model, run.tok
    model.eval()
    ids_all, seqs, plens, ref_c, ref_r = [], [], [], [], []
    micro = [ids for step in steps for ids in step]
    prompts = [list(run.encoded[i]["input_ids"][: rounds.prompt_len(run.encoded[i])])
               for ids in micro for i in ids]
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, greedy=cfg.greedy, generator=generator)
    n = cfg.gen_batch_size
    if cfg.sampler == "tensor_parallel":
        generator.set_state(ranks.agree(generator.get_state()))
        tp = tensor_parallel.tensor_parallel_copy(model)
        y_hats = tensor_parallel.tp_generate(tp, prompts, n, cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                                             **sampling)
        del tp
    else:
        with gathered(model):  # one all-gather per unit here; the decode forwards below issue none
            y_hats = [y for i in tqdm(range(0, len(prompts), n), desc="sample", leave=False,
                                      disable=run.rank != 0)
                      for y in generate(model, prompts[i : i + n], cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                                        **sampling)]
        ranks.long_barrier()  # each rank decoded its own rows to their own ends: the first done waits here
    y_hats = iter(y_hats)
    for ids in micro:  # every rank has the same number of micro-batches: the same FSDP forwards
        ranks.crash_point("sample")
        encs = [run.encoded[i] for i in ids]
        rej = [rounds.rejected_example(e, next(y_hats), tok.eos_id, cfg.max_new_tokens, cfg.max_len)
               for e in encs]
        # rows [y_1..y_B; y_hat_1..y_hat_B]
        b = data.make_batch(ids, run.encoded, tok.pad_id, run.device, extra=rej)
        labels = b["labels"]
        lp = head(model, b["input_ids"], cfg.loss, lambda logits: pk.sequence_logps(logits, labels),
                  lambda h, w: fast.sequence_logps_fused(h, w, labels, cfg.chunk_size, b["n_rows"]))
        ref_c.append(lp[: len(ids)].float().cpu())
        ref_r.append(lp[len(ids) :].float().cpu())
        ids_all += ids
        seqs += [r["input_ids"] for r in rej]
        plens += [rounds.prompt_len(e) for e in encs]
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


class ProxyStep(NamedTuple):
    """One optimizer step's values, summed over micro-batches and ranks: the same on every rank."""
    loss: float  # Eq. 6 (Eq. 3 alone in the warm-up and with --no_dpo)
    nll: float  # Eq. 3
    dpo: float  # Eq. 5 (0 without pairs)
    reward_chosen: float  # sum over pairs of beta * log pi_p^(i)(y|x) / pi_p^(i-1)(y|x)
    reward_rejected: float  # the same for y_hat
    correct: float  # pairs whose chosen reward beats the rejected one
    pairs: float  # preference pairs (0 without pairs)
    tokens: float  # tokens forwarded, for tokens/s

    @property
    def finite(self) -> bool:
        return all(map(lambda v: v == v and abs(v) != float("inf"), (self.loss, self.nll, self.dpo)))

    def logged(self) -> dict:
        """What metrics.jsonl records: the losses and, with pairs, the rewards' means over pairs."""
        out = {"loss": self.loss, "nll": self.nll}
        if self.pairs:
            n = self.pairs
            out.update(dpo=self.dpo, reward_chosen=self.reward_chosen / n,
                       reward_rejected=self.reward_rejected / n,
                       reward_margin=(self.reward_chosen - self.reward_rejected) / n,
                       reward_accuracy=self.correct / n)
        return out


def train_step(run: Run, batches: list[dict]) -> ProxyStep:
    """One optimizer step over this rank's micro-batches (data.make_batch, or rounds.pair_batch with a
    round's pairs); every rank calls it with the same number of micro-batches.

    Stage 1 minimises Eq. 3 (NLL on the teacher's y); stage 2 Eq. 6 = Eq. 3 + Eq. 5 (DPO with chosen y,
    rejected y_hat, reference log-probs from the round's reference pass). Each micro-batch's sums are
    divided by the step's GLOBAL divisors, so micro-batches and ranks add up to exactly one big batch.
    Eq. 3 as printed (--nll_reduction sequence) sums each reply's tokens and averages over replies, so
    DPO weighs about 1 / (mean reply length) of what it would against a per-token NLL (--nll_reduction
    token). The divisors are divided by the world size because FSDP2 averages gradients over ranks (and
    gloo cannot pre-scale: set_gradient_divide_factor needs PREMUL_SUM). The optimizer steps only when
    the loss is finite on every rank (otherwise the caller stops the run).
    """
    cfg, device, dpo = run.cfg, run.device, "ref_chosen" in batches[0]
    # the step's global counts: response tokens of the teacher's replies y, and pairs (examples)
    counts = torch.tensor([[float(b["n_tokens"]), float(b["n"])] for b in batches],
                          dtype=torch.float64).sum(0)
    counts = data.to_device(counts, device)
    dist.all_reduce(counts)
    n_tokens, n_pairs = (counts.clamp(min=1) / run.world).float().unbind()
    nll_divisor = n_pairs if cfg.nll_reduction == "sequence" else n_tokens  # Eq. 3 per reply, or per token

    sums = torch.zeros(8, dtype=torch.float64, device=device)  # the ProxyStep fields, in order
    for b in batches:
        labels, n, rows = b["labels"], b["n"], b["n_rows"]
        if dpo:
            # one forward over [y; y_hat]: the chosen half serves both Eq. 3 and Eq. 4
            lp = head(run.model, b["input_ids"], cfg.loss, lambda logits: pk.sequence_logps(logits, labels),
                      lambda h, w: fast.sequence_logps_fused(h, w, labels, cfg.chunk_size, rows))
            out = pk.proxy_loss(lp[:n], lp[n:], b["ref_chosen"], b["ref_rejected"], nll_divisor,
                                cfg.beta, n_pairs)
            loss, nll, pref = out.loss, out.nll, out.pref
            rc, rr = out.chosen_rewards.double(), out.rejected_rewards.double()
            sums[3:7] += torch.stack([rc.sum(), rr.sum(), (rc > rr).double().sum(),
                                      torch.ones_like(rc).sum()])
        else:  # Eq. 3, this micro-batch's share of the step's mean
            loss = head(run.model, b["input_ids"], cfg.loss,
                        lambda logits: pk.nll_loss(logits, labels, nll_divisor),
                        lambda h, w: fast.nll_loss_fused(h, w, labels, nll_divisor, cfg.chunk_size, rows))
            nll, pref = loss.detach(), torch.zeros((), device=device)
        loss.backward()
        sums[:3] += torch.stack([loss.detach(), nll, pref]).double()
    return run.end_step(sums, 3, sum(b["n_fwd"] for b in batches), ProxyStep)  # all ranks; optimizer step


# ---------------------------------------------------------------------------------------------------
# flags, the stages' sizes and the memory plan


def parse_args(argv=None) -> Config:
    p = flags_parser(Config, __doc__)
    cfg = Config(**vars(p.parse_args(argv)))
    if not (cfg.base and (cfg.plan or (cfg.tokenizer and cfg.data))):
        p.error("--base, --tokenizer and --data are required (--plan needs only --base)")
    if cfg.optimizer not in ("adam", "sgd"):
        p.error("--optimizer must be adam or sgd")
    if cfg.loss not in ("fused", "reference"):
        p.error("--loss must be fused or reference")
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
    if cfg.keep_best and not cfg.eval_data:
        p.error("--keep_best needs --eval_data (the held-out NLL it selects by)")
    if cfg.trace and not cfg.plan:
        p.error("--trace traces the memory plan: give it with --plan")
    return cfg


def check_stages_or_exit(run: Run, n_examples: int, d_w: list[int], shards: list[list[int]]) -> None:
    """Stop every rank, in one line, when the data leaves a stage without examples: the warm-up (10% of
    the teacher's examples) or an alignment round (1 / --rounds of 45%)."""
    empty = [] if d_w else ["the warm-up (D_w, 10%)"]
    empty += [f"round {i} of {len(shards)} (1/{len(shards)} of D_p, 45%)"
              for i, s in enumerate(shards, 1) if not s]
    if empty:
        ranks.fail(run.rank, f"{run.cfg.data}: {n_examples} examples leave {', '.join(empty[:3])} "
                             f"without examples; give more teacher examples "
                             f"(at least {10 * max(1, len(shards))}) or fewer --rounds")


def plan_memory(cfg: Config, world: int, device: torch.device | None = None) -> memory_plan.Plan:
    """This run's per-GPU memory plan (memory_plan.plan_proxy) from --base's config.json and the flags, held
    against the memory of `device` (None: this machine's first GPU, if any) unless --gpu_memory_gib."""
    args = ModelArgs.from_hf_config(read_hf_config(cfg.base))
    return memory_plan.plan_proxy(
        args, world, base_itemsize=getattr(torch, cfg.base_dtype).itemsize, lora_r=cfg.lora_r,
        batch_size=cfg.batch_size, max_len=cfg.max_len, gen_batch_size=cfg.gen_batch_size,
        max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
        activation_checkpointing=cfg.activation_checkpointing,
        budget=memory_plan.gpu_budget(cfg.gpu_memory_gib, device))


def choose_sampler_or_exit(run: Run) -> None:
    """--sampler auto: the whole model per GPU when the memory plan fits it, else tensor-parallel (never
    at one rank). Stops every rank, with the plan printed, when the pick does not fit either, or when
    tensor-parallel is asked for and the model's heads do not divide by the world size."""
    cfg, world = run.cfg, run.world
    plan = plan_memory(cfg, world, run.device)
    if cfg.sampler == "auto":
        cfg.sampler = plan.sampler
        decode = "TP decode" if cfg.sampler == "tensor_parallel" else "gathered decode"
        if not plan.fits(decode):
            title = f"train_proxy.py memory plan: {cfg.base}, {world} GPUs"
            ranks.fail(run.rank, f"no sampler fits the memory plan at {world} rank(s) "
                                 f"(lower --gen_batch_size, add GPUs, or pass --sampler "
                                 f"to try one anyway):\n" + memory_plan.format_plan(plan, title))
    if cfg.sampler == "tensor_parallel" and "TP decode" not in plan.phases:
        ranks.fail(run.rank, f"--sampler tensor_parallel needs the heads and hidden_dim of {cfg.base} "
                             f"divisible by {world} ranks")


if __name__ == "__main__":
    main()
    ranks.finish(0)  # FSDP2 + gloo processes can abort in interpreter teardown: end without it
