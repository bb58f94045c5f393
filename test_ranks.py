"""The machine-facing parts of a run (ranks.py, the training steps, the sampler's pick), checked on the CPU:
the device each rank takes, the collective timeouts (a stuck rank stops the run; the known-long phases
may wait), the host syncs of a training step, and the stop when no sampler fits the memory plan."""

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import data
import lora
import memory_plan
import ranks
import train_proxy
import train_student
from model import Llama, ModelArgs
from run import Run
from scripts import demo_world
from test_fast import RandomTopkCache
from test_train_proxy import launch, steps_of


@pytest.mark.parametrize("requested,local_rank,n_gpus,visible,want", [
    ("auto", 0, 0, None, "cpu"),
    ("auto", 3, 0, None, "cpu"),  # no GPU: every rank on the CPU
    ("cpu", 1, 8, None, "cpu"),  # the override wins over visible GPUs
    ("auto", 5, 8, None, "cuda:5"),
    ("cuda", 0, 1, None, "cuda:0"),
    ("auto", 3, 1, "3", "cuda:0"),  # a scheduler gave this process its own GPU
    ("auto", 1, 1, None, "LOCAL_RANK 1 needs GPU 1, but this process sees 1"),  # 2 ranks, 1 GPU
    ("auto", 2, 2, "0,1", "LOCAL_RANK 2 needs GPU 2, but this process sees 2"),
    ("cuda", 0, 0, None, "--device cuda, but this process sees no GPU"),
    ("gpu", 0, 0, None, "--device must be auto, cuda or cpu"),
])
def test_pick_device(requested, local_rank, n_gpus, visible, want):
    if ":" in want or want == "cpu":
        assert ranks.pick_device(requested, local_rank, n_gpus, visible) == torch.device(want)
    else:
        with pytest.raises(ValueError, match=want):
            ranks.pick_device(requested, local_rank, n_gpus, visible)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 demo examples, a tokenizer and a tiny random base (fp32)."""
    d = tmp_path_factory.mktemp("world")
    train = demo_world.write_demo_jsonl(str(d / "teacher.jsonl"), 40, seed=0)
    tok_path = demo_world.train_demo_tokenizer([train], str(d / "tok"), 128)
    torch.manual_seed(0)
    base = str(d / "base")
    Llama(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=128,
                    vocab_size=data.Tokenizer(tok_path).vocab_size)).save_pretrained(base)
    common = ["--base", base, "--tokenizer", tok_path, "--data", train, "--max_len", "96",
              "--base_dtype", "float32", "--batch_size", "1", "--save_every", "0"]
    return dict(dir=d, base=base, tok=data.Tokenizer(tok_path), data=train, common=common)


def test_device_errors_are_one_line(world):
    """--device cuda where no GPU is visible (this CPU machine, or CUDA hidden) stops in one line."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    p = launch(world["common"] + ["--out", str(world["dir"] / "cuda"), "--device", "cuda"], nproc=0, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == ["train_proxy.py: --device cuda, but this process sees no GPU "
                                             "(CUDA_VISIBLE_DEVICES=''); pass --device cpu"]


def test_stuck_rank_times_out_and_long_phases_may_wait(world):
    """Collectives wait --timeout_min (here 6 s), except around the known-long phases. Rank 0 held 9 s
    while it hashes the data file (a long phase) delays the run without failing it; rank 1 then stuck
    for good after its first step stops the run after the short timeout, not the default 10 minutes."""
    out = str(world["dir"] / "stuck")
    t0 = time.time()
    p = launch(world["common"] + ["--out", out, "--rounds", "0", "--timeout_min", "0.1",
                                  "--long_timeout_min", "2"],
               env={"PROXYKD_CRASH_AT": "provenance:1:0:sleep=9,step:1:1:hang"})
    assert p.returncode != 0
    assert [r["step"] for r in steps_of(out)] == [1], "the long phase passed, the stuck rank stopped the run"
    assert 9 < time.time() - t0 < 120, "a stuck rank must not hang the others for the default timeout"


STEP_CODE = ("train_proxy.py", "train_student.py", "fast.py", "proxykd.py", "run.py", "model.py", "lora.py")


class HostTraffic(TorchDispatchMode):
    """Counts what would make a GPU wait for the host, or the host for a GPU, on the CPU where neither
    waits: reads of a device value (`syncs`: a scalar read or a truth test, nonzero's data-dependent size,
    tolist / cpu / numpy), and copies of host data to the device (`stray`: torch.tensor(..., device=...),
    Tensor.to(<device>) and a Python number assigned into a tensor in the step's own code, pageable and
    blocking on a GPU; `pinned`: data.to_device, the one sanctioned way, pinned and non-blocking). On the
    CPU every tensor is a host tensor, so any Tensor.to(<device>) outside data.to_device counts."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.syncs = self.stray = self.pinned = 0
        real_tensor, real_to, real_to_device = torch.tensor, torch.Tensor.to, data.to_device
        sanctioned = []

        def tensor(*args, **kwargs):
            self.stray += kwargs.get("device") is not None
            return real_tensor(*args, **kwargs)

        def to(t, *args, **kwargs):
            target = kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args)
            self.stray += target and not sanctioned
            return real_to(t, *args, **kwargs)

        def to_device(t, device):
            self.pinned += 1
            sanctioned.append(1)
            try:
                return real_to_device(t, device)
            finally:
                sanctioned.pop()

        def from_step_code():  # the spied call's caller (two frames up: the spy, then its caller)
            return os.path.basename(sys._getframe(2).f_code.co_filename) in STEP_CODE

        def reads(name):  # reads of a whole tensor, which on the CPU dispatch no op: counted where the step's
            real = getattr(torch.Tensor, name)  # own code does them (the cache's host rows are host tensors)

            def read(t, *args, **kwargs):
                self.syncs += from_step_code()
                return real(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, read)

        real_setitem = torch.Tensor.__setitem__

        def setitem(t, index, value):  # t[i] = <a Python number> copies a host scalar to t's device
            self.stray += isinstance(value, (int, float)) and from_step_code()
            return real_setitem(t, index, value)

        monkeypatch.setattr(torch, "tensor", tensor)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
        monkeypatch.setattr(data, "to_device", to_device)
        for name in ("tolist", "cpu", "numpy"):
            reads(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_training_steps_wait_for_the_host_once(world, monkeypatch):
    """A training step of two micro-batches reads one value back from the device (its metrics, which
    also say whether the loss is finite on every rank), whatever the batch holds, and copies host data
    to the device only through data.to_device, a fixed number of times: the proxy its step's counts; the
    student its step's count, and per micro-batch the cache rows (ids, log-probs) and the weights. The
    token and row counts come from the host copy of the batch. SGD, whose step reads nothing back
    (Adam's CPU path reads its step counters)."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tok, examples = world["tok"], data.read_jsonl(world["data"])
        ids = [0, 1, 2, 3, 4]
        encoded = {i: data.encode_example(tok, examples[i], 96) for i in ids}
        model = lora.apply_lora(Llama.from_pretrained(world["base"], dtype=torch.float32), r=4, alpha=8.0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        micro = [data.make_batch(m, encoded, tok.pad_id, "cpu") for m in (ids[:3], ids[3:])]

        cache = RandomTopkCache(encoded, tok.vocab_size, 4, torch.Generator().manual_seed(0))
        steps = {1: lambda: train_proxy.train_step(
                     Run(train_proxy.Config(), model=model, optimizer=opt), micro),
                 1 + 3 * len(micro): lambda: train_student.student_step(
                     Run(train_student.Config(), model=model, optimizer=opt), micro, cache,
                     {i: 0.5 for i in ids})}
        for copies, step in steps.items():
            with monkeypatch.context() as m, HostTraffic(m) as c:
                out = step()
            assert out.finite
            assert (c.syncs, c.stray, c.pinned) == (1, 0, copies)
    finally:
        if own_group:
            dist.destroy_process_group()


def test_auto_sampler_at_one_rank_never_picks_tensor_parallel(world):
    """At one rank the tensor-parallel copy is a second whole model: --sampler auto keeps the gathered
    sampler however little memory the plan has, and when that does not fit either the run stops with
    the plan printed."""
    args = ModelArgs.from_hf_config(__import__("model").read_hf_config(world["base"]))
    small = 1 << 20  # bytes: nothing fits
    assert memory_plan.plan_proxy(args, 1, budget=small).sampler == "gathered"
    assert memory_plan.plan_proxy(args, 2, budget=small).sampler == "tensor_parallel"
    p = launch(world["common"] + ["--out", str(world["dir"] / "nofit"), "--gpu_memory_gib", "0.0001"],
               nproc=0)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert ("no sampler fits the memory plan at 1 rank(s)" in p.stderr
            and "| **peak: gathered decode** |" in p.stderr)
