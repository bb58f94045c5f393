"""memory_plan.py: the per-GPU plan of each phase, from config.json and the flags alone."""

import torch

import lora
import memory_plan
from model import Llama, ModelArgs, rope_cos_sin


def test_plan_70b_fits_80gb_with_tensor_parallel_sampling():
    """The paper's setting: every phase of the picked sampler under 80 GiB per GPU on 8 GPUs; the
    gathered decode (the whole bf16 proxy per GPU) does not fit, so auto picks tensor_parallel."""
    plan = memory_plan.plan_proxy(ModelArgs.from_name("llama-2-70b"), 8, batch_size=2,
                                  activation_checkpointing=True, budget=80 * memory_plan.GiB)
    assert plan.sampler == "tensor_parallel"
    assert plan.phases["gathered decode"] > 80 * memory_plan.GiB
    assert max(plan.phases["train step"], plan.phases["TP decode"]) < 80 * memory_plan.GiB
    small = memory_plan.plan_proxy(ModelArgs.from_name("llama-2-7b"), 8, batch_size=2,
                                   budget=80 * memory_plan.GiB)
    assert small.sampler == "gathered"


def test_tensor_parallel_build_does_not_shrink_with_the_decode_batch():
    """On 8 x 40 GiB the 70B tensor-parallel decode peaks while its copy is built (a block gathered twice
    next to the slices), at any --gen_batch_size: the plan says so instead of advising a smaller one."""
    for gen in (1, 8):
        plan = memory_plan.plan_proxy(ModelArgs.from_name("llama-2-70b"), 8, batch_size=2, gen_batch_size=gen,
                                      activation_checkpointing=True, budget=40 * memory_plan.GiB)
        assert plan.sampler == "tensor_parallel" and not plan.fits("TP decode") and plan.fits("train step")
        assert "building the copy" in memory_plan.format_plan(plan, "")


def test_planned_activations_are_the_saved_tensors():
    """The activation plan (no checkpointing, bf16 base, LoRA on every linear) == the bytes of the
    distinct non-weight storages autograd saves in a forward through the blocks (a block input that
    requires grad, as every block's does behind a LoRA layer)."""
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=688, vocab_size=64)
    torch.manual_seed(0)
    model = lora.apply_lora(Llama(args).to(torch.bfloat16), r=8, alpha=16)
    B, T = 2, 64
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), args.head_dim, args.rope_theta)
    x = model.model.embed_tokens(torch.randint(0, 64, (B, T))).detach().requires_grad_()
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # as Llama.forward passes them
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for block in model.model.layers:
            x = block(x, cos, sin)
    assert memory_plan.activation_bytes(args, B * T, 2, checkpointing=False, lora_r=8) == sum(saved.values())
