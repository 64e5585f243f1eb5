"""
sft.py: supervised fine-tuning, from a base model to one that answers in turns.

    python sft.py --config small                     # after train.py --config small
    python sft.py --config small --max_iters=200     # any key can be overridden
    python sft.py --config small --resume            # continue out/small/sft/ckpt.pt
    torchrun --standalone --nproc_per_node=8 sft.py --config gpt2

Reads out/<config>/pretrain/ckpt.pt (the base model), data/<dataset>/sft_{train,val}.jsonl (demonstrations) and,
with pretrain_rows, data/<dataset>/train.bin; writes out/<config>/sft/{ckpt.pt, log.jsonl, loss.png, accuracy.png}.

Every demonstration is laid out in the one chat template (bpe.Tokenizer.encode_chat):

    <|user|> prompt <|end|> <|assistant|> response <|end|>
    mask:  0    0     0        0          1 ... 1    1

The loss is the next-token cross-entropy on the response tokens only (mask 1), the closing <|end|> included:
a model that never sees <|end|> as a target never learns to stop. Prompt tokens are context, not targets
(mask 0), and padding is never a target either (target id -1, which cross_entropy ignores).

Fine-tuning every weight on chat alone overwrites the language the base model learned (the "alignment tax",
measured by eval.py). With pretrain_rows, every micro-batch of demonstrations is followed by one of pretrain_rows
windows of the pretraining corpus, and the step's loss is the mean of the two: the chat loss teaches the turns,
the windows' next-token loss keeps the language (InstructGPT's PPO-ptx mixes pretraining gradients into RLHF).

Every eval_interval steps: the loss on held-out responses, and greedy answers to held-out prompts graded by
tinyworld.py's simulated labeler (accuracy per task type, end-of-turn rate); the first grades the base model.
"""

import os
import sys

import torch

import tinyworld
import prepare_data
from model import (answer_prompts, clean_state_dict, load_checkpoint, model_from_checkpoint, parent_record,
                   tokenizer_from_checkpoint)
from train import (append_jsonl, configure_optimizer, end_run, forward_backward, get_batch, load_dataset, open_log,
                   optimizer_step, plot_curves, Progress, read_jsonl_log, rng_state, save_run, scheduled_lr,
                   set_rng_state, stage_main, start_run, StopRequested, training_precision, wrap_model)

STAGE = "sft"

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default", dataset="tinyworld", data_dir="data",  # data/<dataset>/sft_{train,val}.jsonl, prepare_data.py
    init="", out_dir="",        # "": out/<config>/pretrain/ckpt.pt (the base model), out/<config>/sft
    batch_size=32,              # examples (or packed rows) per micro-step, per process
    grad_accum=1,               # micro-steps per optimizer step, summed over all processes
    block_size=0,               # longest example in tokens; 0 = the model's block size
    pack=False,                 # pack several examples into each row of block_size tokens
    dropout=0.0,                # dropout while fine-tuning (the model's own setting is ignored)
    pretrain_rows=0,            # windows of train.bin (block_size tokens) per micro-step beside the chat rows; 0: none
    max_iters=600, learning_rate=3e-4,  # gentler than pretraining: the model already knows the language
    min_lr_ratio=0.1, warmup_iters=30, weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0,
    eval_interval=200, eval_prompts=200,  # eval_prompts: held-out prompts answered greedily per evaluation (0: none)
    max_new_tokens=48,          # answer length limit in those evaluations
    log_interval=10, stop_at_iter=0,  # stop (and save) after stop_at_iter iterations; 0 = run to max_iters
    device="auto", dtype="auto", compile=False, seed=1337,  # compile: torch.compile, best with pack=True (fixed shapes)
)

PRESETS = {
    "tiny": dict(batch_size=8, max_iters=30, warmup_iters=3, learning_rate=1e-3, eval_interval=15,
                 eval_prompts=8, max_new_tokens=12, log_interval=5),  # seconds, for tests
    # a 2-core laptop CPU, after train.py --config small; half of every step is pretraining windows (docs/log.md)
    "small": dict(batch_size=32, pretrain_rows=16, max_iters=1350, warmup_iters=30, learning_rate=2e-3,
                  eval_interval=675, eval_prompts=200),
    # GPT-2 124M on GPUs, after train.py --config gpt2
    "gpt2": dict(dataset="alpaca", batch_size=16, grad_accum=8, block_size=512, pack=True, max_iters=1500, compile=True,
                 learning_rate=3e-5, warmup_iters=50, eval_interval=250, eval_prompts=200, max_new_tokens=128),
}


# -----------------------------------------------------------------------------
# Examples: ids and the loss mask

def response_mask(n_prompt, n_response):
    """1 for each training target (the response and its end-of-turn token), 0 for context (the prompt, markers too)."""
    return [0] * n_prompt + [1] * n_response


def make_example(tokenizer, prompt, response, block_size):
    """A demonstration -> (ids, mask, truncated). ids and mask have the same length, at most block_size + 1
    (inputs and targets are that shifted by one); a longer example loses its end, ids and mask together."""
    prompt_ids, response_ids = tokenizer.encode_chat(prompt, response)
    ids, mask = prompt_ids + response_ids, response_mask(len(prompt_ids), len(response_ids))
    return ids[:block_size + 1], mask[:block_size + 1], len(ids) > block_size + 1


def shift_targets(ids, mask):
    """(ids, mask) of one row -> (inputs, targets), each len(ids) - 1: the model at position t predicts
    ids[t + 1], which is a target only where mask[t + 1] is 1; elsewhere the target is -1 (ignored by the loss)."""
    return ids[:-1], [tok if m else -1 for tok, m in zip(ids[1:], mask[1:])]


def collate(rows, pad_id=0):
    """Rows [(ids, mask), ...] -> x, y (B, T) long, padded on the right to the longest row. Padding inputs get
    pad_id (any id: they come after the real tokens, so the causal mask hides them) and padding targets get -1."""
    shifted = [shift_targets(ids, mask) for ids, mask in rows]
    T = max(len(inputs) for inputs, _ in shifted)
    x, y = (torch.full((len(rows), T), fill, dtype=torch.long) for fill in (pad_id, -1))
    for i, (inputs, targets) in enumerate(shifted):
        x[i, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        y[i, :len(targets)] = torch.tensor(targets, dtype=torch.long)
    return x, y


def pack_examples(examples, block_size):
    """Pack examples [(ids, mask), ...] in order into rows of at most block_size + 1 tokens (less padding).
    Each keeps its own mask, so the loss has the same targets; the next prompt starts right after the last <|end|>."""
    rows, ids, mask = [], [], []
    for e_ids, e_mask in examples:
        if ids and len(ids) + len(e_ids) > block_size + 1:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        rows.append((ids, mask))
    return rows


def masked_lm_loss(logits, targets):
    """Mean cross-entropy over the targets that are not -1 (the response tokens). logits (B, T, V), targets (B, T)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)


# -----------------------------------------------------------------------------
# Data

def load_records(path):
    """The demonstrations of a sft_*.jsonl file, each checked for a non-empty prompt and a string response."""
    records = prepare_data.read_jsonl(path)
    if not records:
        raise prepare_data.DataError(f"{path} has no records: rerun prepare_data.py")
    for number, r in enumerate(records, start=1):
        for field in ("prompt", "response"):
            if not isinstance(r.get(field), str) or (field == "prompt" and not r[field].strip()):
                raise prepare_data.DataError(f"{path} line {number} has no {field}: each line needs "
                                             f'"prompt" and "response" strings')
    return records


def load_sft_data(config, tokenizer, block_size):
    """Training rows, validation rows and held-out records, and the count of truncated examples per split."""
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    data, truncated = {}, {}
    for split in ("train", "val"):
        records = load_records(os.path.join(folder, f"sft_{split}.jsonl"))
        examples = [make_example(tokenizer, r["prompt"], r["response"], block_size) for r in records]
        truncated[split] = sum(e[2] for e in examples)
        rows = [(ids, mask) for ids, mask, _ in examples]
        data[split] = pack_examples(rows, block_size) if config["pack"] and split == "train" else rows
        data[f"{split}_records"] = records
    return data, truncated


def batch_indices(n_rows, batch_size, epoch, cursor, seed):
    """The next batch of row indices, and (epoch, cursor) after it: rows are visited in a fresh random order each
    epoch (drawn from seed and epoch, so a resumed run draws the same)."""
    out = []
    while len(out) < batch_size:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        take = order[cursor:cursor + batch_size - len(out)].tolist()
        out += take
        cursor += len(take)
        if cursor >= n_rows:
            epoch, cursor = epoch + 1, 0
    return out, epoch, cursor


def step_batches(rows, pretrain, block_size, config, it, epoch, cursor, rank=0, world=1):
    """One optimizer step's micro-batches [(x, y), ...] for this process, the targets they hold (all processes), and
    (epoch, cursor) after them. With pretrain_rows, each micro-batch of chat rows is followed by one of pretrain_rows
    windows of the pretraining tokens, drawn from the seed and it so that a resumed run draws the same."""
    window_gen = torch.Generator().manual_seed(config["seed"] * 1_000_000 + it * world + rank)
    micro_batches = []
    for _ in range(config["grad_accum"] // world):
        indices, epoch, cursor = batch_indices(len(rows), config["batch_size"] * world, epoch, cursor, config["seed"])
        micro_batches.append(collate([rows[i] for i in indices[rank::world]]))
        if config["pretrain_rows"]:
            micro_batches.append(get_batch(pretrain, block_size, config["pretrain_rows"], window_gen))
    targets = sum(int((y != -1).sum()) for _, y in micro_batches) * world
    return micro_batches, targets, epoch, cursor


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def response_loss(model, rows, batch_size, ctx, device):
    """Mean loss over the response tokens of all rows (token-weighted)."""
    model.eval()
    nats, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        x, y = (t.to(device) for t in collate(rows[start:start + batch_size]))
        with ctx:
            logits, _ = model(x)
        n = int((y != -1).sum())
        nats += masked_lm_loss(logits, y).item() * n
        count += n
    model.train()
    return nats / max(count, 1)


def evaluate(model, tokenizer, data, config, ctx, device):
    """Held-out response loss, and the graded greedy answers to held-out prompts."""
    metrics = {"val_loss": response_loss(model, data["val"], config["batch_size"], ctx, device)}
    records = data["val_records"][:config["eval_prompts"]]
    if records:
        with ctx:  # greedy answers in the chat template
            answers = answer_prompts(model, tokenizer, [r["prompt"] for r in records], config["max_new_tokens"])
        grades = tinyworld.grade_answers(records, answers)
        metrics.update({k: grades[k] for k in ("accuracy", "gold", "end_rate", "words")})
        metrics.update({f"acc_{task}": g["accuracy"] for task, g in grades["by_task"].items()})
    return metrics


def format_metrics(metrics):
    text = f"val response loss {metrics['val_loss']:.4f}"
    if "accuracy" in metrics:
        tasks = ", ".join(f"{k[4:]} {100 * v:.0f}%" for k, v in metrics.items() if k.startswith("acc_"))
        text += (f" | accuracy {100 * metrics['accuracy']:.1f}% ({tasks}) | end of turn "
                 f"{100 * metrics['end_rate']:.0f}% | gold {metrics['gold']:.2f}")
    return text


# -----------------------------------------------------------------------------
# The run

def resolve_paths(config):
    return (config["init"] or os.path.join("out", config["config"], "pretrain", "ckpt.pt"),
            config["out_dir"] or os.path.join("out", config["config"], STAGE))


def run(config, flags=()):
    """Fine-tune; returns the metrics of the final evaluation (with the base model's under "base")."""
    # 1. processes, device, --resume or --overwrite; the base model (pretrained, or SFT to fine-tune further)
    init_path, out_dir = resolve_paths(config)
    run = start_run(config, flags, STAGE, out_dir)
    base = run.resume if run.resume is not None else load_checkpoint(init_path, stages={"pretrain", "sft"})
    parent = base["parent"] if run.resume is not None else parent_record(init_path)
    model_args = dict(base["model_args"], dropout=config["dropout"])
    tokenizer = tokenizer_from_checkpoint(base)
    block_size = config["block_size"] or model_args["block_size"]
    if block_size > model_args["block_size"]:
        raise ValueError(f"--block_size={block_size} is longer than the model's block size {model_args['block_size']}")
    data, truncated = load_sft_data(config, tokenizer, block_size)
    pretrain = None  # with pretrain_rows: the base model's own corpus, in its token ids
    if config["pretrain_rows"]:
        tokens, pretrain_tokenizer, _ = load_dataset(dict(config, block_size=block_size))
        if pretrain_tokenizer.to_dict() != base["tokenizer"]:
            raise ValueError(f"data/{config['dataset']} has another tokenizer than {parent['path']}'s: give the "
                             f"--dataset its base model was pretrained on, or --pretrain_rows=0")
        pretrain = tokens["train"]
    if not any(any(mask[1:]) for _, mask in data["train"]):  # the loss would be a mean over no tokens
        raise ValueError(f"--block_size={block_size} leaves no response token of any demonstration (the prompts "
                         f"fill it): use a larger --block_size, or 0 for the model's")

    # 2. the model, its precision (measured on one micro-batch of training rows, as train.py) and the optimizer
    torch.manual_seed(config["seed"] + run.rank)
    raw_model = model_from_checkpoint(dict(base, model_args=model_args), run.device)
    batch = [t.to(run.device) for t in collate(data["train"][:config["batch_size"]])]
    dtype, dtype_why, ctx, scaler = training_precision(config["dtype"], run.device_type, raw_model,
                                                       lambda c: forward_backward(raw_model, [batch], c))
    optimizer = configure_optimizer(raw_model, config["learning_rate"], config["weight_decay"],
                                    (config["beta1"], config["beta2"]), run.device_type)
    it, epoch, cursor, metrics = 0, 0, 0, {}
    if run.resume is not None:
        state = run.resume["resume"]
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        it, epoch, cursor, metrics = state["iter"], state["epoch"], state["cursor"], dict(run.resume["metrics"])
    compile_batch = tuple(t.to(run.device) for t in collate(data["train"][:config["batch_size"]]))
    model = wrap_model(raw_model, run, compile_batch if config["compile"] else None, ctx)
    open_log(run, it, f"from {parent['path']} ({raw_model.num_params() / 1e6:.2f}M parameters), "
             f"{len(data['train_records'])} demonstrations in {len(data['train'])} rows"
             f"{' (packed)' if config['pack'] else ''}, {truncated['train']} truncated to {block_size + 1} tokens; "
             f"{config['grad_accum'] * config['batch_size']} rows/iter, device {run.device} x{run.world}",
             dtype, dtype_why)

    def run_eval(it):
        result = dict(evaluate(raw_model, tokenizer, data, config, ctx, run.device), iter=it)
        print(f"eval {it}: {format_metrics(result)}")
        append_jsonl(run.log_path, result)
        return result

    if run.master and it == 0:
        metrics["base"] = run_eval(0)  # the base model, prompted with the chat template: SFT buys the difference
    progress = Progress(run, it, run.end_iter, config["log_interval"], "target_tok")
    stopper = StopRequested()
    try:
        while it < run.end_iter:
            # 3. one optimizer step on the response tokens (and any pretraining windows), each process on its own slice
            lr = scheduled_lr(optimizer, it, config)
            micro_batches, targets, epoch, cursor = step_batches(data["train"], pretrain, block_size, config, it,
                                                                 epoch, cursor, run.rank, run.world)
            micro_batches = [(x.to(run.device), y.to(run.device)) for x, y in micro_batches]
            loss = forward_backward(model, micro_batches, ctx, scaler)
            loss, grad_norm = optimizer_step(raw_model, optimizer, loss, scaler, config["grad_clip"], run, it)
            it += 1
            progress.update(it, dict(loss=loss, lr=lr, grad_norm=grad_norm, epoch=epoch), targets, f"epoch {epoch}")

            # 4. now and then: held-out loss and graded answers, a checkpoint, the plots
            at_eval = it % config["eval_interval"] == 0 or it == run.end_iter
            if at_eval or stopper.requested:
                if run.master and at_eval:
                    metrics.update(run_eval(it))
                if run.master:
                    save_run(run, {"stage": STAGE, "model_args": dict(model_args, dropout=0.0),
                                   "model": clean_state_dict(raw_model), "tokenizer": tokenizer.to_dict(),
                                   "config": dict(config, dtype=dtype), "parent": parent, "metrics": metrics,
                                   "data": {"dataset": config["dataset"], "truncated": truncated},
                                   "resume": {"optimizer": optimizer.state_dict(), "iter": it, "rng": rng_state(),
                                              "epoch": epoch, "cursor": cursor, "world": run.world}})
                    plot_progress(read_jsonl_log(run.log_path), metrics, run.out_dir, config["config"])
                progress.pause(it)
                if stopper.requested:
                    break
    finally:
        model = None  # the DDP wrapper goes before its process group
        end_run(run, stopper)
    progress.done(it, stopper.requested)
    return metrics


def plot_progress(records, metrics, out_dir, name):
    """loss.png (training and held-out response loss) and accuracy.png (graded answers by task)."""
    plot_curves(records, [("train (per step)", "loss"), ("val responses", "val_loss")],
                os.path.join(out_dir, "loss.png"), f"SFT loss on response tokens ({name})")
    plot_curves(records, [("accuracy", "accuracy"), ("end-of-turn rate", "end_rate")]
                + [(k[4:], k) for k in metrics if k.startswith("acc_")],
                os.path.join(out_dir, "accuracy.png"), f"SFT held-out answers ({name})")


def main(argv=None):
    return stage_main(run, argv, DEFAULTS, PRESETS, "sft.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
