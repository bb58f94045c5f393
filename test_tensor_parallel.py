"""tensor_parallel.py, sharding.py and memory_plan.py at world size 2 on CPU (gloo): FSDP2 shards over a
mesh of the chosen device; tensor-parallel greedy decode == single-process generate on the same weights
with the LoRA merged, token for token; each rank holds 1/world of the block weights and of the KV cache;
per-rank loading from safetensors gives the checkpoint's values; the memory plan's
parameter bytes are the bytes FSDP2 allocates; the proxy is freed; the streaming merged export equals
the in-memory one; train_proxy.py's two samplers give the same run.

The distributed checks run in this file's own worker (`python -m torch.distributed.run ...
test_tensor_parallel.py <checkpoint dir>`), launched by test_train_proxy.launch with a timeout.
"""
import dataclasses
import gc
import json
import os
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file

import lora
import memory_plan
import ranks
import sharding
import tensor_parallel
from model import KVCache, Llama, ModelArgs, gathered, generate
# world: the fixture
from test_train_proxy import EXACT, adapter, launch, metrics, ok, steps_of, world  # noqa: F401

# tiny with an odd vocabulary: FSDP2 pads embed_tokens / lm_head rows, so the plan must count the padding
ARGS = dataclasses.replace(ModelArgs.from_name("tiny"), vocab_size=65)
PROMPTS = [[[5, 6, 7], [9], [3, 1, 4, 1, 5, 9, 2]], [[10, 11, 12, 13], [8, 8]]]  # rank 0's, rank 1's


def unit_scale(model: Llama) -> Llama:
    """Unit-scale weights (test_model.tiny's reason: at HF's std 0.02 every logit is ~0 and greedy
    decoding is all ties)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            (p.uniform_(0.5, 1.5) if "norm" in n
             else p.normal_(0.0, 1.0 if "embed" in n else p.shape[1] ** -0.5))
    return model


def worker(ckpt: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, world_size, device = ranks.init_distributed()  # the scripts' own choice of device
    torch.manual_seed(0)
    meshes, fully_shard = [], sharding.fully_shard  # every fully_shard gets the mesh of the chosen device
    sharding.fully_shard = lambda module, **kw: meshes.append(kw.get("mesh")) or fully_shard(module, **kw)
    model = sharding.shard_model(sharding.load_lora_model(ckpt, 4, 8.0, 0.0, dtype=torch.float32))
    sharding.fully_shard = fully_shard
    assert len(meshes) == ARGS.n_layers + 1 and all(m is not None and m.device_type == device.type
                                                    for m in meshes)
    # a trained-looking adapter: B != 0 (the same values on every rank, each keeps its rows)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora_B"):
                full = 0.3 * torch.randn(p.shape, generator=g)
                p.to_local().copy_(full[sharding.shard_rows(p.shape[0], rank, world_size)].to(device))
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

    # per-rank loading: every base tensor is the checkpoint's
    ref = Llama.from_pretrained(ckpt, dtype=torch.float32, device=device)
    for k, v in ref.state_dict().items():
        assert torch.equal(full_sd[k].to(device), v), k

    # the plan's parameter bytes are what FSDP2 allocated on this rank, padding included
    plan = memory_plan.plan_proxy(ARGS, world_size, base_itemsize=4, lora_r=4)
    storage = {n: p.to_local().untyped_storage().nbytes() for n, p in model.named_parameters()}
    assert sum(v for n, v in storage.items() if ".lora_" not in n) == plan.items["frozen base shard"]
    assert 4 * sum(v for n, v in storage.items() if ".lora_" in n) == plan.items["LoRA + grads + Adam"]

    # reference: one process, the same weights, LoRA merged
    lora.apply_lora(ref, r=4, alpha=8.0)
    ref.to(device).load_state_dict({k: v for k, v in full_sd.items() if ".lora_" in k}, strict=False)
    lora.merge_lora(ref).eval()
    want = [generate(ref, [p], 8, eos_id=-1, pad_id=0, greedy=True)[0] for p in PROMPTS[rank]]

    # the gathered sampler: inside `gathered` no forward is a collective, so rank 0 may decode its rows
    # one generate call each (3 calls) while rank 1 decodes its two rows in one call
    model.eval()
    with gathered(model):
        got = ([y for p in PROMPTS[0] for y in generate(model, [p], 8, eos_id=-1, pad_id=0, greedy=True)]
               if rank == 0 else generate(model, PROMPTS[1], 8, eos_id=-1, pad_id=0, greedy=True))
    assert got == want, (rank, got, want)

    tpm = tensor_parallel.tensor_parallel_copy(model)
    got = tensor_parallel.tp_generate(tpm, PROMPTS[rank], 2, 8, eos_id=-1, pad_id=0, greedy=True)
    assert got == want, (rank, got, want)
    # an eos (rank 0's first row's third token) that ends some rows early: the shared decode stops together
    eos = ranks.agree(want[0][2])
    got = tensor_parallel.tp_generate(tpm, PROMPTS[rank], 3, 8, eos_id=eos, pad_id=0, greedy=True)
    assert got == [w[: w.index(eos)] if eos in w else w for w in want], rank
    # sampling: ranks with the same generator state draw the same tokens from their (all_reduced) logits
    flat = [p for ps in PROMPTS for p in ps]
    mine = generate(tpm, flat, 8, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(5),
                    all_ranks_done=True)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    assert all(e == everyone[0] for e in everyone)

    # 1/world_size of the block linears and of the KV cache on each rank (the norms are replicated); the plan
    # counts the copy's weights exactly
    def nbytes(m, linears_only):
        return sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                   if n.endswith("_proj.weight") or not linears_only)

    assert world_size * nbytes(tpm, True) == nbytes(ref, True)
    assert nbytes(tpm, False) == plan.items["TP decode: block slices + replicated root"]
    caches = []
    for m in (tpm, ref):
        cache = KVCache(10)
        m(torch.tensor([[1, 2, 3], [4, 5, 6]], device=device), cache=cache)
        caches.append(sum(t.numel() * t.element_size() for d in (cache.k, cache.v) for t in d.values()))
    assert world_size * caches[0] == caches[1] == memory_plan.kv_cache_bytes(ARGS, 2, 10, 4)
    assert caches[0] == memory_plan.kv_cache_bytes(ARGS, 2, 10, 4, world_size)

    # the FSDP model still trains after the copy was built from it (its units were resharded)
    model.train()
    model(torch.tensor([[1, 2, 3]], device=device)).sum().backward()

    # FSDP2 keeps the module in a reference cycle: `del` alone does not free it, the cycle collector does
    del tpm
    probe = weakref.ref(next(model.parameters()))
    del model
    assert probe() is not None
    gc.collect()
    assert probe() is None
    dist.barrier()
    print(f"ok {rank}", flush=True)
    ranks.finish(0)


def test_tensor_parallel_decode_loading_plan_and_free(tmp_path):
    torch.manual_seed(2)
    ckpt = str(tmp_path / "base")
    unit_scale(Llama(ARGS)).save_pretrained(ckpt)
    p = ok(launch([ckpt], nproc=2, script="test_tensor_parallel.py"))
    assert "ok 0" in p.stdout and "ok 1" in p.stdout


def test_streaming_merged_export_equals_in_memory_merge(tmp_path):
    """sharding.save_merged (tensor by tensor, sharded output) == from_pretrained + merge_lora +
    save_pretrained, bitwise, in bf16 (the cast before the fp32 merge is part of the arithmetic)."""
    torch.manual_seed(3)
    base = str(tmp_path / "base")
    Llama(ARGS).save_pretrained(base, max_shard_size=20_000)  # a sharded input
    model = lora.apply_lora(Llama.from_pretrained(base, dtype=torch.bfloat16), r=4, alpha=8.0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_()
    lora_sd = lora.lora_state_dict(model)
    lora.merge_lora(model).save_pretrained(str(tmp_path / "ref"))
    sharding.save_merged(base, lora_sd, 2.0, str(tmp_path / "streamed"), torch.bfloat16,
                         max_shard_size=30_000)
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    with open(tmp_path / "streamed" / "model.safetensors.index.json") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 1
    got = {k: v for name in files for k, v in load_file(str(tmp_path / "streamed" / name)).items()}
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    back = Llama.from_pretrained(str(tmp_path / "streamed"), dtype=torch.bfloat16)
    assert back.args == model.args


@pytest.fixture(scope="module")
def run_samplers(world):  # noqa: F811
    """train_proxy.py at world size 2, fp32 base and greedy y_hat, 2 rounds, once per sampler. Adam, not
    EXACT's SGD: resuming an SGD run fails in torch's set_optimizer_state_dict (an optimizer without
    state tensors), which the resume test below needs."""
    common = world["common"] + EXACT + ["--optimizer", "adam", "--rounds", "2", "--batch_size", "2",
                                        "--gen_batch_size", "3"]
    outs = {}
    for sampler in ("gathered", "tensor_parallel"):
        outs[sampler] = str(world["dir"] / f"sampler_{sampler}")
        ok(launch(common + ["--sampler", sampler, "--out", outs[sampler]]))
    return common, outs


def test_tensor_parallel_run_matches_gathered(run_samplers):
    """The same greedy y_hat from either sampler: the same losses (up to float summation order: TP sums
    o_proj / down_proj partial products across ranks) and the same adapter."""
    _, outs = run_samplers
    assert [metrics(outs[s])[0]["config"]["sampler"] for s in outs] == ["gathered", "tensor_parallel"]
    s_g, s_t = steps_of(outs["gathered"]), steps_of(outs["tensor_parallel"])
    assert [r["step"] for r in s_g] == [r["step"] for r in s_t] and any(r["stage"] == "align" for r in s_g)
    for a, b in zip(s_g, s_t):
        for key in ("loss", "nll", "dpo", "reward_margin"):
            assert ((key in a) == (key in b)
                    and a.get(key, 0) == pytest.approx(b.get(key, 0), rel=1e-5, abs=1e-5)), (a["step"], key)
    a_g, a_t = (adapter(os.path.join(outs["gathered"], "adapter")),
                adapter(os.path.join(outs["tensor_parallel"], "adapter")))
    assert a_g.keys() == a_t.keys()
    for k in a_g:
        torch.testing.assert_close(a_g[k], a_t[k], rtol=1e-4, atol=1e-6)


def test_tensor_parallel_resume_inside_a_round(world, run_samplers):  # noqa: F811
    """Stop after round 1's reference pass and first step, resume: the same steps and adapter, bitwise."""
    common, outs = run_samplers
    ref = outs["tensor_parallel"]
    stop = next(r["step"] for r in steps_of(ref) if r.get("round") == 1)
    out = str(world["dir"] / "sampler_tp_resumed")
    ok(launch(common + ["--sampler", "tensor_parallel", "--out", out, "--stop_after_steps", str(stop)]))
    assert os.listdir(os.path.join(out, "rounds"))
    ok(launch(common + ["--sampler", "tensor_parallel", "--out", out, "--resume"]))
    assert ([(r["step"], r.get("loss")) for r in steps_of(out)]
            == [(r["step"], r.get("loss")) for r in steps_of(ref)])
    a, b = adapter(os.path.join(ref, "adapter")), adapter(os.path.join(out, "adapter"))
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    worker(sys.argv[1])
