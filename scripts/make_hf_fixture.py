"""Build testdata/hf_tiny/: a tiny random transformers LlamaForCausalLM and the fp32 logits transformers
itself computes for it, so test_model.py / test_lora.py check parity with HF without transformers installed.

Needs transformers and peft, which are NOT project requirements; use a scratch venv that reuses the
system torch:
    python -m venv --system-site-packages /tmp/hfvenv && /tmp/hfvenv/bin/pip install transformers peft
    /tmp/hfvenv/bin/python scripts/make_hf_fixture.py            # writes testdata/hf_tiny/, prints checks

The model has GQA (4 query heads, 2 kv heads), a non-default rope_theta and untied embeddings; its weights
are redrawn at unit scale (HF's std 0.02 init gives logits ~1e-2, against which a 1e-4 tolerance would
prove little) and its norm weights are random (so the RMSNorm cast order matters).

Files: config.json + model.safetensors (as transformers saves them); reference.safetensors with
  input_ids (2, 12), logits (2, 12, V): plain batch;
  pad_input_ids, pad_mask, pad_position_ids, pad_logits: the same rows, row 1 left-padded by 4;
  adapter_logits: logits of input_ids with the adapter below;
adapter/: a random, nonzero LoRA adapter written by peft itself (adapter_model.safetensors +
adapter_config.json).

Then, the other direction (printed, not stored): our save_pretrained (also with tied embeddings) loads in
transformers, and our save_adapter loads in peft, with the same logits.
"""
import argparse
import os
import shutil
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lora  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def our_logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "testdata", "hf_tiny"))
    out = ap.parse_args().out
    torch.manual_seed(0)

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, rope_theta=500.0, rms_norm_eps=1e-5,
                         max_position_embeddings=128, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # the reference: explicit softmax attention, not SDPA
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)

    shutil.rmtree(out, ignore_errors=True)
    hf.save_pretrained(out)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))

    ids = torch.randint(0, 64, (2, 12))
    pad_ids, pad_mask = ids.clone(), torch.ones_like(ids)
    pad_ids[1, :4], pad_mask[1, :4] = 0, 0
    pad_pos = (pad_mask.cumsum(-1) - 1).clamp(min=0)
    ref = {
        "input_ids": ids,
        "logits": hf_logits(hf, ids),
        "pad_input_ids": pad_ids,
        "pad_mask": pad_mask,
        "pad_position_ids": pad_pos,
        "pad_logits": hf_logits(hf, pad_ids, attention_mask=pad_mask, position_ids=pad_pos),
    }

    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.eval()
    ref["adapter_logits"] = hf_logits(peft_model, ids)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    if os.path.exists(os.path.join(out, "adapter", "README.md")):
        os.remove(os.path.join(out, "adapter", "README.md"))
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({size / 1024:.0f} KiB)")

    # ---- checks (printed): our model against transformers / peft ----
    ours = Llama.from_pretrained(out, dtype=torch.float32)
    print("load HF -> ours: max |logits diff|", (our_logits(ours, ids) - ref["logits"]).abs().max().item())
    lora.load_adapter(ours, os.path.join(out, "adapter"))
    print("peft adapter -> ours:", (our_logits(ours, ids) - ref["adapter_logits"]).abs().max().item())

    tmp = tempfile.mkdtemp()
    for tied in (False, True):
        torch.manual_seed(1)
        args = ModelArgs(**{**ModelArgs.from_name("tiny").__dict__, "rope_theta": 321.0,
                            "tie_word_embeddings": tied})
        m = Llama(args).eval()
        m.save_pretrained(os.path.join(tmp, f"ours{tied}"))
        back = LlamaForCausalLM.from_pretrained(os.path.join(tmp, f"ours{tied}"), dtype=torch.float32).eval()
        print(f"ours (tied={tied}) -> HF: max |logits diff|",
              (hf_logits(back, ids) - our_logits(m, ids)).abs().max().item())

    torch.manual_seed(2)
    lora.apply_lora(m, r=2, alpha=3.0)
    for mod in lora.lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_B, std=0.5)
    lora.save_adapter(os.path.join(tmp, "adapter"), lora.lora_state_dict(m),
                      dict(r=2, alpha=3.0, base="tiny"))
    with_adapter = PeftModel.from_pretrained(back, os.path.join(tmp, "adapter")).eval()
    print("our adapter -> peft: max |logits diff|",
          (hf_logits(with_adapter, ids) - our_logits(m, ids)).abs().max().item())
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
