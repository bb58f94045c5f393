"""plan_trace.py: both scripts' phases run on fake tensors at 1, 2 and 4 fake ranks (a tiny config), against
the memory plan; and `--plan --trace` end to end."""

import contextlib
import io
import json
import sys

import pytest
import torch
import torch.distributed as dist

import memory_plan
import plan_trace
import train_proxy
import train_student
from model import ModelArgs

# GQA; heads and SwiGLU width divide by 4, so the tensor-parallel decode is traced at 4 ranks too
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=688, vocab_size=512)
PROXY = ["--batch_size", "2", "--grad_accum", "2", "--activation_checkpointing", "--max_len", "128",
         "--gen_batch_size", "4", "--max_new_tokens", "64"]
STUDENT = ["--batch_size", "2", "--activation_checkpointing", "--max_len", "128", "--cache_batch_size", "4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(ARGS.to_hf_config()))
    return str(d)


@pytest.fixture(scope="module", params=[1, 2, 4])  # 1: nothing sharded, MemTracker
def traced(request, base) -> dict:
    """Both scripts' plans and traces at `world` fake ranks, and what the traces wrote to stderr."""
    world, err = request.param, io.StringIO()
    proxy = train_proxy.parse_args(["--base", base, "--plan", *PROXY])
    student = train_student.parse_args(["--base", base, "--proxy", base, "--plan", *STUDENT])
    with contextlib.redirect_stderr(err):
        out = {"proxy": (train_proxy.plan_memory(proxy, world),
                         plan_trace.trace_proxy(proxy, world, train_proxy.train_step)),
               "student": (train_student.plan_memory(student, world),
                           plan_trace.trace_student(student, world, train_student.student_step))}
    return {"world": world, "configs": (proxy, student), "stderr": err.getvalue(), **out}


def test_every_phase_traces_and_agrees_with_the_plan(traced):
    """Every phase the plan prints is traced (the tensor-parallel decode where the heads divide), holds at
    least its resident shards and optimizer state, and its traced peak is within the plan's stated bound;
    the fake process group is gone afterwards."""
    for script in ("proxy", "student"):
        plan, trace = traced[script]
        assert set(trace) == set(plan.phases)
        for r in plan_trace.compare(plan, trace):
            assert not r.off and abs(r.traced - r.planned) <= plan_trace.BOUND * r.planned, (script, r)
    proxy_plan, proxy_trace = traced["proxy"]
    resident = proxy_plan.items["frozen base shard"] + proxy_plan.items["LoRA + grads + Adam"] // 2
    n_lora = 2 * 7 * ARGS.n_layers  # LoRA tensors, each with Adam's two moments and a 4-byte step count
    for name, t in proxy_trace.items():
        assert t.peak == sum(t.parts.values()) and t.peak > resident, name
        adam = t.parts.get("OptState", t.parts.get("Optstate"))  # FSDPMemTracker's name, MemTracker's
        assert adam == proxy_plan.items["LoRA + grads + Adam"] // 2 + 4 * n_lora, name
        assert f"--trace: {name} on {traced['world']} fake ranks" in traced["stderr"]  # the progress line
    assert not dist.is_initialized()


def test_a_wrong_plan_entry_is_caught(traced, monkeypatch):
    """A plan that counts half the activations is off by more than the bound in exactly the phases that
    hold activations (the training steps), and the report says so."""
    real = memory_plan.activation_bytes
    monkeypatch.setattr(memory_plan, "activation_bytes", lambda *a, **k: real(*a, **k) // 2)
    proxy, student = traced["configs"]
    world = traced["world"]
    for plan, (_, trace), steps in (
            (train_proxy.plan_memory(proxy, world), traced["proxy"], {"warm-up step", "train step"}),
            (train_student.plan_memory(student, world), traced["student"], {"student step"})):
        assert {r.phase for r in plan_trace.compare(plan, trace) if r.off} == steps
        text = plan_trace.report(plan, trace, world)
        flagged = [line for line in text.splitlines() if "differ by more" in line]
        assert len(flagged) == 1 and all(s in flagged[0] for s in steps)


def test_missing_internals_stop_in_one_line(monkeypatch):
    """A torch without the fake process group: --trace says so in one line, naming the version."""
    monkeypatch.setitem(sys.modules, "torch.testing._internal.distributed.fake_pg", None)
    with pytest.raises(plan_trace.Unavailable) as e:
        plan_trace._internals()
    assert "\n" not in str(e.value) and torch.__version__ in str(e.value)


def test_plan_trace_from_the_command_line(traced, base, monkeypatch, capsys):
    """`--plan --trace` in both scripts: the plan, then each phase's planned and traced peaks with their
    difference and what a trace cannot see (the traces are the fixture's, handed to the scripts' hooks)."""
    world = traced["world"]
    monkeypatch.setattr(plan_trace, "trace_proxy", lambda cfg, w, step: traced["proxy"][1])
    monkeypatch.setattr(plan_trace, "trace_student", lambda cfg, w, step: traced["student"][1])
    flags = ["--plan", "--trace", "--plan_world_size", str(world)]
    for main, argv, script in ((train_proxy.main, ["--base", base, *flags, *PROXY], "proxy"),
                               (train_student.main, ["--base", base, "--proxy", base, *flags, *STUDENT],
                                "student")):
        main(argv)
        out = capsys.readouterr().out
        plan, trace = traced[script]
        table = out.split("| phase | planned | traced |")[1]
        for phase, t in trace.items():
            assert f"| **peak: {phase}** |" in out
            row = next(line for line in table.splitlines() if line.startswith(f"| {phase} | "))
            assert row.split(" | ")[1:3] == [f"{plan.phases[phase] / 2**20:.2f}", f"{t.peak / 2**20:.2f}"]
        assert f"{world} ranks (MiB per GPU)" in out and "NCCL" in table
        assert "agree within 10% in every phase" in table


@pytest.mark.parametrize("script", [train_proxy, train_student])
def test_trace_without_plan_stops_in_one_line(script, base, capsys):
    """--trace alone would train instead of tracing: it is refused before anything loads."""
    argv = ["--base", base, "--tokenizer", base, "--data", base, "--trace"]
    with pytest.raises(SystemExit) as e:
        script.parse_args(argv + (["--proxy", base] if script is train_student else []))
    assert e.value.code == 2
    assert "--trace traces the memory plan: give it with --plan" in capsys.readouterr().err
