"""`--plan --trace`: the memory plan checked against the real code, at the real size, on a CPU.

memory_plan.py writes down what each phase holds per GPU. Here each phase is run instead: the scripts' own
train_step / student_step, model.generate and the tensor-parallel copy, at the flags' shapes, on fake
tensors (torch's FakeTensorMode: every op computes its output's shape, dtype and device and allocates
nothing), with this one process as rank 0 of a fake process group of N ranks (collectives return at once
and move nothing). torch's memory tracker (FSDPMemTracker; MemTracker at one rank, where nothing is
sharded) adds up the bytes of every tensor the code creates and frees, and keeps the peak, with the bytes
by kind (sharded and unsharded parameters, activations, temporaries, gradients, optimizer state).
Rank 0 stands for every rank: FSDP2 pads every rank's shard to the same size and the ranks run the same
shapes. No weight is read (the model is built on the meta device and materialised by to_empty under the
fake mode; sharding.load_fsdp_shards is never called), nothing runs on a GPU, and the host holds only
metadata: a 70B phase takes minutes and well under a GiB of host memory.

The fake process group, fake tensors and trackers are torch internals (torch 2.11 to 2.13 here): without
them --trace stops in one line.
"""

import contextlib
import dataclasses
import sys
import time

import torch
import torch.distributed as dist

import data
import fast
import lora
import proxykd as pk
import sharding
from model import Llama, ModelArgs, gathered, generate, read_hf_config
from run import Run, head
from tensor_parallel import tensor_parallel_copy, tp_supported

GiB = 2**30
BOUND = 0.10  # a phase whose traced peak differs from the plan's by more than this fraction is flagged
DECODE_STEPS = 2  # decode steps traced after the prefill (the KV cache is allocated whole at the prefill)
CPU = torch.device("cpu")  # the fake tensors' device, whatever the machine has (a GPU's kernels are not run)
TOKEN, EOS, PAD = 1, 2, 0  # token ids of the synthetic batches and prompts (any id below the vocabulary)
NOT_TRACED = ("A trace counts every tensor the code allocates; it does not see the CUDA context, the caching "
              "allocator's reserve and fragmentation, NCCL's buffers, or a GPU kernel's own workspace and "
              "choice (each op runs the CPU's shape rule: attention is the CPU's SDPA kernel, and a GPU's "
              "fallback to SDPA's math kernel, which holds the (B, H, T, S) scores, would not be seen).")


class Unavailable(Exception):
    """This torch lacks what --trace runs on (a one-line message)."""


@dataclasses.dataclass
class Traced:
    peak: int  # bytes on one rank at the phase's peak
    parts: dict[str, int]  # those bytes by the tracker's kinds ("Sharded Param", "Activation", ...)
    seconds: float  # how long tracing it took


# ---------------------------------------------------------------------------------------------------
# the phases of each script


def trace_proxy(cfg, world: int, step) -> dict[str, Traced]:
    """train_proxy.py's phases (memory_plan.plan_proxy's names) on `world` fake ranks, with cfg's shapes:
    a warm-up step (batch_size sequences of max_len) and an alignment step (batch_size pairs [y; y_hat]),
    each `step` (train_proxy.train_step) on a Run holding the model and Adam; then the reference pass's
    decode of gen_batch_size prompts of max_len, gathered and (where the heads divide) tensor-parallel."""
    args = ModelArgs.from_hf_config(read_hf_config(cfg.base))
    cfg = _gpu_chunks(cfg, args)
    warm = _batch(cfg.batch_size, cfg.max_len)
    pairs = _batch(cfg.batch_size, cfg.max_len, pairs=True)
    prompts = [[TOKEN] * cfg.max_len for _ in range(cfg.gen_batch_size)]  # KV cache: max_len + max_new_tokens
    model, out = _meta_model(args, getattr(torch, cfg.base_dtype), cfg), {}
    with _fake_world(world) as (mesh, fake):
        run = Run(cfg, 0, world, CPU, model=_shard(model, mesh, cfg.activation_checkpointing))
        run.optimizer = run.make_optimizer()
        _prime(run)
        out["warm-up step"] = _phase("warm-up step", run, lambda: step(run, [_fake(fake, warm)]))
        _prime(run)
        out["train step"] = _phase("train step", run, lambda: step(run, [_fake(fake, pairs)]))
        run.optimizer.zero_grad(set_to_none=True)  # as every step leaves it before a reference pass
        run.model.eval()

        def gathered_decode():
            with gathered(run.model):
                generate(run.model, prompts, cfg.max_new_tokens, EOS, PAD)

        out["gathered decode"] = _phase("gathered decode", run, gathered_decode, DECODE_STEPS)
        if tp_supported(args, world):  # tp_generate's every batch: all ranks decode the same rows
            out["TP decode"] = _phase("TP decode", run, lambda: generate(
                tensor_parallel_copy(run.model), prompts, cfg.max_new_tokens, EOS, PAD, all_ranks_done=True),
                DECODE_STEPS)
    return out


def trace_student(cfg, world: int, step) -> dict[str, Traced]:
    """train_student.py's phases (memory_plan.plan_student's names) on `world` fake ranks: the cache
    build (the frozen proxy's forward and top-k head over cache_batch_size sequences of max_len; unless
    --alpha 0), then `step` (train_student.student_step) over batch_size sequences against a full top-k
    cache, on a Run holding the student and Adam."""
    student = ModelArgs.from_hf_config(read_hf_config(cfg.base))
    cache = _Cache(cfg.topk, getattr(torch, cfg.cache_dtype), cfg.max_len - 1) if cfg.alpha else None
    batch, cache_batch = _batch(cfg.batch_size, cfg.max_len), _batch(cfg.cache_batch_size, cfg.max_len)
    if cache is not None:
        proxy_args = ModelArgs.from_hf_config(read_hf_config(cfg.proxy))
        proxy = _meta_model(proxy_args, getattr(torch, cfg.proxy_dtype))
    model, out = _meta_model(student, getattr(torch, cfg.base_dtype), cfg), {}
    with _fake_world(world) as (mesh, fake):
        if cache is not None:
            c = _gpu_chunks(cfg, proxy_args)
            proxy = _shard(proxy, mesh)
            b = _fake(fake, cache_batch)
            labels = b["labels"]
            # train_student.build_cache's forward
            cache_forward = torch.no_grad()(lambda: head(
                proxy, b["input_ids"], c.loss, lambda logits: pk.topk_logps(logits, labels, c.topk),
                lambda h, w: fast.topk_logps_chunked(h, w, labels, c.topk, c.chunk_size)))
            out["cache build"] = _phase("cache build", Run(c, 0, world, model=proxy), cache_forward)
            del proxy  # freed before the student loads, as cache_proxy frees it
        cfg = _gpu_chunks(cfg, student)
        run = Run(cfg, 0, world, CPU, model=_shard(model, mesh, cfg.activation_checkpointing))
        run.optimizer = run.make_optimizer()
        _prime(run)
        weights = None if cache is None or cfg.no_weights else {i: 1.0 for i in batch["ids"]}
        out["student step"] = _phase("student step", run,
                                     lambda: step(run, [_fake(fake, batch)], cache, weights))
    return out


def _gpu_chunks(cfg, args: ModelArgs):
    """cfg with the fused heads' chunk a GPU would take (fast.default_chunk_size on "cuda"): the trace's
    fake tensors are on the CPU, whose default is smaller."""
    chunk = cfg.chunk_size or fast.default_chunk_size(args.vocab_size, "cuda")
    return dataclasses.replace(cfg, chunk_size=chunk)


def _batch(rows: int, length: int, pairs: bool = False) -> dict:
    """A data.make_batch micro-batch of `rows` sequences of `length` tokens, each a one-token prompt and a
    reply filling the rest (every position but the first is scored: the fused heads' most rows); pairs:
    rows (y, y_hat) pairs and zero reference log-probs, as rounds.pair_batch makes them. Host tensors."""
    example = {"input_ids": [TOKEN] * length, "labels": [pk.IGNORE_INDEX] + [TOKEN] * (length - 1)}
    encoded = {i: example for i in range(rows)}
    b = data.make_batch(list(encoded), encoded, PAD, "cpu", extra=[example] * rows if pairs else ())
    if pairs:
        b["ref_chosen"], b["ref_rejected"] = torch.zeros(rows), torch.zeros(rows)
    return b


def _fake(fake, batch: dict) -> dict:
    """A batch's device tensors as fake tensors (labels_cpu stays the host's)."""
    return {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) and k != "labels_cpu" else v
            for k, v in batch.items()}


class _Cache:
    """topk_cache.ProxyCache's `rows` for the trace: every example's top-k ids and log-probs (zeros), one
    row per response token (`n`: _batch's length - 1)."""

    def __init__(self, k: int, dtype: torch.dtype, n: int):
        self.k, self.dtype, self.n = k, dtype, n

    def rows(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (self.n, self.k)
        return [(torch.zeros(shape, dtype=torch.int32), torch.zeros(shape, dtype=self.dtype)) for _ in ids]


def _meta_model(args: ModelArgs, dtype: torch.dtype, cfg=None) -> Llama:
    """The scripts' model on the meta device, as sharding.load_base builds it, with LoRA from cfg's flags as
    sharding.load_lora_model adds it (cfg None: a frozen proxy). Built outside the fake mode."""
    with torch.device("meta"):
        model = Llama(args).to(dtype)
    if cfg is None:
        return model.requires_grad_(False).eval()
    return lora.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def _shard(model: Llama, mesh, checkpointing: bool = False):
    """A meta model materialised by to_empty under the fake mode (fake tensors: nothing allocated), then
    sharded over `mesh` by the real sharding.shard_model, which shards a model that is not on the meta
    device as it is: no weight is read. At one rank shard_model would only add the checkpointing and
    move the model to its device, where it is (and .to cannot swap fake parameters): the first is done
    here as shard_model does it."""
    model = model.to_empty(device=CPU)
    if mesh.size() > 1:
        return sharding.shard_model(model, checkpointing, mesh)
    if checkpointing:
        from torch.distributed._composable import checkpoint
        for block in model.model.layers:
            checkpoint(block)
    return model


def _prime(run: Run) -> None:
    """Adam's state exists from the first step on, and within a step of --grad_accum > 1 micro-batches the
    sharded gradients from the second micro-batch on: an optimizer step on zero gradients before a traced
    step makes them, so the traced step is a step after the first (and its micro-batch a later one)."""
    for p in run.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    run.optimizer.step()
    if run.cfg.grad_accum == 1:
        run.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------
# the fake world and the tracker


def _internals():
    """torch's fake process group, fake tensors and memory trackers (internal APIs), or Unavailable."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise Unavailable(f"--trace needs torch's fake process group, fake tensors and memory trackers, "
                          f"which torch {torch.__version__} lacks ({e})") from None
    hooks = [(FSDPMemTracker, "_fsdp_state_pre_forward"), (MemTracker, "_pre_fw_hook"),
             (MemTracker, "_track_module_params_and_buffers"), (MemTracker, "reset_mod_stats")]
    missing = [f"{c.__name__}.{name}" for c, name in hooks if not hasattr(c, name)]
    if missing:  # the methods _tracker changes
        raise Unavailable(f"--trace needs torch's memory trackers as torch 2.11-2.13 have them; torch "
                          f"{torch.__version__} lacks {', '.join(missing)}")
    return FakeTensorMode, FSDPMemTracker, MemTracker, init_device_mesh, FSDPModule, FakeStore


@contextlib.contextmanager
def _fake_world(world: int):
    """-> (mesh, fake mode): this process as rank 0 of `world` ranks on torch's fake backend, their 1-D CPU
    mesh (shard_model's mesh), and fake tensors. The process group is destroyed on the way out."""
    FakeTensorMode, _, _, init_device_mesh, _, FakeStore = _internals()
    if dist.is_initialized():
        raise Unavailable("--trace makes its own fake process group, and this process already has one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        # host tensors made outside (the batches' labels_cpu, a host count) are taken in as fake ones
        with FakeTensorMode(allow_non_fake_inputs=True) as fake:
            yield mesh, fake
    finally:
        dist.destroy_process_group()


def _phase(name: str, run: Run, fn, open_reads: int = 0) -> Traced:
    """Run fn() under the memory tracker of run.model and run.optimizer -> its peak on this rank."""
    print(f"--trace: {name} on {run.world} fake ranks ...", file=sys.stderr, flush=True)
    t0 = time.time()
    tracker = _tracker(run.model, run.optimizer, open_reads)
    with tracker:
        fn()
    snap = dict(tracker.get_tracker_snapshot("peak").get(CPU, {}))
    peak = snap.pop("Total", 0)
    return Traced(peak, {getattr(k, "value", str(k)): v for k, v in snap.items() if v}, time.time() - t0)


def _tracker(model, optimizer, open_reads: int):
    """torch's FSDPMemTracker for a sharded model (MemTracker at one rank, which tracks the model and
    optimizer handed to it), changed in two ways for whole phases of real code:
    - a fake tensor holds no values, so a read of one on the host (.item(), bool(), .tolist()) is answered
      here: True for a bool (a loss is finite, a position is scored), 1.0 for a float (loss sums, Adam's
      step count), and for an integer (generate's count of rows still open) 1 for the first `open_reads`
      reads, then 0: the decode stops after that many steps;
    - the trackers refuse a second forward of the root module (they keep per-module statistics of one
      iteration), which generate makes once per token: those statistics are cleared before each one. The
      peak is kept."""
    _, FSDPMemTracker, MemTracker, _, FSDPModule, _ = _internals()
    fsdp = isinstance(model, FSDPModule)

    class Tracker(FSDPMemTracker if fsdp else MemTracker):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return answer(args[0])
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _fsdp_state_pre_forward(self, fsdp_mod, orig):  # FSDPMemTracker's
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

            def again(*args, **kwargs):
                self._forget_if_again(fsdp_mod)
                return inner(*args, **kwargs)
            return again

        def _pre_fw_hook(self, module, inputs):  # MemTracker's
            self._forget_if_again(module)
            super()._pre_fw_hook(module, inputs)

        def _forget_if_again(self, module):  # the trackers' own test for a root module called again
            top = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}
            if module in self.memory_tracking and top and not self._mod_tracker.is_bw:
                self.reset_mod_stats()

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # MemTracker's
            # its gradient hooks fail on frozen parameters; gradients are still counted, as the
            # tensors the backward makes
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    left = [open_reads]

    def answer(t: torch.Tensor):
        if t.dtype == torch.bool:
            return True
        if t.is_floating_point():
            return 1.0
        left[0] -= 1
        return int(left[0] >= 0)

    if fsdp:
        return Tracker(model, optimizer)
    tracker = Tracker()
    tracker.track_external(model, *([optimizer] if optimizer is not None else []))
    return tracker


# ---------------------------------------------------------------------------------------------------
# plan against trace


@dataclasses.dataclass
class Row:
    phase: str
    planned: int  # bytes per GPU
    traced: int

    @property
    def rel(self) -> float:
        return (self.traced - self.planned) / max(self.planned, 1)

    @property
    def off(self) -> bool:
        """Plan and trace differ by more than BOUND: the plan is wrong there."""
        return abs(self.rel) > BOUND


def compare(plan, traced: dict[str, Traced]) -> list[Row]:
    """Each traced phase against the plan's peak of the same name (memory_plan.Plan.phases)."""
    return [Row(k, plan.phases[k], t.peak) for k, t in traced.items()]


def report(plan, traced: dict[str, Traced], world: int) -> str:
    """The plan's and the trace's peaks side by side (GiB per GPU; MiB for a model under a GiB), the trace's
    bytes at each peak by kind, the phases where the two differ by more than BOUND, and what a trace
    cannot see."""
    rows = compare(plan, traced)
    unit, name = (GiB, "GiB") if max(r.planned for r in rows) >= GiB else (2**20, "MiB")
    lines = ["", f"Traced: every phase run on fake tensors at its full size, {world} ranks ({name} per GPU)",
             "",
             "| phase | planned | traced | traced - planned | traced peak by kind | seconds |",
             "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        t = traced[r.phase]
        kinds = ", ".join(f"{k.lower()} {v / unit:.2f}" for k, v in t.parts.items() if v >= unit / 200)
        diff = f"{(r.traced - r.planned) / unit:+.2f} ({100 * r.rel:+.1f}%){' **off**' if r.off else ''}"
        lines.append(f"| {r.phase} | {r.planned / unit:.2f} | {r.traced / unit:.2f} | {diff} | {kinds} | "
                     f"{t.seconds:.0f} |")
    off = ", ".join(r.phase for r in rows if r.off)
    bound = f"{100 * BOUND:.0f}%"
    lines += ["", f"Plan and trace differ by more than {bound} in: {off}: the plan is wrong there." if off
              else f"Plan and trace agree within {bound} in every phase.", NOT_TRACED]
    return "\n".join(lines)
