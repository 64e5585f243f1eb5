"""
sample.py: generate text from any stage's checkpoint.

    python sample.py --ckpt out/small/pretrain --prompt "Once upon a time"
    python sample.py --ckpt out/small/sft --prompt "What is 3 plus 4?"
    python sample.py --ckpt out/small/ppo --interactive          # chat in the terminal

A checkpoint carries its model, weights and tokenizer, so nothing else is read.
Base (pretrain) models continue the prompt as a document: the prompt follows the
document separator, as every training document did. Chat models (sft, ppo)
get the prompt wrapped in the chat template (bpe.Tokenizer.encode_chat) and stop
at the end-of-turn token.

Sampling knobs (model.sample_next_token): temperature (0 = greedy), top-k,
top-p; a seed makes the output repeatable.
"""

import argparse
import math
import sys

import torch

import bpe
import prepare_data
from model import (CheckpointError, load_checkpoint, model_from_checkpoint, quantize_model, QUANTIZE,
                   tokenizer_from_checkpoint)
from train import pick_device

CHAT_STAGES = ("sft", "ppo")
GENERATIVE_STAGES = ("pretrain", "sft", "ppo")


def load_for_sampling(path, device="cpu", quantize="none"):
    """(model, tokenizer, stage) from a checkpoint file or its folder; its weights in 8 or 4 bits if asked."""
    ckpt = load_checkpoint(path)
    if ckpt["stage"] not in GENERATIVE_STAGES:
        raise CheckpointError(f"checkpoint {path} is a '{ckpt['stage']}' checkpoint, which does not generate text; "
                              f"give a {'/'.join(GENERATIVE_STAGES)} checkpoint"
                              + (" (a reward model scores text: reward.score_responses)"
                                 if ckpt["stage"] == "rm" else ""))
    model = quantize_model(model_from_checkpoint(ckpt, device).eval(), quantize)
    return model, tokenizer_from_checkpoint(ckpt), ckpt["stage"]


def prompt_ids(tokenizer, prompt, chat, history=()):
    """The ids the model continues. chat: earlier (user, assistant) turns, then
    the template around `prompt`, ending with the assistant marker. Base model:
    the document separator, then the prompt as plain text."""
    if not chat:
        return [tokenizer.special_ids[bpe.DOC_SEP]] + tokenizer.encode(prompt)
    ids = []
    for user_text, assistant_text in history:
        p, r = tokenizer.encode_chat(user_text, assistant_text)
        ids += p + r
    return ids + tokenizer.encode_chat(prompt)[0]


def answer_length(block_size, n_prompt, max_new_tokens):
    """The prompt and the answer share the block: the answer gets the room the prompt leaves, at most
    max_new_tokens and at least a quarter of the block (a longer prompt keeps its most recent tokens)."""
    return max(1, min(max_new_tokens, max(block_size - n_prompt, block_size // 4)))


def generate_text(model, tokenizer, ids, chat, num_samples=1, max_new_tokens=100, temperature=0.8,
                  top_k=None, top_p=None, seed=None):
    """num_samples continuations of the prompt ids (answer_length tokens at most), as text. Chat models stop
    at end of turn (the marker is not part of the returned text)."""
    block = model.config.block_size
    max_new_tokens = answer_length(block, len(ids), max_new_tokens)
    ids = ids[-(block - max_new_tokens):]
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    end = tokenizer.special_ids[bpe.END_OF_TURN] if chat else None
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_token=end, seed=seed)
    texts = []
    for row in out[:, len(ids):].tolist():
        if end is not None and end in row:
            row = row[:row.index(end)]
        texts.append(tokenizer.decode(row))
    return texts


def chat_loop(model, tokenizer, args, read=input, write=print):
    """A conversation in the terminal; each turn sees the earlier ones."""
    history = []
    write("chat with the model; an empty line or Ctrl-D ends it")
    while True:
        try:
            user_text = read("you> ")
        except EOFError:
            break
        if not user_text.strip():
            break
        ids = prompt_ids(tokenizer, user_text, chat=True, history=history)
        reply = generate_text(model, tokenizer, ids, True, 1, args.max_new_tokens, args.temperature,
                              args.top_k, args.top_p, args.seed)[0]
        write(f"model> {reply}")
        history.append((user_text, reply))
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sample.py", description="Generate text from a stagegpt checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or the folder holding ckpt.pt")
    parser.add_argument("--prompt", default="", help="text to continue (base) or to answer (chat)")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE, help="weights in 8 or 4 bits (model.py)")
    parser.add_argument("--interactive", action="store_true", help="chat in the terminal (sft/ppo checkpoints)")
    args = parser.parse_args(argv)
    try:
        if min(args.num_samples, args.max_new_tokens, 1 if args.top_k is None else args.top_k) < 1:
            raise ValueError("--num-samples, --max-new-tokens and --top-k must be at least 1")
        if not 0 <= args.temperature < math.inf or (args.top_p is not None and not 0 < args.top_p <= 1):
            raise ValueError("--temperature must be a number >= 0 and --top-p in (0, 1]")
        prompt = args.prompt
        if args.prompt_file:
            prompt = bpe.read_text_file(args.prompt_file)
        model, tokenizer, stage = load_for_sampling(args.ckpt, pick_device(args.device), args.quantize)
        chat = stage in CHAT_STAGES
        if args.interactive:
            if not chat:
                raise ValueError(f"--interactive needs a chat checkpoint (sft or ppo); {args.ckpt} is '{stage}'")
            chat_loop(model, tokenizer, args)
            return 0
        ids = prompt_ids(tokenizer, prompt, chat)
        if (n := answer_length(model.config.block_size, len(ids), args.max_new_tokens)) < args.max_new_tokens:
            print(f"sample.py: note: --max-new-tokens {args.max_new_tokens} cut to {n}: the model's block holds "
                  f"{model.config.block_size} tokens, the prompt takes {len(ids)}", file=sys.stderr)
        texts = generate_text(model, tokenizer, ids, chat, args.num_samples, args.max_new_tokens,
                              args.temperature, args.top_k, args.top_p, args.seed)
        for i, text in enumerate(texts):
            if args.num_samples > 1:
                print(f"--- sample {i + 1}/{args.num_samples}")
            print(prompt + text if not chat else text)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"sample.py: error: {prepare_data.error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
