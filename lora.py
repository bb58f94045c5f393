"""Hand-written LoRA (Hu et al., 2021) in the loralib / litgpt style, with PEFT-layout adapter files.

    y = W x + (alpha / r) * B A dropout(x),   A (r, in) kaiming-uniform, B (out, r) zero

so a fresh adapter leaves the model unchanged. The base `weight` keeps its name (HF checkpoints load as is);
the adapter parameters are `<module>.lora_A` / `<module>.lora_B`. They are fp32 even when the frozen base is
bf16: Adam updates of size lr * 1 on bf16 numbers of magnitude ~1e-2 would mostly round away. (The forward
casts them to the activations' dtype, as autocast would.)

Adapter files follow PEFT (`adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, and `adapter_config.json`), so peft.PeftModel can load them onto
transformers' LlamaForCausalLM.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear (weight (out, in) frozen, optional bias) plus a rank-r update, fp32 lora_A (r, in) and
    lora_B (out, r). merge() folds the update into the weight, explicitly and once; train()/eval() never
    merge (a mode switch must not change the weights an optimizer or checkpoint sees)."""

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # freeze_branch's casts
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as loralib / PEFT
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias Parameters."""
        with torch.device("meta"):  # skip allocating a weight that is replaced right away
            new = cls(linear.in_features, linear.out_features, r, alpha, dropout,
                      bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.lora_A = nn.Parameter(torch.empty_like(new.lora_A, device=linear.weight.device))
        new.lora_B = nn.Parameter(torch.empty_like(new.lora_B, device=linear.weight.device))
        new.reset_lora_parameters()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in the base output's dtype. The rank-r branch runs in x's dtype too, as
        under autocast: casting the (tokens, in) input and (tokens, out) output to fp32 and back costs more
        than the branch itself, so the small fp32 A and (alpha / r) B are cast instead. Their gradients
        arrive in fp32 (the casts' backward), which is what Adam needs."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a, b = self.frozen or (self.lora_A.to(x.dtype), (self.scaling * self.lora_B).to(x.dtype))
        return y + F.linear(F.linear(self.lora_dropout(x), a), b)

    @torch.no_grad()
    def freeze_branch(self, dtype: torch.dtype) -> None:
        """Cast A and (alpha / r) B to `dtype` once for the forwards that follow, until thaw_branch(): for a
        decode, whose every token would otherwise cast them again (RESULTS.md: "Sampling"). Only while
        neither changes and nothing needs their gradient: model.generate scopes it to one call."""
        self.frozen = (self.lora_A.to(dtype), (self.scaling * self.lora_B).to(dtype))

    def thaw_branch(self) -> None:
        self.frozen = None

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A, computed in fp32 and rounded once to W's dtype. Idempotent."""
        if self.merged:
            return
        w = self.weight.float() + self.scaling * (self.lora_B @ self.lora_A)
        self.weight.copy_(w.to(self.weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """Freeze every parameter of model and replace each nn.Linear whose attribute name is in targets with
    a LoRALinear (trainable fp32 lora_A / lora_B on the weight's device). In place; returns model.

    lora_A is drawn from torch's global RNG: seed identically on every rank before sharding."""
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                if isinstance(child, LoRALinear):
                    raise ValueError(f"{name}.{child_name} already has LoRA")
                setattr(module, child_name, LoRALinear.from_linear(child, r, alpha, dropout))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no nn.Linear named any of {targets} in the model")
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent). Unsharded models only. Returns model."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors keyed by parameter name ("model.layers.0.self_attn.q_proj.lora_A", ...).
    Under FSDP2 use get_model_state_dict(..., ignore_frozen_params=True) instead: it gathers the shards."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _to_param_name(key: str) -> str:
    """PEFT key ("base_model.model.X.lora_A.weight") or our parameter name ("X.lora_A") -> "X.lora_A"."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        key = key[: -len(".weight")]
    if not key.endswith((".lora_A", ".lora_B")):
        raise KeyError(f"{key!r} is not a LoRA A/B tensor name")
    return key


def _to_peft_key(name: str) -> str:
    return PEFT_PREFIX + _to_param_name(name) + ".weight"


def save_adapter(path: str, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write path/adapter_model.safetensors + path/adapter_config.json in the PEFT layout.

    state_dict: the LoRA tensors, keyed by our parameter names (lora_state_dict, get_model_state_dict) or
    by PEFT keys. config: r and alpha (or lora_alpha), optionally dropout (lora_dropout), base
    (base_model_name_or_path) and targets (target_modules; default: the module names found in state_dict).
    Files are written to .tmp names and renamed into place.
    """
    tensors = {_to_peft_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if not tensors:
        raise ValueError("save_adapter: state_dict holds no LoRA tensors")
    found = sorted({k[len(PEFT_PREFIX):].rsplit(".", 3)[-3] for k in tensors})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(config["r"]),
        "lora_alpha": config.get("lora_alpha", config.get("alpha")),
        "lora_dropout": float(config.get("lora_dropout", config.get("dropout", 0.0))),
        "target_modules": list(config.get("target_modules", config.get("targets", found))),
        "base_model_name_or_path": config.get("base_model_name_or_path", config.get("base")),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    if peft_config["lora_alpha"] is None:
        raise ValueError("save_adapter: config needs alpha (or lora_alpha)")
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, "adapter_model.safetensors")
    save_file(tensors, target + ".tmp", metadata={"format": "pt"})
    os.replace(target + ".tmp", target)
    target = os.path.join(path, "adapter_config.json")
    with open(target + ".tmp", "w") as f:
        json.dump(peft_config, f, indent=2)
        f.write("\n")
    os.replace(target + ".tmp", target)


def read_adapter(path: str) -> dict[str, torch.Tensor]:
    """path/adapter_model.safetensors -> its tensors keyed by our parameter names ("X.lora_A"), as
    load_state_dict / set_model_state_dict want them (for sharded models, where load_adapter cannot copy)."""
    return {_to_param_name(k): v
            for k, v in load_file(os.path.join(path, "adapter_model.safetensors")).items()}


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Copy path/adapter_model.safetensors into the model's LoRA parameters (applying LoRA first, with the
    adapter_config.json hyperparameters, if the model has none). Keys may be PEFT keys or our parameter
    names. Every adapter tensor must find its parameter and every LoRA parameter must be covered; r and
    alpha must agree with the model's. Unsharded, unmerged models only. Returns model."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if (cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora")
            or cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise NotImplementedError(f"{path}: only plain LoRA adapters are supported")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    mods = lora_modules(model)
    if not mods:
        targets = cfg.get("target_modules") or TARGETS
        apply_lora(model, r=r, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0), targets=tuple(targets))
        mods = lora_modules(model)
    for name, m in mods.items():
        if m.merged:
            raise ValueError(f"{name} is already merged; load the adapter into an unmerged model")
        if m.r != r or not math.isclose(m.scaling, alpha / r):
            raise ValueError(f"{path}: adapter r={r}, alpha={alpha} but {name} has r={m.r}, alpha={m.alpha}")

    tensors = read_adapter(path)
    params = {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(f"{path}: adapter does not match the model: missing {sorted(missing)[:6]}, "
                       f"unexpected {sorted(unexpected)[:6]}")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[n]
            if t.shape != p.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
            p.copy_(t)
    return model
