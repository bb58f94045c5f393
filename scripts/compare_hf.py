"""scripts/benchmark.py --compare_hf: the same steps with transformers + peft, side by side with ours
(see benchmark.py's docstring). Imported by benchmark.py only with that flag; transformers and peft
import inside the functions, as they are not requirements."""

import resource
import sys

import torch

import lora
import topk_cache
import train_proxy as tp
import train_student as ts
from bench_workload import CONFIGS, RandomCache, batch, lora_model, timed
from model import Llama, ModelArgs, generate
from run import Run


def minor_faults() -> int:
    """Minor page faults of this process so far: on the CPU, each is a fresh page the kernel mapped and
    zeroed for an allocation (what benchmark.py's docstring says of --compare_hf)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def hf_lora_model(base: Llama, dtype, device):
    """transformers LlamaForCausalLM with base's weights (copied) + peft LoRA r 8 / alpha 16 on the same
    7 linears, and the same optimizer as lora_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**base.args.to_hf_config())
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).to(dtype)
    hf.load_state_dict(base.state_dict())
    hf = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                       target_modules=list(lora.TARGETS)))
    hf.to(device).train()
    opt = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=1e-5)
    return hf, opt


def hf_step(model, opt, loss_fn) -> None:
    loss_fn(model).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def compare_config(name: str, dtype: torch.dtype, device, a) -> list[dict]:
    """Ours vs transformers + peft on one config and base dtype: one row per step, median tokens/s."""
    import proxykd as pk
    from transformers import GenerationConfig

    spec = CONFIGS[name]
    args = ModelArgs(**spec["args"])
    s = spec["cuda" if device.type == "cuda" else "cpu"]
    B, T, P, new = s["B"], s["T"], s["prompt"], s["new"]
    torch.manual_seed(0)
    base = Llama(args).to(dtype)
    theirs, t_opt = hf_lora_model(base, dtype, device)
    ours, o_opt = lora_model(args, dtype, device, base)

    torch.manual_seed(1)
    b1 = batch(B, T, P, args.vocab_size, device)  # stage 1: B sequences
    b2 = batch(2 * B, T, P, args.vocab_size, device, n=B)  # stage 2: [y; y_hat]
    b2["ref_chosen"] = b2["ref_rejected"] = torch.zeros(B, device=device)
    sb = batch(B, T, P, args.vocab_size, device)
    cache = RandomCache(T - P, args.vocab_size)
    weights = {i: 0.5 for i in range(B)}
    top_ids, top_lps = topk_cache.pad_topk(cache.rows(sb["ids"]), sb["labels"])
    w = torch.full((B,), 0.5, device=device)
    cfg, scfg = tp.Config(beta=0.1), ts.Config(alpha=100.0)
    run, srun = (Run(cfg, device=device, model=ours, optimizer=o_opt),
                 Run(scfg, device=device, model=ours, optimizer=o_opt))
    prompts = torch.randint(4, args.vocab_size, (B, P)).tolist()
    gen_cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new,
                               min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    prompt_ids = torch.tensor(prompts, device=device)

    def their_dpo(m):
        lp = pk.sequence_logps(m(input_ids=b2["input_ids"]).logits, b2["labels"])
        n = pk.num_response_tokens(b2["labels"][:B])
        return pk.proxy_loss(lp[:B], lp[B:], b2["ref_chosen"], b2["ref_rejected"], n, cfg.beta).loss

    def their_student(m):
        logits = m(input_ids=sb["input_ids"]).logits
        return pk.student_loss(logits, sb["labels"], top_ids, top_lps, w, scfg.alpha).loss

    def decode(ours_side: bool):
        model = ours if ours_side else theirs
        model.eval()
        if ours_side:
            generate(ours, prompts, new, eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0))
        else:
            with torch.no_grad():
                theirs.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                generation_config=gen_cfg)
        model.train()

    steps = {  # name: (tokens per call, ours, theirs)
        "stage-1 NLL step": (B * T, lambda: tp.train_step(run, [b1]),
                             lambda: hf_step(theirs, t_opt, lambda m: m(input_ids=b1["input_ids"],
                                                                        labels=b1["labels"]).loss)),
        "stage-2 NLL+DPO step": (2 * B * T, lambda: tp.train_step(run, [b2]),
                                 lambda: hf_step(theirs, t_opt, their_dpo)),
        "student NLL+KL step": (B * T, lambda: ts.student_step(srun, [sb], cache, weights),
                                lambda: hf_step(theirs, t_opt, their_student)),
        "sampling": (B * new, lambda: decode(True), lambda: decode(False)),
    }
    rows = []
    median = lambda xs: sorted(xs)[len(xs) // 2]
    for step, (n_tok, f_ours, f_theirs) in steps.items():
        f_ours(), f_theirs()  # warm-up
        ours_s, theirs_s, ours_f, theirs_f = [], [], [], []
        for _ in range(a.repeats):
            f0 = minor_faults()
            ours_s.append(n_tok / timed(f_ours, a.steps, device, warmup=False))
            f1 = minor_faults()
            theirs_s.append(n_tok / timed(f_theirs, a.steps, device, warmup=False))
            ours_f.append((f1 - f0) / a.steps)
            theirs_f.append((minor_faults() - f1) / a.steps)
        o, t = median(ours_s), median(theirs_s)
        rows.append(dict(config=name, dtype=str(dtype).replace("torch.", ""), step=step, ours_tok_s=o,
                         theirs_tok_s=t, ratio=o / t, ours_all=ours_s, theirs_all=theirs_s,
                         ours_faults=median(ours_f), theirs_faults=median(theirs_f)))
        print(f"  {step}: ours {o:,.0f} theirs {t:,.0f} tok/s", file=sys.stderr, flush=True)
    return rows


def compare_table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| config | base dtype | step | ours tok/s | transformers + peft tok/s | ratio "
             "| minor page faults per call, ours / theirs |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['dtype']} | {r['step']} | {r['ours_tok_s']:,.0f} "
                     f"| {r['theirs_tok_s']:,.0f} | {r['ratio']:.2f}x "
                     f"| {r['ours_faults']:,.0f} / {r['theirs_faults']:,.0f} |")
    return "\n".join(lines)
