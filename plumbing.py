"""What both training scripts need and the paper does not describe, kept out of their loops: the process
group and device, FSDP2 sharding and model loading, ranks agreeing, checkpoints and resume, metrics,
evaluation, the outputs and their provenance, fault injection, the proxy's round files and the student's
top-k cache files.

Every function that takes part in a collective says so; every rank must call it.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time

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
from model import Llama, ModelArgs, read_hf_config

# ---------------------------------------------------------------------------------------------------
# process group, and ranks agreeing


@dataclasses.dataclass
class Launch:
    """How a run uses the machine: the flags both training scripts' Configs inherit."""
    device: str = "auto"  # auto (a GPU per process when CUDA is there, else the CPU), cuda or cpu; PROXYKD_DEVICE sets auto's
    deterministic: bool = False  # deterministic kernels, for bitwise-equal resume on CUDA (slower); CPU kernels already are
    timeout_min: float = 10.0  # a collective waiting longer fails the run: a dead or stuck rank does not hang the others
    long_timeout_min: float = 120.0  # the waits of the known-long phases: rank 0 hashing data or a proxy, merging a model


_DEVICE = torch.device("cpu")  # the device init_distributed chose, for everything that places tensors
_LONG_GROUP = None  # a gloo group with long_timeout_min, for the known-long phases' waits


def pick_device(requested: str, local_rank: int, n_gpus: int, visible: str | None) -> torch.device:
    """This process's device: `requested` is auto, cuda or cpu; local_rank its LOCAL_RANK; n_gpus the GPUs
    it sees; visible its CUDA_VISIBLE_DEVICES. A scheduler that gives each process one GPU of its own
    (CUDA_VISIBLE_DEVICES naming one device) gets it whatever LOCAL_RANK says. ValueError, in one line
    saying what to change, when the GPU a rank needs is not there."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and n_gpus == 0):
        return torch.device("cpu")
    if n_gpus == 0:
        raise ValueError("--device cuda, but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                         f"{visible!r}); pass --device cpu")
    if local_rank < n_gpus:
        return torch.device("cuda", local_rank)
    if n_gpus == 1 and visible is not None and len(visible.split(",")) == 1:
        return torch.device("cuda", 0)
    raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this process sees {n_gpus} "
                     f"(CUDA_VISIBLE_DEVICES={visible!r}): start at most {n_gpus} processes per node, give each "
                     f"process its own GPU, or pass --device cpu")


def init_distributed(launch: Launch | None = None) -> tuple[int, int, torch.device]:
    """Start torch.distributed for this process -> (rank, world_size, device), the device chosen here once.

    NCCL + cuda:LOCAL_RANK on a GPU, gloo on the CPU (pick_device; --device, or PROXYKD_DEVICE when it is
    auto, overrides). Under torchrun (RANK set) the group is the launch's; without torchrun a one-process
    group on an in-memory HashStore, so `python train_x.py` runs the very same code path (collectives
    included) as a multi-rank launch. Collectives time out after launch.timeout_min, except the waits
    of the known-long phases (long_barrier, agree(long=True)).
    """
    global _DEVICE, _LONG_GROUP
    launch = launch or Launch()
    requested = launch.device if launch.device != "auto" else os.environ.get("PROXYKD_DEVICE", "auto")
    try:
        n_gpus = torch.cuda.device_count() if requested != "cpu" else 0
        _DEVICE = pick_device(requested, int(os.environ.get("LOCAL_RANK", 0)), n_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as e:  # this rank alone may lack its GPU: it says so itself
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        finish(2)
    cuda = _DEVICE.type == "cuda"
    if launch.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when its handle is made
        torch.use_deterministic_algorithms(True)  # SDPA's backward kernels too
        torch.backends.cudnn.benchmark = False
    if cuda:
        torch.cuda.set_device(_DEVICE)
    backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(minutes=launch.timeout_min)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=_DEVICE if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=_DEVICE if cuda else None)
    _LONG_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=launch.long_timeout_min))
    return dist.get_rank(), dist.get_world_size(), _DEVICE


def long_barrier() -> None:
    """Collective: wait for every rank with the long timeout, in front of or after a known-long phase."""
    dist.barrier(group=_LONG_GROUP)


def any_rank(flag: bool, device) -> bool:
    """Collective OR of a per-rank flag."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def agree(obj, long: bool = False):
    """Rank 0's value of obj on every rank (a collective); long: rank 0 may first be busy for a long
    phase (hashing a proxy or a data file), so the others wait with the long timeout."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_LONG_GROUP if long else None)
    return box[0]


def first_error(err: str | None) -> str | None:
    """The first error message of any rank, on every rank (a collective), or None."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e), None)


def reduce_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective. Mean mu and population std gamma of x over all ranks: Eq. 9's moments over the whole
    of D_s when each rank holds a disjoint slice. x (N_r,) -> (mu (), gamma ()) fp64, the same on every
    rank. One all_reduce of (sum, sum of squares, count) in fp64, which keeps ss / n - mu^2 free of
    cancellation for log-likelihoods of any realistic size."""
    x = x.detach().to(torch.float64).reshape(-1)
    moments = torch.stack([x.sum(), (x * x).sum(), torch.ones_like(x).sum()])
    dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    s, ss, n = moments.unbind()
    n = n.clamp(min=1)
    mu = s / n
    gamma = (ss / n - mu * mu).clamp(min=0).sqrt()
    return mu, gamma


def finish(code: int = 0) -> None:
    """End the process now with exit status `code`: destroy the process group (no barrier, so it also
    works when other ranks are gone), flush stdout/stderr, os._exit. FSDP2 + gloo processes sometimes
    abort in interpreter teardown otherwise."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(rank: int, msg: str, code: int = 2) -> None:
    """Every rank calls this on the same (collectively agreed) condition; rank 0 says why, prefixed with
    the script's name, and every rank ends with `code`."""
    if rank == 0:
        print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    finish(code)


_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the tests: with PROXYKD_CRASH_AT=name:n:rank[:action][,...] in the environment,
    that rank acts the n-th time it passes the point `name`. action "kill" (the default) SIGKILLs it, as
    an OOM kill or a lost node would: no cleanup, no flush; "hang" stops it forever, as a stuck rank;
    "sleep=S" holds it S seconds, as a slow one. A no-op otherwise."""
    for spec in filter(None, os.environ.get("PROXYKD_CRASH_AT", "").split(",")):
        point, n, rank, *action = spec.split(":")
        if point != name or dist.get_rank() != int(rank):
            continue
        _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
        if _CRASH_COUNTS[name] == int(n):
            action = action[0] if action else "kill"
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(float(action.split("=")[1]) if action.startswith("sleep=") else 1e9)


# ---------------------------------------------------------------------------------------------------
# models: meta-device construction, LoRA, FSDP2


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


def load_lora_model(base_dir: str, lora_r: int, lora_alpha: float, lora_dropout: float, dtype=torch.bfloat16) -> Llama:
    """HF-format base checkpoint -> Llama with LoRA on every linear of every block (lora.apply_lora),
    still unsharded: pass it to shard_model, which places it on the process group's device.

    The base weights are frozen in `dtype` (bf16, the paper's mixed precision), the LoRA A/B are fp32 and
    the only trainable parameters. The LoRA hyperparameters are kept as `model.lora_config` (a dict) for
    the PEFT adapter_config.json.
    """
    model = load_base(base_dir, dtype)
    lora.apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout)
    # the adapter is small: every rank draws it whole on the host from torch's global CPU RNG, seeded
    # alike (A in module order, B zero), so it is the same for any world size and device; shard_model
    # keeps each rank's rows
    for m in lora.lora_modules(model).values():
        m.lora_A = torch.nn.Parameter(torch.empty_like(m.lora_A, device="cpu"))
        m.lora_B = torch.nn.Parameter(torch.empty_like(m.lora_B, device="cpu"))
        m.reset_lora_parameters()
    model.lora_config = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, base=os.path.abspath(base_dir))
    return model


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
    device = _DEVICE
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


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """Adam (the paper's) or plain SGD at a constant cfg.lr, over the trainable (LoRA) tensors only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr)


# ---------------------------------------------------------------------------------------------------
# flags, inputs, batches


def flags_parser(config_cls, doc: str) -> argparse.ArgumentParser:
    """One --flag per field of a flat hyperparameter dataclass, defaults from the dataclass (bool fields
    are store_true switches)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for f in dataclasses.fields(config_cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return p


def read_inputs(cfg, rank: int) -> tuple[data.Tokenizer, list[data.Example], list[data.Example], int]:
    """The run's tokenizer, teacher data, held-out data and the base's vocabulary size. Every rank reads
    the same files and fails alike, with one line naming the file (and line) and what was expected: no
    rank hangs in a collective waiting for one that died."""
    fields = dict(prompt_field=cfg.prompt_field, response_field=cfg.response_field, system_field=cfg.system_field or None)
    try:
        vocab = read_hf_config(cfg.base)["vocab_size"]
        tok = data.Tokenizer(cfg.tokenizer)
        examples = data.read_jsonl(cfg.data, **fields)
        held_out = data.read_jsonl(cfg.eval_data, **fields) if cfg.eval_data else []
    except (ValueError, OSError, KeyError) as e:
        fail(rank, f"bad input: {e}")
    if tok.vocab_size > vocab:
        fail(rank, f"tokenizer has {tok.vocab_size} tokens, {cfg.base} only {vocab}")
    return tok, examples, held_out, vocab


def plan_steps(indices: list[int], cfg, rank: int, world: int, epochs) -> list[list[list[int]]]:
    """This rank's optimizer steps over `indices`: a list of steps, each a list of <= grad_accum
    micro-batches of example ids. data.rank_batches gives every rank the same number of micro-batches,
    and the global batch (all ranks' micro-batch j) is the same set of examples for any world size at
    equal batch_size * world."""
    micro = [b for e in epochs for b in data.rank_batches(indices, cfg.batch_size, rank, world, cfg.seed, epoch=e)]
    return [micro[j : j + cfg.grad_accum] for j in range(0, len(micro), cfg.grad_accum)]


def make_batch(ids: list[int], encoded: dict, pad_id: int, device, pairs: dict | None = None,
               rows: list[int] | None = None) -> dict:
    """Example ids -> a micro-batch: input_ids / labels (B, T) of the teacher's replies on the device and
    labels_cpu, "ids", n = B, n_tokens = the teacher replies' response tokens and n_fwd = non-pad tokens
    forwarded (for tokens/s); the counts come from the host copy, so no step waits on the device for
    them. With a round's pairs (rows = the ids' rows in the round file), input_ids / labels are (2B, T),
    stacking [y_1..y_B; y_hat_1..y_hat_B] for one forward, plus ref_chosen / ref_rejected (B,)."""
    encs = [encoded[i] for i in ids]
    if pairs is not None:
        encs += [pair_rows(pairs, e) for e in rows]
    cpu = data.collate(encs, pad_id)
    batch = {k: to_device(v, device) for k, v in cpu.items()}
    batch["labels_cpu"], batch["ids"], batch["n"] = cpu["labels"], ids, len(ids)
    batch["n_tokens"] = int(pk.num_response_tokens(cpu["labels"][: len(ids)]))
    batch["n_fwd"] = float(sum(len(e["input_ids"]) for e in encs))
    if pairs is not None:
        batch["ref_chosen"] = pairs["ref_chosen"][rows].to(device)
        batch["ref_rejected"] = pairs["ref_rejected"][rows].to(device)
    return batch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking the host."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------------
# evaluation


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


# ---------------------------------------------------------------------------------------------------
# checkpoints: the LoRA, the optimizer, the loop state and every rank's RNG, written atomically

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def gather_lora_state(model) -> dict[str, torch.Tensor]:
    """Collective: the full, unsharded trainable (LoRA) tensors, on CPU, keyed by the model's own
    parameter names (e.g. "model.layers.0.self_attn.q_proj.lora_A"). Rank 0 gets the tensors; the other
    ranks get an empty dict."""
    return get_model_state_dict(model, options=_FULL_TRAINABLE)


def latest_checkpoint(ckpt_dir: str) -> str | None:
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
    if rank == 0 and (path := latest_checkpoint(ckpt_dir)) is not None:
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
    if _DEVICE.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and _DEVICE.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"])


# ---------------------------------------------------------------------------------------------------
# a run: its output dir, metrics and the bookkeeping after every optimizer step


def check_out_dir(out: str, resume: bool, rank: int) -> None:
    """Collective. Create --out; refuse one that holds checkpoints unless resuming (nothing is lost)."""
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not resume and agree(rank == 0 and latest_checkpoint(ckpt_dir) is not None):
        fail(rank, f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or use a new --out")


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


class Run:
    """One training run around its optimizer steps, so that the scripts' loops show only the algorithm:
    resume, the progress bar, metrics.jsonl, the stop on a non-finite loss, held-out evals, checkpoints
    and --stop_after_steps.

    Collective: every rank builds it after the model and optimizer, and calls step_done after every
    optimizer step with values that are the same on every rank (train steps all_reduce theirs).
    """

    def __init__(self, cfg, model, optimizer, total: int, desc: str, rank: int, world: int, device,
                 evals: list[dict], first_records: list[dict]):
        self.cfg, self.model, self.optimizer, self.total = cfg, model, optimizer, total
        self.rank, self.device, self.evals = rank, device, evals
        self.ckpt_dir = os.path.join(cfg.out, "checkpoints")
        self.global_batch = cfg.batch_size * cfg.grad_accum * world
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        state = load_checkpoint(self.ckpt_dir, model, optimizer) if cfg.resume else None
        self.step = state["step"] if state else 0
        if state and state["global_batch"] != self.global_batch:  # its data order would not continue
            fail(rank, f"checkpoint has global batch {state['global_batch']}, this run {self.global_batch}: same "
                       f"--batch_size * --grad_accum * world size needed to resume")
        if rank == 0:
            if state:
                truncate_metrics(metrics_path, self.step)
            elif os.path.exists(metrics_path):
                os.remove(metrics_path)
        self.metrics = MetricsLogger(metrics_path, rank)
        if state:
            self.log({"step": self.step, "resumed_from": self.step})  # the step-0 lines are kept
        else:
            for r in first_records:
                self.log(r)
            self.log_eval({"stage": "init"})
        self.pbar = tqdm(total=total, initial=self.step, desc=desc, disable=rank != 0, dynamic_ncols=True)
        self.reset_clock()

    def log(self, record: dict) -> None:
        self.metrics.log(record)

    def log_eval(self, tags: dict) -> None:
        """Collective: held-out NLL and top-1 agreement (evaluate), logged with `tags`."""
        if self.evals:
            ev = evaluate(self.model, self.evals, self.device)
            self.log({"step": self.step, **tags, **{f"eval_{k}": v for k, v in ev.items()}})

    def step_done(self, losses: dict, tokens: float, tags: dict, stage_end: bool, eval_now: bool) -> None:
        """After optimizer step self.step + 1: `losses` are its logged values (loss first), `tokens` the
        tokens it forwarded, `tags` what to label its lines with (stage, round). A non-finite loss stops
        every rank (the step applied no update); a stage end is always logged and checkpointed."""
        self.step += 1
        crash_point("step")  # the update is applied, not yet checkpointed
        self.pbar.update(1)
        if not all(math.isfinite(v) for v in losses.values()):
            self.log({"step": self.step, **tags, "error": "non-finite loss", "loss": losses["loss"]})
            where = "".join(f", {k} {v}" for k, v in tags.items())
            fail(self.rank, f"non-finite loss at step {self.step}{where}; no update applied; the last good checkpoint "
                            f"is {latest_checkpoint(self.ckpt_dir)}: resume from it with a lower --lr", 3)
        self.tokens += tokens
        if self.step % self.cfg.log_every == 0 or stage_end:
            self.log({"step": self.step, **tags, **losses, "tokens_per_s": self.tokens / max(time.time() - self.t_log, 1e-9)})
            self.pbar.set_postfix(**tags, loss=f"{losses['loss']:.4f}")
            self.reset_clock()
        if eval_now:
            self.log_eval(tags)
        stopping = self.cfg.stop_after_steps and self.step == self.cfg.stop_after_steps and self.step < self.total
        if stage_end or (self.cfg.save_every and self.step % self.cfg.save_every == 0) or stopping:
            self.checkpoint()
            self.t_log = time.time()  # tokens/s leaves out eval and checkpoint time
        if stopping:
            self.pbar.close()
            self.log({"step": self.step, "stopped_after_steps": self.step})
            finish(0)

    def reset_clock(self) -> None:
        """Start tokens/s afresh (after work that forwards no training tokens)."""
        self.t_log, self.tokens = time.time(), 0.0

    def checkpoint(self) -> None:
        """Collective: the LoRA, optimizer and loop state after self.step steps."""
        save_checkpoint(self.ckpt_dir, self.model, self.optimizer, {"step": self.step, "global_batch": self.global_batch},
                        self.cfg.keep_checkpoints)

    def finish(self, out_dir: str, provenance: dict | None = None) -> None:
        """Collective: close the bar, write the outputs (save_final), log the last line and end the process."""
        self.pbar.close()
        merged_dtype = getattr(torch, self.cfg.merged_dtype) if self.cfg.merged_dtype else None
        save_final(out_dir, self.model, self.cfg.tokenizer, self.cfg.base, merged_dtype, provenance)
        self.log({"step": self.step, "done": True, "final": os.path.join(out_dir, "final")})
        finish(0)


# ---------------------------------------------------------------------------------------------------
# outputs: the adapter, a merged model and what data trained it

PROVENANCE = "provenance.json"


def save_final(out_dir: str, model, tokenizer_path: str, base_dir: str, dtype: torch.dtype | None = None,
               provenance: dict | None = None) -> None:
    """Collective. Write the trained adapter and a merged copy of the model:
      out_dir/adapter/  adapter_model.safetensors + adapter_config.json (PEFT layout)
      out_dir/final/    config.json + model.safetensors (HF format, W + (alpha/r) B A merged in fp32,
                        stored in `dtype`, default the base checkpoint's own dtype) + tokenizer.model
                        (+ provenance.json, the `provenance` dict, when given: what data trained it)
    Rank 0 merges on CPU from the gathered LoRA tensors, streaming the base tensor by tensor
    (parallel.save_merged: one output shard in host memory, never the model), so no accelerator ever
    holds a second model; the other ranks wait at a barrier (minutes for a 70B model:
    long_barrier waits with the long timeout, also for rank 0 still hashing the provenance)."""
    long_barrier()
    lora_sd = gather_lora_state(model)
    if dist.get_rank() == 0:
        lora.save_adapter(os.path.join(out_dir, "adapter"), lora_sd, model.lora_config)
        if dtype is None:
            name = read_hf_config(base_dir).get("torch_dtype", "bfloat16")
            dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
        parallel.save_merged(base_dir, lora_sd, model.lora_config["alpha"] / model.lora_config["r"],
                             os.path.join(out_dir, "final"), dtype)
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "final", "tokenizer.model"))
        if provenance is not None:
            data.atomic_write(os.path.join(out_dir, "final", PROVENANCE), json.dumps(provenance, indent=1, sort_keys=True))
    long_barrier()


def data_provenance(data_path: str, split_seed: int, n_examples: int, tok: data.Tokenizer) -> dict:
    """What a proxy's training data was, for final/provenance.json: train_student.py checks that its D_s
    is the slice this proxy never saw (same file, split seed and sizes) and that the tokenizer is the same."""
    crash_point("provenance")  # hashing a large data file takes a while
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


def check_proxy(cfg, tok: data.Tokenizer, student_vocab: int, n_examples: int, rank: int) -> str | None:
    """Collective. The student's proxy must share the tokenizer and vocabulary (the cached top-k ids must
    mean the same tokens to the student) and must have been trained on a split whose D_s is this run's
    (check_provenance). Stops every rank with one line otherwise; returns the note for a proxy without
    provenance."""
    try:
        proxy_vocab = read_hf_config(cfg.proxy)["vocab_size"]
        data.check_same_vocab(tok, data.Tokenizer(os.path.join(cfg.proxy, "tokenizer.model")))
        if proxy_vocab != student_vocab:
            raise ValueError(f"proxy vocab_size {proxy_vocab} != student vocab_size {student_vocab}")
    except (ValueError, OSError) as e:
        fail(rank, f"proxy {cfg.proxy} and student {cfg.base} must share the tokenizer and vocabulary: {e}")
    # rank 0 hashes the data file once and tells the others: every rank stops alike on a mismatch
    problem, note = agree(check_provenance(cfg, n_examples, tok) if rank == 0 else None, long=True)
    if problem:
        fail(rank, problem)
    if note and rank == 0:
        print(f"{os.path.basename(sys.argv[0])}: note: {note}", file=sys.stderr)
    return note


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


# ---------------------------------------------------------------------------------------------------
# the proxy's round files: a round's y_hat and reference log-probs, so a resume inside the round needs
# neither the reference weights (gone by then) nor a second sampling pass


def round_path(out: str, rnd: int, rank: int, world: int) -> str:
    return os.path.join(out, "rounds", f"round-{rnd:02d}-rank{rank}-of-{world}.safetensors")


def remove_round(out: str, rnd: int, rank: int, world: int) -> None:
    path = round_path(out, rnd, rank, world)
    if os.path.exists(path):
        os.remove(path)


def round_meta(cfg, round_i: int, rank: int, world: int) -> dict[str, str]:
    """What a round file is bound to; a file whose metadata differs is not reused."""
    keys = ("data", "split_seed", "seed", "max_len", "batch_size", "grad_accum", "rounds", "temperature", "top_p",
            "greedy", "max_new_tokens", "base", "base_dtype", "prompt_field", "response_field", "system_field")
    meta = {k: str(getattr(cfg, k)) for k in keys}
    return {"format": "proxykd-round/1", "round": str(round_i), "rank": str(rank), "world_size": str(world), **meta}


def save_round(path: str, pairs: dict, meta: dict) -> None:
    """Write one rank's round file (its reference pass) atomically (temp file + os.replace: whole or absent)."""
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


def must_sample(pairs: dict | None, mid_round: bool, path: str, rank: int, device) -> bool:
    """Collective: whether the ranks sample the round's reference pass now. Sampling is collective (FSDP
    forwards), and a crash in the reference pass can leave some ranks' files written and others not: at the
    round start every rank then samples again (the same y_hat: same weights, same generator). Inside
    the round the reference weights are gone, so a missing file stops every rank."""
    missing = pairs is None
    if missing and mid_round:
        print(f"rank {rank}: resuming inside a round needs {path} (written at the round start by the same world "
              f"size and settings); it is missing or does not match this run", file=sys.stderr)
    resample = any_rank(missing, device)
    if resample and mid_round:
        finish(2)
    return resample


def pair_rows(pairs: dict, e: int) -> dict:
    """Row e of a round's pairs -> the rejected example (input_ids, labels) for data.collate."""
    o = pairs["rejected_offsets"]
    ids = pairs["rejected_tokens"][o[e] : o[e + 1]].tolist()
    n = int(pairs["rejected_prompt_len"][e])
    return {"input_ids": ids, "labels": [pk.IGNORE_INDEX] * n + ids[n:]}


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
# the student's proxy cache, in --cache_dir:
#   meta.json                    what it is bound to (cache_meta): sha256 of the data, field names, split
#                                seed, tokenizer and template fingerprints, sha256 of the proxy checkpoint,
#                                k, max_len, dtypes. A cache whose meta.json differs is refused, naming the
#                                fields.
#   part-<first id>.safetensors  written by each rank every --cache_flush_every batches (temp file +
#                                os.replace: whole or absent): example_ids (E,) int64, offsets (E+1,)
#                                int64, seq_logps (E,) fp32 = log pi_p(y|x), topk_ids (N, k) int32 and
#                                topk_logps (N, k) fp16 or bf16 (log pi_p over the full vocabulary). Rows
#                                offsets[e]:offsets[e+1] are example e's response tokens, in order.
#   COMPLETE                     written last by rank 0; without it the cache is partial: never read, and
#                                a rerun computes only the examples no whole part holds.

CACHE_FORMAT = "proxykd-topk-cache/1"


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


def template_fingerprint(tok: data.Tokenizer, max_len: int) -> str:
    """sha256 of how probe examples are tokenised (prompt template, system line, bos/eos, label mask):
    a cache is only valid for the token sequences it was computed on."""
    probes = [data.Example("probe prompt", "probe reply", "probe", system) for system in (None, "probe system")]
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
        if part_files(cache_dir) or os.path.exists(os.path.join(cache_dir, "COMPLETE")):
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
    for path in part_files(cache_dir):
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
    for path in part_files(cache_dir):
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
             "bytes_per_token": n_bytes / max(n_tokens, 1), "parts": len(part_files(cache_dir))}
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
        for fi, path in enumerate(part_files(cache_dir)):
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
        """-> per example (topk_ids (n_i, k) int32, topk_logps (n_i, k)), the input of pad_topk."""
        out = []
        for i in ids:
            fi, a, b = self.where[i]
            f = self.files[fi]
            out.append((f.get_slice("topk_ids")[a:b], f.get_slice("topk_logps")[a:b]))
        return out


def prepare_cache(cfg, tok: data.Tokenizer, d_s: list[int], rank: int) -> tuple[dict, list[int] | None]:
    """Collective. Rank 0 hashes the proxy and creates or checks cfg.cache_dir; every rank gets (the
    cache's meta, the examples of D_s it still lacks: None when it is COMPLETE, [] when every part is
    written but COMPLETE is not). A cache of another run stops every rank with one message."""
    meta = todo = err = None
    if rank == 0:  # rank 0 owns the directory; the others wait for its verdict
        try:
            meta = cache_meta(cfg, tok, len(d_s), proxy_fingerprint(cfg.proxy))
            prepare_cache_dir(cfg.cache_dir, meta, cfg.rebuild_cache)
            if not os.path.exists(os.path.join(cfg.cache_dir, "COMPLETE")):
                todo = sorted(set(d_s) - cached_example_ids(cfg.cache_dir))  # whole parts already written stay
        except (CacheError, OSError) as e:
            err = str(e)
    meta, todo, err = agree((meta, todo, err), long=True)
    if err is not None:
        fail(rank, err)
    return meta, todo


def open_cache(cache_dir: str, meta: dict, d_s: list[int], rank: int, finalise: bool) -> ProxyCache:
    """Collective. With finalise (after every rank wrote its parts) rank 0 checks that the parts cover
    D_s and writes COMPLETE; then every rank opens the cache itself (a node that does not see the shared
    filesystem fails here, together with the others)."""
    if finalise:
        long_barrier()  # every rank's parts are written
        err = None
        if rank == 0:
            try:
                finalise_cache(cache_dir, meta_digest(meta), d_s)
            except CacheError as e:
                err = str(e)
        if (err := agree(err, long=True)) is not None:
            fail(rank, err)
    try:
        cache, err = ProxyCache(cache_dir, meta), None
    except (CacheError, OSError) as e:
        cache, err = None, f"rank {rank}: {e}"
    if (err := first_error(err)) is not None:
        fail(rank, err)
    return cache


def topk_rows(topk_ids: torch.Tensor, topk_logps: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, T-1, k) batch cache -> per example (ids (n_i, k), logps (n_i, k)) at its n_i response
    positions, in order: the compact form to store. Inverse of pad_topk for the same labels."""
    m = pk.response_mask(labels)
    return [(topk_ids[b][m[b]], topk_logps[b][m[b]]) for b in range(labels.shape[0])]


def pad_topk(rows: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
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
    return to_device(ids, device), to_device(lps, device)
