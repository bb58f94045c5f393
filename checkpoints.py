"""What a run leaves on disk: checkpoints (the LoRA, the optimizer, the loop state and every rank's RNG,
written atomically, read back by --resume) and the outputs (the adapter in the PEFT layout and the merged
model in the HF layout).

Every function that takes part in a collective says so; every rank must call it.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import data
import lora
import ranks
import sharding
from model import read_hf_config

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


def save_checkpoint(ckpt_dir: str, model, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int = 2) -> str | None:
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
        ranks.crash_point("checkpoint")  # the new dir is in place, `latest` still names the previous one
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
    # plain SGD keeps no state (and torch cannot load an empty one)
    if not isinstance(optimizer, torch.optim.SGD):
        set_optimizer_state_dict(model, optimizer, optim_sd, options=_FROM_RANK0)
    rng = state.pop("rng")
    if state.pop("world_size") == dist.get_world_size():
        _set_rng_state(rng[rank])
    return state


def _rng_state() -> dict:
    s = {"cpu": torch.get_rng_state()}
    if ranks.device().type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and ranks.device().type == "cuda":
        torch.cuda.set_rng_state(s["cuda"])


def check_out_dir(out: str, resume: bool, rank: int) -> None:
    """Collective. Create --out. Stops every rank when it holds checkpoints and `resume` is off (so nothing
    is overwritten)."""
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not resume and ranks.agree(rank == 0 and latest_checkpoint(ckpt_dir) is not None):
        ranks.fail(rank, f"{ckpt_dir} already holds checkpoints: pass --resume to continue, "
                         f"or use a new --out")


def save_adapter(out_dir: str, model) -> None:
    """Collective: the model's current adapter to out_dir (PEFT layout, written by rank 0; whole or the
    previous one: lora.save_adapter renames each file into place)."""
    lora_sd = gather_lora_state(model)
    if dist.get_rank() == 0:
        lora.save_adapter(out_dir, lora_sd, model.lora_config)


def save_final(out_dir: str, model, tokenizer_path: str, base_dir: str, dtype: torch.dtype | None = None,
               provenance: dict | None = None, adapter_dir: str | None = None) -> None:
    """Collective. Write the trained adapter and a merged copy of the model:
      out_dir/adapter/  adapter_model.safetensors + adapter_config.json (PEFT layout)
      out_dir/final/    config.json + model.safetensors (HF format, W + (alpha/r) B A merged in fp32,
                        stored in `dtype`, default the base checkpoint's own dtype) + tokenizer.model
                        (+ provenance.json, the `provenance` dict, when given: what data trained it)
    The adapter is the model's current one, or the one saved in `adapter_dir` (--keep_best's).
    Rank 0 merges on the host, streaming the base tensor by tensor (sharding.save_merged: one output
    shard in host memory, never the model), so no accelerator ever holds a second model; the other
    ranks wait with the long timeout (minutes for a 70B model, or rank 0 still hashing the provenance)."""
    ranks.long_barrier()
    lora_sd = gather_lora_state(model) if adapter_dir is None else None
    if dist.get_rank() == 0:
        if adapter_dir is not None:
            lora_sd = lora.read_adapter(adapter_dir)
        lora.save_adapter(os.path.join(out_dir, "adapter"), lora_sd, model.lora_config)
        if dtype is None:
            name = read_hf_config(base_dir).get("torch_dtype", "bfloat16")
            dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
        sharding.save_merged(base_dir, lora_sd, model.lora_config["alpha"] / model.lora_config["r"],
                             os.path.join(out_dir, "final"), dtype)
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "final", "tokenizer.model"))
        if provenance is not None:
            data.atomic_write(os.path.join(out_dir, "final", "provenance.json"),
                              json.dumps(provenance, indent=1, sort_keys=True))
    ranks.long_barrier()
