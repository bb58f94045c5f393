"""Models on the ranks: a base checkpoint built on the meta device with LoRA added, FSDP2 sharding with each
rank reading only its own rows of every tensor from the safetensors files, and the merged export that
streams the base tensor by tensor. No rank ever holds a whole checkpoint (a 70B bf16 proxy is 140 GB).
"""

import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import lora
import ranks
from model import Llama, ModelArgs, commit_shards, read_hf_config, shard_file_names, weight_files

def load_base(base_dir: str, dtype=torch.bfloat16) -> Llama:
    """HF-format checkpoint -> a Llama on the meta device (no memory) that remembers base_dir as
    `model.checkpoint_dir`; shard_model then has every rank read only its own shard of each tensor
    straight from the safetensors files (load_fsdp_shards). No rank ever holds the whole
    model, on the host or on its device (a 70B bf16 proxy is 140 GB).
    """
    args = ModelArgs.from_hf_config(read_hf_config(base_dir))
    with torch.device("meta"):
        model = Llama(args).to(dtype)
    model.checkpoint_dir = base_dir
    return model


def load_lora_model(base_dir: str, lora_r: int, lora_alpha: float, lora_dropout: float,
                    dtype=torch.bfloat16) -> Llama:
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


def check_weights(ckpt_dir: str) -> None:
    """Raise ValueError, in one line naming the file and what is wrong, unless every safetensors file of the
    HF-format checkpoint in ckpt_dir opens: its header parses and covers the whole file (a truncated copy
    fails here, on every rank alike, before any collective)."""
    expected = "expected an HF-format checkpoint dir (config.json + *.safetensors)"
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    try:
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(ckpt_dir, v) for v in json.load(f)["weight_map"].values()})
        else:
            files = [os.path.join(ckpt_dir, "model.safetensors")]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{index}: unreadable ({e}); {expected}") from None
    for file in files:
        if not os.path.exists(file):
            raise ValueError(f"{file}: no such file; {expected}")
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a whole safetensors file ({e}); {expected}") from None


def shard_model(model: Llama, activation_checkpointing: bool = False, mesh=None) -> Llama:
    """FSDP2: fully_shard every transformer block, then the root (embeddings, final norm, lm_head), over
    `mesh` (default ranks.mesh(): every rank, on the chosen device). Collective. Returns the same module
    object on that device: an FSDPModule when there are several ranks; at one rank a plain module,
    because there is nothing to shard and fully_shard would still copy every parameter into a fresh
    unsharded buffer on every forward and backward (RESULTS.md, "No FSDP at one rank").
    Everything downstream (state dicts, `gathered`, the collectives) takes either.

    A model from load_base (base weights on the meta device) gets its shards read by each rank from
    `model.checkpoint_dir` (load_fsdp_shards; parameters already on the host, the fresh LoRA,
    are sliced from there); a model fully loaded on every rank is sharded as is.
    activation_checkpointing recomputes each block in the backward. It uses the composable
    `checkpoint` (a hook on the block) rather than checkpoint_wrapper, because the wrapper renames every
    parameter (`_checkpoint_wrapped_module.`) and the LoRA/PEFT key mapping relies on plain HF names.
    """
    mesh = mesh or ranks.mesh()  # of ranks.device()'s type, like every tensor here
    device = ranks.device()
    shard = mesh.size() > 1
    on_meta = any(p.is_meta for p in model.parameters())
    # to_empty below replaces every parameter: keep the host ones (the fresh LoRA) to slice from
    host = {n: p.detach() for n, p in model.named_parameters() if not p.is_meta} if on_meta else {}
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint
    for block in model.model.layers:
        if activation_checkpointing:
            checkpoint(block)
        if shard:
            fully_shard(block, mesh=mesh)
    if shard:
        fully_shard(model, mesh=mesh)
    if on_meta:
        model.to_empty(device=device)
        load_fsdp_shards(model, model.checkpoint_dir, host)
    elif not shard:
        model.to(device)
    return model


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rows of dim 0 that FSDP2's Shard(0) gives `rank`: torch.chunk's split, ceil(n / world) per rank,
    the last ranks shorter or empty."""
    c = -(-n // world)
    return slice(min(rank * c, n), min((rank + 1) * c, n))


@torch.no_grad()
def load_fsdp_shards(model: nn.Module, ckpt_dir: str, host: dict[str, torch.Tensor]) -> None:
    """Fill an FSDP2-sharded model materialised with to_empty: each rank reads only its own rows of each
    tensor straight from ckpt_dir's safetensors files (safe_open get_slice), cast to the parameter's
    dtype; no rank ever reads a whole checkpoint. Parameters named in `host` (e.g. a fresh LoRA
    adapter, built whole on every rank) are sliced from there instead. A checkpoint that misses a
    parameter or holds an unknown tensor is refused, as Llama.from_pretrained refuses it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    files = {k: f for k, f in weight_files(ckpt_dir).items() if not k.endswith("rotary_emb.inv_freq")}
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as embed_tokens
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    expected = set(params) - set(host)
    unexpected = set(files) - expected - ({"lm_head.weight"} if tied else set())
    if expected - set(files) or unexpected:
        raise ValueError(f"{ckpt_dir}: checkpoint does not match config.json: "
                         f"missing {sorted(expected - set(files))[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    handles = {}  # one open file per safetensors shard; get_slice reads only the requested rows
    for name, p in params.items():
        rows = shard_rows(p.shape[0], rank, world)
        if name in host:
            src = host[name][rows]
        else:
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], framework="pt")
            src = handles[files[name]].get_slice(name)[rows]
        # this rank's rows of the DTensor, a view of FSDP2's sharded storage (at one rank: the parameter)
        local = p.to_local() if hasattr(p, "to_local") else p
        local.copy_(src.to(local.dtype))


@torch.no_grad()
def save_merged(base_dir: str, lora_sd: dict[str, torch.Tensor], scaling: float, out_dir: str,
                dtype: torch.dtype, max_shard_size: int = 5 * 2**30) -> None:
    """Write base + (alpha / r) B A in HF format, one tensor at a time: read a base tensor, cast it to
    `dtype`, merge its adapter (fp32, rounded once: lora.LoRALinear.merge's arithmetic), and add it to
    the output file being filled. Host memory: one output shard (<= max_shard_size) plus one tensor,
    never the whole model. Same layout as Llama.save_pretrained (config.json, model.safetensors or
    shards + index; .tmp files renamed into place, the index / single file last).
    lora_sd: "X.lora_A" / "X.lora_B" tensors keyed by parameter name (gather_lora_state)."""
    args = ModelArgs.from_hf_config(read_hf_config(base_dir))
    files = weight_files(base_dir)
    names = [k for k in files if not k.endswith("rotary_emb.inv_freq")
             and not (args.tie_word_embeddings and k == "lm_head.weight")]
    os.makedirs(out_dir, exist_ok=True)
    sizes, n_shards, size = [], 1, 0  # a first pass over the headers plans the shards (names need the count)
    for k in names:
        with safe_open(files[k], framework="pt") as f:
            shape = f.get_slice(k).get_shape()
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if size and size + nbytes > max_shard_size:
            n_shards, size = n_shards + 1, 0
        size += nbytes
        sizes.append(n_shards - 1)
    shard_names = shard_file_names(n_shards)
    shard, weight_map, total = {}, {}, 0
    for j, k in enumerate(names):
        with safe_open(files[k], framework="pt") as f:
            w = f.get_tensor(k).to(dtype)
        base = k[: -len(".weight")]
        if base + ".lora_A" in lora_sd:
            w = (w.float() + scaling * (lora_sd[base + ".lora_B"] @ lora_sd[base + ".lora_A"])).to(dtype)
        shard[k] = w.contiguous()
        weight_map[k] = shard_names[sizes[j]]
        total += w.numel() * w.element_size()
        if j == len(names) - 1 or sizes[j + 1] != sizes[j]:
            save_file(shard, os.path.join(out_dir, shard_names[sizes[j]] + ".tmp"), metadata={"format": "pt"})
            shard = {}
    commit_shards(out_dir, args, dtype, shard_names, weight_map, total)


