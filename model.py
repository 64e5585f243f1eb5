"""
model.py: the GPT, and the checkpoint format every stage reads and writes.

The model is a decoder-only transformer in the nanoGPT / GPT-2 lineage:

    ids (B, T) -> token embedding (+ learned position embedding)
               -> n_layer x Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))
               -> final norm -> linear head tied to the token embedding -> logits (B, T, V)

The design choices the lectures discuss are switches in GPTConfig, GPT-2's
choices being the defaults:
    norm       "layernorm" | "rmsnorm"
    mlp        "gelu"      | "swiglu"
    pos        "learned"   | "rope"      (rotary embeddings rotate q and k instead)
    attention  "sdpa"      | "explicit"  (F.scaled_dot_product_attention, or the
                                          scores / causal mask / softmax / sum by hand)

A checkpoint is a plain dict saved with torch.save and loaded with
torch.load(weights_only=True): no pickled classes, so a checkpoint from a
stranger cannot run code. See "Checkpoints" at the bottom of this file.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import signal
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe


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
    pos: str = "learned"       # "learned" | "rope"
    attention: str = "sdpa"    # "sdpa" | "explicit"
    rope_theta: float = 10000.0

    def __post_init__(self):
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "pos": ("learned", "rope"), "attention": ("sdpa", "explicit")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model option {name}={getattr(self, name)!r} is not one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.n_embd // self.n_head}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"model option {name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
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
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(head_size, max_len, theta=10000.0):
    """cos and sin tables for rotary embeddings, each (max_len, head_size // 2).
    Pair i of a head's channels is rotated by angle pos * theta^(-2i / head_size)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (x1, x2) of x (B, H, T, D) by the angles in cos/sin
    (T, D/2), or (B, 1, T, D/2) when each row has its own positions."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x1 * sin + x2 * cos
    return torch.stack((out1, out2), dim=-1).flatten(-2).type_as(x)


def causal_mask(q_len, k_len, device):
    """Boolean (q_len, k_len), True where attention is allowed. Query i sits at
    position k_len - q_len + i (earlier keys come from a KV cache) and may see
    every key at or before its own position."""
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


def explicit_attention(q, k, v, mask, dropout_p=0.0, training=False):
    """The lecture's attention, step by step. q (B, H, Tq, D), k and v (B, H, Tk, D),
    mask (Tq, Tk) boolean. Returns (B, H, Tq, D)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))               # no peeking at the future
    weights = F.softmax(scores.float(), dim=-1).type_as(q)
    weights = F.dropout(weights, p=dropout_p, training=training)
    return weights @ v


class KVCache:
    """Keys and values of every layer for the positions generated so far, so that
    each new token costs one position of work instead of the whole context."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        head_size = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0          # positions filled so far
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    # torch's CPU bf16 attention kernels are slower than its float32 ones, with native bf16 or without,
    # so under CPU autocast the projections stay in bf16 and attention alone runs in float32
    # (README, "Performance"). tests/bench/bench_dtype.py and bench_reward.py set it False to compare.
    float32_on_cpu = True

    def __init__(self, config, layer_index):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.attention = config.attention
        self.dropout = config.dropout
        self.layer_index = layer_index
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, attn_mask=None):
        """attn_mask: (B, 1, T, T) boolean, True where a query may see a key, in
        place of the causal mask (several sequences packed in one row: reward.py)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.pos
            cache.k[self.layer_index][:, :, start:start + T] = k
            cache.v[self.layer_index][:, :, start:start + T] = v
            k = cache.k[self.layer_index][:, :, :start + T]
            v = cache.v[self.layer_index][:, :, :start + T]
        if self.float32_on_cpu and x.device.type == "cpu" and q.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):  # else autocast casts q, k, v back to bf16
                y = self.attend(q.float(), k.float(), v.float(), attn_mask).to(q.dtype)
        else:
            y = self.attend(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, attn_mask=None):
        """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D): the given mask,
        else causal (the last Tq of Tk positions, when a cache holds the first)."""
        q_len, k_len = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None:
            if self.attention == "explicit":
                return explicit_attention(q, k, v, attn_mask, dropout_p, self.training)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        if self.attention == "explicit":
            return explicit_attention(q, k, v, causal_mask(q_len, k_len, q.device), dropout_p, self.training)
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if q_len == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # one new token sees all
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device),
                                              dropout_p=dropout_p)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))), 4x wide. SwiGLU: proj(silu(gate(x)) * up(x)),
    about 8/3x wide so that both have about the same number of parameters."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        else:
            hidden = 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x))
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
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The GPT

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            # not saved in checkpoints: recomputed from the config
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output head reads logits with the input embedding matrix
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), since each
        # block adds two of them to the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters counted once (the tied head shares the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, cache=None, positions=None, attn_mask=None):
        """ids (B, T) -> final-norm hidden states (B, T, n_embd). The reward and
        value heads of later stages read these; forward() turns them into logits.
        positions (B, T) and attn_mask (B, 1, T, T), given together: each token's
        position in its own sequence and who may see whom, for rows that pack
        several sequences sharing a prefix (reward.py's collate_shared); a row may
        then be longer than block_size, its sequences may not."""
        B, T = idx.size()
        if (positions is None) != (attn_mask is None) or (positions is not None and cache is not None):
            raise ValueError("hidden_states: give positions and attn_mask together, and without a cache")
        start = 0 if cache is None else cache.pos
        longest = start + T if positions is None else int(positions.max()) + 1
        if longest > self.config.block_size:
            raise ValueError(f"sequence of {longest} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device) if positions is None
                                         else positions)
        elif positions is None:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # (B, 1, T, D/2) each
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy against
        targets (B, T) when given. Target -1 marks a position without a target
        (padding, or a prompt token in SFT)."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # --- generation ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, seed=None, use_cache=True):
        """Continue each row of idx (B, T) by up to max_new_tokens tokens.
        temperature 0 is greedy. A row that has produced stop_token is finished:
        its later positions are filled with stop_token, and generation ends when
        every row is finished. Returns (B, T + number of new tokens)."""
        if idx.size(1) + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {idx.size(1)} tokens + {max_new_tokens} new tokens exceeds "
                             f"block_size {self.config.block_size}")
        was_training = self.training
        self.eval()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = None
        if use_cache:
            dtype = self.transformer.wte.weight.dtype
            cache = KVCache(self.config, idx.size(0), idx.size(1) + max_new_tokens, idx.device, dtype)
        out = idx
        next_input = idx  # the cache has seen nothing yet: feed the whole prompt first
        for _ in range(max_new_tokens):
            if use_cache:
                h = self.hidden_states(next_input, cache)[:, -1, :]
            else:
                h = self.hidden_states(out)[:, -1, :]  # recompute the whole context every step
            logits = self.lm_head(h)
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_id = torch.where(finished, torch.full_like(next_id, stop_token), next_id)
                finished |= next_id == stop_token
            out = torch.cat([out, next_id[:, None]], dim=1)
            next_input = next_id[:, None]
            if stop_token is not None and bool(finished.all()):
                break
        self.train(was_training)
        return out


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one id per row from logits (B, V).
    temperature: divides the logits (0 means greedy argmax);
    top_k: keep only the k most likely ids;
    top_p: keep the smallest set of most likely ids whose probability reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop an id when the ids more likely than it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_responses(model, prompts, max_new_tokens, stop_token, temperature=0.0, seed=None, batch_size=64):
    """Answer many prompts (lists of ids): -> [(response_ids, ended), ...] in the
    prompts' order. response_ids stop before the first stop_token; ended says
    whether it came. The KV cache needs a rectangular batch, so prompts of the
    same length are generated together (no padding inside a prompt, so the
    positions are exactly those of a single prompt). A prompt that leaves no
    room for max_new_tokens keeps its most recent tokens."""
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 1))
    prompts = [list(p)[-(block - max_new_tokens):] for p in prompts]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    device = next(model.parameters()).device
    results = [None] * len(prompts)
    group = 0
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            out = model.generate(idx, max_new_tokens, temperature=temperature, stop_token=stop_token,
                                 seed=None if seed is None else seed + group)
            group += 1
            for i, row in zip(chunk, out[:, length:].tolist()):
                ended = stop_token in row
                results[i] = (row[:row.index(stop_token)] if ended else row, ended)
    return results


def answer_prompts(model, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=None, batch_size=64):
    """Prompt texts -> [(answer text, ended), ...]: each prompt laid out in the
    chat template (tokenizer.encode_chat), answered by generate_responses up
    to the end-of-turn token (greedy at temperature 0)."""
    prompt_ids = [tokenizer.encode_chat(p)[0] for p in prompts]
    end = tokenizer.special_ids[bpe.END_OF_TURN]
    answers = generate_responses(model, prompt_ids, max_new_tokens, end, temperature, seed, batch_size)
    return [(tokenizer.decode(ids), ended) for ids, ended in answers]


# -----------------------------------------------------------------------------
# Scalar heads: the reward model and PPO's critic
#
# The reward model is the GPT body with a linear head that maps the final hidden
# state to one number. The response is followed by the <|reward|> token and the
# reward is the head's output at that position; all other outputs are ignored.
# PPO's critic is the same network reading its output at every response position.

class ScalarHeadModel(nn.Module):
    """GPT body + scalar head: ids (B, T) -> one scalar per position (B, T)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # small outputs at the start, so the first losses are about ln 2 (reward)
        # or about the squared returns (critic), not dominated by a random head
        nn.init.normal_(self.head.weight, mean=0.0, std=0.1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, hidden=None):
        """hidden: the body's hidden states (B, T, C) of idx when already
        computed (reward.py shares them with its LM loss)."""
        hidden = self.gpt.hidden_states(idx) if hidden is None else hidden
        return self.head(hidden).squeeze(-1).float()


def with_reward_token(prompt_ids, response_ids, reward_id, block_size=None):
    """The reward model's input: prompt, response, then <|reward|>. Used the same
    way in reward training, evaluation and PPO scoring. A sequence longer than
    block_size loses its oldest tokens (the reward token is always kept)."""
    ids = list(prompt_ids) + list(response_ids) + [reward_id]
    if block_size is not None and len(ids) > block_size:
        ids = ids[-block_size:]
    return ids


def pad_right(sequences, pad_value=0):
    """Lists of ids -> (ids (B, T_max) long, lengths (B,) long). Padding goes
    after each sequence: under the causal mask it cannot change any earlier
    position's output."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    out = torch.full((len(sequences), int(lengths.max())), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


def read_last(values, lengths):
    """values (B, T), lengths (B,) -> values[b, lengths[b] - 1]: the scalar at
    each sequence's last real token (the <|reward|> token for a reward model)."""
    return values.gather(1, (lengths - 1).to(values.device)[:, None]).squeeze(1)


@torch.no_grad()
def score_sequences(model, sequences, batch_size=64, normalizer=None):
    """Rewards of reward-model inputs (each ending with <|reward|>, from
    with_reward_token) -> (N,) float tensor on the CPU. normalizer: the
    {"bias", "scale"} stored in a reward checkpoint; the result is then
    (raw - bias) / scale."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # batches of similar lengths pad less (2.2x faster on tinyworld's held-out pairs); the order is kept
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = torch.zeros(len(sequences))
    for start in range(0, len(sequences), batch_size):
        rows = order[start:start + batch_size]
        ids, lengths = pad_right([sequences[i] for i in rows])
        rewards[rows] = read_last(model(ids.to(device)), lengths).cpu()
    model.train(was_training)
    if normalizer is not None:
        rewards = (rewards - normalizer["bias"]) / normalizer["scale"]
    return rewards


def scalar_model_from_checkpoint(ckpt, device="cpu"):
    """The ScalarHeadModel of a reward (or critic) checkpoint, with its weights."""
    try:
        model = ScalarHeadModel(GPTConfig.from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint weights do not fit a reward model of its model_args ({first})") from None
    return model.to(device)


# -----------------------------------------------------------------------------
# Optimizer and efficiency figures

def configure_optimizer(model, learning_rate, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW with weight decay on matrices (linear weights, embeddings) only:
    biases and norm gains are not decayed. Fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu")  # fused AdamW exists for both in torch >= 2.4
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def flops_per_token(config, num_params):
    """Training FLOPs per token (forward + backward), PaLM appendix B:
    6 per parameter, plus the attention scores and sums, 12 * L * C * T."""
    return 6 * num_params + 12 * config.n_layer * config.n_embd * config.block_size


# Peak dense bf16 tensor FLOP/s by device name fragment (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device_name):
    """Peak FLOP/s for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for fragment, flops in PEAK_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def model_flops_utilization(flops_per_tok, tokens_per_second, device_name):
    """MFU: achieved FLOP/s over the device's peak, or None if the peak is unknown."""
    peak = peak_flops(device_name)
    if peak is None:
        return None
    return flops_per_tok * tokens_per_second / peak


# -----------------------------------------------------------------------------
# Checkpoints
#
# A checkpoint is a dict of plain values and tensors:
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
    """The state_dict of model, unwrapped from DDP and torch.compile, so the
    keys are the same whichever way it was trained."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):        # DDP
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model.state_dict()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parent_record(path):
    """{"path", "sha256"} naming the checkpoint a stage started from."""
    return {"path": os.path.abspath(path), "sha256": file_sha256(path)}


def save_checkpoint(checkpoint, path):
    """Atomic save: write a temporary file in the same folder, flush it to disk,
    then rename it over `path`. A crash leaves the old file or the new one, never
    half of one."""
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"cannot save {path}: checkpoint lacks {missing}")
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, stages=None, map_location="cpu"):
    """Load and check a checkpoint. `stages`: the stage names the caller accepts
    (None accepts any). Every problem is one CheckpointError line naming the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: run the stage that writes it first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickled classes, not a torch file at all
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains pickled Python objects, which could run code; refusing to load it"
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a stagegpt checkpoint (no format '{CHECKPOINT_FORMAT}')")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')!r}; "
                              f"this code reads version {CHECKPOINT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {missing}")
    if stages is not None and ckpt["stage"] not in stages:
        raise CheckpointError(f"checkpoint {path} is a '{ckpt['stage']}' checkpoint; "
                              f"this needs one of {sorted(stages)}")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """The GPT stored in a loaded checkpoint, with its weights, on `device`."""
    try:
        config = GPTConfig.from_dict(ckpt["model_args"])
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint weights do not fit its model_args ({first})") from None
    return model.to(device)


def tokenizer_from_checkpoint(ckpt):
    """The bpe.Tokenizer embedded in a loaded checkpoint."""
    return bpe.Tokenizer.from_dict(ckpt["tokenizer"], source="checkpoint tokenizer")



# -----------------------------------------------------------------------------
# Training plumbing shared by the training stages (train, sft, reward, ppo).
# They never import one another, so what they all need lives here, once.

def parse_config(argv, defaults, presets, prog, description=""):
    """`--config NAME --key=value ...` -> (config dict, flags).

    The config starts from `defaults`, then the preset NAME, then each
    `--key=value` override, which must name a known key and parse as the type
    of its default (int, float, bool, str). Flags (`--resume`, `--overwrite`)
    are returned separately. Every mistake is one ValueError line."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        lines = [f"usage: python {prog} --config NAME [--key=value ...] [--resume] [--overwrite]", ""]
        if description:
            lines += [description, ""]
        lines.append(f"presets: {', '.join(presets)}")
        for name, preset in presets.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in preset.items()))
        lines += ["", "keys (default):"]
        lines += [f"  --{k}={v!r}" for k, v in defaults.items()]
        print("\n".join(lines))
        raise SystemExit(0)
    config = dict(defaults)
    flags = set()
    preset_name = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--resume", "--overwrite"):
            flags.add(arg[2:])
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                preset_name = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                preset_name = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"--config needs a preset name: one of {', '.join(presets)}")
        elif arg.startswith("--") and "=" in arg:
            overrides.append(arg[2:].split("=", 1))
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append([arg[2:], argv[i + 1]])
            i += 1
        else:
            raise ValueError(f"cannot read argument {arg!r}: write --key=value (see --help)")
        i += 1
    if preset_name is not None:
        if preset_name not in presets:
            raise ValueError(f"unknown config {preset_name!r}: choose one of {', '.join(presets)}")
        config.update(presets[preset_name])
        config["config"] = preset_name
    for key, text in overrides:
        key = key.replace("-", "_")
        if key not in defaults:
            close = [k for k in defaults if key in k or k in key]
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see --help for the keys)"
            raise ValueError(f"unknown config key --{key}{hint}")
        # the preset's value where it has one of the default's type: its type parses the text,
        # and an error names it as the default, which it is under this preset
        current = config[key] if type(config[key]) is type(defaults[key]) else defaults[key]
        config[key] = convert_value(key, text, current)
    return config, flags


def convert_value(key, text, default):
    """'3' -> 3 when the default is an int, and so on; a clear error otherwise."""
    kind = type(default)
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"--{key}={text!r} is not a valid {kind.__name__} "
                         f"(the default is {default!r})") from None


def pick_device(name="auto"):
    """'auto' -> cuda if present, then Apple mps, then cpu."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name, device_type):
    """'auto' -> bfloat16 on a GPU that has it, float16 on an older GPU, float32 elsewhere."""
    if name != "auto":
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={name!r} is not one of auto, float32, bfloat16, float16")
        return name
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast_context(device_type, dtype):
    """Mixed precision: matrix multiplies in bf16/fp16, weights and optimizer
    state stay in fp32. A no-op context for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def cosine_lr(it, max_lr, warmup_iters, max_iters, min_lr_ratio=0.1):
    """Linear warmup from ~0 to max_lr over warmup_iters, then cosine decay to
    min_lr_ratio * max_lr at max_iters (and flat after)."""
    min_lr = min_lr_ratio * max_lr
    if it < warmup_iters:
        return max_lr * (it + 1) / warmup_iters
    if it >= max_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def rng_state():
    """Every random state a training run depends on, as checkpoint-safe values."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def append_jsonl(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl_log(path):
    """The records of a log.jsonl, skipping a torn last line from a crash."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def truncate_log(path, last_iter):
    """On resume, forget log lines written after the checkpoint we resume from."""
    kept = [r for r in read_jsonl_log(path) if r.get("iter", 0) <= last_iter]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def plot_curves(records, series, path, title, xlabel="iteration"):
    """A PNG with one line per (label, key) in `series`, from log records that
    have `iter` and that key. Written atomically; matplotlib without a screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, key in series:
        points = [(r["iter"], r[key]) for r in records if key in r and r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="." if len(points) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def format_eta(seconds):
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# -----------------------------------------------------------------------------
# One optimizer step, processes, interruption: the same in every training stage

def forward_backward(model, micro_batches, ctx, scaler=None):
    """Accumulate gradients over micro-batches [(x, y), ...]; returns the mean
    loss (a tensor). Under DDP, gradients are all-reduced only on the last
    micro-step: the earlier backward passes run inside no_sync()."""
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not isinstance(model, DDP)) else model.no_sync()
        with sync:
            with ctx:
                _, loss = model(x, y)
                loss = loss / len(micro_batches)  # the mean over micro-batches, not the sum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        total = total + loss.detach()
    return total


def clip_gradients(model, max_norm):
    """Scale all gradients down together if their global L2 norm exceeds
    max_norm. Returns the norm before clipping."""
    if max_norm <= 0:
        return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)



def setup_distributed(config):
    """(rank, world_size, device). Under torchrun: one process per GPU with NCCL,
    or per CPU process with gloo."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(config["device"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(config["device"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world, device


@contextlib.contextmanager
def deterministic_algorithms(enabled=True):
    """Within the block torch uses deterministic kernels (an op that has none
    warns instead of failing), so the same run twice on one machine gives the same
    numbers: without it, compiled bfloat16 CPU kernels differ in the last bits
    from run to run, and a 5-minute pretraining run drifts apart (val loss 0.605
    in one run, 0.622 in the next). The previous setting comes back afterwards."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for repeatable GEMMs
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def compile_or_fall_back(model, example_batch, ctx, master=True, mode=None):
    """torch.compile the model and build its kernels now, with one forward and
    backward pass on example_batch = (x, y) of the training shape. Where compiling
    fails (no C++ compiler on a laptop, say) the run goes on uncompiled. mode is
    torch.compile's (None = its default; "max-autotune-no-cudagraphs" times
    several kernels per matrix shape on a GPU and keeps the fastest)."""
    compiled = torch.compile(model, mode=mode)
    rng = torch.get_rng_state()  # the dummy pass must not move the random state
    try:
        with ctx:
            _, loss = compiled(*example_batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:  # torch raises many kinds here, all meaning "cannot compile"
        model.zero_grad(set_to_none=True)
        if master:
            print(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); "
                  f"training without it")
        return model
    finally:
        torch.set_rng_state(rng)


class StopRequested:
    """Ctrl-C sets a flag; the loop saves at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)
