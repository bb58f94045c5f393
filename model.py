"""A self-contained Llama (Llama-1/2 family incl. GQA) with Hugging Face parameter names, a KV cache and
batched generation.

Loads and saves the HF layout (config.json + model.safetensors, or a sharded model.safetensors.index.json)
without transformers. Parity with transformers' LlamaForCausalLM is tested against logits that HF itself
produced (scripts/make_hf_fixture.py -> testdata/hf_tiny/).

Shapes: B batch, T new tokens, S = keys seen so far (cache + T), D dim, H query heads, G kv heads,
hd head dim, V vocab.

Padding conventions:
- training batches are right-padded: pad keys come after every real key, so plain causal attention is
  exact for the real positions and no mask is needed;
- generation is left-padded: it passes position_ids (so each row's RoPE starts at 0 on its first real token)
  and a key-padding mask (B, S).
"""
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention (GQA)
    head_dim: int | None = None  # None -> dim // n_heads
    hidden_dim: int = 11008  # SwiGLU inner size
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # recorded as max_position_embeddings; RoPE itself is computed for any position
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelArgs":
        """config.json of a LlamaForCausalLM -> ModelArgs. Refuses features this model does not implement
        rather than silently computing something else."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d.get('model_type')!r} is not 'llama'")
        # transformers < 5 writes rope_theta (+ rope_scaling), >= 5 writes rope_parameters
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"RoPE scaling {rope} is not supported")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise NotImplementedError("attention_bias / mlp_bias are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={d['hidden_act']!r} is not supported")
        return cls(
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            hidden_dim=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            max_seq_len=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
        )

    def to_hf_config(self) -> dict:
        """ModelArgs -> config.json keys of a transformers LlamaForCausalLM (torch_dtype is added on save)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
        }


PRESETS = {
    # unit tests: GQA (2 query heads per kv head) so every code path is exercised
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=256),
    # meta-llama/Llama-2-*-hf config.json
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000,
                       max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, vocab_size=32000,
                        max_seq_len=4096),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=32000,
                        max_seq_len=4096),
}


def read_hf_config(path: str) -> dict:
    """path/config.json of an HF-format checkpoint dir, as a dict. Raises ValueError with a one-line
    message naming the path and what was expected (the train scripts print it as is)."""
    expected = "expected an HF-format checkpoint dir (config.json + *.safetensors)"
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such directory; {expected}")
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no config.json; {expected}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg}); {expected}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back BEFORE the weight multiply: the order HF uses, so bf16 results match.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies (hd/2,) fp32, one per rotated pair."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, T, hd) in fp32. inv_freq: rope_inv_freq(head_dim, theta) on
    position_ids' device, or None to compute it here.

    Computed per forward from the positions rather than kept in buffers: a buffer would be cast by
    `model.to(torch.bfloat16)` (positions > 256 then collide in bf16), would be left on the meta device by
    from_pretrained, and would have to be sized to a maximum length. Costs B*T*hd trig ops per forward.
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: both halves share a frequency
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd), cos/sin (B, T, hd) -> x rotated, in their promoted dtype.

    Llama.forward passes cos/sin in the activations' dtype, as transformers does, so a bf16 model rounds
    as HF's does (and skips an fp32 round trip of q and k per layer; RESULTS.md, "RoPE").
    Rotate-half (HF layout), not interleaved pairs (Meta's original): HF checkpoints permute q/k weights for
    it, so loading them needs no permutation."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys/values of every layer for one batched generation, passed into forward (not module buffers:
    FSDP2 and state_dict never see it). Storage is allocated on the first update with the incoming k/v's
    dtype, device and batch size.

    Usage: cache = KVCache(max_len); model(prompt, cache=cache); model(next_token, cache=cache); ...
    `len` is the number of positions already stored; the model advances it after each forward.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.len = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, G, T, hd) of the new positions -> all keys/values so far, (B, G, len + T, hd)."""
        B, G, T, hd = k.shape
        if self.len + T > self.max_len:
            raise ValueError(f"KVCache overflow: {self.len} + {T} > max_len {self.max_len}")
        if layer not in self.k:
            self.k[layer] = k.new_zeros(B, G, self.max_len, hd)
            self.v[layer] = v.new_zeros(B, G, self.max_len, hd)
        end = self.len + T
        self.k[layer][:, :, self.len : end] = k
        self.v[layer][:, :, self.len : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_extra_bytes(args: ModelArgs, rows: int, keys: int, itemsize: int) -> int:
    """Transient bytes a masked attention call of one layer adds for GQA (Attention.forward): k and v
    repeated from G to H heads, 2 * rows * H * keys * hd * itemsize, with keys = the cached positions plus
    the new ones (at most prompt + max_new_tokens) and itemsize the activations'; 0 without GQA. Freed
    before the next layer. Pass tensor-parallel args (tensor_parallel.tp_args) for a rank's share."""
    if args.n_kv_heads == args.n_heads:
        return 0
    return 2 * rows * args.n_heads * keys * args.head_dim * itemsize


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KVCache is ours
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        """x (B, T, D); mask None (causal) or bool (B or 1, 1, T, S), True = may attend."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, G, S, hd)
        # enable_gqa: query head h reads kv head h // (H // G), HF's repeat_kv grouping. The kernel SDPA
        # picks on CUDA: unmasked (training, is_causal) flash, which takes GQA. Masked (generate's prefill
        # and decode steps): flash takes no mask, the memory-efficient kernel no GQA, cuDNN is picked only
        # on Hopper with a recent cuDNN and never under deterministic mode, so masked GQA would fall to
        # the math kernel (fp32 upcast, the cache repeated per layer per token). So a masked GQA call
        # repeats the kv heads here, in the activations' dtype and the same grouping (attention_extra_bytes),
        # and the memory-efficient kernel takes it with the mask (generate keeps cuDNN out, which would
        # build a graph per key count: _without_cudnn_attention). On the CPU both forms run the flash
        # kernel, which gives bitwise the same output for the repeated heads.
        gqa = self.n_kv_heads != self.n_heads
        if gqa and mask is not None:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args, i) for i in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.apply(self._init_weights)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)  # HF initializer_range

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head_fn: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
    ):
        """tokens (B, T) long -> logits (B, T, V) in the parameters' dtype, or head_fn(h, lm_head.weight)
        with h (B, T, D) the final-normed hidden states.

        head_fn runs the output layer inside this forward, so under FSDP2 it sees the unsharded lm_head
        weight (V, D) (outside forward that weight is a sharded DTensor); chunked losses use it to never
        materialise (B, T, V) logits.

        position_ids (B, T): default cache.len + arange(T). attn_mask: None, a key-padding mask (B, S) bool
        (True = real token) over every key seen so far (cache + these T), or a ready bool mask
        (B, 1, T, S). Without mask and cache, attention is plain causal (right-padded training batches).
        With a cache, a causal mask aligned to the LAST key is built: SDPA's is_causal is aligned to the
        first key when T != S, which would be wrong for decode steps.
        """
        B, T = tokens.shape
        past = cache.len if cache is not None else 0
        S = past + T
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=tokens.device)).expand(B, T)
        inv_freq = getattr(self, "_inv_freq", None)
        if inv_freq is None or inv_freq.device != tokens.device:
            # a plain attribute, not a buffer (see rope_cos_sin): computed once per device, not per forward
            inv_freq = self._inv_freq = rope_inv_freq(self.args.head_dim, self.args.rope_theta, tokens.device)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, inv_freq)

        mask = None
        if attn_mask is not None and attn_mask.dim() == 4:
            mask = attn_mask.bool()
        elif attn_mask is not None or cache is not None:
            q_pos = past + torch.arange(T, device=tokens.device)[:, None]  # (T, 1) absolute query positions
            k_pos = torch.arange(S, device=tokens.device)[None, :]  # (1, S)
            mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S) causal, bottom-right aligned
            if attn_mask is not None:
                if attn_mask.shape != (B, S):
                    raise ValueError(f"attn_mask {tuple(attn_mask.shape)} != (B, S) = {(B, S)}")
                # A padded query still attends to itself: some SDPA backends return NaN for a fully masked
                # row (CPU returns 0), and NaN at pad keys would leak into real rows as 0 * NaN later.
                mask = (mask & attn_mask.bool()[:, None, None, :]) | (k_pos == q_pos)

        x = self.model.embed_tokens(tokens)  # (B, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.len = S
        h = self.model.norm(x)
        if head_fn is not None:
            return head_fn(h, self.lm_head.weight)
        return self.lm_head(h)  # (B, T, V)

    # ---- HF-format checkpoints ----

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, device="cpu") -> "Llama":
        """path/config.json + path/model.safetensors (or model.safetensors.index.json and its shards)."""
        args = ModelArgs.from_hf_config(read_hf_config(path))
        sd = {}
        for file in sorted(set(weight_files(path).values())):
            with safe_open(file, framework="pt", device=str(device)) as f:
                for k in f.keys():
                    if k.endswith("rotary_emb.inv_freq"):  # stored by old HF versions; recomputed here
                        continue
                    sd[k] = f.get_tensor(k).to(dtype)
        if args.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # HF omits it; it is embed_tokens.weight
        with torch.device("meta"):  # no wasted random init of a model about to be overwritten
            model = cls(args)
        expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = expected - sd.keys(), sd.keys() - expected
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match config.json: missing {sorted(missing)[:8]}, "
                             f"unexpected {sorted(unexpected)[:8]}")
        model.load_state_dict(sd, strict=False, assign=True)
        if args.tie_word_embeddings:
            # assign=True replaced the shared Parameter
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        """Write config.json + model.safetensors (or shards + index when larger than max_shard_size bytes).

        Each file is written to a .tmp name and renamed into place, index/model file last, so a crash leaves
        the previous checkpoint loadable. LoRA tensors are not part of the HF layout: the model must hold
        merged LoRA (lora.merge_lora) or none. Call it on an unsharded model.
        """
        for name, m in self.named_modules():
            if hasattr(m, "lora_A") and not getattr(m, "merged", False):
                raise ValueError(f"{name} holds unmerged LoRA weights: lora.merge_lora(model) first, "
                                 "or save the adapter with lora.save_adapter")
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if ".lora_" not in k}
        if self.args.tie_word_embeddings:
            sd.pop("lm_head.weight")  # shared with embed_tokens; safetensors refuses aliased tensors
        os.makedirs(path, exist_ok=True)

        shards, size = [{}], 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        names = shard_file_names(len(shards))
        for name, shard in zip(names, shards):
            # HF needs "format"
            save_file(shard, os.path.join(path, name + ".tmp"), metadata={"format": "pt"})
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        commit_shards(path, self.args, next(iter(sd.values())).dtype, names, weight_map, total)


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, in an HF-format checkpoint dir (model.safetensors,
    or model.safetensors.index.json and its shards)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        return {k: file for k in f.keys()}


def shard_file_names(n: int) -> list[str]:
    """HF's names of a checkpoint's n safetensors files."""
    return (["model.safetensors"] if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])


def commit_shards(path: str, args: ModelArgs, dtype: torch.dtype, names: list[str],
                  weight_map: dict[str, str], total: int) -> None:
    """Finish an HF-format save whose files `names` were written as <name>.tmp: config.json, then the
    files renamed into place, the index / single file last, so a crash leaves the previous checkpoint
    loadable; a leftover of the other layout from an earlier save (which would take precedence on load,
    or be read with the wrong tensors) is removed. weight_map: tensor name -> file; total: bytes."""
    dtype_name = str(dtype).split(".")[-1]
    config = {**args.to_hf_config(), "torch_dtype": dtype_name, "dtype": dtype_name}  # old, new HF key
    _atomic_write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2) + "\n")
    index = os.path.join(path, "model.safetensors.index.json")
    for name in names[1:] + names[:1]:
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
    if len(names) == 1:
        if os.path.exists(index):
            os.remove(index)
    else:
        _atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2) + "\n")
        if os.path.exists(os.path.join(path, "model.safetensors")):
            os.remove(os.path.join(path, "model.safetensors"))


def _atomic_write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---- generation ----


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,) long, on the logits' device. Greedy = argmax (also when
    temperature == 0).

    Top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches top_p (the top
    token always). The uniforms come from `generator` (torch's global CPU generator when None), and the
    search runs where the logits are: a CPU generator draws the same numbers whatever device the model
    is on, and nothing of size V crosses to the host. u: (B,) fp64 uniforms already drawn (generate
    draws a call's worth at once), used instead of drawing from `generator`."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        before = _cumsum_rows(p_sorted) - p_sorted  # mass of strictly more likely tokens
        p_sorted = p_sorted.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
    # inverse-CDF sampling: one uniform per row against the fp64 cumulative distribution. It draws from
    # the same categorical as torch.multinomial, which spends an exponential variate per vocabulary entry
    # (RESULTS.md, "Sampling"). A zero-probability token
    # is never drawn: its cdf equals its predecessor's, and the search is for the first cdf > u * total.
    cdf = _cumsum_rows(probs.to(torch.float64))  # (B, V)
    if u is None:
        u = torch.rand(cdf.shape[0], generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu")
    idx = torch.searchsorted(cdf, u.to(cdf.device)[:, None] * cdf[:, -1:], right=True)
    idx = idx.clamp(max=cdf.shape[-1] - 1)
    return idx.squeeze(-1)


def _cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) float -> its cumulative sum along V (B, V), deterministic, in O(B V) memory."""
    if not torch.are_deterministic_algorithms_enabled():
        return x.cumsum(-1)
    # Under deterministic mode, torch releases with the C++ port of the _refs cumsum decomposition (late
    # 2024; 2.11 scans instead) compute a CUDA floating cumsum as sum(where(tril mask, x, 0)): a (B, V, V)
    # tensor, 8 GB per fp64 row at V = 32k. Off deterministic mode, a last-dim cumsum of two or more rows
    # runs ATen's scan_innermost_dim kernel: one row per thread row, a fixed Sklansky tree in shared
    # memory, no atomics, so run-to-run deterministic (one row would go to cub's device-wide scan, whose
    # decoupled look-back is not: it is scanned as two). On the CPU either mode is a serial loop per row.
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return (x.expand(2, -1) if x.shape[0] == 1 else x).cumsum(-1)[: x.shape[0]]
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


@contextmanager
def gathered(model: nn.Module):
    """Keep an FSDP2 model's parameters unsharded inside the block: one all-gather per module on entry
    (collective: every rank enters together), none in the forwards inside, a local reshard on exit.
    Inside it a forward issues no collective, so ranks may run different numbers of forwards (each
    rank decodes its own rows to their own end). Re-entrant; a no-op on a model without FSDP."""
    fsdp = _fsdp_modules(model)
    if not fsdp or getattr(model, "_gathered", False):
        yield model
        return
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    model._gathered = True
    try:
        yield model
    finally:
        model._gathered = False
        for m in fsdp:
            m.reshard()
            # back to fully_shard's defaults: blocks reshard after forward, the root does not (its
            # parameters are needed again at once by the backward)
            m.set_reshard_after_forward(m is not model, recurse=False)


@torch.no_grad()
def generate(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    all_ranks_done: bool = False,
) -> list[list[int]]:
    """Batched sampling with a KV cache. prompts: B non-empty token lists of any lengths (left-padded here).
    Returns B lists of new tokens, each cut before its first eos (eos not included), at most max_new_tokens.

    Uses the model's current mode: call model.eval() first if LoRA dropout should be off.
    On an FSDP2 model the parameters are gathered once (`gathered`: collective, every rank calls
    generate together) and the decode loop issues no collective: each rank stops when its own rows
    are done. all_ranks_done=True instead stops only when every rank's rows are done (an all_reduce
    per token), for models whose every forward is a collective (tensor-parallel decoding).

    The decode loop never waits for the device: the prompts, mask and (from a CPU generator) the call's
    uniforms cross to it once, and whether every row is done is read one step late, after the next
    forward is queued. So a batch whose rows all end before max_new_tokens runs one forward more than
    it samples from (on every rank alike). The tokens and the generator's state afterwards are those of
    a loop that drew B uniforms per step and stopped at once.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    B, L, T = len(prompts), max(len(p) for p in prompts), max_new_tokens
    padded = [[pad_id] * (L - len(p)) + list(p) for p in prompts]
    tokens = to_device(torch.tensor(padded, dtype=torch.long), device)
    # key-padding mask (B, L + T) over prompt and new tokens: step t reads only columns < L + t + 1, all real
    start = torch.tensor([L - len(p) for p in prompts])
    valid = to_device(torch.arange(L + T) >= start[:, None], device)
    # each row's positions count from its first real token, as if it were alone
    position_ids = (valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    next_pos = position_ids[:, -1:] + 1  # (B, 1)

    # A CPU generator's uniforms for the whole call, drawn at once: CPU float64 uniforms are drawn
    # serially, one 64-bit number each (ATen's uniform_kernel is a cpu_serial_kernel), so row t is what a
    # per-step draw of B would have been at step t. Rewound afterwards and advanced by the steps sampled.
    gen = torch.default_generator if generator is None else generator
    state = gen.get_state() if not (greedy or temperature == 0) and gen.device.type == "cpu" else None
    u = None if state is None else to_device(torch.rand(T, B, generator=gen, dtype=torch.float64), device)
    out = []
    try:
        with gathered(model), _frozen_branches(model), _without_cudnn_attention():
            cache = KVCache(L + T)
            # only the last position's logits (B, V): a (B, L, V) prefill output would be the largest tensor
            logits = model(tokens, position_ids=position_ids, attn_mask=valid[:, :L], cache=cache,
                           head_fn=_last_logits)
            mask = valid[:, None, None, :]  # decode step t's mask (B, 1, 1, L + t + 1) is a prefix of it
            done = torch.zeros(B, dtype=torch.bool, device=device)
            open_rows = torch.zeros(T, dtype=torch.long, pin_memory=device.type != "cpu")  # after step t
            event = None if device.type == "cpu" else torch.Event(device=device)
            # read on the host through numpy, which no dispatch sees; a tensor subclass (a fake tensor, when
            # --plan --trace runs this decode) has no numpy view and is read through torch, which it answers
            open_host = open_rows.numpy() if type(open_rows) is torch.Tensor else open_rows
            for t in range(T):
                nxt = sample_next(logits, temperature, top_p, greedy, generator, None if u is None else u[t])
                nxt = nxt.masked_fill(done, pad_id)
                out.append(nxt)
                done = done | (nxt == eos_id)
                if t == T - 1:
                    break
                n_open = (~done).sum()
                if all_ranks_done:
                    torch.distributed.all_reduce(n_open)
                open_rows[t].copy_(n_open, non_blocking=True)
                if event is not None:
                    event.record()
                logits = model(nxt[:, None], position_ids=next_pos + t, attn_mask=mask[..., : L + t + 1],
                               cache=cache, head_fn=_last_logits)
                # step t's count is read with step t + 1's forward queued behind it: the device keeps busy
                if event is not None:
                    event.synchronize()
                if int(open_host[t]) == 0:
                    break
    finally:
        if state is not None:
            gen.set_state(state)
            torch.rand(len(out) * B, generator=gen, dtype=torch.float64)

    if not out:
        return [[] for _ in prompts]
    new = torch.stack(out, dim=1).tolist()  # (B, steps)
    return [row[: row.index(eos_id)] if eos_id in row else row for row in new]


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking the host (a pageable copy
    makes the host wait for it). The one way the code moves host data to a device (data.py's batches
    too)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextmanager
def _without_cudnn_attention():
    """SDPA's cuDNN kernel off inside the block when the memory-efficient one may run instead (otherwise
    the enabled kernels stay as they are). cuDNN builds an execution graph per new shape, and a decode
    meets a new key count at every step (RESULTS.md, "GPUs": several times slower than either other
    kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    if not (cuda.cudnn_sdp_enabled() and cuda.mem_efficient_sdp_enabled()):
        yield
        return
    others = ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
              (SDPBackend.MATH, cuda.math_sdp_enabled()))
    keep = [SDPBackend.EFFICIENT_ATTENTION] + [b for b, on in others if on]
    with sdpa_kernel(keep):
        yield


@contextmanager
def _frozen_branches(model: nn.Module):
    """Adapter layers that can cast their factors once per decode (lora.LoRALinear.freeze_branch) do so
    inside the block, in the activations' dtype: the weights cannot change while generate runs."""
    adapters = [m for m in model.modules() if hasattr(m, "freeze_branch")]
    for m in adapters:
        m.freeze_branch(model.model.embed_tokens.weight.dtype)
    try:
        yield
    finally:
        for m in adapters:
            m.thaw_branch()


def _last_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(h[:, -1], w)  # (B, D) -> (B, V)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
