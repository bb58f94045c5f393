"""A training run of either script: its flags and inputs, where it stands (the optimizer step, the checkpoint
it resumed from, the best held-out evaluation so far) and its record (metrics.jsonl, the progress bar,
held-out evaluation). The scripts' loops call it between optimizer steps; a method that can end the
process says so in its name.

Every method that takes part in a collective says so; every rank must call it with the same values (the
training steps all_reduce theirs).
"""

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import fast
import proxykd as pk
import ranks
import sharding
from model import read_hf_config


def flags_parser(config_cls, doc: str) -> argparse.ArgumentParser:
    """One --flag per field of a flat hyperparameter dataclass, defaults from the dataclass (bool fields
    are store_true switches)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for f in dataclasses.fields(config_cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    return p


@dataclasses.dataclass
class Run:
    cfg: Any  # the script's Config: its flags
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    tok: data.Tokenizer | None = None
    encoded: dict = dataclasses.field(default_factory=dict)  # example id -> data.encode_example dict
    evals: list = dataclasses.field(default_factory=list)  # this rank's held-out batches (eval_batches)
    model: Any = None  # the (sharded) LoRA model being trained
    optimizer: Any = None
    step: int = 0  # optimizer steps done
    total: int = 0  # optimizer steps planned
    best: dict | None = None  # --keep_best: {"step", "eval_nll"} of the lowest held-out NLL so far
    resumed: bool = False  # restored from a checkpoint

    @classmethod
    def launch(cls, cfg) -> "Run":
        """This rank's part of a run: the process group and device (ranks.init_distributed), the seed, the
        output dir. Stops every rank when --out holds checkpoints and --resume is not given."""
        rank, world, device = ranks.init_distributed(cfg)
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank and for every world size
        checkpoints.check_out_dir(cfg.out, cfg.resume, rank)
        return cls(cfg, rank, world, device)

    def read_inputs_or_exit(self) -> tuple[list[data.Example], list[data.Example], int]:
        """The tokenizer (into self.tok), the teacher data, the held-out data and --base's vocabulary size.
        Every rank reads the same files and a bad one stops every rank alike, in one line naming the file
        (and line) and what was expected: no rank is left waiting in a collective for one that died."""
        cfg = self.cfg
        fields = dict(prompt_field=cfg.prompt_field, response_field=cfg.response_field,
                      system_field=cfg.system_field or None)
        try:
            vocab = read_hf_config(cfg.base)["vocab_size"]
            sharding.check_weights(cfg.base)
            self.tok = data.Tokenizer(cfg.tokenizer)
            examples = data.read_jsonl(cfg.data, **fields)
            held_out = data.read_jsonl(cfg.eval_data, **fields) if cfg.eval_data else []
        except (ValueError, OSError, KeyError) as e:
            ranks.fail(self.rank, f"bad input: {e}")
        if self.tok.vocab_size > vocab:
            ranks.fail(self.rank, f"tokenizer has {self.tok.vocab_size} tokens, {cfg.base} only {vocab}")
        return examples, held_out, vocab

    def encode(self, ids: list[int], examples: list[data.Example], held_out: list[data.Example]) -> None:
        """Tokenise the examples this run trains on (by id) and this rank's share of the held-out set."""
        self.encoded = {i: data.encode_example(self.tok, examples[i], self.cfg.max_len) for i in ids}
        held = [data.encode_example(self.tok, e, self.cfg.max_len) for e in held_out]
        self.evals = eval_batches(held, self.cfg.eval_batch_size, self.rank, self.world, self.tok.pad_id)

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam (the paper's) or plain SGD at a constant --lr, over the trainable (LoRA) tensors only."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.cfg.lr
        return (torch.optim.Adam(params, lr=lr) if self.cfg.optimizer == "adam"
                else torch.optim.SGD(params, lr=lr))

    # ---- resume and the record ----

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def restore_checkpoint_or_exit(self) -> None:
        """Collective. The newest checkpoint in --out/checkpoints, if any, into the model and optimizer:
        the step, the LoRA, Adam's state, every rank's RNG and the best evaluation. Stops every rank when
        the checkpoint's global batch differs from this run's (its data order would not continue)."""
        state = checkpoints.load_checkpoint(os.path.join(self.cfg.out, "checkpoints"), self.model,
                                            self.optimizer)
        if state is None:
            return
        if state["global_batch"] != self.global_batch:
            ranks.fail(self.rank, f"checkpoint has global batch {state['global_batch']}, "
                                  f"this run {self.global_batch}: "
                                  f"same --batch_size * --grad_accum * world size needed to resume")
        self.step, self.best = state["step"], state.get("best")
        self.resumed = True

    def start(self, total: int, records: list[dict], desc: str, evaluate: bool = True) -> None:
        """Collective. Open metrics.jsonl and the progress bar for `total` optimizer steps. A fresh run
        starts the file with `records` (the config first) and the held-out evaluation of the untrained
        model; a resumed one keeps its lines up to the checkpoint's step."""
        self.total = total
        if self.model is not None and records:  # where the model actually is, beside the flags that chose it
            records[0] = {**records[0], "devices": sorted({str(p.device) for p in self.model.parameters()})}
        path = os.path.join(self.cfg.out, "metrics.jsonl")
        if self.rank == 0:
            if self.resumed:
                truncate_metrics(path, self.step)
            elif os.path.exists(path):
                os.remove(path)
        self._metrics = open(path, "a") if self.rank == 0 else None
        if self.resumed:
            self.log({"step": self.step, "resumed_from": self.step})
        else:
            for r in records:
                self.log(r)
            if evaluate:
                self.evaluate({"stage": "init"})
        self.pbar = tqdm(total=total, initial=self.step, desc=desc, disable=self.rank != 0,
                         dynamic_ncols=True)
        self.reset_clock()

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (rank 0 writes it, flushed at once)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def reset_clock(self) -> None:
        """Start tokens/s afresh (after work that forwards no training tokens)."""
        self.t_log, self.tokens = time.time(), 0.0

    def evaluate(self, tags: dict) -> None:
        """Collective: held-out NLL and top-1 agreement (`evaluate`), logged with `tags`. With --keep_best,
        an evaluation whose NLL is the lowest so far keeps the adapter in --out/best/adapter."""
        if not self.evals:
            return
        ev = evaluate(self.model, self.evals, self.device, self.cfg.loss)
        self.log({"step": self.step, **tags, **{f"eval_{k}": v for k, v in ev.items()}})
        if self.cfg.keep_best and (self.best is None or ev["nll"] < self.best["eval_nll"]):
            checkpoints.save_adapter(os.path.join(self.cfg.out, "best", "adapter"), self.model)
            self.best = {"step": self.step, "eval_nll": ev["nll"]}

    def log_step(self, values: dict, tokens: float, tags: dict, end: bool) -> None:
        """Optimizer step self.step + 1 is done: count it, and log `values` (loss first) with `tags` every
        --log_every steps and at a stage's `end`; `tokens` were forwarded by it (for tokens/s)."""
        self.step += 1
        ranks.crash_point("step")  # the update is applied, not yet checkpointed
        self.pbar.update(1)
        self.tokens += tokens
        if self.step % self.cfg.log_every == 0 or end:
            tok_s = self.tokens / max(time.time() - self.t_log, 1e-9)
            self.log({"step": self.step, **tags, **values, "tokens_per_s": tok_s})
            self.pbar.set_postfix(**tags, loss=f"{values['loss']:.4f}")
            self.reset_clock()

    def exit_non_finite(self, loss: float, tags: dict) -> None:
        """Stop every rank after a step whose loss is not finite on some rank (the step applied no update),
        naming the last good checkpoint to resume from."""
        self.log({"step": self.step, **tags, "error": "non-finite loss", "loss": loss})
        where = "".join(f", {k} {v}" for k, v in tags.items())
        last = checkpoints.latest_checkpoint(os.path.join(self.cfg.out, "checkpoints"))
        ranks.fail(self.rank, f"non-finite loss at step {self.step}{where}; no update applied; the last good "
                              f"checkpoint is {last}: resume from it with a lower --lr", 3)

    def end_step(self, sums: torch.Tensor, n_losses: int, tokens: float, values):
        """Collective: the end of an optimizer step. `sums` (fp64 on the device) holds this rank's sums
        over its micro-batches, the step's `n_losses` losses first, its last slot left for `tokens`, the
        tokens it forwarded. Summed over ranks, the losses divided by the world size (each rank scaled its
        own up by it, since FSDP2 averages gradients over ranks), and read back in the step's one wait for
        the device -> values(*sums). The optimizer steps only when values.finite, the same on every rank
        (the caller stops the run otherwise); the gradients are cleared either way."""
        sums[-1].fill_(tokens)  # a host count: a fill, not a copy to the device
        dist.all_reduce(sums)
        sums[:n_losses] /= self.world
        out = values(*sums.tolist())
        if out.finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def checkpoint_due(self, end: bool) -> bool:
        """A checkpoint at a stage's end, every --save_every steps, and where --stop_after_steps stops."""
        cfg = self.cfg
        return end or bool(cfg.save_every and self.step % cfg.save_every == 0) or self.stopping()

    def stopping(self) -> bool:
        return bool(self.cfg.stop_after_steps) and self.step == self.cfg.stop_after_steps < self.total

    def save_checkpoint(self) -> None:
        """Collective: the LoRA, optimizer and loop state after self.step steps
        (checkpoints.save_checkpoint)."""
        state = {"step": self.step, "global_batch": self.global_batch, "best": self.best}
        checkpoints.save_checkpoint(os.path.join(self.cfg.out, "checkpoints"), self.model, self.optimizer,
                                    state, self.cfg.keep_checkpoints)
        self.t_log = time.time()  # tokens/s leaves out checkpoint time

    def exit_if_stopping(self) -> None:
        """--stop_after_steps (testing, debugging): end every rank once that many steps are done and
        checkpointed."""
        if self.stopping():
            self.pbar.close()
            self.log({"step": self.step, "stopped_after_steps": self.step})
            ranks.finish(0)

    def save_outputs(self, provenance: dict | None = None) -> None:
        """Collective: the trained adapter and merged model in --out (checkpoints.save_final), and with
        --keep_best the kept one's in --out/best; then the run's last metrics line."""
        self.pbar.close()
        cfg = self.cfg
        dtype = getattr(torch, cfg.merged_dtype) if cfg.merged_dtype else None
        checkpoints.save_final(cfg.out, self.model, cfg.tokenizer, cfg.base, dtype, provenance)
        if self.best is not None:
            best = os.path.join(cfg.out, "best")
            checkpoints.save_final(best, self.model, cfg.tokenizer, cfg.base, dtype, provenance,
                                   adapter_dir=os.path.join(best, "adapter"))
            self.log({"step": self.step, "best_step": self.best["step"],
                      "best_eval_nll": self.best["eval_nll"]})
        self.log({"step": self.step, "done": True, "final": os.path.join(cfg.out, "final")})


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of a metrics JSONL logged after optimizer step `step` (on resume they are about
    to be logged again), so a resumed run's file reads like an uninterrupted one. Rank 0 only."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                pass
    data.atomic_write(path, "".join(keep))


# ---------------------------------------------------------------------------------------------------
# the loss heads


def head(model, tokens: torch.Tensor, loss: str, reference, fused):
    """The model's output under --loss: `reference(logits)` on the full (B, T, V) logits, proxykd.py's
    functions as the paper writes them; or (the default) `fused(hidden, weight)` as the model's head_fn,
    their twin in fast.py, which gives the same numbers up to float rounding without ever holding
    (B, T, V) logits (and under FSDP2 runs inside the root forward, where lm_head's weight is whole)."""
    if loss == "reference":
        return reference(model(tokens))
    return model(tokens, head_fn=fused)


# ---------------------------------------------------------------------------------------------------
# held-out evaluation


def eval_batches(encoded: list[dict], batch_size: int, rank: int, world: int, pad_id: int) -> list[dict]:
    """Held-out examples (data.encode_example dicts) -> this rank's collated batches for `evaluate`.

    Rank r takes examples r, r + world, ... Every rank gets the same number of batches (FSDP needs
    every rank in every forward); a rank that runs out gets a filler batch with all labels -100, which
    adds nothing to the sums.
    """
    mine = encoded[rank::world]
    n = math.ceil(math.ceil(len(encoded) / world) / batch_size)
    out = []
    for b in range(n):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        batch = data.collate(chunk or encoded[:1], pad_id)
        if not chunk:
            batch["labels"].fill_(pk.IGNORE_INDEX)
        out.append(batch)
    return out


@torch.no_grad()
def evaluate(model, batches: list[dict], device, loss: str = "fused") -> dict:
    """Teacher-forced held-out metrics over every rank's batches (collective: every rank runs every
    forward, sums are all_reduced).

    batches: collate dicts (input_ids (B, T), labels (B, T), -100 off-response) from eval_batches.
    loss: "reference" computes the full logits and proxykd.topk_logps, "fused" the same from fast.py.
    Returns nll = -sum log pi(y_t | x, y_<t) / #response tokens (per-token held-out NLL, Eq. 3 on
    held-out data), top1_agreement = fraction of response positions where the model's argmax equals the
    teacher's token (the paper's Fig. 5 metric), and tokens = #response tokens scored.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # -log p, agreements, tokens
    for batch in batches:
        input_ids, labels = (data.to_device(batch["input_ids"], device),
                             data.to_device(batch["labels"], device))
        # k = 1: the top-k is the argmax, and seq the teacher-forced log-likelihood
        ids, _, seq = head(model, input_ids, loss, lambda logits: pk.topk_logps(logits, labels, 1),
                           lambda h, w: fast.topk_logps_chunked(h, w, labels, 1))
        mask = pk.response_mask(labels)
        agree = (ids[..., 0].long() == labels[:, 1:]) & mask
        sums += torch.stack([-seq.sum().double(), agree.sum().double(), mask.sum().double()])
    dist.all_reduce(sums)
    model.train(was_training)
    nll, agree, n = sums.tolist()
    return {"nll": nll / max(n, 1), "top1_agreement": agree / max(n, 1), "tokens": int(n)}
