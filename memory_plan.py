"""The per-GPU memory plan: what each phase of a run holds on every GPU, from config.json and the flags
alone, before any weight is loaded. `--plan` prints it; `train_proxy.py --sampler auto` picks the sampler
that fits it; the tests hold its activation count to what autograd saves, and `--plan --trace`
(plan_trace.py) runs every phase of the real code on fake tensors to check each peak.
"""

import dataclasses
import math
import os

import torch

import fast
import plan_trace
import ranks
from model import ModelArgs
from tensor_parallel import tp_args, tp_supported


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


def activation_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool,
                     lora_r: int = 8) -> int:
    """Bytes the backward keeps for `tokens` (batch x length) positions through the blocks: a frozen
    16-bit base with LoRA on every linear (lora.LoRALinear: the rank-r branch in the activations' dtype).
    Per token and layer, what autograd saves (the frozen linears keep only their weights): per RMSNorm
    its fp32 input and rsqrt (4 D + 4); the two norm outputs the LoRA branches read (2 D), the SwiGLU
    product down_proj's LoRA reads (F) and the 7 A outputs (7 r), in the base dtype; q, k, v and the
    attention output (2 (H + G) hd in the base dtype; o_proj's LoRA reads the latter as is: SDPA returns
    it in (B, T, H, hd) layout, so the reshape is a view), SDPA's log-sum-exp (H); gate, up and silu
    outputs (3 F in the base dtype); once for all layers, the RoPE cos / sin (2 hd in the base dtype).
    Per layer whatever the token count: the base-dtype casts of each LoRA's A (r x in) and (alpha / r) B
    (out x r). With activation checkpointing only each block's input is kept, plus one block recomputed
    during its backward."""
    D, F, hd = args.dim, args.hidden_dim, args.head_dim
    H, G = args.n_heads, args.n_kv_heads
    per_layer = (2 * (4 * D + 4) + itemsize * (2 * D + F + 7 * lora_r) + itemsize * 2 * (H + G) * hd
                 + 4 * H + itemsize * 3 * F)
    # sum over the 7 linears of in + out
    lora_casts = itemsize * lora_r * (7 * D + 2 * H * hd + 2 * G * hd + 3 * F)
    rope = itemsize * 2 * hd
    if checkpointing:
        return (args.n_layers * itemsize * D + per_layer + rope) * tokens + lora_casts
    return (args.n_layers * per_layer + rope) * tokens + args.n_layers * lora_casts


def backward_transient_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """The backward at its peak, beyond what the forward saved (activation_bytes). In a block, at down_proj:
    the gradient of the SwiGLU product through its base weight and through its LoRA branch, and their
    sum (3 F; the product itself, F, is freed by then), next to the gradient arriving at the block (D),
    all in the base dtype. Without checkpointing every block's activations are still held when the final
    RMSNorm's backward runs: its fp32 input and its fp32 temporaries, five (tokens, D) at once (20 D
    bytes). The loss head's (chunk, V) blocks are gone by then."""
    block = (2 * args.hidden_dim + args.dim) * itemsize
    return tokens * (block if checkpointing else max(block, 20 * args.dim))


def train_transient_bytes(args: ModelArgs, tokens: int, itemsize: int, checkpointing: bool, lora_r: int,
                          chunk_size: int, copy_out: int) -> int:
    """A training step's peak beyond the resident shards and FSDP2's two gathered blocks: the activations
    with, one after the other, the loss head's (chunk, V) blocks or a block's backward, whichever is
    larger; or, earlier in the backward, the moment FSDP2 copies a block's all-gather buffer out into its
    parameters while the next block's all-gather is already in flight (`copy_out`: a third block, 0 at
    one rank), when only what the forward saved is held (with checkpointing, the blocks' inputs)."""
    act = activation_bytes(args, tokens, itemsize, checkpointing, lora_r)
    later = max(logits_chunk_bytes(args, chunk_size, itemsize, tokens),
                backward_transient_bytes(args, tokens, itemsize, checkpointing))
    saved = args.n_layers * itemsize * args.dim * tokens if checkpointing else act
    return max(act + later, saved + copy_out)


def forward_transient_bytes(args: ModelArgs, tokens: int, itemsize: int, world: int = 1,
                            lora: bool = False) -> int:
    """No-grad forward of `tokens` positions (a decode prefill, the cache build): the largest live set
    inside a block, beyond the KV cache. Either at the second RMSNorm (the block's input and residual in
    the base dtype, 2 D, and the norm's two fp32 copies, 8 D bytes) or in the MLP (input, residual and
    normed input, 3 D, with silu(gate), up and their product, 3 F / world, all in the base dtype; LoRA
    on up_proj makes it 4 F: its base output and its branch's output live at their sum); plus the RoPE
    cos / sin (2 hd) of every block."""
    D, F = args.dim, args.hidden_dim // world
    norm = 2 * D * itemsize + 8 * D
    mlp = (3 * D + (4 if lora else 3) * F) * itemsize
    return tokens * (max(norm, mlp) + 2 * args.head_dim * itemsize)


def prefill_mask_bytes(rows: int, length: int) -> int:
    """model.generate's prefill: the (rows, 1, length, length) bool attention mask (causal & key padding)."""
    return rows * length * length


def expanded_kv_bytes(args: ModelArgs, rows: int, positions: int, itemsize: int, world: int = 1) -> int:
    """decode: k and v of one layer expanded from the kv heads to the query heads, as a masked attention
    takes them on a GPU (SDPA's flash and memory-efficient kernels take no GQA with a mask): 2 x (rows,
    n_heads / world, positions, head_dim) in the base dtype, live only during attention. At the last
    decode step (`positions` keys) it could outgrow the prefill's transients."""
    return 2 * rows * (args.n_heads // world) * positions * args.head_dim * itemsize


def tp_build_bytes(args: ModelArgs, itemsize: int, lora_r: int, world: int) -> int:
    """tensor_parallel.tensor_parallel_copy at its peak, beyond the copy's finished slices: while FSDP2
    copies the last block's all-gather buffer out into its parameters, that block (+ its fp32 LoRA)
    twice, its own slices not made yet; or the block once, next to the fp32 temporaries of merging LoRA
    into its largest slice (W, B A, its scaling, the sum: 4 x 4 bytes). A one-rank model is whole: no
    block is gathered."""
    unit = _block_params(args) * itemsize + _lora_params(args, lora_r) * 4 // args.n_layers
    unit *= int(world > 1)
    block_slice = _block_params(tp_args(args, world)) * itemsize
    largest = max(args.hidden_dim, args.n_heads * args.head_dim) * args.dim // world
    return max(2 * unit - block_slice, unit + 16 * largest)


def logits_chunk_bytes(args: ModelArgs, chunk: int, itemsize: int, rows: int) -> int:
    """The fused loss head's (chunk, V) blocks (fast._head_buffers): fp32 logits, plus the matmul's
    output in the base dtype when that is not fp32. chunk 0: fast.default_chunk_size on a GPU; never more
    than the `rows` scored."""
    chunk = min(chunk or fast.default_chunk_size(args.vocab_size, "cuda"), rows)
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
    tokens = 2 * batch_size * max_len  # an alignment step's [y; y_hat]; the warm-up forwards half of it
    positions, prefill = max_len + max_new_tokens, gen_batch_size * max_len
    items = {
        "frozen base shard": frozen,
        "LoRA + grads + Adam": 4 * lora,
        "unsharded root + 2 blocks (training)": gathered_units,
        "activations, no checkpointing": activation_bytes(args, tokens, base_itemsize, False, lora_r),
        "activations, checkpointing": activation_bytes(args, tokens, base_itemsize, True, lora_r),
        "loss logits chunk": logits_chunk_bytes(args, chunk_size, base_itemsize, tokens),
        "backward transients": backward_transient_bytes(args, tokens, base_itemsize,
                                                        activation_checkpointing),
        # plus the LoRA factors generate casts to the base dtype once per call (lora.LoRALinear.freeze_branch)
        "gathered decode: whole model": gathered * (
            (_root_params(args) + args.n_layers * _block_params(args)) * base_itemsize + lora_full)
        + lora_full * base_itemsize // 4,
        "gathered decode: KV cache": kv_cache_bytes(args, gen_batch_size, positions, base_itemsize),
        "gathered decode: prefill": forward_transient_bytes(args, prefill, base_itemsize, lora=True)
        + prefill_mask_bytes(gen_batch_size, max_len),
        "decode: expanded K/V (one layer)": expanded_kv_bytes(args, gen_batch_size, positions, base_itemsize),
    }
    resident = frozen + 4 * lora
    copy_out = gathered * (_block_params(args) * base_itemsize + lora_full // args.n_layers)

    def step(tokens: int) -> int:  # a training step's peak, forwarding `tokens` positions
        return resident + gathered_units + train_transient_bytes(
            args, tokens, base_itemsize, activation_checkpointing, lora_r, chunk_size, copy_out)

    phases = {
        "warm-up step": step(tokens // 2),
        "train step": step(tokens),
        "gathered decode": resident + items["gathered decode: whole model"]
        + items["gathered decode: KV cache"]
        + max(items["gathered decode: prefill"], items["decode: expanded K/V (one layer)"]),
    }
    if tp_supported(args, world):
        items["TP decode: block slices + replicated root"] = (
            _root_params(args) + args.n_layers * _block_params(tp_args(args, world))) * base_itemsize
        items["TP decode: KV cache"] = kv_cache_bytes(args, gen_batch_size, positions, base_itemsize, world)
        items["TP decode: prefill"] = (forward_transient_bytes(args, prefill, base_itemsize, world)
                                       + prefill_mask_bytes(gen_batch_size, max_len))
        items["TP decode: expanded K/V (one layer)"] = expanded_kv_bytes(args, gen_batch_size, positions,
                                                                         base_itemsize, world)
        items["TP decode: building the copy"] = tp_build_bytes(args, base_itemsize, lora_r, world)
        decode = items["TP decode: KV cache"] + max(items["TP decode: prefill"],
                                                    items["TP decode: expanded K/V (one layer)"])
        phases["TP decode"] = (resident + items["TP decode: block slices + replicated root"]
                               + max(items["TP decode: building the copy"], decode))
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
                 cache_batch_size: int = 8, chunk_size: int = 0,
                 activation_checkpointing: bool = False) -> Plan:
    """train_student.py's phases on each of `world` GPUs: the cache build (frozen proxy shard, no grad)
    and the student's training step (batch_size sequences of max_len). proxy None: --alpha 0."""
    items, phases = {}, {}
    if proxy is not None:
        items["proxy shard"] = sum(fsdp_param_bytes(s, world, proxy_itemsize)
                                   for s in param_shapes(proxy).values())
        unsharded = (_root_params(proxy) + 2 * _block_params(proxy)) * proxy_itemsize
        # a one-rank model is not sharded
        items["proxy unsharded root + 2 blocks"] = int(world > 1) * unsharded
        tokens = cache_batch_size * max_len
        items["cache build: forward"] = forward_transient_bytes(proxy, tokens, proxy_itemsize)
        chunk = min(chunk_size or fast.default_chunk_size(proxy.vocab_size, "cuda"), tokens)
        # fast.topk_logps_chunked: the matmul's (chunk, V) product in the proxy's dtype, copied to fp32 logits
        # (the product is freed), then logsumexp's fp32 temporary beside them; the output weight is used as is
        items["cache build: logits chunk"] = chunk * proxy.vocab_size * max(proxy_itemsize + 4, 2 * 4)
        # the head runs after the blocks, on the final hidden states and their norm's input (2 D per token)
        head = items["cache build: logits chunk"] + 2 * tokens * proxy.dim * proxy_itemsize
        phases["cache build"] = (items["proxy shard"] + items["proxy unsharded root + 2 blocks"]
                                 + max(items["cache build: forward"], head))
    shapes = param_shapes(student, lora_r)
    frozen = sum(fsdp_param_bytes(s, world, base_itemsize) for k, s in shapes.items() if ".lora_" not in k)
    lora = sum(fsdp_param_bytes(s, world, 4) for k, s in shapes.items() if ".lora_" in k)
    tokens = batch_size * max_len
    items["student frozen base shard"] = frozen
    items["student LoRA + grads + Adam"] = 4 * lora
    unsharded = ((_root_params(student) + 2 * _block_params(student)) * base_itemsize
                 + 2 * _lora_params(student, lora_r) * 4 // student.n_layers)
    items["student unsharded root + 2 blocks"] = int(world > 1) * unsharded  # a one-rank model is not sharded
    items["student activations, no checkpointing"] = activation_bytes(
        student, tokens, base_itemsize, False, lora_r)
    items["student activations, checkpointing"] = activation_bytes(
        student, tokens, base_itemsize, True, lora_r)
    items["student loss logits chunk"] = logits_chunk_bytes(student, chunk_size, base_itemsize, tokens)
    items["student backward transients"] = backward_transient_bytes(student, tokens, base_itemsize,
                                                                    activation_checkpointing)
    copy_out = int(world > 1) * (_block_params(student) * base_itemsize
                                 + _lora_params(student, lora_r) * 4 // student.n_layers)
    phases["student step"] = (frozen + 4 * lora + items["student unsharded root + 2 blocks"]
                              + train_transient_bytes(student, tokens, base_itemsize,
                                                      activation_checkpointing, lora_r, chunk_size, copy_out))
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
        i = plan.items
        building = decode == "TP decode" and i["TP decode: building the copy"] >= (
            i["TP decode: KV cache"] + max(i["TP decode: prefill"], i["TP decode: expanded K/V (one layer)"]))
        if decode in over and building:
            lines.append("TP decode does not fit: its peak is building the copy, which --gen_batch_size does "
                         "not change")
        elif decode in over:
            lines.append(f"{decode} does not fit: lower --gen_batch_size "
                         f"(its KV cache and prefill scale with it)")
    return "\n".join(lines)


def gpu_budget(gpu_memory_gib: float, device: torch.device | None = None) -> int:
    """Bytes per GPU the plan is held against: the flag, else the run's GPU (None: this machine's first, for
    --plan), else 0 (unknown: a CPU run)."""
    if gpu_memory_gib:
        return int(gpu_memory_gib * GiB)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    return (torch.cuda.get_device_properties(device).total_memory
            if device is not None and device.type == "cuda" else 0)


def print_plan(cfg, memory_plan, title: str, trace=None) -> None:
    """--plan, before any process group or weight (config.json and the flags only): rank 0 prints
    memory_plan(cfg, world) for --plan_world_size GPUs (default: this launch's world size); a bad path
    stops every rank with one line, as the training run itself would. trace (--trace): trace(cfg, world)
    -> {phase: plan_trace.Traced}, printed beside the plan by rank 0 (plan_trace.report)."""
    world = cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        plan = memory_plan(cfg, world)
    except (ValueError, OSError, KeyError) as e:
        ranks.fail(rank, f"bad input: {e}")
    if rank == 0:
        print(format_plan(plan, f"{title}, {world} GPUs"), flush=True)
        if trace is not None:
            try:
                traced = trace(cfg, world)
            except plan_trace.Unavailable as e:
                ranks.fail(rank, str(e))
            print(plan_trace.report(plan, traced, world))
