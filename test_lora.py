"""lora.py properties: a fresh adapter is a no-op, merge is W + (alpha/r) B A and idempotent, merged ==
unmerged, the fp32-adapter-on-bf16-base dtype mix, PEFT-layout files (round trip, and an adapter written by
peft itself, from scripts/make_hf_fixture.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from model import Llama
from test_model import HF_TINY, tiny


def with_random_lora(seed=0, r=4, alpha=8.0, dtype=torch.float32, **kw) -> Llama:
    model = lora.apply_lora(tiny(seed=seed, dtype=dtype), r=r, alpha=alpha, **kw)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.3)  # B = 0 after init: make the adapter do something
    return model


def test_fresh_lora_model_equals_base():
    base = tiny(seed=1)
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = base(tokens)
        model = lora.apply_lora(base, r=4, alpha=8)
        assert torch.equal(model(tokens), want)


def test_apply_lora_freezes_base_and_keeps_hf_names():
    model = lora.apply_lora(tiny(dtype=torch.bfloat16), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith((".lora_A", ".lora_B"))}
    assert len(trainable) == 2 * 7 * model.args.n_layers
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, lora.LoRALinear) and not isinstance(model.lm_head, lora.LoRALinear)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == q.lora_B.dtype == torch.float32
    assert q.lora_A.shape == (4, 32) and q.lora_B.shape == (32, 4) and not q.lora_B.any()


def test_bf16_base_fp32_adapter_forward_and_grads():
    model = with_random_lora(dtype=torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 6))
    logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.grad is not None:
            assert p.grad.dtype == torch.float32


def test_frozen_branch_equals_live_casts_until_thawed():
    """freeze_branch (generate casts A and (alpha / r) B once per call) gives bitwise the per-forward
    casts' logits, and after thaw_branch the layer reads its parameters again."""
    model = with_random_lora(dtype=torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        want = model(tokens)
        for m in lora.lora_modules(model).values():
            m.freeze_branch(torch.bfloat16)
        assert torch.equal(model(tokens), want)
        for m in lora.lora_modules(model).values():
            m.thaw_branch()
            m.lora_B.mul_(2)
        assert not torch.equal(model(tokens), want)


def test_merge_formula_and_idempotence():
    model = with_random_lora(r=4, alpha=6.0)
    m = model.model.layers[1].mlp.down_proj
    w = m.weight.detach().clone()
    want = w + (6.0 / 4) * m.lora_B.detach() @ m.lora_A.detach()
    lora.merge_lora(model)
    torch.testing.assert_close(m.weight.detach(), want)
    lora.merge_lora(model)
    torch.testing.assert_close(m.weight.detach(), want)  # a second merge changes nothing


def test_merged_equals_unmerged_and_mode_switch_never_merges():
    model = with_random_lora(seed=2)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        unmerged = model(tokens)
        model.train().eval()
        assert not any(m.merged for m in lora.lora_modules(model).values())
        lora.merge_lora(model)
        torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode():
    model = with_random_lora(seed=3, dropout=0.5)
    tokens = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), model(tokens))
        assert not torch.equal(model.train()(tokens), model.eval()(tokens))


def test_adapter_save_load_round_trip(tmp_path):
    model = with_random_lora(seed=4, r=4, alpha=8.0)
    sd = lora.lora_state_dict(model)
    lora.save_adapter(str(tmp_path), sd, dict(r=4, alpha=8.0, dropout=0.0, base="/some/base"))

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{k}.weight" for k in sd}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert (sorted(cfg["target_modules"]) == sorted(lora.TARGETS)
            and cfg["base_model_name_or_path"] == "/some/base")
    assert not list(tmp_path.glob("*.tmp"))

    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(tokens)
        for prepare in (lambda m: lora.apply_lora(m, r=4, alpha=8.0), lambda m: m):  # LoRA applied or not yet
            fresh = prepare(tiny(seed=4))
            lora.load_adapter(fresh, str(tmp_path))
            assert torch.equal(fresh(tokens), want)


def test_load_adapter_accepts_our_parameter_names(tmp_path):
    model = with_random_lora(seed=5)
    lora.save_adapter(str(tmp_path), lora.lora_state_dict(model), dict(r=4, alpha=8.0))
    # same directory, tensors re-keyed by our own names (as get_model_state_dict gives them)
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()},
              str(tmp_path / "adapter_model.safetensors"))
    fresh = lora.load_adapter(tiny(seed=5), str(tmp_path))
    for n, p in lora.lora_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[n], p), n


def test_load_adapter_refuses_mismatches(tmp_path):
    model = with_random_lora(seed=6, r=4, alpha=8.0)
    lora.save_adapter(str(tmp_path), lora.lora_state_dict(model), dict(r=4, alpha=8.0))
    with pytest.raises(ValueError):
        lora.load_adapter(lora.apply_lora(tiny(), r=2, alpha=8.0), str(tmp_path))
    partial = lora.apply_lora(tiny(), r=4, alpha=8.0, targets=("q_proj",))  # fewer LoRA modules
    with pytest.raises(KeyError):
        lora.load_adapter(partial, str(tmp_path))


def test_peft_written_adapter_gives_peft_logits():
    """testdata/hf_tiny/adapter was saved by peft itself; adapter_logits are peft's own output."""
    ref = load_file(os.path.join(HF_TINY, "reference.safetensors"))
    model = Llama.from_pretrained(HF_TINY, dtype=torch.float32).eval()
    lora.load_adapter(model, os.path.join(HF_TINY, "adapter"))
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert (ref["adapter_logits"] - ref["logits"]).abs().max() > 0.1  # the adapter matters
    assert (logits - ref["adapter_logits"]).abs().max() <= 1e-4


def test_save_pretrained_of_merged_model_drops_lora_keys(tmp_path):
    model = with_random_lora(seed=7)
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(str(tmp_path))
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        want = model(tokens)
        lora.merge_lora(model).save_pretrained(str(tmp_path))
        back = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
        torch.testing.assert_close(back(tokens), want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in back.state_dict())
