"""Proxy-KD stages 1-2: warm up the proxy on the teacher's text, then align it to the black-box teacher
with k rounds of NLL + DPO. Chen et al. 2024, "Knowledge Distillation of Black-Box Large Language
Models" (arXiv 2401.07013), Section 3.3, Eq. 3-6.

Stage 1 (warm-up)  Eq. 3 NLL on D_w, the teacher's replies.
Stage 2 (align)    k rounds (paper: 16). Round i takes shard i of D_p. At its start the current proxy
                   is the reference pi_p^(i-1): a pre-pass samples the proxy's own reply y_hat for every
                   prompt (batched KV-cache generation) and scores log pi_p^(i-1) of the teacher's y and
                   of y_hat, once. Then it trains on Eq. 6 = NLL(y) (Eq. 3) + DPO(y chosen over y_hat,
                   Eq. 4-5, with the standard minus sign) and ends at pi_p^(i). --no_dpo keeps only
                   the NLL term (the paper's "-PO" ablation: no sampling, no reference).
LoRA on every linear of every block (default r 8, alpha 16: a common LoRA default; the paper does not
give its rank), base frozen in bf16, LoRA in fp32, Adam at a constant lr 1e-5, max_len 1024, beta 0.1,
sampling at temperature 1. FSDP2 shards each block and the root.
Eq. 3 is a sum over each reply's tokens averaged over replies, as printed (--nll_reduction sequence), so
the DPO term of Eq. 6 weighs about 1 / (mean reply length) of what it would against a per-token NLL.
--nll_reduction token (the usual SFT mean) gave DPO the upper hand in the CPU demo and cost the proxy
19 to 63 points of exact match (README, "Demo results", --dpo_sweep); with the printed form DPO was harmless there.

Runbook
-------
Data: jsonl lines {"prompt": ..., "response": <the black-box teacher's reply>} (other field names via
--prompt_field / --response_field / --system_field, e.g. OpenOrca: --system_field system_prompt
--prompt_field question). data.split_indices(n, --split_seed) cuts it into D_w 10% / D_p 45% / D_s 45%; give
train_student.py the same --data and --split_seed so D_s stays unseen by the proxy.

The paper's setting (8 GPUs, one node; Llama-2-70B proxy):

    torchrun --standalone --nproc_per_node 8 train_proxy.py \
        --base llama-2-70b --tokenizer llama-2-70b/tokenizer.model \
        --data teacher.jsonl --eval_data teacher_heldout.jsonl --out runs/proxy \
        --batch_size 2 --grad_accum 4 --activation_checkpointing --gen_batch_size 32

Memory: each rank reads only its own shard of each base tensor from the safetensors files (load_base,
shard_model, parallel.load_fsdp_shards), so each GPU holds 1/N of the frozen weights plus activations
and no host ever holds the whole checkpoint; final/ is merged and written tensor by tensor. The round
pre-pass samples with --sampler auto: "gathered" (the whole model on every GPU for the decode, each
rank decoding its own --gen_batch_size rows to their end) when the memory plan fits it in the GPU,
else "tensor_parallel" (parallel.py: 1/N of every block per GPU, LoRA merged, all ranks decoding
--gen_batch_size rows together). For the 70B proxy on 8 x 80 GB auto picks tensor_parallel: about
39 GiB per GPU at --gen_batch_size 32, the train step about 27 GiB. Print the plan first, from
config.json and the flags, without loading any weight (--plan_world_size: GPUs to plan for,
--gpu_memory_gib: their memory; a phase over 90% of it is flagged):

    python train_proxy.py --base llama-2-70b --plan --plan_world_size 8 --gpu_memory_gib 80 \
        --batch_size 2 --grad_accum 4 --activation_checkpointing --gen_batch_size 32

Several nodes (rank 0's node holds --out/checkpoints; each rank writes its own round files):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HOST:29500 train_proxy.py ...

CPU, two processes (gloo), the embedded demo (scripts/demo.py builds demo/):

    torchrun --standalone --nproc_per_node 2 train_proxy.py --base demo/proxy_base \
        --tokenizer demo/tok.model --data demo/teacher.jsonl --eval_data demo/heldout.jsonl \
        --out demo/proxy --max_len 256 --max_new_tokens 96 --batch_size 8 --lr 1e-3 --rounds 4

A single process needs no torchrun (same code path, a one-rank process group; at one rank shard_model
leaves the model unsharded, as there is nothing to shard):

    python train_proxy.py --base ... --tokenizer ... --data ... --out ...

Resume: rerun the same command with --resume; it continues from <out>/checkpoints/latest, inside a
round too (the round's samples and reference log-probs are read back from <out>/rounds), and gives the
same result as an uninterrupted run. Resuming inside a round needs the same world size and batch
settings; at a round boundary only the global batch (batch_size * grad_accum * world) must match.
Without --resume an --out holding checkpoints is refused. --stop_after_steps N (testing/debugging)
checkpoints and exits cleanly after N optimizer steps.

Outputs in --out
    metrics.jsonl   one JSON object per line. Every line has "step" (optimizer steps done). Per step:
                    stage ("warmup" / "align"), round, loss, nll (Eq. 3, see --nll_reduction), tokens_per_s, and
                    in stage 2 dpo (Eq. 5, per pair), reward_chosen / reward_rejected (beta * log ratio
                    to pi_p^(i-1), mean over pairs), reward_margin, reward_accuracy (fraction of pairs
                    with chosen reward > rejected reward; 0 at a round's first step, where both are 0).
                    After warm-up and each round: eval_nll (held-out per-token NLL), eval_top1_agreement
                    (fraction of the teacher's held-out reply tokens that are the proxy's argmax, the
                    paper's Fig. 5), eval_tokens. Per round pre-pass (stage "sample"): seconds, pairs,
                    rejected_len_mean, identical_to_teacher (pairs with y_hat == y carry no DPO gradient).
    checkpoints/    step-XXXXXXXX/ (adapter_model.safetensors + adapter_config.json in PEFT layout,
                    optimizer.pt, state.pt) and `latest`, its name; after warm-up, each round, every
                    --save_every steps; the newest --keep_checkpoints are kept.
    rounds/         round-NN-rankR-of-W.safetensors: the running round's y_hat and reference log-probs
                    (deleted once the round is checkpointed).
    adapter/        the aligned proxy's LoRA adapter (PEFT layout).
    final/          the aligned proxy merged, HF format (config.json + model.safetensors) +
                    tokenizer.model + provenance.json (sha256 of --data, --split_seed, split sizes,
                    tokenizer sha256: train_student.py refuses a D_s this proxy trained on):
                    train_student.py --proxy <out>/final.
    warmup/         adapter/ and final/ of the warmed-up, unaligned proxy (the "-align" ablation).
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

import data
import fast
import lora
import parallel
import proxykd as pk
from model import Llama, ModelArgs, gathered, generate, read_hf_config

# ---------------------------------------------------------------------------------------------------
# shared plumbing (train_student.py imports these; keep the names and signatures stable)


def init_distributed() -> tuple[int, int, torch.device]:
    """Start torch.distributed for this process -> (rank, world_size, device).

    Under torchrun (RANK set): NCCL + cuda:LOCAL_RANK when CUDA is available, else gloo + CPU. Without
    torchrun: a one-process group on an in-memory HashStore, so `python train_x.py` runs the very same
    code path (FSDP2, collectives) as a multi-rank launch.
    """
    cuda = torch.cuda.is_available()
    # collectives may wait on rank 0 merging or writing a big model on the host (save_final): an hour
    timeout = datetime.timedelta(minutes=60)
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
    else:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def _any_rank(flag: bool, device) -> bool:
    """Collective OR of a per-rank flag."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def load_base(base_dir: str, dtype=torch.bfloat16) -> Llama:
    """HF-format checkpoint -> a Llama on the meta device (no memory) that remembers base_dir as
    `model.checkpoint_dir`; shard_model then has every rank read only its own shard of each tensor
    straight from the safetensors files (parallel.load_fsdp_shards). No rank ever holds the whole
    model, on the host or on its device (a 70B bf16 proxy is 140 GB).
    """
    args = ModelArgs.from_hf_config(read_hf_config(base_dir))
    with torch.device("meta"):
        model = Llama(args).to(dtype)
    model.checkpoint_dir = base_dir
    return model


def load_lora_model(
    base_dir: str, lora_r: int, lora_alpha: float, lora_dropout: float, device=None, dtype=torch.bfloat16
) -> Llama:
    """HF-format base checkpoint -> Llama with LoRA on every linear of every block (lora.apply_lora),
    still unsharded: pass it to shard_model, which moves it to the device (`device` is accepted for
    symmetry; FSDP2 places the shards on the process group's device).

    The base weights are frozen in `dtype` (bf16, the paper's mixed precision), the LoRA A/B are fp32 and
    the only trainable parameters. LoRA A is drawn on the host from torch's global CPU RNG, seeded alike
    on every rank, so the initial adapter is the same for any world size and device.
    The LoRA hyperparameters are kept as `model.lora_config` (a dict) for the PEFT adapter_config.json.
    """
    model = load_base(base_dir, dtype)
    lora.apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    # the adapter is small: every rank draws it whole on the host from the same seed (A in module
    # order, B zero), the same values for any world size; shard_model keeps each rank's rows
    for m in lora.lora_modules(model).values():
        m.lora_A = torch.nn.Parameter(torch.empty_like(m.lora_A, device="cpu"))
        m.lora_B = torch.nn.Parameter(torch.empty_like(m.lora_B, device="cpu"))
        m.reset_lora_parameters()
    model.lora_config = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, base=os.path.abspath(base_dir))
    return model


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard_model(model: Llama, activation_checkpointing: bool = False) -> Llama:
    """FSDP2: fully_shard every transformer block, then the root (embeddings, final norm, lm_head).
    Collective. Returns the same module object on the process group's device: an FSDPModule when
    there are several ranks; at one rank a plain module, because there is nothing to shard and
    fully_shard would still copy every parameter into a fresh unsharded buffer on every forward and
    backward (measured 5-12% of a training step, and 0.1-0.3 s per generate call, on the CPU).
    Everything downstream (state dicts, `gathered`, the collectives) takes either.

    A model from load_base (base weights on the meta device) gets its shards read by each rank from
    `model.checkpoint_dir` (parallel.load_fsdp_shards; parameters already on the host, the fresh LoRA,
    are sliced from there); a model fully loaded on every rank is sharded as is.
    activation_checkpointing recomputes each block in the backward. It uses the composable
    `checkpoint` (a hook on the block) rather than checkpoint_wrapper, because the wrapper renames every
    parameter (`_checkpoint_wrapped_module.`) and the LoRA/PEFT key mapping relies on plain HF names.
    """
    device = _default_device()
    shard = dist.get_world_size() > 1
    on_meta = any(p.is_meta for p in model.parameters())
    # to_empty below replaces every parameter: keep the host ones (the fresh LoRA) to slice from
    host = {n: p.detach() for n, p in model.named_parameters() if not p.is_meta} if on_meta else {}
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint
    for block in model.model.layers:
        if activation_checkpointing:
            checkpoint(block)
        if shard:
            fully_shard(block)
    if shard:
        fully_shard(model)
    if on_meta:
        model.to_empty(device=device)
        parallel.load_fsdp_shards(model, model.checkpoint_dir, host)
    elif not shard:
        model.to(device)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def gather_lora_state(model) -> dict[str, torch.Tensor]:
    """Collective (every rank calls it): the full, unsharded trainable (LoRA) tensors, on CPU, keyed by
    the model's own parameter names (e.g. "model.layers.0.self_attn.q_proj.lora_A"). Rank 0 gets the
    tensors; the other ranks get an empty dict."""
    return get_model_state_dict(model, options=_FULL_TRAINABLE)


def _latest(ckpt_dir: str) -> str | None:
    """Path of the newest complete checkpoint under ckpt_dir (from the `latest` pointer), or None."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    return path if os.path.isdir(path) else None


def save_checkpoint(ckpt_dir: str, model, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> str | None:
    """Collective. Write ckpt_dir/step-<state["step"]:08d>/ and point ckpt_dir/latest at it.

    Contents: adapter_model.safetensors + adapter_config.json (PEFT layout, lora.save_adapter),
    optimizer.pt (full, unsharded Adam state keyed by parameter name), state.pt (`state`, which must hold
    an int "step", plus every rank's RNG states). Full (gathered) tensors make the checkpoint independent
    of the world size. Rank 0 writes into a temp dir, renames it into place, then rewrites `latest`
    atomically, so a crash at any point leaves the previous checkpoint intact and pointed to. The
    oldest checkpoints beyond `keep` are deleted. Returns the checkpoint path on rank 0, None elsewhere.
    """
    model_sd = gather_lora_state(model)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, _rng_state())
    path = None
    if dist.get_rank() == 0:
        # a second save of the same step gets a new name (step-N-r1, ...) so `latest` never points at a
        # directory being replaced; the names still sort in save order
        name, n = f"step-{state['step']:08d}", 0
        while os.path.exists(os.path.join(ckpt_dir, name)):
            n += 1
            name = f"step-{state['step']:08d}-r{n}"
        path, tmp = os.path.join(ckpt_dir, name), os.path.join(ckpt_dir, name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        lora.save_adapter(tmp, model_sd, model.lora_config)
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
        torch.save({**state, "rng": rng, "world_size": dist.get_world_size()}, os.path.join(tmp, "state.pt"))
        os.replace(tmp, path)
        crash_point("checkpoint")  # the new dir is in place, `latest` still names the previous one
        data.atomic_write(os.path.join(ckpt_dir, "latest"), name)
        done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-") and not d.endswith(".tmp"))
        for d in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(ckpt_dir: str, model, optimizer: torch.optim.Optimizer) -> dict | None:
    """Collective. Restore the newest checkpoint of ckpt_dir into the (sharded) model and optimizer and
    return its `state` dict, or None when there is none. Rank 0 reads the files and broadcasts, so only
    rank 0 needs to see ckpt_dir. Each rank gets its own RNG states back when the world size is
    unchanged (otherwise the RNG streams simply restart from the seed)."""
    rank = dist.get_rank()
    msg = [None, None]  # path, state
    if rank == 0 and (path := _latest(ckpt_dir)) is not None:
        msg = [path, torch.load(os.path.join(path, "state.pt"), weights_only=True)]
    dist.broadcast_object_list(msg, src=0)
    path, state = msg
    if path is None:
        return None
    model_sd, optim_sd = {}, {}
    if rank == 0:
        model_sd = lora.read_adapter(path)
        optim_sd = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    set_model_state_dict(model, model_sd, options=_FROM_RANK0)
    if not isinstance(optimizer, torch.optim.SGD):  # plain SGD keeps no state (and torch cannot load an empty one)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_FROM_RANK0)
    rng = state.pop("rng")
    if state.pop("world_size") == dist.get_world_size():
        _set_rng_state(rng[rank])
    return state


def _rng_state() -> dict:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


class MetricsLogger:
    """Append-only JSONL metrics (one dict per line, flushed at once); a no-op except on rank 0."""

    def __init__(self, path: str, rank: int):
        self.f = open(path, "a") if rank == 0 else None

    def log(self, record: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of a metrics JSONL logged after optimizer step `step` (on resume they are about
    to be logged again), so a resumed run's file reads like an uninterrupted one. Rank 0 only."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                pass
    data.atomic_write(path, "".join(keep))


def finish(code: int = 0) -> None:
    """End the process now with exit status `code`: destroy the process group (no barrier, so it also
    works when other ranks are gone), flush stdout/stderr, os._exit. FSDP2 + gloo processes sometimes
    abort in interpreter teardown otherwise."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for test_crash.py: with PROXYKD_CRASH_AT=name:n:rank in the environment, that rank
    SIGKILLs itself the n-th time it passes the point `name` (as an OOM kill or a lost node would: no
    cleanup, no flush). A no-op otherwise."""
    spec = os.environ.get("PROXYKD_CRASH_AT")
    if not spec:
        return
    point, n, rank = spec.split(":")
    if point == name and dist.get_rank() == int(rank):
        _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
        if _CRASH_COUNTS[name] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


def fail(rank: int, msg: str, code: int = 2) -> None:
    """Every rank calls this on the same (collectively agreed) condition; rank 0 says why, prefixed with
    the script's name, and every rank ends with `code`."""
    if rank == 0:
        print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    finish(code)


def agree(obj):
    """Rank 0's value of obj on every rank (a collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_mean_std(x: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu and population std gamma of x over all ranks (Eq. 9's moments over the whole D_s).

    x (N_r,) this rank's values -> (mu (), gamma ()) fp64, identical on every rank. One all_reduce of
    (sum, sum of squares, count) in fp64 (fp64 keeps ss/n - mu^2 free of cancellation for
    log-likelihoods of any realistic size) when torch.distributed is initialised -- a collective: every
    rank of `group` must call it. Without torch.distributed it is the local mean/std. Correct both when
    the ranks hold disjoint shards of D_s and when each holds all of it (sums and count scale alike).
    """
    x = x.detach().to(torch.float64).reshape(-1)
    moments = torch.stack([x.sum(), (x * x).sum(), torch.ones_like(x).sum()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=group)
    s, ss, n = moments.unbind()
    n = n.clamp(min=1)
    mu = s / n
    gamma = (ss / n - mu * mu).clamp(min=0).sqrt()
    return mu, gamma


def start_or_resume(resume: bool, ckpt_dir: str, metrics_path: str, model, optimizer, global_batch: int, rank: int):
    """Collective. With resume, load <ckpt_dir>/latest (if any) into model and optimizer and cut
    metrics.jsonl back to its step; otherwise (or with no checkpoint) start a new metrics.jsonl.
    Returns (state or None, step, MetricsLogger). A checkpoint of another global batch is refused: its
    data order would not continue."""
    state = load_checkpoint(ckpt_dir, model, optimizer) if resume else None
    step = state["step"] if state else 0
    if state and state["global_batch"] != global_batch:
        fail(rank, f"checkpoint has global batch {state['global_batch']}, this run {global_batch}: same "
                   f"--batch_size * --grad_accum * world size needed to resume")
    if rank == 0:
        if state:
            truncate_metrics(metrics_path, step)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    return state, step, MetricsLogger(metrics_path, rank)


def eval_batches(encoded: list[dict], batch_size: int, rank: int, world: int, pad_id: int) -> list[dict]:
    """Held-out examples (data.encode_example dicts) -> this rank's collated batches for `evaluate`.

    Rank r takes examples r, r + world, ... Every rank gets the same number of batches (FSDP needs
    every rank in every forward); a rank that runs out gets a filler batch with all labels -100, which
    adds nothing to the sums.
    """
    mine = encoded[rank::world]
    n = math.ceil(math.ceil(len(encoded) / world) / batch_size)
    out = []
    for b in range(n):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        batch = data.collate(chunk or encoded[:1], pad_id)
        if not chunk:
            batch["labels"].fill_(pk.IGNORE_INDEX)
        out.append(batch)
    return out


@torch.no_grad()
def evaluate(model, batches: list[dict], device) -> dict:
    """Teacher-forced held-out metrics over every rank's batches (collective: every rank runs every
    forward, sums are all_reduced).

    batches: collate dicts (input_ids (B, T), labels (B, T), -100 off-response) from eval_batches.
    Returns nll = -sum log pi(y_t | x, y_<t) / #response tokens (per-token held-out NLL, Eq. 3 on
    held-out data), top1_agreement = fraction of response positions where the model's argmax equals the
    teacher's token (the paper's Fig. 5 metric), and tokens = #response tokens scored.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # -log p, agreements, tokens
    for batch in batches:
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        # k = 1: the cached "top-k" is the argmax, and seq_logps the teacher-forced log-likelihood
        ids, _, seq = model(input_ids, head_fn=lambda h, w: fast.topk_logps_chunked(h, w, labels, 1))
        mask = pk.response_mask(labels)
        agree = (ids[..., 0].long() == labels[:, 1:]) & mask
        sums += torch.stack([-seq.sum().double(), agree.sum().double(), mask.sum().double()])
    dist.all_reduce(sums)
    model.train(was_training)
    nll, agree, n = sums.tolist()
    return {"nll": nll / max(n, 1), "top1_agreement": agree / max(n, 1), "tokens": int(n)}


def save_final(out_dir: str, model, tokenizer_path: str, cfg, dtype: torch.dtype | None = None,
               provenance: dict | None = None) -> None:
    """Collective. Write the trained adapter and the merged model:
      out_dir/adapter/  adapter_model.safetensors + adapter_config.json (PEFT layout)
      out_dir/final/    config.json + model.safetensors (HF format, W + (alpha/r) B A merged in fp32,
                        stored in `dtype`, default the base checkpoint's own dtype) + tokenizer.model
                        (+ provenance.json, the `provenance` dict, when given: what data trained it)
    cfg needs .base (the HF base dir). Rank 0 merges on CPU from the gathered LoRA tensors, streaming the
    base tensor by tensor (parallel.save_merged: one output shard in host memory, never the model), so
    no accelerator ever holds a second model; the other ranks wait at a barrier (minutes for a 70B
    model: init_distributed allows collectives an hour)."""
    lora_sd = gather_lora_state(model)
    if dist.get_rank() == 0:
        lora.save_adapter(os.path.join(out_dir, "adapter"), lora_sd, model.lora_config)
        if dtype is None:
            name = read_hf_config(cfg.base).get("torch_dtype", "bfloat16")
            dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
        parallel.save_merged(cfg.base, lora_sd, model.lora_config["alpha"] / model.lora_config["r"],
                             os.path.join(out_dir, "final"), dtype)
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "final", "tokenizer.model"))
        if provenance is not None:
            data.atomic_write(os.path.join(out_dir, "final", PROVENANCE), json.dumps(provenance, indent=1, sort_keys=True))
    dist.barrier()


PROVENANCE = "provenance.json"


def data_provenance(data_path: str, split_seed: int, n_examples: int, tok) -> dict:
    """What a proxy's training data was, for final/provenance.json: train_student.py checks that its D_s
    is the slice this proxy never saw (same file, split seed and sizes) and that the tokenizer is the same."""
    split = data.split_indices(n_examples, split_seed)
    return {"data_sha256": data.sha256_file(data_path), "split_seed": split_seed,
            "split_sizes": {k: len(v) for k, v in split.items()}, "tokenizer_sha256": tok.fingerprint}


# ---------------------------------------------------------------------------------------------------
# proxy alignment


@dataclass
class Config:
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
    nll_reduction: str = "sequence"  # Eq. 3 as printed: per reply ("sequence"), or per token ("token"); see the docstring
    temperature: float = 1.0  # sampling temperature of the proxy's own reply y_hat
    top_p: float = 1.0  # nucleus sampling of y_hat (1.0 = plain sampling)
    greedy: bool = False  # y_hat = greedy decode instead of sampling (debugging, exactness tests)
    max_new_tokens: int = 512  # length cap of y_hat (also cut to max_len - prompt length)
    sampler: str = "auto"  # round pre-pass decode: gathered (whole model per GPU), tensor_parallel, or auto (by the memory plan)
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


def flags_parser(config_cls, doc: str) -> argparse.ArgumentParser:
    """One --flag per field of a flat hyperparameter dataclass, defaults from the dataclass (bool fields
    are store_true switches). Shared by both train scripts."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for f in dataclasses.fields(config_cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return p


def parse_args(argv=None) -> Config:
    p = flags_parser(Config, __doc__)
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
    # 0: decode in micro-batches, the same rows and sampling stream as before --gen_batch_size existed
    cfg.gen_batch_size = cfg.gen_batch_size or cfg.batch_size
    if cfg.sampler not in ("auto", "gathered", "tensor_parallel"):
        p.error("--sampler must be auto, gathered or tensor_parallel")
    return cfg


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """Adam (the paper's) or plain SGD at a constant cfg.lr, over the trainable (LoRA) tensors only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)


def memory_plan(cfg: Config, world: int) -> parallel.Plan:
    """This run's per-GPU memory plan (parallel.plan_proxy) from --base's config.json and the flags."""
    args = ModelArgs.from_hf_config(read_hf_config(cfg.base))
    return parallel.plan_proxy(
        args, world, base_itemsize=getattr(torch, cfg.base_dtype).itemsize, lora_r=cfg.lora_r,
        batch_size=cfg.batch_size, max_len=cfg.max_len, gen_batch_size=cfg.gen_batch_size,
        max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size,
        activation_checkpointing=cfg.activation_checkpointing, budget=parallel.gpu_budget(cfg.gpu_memory_gib))


def plan_steps(indices: list[int], cfg: Config, rank: int, world: int, epochs) -> list[list[list[int]]]:
    """This rank's optimizer steps over `indices`: a list of steps, each a list of <= grad_accum
    micro-batches of example ids. data.rank_batches gives every rank the same number of micro-batches,
    and the global batch (all ranks' micro-batch j) is the same set of examples for any world size at
    equal batch_size * world."""
    micro = [b for e in epochs for b in data.rank_batches(indices, cfg.batch_size, rank, world, cfg.seed, epoch=e)]
    return [micro[j : j + cfg.grad_accum] for j in range(0, len(micro), cfg.grad_accum)]


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


@torch.no_grad()
def sample_round(model, steps: list, encoded: dict, tok, cfg: Config, generator, device, show: bool) -> dict:
    """Round pre-pass under the current weights, which ARE the reference pi_p^(i-1) of this round.

    For this rank's examples of the round, in step order: sample y_hat ~ pi_p^(i-1)(.|x) (batched
    KV-cache generation, cfg.gen_batch_size rows per batch), then score the teacher's y and y_hat
    teacher-forced: log pi_p^(i-1)(y|x), log pi_p^(i-1)(y_hat|x), one FSDP forward per micro-batch.
    cfg.sampler "gathered": the whole model is gathered on every rank once and each rank decodes its own
    rows to their end, with no collective per token. "tensor_parallel": a tensor-parallel copy of the
    model with the LoRA merged (parallel.tensor_parallel_copy, 1/world of every block per rank) decodes
    all ranks' rows together; the generator's state is taken from rank 0, so the draws are one stream.
    Returns the flat tensors stored in the round file: example_ids (E,) int64, rejected_tokens (N,)
    int32 and rejected_offsets (E+1,) int64 (example e's full rejected sequence, prompt included, is
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
            generator.set_state(agree(generator.get_state()))
        tp = parallel.tensor_parallel_copy(model)
        y_hats = parallel.tp_generate(tp, prompts, n, cfg.max_new_tokens, tok.eos_id, tok.pad_id, **sampling)
        del tp
    else:
        with gathered(model):  # one all-gather per unit here; the decode forwards below issue none
            y_hats = [y for i in tqdm(range(0, len(prompts), n), desc="sample", leave=False, disable=not show)
                      for y in generate(model, prompts[i : i + n], cfg.max_new_tokens, tok.eos_id, tok.pad_id, **sampling)]
    y_hats = iter(y_hats)
    for ids in micro:  # every rank has the same number of micro-batches: the same FSDP forwards
        crash_point("sample")
        encs = [encoded[i] for i in ids]
        y_hat = [next(y_hats) for _ in ids]
        rej = [rejected_example(e, y, tok.eos_id, cfg.max_new_tokens, cfg.max_len) for e, y in zip(encs, y_hat)]
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


def round_meta(cfg: Config, round_i: int, rank: int, world: int) -> dict[str, str]:
    """What a round file is bound to; a file whose metadata differs is not reused."""
    keys = ("data", "split_seed", "seed", "max_len", "batch_size", "grad_accum", "rounds", "temperature", "top_p",
            "greedy", "max_new_tokens", "base", "base_dtype", "prompt_field", "response_field", "system_field")
    meta = {k: str(getattr(cfg, k)) for k in keys}
    return {"format": "proxykd-round/1", "round": str(round_i), "rank": str(rank), "world_size": str(world), **meta}


def save_round(path: str, pairs: dict, meta: dict) -> None:
    """Write one rank's round pre-pass atomically (temp file + os.replace: whole or absent)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in pairs.items()}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def load_round(path: str, meta: dict, example_ids: list[int]) -> dict | None:
    """Read a round file written by save_round, or None when absent or bound to another run/plan."""
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        if f.metadata() != meta:
            return None
        pairs = {k: f.get_tensor(k) for k in f.keys()}
    return pairs if pairs["example_ids"].tolist() == example_ids else None


def pair_rows(pairs: dict, e: int) -> dict:
    """Row e of a round's pairs -> the rejected example (input_ids, labels) for data.collate."""
    o = pairs["rejected_offsets"]
    ids = pairs["rejected_tokens"][o[e] : o[e + 1]].tolist()
    n = int(pairs["rejected_prompt_len"][e])
    return {"input_ids": ids, "labels": [pk.IGNORE_INDEX] * n + ids[n:]}


def make_batch(ids: list[int], encoded: dict, pad_id: int, device, pairs: dict | None = None,
               rows: list[int] | None = None) -> dict:
    """Example ids -> a micro-batch for train_step. Stage 1: input_ids / labels (B, T) of the teacher's
    replies. Stage 2 (pairs given, rows = the ids' rows in the round file): input_ids / labels (2B, T)
    stacking [y_1..y_B; y_hat_1..y_hat_B] for one forward, plus ref_chosen / ref_rejected (B,).
    n = B; n_fwd = non-pad tokens forwarded (for tokens/s)."""
    encs = [encoded[i] for i in ids]
    if pairs is not None:
        encs += [pair_rows(pairs, e) for e in rows]
    batch = {k: v.to(device) for k, v in data.collate(encs, pad_id).items()}
    batch["n"] = len(ids)
    batch["n_fwd"] = float(sum(len(e["input_ids"]) for e in encs))
    if pairs is not None:
        batch["ref_chosen"] = pairs["ref_chosen"][rows].to(device)
        batch["ref_rejected"] = pairs["ref_rejected"][rows].to(device)
    return batch


def train_step(model, optimizer, batches: list[dict], world: int, cfg: Config, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (make_batch); every rank calls it with the
    same number of micro-batches.

    Stage 1 minimises Eq. 3 (NLL on the teacher's y); stage 2 Eq. 6 = Eq. 3 + Eq. 5 (DPO with chosen y,
    rejected y_hat, reference log-probs from the round pre-pass). Each micro-batch's sums are divided by
    the step's GLOBAL response-token / pair counts, so micro-batches and ranks add up to exactly one big
    batch. The counts are divided by `world` because FSDP2 averages gradients over ranks (and gloo
    cannot pre-scale: set_gradient_divide_factor needs PREMUL_SUM).
    Returns the all_reduced step metrics (8,) fp64, identical on every rank: loss, nll, dpo,
    chosen_reward_sum, rejected_reward_sum, correct_pairs, pairs, forwarded tokens. The optimizer steps
    only when the loss is finite on every rank (otherwise the caller stops the run).
    """
    dpo = "ref_chosen" in batches[0]
    # the step's global divisors: response tokens of the teacher's replies y, and pairs (examples)
    counts = torch.tensor([[float(pk.num_response_tokens(b["labels"][: b["n"]])), float(b["n"])] for b in batches],
                          dtype=torch.float64, device=device).sum(0)
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


def print_plan(cfg, memory_plan, title: str) -> None:
    """--plan, before any process group or weight (config.json and the flags only): rank 0 prints
    memory_plan(cfg, world) for --plan_world_size GPUs (default: this launch's world size); a bad path
    stops every rank with one line, as the training run itself would."""
    world = cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        plan = memory_plan(cfg, world)
    except (ValueError, OSError, KeyError) as e:
        fail(rank, f"bad input: {e}")
    if rank == 0:
        print(parallel.format_plan(plan, f"{title}, {world} GPUs"))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.plan:
        print_plan(cfg, memory_plan, f"train_proxy.py memory plan: {cfg.base}")
        return
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank (and for every world size)
    ckpt_dir = os.path.join(cfg.out, "checkpoints")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.resume and agree(rank == 0 and _latest(ckpt_dir) is not None):
        fail(rank, f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or use a new --out")

    # data: D_w (warm-up) and D_p (alignment) slices of the teacher data; D_s is left to the student
    fields = dict(prompt_field=cfg.prompt_field, response_field=cfg.response_field, system_field=cfg.system_field or None)
    try:  # every rank reads the same files and fails alike (one line, no traceback): no rank hangs
        model_vocab = read_hf_config(cfg.base)["vocab_size"]
        tok = data.Tokenizer(cfg.tokenizer)
        examples = data.read_jsonl(cfg.data, **fields)
        held_out = data.read_jsonl(cfg.eval_data, **fields) if cfg.eval_data else []
    except (ValueError, OSError, KeyError) as e:
        fail(rank, f"bad input: {e}")
    split = data.split_indices(len(examples), cfg.split_seed)
    d_w, d_p = split["warmup"], split["proxy"]
    encoded = {i: data.encode_example(tok, examples[i], cfg.max_len) for i in d_w + d_p}
    held_out = [data.encode_example(tok, e, cfg.max_len) for e in held_out]
    evals = eval_batches(held_out, cfg.eval_batch_size, rank, world, tok.pad_id)
    if tok.vocab_size > model_vocab:
        fail(rank, f"tokenizer has {tok.vocab_size} tokens, {cfg.base} only {model_vocab}")
    plan = memory_plan(cfg, world)
    if cfg.sampler == "auto":  # the whole model per GPU when it fits the plan, else tensor-parallel
        cfg.sampler = plan.sampler
    if cfg.sampler == "tensor_parallel" and "TP decode" not in plan.phases:
        fail(rank, f"--sampler tensor_parallel needs the heads and hidden_dim of {cfg.base} divisible by {world} ranks")

    # model: frozen bf16 base + fp32 LoRA, FSDP2-sharded; Adam on the LoRA tensors only
    model = load_lora_model(cfg.base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, device, getattr(torch, cfg.base_dtype))
    model = shard_model(model, cfg.activation_checkpointing)
    optimizer = make_optimizer(model, cfg)

    # the plan: stage 1 steps over D_w, then k rounds of steps over the round shards of D_p
    warm_steps = plan_steps(d_w, cfg, rank, world, range(cfg.warmup_epochs))
    shards = data.round_shards(d_p, cfg.rounds) if cfg.rounds else []
    # epoch offsets keep each round's shuffle distinct from the warm-up's
    round_steps = [plan_steps(s, cfg, rank, world, [cfg.warmup_epochs + i]) for i, s in enumerate(shards)]
    total = len(warm_steps) + sum(len(r) for r in round_steps)
    global_batch = cfg.batch_size * cfg.grad_accum * world

    # resume
    state, step, log = start_or_resume(cfg.resume, ckpt_dir, metrics_path, model, optimizer, global_batch, rank)
    if state:
        log.log({"step": step, "resumed_from": step})
    else:
        log.log({"step": 0, "config": dataclasses.asdict(cfg), "world_size": world, "n_warmup": len(d_w),
                 "n_proxy": len(d_p), "steps": total})
        if evals:
            log.log({"step": 0, "stage": "init", **{f"eval_{k}": v for k, v in evaluate(model, evals, device).items()}})

    pbar = tqdm(total=total, initial=step, desc="proxy", disable=rank != 0, dynamic_ncols=True)
    t_log, acc = time.time(), torch.zeros(8, dtype=torch.float64)

    def after_step(stage: str, rnd: int, sums: torch.Tensor, stage_end: bool) -> None:
        """Log, NaN stop, evaluate at stage ends, checkpoint, and the testing stop, after optimizer step `step`."""
        nonlocal t_log, acc
        crash_point("step")  # the update is applied, not yet checkpointed
        pbar.update(1)
        if not torch.isfinite(sums[:3]).all():
            log.log({"step": step, "stage": stage, "round": rnd, "error": "non-finite loss", "loss": sums[0].item()})
            fail(rank, f"non-finite loss at step {step} ({stage}, round {rnd}); no update applied; the last good "
                       f"checkpoint is {_latest(ckpt_dir)}", 3)
        # log: losses of this step, rewards and throughput since the last line
        acc += sums.cpu()
        if step % cfg.log_every == 0 or stage_end:
            loss, nll, pref, rc, rr, correct, pairs, fwd = sums.tolist()
            rec = {"step": step, "stage": stage, "round": rnd, "loss": loss, "nll": nll,
                   "tokens_per_s": acc[7].item() / max(time.time() - t_log, 1e-9)}
            if pairs:  # stage 2 with DPO
                rec.update(dpo=pref, reward_chosen=rc / pairs, reward_rejected=rr / pairs, reward_margin=(rc - rr) / pairs,
                           reward_accuracy=correct / pairs)
            log.log(rec)
            pbar.set_postfix(stage=stage, round=rnd, loss=f"{loss:.4f}")
            t_log, acc = time.time(), torch.zeros(8, dtype=torch.float64)
        # eval: held-out NLL and top-1 agreement with the teacher (Fig. 5) after warm-up and each round
        if stage_end and evals:
            ev = evaluate(model, evals, device)
            log.log({"step": step, "stage": stage, "round": rnd, **{f"eval_{k}": v for k, v in ev.items()}})
        # checkpoint
        stopping = cfg.stop_after_steps and step == cfg.stop_after_steps and step < total
        if stage_end or (cfg.save_every and step % cfg.save_every == 0) or stopping:
            save_checkpoint(ckpt_dir, model, optimizer, {"step": step, "global_batch": global_batch}, cfg.keep_checkpoints)
            t_log = time.time()  # exclude eval and checkpoint time from tokens/s
        if stopping:
            pbar.close()
            log.log({"step": step, "stopped_after_steps": step})
            finish(0)

    # ---- stage 1: warm-up, Eq. 3 (NLL) on D_w
    for j in range(step, len(warm_steps)):
        batches = [make_batch(ids, encoded, tok.pad_id, device) for ids in warm_steps[j]]
        sums = train_step(model, optimizer, batches, world, cfg, device)
        step += 1
        after_step("warmup", 0, sums, stage_end=j == len(warm_steps) - 1)
    # rank 0 alone writes final/ (save_final), so only it hashes the data file
    provenance = data_provenance(cfg.data, cfg.split_seed, len(examples), tok) if rank == 0 else None
    if warm_steps and step == len(warm_steps):  # the warmed-up proxy ("-align" ablation)
        save_final(os.path.join(cfg.out, "warmup"), model, cfg.tokenizer, cfg, provenance=provenance)

    # ---- stage 2: k rounds of Eq. 6 = NLL(y) + DPO(y over y_hat) on the round shards of D_p
    first = len(warm_steps)
    for i, steps in enumerate(round_steps):
        rnd, last = i + 1, first + len(steps)
        path = os.path.join(cfg.out, "rounds", f"round-{rnd:02d}-rank{rank}-of-{world}.safetensors")
        if step >= last:  # done before the resume (its file may outlive a stop right at the round end)
            if os.path.exists(path):
                os.remove(path)
            first = last
            continue
        # pre-pass: the current weights ARE pi_p^(i-1), the reference of this round. Its samples y_hat
        # and reference log-probs are computed now, once, and frozen in a file; training then moves
        # the weights to pi_p^(i). So no second model or adapter copy is ever held. A resume inside
        # the round reads the file back (the reference weights no longer exist by then).
        my_ids = [x for s in steps for ids in s for x in ids]
        meta = round_meta(cfg, rnd, rank, world)
        pairs = load_round(path, meta, my_ids) if cfg.resume and not cfg.no_dpo else None
        # Sampling is collective (FSDP forwards), so whether to sample is agreed: a crash in the
        # pre-pass can leave some ranks' files written and others not. At the round start every rank
        # then samples again (the same y_hat: same weights, same generator); inside the round the
        # reference weights are gone, so a missing file stops the run.
        resample = _any_rank(pairs is None and not cfg.no_dpo, device)
        missing = pairs is None and step > first and not cfg.no_dpo
        if missing:
            print(f"rank {rank}: resuming inside round {rnd} needs {path} (written at the round start by the same "
                  f"world size and settings); it is missing or does not match this run", file=sys.stderr)
        if _any_rank(missing, device):
            finish(2)
        if resample:
            t0 = time.time()
            # a CPU generator per (seed, round, rank): the same y_hat on any device, and on resume
            gen = torch.Generator().manual_seed(data.seed_of("sample", cfg.seed, rnd, rank))
            pairs = sample_round(model, steps, encoded, tok, cfg, gen, device, rank == 0)
            save_round(path, pairs, meta)
            stats = [time.time() - t0, float(len(my_ids)), *_pair_stats(pairs, encoded)]
            stats = torch.tensor(stats, dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            log.log({"step": step, "stage": "sample", "round": rnd, "seconds": stats[0].item() / world,
                     "pairs": int(stats[1].item()), "rejected_len_mean": stats[2].item() / stats[1].item(),
                     "identical_to_teacher": stats[3].item() / stats[1].item()})
        dist.barrier()
        t_log = time.time()
        # the file holds this rank's examples in plan order: micro-batch m of step j is a run of rows
        sizes = [len(ids) for s in steps for ids in s]
        rows = iter([list(range(a - n, a)) for a, n in zip(itertools.accumulate(sizes), sizes)])
        rows_of = [[next(rows) for _ in s] for s in steps]
        for j in range(step - first, len(steps)):
            batches = [make_batch(ids, encoded, tok.pad_id, device, pairs, r) for ids, r in zip(steps[j], rows_of[j])]
            sums = train_step(model, optimizer, batches, world, cfg, device)
            step += 1
            after_step("align", rnd, sums, stage_end=j == len(steps) - 1)
        if os.path.exists(path):
            os.remove(path)  # the round is checkpointed: its reference is never needed again
        first = last
    pbar.close()

    # outputs: the aligned proxy as a PEFT adapter and merged in HF format (+ tokenizer.model)
    merged_dtype = getattr(torch, cfg.merged_dtype) if cfg.merged_dtype else None
    save_final(cfg.out, model, cfg.tokenizer, cfg, merged_dtype, provenance)
    log.log({"step": step, "done": True, "final": os.path.join(cfg.out, "final")})
    finish(0)


def _pair_stats(pairs: dict, encoded: dict) -> list[float]:
    """Sum of rejected reply lengths, number of y_hat equal to the teacher's y (such pairs give DPO
    no gradient: the two log-ratios cancel)."""
    o, plen = pairs["rejected_offsets"], pairs["rejected_prompt_len"]
    length, same = 0.0, 0.0
    for e, x in enumerate(pairs["example_ids"].tolist()):
        seq = pairs["rejected_tokens"][o[e] : o[e + 1]].tolist()
        length += len(seq) - int(plen[e])
        same += float(seq == list(encoded[x]["input_ids"]))
    return [length, same]


if __name__ == "__main__":
    main()
