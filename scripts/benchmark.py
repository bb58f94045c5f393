r"""Speed and memory of Proxy-KD's hot loops on the machine at hand (a benchmark, not a test).

    python scripts/benchmark.py                   # tiny + mid configs; CPU here, CUDA when present
    python scripts/benchmark.py --configs tiny    # quick look

Every number comes from the training scripts' own functions on a one-rank model (sharding.shard_model,
which at one rank leaves it unsharded; frozen base + fp32 LoRA r 8 on every linear), random weights
and tokens:
  proxy step    train_proxy.train_step in stage 2: one forward / backward over [y; y_hat] (2B sequences)
                for Eq. 6 = NLL + DPO, Adam on the LoRA tensors. tokens/s counts all 2B*T tokens.
  student step  train_student.student_step: Eq. 11 = NLL + alpha * w * KL against a top-10 cache
                (random, in memory), chunked over the vocabulary. tokens/s counts B*T.
  decode        model.generate: batched KV-cache sampling of B prompts (a round's reference pass),
                new tokens/s.
  cache         train_student.build_cache writing real part files: bytes per cached response token.
  ref. pass     the round's reference-pass decode at --prepass_world ranks (a torchrun launch of this script):
                new tokens/s per rank of the gathered sampler (whole model per rank, each rank decodes its
                own B prompts) and of the tensor-parallel one (tensor_parallel.tensor_parallel_copy: all ranks
                decode all world x B prompts together), and their ratio, in the same run.
Peak memory: on CUDA torch.cuda.max_memory_allocated per phase; on CPU the process's peak resident set
(VmHWM, reset before each phase through /proc/self/clear_refs), which includes Python and torch itself.
MFU (CUDA only): model FLOPs / (seconds * --peak_tflops, by default the GPU's bf16 dense peak by its name).
A training step (train_step_flops) costs 4 FLOPs per weight and position it multiplies (forward 2 plus the
input-gradient half of the backward; the frozen base needs no weight gradients): the block linears at
every position, the output head only at the scored (response) positions, where the fused heads run it;
plus attention's scores and values, 3 x 4 * H * hd per layer per (query, key) pair the causal mask allows
(about T^2 / 2 per sequence). Decode: 2 FLOPs per weight (block linears and head) per new token.
Writes a markdown table to stdout and --out (JSON with the same numbers next to it). The configs, the model,
the batches and the timer are in bench_workload.py, shared with --compare_hf (compare_hf.py).

    python scripts/benchmark.py --compare_hf --configs mid     # ours vs transformers + peft, same process

--compare_hf (needs transformers and peft, which are not requirements: a scratch virtualenv) builds
transformers' LlamaForCausalLM (SDPA attention) with the same random base weights and peft LoRA with the
same r, alpha and targets (peft keeps the adapters in fp32 on a bf16 base, as we do), the same optimizer,
batch and prompt mask, and times side by side, interleaved (ours, theirs, ours, ...) so that contention on
a shared machine hits both alike, --repeats times; the table shows medians and their ratio:
  stage-1 NLL      ours: train_proxy.train_step (Eq. 3); theirs: model(input_ids, labels=labels).loss.
  stage-2 NLL+DPO  ours: train_step over [y; y_hat]; theirs: full logits -> proxykd.sequence_logps ->
                   proxykd.proxy_loss (the same Eq. 6, from (2B, T, V) fp32 logits as TRL computes them).
  student          ours: train_student.student_step; theirs: full logits -> proxykd.student_loss.
  sampling         ours: model.generate; theirs: generate(do_sample=True, top_k=0), both B x new tokens.
On the CPU the ratios depend on glibc's allocator. By default it serves a large block that does not fit
in free heap memory (above an adaptive threshold of at most 32 MiB) with fresh pages from the kernel,
page-faulted and zeroed on every allocation. transformers' (B, T, V) logits are such blocks, so its step
time moves by up to 40% between runs (ours allocates nothing that large). Run it again with freed memory
kept in the process to compare the two without that cost:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python scripts/benchmark.py --compare_hf ...

The table header records the allocator settings of each run, and the table the minor page faults per call
(medians), which show the effect directly.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# bench_workload and compare_hf, also when this file is loaded by path (the tests)
if os.path.join(ROOT, "scripts") not in sys.path:
    sys.path.append(os.path.join(ROOT, "scripts"))

import torch  # noqa: E402

import ranks  # noqa: E402
import tensor_parallel  # noqa: E402
import train_proxy as tp  # noqa: E402
import train_student as ts  # noqa: E402
from bench_workload import CONFIGS, RandomCache, batch, lora_model, sync, timed  # noqa: E402
from model import ModelArgs, gathered, generate  # noqa: E402
from run import Run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--dtypes", default="",
                   help="base dtypes (default: bfloat16 on CUDA, float32,bfloat16 on CPU)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="accelerator peak for MFU (default: peak_tflops of the GPU's name, bf16 dense)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "benchmark.md"))
    p.add_argument("--prepass_world", type=int, default=2,
                   help="ranks of the reference-pass sampler comparison (0 = skip it)")
    p.add_argument("--prepass_only", action="store_true", help=argparse.SUPPRESS)  # the torchrun half
    p.add_argument("--compare_hf", action="store_true",
                   help="time transformers + peft side by side instead (see the module docstring)")
    p.add_argument("--repeats", type=int, default=3,
                   help="--compare_hf: interleaved rounds (median reported)")
    return p.parse_args(argv)


class Peak:
    """Peak memory of one phase (see the module docstring)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def gib(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        try:
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            return kb / 2**20
        except (OSError, StopIteration):
            return None


def matmul_params(args: ModelArgs) -> int:
    """The parameters a token multiplies through: every block linear and the output head. The embedding
    is a lookup (no FLOPs), so MFU leaves it out unless it is tied to the head (then counted once, as
    the head); the norms are elementwise."""
    blocks = args.n_layers * (args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
                              + 3 * args.dim * args.hidden_dim)
    return blocks + args.vocab_size * args.dim


def train_step_flops(args: ModelArgs, labels: torch.Tensor) -> int:
    """FLOPs of one LoRA training step (frozen base) over a batch whose labels (rows, T) mark the scored
    positions (-100 elsewhere): position t is scored when labels[:, t + 1] is a response token."""
    head = args.vocab_size * args.dim
    rows, T = labels.shape
    scored = int((labels[:, 1:] != -100).sum())
    causal_pairs = rows * T * (T + 1) // 2
    attention = 3 * 4 * args.n_layers * args.n_heads * args.head_dim * causal_pairs
    return 4 * (matmul_params(args) - head) * rows * T + 4 * head * scored + attention


def peak_tflops(gpu_name: str) -> float:
    """bf16 dense peak TFLOP/s of a GPU by its torch.cuda.get_device_name, 0.0 when unknown. H100 SXM
    ("NVIDIA H100 80GB HBM3"), H200 and GH200: 989; H100 NVL and H200 NVL: 835; H100 PCIe: 756; A100: 312."""
    name = gpu_name.upper()
    if "H100" in name or "H200" in name:
        return 756.0 if "PCIE" in name else 835.0 if "NVL" in name else 989.0
    return 312.0 if "A100" in name else 0.0


def bench_config(name: str, dtype: torch.dtype, device, a) -> dict:
    spec = CONFIGS[name]
    args = ModelArgs(**spec["args"])
    s = spec["cuda" if device.type == "cuda" else "cpu"]
    B, T, P = s["B"], s["T"], s["prompt"]
    peak = Peak(device)
    model, opt = lora_model(args, dtype, device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    row = dict(config=name, dtype=str(dtype).replace("torch.", ""), params_M=n_params / 1e6, B=B, T=T)
    n_flop = matmul_params(args)

    # proxy step: [y; y_hat] stacked, reference log-probs as from a round's reference pass
    cfg = tp.Config(beta=0.1)
    pb = batch(2 * B, T, P, args.vocab_size, device, n=B)
    pb["ref_chosen"] = torch.zeros(B, device=device)
    pb["ref_rejected"] = torch.zeros(B, device=device)
    peak.reset()
    dt = timed(lambda: tp.train_step(Run(cfg, device=device, model=model, optimizer=opt), [pb]),
               a.steps, device)
    row.update(proxy_tok_s=2 * B * T / dt, proxy_peak_gib=peak.gib())
    flops = train_step_flops(args, pb["labels_cpu"])
    row["proxy_mfu"] = flops / dt / (a.peak_tflops * 1e12) if a.peak_tflops else None

    # student step: Eq. 11 against a random top-10 cache, per-sample weights
    scfg = ts.Config(alpha=100.0)
    sb = batch(B, T, P, args.vocab_size, device)
    cache = RandomCache(T - P, args.vocab_size)  # response positions: labels[:, P:]
    weights = {i: 0.5 for i in range(B)}
    peak.reset()
    dt = timed(lambda: ts.student_step(Run(scfg, device=device, model=model, optimizer=opt), [sb], cache,
                                       weights), a.steps, device)
    row.update(student_tok_s=B * T / dt, student_peak_gib=peak.gib())
    flops = train_step_flops(args, sb["labels_cpu"])
    row["student_mfu"] = flops / dt / (a.peak_tflops * 1e12) if a.peak_tflops else None

    # decode: B prompts of P tokens, s["new"] sampled tokens each (eos never sampled: id -1)
    prompts = torch.randint(4, args.vocab_size, (B, P)).tolist()
    gen = torch.Generator().manual_seed(0)
    model.eval()
    peak.reset()
    dt = timed(lambda: generate(model, prompts, s["new"], eos_id=-1, pad_id=0, generator=gen),
               max(1, a.steps - 1), device)
    model.train()
    row.update(decode_tok_s=B * s["new"] / dt, decode_peak_gib=peak.gib())
    row["decode_mfu"] = 2 * n_flop * B * s["new"] / dt / (a.peak_tflops * 1e12) if a.peak_tflops else None

    # cache: real part files from build_cache (top-10 ids int32 + fp16 log-probs, per response token)
    with tempfile.TemporaryDirectory() as d:
        ccfg = ts.Config(cache_dir=d, topk=10, cache_batch_size=B, cache_flush_every=1000)
        encoded = {i: {"input_ids": r[: T - (i % 4) * 8], "labels": [-100] * P + r[P : T - (i % 4) * 8]}
                   for i, r in enumerate(torch.randint(4, args.vocab_size, (4 * B, T)).tolist())}
        model.eval()
        n_tok = ts.build_cache(Run(ccfg, device=device, tok=types.SimpleNamespace(pad_id=0), encoded=encoded),
                               model, list(encoded), "benchmark")
        model.train()
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        row["cache_bytes_per_token"] = size / n_tok
    return row


def bench_prepass(name: str, dtype: torch.dtype, device, a) -> dict:
    """Collective. The reference pass's decode on every rank: B prompts of P tokens per rank, s["new"] sampled
    tokens each (eos never sampled), with the gathered sampler and with the tensor-parallel one."""
    import torch.distributed as dist

    spec = CONFIGS[name]
    args = ModelArgs(**spec["args"])
    s = spec["cuda" if device.type == "cuda" else "cpu"]
    B, P, new = s["B"], s["prompt"], s["new"]
    world, rank = dist.get_world_size(), dist.get_rank()
    model, _ = lora_model(args, dtype, device)
    model.eval()
    prompts = torch.randint(4, args.vocab_size, (B, P),
                            generator=torch.Generator().manual_seed(rank)).tolist()
    gen = torch.Generator().manual_seed(0)

    def gathered_pass():
        with gathered(model):
            generate(model, prompts, new, eos_id=-1, pad_id=0, generator=gen)

    dist.barrier()
    dt_g = timed(gathered_pass, max(1, a.steps - 1), device)
    sync(device)
    t0 = time.perf_counter()
    tp_model = tensor_parallel.tensor_parallel_copy(model)
    sync(device)  # the copy's kernels run asynchronously on a GPU
    build = time.perf_counter() - t0
    dt_t = timed(lambda: tensor_parallel.tp_generate(tp_model, prompts, world * B, new, -1, 0, generator=gen),
                 max(1, a.steps - 1), device)
    # per-rank rates, averaged over ranks
    r = torch.tensor([B * new / dt_g, B * new / dt_t, build], dtype=torch.float64, device=device)
    dist.all_reduce(r)
    g, t, build = (r / world).tolist()
    return dict(config=name, dtype=str(dtype).replace("torch.", ""), world=world, B=B, prompt=P, new=new,
                gathered_tok_s=g, tp_tok_s=t, tp_over_gathered=t / g, tp_build_s=build)


def prepass_table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| config | base dtype | ranks | prompts per rank x prompt + new | gathered new tok/s per rank "
             "| tensor-parallel new tok/s per rank | TP / gathered | TP copy build s |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['dtype']} | {r['world']} | {r['B']} x {r['prompt']} + {r['new']} "
                     f"| {r['gathered_tok_s']:,.1f} | {r['tp_tok_s']:,.1f} | {r['tp_over_gathered']:.2f} "
                     f"| {r['tp_build_s']:.2f} |")
    return "\n".join(lines)


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (1 GPU), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), {allocator()}"


def allocator() -> str:
    """The host allocator's settings, which move CPU numbers (see --compare_hf in the module docstring)."""
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items())
             if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    return "malloc " + (" ".join(tuned) if tuned else "glibc defaults")


def table(rows: list[dict], header: str) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [header, "",
             "| config | params | base dtype | B x T | proxy NLL+DPO tok/s | peak GiB | student NLL+KL tok/s "
             "| peak GiB | decode tok/s | peak GiB | cache bytes/token | MFU proxy / student / decode |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mfu = ("-" if r["proxy_mfu"] is None
               else f"{r['proxy_mfu']:.1%} / {r['student_mfu']:.1%} / {r['decode_mfu']:.1%}")
        lines.append(f"| {r['config']} | {r['params_M']:.1f}M | {r['dtype']} | {r['B']} x {r['T']} | "
                     f"{f(r['proxy_tok_s'], ',.0f')} | {f(r['proxy_peak_gib'], '.2f')} | "
                     f"{f(r['student_tok_s'], ',.0f')} | {f(r['student_peak_gib'], '.2f')} | "
                     f"{f(r['decode_tok_s'], ',.0f')} | {f(r['decode_peak_gib'], '.2f')} | "
                     f"{r['cache_bytes_per_token']:.1f} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.prepass_only:  # one rank of the torchrun launch in prepass()
        _, _, device = ranks.init_distributed()
        rows = [bench_prepass(n, getattr(torch, dt), device, a) for n in a.configs.split(",")
                for dt in a.dtypes.split(",")]
        if int(os.environ.get("RANK", 0)) == 0:
            with open(a.out, "w") as f:
                json.dump({"machine": machine(device), "rows": rows}, f, indent=1)
        ranks.finish(0)
    cuda = os.environ.get("PROXYKD_DEVICE", "auto") != "cpu" and torch.cuda.is_available()
    dtypes = a.dtypes or ("bfloat16" if cuda else "float32,bfloat16")
    # the multi-rank reference-pass decode first: this process takes no GPU (context, process group)
    # until it is done
    world = (0 if a.compare_hf else a.prepass_world if not cuda
             else min(a.prepass_world, torch.cuda.device_count()))
    pre = prepass(a, dtypes, world, cuda) if world > 1 else []
    _, _, device = ranks.init_distributed()
    if device.type == "cuda" and not a.peak_tflops:
        a.peak_tflops = peak_tflops(torch.cuda.get_device_name())
    if a.compare_hf:  # the transformers + peft half, loaded only when asked for
        import compare_hf
    rows = []
    for name in a.configs.split(","):
        for dt in dtypes.split(","):
            print(f"{name} {dt} ...", file=sys.stderr, flush=True)
            if a.compare_hf:
                rows += compare_hf.compare_config(name, getattr(torch, dt), device, a)
            else:
                rows.append(bench_config(name, getattr(torch, dt), device, a))
    header = (f"Benchmark, {datetime.date.today().isoformat()}: {machine(device)}; "
              f"one rank, LoRA r 8 on a frozen base, {a.steps} timed steps")
    if a.compare_hf:
        import peft
        import transformers

        header += (f" per measurement, median of {a.repeats} interleaved; "
                   f"transformers {transformers.__version__}, peft {peft.__version__}")
    md = compare_hf.compare_table(rows, header) if a.compare_hf else table(rows, header)
    if pre:
        md += "\n\n" + prepass_table(pre, f"Reference-pass decode at {world} ranks "
                                          f"({'NCCL' if cuda else 'gloo'}), "
                                          f"{max(1, a.steps - 1)} timed passes after one untimed")
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(md + "\n")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"machine": machine(device), "rows": rows, "prepass": pre}, f, indent=1)
    ranks.finish(0)


def prepass(a, dtypes: str, world: int, cuda: bool) -> list[dict]:
    """The reference-pass samplers at `world` ranks: a torchrun launch of this script (--prepass_only)."""
    print(f"reference-pass decode at {world} ranks ...", file=sys.stderr, flush=True)
    pre_json = os.path.splitext(os.path.abspath(a.out))[0] + ".prepass.json"
    os.makedirs(os.path.dirname(pre_json), exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--prepass_only", "--configs", a.configs, "--dtypes", dtypes, "--steps", str(a.steps),
           "--out", pre_json]
    threads = 1 if cuda else max(1, (os.cpu_count() or 1) // world)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    with open(pre_json) as f:
        return json.load(f)["rows"]


if __name__ == "__main__":
    main()
