"""model.py: the GPT and its parts, the KV cache, sampling, and the checkpoint format every stage reads and writes.
A decoder-only transformer in the nanoGPT / GPT-2 lineage:

    ids (B, T) -> token embedding (+ learned position embedding)
               -> n_layer x Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))
               -> final norm -> linear head tied to the token embedding -> logits (B, T, V)

The design choices the lectures discuss are switches in GPTConfig, GPT-2's choices being the defaults."""

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import prepare_data


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024     # longest sequence the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True          # biases in linear layers and norms, as GPT-2
    norm: str = "layernorm"    # "layernorm" | "rmsnorm"
    mlp: str = "gelu"          # "gelu" | "swiglu"
    pos: str = "learned"       # "learned" | "rope" (rotary embeddings rotate q and k instead)
    attention: str = "sdpa"    # "sdpa" (F.scaled_dot_product_attention) | "explicit" (scores, mask, softmax, sum)
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name, allowed in {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                              "pos": ("learned", "rope"), "attention": ("sdpa", "explicit")}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model option {name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"model option {name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.n_embd // self.n_head}")

    @classmethod
    def from_dict(cls, d):
        if unknown := sorted(set(d) - {f.name for f in fields(cls)}):
            raise ValueError(f"unknown model options {unknown}")
        return cls(**d)


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring or bias."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * rms).type_as(x) * self.weight


def make_norm(config):
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size, max_len, theta=10000.0):
    """Rotary cos and sin tables (max_len, head_size // 2): channel pair i turns by pos * theta^(-2i / head_size)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by cos, sin (1, T, D/2), or (B, 1, T, D/2): per-row positions."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def causal_mask(q_len, k_len, device):
    """Boolean (q_len, k_len), True where allowed: query i, at k_len - q_len + i (after cached keys), sees up to it."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def explicit_attention(q, k, v, mask, dropout_p=0.0, training=False):
    """The lecture's attention, step by step: q (B, H, Tq, D), k, v (B, H, Tk, D), mask (Tq, Tk) -> (B, H, Tq, D)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))               # no peeking at the future
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v


class KVCache:
    """Every layer's keys and values so far, so each new token costs one position of work, not the whole context."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # positions filled so far


class CausalSelfAttention(nn.Module):
    # torch's CPU bf16 attention kernels are slower than its float32 ones, so under CPU autocast attention alone
    # runs in float32 (README, "Performance"); tests/bench/bench_dtype.py and bench_reward.py turn it off to compare.
    float32_on_cpu = True

    def __init__(self, config, layer_index):
        super().__init__()
        self.head_size = config.n_embd // config.n_head
        self.attention, self.dropout, self.layer_index = config.attention, config.dropout, layer_index
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        """attn_mask (B, 1, T, T), True where a query may see a key: instead of causal (packed rows: reward.py)."""
        B, T, _ = x.size()
        # (B, H, T, D) each, heads counted from the width (-1): under tensor parallelism (train.py) a rank holds its own
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in self.c_attn(x).chunk(3, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            end, i = cache.pos + T, self.layer_index
            cache.k[i][:, :, cache.pos:end], cache.v[i][:, :, cache.pos:end] = k, v
            k, v = cache.k[i][:, :, :end], cache.v[i][:, :, :end]
        if self.float32_on_cpu and x.device.type == "cpu" and q.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):  # else autocast casts q, k, v back to bf16
                y = self.attend(q.float(), k.float(), v.float(), attn_mask).to(q.dtype)
        else:
            y = self.attend(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, attn_mask=None):
        """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D); no mask: causal, q the last Tq of Tk positions."""
        q_len, k_len = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        # sdpa needs no mask when is_causal does it (q_len == k_len) or one new token sees all (q_len == 1)
        if attn_mask is None and (self.attention == "explicit" or q_len not in (1, k_len)):
            attn_mask = causal_mask(q_len, k_len, q.device)
        if self.attention == "explicit":
            return explicit_attention(q, k, v, attn_mask, dropout_p, self.training)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=attn_mask is None and q_len == k_len)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))), 4x wide. SwiGLU: proj(silu(gate(x)) * up(x)), 8/3x wide for as many parameters."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64) if self.kind == "swiglu" else 4 * config.n_embd
        if self.kind == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.silu(self.c_gate(x)) * self.c_fc(x) if self.kind == "swiglu" else F.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: the residual stream is only ever added to."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The GPT

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]), ln_f=make_norm(config)))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # not in checkpoints: recomputed from the config
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: logits read with the input embedding
        for module in self.modules():  # GPT-2's init: weights N(0, 0.02), biases 0
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), as each block adds two to the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self):
        """Parameters counted once (the tied head shares the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, cache=None, positions=None, attn_mask=None):
        """ids (B, T) -> final-norm hidden states (B, T, n_embd), read by forward() and later stages' heads.
        Rows packing sequences that share a prefix (reward.py) give positions (B, T) and attn_mask (B, 1, T, T)."""
        T = idx.size(1)
        if (positions is None) != (attn_mask is None) or (positions is not None and cache is not None):
            raise ValueError("hidden_states: give positions and attn_mask together, and without a cache")
        start = 0 if cache is None else cache.pos
        longest = start + T if positions is None else int(positions.max()) + 1  # a packed row may exceed block_size
        if longest > self.config.block_size:
            raise ValueError(f"sequence of {longest} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device) if positions is None else positions  # (T,) or (B, T)
        x, rope = self.transformer.wte(idx), None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # cos and sin (1, T, D/2) or (B, 1, T, D/2): one head axis, broadcast over the heads
            rope = (self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (B, T) when given;
        target -1 marks a position without one (padding, or a prompt token in SFT)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, seed=None, use_cache=True):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens (temperature 0: greedy) -> (B, T + new).
        A row that produced stop_token is finished (stop_token fills its later places); generation ends when all are."""
        if idx.size(1) + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens exceeds "
                             f"block_size {self.config.block_size}")
        was_training = self.training
        self.eval()
        generator = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = KVCache(self.config, idx.size(0), idx.size(1) + max_new_tokens, idx.device,
                        next(self.parameters()).dtype) if use_cache else None
        for _ in range(max_new_tokens):
            # feed the cache only what it has not seen (the whole prompt first); without one, the whole context
            h = self.hidden_states(idx[:, cache.pos:], cache) if use_cache else self.hidden_states(idx)
            next_id = sample_next_token(self.lm_head(h[:, -1, :]), temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_id = torch.where(finished, torch.full_like(next_id, stop_token), next_id)
                finished |= next_id == stop_token
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if stop_token is not None and bool(finished.all()):
                break
        self.train(was_training)
        return idx


def flops_per_token(config, num_params):
    """Training FLOPs per token of a GPT, PaLM appendix B: 6 per parameter plus attention's 12 * L * C * T."""
    return 6 * num_params + 12 * config.n_layer * config.n_embd * config.block_size


# peak dense bf16 tensor FLOP/s by device name fragment (vendor datasheets)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def model_flops_utilization(flops_per_tok, tokens_per_second, device_name):
    """MFU: achieved FLOP/s over the peak of a device named like 'NVIDIA H100 80GB HBM3', or None if unknown."""
    peak = next((flops for fragment, flops in PEAK_FLOPS.items() if fragment in device_name), None)
    return None if peak is None else flops_per_tok * tokens_per_second / peak


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one id per row from logits (B, V). temperature divides the logits (0: greedy argmax); top_k keeps
    the k most likely ids; top_p the smallest set of most likely ids whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # drop an id when those more likely already reach top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_responses(model, prompts, max_new_tokens, stop_token, temperature=0.0, seed=None, batch_size=64):
    """Prompts (lists of ids) -> [(response ids before the first stop_token, ended)] in order. Prompts of one length
    share a batch (the KV cache needs rectangles; no padding shifts positions); a long one keeps its latest tokens."""
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 1))
    prompts = [list(p)[-(block - max_new_tokens):] for p in prompts]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    chunks = [ids[s:s + batch_size] for _, ids in sorted(by_length.items()) for s in range(0, len(ids), batch_size)]
    results = [None] * len(prompts)
    for group, chunk in enumerate(chunks):
        idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=next(model.parameters()).device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, stop_token=stop_token,
                             seed=None if seed is None else seed + group)
        for i, row in zip(chunk, out[:, idx.size(1):].tolist()):
            ended = stop_token in row
            results[i] = (row[:row.index(stop_token)] if ended else row, ended)
    return results


def answer_prompts(model, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=None, batch_size=64):
    """Prompt texts -> [(answer text, ended), ...]: each prompt in the chat template (tokenizer.encode_chat),
    answered by generate_responses up to the end-of-turn token (greedy at temperature 0)."""
    prompt_ids = [tokenizer.encode_chat(p)[0] for p in prompts]
    end = tokenizer.special_ids[bpe.END_OF_TURN]
    answers = generate_responses(model, prompt_ids, max_new_tokens, end, temperature, seed, batch_size)
    return [(tokenizer.decode(ids), ended) for ids, ended in answers]


# -----------------------------------------------------------------------------
# Weight-only quantization: the weights stored in 8 or 4 bits, dequantized on the fly, the arithmetic in float

QUANTIZE = ("none", "int8", "int4")


def quantize_absmax(weight, bits, group_size):
    """weight (out, in) -> (q int8 (out, in), scale (out, in // group_size)): each group of group_size inputs of a
    row scaled so that its largest |w| maps to 2^(bits-1) - 1 (127, or 7), rounded. Absmax keeps w = 0 exact."""
    if weight.size(1) % group_size:
        raise ValueError(f"{weight.size(1)} input features are not a whole number of groups of {group_size}")
    qmax = 2 ** (bits - 1) - 1
    groups = weight.float().unflatten(1, (-1, group_size))  # (out, in // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax  # a zero group: any scale will do
    q = (groups / scale).round().clamp(-qmax, qmax).to(torch.int8)
    return q.flatten(1), scale.squeeze(-1)


def dequantize(q, scale):
    """q (..., in) integers, scale (..., groups) -> float (..., in): each group's integers times its scale."""
    groups = q.view(*q.shape[:-1], scale.size(-1), -1).float()
    return (groups * scale.unsqueeze(-1)).flatten(-2)


def pack_int4(q):
    """int8 in [-8, 7] (..., even in) -> uint8 (..., in // 2): two's-complement nibbles, even column low, odd high."""
    nibbles = (q & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed):
    """The inverse of pack_int4: uint8 (..., in // 2) -> int8 (..., in)."""
    signed = packed.view(torch.int8)  # the same bits; a right shift of a signed byte copies its sign bit down
    return torch.stack(((signed << 4) >> 4, signed >> 4), dim=-1).flatten(-2)  # low nibble, then high


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is kept as integers and scales: int8 with one absmax scale per output row
    (LLM.int8's vector-wise scaling), or int4 with a scale per group of group_size inputs, two values a byte
    (llama.cpp's Q4 blocks). Each forward dequantizes the weight; the bias stays float."""

    def __init__(self, weight, bias, bits, group_size=32):
        super().__init__()
        self.bits = bits
        q, scale = quantize_absmax(weight.detach(), bits, group_size if bits == 4 else weight.size(1))
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def rows(self, idx=slice(None)):
        """Rows idx (ids, any shape; default all) of the float weight, only those dequantized -> idx.shape + (in,)."""
        q = self.qweight[idx]
        return dequantize(unpack_int4(q) if self.bits == 4 else q, self.scale[idx])
    weight = property(rows)  # the whole float weight, as nn.Linear's

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantizedEmbedding(nn.Module):
    """The token embedding read from the tied head's QuantizedLinear (one copy of the table, as in float)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        return self.table.rows(idx)


def quantize_model(model, mode, group_size=32):
    """A GPT quantized in place (mode int8 or int4; none: unchanged): every linear layer, and the embedding tied
    to the head, become QuantizedLinear; norms, biases and learned positions stay float. Returns the model."""
    if mode not in QUANTIZE:
        raise ValueError(f"--quantize={mode!r} is not one of {', '.join(QUANTIZE)}")
    if mode == "none":
        return model
    bits = 8 if mode == "int8" else 4
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):  # the blocks' layers, and the head, whose weight is the embedding's
            model.set_submodule(name, QuantizedLinear(module.weight, module.bias, bits, group_size))
    model.transformer.wte = QuantizedEmbedding(model.lm_head)
    return model.requires_grad_(False)


def weight_bytes(model):
    """Bytes of what a checkpoint of model would hold: parameters and saved buffers, a shared tensor once."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


# -----------------------------------------------------------------------------
# Checkpoints: a dict of plain values and tensors, loaded with torch.load(weights_only=True): no pickled code
#   format, version     "stagegpt-ckpt", CHECKPOINT_VERSION
#   stage               "pretrain" | "sft" | "rm" | "ppo" | ...
#   model_args          GPTConfig as a dict
#   model               the GPT's state_dict (no "_orig_mod." / "module." prefixes)
#   tokenizer           bpe.Tokenizer.to_dict()
#   config              the stage's full configuration
#   parent              {"path", "sha256"} of the checkpoint it started from, or None
#   metrics             figures at save time
#   resume              optimizer state, iteration, RNG states, data position
# Stages may add keys of their own (a reward head, say) with plain values.

CHECKPOINT_FORMAT = "stagegpt-ckpt"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("stage", "model_args", "model", "tokenizer", "config", "parent", "metrics")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign or of the wrong stage."""


def clean_state_dict(model):
    """The state_dict of model unwrapped from DDP and torch.compile: the same keys whichever way it was trained."""
    while isinstance(inner := getattr(model, "module", getattr(model, "_orig_mod", None)), nn.Module):
        model = inner  # DDP's .module, or torch.compile's ._orig_mod
    return model.state_dict()


def checkpoint_file(path):
    """A stage's folder means its ckpt.pt; a file is itself."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def parent_record(path):
    """{"path", "sha256"} naming the checkpoint (file or folder) a stage started from."""
    return {"path": os.path.abspath(checkpoint_file(path)), "sha256": prepare_data.sha256_file(checkpoint_file(path))}


def nonfinite(tree, name=""):
    """The NaN or inf floats and tensors in nested dicts and lists, by name ("model.wte.weight", "metrics.loss")."""
    if isinstance(tree, dict):
        return [bad for k, v in tree.items() for bad in nonfinite(v, f"{name}.{k}" if name else str(k))]
    if isinstance(tree, (list, tuple)):
        return [bad for i, v in enumerate(tree) for bad in nonfinite(v, f"{name}[{i}]")]
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return [] if torch.isfinite(tree).all() else [name]
    return [name] if isinstance(tree, float) and not math.isfinite(tree) else []


def save_checkpoint(checkpoint, path):
    """Saved atomically: a crash leaves the old file or the new one; a diverged run's NaN or inf is never saved."""
    if missing := [k for k in REQUIRED_KEYS if k not in checkpoint]:
        raise CheckpointError(f"cannot save {path}: checkpoint lacks {missing}")
    if bad := nonfinite(checkpoint):
        raise FloatingPointError(f"not saving {path}: {', '.join(bad[:3])}{' ...' * (len(bad) > 3)} not finite (the "
                                 f"run diverged); the last finite save is kept. Try a lower --learning_rate")
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    prepare_data.atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, stages=None, map_location="cpu"):
    """Load and check a checkpoint of one of `stages` (None: any); a problem is one CheckpointError naming the file."""
    file = checkpoint_file(path)
    if not os.path.isfile(file):
        raise CheckpointError(f"folder {path} holds no ckpt.pt: give a checkpoint file, or run the stage that writes it"
                              if os.path.isdir(path) else f"checkpoint {file} does not exist: run the stage that "
                              f"writes it first")
    try:
        with open(file, "rb") as f:  # torch.save writes a zip archive: JSON, text or an empty file is something else
            if f.read(4) != b"PK\x03\x04":
                raise ValueError("it is not a torch.save zip archive: a wrong or truncated file")
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # not a zip, a truncated one, pickled classes
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e):
            reason = "it contains pickled Python objects, which could run code; refusing to load it"
        raise CheckpointError(f"checkpoint {file} cannot be read ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {file} is not a stagegpt checkpoint (no format '{CHECKPOINT_FORMAT}')")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {file} has format version {ckpt.get('version')!r}; "
                              f"this code reads version {CHECKPOINT_VERSION}")
    if missing := [k for k in REQUIRED_KEYS if k not in ckpt]:
        raise CheckpointError(f"checkpoint {file} is incomplete: it lacks {missing}")
    if stages is not None and (stage := ckpt["stage"]) not in stages:
        raise CheckpointError(f"checkpoint {file} is a '{stage}' checkpoint; this needs one of {sorted(stages)}")
    if bad := nonfinite(ckpt["model"]):
        raise CheckpointError(f"checkpoint {file} has NaN or infinite weights ({bad[0]}): a diverged run's")
    return ckpt


def load_weights(model, state_dict, path=""):
    """model.load_state_dict(state_dict), returning model; weights of other shapes are a CheckpointError naming path."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path + ' ' if path else ''}weights do not fit its model_args "
                              f"({' '.join(str(e).split())[:160]})") from None
    return model


def model_from_checkpoint(ckpt, device="cpu", model_class=None):
    """The model in a loaded checkpoint (a GPT, or model_class(GPTConfig)) with its weights, on device."""
    try:
        model = (model_class or GPT)(GPTConfig.from_dict(ckpt["model_args"]))
    except (ValueError, TypeError) as e:  # a crafted or foreign file's model_args
        raise CheckpointError(f"checkpoint model_args make no model ({' '.join(str(e).split())[:160]})") from None
    return load_weights(model, ckpt["model"]).to(device)


def tokenizer_from_checkpoint(ckpt):
    """The bpe.Tokenizer embedded in a loaded checkpoint."""
    return bpe.Tokenizer.from_dict(ckpt["tokenizer"], source="checkpoint tokenizer")
