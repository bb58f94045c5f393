"""The demo's step 5 (scripts/demo.py's docstring): a model directory's held-out metrics, among them the
exact KL against the teacher's exact next-token distributions; every model of a table evaluated once
(cached in evals.json); and the results files."""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the repository's modules and demo_world, also when this file is loaded by path (the tests)
for _dir in (ROOT, os.path.join(ROOT, "scripts")):
    if _dir not in sys.path:
        sys.path.append(_dir)

# torch loads here only after scripts/demo.py has pinned its CPU kernels (the pins must precede
# torch's import; demo.py imports this module below them)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import demo_world  # noqa: E402
from model import Llama, generate  # noqa: E402
from run import eval_batches, evaluate  # noqa: E402


def exact_teacher(w: dict, tok: data.Tokenizer, n: int) -> dict:
    """The teacher's exact next-token distributions on the teacher's replies to the first n held-out
    prompts (demo_world.teacher_next_token_dists) -> dict(batch: collate dict, rows (N,) and cols (N,):
    where each response token's prediction sits in the (B, T - 1) shifted grid, probs (N, V) fp64: the
    teacher's distribution there, entropy and branching: demo_world.teacher_entropy of them, n_positions
    N and n_branching: how many of them have more than one possible token)."""
    held_out = data.read_jsonl(w["heldout"])[:n]
    encoded, rows, cols, dists = [], [], [], []
    for b, e in enumerate(held_out):
        enc = data.encode_example(tok, e, 256)
        d = demo_world.teacher_next_token_dists(tok, e.prompt, e.response, w.get("rich", False))
        # logits at t-1 predict t
        pos = [t - 1 for t, y in enumerate(enc["labels"]) if y != data.IGNORE_INDEX]
        assert len(pos) == len(d), "a truncated held-out reply"
        encoded.append(enc)
        rows += [b] * len(pos)
        cols += pos
        dists += d
    probs = torch.zeros(len(dists), tok.vocab_size, dtype=torch.float64)
    for i, d in enumerate(dists):
        probs[i, list(d)] = torch.tensor(list(d.values()), dtype=torch.float64)
    entropy, branching = demo_world.teacher_entropy(dists)
    return dict(batch=data.collate(encoded, tok.pad_id), rows=torch.tensor(rows), cols=torch.tensor(cols),
                probs=probs, entropy=entropy, branching=branching, n_positions=len(dists),
                n_branching=sum(len(d) > 1 for d in dists))


def exact_metrics(model, ex: dict, device) -> dict:
    """kl: mean over response tokens of KL(teacher || model) of the next-token distributions, exact (the
    paper's Table 4 quantity, which it could only estimate); teacher_top1: fraction of those positions
    where the model's argmax is (one of) the teacher's most likely next token(s) (the paper's Fig. 5)."""
    logits = model(ex["batch"]["input_ids"].to(device)).cpu()  # (B, T, V)
    logq = torch.log_softmax(logits[ex["rows"], ex["cols"]].double(), -1)  # (N, V)
    p = ex["probs"]
    kl = (torch.xlogy(p, p) - torch.where(p > 0, p * logq, torch.zeros_like(p))).sum(-1)  # 0 log 0 = 0
    best = p.max(-1, keepdim=True).values
    # ties: any of the teacher's argmaxes
    agree = p.gather(-1, logq.argmax(-1, keepdim=True)) >= best * (1 - 1e-9)
    return dict(kl=float(kl.mean()), teacher_top1=float(agree.double().mean()))


@torch.no_grad()
def eval_model(path: str, w: dict, tok: data.Tokenizer, device, ex: dict) -> dict:
    """Held-out metrics of an HF-format model dir: exact_match (greedy reply's final answer in a
    teacher answer form == the true answer), top1_agreement and nll (teacher-forced on the teacher's
    replies, train_proxy.evaluate), kl and teacher_top1 against the teacher's exact distributions
    (exact_metrics on exact_teacher's prompts)."""
    model = Llama.from_pretrained(path, dtype=torch.float32).to(device).eval()
    held_out = data.read_jsonl(w["heldout"])
    encoded = [data.encode_example(tok, e, 256) for e in held_out]
    tf = evaluate(model, eval_batches(encoded, 100, 0, 1, tok.pad_id), device)
    correct = anyform = 0
    for s in range(0, len(held_out), 250):
        chunk = held_out[s : s + 250]
        replies = generate(model, [data.encode_prompt(tok, e.system, e.prompt) for e in chunk], 160,
                           tok.eos_id, tok.pad_id, greedy=True)
        for r, e in zip(replies, chunk):
            text, truth = tok.decode(r), demo_world.reference_answer(e.prompt)
            correct += demo_world.extract_answer(text) == truth
            anyform += (demo_world.extract_answer(text) or _base_answer(text)) == truth
    n_params = sum(p.numel() for p in model.parameters())
    return dict(exact_match=correct / len(held_out), any_form=anyform / len(held_out),
                top1_agreement=tf["top1_agreement"], nll=tf["nll"], params=n_params,
                **exact_metrics(model, ex, device))


def _base_answer(text: str) -> str | None:
    """The final number of a base-style reply ("... Total: 8 apples."), for the any-form accuracy."""
    hits = re.findall(r"Total: (-?\d+)", text)
    return str(int(hits[-1])) if hits else None


def evaluate_all(models: dict, w: dict, tok: data.Tokenizer, device, a, evals_path: str) -> dict:
    """label -> [model dirs] -> label -> [metric dicts]; each model evaluated once (cached in evals_path)."""
    cached = json.load(open(evals_path)) if os.path.exists(evals_path) else {}
    ex = None
    rows = {}
    for label, paths in tqdm(models.items(), desc="eval", dynamic_ncols=True):
        for p in paths:
            if p not in cached or "kl" not in cached[p]:
                ex = ex or exact_teacher(w, tok, a.n_exact)
                cached[p] = eval_model(p, w, tok, device, ex)
                data.atomic_write(evals_path, json.dumps(cached, indent=1))
        rows[label] = [cached[p] for p in paths]
    return rows


def write_results(out: str, name: str, header: str, table: str, payload: dict) -> None:
    data.atomic_write(f"{out}/{name}.md", header + "\n" + table + "\n")
    data.atomic_write(f"{out}/{name}.json", json.dumps(payload, indent=1).encode())
    print("\n" + header + "\n" + table + f"\n\nwritten: {out}/{name}.md, {out}/{name}.json", flush=True)
