"""Tests for model.py: the GPT against torch built-ins and brute-force references,
and the checkpoint contract."""

import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import bpe
import model
import prepare_data
from model import (apply_rope, causal_mask, CheckpointError, clean_state_dict, explicit_attention, flops_per_token, GPT,
                   GPTConfig, KVCache, load_checkpoint, model_flops_utilization, model_from_checkpoint, parent_record, RMSNorm, rope_tables,
                   sample_next_token, save_checkpoint, tokenizer_from_checkpoint)
from train import configure_optimizer

VARIANTS = [
    {},
    {"norm": "rmsnorm"},
    {"mlp": "swiglu"},
    {"pos": "rope"},
    {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False},
]


def tiny_config(**overrides):
    args = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)
    args.update(overrides)
    return GPTConfig(**args)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def set_attention(m, kind):
    for block in m.transformer.h:
        block.attn.attention = kind


# --- configuration ----------------------------------------------------------------

def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="n_head must be at least 1"):  # checked before n_embd % n_head divides by it
        GPTConfig(n_head=0)
    with pytest.raises(ValueError, match="even head size"):
        GPTConfig(n_embd=12, n_head=4, pos="rope")
    with pytest.raises(ValueError, match="unknown model options"):
        GPTConfig.from_dict({"n_layer": 2, "n_layers": 3})
    assert GPTConfig.from_dict({"n_layer": 3}).n_layer == 3


def test_gpt2_parameter_count():
    m = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert m.num_params() == 124_439_808, "GPT-2 small with tied weights has 124,439,808 parameters"
    assert m.lm_head.weight is m.transformer.wte.weight


# --- building blocks against references ------------------------------------------

def test_rmsnorm_matches_formula_and_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    reference = torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)


def test_rope_tables_hand_values():
    cos, sin = rope_tables(head_size=4, max_len=3, theta=100.0)
    assert cos.shape == (3, 2)
    # position p, pair i: angle p * 100^(-2i/4) -> pair 0: p, pair 1: p / 10
    expected = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]])
    assert torch.allclose(cos, expected.cos()) and torch.allclose(sin, expected.sin())


def test_apply_rope_equals_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope_tables(8, 5)
    as_complex = torch.view_as_complex(x.reshape(2, 3, 5, 4, 2))
    rotation = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))  # e^(i * angle)
    expected = torch.view_as_real(as_complex * rotation).reshape(2, 3, 5, 8)
    assert torch.allclose(apply_rope(x, cos, sin), expected, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rope_tables(8, 20)

    def score(pq, pk):
        return (apply_rope(q, cos[pq:pq + 1], sin[pq:pq + 1]) * apply_rope(k, cos[pk:pk + 1], sin[pk:pk + 1])).sum()

    assert torch.allclose(score(5, 2), score(15, 12), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_causal_mask_hand_example():
    assert causal_mask(3, 3, "cpu").tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # two new queries after two cached keys: they sit at positions 2 and 3
    assert causal_mask(2, 4, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]


def test_explicit_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = causal_mask(4, 6, "cpu")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(explicit_attention(q, k, v, mask), expected, atol=1e-5)


def test_attend_matches_the_explicit_reference_in_each_case():
    torch.manual_seed(0)
    attn = tiny_model().transformer.h[0].attn.eval()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    full = causal_mask(5, 5, "cpu")
    torch.testing.assert_close(attn.attend(q, k, v), explicit_attention(q, k, v, full), atol=1e-5, rtol=1e-5,
                               msg="no mask: causal attention")
    torch.testing.assert_close(attn.attend(q[:, :, 3:], k, v), explicit_attention(q[:, :, 3:], k, v, full[3:]),
                               atol=1e-5, rtol=1e-5, msg="2 queries after 3 cached keys")
    torch.testing.assert_close(attn.attend(q[:, :, 4:], k, v), explicit_attention(q[:, :, 4:], k, v, full[4:]),
                               atol=1e-5, rtol=1e-5, msg="one new query sees every key")
    mask = torch.rand(2, 1, 5, 5) > 0.5
    mask[..., 0] = True  # every query sees something
    torch.testing.assert_close(attn.attend(q, k, v, mask), explicit_attention(q, k, v, mask), atol=1e-5,
                               rtol=1e-5, msg="a given mask replaces the causal one")


def test_cpu_bf16_autocast_attends_in_float32(monkeypatch):
    # bf16 attention kernels are ~3.5x slower than float32 on a CPU without AMX: attention must
    # run in float32 there while the matrix products around it stay in bf16
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    m = tiny_model().eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = m.hidden_states(idx)
        projected = m.transformer.h[0].attn(torch.randn(2, 12, 32))
    assert seen[:m.config.n_layer] == [torch.float32] * m.config.n_layer, \
        f"attention ran in {seen}, expected float32 in every layer"
    assert projected.dtype == torch.bfloat16, "the projections around attention stay in bf16 under autocast"
    torch.testing.assert_close(hidden.float(), m.hidden_states(idx), atol=0.1, rtol=0.05)


def test_swiglu_mlp_is_gated():
    m = tiny_model(mlp="swiglu")
    mlp = m.transformer.h[0].mlp
    assert mlp.c_fc.out_features == 64 * math.ceil(8 * 32 / 3 / 64)
    x = torch.randn(2, 3, 32)
    expected = mlp.c_proj(F.silu(mlp.c_gate(x)) * mlp.c_fc(x))
    assert torch.allclose(mlp(x), expected)


# --- the model ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_future_token_never_changes_earlier_logits(variant):
    m = tiny_model(**variant)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    a, _ = m(idx)
    b, _ = m(changed)
    assert torch.equal(a[:, :12], b[:, :12]), "positions before 12 must not see token 12"
    assert not torch.allclose(a[:, 12:], b[:, 12:]), "positions from 12 on do see it"


@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_path_agrees_with_sdpa(variant):
    m = tiny_model(**variant)
    idx = torch.randint(0, 97, (3, 30))
    sdpa_logits, _ = m(idx)
    set_attention(m, "explicit")
    explicit_logits, _ = m(idx)
    assert torch.allclose(sdpa_logits, explicit_logits, atol=1e-5)


def test_hidden_states_shape_and_block_size_limit():
    m = tiny_model()
    assert m.hidden_states(torch.zeros(2, 7, dtype=torch.long)).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="longer than block_size 48"):
        m(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_hidden_states_of_sequences_packed_with_positions_and_mask_equal_each_alone(pos):
    m = tiny_model(pos=pos)
    a, b = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 40))
    row = torch.cat([a, b], dim=1)                                   # (1, 70): longer than block_size 48
    positions = torch.cat([torch.arange(30), torch.arange(40)])[None]
    first = torch.arange(70) < 30
    same = first[:, None] == first[None, :]                          # a token sees its own sequence only
    mask = (same & (positions[0][None, :] <= positions[0][:, None]))[None, None]
    packed = m.hidden_states(row, positions=positions, attn_mask=mask)
    assert torch.allclose(packed[:, :30], m.hidden_states(a), atol=1e-5)
    assert torch.allclose(packed[:, 30:], m.hidden_states(b), atol=1e-5), "positions restart for the second"
    with pytest.raises(ValueError, match="longer than block_size 48"):
        m.hidden_states(row, positions=torch.arange(70)[None], attn_mask=mask)
    with pytest.raises(ValueError, match="together"):
        m.hidden_states(row, positions=positions)


def test_loss_at_init_is_about_ln_vocab():
    m = GPT(GPTConfig(vocab_size=500, block_size=32, n_layer=2, n_head=2, n_embd=64))
    torch.manual_seed(1)
    idx = torch.randint(0, 500, (8, 32))
    targets = torch.randint(0, 500, (8, 32))
    _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(500)) < 0.1, f"loss {loss.item():.3f} vs ln(500) = {math.log(500):.3f}"


def test_loss_ignores_minus_one_targets():
    m = tiny_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[:, :4] = -1
    logits, loss = m(idx, targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(tiny_config())
    idx = torch.randint(0, 97, (4, 16))
    targets = torch.randint(0, 97, (4, 16))
    opt = configure_optimizer(m, learning_rate=1e-2, weight_decay=0.0)
    for _ in range(150):
        _, loss = m(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"a tiny model should memorise one batch, loss is {loss.item():.3f}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_generation_equals_full_recomputation(variant):
    m = tiny_model(**variant)
    prompt = torch.randint(0, 97, (3, 6))
    greedy_cached = m.generate(prompt, 30, temperature=0)
    greedy_full = m.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)
    sampled_cached = m.generate(prompt, 30, temperature=1.0, top_k=20, seed=7)
    sampled_full = m.generate(prompt, 30, temperature=1.0, top_k=20, seed=7, use_cache=False)
    assert torch.equal(sampled_cached, sampled_full)


def test_kv_cache_chunked_prefill_matches_full_forward():
    m = tiny_model(pos="rope")
    idx = torch.randint(0, 97, (2, 12))
    full = m.hidden_states(idx)
    cache = KVCache(m.config, 2, 12, "cpu", torch.float32)
    parts = [m.hidden_states(idx[:, :5], cache), m.hidden_states(idx[:, 5:9], cache), m.hidden_states(idx[:, 9:], cache)]
    assert cache.pos == 12
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_generate_seed_is_deterministic_and_stop_token_ends_rows():
    m = tiny_model()
    prompt = torch.randint(0, 97, (2, 4))
    a = m.generate(prompt, 10, temperature=1.0, seed=3)
    assert torch.equal(a, m.generate(prompt, 10, temperature=1.0, seed=3))
    assert not torch.equal(a, m.generate(prompt, 10, temperature=1.0, seed=4))
    first = m.generate(prompt, 1, temperature=0)[:, -1]
    out = m.generate(prompt, 10, temperature=0, stop_token=int(first[0]))
    assert out[0, 4] == first[0] and (out[0, 4:] == first[0]).all(), "a finished row is padded with the stop token"
    with pytest.raises(ValueError, match="exceeds block_size"):
        m.generate(prompt, 100)


def test_generate_restores_training_mode():
    m = tiny_model()
    m.train()
    m.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert m.training


def test_sample_next_token_greedy_and_top_k():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, temperature=0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next_token(logits, 1.0, top_k=1, generator=gen).tolist() == [1, 0]
    picks = {int(sample_next_token(logits, 5.0, top_k=2, generator=gen)[0]) for _ in range(200)}
    assert picks == {1, 3}, "top_k=2 keeps exactly the two largest logits"


def test_sample_next_token_top_p_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    # mass before each id: 0, 0.5, 0.8, 0.95 -> with p = 0.7 only ids 0 and 1 remain
    picks = [int(sample_next_token(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(400)]
    assert set(picks) == {0, 1}
    share = picks.count(0) / len(picks)
    assert abs(share - 0.5 / 0.8) < 0.08, "the kept ids are renormalised"
    assert set(int(sample_next_token(logits, 1.0, top_p=0.4, generator=gen)) for _ in range(50)) == {0}


def test_sample_next_token_follows_softmax_of_scaled_logits():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    picks = sample_next_token(logits.expand(n, 3), temperature=2.0, generator=gen)
    empirical = torch.bincount(picks, minlength=3).float() / n
    assert torch.allclose(empirical, F.softmax(logits[0] / 2.0, dim=-1), atol=0.03)


# --- optimizer and efficiency --------------------------------------------------------


# --- checkpoints ---------------------------------------------------------------------

def make_ckpt(m, stage="pretrain"):
    tok = bpe.Tokenizer(bpe.train_naive("hello hello world", 3))
    return {"stage": stage, "model_args": vars(m.config).copy(), "model": clean_state_dict(m),
            "tokenizer": tok.to_dict(), "config": {"lr": 1e-3}, "parent": None, "metrics": {"val_loss": 1.5}}


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    m = tiny_model()

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = torch.compile(m)  # compiles lazily, so this costs nothing here
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    expected = set(m.state_dict())
    assert set(clean_state_dict(compiled)) == expected
    assert set(clean_state_dict(Wrapper(compiled))) == expected
    assert set(clean_state_dict(Wrapper(m))) == expected


def test_checkpoint_round_trip(tmp_path):
    m = tiny_model(pos="rope", mlp="swiglu")
    path = tmp_path / "ckpt.pt"
    save_checkpoint(make_ckpt(m), str(path))
    ckpt = load_checkpoint(str(tmp_path), stages={"pretrain"})  # a folder means folder/ckpt.pt
    assert ckpt["format"] == "stagegpt-ckpt" and ckpt["version"] == 1
    again = model_from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 97, (2, 9))
    assert torch.equal(again(idx)[0], m(idx)[0])
    assert tokenizer_from_checkpoint(ckpt).merges == bpe.train_naive("hello hello world", 3)
    assert "rope_cos" not in ckpt["model"], "derived buffers are not saved"


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    m = tiny_model()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(make_ckpt(m), str(path))
    before = prepare_data.sha256_file(str(path))

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(model.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_ckpt(m), str(path))
    assert prepare_data.sha256_file(str(path)) == before
    assert os.listdir(tmp_path) == ["ckpt.pt"], "no temporary file is left behind"
    monkeypatch.undo()
    load_checkpoint(str(path))


def test_save_refuses_incomplete_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="lacks"):
        save_checkpoint({"stage": "pretrain"}, str(tmp_path / "x.pt"))


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    m = tiny_model()
    good = tmp_path / "good.pt"
    save_checkpoint(make_ckpt(m, stage="rm"), str(good))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(truncated))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a stagegpt checkpoint"):
        load_checkpoint(str(foreign))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(text))
    with pytest.raises(CheckpointError, match="is a 'rm' checkpoint; this needs one of"):
        load_checkpoint(str(good), stages={"pretrain", "sft"})
    old = make_ckpt(m)
    old.update(format="stagegpt-ckpt", version=0)
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format version 0"):
        load_checkpoint(str(tmp_path / "old.pt"))
    assert issubclass(CheckpointError, ValueError)


class Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "stagegpt-ckpt", "payload": Exploit(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(str(evil))
    assert not marker.exists(), "loading must not execute code from the file"


def test_model_from_checkpoint_mismatch_is_clear(tmp_path):
    ckpt = make_ckpt(tiny_model())
    ckpt["model_args"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="do not fit its model_args"):
        model_from_checkpoint(ckpt)


def test_nonfinite_names_every_nan_and_inf():
    tree = {"model": {"w": torch.tensor([1.0, float("nan")]), "ids": torch.tensor([1, 2])},
            "metrics": {"loss": math.inf}, "rng": (3, [1, 2], None), "scores": [0.5, -math.inf], "name": "x"}
    assert model.nonfinite(tree) == ["model.w", "metrics.loss", "scores[1]"]
    assert model.nonfinite({"model": {"w": torch.ones(3)}, "metrics": {"loss": 1.0}}) == []


def test_save_refuses_nonfinite_values_and_keeps_the_last_finite_save(tmp_path):
    m = tiny_model()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(make_ckpt(m), path)
    before = prepare_data.sha256_file(path)
    poisoned = make_ckpt(m)
    poisoned["model"]["transformer.wte.weight"] = poisoned["model"]["transformer.wte.weight"] * float("nan")
    with pytest.raises(FloatingPointError, match="not saving .*ckpt.pt: model.transformer.wte.weight not finite"):
        save_checkpoint(poisoned, path)
    with pytest.raises(FloatingPointError, match="metrics.val_loss not finite"):
        save_checkpoint(dict(make_ckpt(m), metrics={"val_loss": float("nan")}), path)
    assert prepare_data.sha256_file(path) == before and os.listdir(tmp_path) == ["ckpt.pt"]
    torch.save({"format": "stagegpt-ckpt", "version": 1, **poisoned}, path)  # written by other means
    with pytest.raises(CheckpointError, match="has NaN or infinite weights"):
        load_checkpoint(path)


def test_load_names_a_folder_and_a_file_that_is_not_a_torch_file(tmp_path):
    (tmp_path / "run" / "ckpt.pt").mkdir(parents=True)  # a folder named ckpt.pt
    with pytest.raises(CheckpointError, match="folder .*ckpt.pt holds no ckpt.pt"):
        load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    (tmp_path / "notes.pt").write_text('{"stage": "pretrain"}')
    with pytest.raises(CheckpointError, match="notes.pt cannot be read .it is not a torch.save zip archive"):
        load_checkpoint(str(tmp_path / "notes.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a torch.save zip archive"):
        load_checkpoint(str(tmp_path / "empty.pt"))


def test_load_weights_of_another_shape_is_one_clear_error():
    small, big = tiny_model(), tiny_model(n_embd=64)
    assert model.load_weights(tiny_model(seed=1), small.state_dict(), "a/ckpt.pt") is not None
    with pytest.raises(CheckpointError, match="checkpoint a/ckpt.pt weights do not fit its model_args .*size mismatch"):
        model.load_weights(small, big.state_dict(), "a/ckpt.pt")
    with pytest.raises(CheckpointError, match="model_args make no model"):
        model_from_checkpoint(dict(make_ckpt(small), model_args={"n_embd": 33, "n_head": 4}))


def test_parent_record_names_a_file_by_its_sha256(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"stagegpt" * 1000)
    record = parent_record(str(path))
    assert record == {"path": str(path.resolve()), "sha256": hashlib.sha256(b"stagegpt" * 1000).hexdigest()}
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "ckpt.pt").write_bytes(b"x")
    assert model.checkpoint_file(str(tmp_path / "stage")) == str(tmp_path / "stage" / "ckpt.pt"), \
        "a folder means its ckpt.pt"
    assert model.checkpoint_file(str(path)) == str(path), "a file is itself"
    assert parent_record(str(tmp_path / "stage"))["path"] == str((tmp_path / "stage" / "ckpt.pt").resolve())


# --- batched answers, scalar heads (reward model, critic) ------------------------------

def test_generate_responses_matches_one_prompt_at_a_time():
    m = tiny_model(3)
    prompts = [[5, 6, 7], [1, 2], [8, 9, 10], [3, 4, 5, 6], [1, 2]]
    stop = 11
    got = model.generate_responses(m, prompts, max_new_tokens=6, stop_token=stop, temperature=0.0)
    for p, (resp, ended) in zip(prompts, got):
        out = m.generate(torch.tensor([p]), 6, temperature=0.0, stop_token=stop)[0, len(p):].tolist()
        want_ended = stop in out
        want = out[:out.index(stop)] if want_ended else out
        assert (resp, ended) == (want, want_ended), f"prompt {p}: batched answer differs from a single generate"


def test_generate_responses_cuts_at_stop_token():
    m = tiny_model(4)
    first = model.generate_responses(m, [[1, 2, 3]], 4, stop_token=None, temperature=0.0)[0][0][0]
    # the greedy first token, named as the stop token: the answer ends at once
    resp, ended = model.generate_responses(m, [[1, 2, 3]], 4, stop_token=first, temperature=0.0)[0]
    assert resp == [] and ended, "the stop token itself is not part of the response, and ended is True"
    resp, ended = model.generate_responses(m, [[1, 2, 3]], 4, stop_token=None, temperature=0.0)[0]
    assert len(resp) == 4 and not ended, "without a stop token the answer runs to max_new_tokens"


def test_answer_prompts_is_the_chat_template_then_generate_responses():
    tok = bpe.train_tokenizer("What is one plus one? It is two. " * 30, 300)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = ["What is one plus one?", "It is two?"]
    end = tok.special_ids[bpe.END_OF_TURN]
    want = model.generate_responses(m, [tok.encode_chat(p)[0] for p in prompts], 5, end)
    got = model.answer_prompts(m, tok, prompts, 5)
    assert got == [(tok.decode(ids), ended) for ids, ended in want]




def test_flops_per_token_formula():
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=48)
    assert flops_per_token(config, 1000) == 6 * 1000 + 12 * 2 * 32 * 48, "6N + 12 * L * C * T (PaLM appendix B)"


def test_model_flops_utilization_reads_the_peak_by_device_name():
    assert model_flops_utilization(1e9, 494.5e3, "NVIDIA H100 PCIe") == pytest.approx(0.5), "989 TFLOP/s peak"
    assert model_flops_utilization(1e9, 312e3, "NVIDIA A100-SXM4-40GB") == pytest.approx(1.0), "312 TFLOP/s peak"
    assert model_flops_utilization(1e9, 1.0, "cpu") is None, "no known peak: None"


# --- weight-only quantization ---------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32), (4, 64)])
def test_quantize_round_trip_is_within_half_a_step(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3  # rows of very different sizes
    q, scale = model.quantize_absmax(w, bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.shape == (16, 64 // group_size)
    assert int(q.abs().max()) == qmax, "each group's largest |w| maps to the largest integer"
    step = scale.repeat_interleave(group_size, dim=1)  # each element's own scale
    error = (model.dequantize(q, scale) - w).abs()
    assert bool((error <= step / 2 + 1e-6).all()), f"round-trip error {float((error / step).max()):.3f} steps > 1/2"


def test_quantize_keeps_zero_and_rejects_ragged_groups():
    w = torch.zeros(2, 8)
    w[0, 3] = -2.0
    q, scale = model.quantize_absmax(w, 8, 8)
    assert torch.equal(model.dequantize(q, scale), w), "zeros (and a zero row) come back exactly"
    with pytest.raises(ValueError, match="not a whole number of groups of 32"):
        model.quantize_absmax(torch.zeros(2, 48), 4, 32)


def test_int4_packing_round_trip_is_exact():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every 4-bit value, (3, 32)
    packed = model.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert packed[0, 0] == (0x8 | (0x9 << 4)), "-8 -> 0b1000 in the low nibble, -7 -> 0b1001 in the high one"
    assert torch.equal(model.unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_matches_its_float_reference(bits):
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    quantized = model.QuantizedLinear(linear.weight, linear.bias, bits)
    q, scale = model.quantize_absmax(linear.weight.detach(), bits, 32 if bits == 4 else 64)
    reference = F.linear(x, model.dequantize(q, scale), linear.bias)
    assert torch.allclose(quantized(x), reference, atol=1e-6), "forward = F.linear with the dequantized weight"
    bound = x.abs() @ (scale.repeat_interleave(64 // scale.size(1), dim=1) / 2).T  # sum |x| * half a step
    assert bool(((quantized(x) - linear(x)).abs() <= bound + 1e-5).all())
    rows = torch.tensor([[3, 0], [31, 3]])
    assert torch.equal(quantized.rows(rows), quantized.weight[rows]), "rows() dequantizes just those rows"


@pytest.mark.parametrize("mode,smaller", [("int8", 3.5), ("int4", 5.5)])
def test_quantized_model_generates_with_the_cache_and_is_smaller(mode, smaller):
    gpt = tiny_model(n_embd=64, n_head=2, pos="rope", bias=False).eval()  # nearly all weights are matrices
    size = model.weight_bytes(gpt)
    idx = torch.randint(0, gpt.config.vocab_size, (2, 5))
    float_logits = gpt(idx)[0]
    q = model.quantize_model(gpt, mode)
    assert isinstance(q.transformer.h[0].attn.c_attn, model.QuantizedLinear)
    assert q.transformer.wte.table is q.lm_head, "the tied embedding and head share one quantized table"
    assert size / model.weight_bytes(q) >= smaller
    assert not any(p.requires_grad for p in q.parameters())
    cached = q.generate(idx, 6, temperature=0)
    assert torch.equal(cached, q.generate(idx, 6, temperature=0, use_cache=False)), "KV cache: the same tokens"
    assert (q(idx)[0] - float_logits).abs().max() < (0.1 if mode == "int8" else 0.5)


def test_quantize_model_none_and_bad_names():
    gpt = tiny_model()
    assert model.quantize_model(gpt, "none") is gpt and isinstance(gpt.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="--quantize='int2' is not one of none, int8, int4"):
        model.quantize_model(gpt, "int2")


def test_weight_bytes_counts_tied_weights_once():
    gpt = tiny_model()
    assert model.weight_bytes(gpt) == 4 * gpt.num_params() + sum(
        b.numel() * 4 for n, b in gpt.named_buffers() if n in gpt.state_dict())
