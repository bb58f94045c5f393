"""scripts/demo.py and scripts/benchmark.py run end to end (tiny sizes, CPU): the README's demo command
and the benchmark must not rot. The demo's numbers are not checked here (they are what they measure);
what is checked is that every row is produced from real runs and that the table is consistent."""

import json
import os
import subprocess
import sys

from test_train_proxy import run_in_session

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = run_in_session([sys.executable, *args], {**os.environ, "PYTHONUNBUFFERED": "1"}, timeout)
    assert p.returncode == 0, (f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                               f"--- stderr\n{p.stderr[-6000:]}")
    return p


def test_demo_end_to_end_and_rerun_skips_finished_work(tmp_path):
    out = str(tmp_path / "demo")
    small = ["--out", out, "--n_teacher", "240", "--n_eval", "24", "--n_pretrain", "400",
             "--pretrain_steps", "5", "--rounds", "2", "--seeds", "2", "--batch_size", "8",
             "--max_new_tokens", "48"]
    p = run(["scripts/demo.py", *small])
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    rows = res["rows"]
    assert len(rows) == 1 + 5 + 6  # teacher, 4 proxies + student base, 6 student variants
    assert rows["teacher (black box)"]["exact_match"]["mean"] == 1.0  # the teacher's replies pass the check
    students = [r for label, r in rows.items() if label.startswith("student,")]
    assert len(students) == 6 and all(len(r["runs"]) == 2 for r in students)
    for r in rows.values():
        for run_ in r["runs"]:
            assert 0 <= run_["exact_match"] <= run_["any_form"] <= 1
    # different seeds are different runs: their adapters differ
    a0 = open(os.path.join(out, "students", "proxykd_seed0", "adapter", "adapter_model.safetensors"),
              "rb").read()
    a1 = open(os.path.join(out, "students", "proxykd_seed1", "adapter", "adapter_model.safetensors"),
              "rb").read()
    assert a0 != a1
    assert "| student, Proxy-KD |" in p.stdout and os.path.exists(os.path.join(out, "results.md"))
    # a rerun finds every step done: no training run starts again, the table is rebuilt from evals.json
    mtime = os.path.getmtime(os.path.join(out, "proxy", "final", "model.safetensors"))
    run(["scripts/demo.py", *small])
    assert os.path.getmtime(os.path.join(out, "proxy", "final", "model.safetensors")) == mtime


def test_benchmark_runs(tmp_path):
    out = str(tmp_path / "bench.md")
    run(["scripts/benchmark.py", "--configs", "tiny", "--dtypes", "float32", "--steps", "1", "--out", out])
    with open(os.path.splitext(out)[0] + ".json") as f:
        res = json.load(f)
    (row,) = res["rows"]
    assert row["proxy_tok_s"] > 0 and row["student_tok_s"] > 0 and row["decode_tok_s"] > 0
    (pre,) = res["prepass"]  # the round's reference pass at 2 ranks, both samplers
    assert pre["world"] == 2 and pre["gathered_tok_s"] > 0 and pre["tp_tok_s"] > 0
    # top-10 int32 ids + fp16 log-probs = 60 bytes per token, plus the per-example offsets and headers
    assert 60 <= row["cache_bytes_per_token"] < 70


def test_benchmark_mfu_counts_the_matmul_weights():
    """MFU's parameter count is every weight a token is multiplied by: the block linears and the head,
    not the embedding lookup, whether or not the head is tied to it. A training step's FLOPs count the
    head at scored positions only and causal attention's allowed pairs; the peak follows the GPU's name."""
    import dataclasses

    import torch

    from model import Llama, ModelArgs
    from test_demo import load_script

    bench = load_script("benchmark")
    for tied in (False, True):
        args = dataclasses.replace(ModelArgs.from_name("tiny"), tie_word_embeddings=tied)
        model = Llama(args)
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert bench.matmul_params(args) == linears  # lm_head included, once; embed_tokens is no Linear

    # a training step, counted position by position: block linears everywhere, the head where scored,
    # attention over the (query, key) pairs with key <= query
    args = ModelArgs.from_name("tiny")
    model = Llama(args)
    head = model.lm_head.weight.numel()
    blocks = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    labels = torch.full((3, 10), -100)
    labels[0, 4:], labels[1, 2:7], labels[2, 9:] = 1, 1, 1
    want = 0
    for b in range(3):
        for t in range(10):
            want += 4 * blocks + (4 * head if t + 1 < 10 and labels[b, t + 1] != -100 else 0)
            for key in range(t + 1):
                want += args.n_layers * 3 * 4 * args.n_heads * args.head_dim
    assert bench.train_step_flops(args, labels) == want
    assert [bench.peak_tflops(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                                           "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla V100")] == \
        [989.0, 756.0, 835.0, 989.0, 312.0, 0.0]


def test_gpu_check_says_so_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh on a machine (or a process) without a GPU: one line saying so, exit 0, no file."""
    out = str(tmp_path / "gpu_check.md")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == [
        "gpu_check.sh: no CUDA GPU visible to torch here; nothing to check"]
    assert not os.path.exists(out)
