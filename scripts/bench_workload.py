"""What scripts/benchmark.py times, and how, shared by its --compare_hf half (compare_hf.py): the
configs, the LoRA model on a random base, random batches and top-10 cache, and the timer."""

import time

import torch

import lora
import sharding
from model import Llama, ModelArgs

CONFIGS = {
    # the demo's proxy shape (scripts/demo_pipeline.py's PROXY)
    "tiny": dict(args=dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=320,
                           max_seq_len=1024),
                 cpu=dict(B=16, T=128, prompt=32, new=64), cuda=dict(B=64, T=128, prompt=32, new=64)),
    # ~155M parameters, a Llama-2 vocabulary and GQA: big enough that matmuls dominate
    "mid": dict(args=dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=2816, vocab_size=32000,
                          max_seq_len=1024),
                cpu=dict(B=2, T=512, prompt=128, new=32), cuda=dict(B=8, T=1024, prompt=256, new=128)),
}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device, warmup: bool = True) -> float:
    """Seconds per call of fn, after one untimed warm-up call (unless warmup=False)."""
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def lora_model(args: ModelArgs, dtype, device, base: Llama | None = None):
    torch.manual_seed(0)
    model = Llama(args).to(dtype) if base is None else base
    lora.apply_lora(model, r=8, alpha=16)
    model.lora_config = dict(r=8, alpha=16, dropout=0.0, base="benchmark")
    model = sharding.shard_model(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def batch(B: int, T: int, prompt: int, vocab: int, device, n: int | None = None) -> dict:
    """data.make_batch's fields for B random sequences of T tokens, the first `prompt` masked; n: the
    rows whose response tokens the step's divisor counts (the chosen half of a stage-2 batch)."""
    ids = torch.randint(4, vocab, (B, T))
    labels = ids.clone()
    labels[:, :prompt] = -100
    n = B if n is None else n
    return {"input_ids": ids.to(device), "labels": labels.to(device), "labels_cpu": labels, "n": n,
            "n_tokens": n * (T - prompt), "n_rows": B * (T - prompt), "n_fwd": float(B * T),
            "ids": list(range(n))}


class RandomCache:
    """train_student's ProxyCache interface over random top-10 rows, in memory."""

    def __init__(self, n_tokens: int, vocab: int, k: int = 10):
        self.ids = torch.randint(0, vocab, (n_tokens, k), dtype=torch.int32)
        self.lps = torch.log_softmax(torch.randn(n_tokens, k + 1), -1)[:, :k].half()

    def rows(self, ids):
        return [(self.ids, self.lps) for _ in ids]
