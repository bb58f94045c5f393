"""The ranks of a run: the process group and the device each rank takes, ranks agreeing on a value or an
error, ending every rank together, and the crash points the tests inject faults at.

Every function that takes part in a collective says so; every rank must call it.
"""

import dataclasses
import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass
class Launch:
    """How a run uses the machine: the flags both training scripts' Configs inherit."""
    # auto (a GPU per process when CUDA is there, else the CPU), cuda or cpu; PROXYKD_DEVICE sets auto's
    device: str = "auto"
    # deterministic kernels, for bitwise-equal resume on CUDA (slower); CPU kernels already are
    deterministic: bool = False
    # a collective waiting longer fails the run: a dead or stuck rank does not hang the others
    timeout_min: float = 10.0
    # the waits of the known-long phases: rank 0 hashing data or a proxy, merging a model
    long_timeout_min: float = 120.0


_DEVICE = torch.device("cpu")  # the device init_distributed chose, for everything that places tensors
_LONG_GROUP = None  # a gloo group with long_timeout_min, for the known-long phases' waits
_MESH = None  # every rank on the chosen device: the FSDP2 mesh


def pick_device(requested: str, local_rank: int, n_gpus: int, visible: str | None) -> torch.device:
    """This process's device: `requested` is auto, cuda or cpu; local_rank its LOCAL_RANK; n_gpus the GPUs
    it sees; visible its CUDA_VISIBLE_DEVICES. A scheduler that gives each process one GPU of its own
    (CUDA_VISIBLE_DEVICES naming one device) gets it whatever LOCAL_RANK says. ValueError, in one line
    saying what to change, when the GPU a rank needs is not there."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and n_gpus == 0):
        return torch.device("cpu")
    if n_gpus == 0:
        raise ValueError("--device cuda, but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                         f"{visible!r}); pass --device cpu")
    if local_rank < n_gpus:
        return torch.device("cuda", local_rank)
    if n_gpus == 1 and visible is not None and len(visible.split(",")) == 1:
        return torch.device("cuda", 0)
    raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this process sees {n_gpus} "
                     f"(CUDA_VISIBLE_DEVICES={visible!r}): start at most {n_gpus} processes per node, "
                     f"give each process its own GPU, or pass --device cpu")


def init_distributed(launch: Launch | None = None) -> tuple[int, int, torch.device]:
    """Start torch.distributed for this process -> (rank, world_size, device), the device chosen here once.

    NCCL + cuda:LOCAL_RANK on a GPU, gloo on the CPU (pick_device; --device, or PROXYKD_DEVICE when it is
    auto, overrides). Under torchrun (RANK set) the group is the launch's; without torchrun a one-process
    group on an in-memory HashStore, so `python train_x.py` runs the very same code path (collectives
    included) as a multi-rank launch. Collectives time out after launch.timeout_min, except the waits
    of the known-long phases (long_barrier, agree(long=True)).
    """
    global _DEVICE, _LONG_GROUP, _MESH
    launch = launch or Launch()
    requested = launch.device if launch.device != "auto" else os.environ.get("PROXYKD_DEVICE", "auto")
    try:
        n_gpus = torch.cuda.device_count() if requested != "cpu" else 0
        _DEVICE = pick_device(requested, int(os.environ.get("LOCAL_RANK", 0)), n_gpus,
                              os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as e:  # this rank alone may lack its GPU: it says so itself
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        finish(2)
    cuda = _DEVICE.type == "cuda"
    if launch.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when its handle is made
        torch.use_deterministic_algorithms(True)  # SDPA's backward kernels too
        # deterministic mode also NaN-fills every torch.empty (the loss heads' buffers, FSDP's all-gather
        # buffers), which no result here depends on: every such buffer is written before it is read
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    if cuda:
        torch.cuda.set_device(_DEVICE)
    backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(minutes=launch.timeout_min)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=_DEVICE if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=_DEVICE if cuda else None)
    _LONG_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=launch.long_timeout_min))
    # the mesh FSDP2 shards over, built from the chosen device: fully_shard's default mesh would take the
    # machine's accelerator, CUDA on any host with a GPU, whatever --device says
    _MESH = init_device_mesh(_DEVICE.type, (dist.get_world_size(),))
    return dist.get_rank(), dist.get_world_size(), _DEVICE


def device() -> torch.device:
    """The device init_distributed chose for this process (the CPU before it ran)."""
    return _DEVICE


def mesh() -> DeviceMesh:
    """The 1-D mesh of every rank on the chosen device (init_distributed), for fully_shard."""
    return _MESH


def long_barrier() -> None:
    """Collective: wait for every rank with the long timeout, in front of or after a known-long phase."""
    dist.barrier(group=_LONG_GROUP)


def any_rank(flag: bool, device) -> bool:
    """Collective OR of a per-rank flag."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def agree(obj, long: bool = False):
    """Rank 0's value of obj on every rank (a collective); long: rank 0 may first be busy for a long
    phase (hashing a proxy or a data file), so the others wait with the long timeout."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_LONG_GROUP if long else None)
    return box[0]


def first_error(err: str | None) -> str | None:
    """The first error message of any rank, on every rank (a collective), or None."""
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e), None)


def finish(code: int = 0) -> None:
    """End the process now with exit status `code`: destroy the process group (no barrier, so it also
    works when other ranks are gone), flush stdout/stderr, os._exit. FSDP2 + gloo processes sometimes
    abort in interpreter teardown otherwise."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail(rank: int, msg: str, code: int = 2) -> None:
    """Every rank calls this on the same (collectively agreed) condition; rank 0 says why, prefixed with
    the script's name, and every rank ends with `code`."""
    if rank == 0:
        print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    finish(code)


_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the tests: with PROXYKD_CRASH_AT=name:n:rank[:action][,...] in the environment,
    that rank acts the n-th time it passes the point `name`. action "kill" (the default) SIGKILLs it, as
    an OOM kill or a lost node would: no cleanup, no flush; "hang" stops it forever, as a stuck rank;
    "sleep=S" holds it S seconds, as a slow one. A no-op otherwise."""
    for spec in filter(None, os.environ.get("PROXYKD_CRASH_AT", "").split(",")):
        point, n, rank, *action = spec.split(":")
        if point != name or dist.get_rank() != int(rank):
            continue
        _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
        if _CRASH_COUNTS[name] == int(n):
            action = action[0] if action else "kill"
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(float(action.split("=")[1]) if action.startswith("sleep=") else 1e9)


