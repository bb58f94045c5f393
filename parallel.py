"""What makes a 70B proxy fit 8 x 80 GB: tensor-parallel sampling for the round's reference pass, per-rank
streaming loads and exports of safetensors checkpoints, and the memory plan that says which sampler
a run can afford before any weight is loaded.

Tensor parallelism (Megatron, Shoeybi et al. 2019; gpt-fast's tp.py is the model of size): every rank
holds a plain Llama of 1/world the width. q/k/v and gate/up keep 1/world of their output rows (whole
heads), o_proj and down_proj 1/world of their input columns, so a block needs one all_reduce after
attention and one after the MLP, and each rank's KV cache holds only its own heads. Embeddings, final
norm and lm_head are replicated (1 GB at 70B), so the logits are whole on every rank.

train_proxy.py, train_student.py and plumbing.py (process group, FSDP2 sharding, checkpoints) import this module.
"""
import dataclasses
import math
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import fast
from model import Llama, ModelArgs, commit_shards, generate, read_hf_config, shard_file_names, weight_files

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
        raise ValueError(f"tensor-parallel decoding needs n_kv_heads={args.n_kv_heads}, n_heads={args.n_heads} "
                         f"and hidden_dim={args.hidden_dim} divisible by the world size {world}")
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
    device = next(model.parameters()).device
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
                    sd[f"model.layers.{i}.{sub}.{name}.weight"] = _merged_slice(getattr(getattr(block, sub), name), name, rank, world)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                sd[f"model.layers.{i}.{norm}.weight"] = getattr(block, norm).weight.detach().clone()
    tp.load_state_dict(sd, assign=True)
    if tp.args.tie_word_embeddings:
        tp.lm_head.weight = tp.model.embed_tokens.weight
    for block in tp.model.layers:
        block.self_attn.o_proj.register_forward_hook(_all_reduce_output)
        block.mlp.down_proj.register_forward_hook(_all_reduce_output)
    return tp.to(device).eval().requires_grad_(False)


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
        out += generate(tp, flat[i : i + gen_batch_size], max_new_tokens, eos_id, pad_id, all_ranks_done=True, **sampling)
    box = [out]
    dist.broadcast_object_list(box, src=0)
    start = sum(len(ps) for ps in everyone[:rank])
    return box[0][start : start + len(prompts)]


# ---------------------------------------------------------------------------------------------------
# per-rank streaming of safetensors checkpoints


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
        raise ValueError(f"{ckpt_dir}: checkpoint does not match config.json: missing {sorted(expected - set(files))[:8]}, "
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
def save_merged(base_dir: str, lora_sd: dict[str, torch.Tensor], scaling: float, out_dir: str, dtype: torch.dtype,
                max_shard_size: int = 5 * 2**30) -> None:
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


# ---------------------------------------------------------------------------------------------------
# memory plan: per-GPU bytes of each phase, from config.json and the flags alone

GiB = 2**30


def fsdp_param_bytes(shape: tuple[int, ...], world: int, itemsize: int) -> int:
    """Bytes FSDP2 allocates per rank for one parameter: dim 0 padded to a multiple of world, then split."""
    return -(-shape[0] // world) * math.prod(shape[1:]) * itemsize


def param_shapes(args: ModelArgs, lora_r: int = 0) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, as Llama(args) (+ lora.apply_lora with rank lora_r) holds them."""
    D, hd, F = args.dim, args.head_dim, args.hidden_dim
    lin = {"self_attn.q_proj": (args.n_heads * hd, D), "self_attn.k_proj": (args.n_kv_heads * hd, D),
           "self_attn.v_proj": (args.n_kv_heads * hd, D), "self_attn.o_proj": (D, args.n_heads * hd),
           "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    shapes = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, D)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (D,)
        for name, (out, inp) in lin.items():
            shapes[p + name + ".weight"] = (out, inp)
            if lora_r:
                shapes[p + name + ".lora_A"] = (lora_r, inp)
                shapes[p + name + ".lora_B"] = (out, lora_r)
    return shapes


def _block_params(args: ModelArgs) -> int:
    D, hd, F = args.dim, args.head_dim, args.hidden_dim
    return 2 * D * (args.n_heads + args.n_kv_heads) * hd + 3 * D * F + 2 * D


def _root_params(args: ModelArgs) -> int:
    return args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2) + args.dim


def _lora_params(args: ModelArgs, r: int) -> int:
    return sum(math.prod(s) for k, s in param_shapes(args, r).items() if ".lora_" in k)


def kv_cache_bytes(args: ModelArgs, rows: int, positions: int, itemsize: int, world: int = 1) -> int:
    """model.KVCache: k and v of every layer, (rows, kv heads / world, positions, head_dim)."""
    return 2 * args.n_layers * rows * (args.n_kv_heads // world) * positions * args.head_dim * itemsize


def activation_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool, lora_r: int = 8) -> int:
    """Bytes the backward keeps for `tokens` (batch x length) positions through the blocks: a frozen
    16-bit base with LoRA on every linear (lora.LoRALinear: the rank-r branch in the activations' dtype).
    Per token and layer, what autograd saves (the frozen linears keep only their weights): per RMSNorm
    its fp32 input and rsqrt (4 D + 4); the two norm outputs the LoRA branches read (2 D), the SwiGLU
    product down_proj's LoRA reads (F) and the 7 A outputs (7 r), in the base dtype; q, k, v and the
    attention output (2 (H + G) hd in the base dtype; o_proj's LoRA reads the latter as is: SDPA returns
    it in (B, T, H, hd) layout, so the reshape is a view), SDPA's log-sum-exp (H); gate, up and silu
    outputs (3 F in the base dtype); once for all layers, the RoPE cos / sin (2 hd in the base dtype). Per layer
    whatever the token count: the base-dtype casts of each LoRA's A (r x in) and (alpha / r) B (out x r).
    With activation checkpointing only each block's input is kept, plus one block recomputed during its
    backward."""
    D, F, hd = args.dim, args.hidden_dim, args.head_dim
    H, G = args.n_heads, args.n_kv_heads
    per_layer = (2 * (4 * D + 4) + itemsize * (2 * D + F + 7 * lora_r) + itemsize * 2 * (H + G) * hd
                 + 4 * H + itemsize * 3 * F)
    lora_casts = itemsize * lora_r * (7 * D + 2 * H * hd + 2 * G * hd + 3 * F)  # sum over the 7 linears of in + out
    rope = itemsize * 2 * hd
    if checkpointing:
        return (args.n_layers * itemsize * D + per_layer + rope) * tokens + lora_casts
    return (args.n_layers * per_layer + rope) * tokens + args.n_layers * lora_casts


def forward_transient_bytes(args: ModelArgs, tokens: int, itemsize: int, world: int = 1) -> int:
    """No-grad forward of `tokens` positions (a decode prefill): the largest live set inside one block,
    the MLP's gate, up, silu and product (4 F / world) plus the residual stream and norm (fp32 copies)."""
    return tokens * (4 * args.hidden_dim // world * itemsize + 3 * args.dim * 4)


def logits_chunk_bytes(args: ModelArgs, chunk: int, itemsize: int) -> int:
    """The fused loss head's (chunk, V) blocks (fast._head_buffers): fp32 logits, plus the matmul's
    output in the base dtype when that is not fp32. chunk 0: fast.default_chunk_size on a GPU."""
    chunk = chunk or fast.default_chunk_size(args.vocab_size, "cuda")
    return chunk * args.vocab_size * (4 + (itemsize if itemsize != 4 else 0))


@dataclasses.dataclass
class Plan:
    """Per-GPU bytes of each phase (resident items add up; `phases` are the peaks) and the sampler."""
    items: dict[str, int]
    phases: dict[str, int]
    sampler: str  # what --sampler auto picks
    budget: int  # bytes per GPU the pick was made against (0 = unknown: gathered)

    def fits(self, phase: str) -> bool:
        """Whether a phase's peak stays within 90% of the budget (always, when the budget is unknown)."""
        return not self.budget or self.phases[phase] <= 0.9 * self.budget


def plan_proxy(args: ModelArgs, world: int, *, base_itemsize: int = 2, lora_r: int = 8, batch_size: int = 4,
               max_len: int = 1024, gen_batch_size: int = 32, max_new_tokens: int = 512, chunk_size: int = 0,
               activation_checkpointing: bool = False, budget: int = 0) -> Plan:
    """train_proxy.py's phases on each of `world` GPUs. Training forwards [y; y_hat]: 2 x batch_size
    sequences of max_len. The decode KV cache is sized for a full prompt (max_len) + max_new_tokens."""
    shapes = param_shapes(args, lora_r)
    frozen = sum(fsdp_param_bytes(s, world, base_itemsize) for k, s in shapes.items() if ".lora_" not in k)
    lora = sum(fsdp_param_bytes(s, world, 4) for k, s in shapes.items() if ".lora_" in k)
    lora_full = _lora_params(args, lora_r) * 4
    # FSDP2 holds the root unit (embeddings, lm_head) unsharded through a step and gathers up to two
    # blocks at once (the running one and the prefetched next); a one-rank model is not sharded at all
    gathered = int(world > 1)
    gathered_units = gathered * ((_root_params(args) + 2 * _block_params(args)) * base_itemsize
                                 + 2 * lora_full // args.n_layers)
    tokens = 2 * batch_size * max_len
    positions = max_len + max_new_tokens
    items = {
        "frozen base shard": frozen,
        "LoRA + grads + Adam": 4 * lora,
        "unsharded root + 2 blocks (training)": gathered_units,
        "activations, no checkpointing": activation_bytes(args, tokens, base_itemsize, False, lora_r),
        "activations, checkpointing": activation_bytes(args, tokens, base_itemsize, True, lora_r),
        "loss logits chunk": logits_chunk_bytes(args, chunk_size, base_itemsize),
        # plus the LoRA factors generate casts to the base dtype once per call (lora.LoRALinear.freeze_branch)
        "gathered decode: whole model": gathered * ((_root_params(args) + args.n_layers * _block_params(args))
                                                    * base_itemsize + lora_full) + lora_full * base_itemsize // 4,
        "gathered decode: KV cache": kv_cache_bytes(args, gen_batch_size, positions, base_itemsize),
        "gathered decode: prefill": forward_transient_bytes(args, gen_batch_size * max_len, base_itemsize),
    }
    resident = frozen + 4 * lora
    act = items["activations, checkpointing" if activation_checkpointing else "activations, no checkpointing"]
    phases = {
        "train step": resident + gathered_units + act + items["loss logits chunk"],
        "gathered decode": resident + items["gathered decode: whole model"] + items["gathered decode: KV cache"]
        + items["gathered decode: prefill"],
    }
    if tp_supported(args, world):
        items["TP decode: block slices + replicated root"] = (
            _root_params(args) + args.n_layers * _block_params(tp_args(args, world))) * base_itemsize
        items["TP decode: KV cache"] = kv_cache_bytes(args, gen_batch_size, positions, base_itemsize, world)
        items["TP decode: prefill"] = forward_transient_bytes(args, gen_batch_size * max_len, base_itemsize, world)
        # while the copy is built: one unsharded block (+ its LoRA) next to the slices
        build = _block_params(args) * base_itemsize + lora_full // args.n_layers
        phases["TP decode"] = resident + items["TP decode: block slices + replicated root"] + max(
            build, items["TP decode: KV cache"] + items["TP decode: prefill"])
    # the reference pass also scores [y; y_hat] teacher-forced, without grad: under the train step's peak
    # auto: the whole model per GPU when it fits in 90% of the budget (the CUDA context and allocator
    # fragmentation take the rest), else tensor-parallel where the heads divide. Never at one rank, where
    # the tensor-parallel copy is a second whole model next to the first
    sampler = "gathered"
    if budget and phases["gathered decode"] > 0.9 * budget and "TP decode" in phases and world > 1:
        sampler = "tensor_parallel"
    return Plan(items, phases, sampler, budget)


def plan_student(proxy: ModelArgs | None, student: ModelArgs, world: int, *, proxy_itemsize: int = 2,
                 base_itemsize: int = 2, lora_r: int = 8, batch_size: int = 4, max_len: int = 1024,
                 cache_batch_size: int = 8, chunk_size: int = 0, activation_checkpointing: bool = False) -> Plan:
    """train_student.py's phases on each of `world` GPUs: the cache build (frozen proxy shard, no grad)
    and the student's training step (batch_size sequences of max_len). proxy None: --alpha 0."""
    items, phases = {}, {}
    if proxy is not None:
        items["proxy shard"] = sum(fsdp_param_bytes(s, world, proxy_itemsize) for s in param_shapes(proxy).values())
        unsharded = (_root_params(proxy) + 2 * _block_params(proxy)) * proxy_itemsize
        items["proxy unsharded root + 2 blocks"] = int(world > 1) * unsharded  # a one-rank model is not sharded
        items["cache build: forward"] = forward_transient_bytes(proxy, cache_batch_size * max_len, proxy_itemsize)
        chunk = chunk_size or fast.default_chunk_size(proxy.vocab_size, "cuda")
        # fast.topk_logps_chunked: the matmul's (chunk, V) product in the proxy's dtype, copied to fp32 logits
        # (the product is freed), then logsumexp's fp32 temporary beside them; the output weight is used as is
        items["cache build: logits chunk"] = chunk * proxy.vocab_size * max(proxy_itemsize + 4, 2 * 4)
        phases["cache build"] = sum(items.values())
    shapes = param_shapes(student, lora_r)
    frozen = sum(fsdp_param_bytes(s, world, base_itemsize) for k, s in shapes.items() if ".lora_" not in k)
    lora = sum(fsdp_param_bytes(s, world, 4) for k, s in shapes.items() if ".lora_" in k)
    tokens = batch_size * max_len
    items["student frozen base shard"] = frozen
    items["student LoRA + grads + Adam"] = 4 * lora
    unsharded = ((_root_params(student) + 2 * _block_params(student)) * base_itemsize
                 + 2 * _lora_params(student, lora_r) * 4 // student.n_layers)
    items["student unsharded root + 2 blocks"] = int(world > 1) * unsharded  # a one-rank model is not sharded
    items["student activations, no checkpointing"] = activation_bytes(student, tokens, base_itemsize, False, lora_r)
    items["student activations, checkpointing"] = activation_bytes(student, tokens, base_itemsize, True, lora_r)
    items["student loss logits chunk"] = logits_chunk_bytes(student, chunk_size, base_itemsize)
    act = items["student activations, checkpointing" if activation_checkpointing else "student activations, no checkpointing"]
    phases["student step"] = (frozen + 4 * lora + items["student unsharded root + 2 blocks"] + act
                              + items["student loss logits chunk"])
    return Plan(items, phases, "", 0)


def format_plan(plan: Plan, title: str) -> str:
    lines = [title, "", "| per GPU | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v / GiB:.2f} |" for k, v in plan.items.items()]
    over = {k for k in plan.phases if not plan.fits(k)}
    lines += [f"| **peak: {k}** | **{v / GiB:.2f}**{' over 90% of the GPU' if k in over else ''} |"
              for k, v in plan.phases.items()]
    if plan.sampler:
        budget = f"{plan.budget / GiB:.0f} GiB per GPU" if plan.budget else "no GPU memory limit known"
        lines += ["", f"--sampler auto picks: {plan.sampler} ({budget})"]
        decode = "TP decode" if plan.sampler == "tensor_parallel" else "gathered decode"
        if decode in over:
            lines.append(f"{decode} does not fit: lower --gen_batch_size (its KV cache and prefill scale with it)")
    return "\n".join(lines)


def gpu_budget(gpu_memory_gib: float, device: torch.device | None = None) -> int:
    """Bytes per GPU the plan is held against: the flag, else the run's GPU (None: this machine's first, for
    --plan), else 0 (unknown: a CPU run)."""
    if gpu_memory_gib:
        return int(gpu_memory_gib * GiB)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    return torch.cuda.get_device_properties(device).total_memory if device is not None and device.type == "cuda" else 0
