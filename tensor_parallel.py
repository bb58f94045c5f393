"""Tensor-parallel decoding for the round's reference pass, when the whole proxy does not fit on one GPU.

Megatron's split (Shoeybi et al. 2019; gpt-fast's tp.py is the model of size): every rank holds a plain
Llama of 1/world the width. q/k/v and gate/up keep 1/world of their output rows (whole heads), o_proj and
down_proj 1/world of their input columns, so a block needs one all_reduce after attention and one after the
MLP, and each rank's KV cache holds only its own heads. Embeddings, final norm and lm_head are replicated
(1 GB at 70B), so the logits are whole on every rank.
"""

from contextlib import contextmanager
import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from model import Llama, ModelArgs, generate

# linears split by output rows (heads / SwiGLU units) and by input columns; see the module docstring
ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COL_SPLIT = ("o_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------
# tensor-parallel decoding


def tp_supported(args: ModelArgs, world: int) -> bool:
    """Whole heads and SwiGLU units per rank: kv heads, query heads and hidden_dim divide by world."""
    return args.n_kv_heads % world == 0 and args.n_heads % world == 0 and args.hidden_dim % world == 0


def tp_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shape of one rank's slice: the same dim, vocab and head_dim, 1/world of the heads and of the
    SwiGLU width. GQA grouping is kept: local query head j reads local kv head j // (H / G)."""
    if not tp_supported(args, world):
        raise ValueError(f"tensor-parallel decoding needs n_kv_heads={args.n_kv_heads}, "
                         f"n_heads={args.n_heads} and hidden_dim={args.hidden_dim} "
                         f"divisible by the world size {world}")
    return dataclasses.replace(args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
                               hidden_dim=args.hidden_dim // world, head_dim=args.head_dim)


def _merged_slice(linear: nn.Module, name: str, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of an unsharded linear's weight with its LoRA merged, in the weight's dtype:
    W + (alpha / r) B A computed in fp32 and rounded once, as lora.LoRALinear.merge does."""
    w = linear.weight
    rows = name in ROW_SPLIT
    n = w.shape[0] if rows else w.shape[1]
    s = slice(rank * n // world, (rank + 1) * n // world)
    w_s = w[s] if rows else w[:, s]
    if not hasattr(linear, "lora_A"):
        return w_s.detach().clone()
    a, b = linear.lora_A, linear.lora_B
    delta = b[s] @ a if rows else b @ a[:, s]  # (B A)[s, :] or (B A)[:, s]
    return (w_s.float() + linear.scaling * delta).to(w.dtype)


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)  # sum the per-rank partial products of a column-split linear
    return output


@contextmanager
def _unsharded(unit: nn.Module):
    """One FSDP2 unit's own parameters whole inside the block (collective), resharded on exit; a plain
    module (at one rank shard_model leaves the model unsharded) as it is."""
    fsdp = hasattr(unit, "unshard")
    if fsdp:
        unit.unshard()
    try:
        yield
    finally:
        if fsdp:
            unit.reshard()


@torch.no_grad()
def tensor_parallel_copy(model: Llama) -> Llama:
    """Collective. The FSDP2-sharded (LoRA) model `model` -> this rank's tensor-parallel Llama for
    decoding, LoRA merged into its slices (the current weights: the round's reference policy).

    Built one FSDP unit at a time (unshard, slice, reshard), so a rank holds its slices plus at most one
    whole block, never the whole model. The copy is a plain Llama whose o_proj / down_proj outputs are
    all_reduced by forward hooks: every forward is a collective, so every rank must decode the same rows
    (tp_generate). model.generate works on it unchanged.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        tp = Llama(tp_args(model.args, world))
    sd = {}
    with _unsharded(model):  # the root unit: embeddings, final norm, lm_head (replicated)
        sd["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        sd["model.norm.weight"] = model.model.norm.weight.detach().clone()
        sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    for i, block in enumerate(model.model.layers):
        with _unsharded(block):
            for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    sd[f"model.layers.{i}.{sub}.{name}.weight"] = _merged_slice(
                        getattr(getattr(block, sub), name), name, rank, world)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                sd[f"model.layers.{i}.{norm}.weight"] = getattr(block, norm).weight.detach().clone()
    tp.load_state_dict(sd, assign=True)  # the slices are on the model's device already: no .to, no copy
    if tp.args.tie_word_embeddings:
        tp.lm_head.weight = tp.model.embed_tokens.weight
    for block in tp.model.layers:
        block.self_attn.o_proj.register_forward_hook(_all_reduce_output)
        block.mlp.down_proj.register_forward_hook(_all_reduce_output)
    return tp.eval().requires_grad_(False)


def tp_generate(tp: Llama, prompts: list[list[int]], gen_batch_size: int, max_new_tokens: int, eos_id: int,
                pad_id: int, **sampling) -> list[list[int]]:
    """Collective. Decode every rank's prompts on the tensor-parallel copy, gen_batch_size rows per batch
    (all ranks decode the same rows together), and return this rank's own rows, in order. `sampling`
    goes to model.generate; a generator must be in the same state on every rank. The rows of rank 0's
    decode are taken by everyone, so a rank can never act on tokens another rank did not see."""
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone = [None] * world
    dist.all_gather_object(everyone, prompts)
    flat = [p for ps in everyone for p in ps]
    out = []
    for i in range(0, len(flat), gen_batch_size):
        # all_ranks_done: the ranks share one decode, so they must stop at the same step
        out += generate(tp, flat[i : i + gen_batch_size], max_new_tokens, eos_id, pad_id,
                        all_ranks_done=True, **sampling)
    box = [out]
    dist.broadcast_object_list(box, src=0)
    start = sum(len(ps) for ps in everyone[:rank])
    return box[0][start : start + len(prompts)]
