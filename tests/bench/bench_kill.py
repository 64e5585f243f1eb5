"""Stress test of the checkpoint guarantees: kill -9 at random moments, and inside saves.

    python tests/bench/bench_kill.py [--kills 16] [--seed 0] [--keep]

In a temporary folder: a small tinyworld dataset, then for each training stage in turn (train, sft, reward,
ppo; each starts from the previous stage's final checkpoint) a run on its tiny preset that saves at every
step, started again and again (fresh, then --resume) and killed with SIGKILL: a quarter of the kills at a random
moment of start-up (loading, resuming, the folder's lock), a quarter at a random moment after the run's first few
saves (a step, an evaluation, a plot, a save), half the moment a save's temporary file appears after the first
few (the child's os.fsync is slowed by 50 ms so that the write is caught under way; the stages are unchanged).

After each kill: does ckpt.pt load (model.load_checkpoint: complete, finite, the right stage)? Was the kill
inside a save (a ckpt.pt.tmp<pid> file left behind)? A run that ends by itself with an error is a failed
resume. After the kills of a stage: one last resume runs to completion (--stop_at_iter two steps on), must
leave no temporary file of any killed writer (stray files), and must give the same weights, bit for bit, as
one uninterrupted run to the same iteration (exact). Prints a table; exit status 1 if any count is not 0.
"""

import argparse
import datetime
import glob
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import prepare_data  # noqa: E402
from model import CheckpointError, load_checkpoint  # noqa: E402

SMALL_DATA = dict(megabytes=0.08, sft_train=80, sft_val=8, prefs_train=80, prefs_val=16, prompts_ppo=32,
                  prompts_eval=8, mc=8, quiet=True)
# each stage's tiny preset, saving at every step; max_iters beyond what the kills reach
STAGES = {
    "train": ("train.py", ["--max_iters=400", "--eval_interval=1", "--sample_tokens=0"]),
    "sft": ("sft.py", ["--max_iters=400", "--eval_interval=1", "--eval_prompts=0"]),
    "reward": ("reward.py", ["--max_iters=400", "--eval_interval=1"]),
    "ppo": ("ppo.py", ["--max_iters=200", "--save_interval=1", "--eval_prompts=4"]),
}
# the child: the stage's own command line, with os.fsync 50 ms slower (a save is then seen under way)
CHILD = ("import os, runpy, sys, time; sync = os.fsync; os.fsync = lambda fd: (time.sleep(0.05), sync(fd))[1]; "
         "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
         "runpy.run_path(sys.argv[0], run_name='__main__')")


def stage_args(stage, root, parents):
    """The command line of a stage's run in root/out/STAGE, on root/data, from the parents' checkpoints."""
    script, extra = STAGES[stage]
    inputs = {"train": [], "sft": [f"--init={parents.get('train')}"], "reward": [f"--init={parents.get('sft')}"],
              "ppo": [f"--init_dir={parents.get('sft')}", f"--reward_dir={parents.get('reward')}"]}[stage]
    return [os.path.join(ROOT, script), "--config", "tiny", f"--data_dir={os.path.join(root, 'data')}",
            f"--out_dir={os.path.join(root, 'out', stage)}", "--dtype=float32", *inputs, *extra]


def temporaries(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "*.tmp*")))


def file_version(path):
    """(inode, mtime) of path, or None: every save (a new file renamed over the old) changes it."""
    try:
        stat = os.stat(path)
        return stat.st_ino, stat.st_mtime_ns
    except FileNotFoundError:
        return None


def kill_one(args, out_dir, mode, rng):
    """Start the run (fresh, or --resume when a checkpoint exists) and SIGKILL it: during start-up ("start"), at a
    random moment after its n-th save ("step"), or the moment its next save is under way ("save"), n from 1 to 4.
    -> (killed, killed inside a save (its ckpt.pt.tmp<pid> is there), exit status, output)."""
    flag = "--resume" if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else "--overwrite"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args, flag], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=os.path.dirname(os.path.dirname(out_dir)))
    ckpt, tmp = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, f"ckpt.pt.tmp{proc.pid}")
    saves, version, n = 0, file_version(ckpt), rng.randint(1, 4)
    deadline = time.time() + (rng.uniform(0.2, 3.0) if mode == "start" else 120.0)
    while time.time() < deadline and proc.poll() is None:
        if mode == "save" and saves >= n and os.path.exists(tmp):
            break
        if file_version(ckpt) != version:
            saves, version = saves + 1, file_version(ckpt)
            if mode == "step" and saves == n:
                deadline = time.time() + rng.uniform(0.0, 0.3)
        time.sleep(0.002)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]  # reaped: a dead process's lock is stale only once it is gone
    return killed, killed and os.path.exists(tmp), proc.returncode, output


def check_checkpoint(out_dir, stage):
    """'' when ckpt.pt is absent or loads as a complete, finite checkpoint of its stage; else the reason."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        return ""
    try:
        ckpt = load_checkpoint(path, stages={{"train": "pretrain", "reward": "rm"}.get(stage, stage)})
        return "" if stage != "ppo" or "critic" in ckpt else "no critic in the ppo checkpoint"
    except CheckpointError as e:
        return str(e)


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {**ckpt["model"], **{f"critic.{k}": v for k, v in ckpt.get("critic", {}).get("model", {}).items()}}


def stress_stage(stage, root, parents, kills, rng, log):
    """kills runs of one stage killed; the final resume and the uninterrupted run to compare. -> the row."""
    args, out_dir = stage_args(stage, root, parents), os.path.join(root, "out", stage)
    row = dict(stage=stage, kills=0, inside=0, unloadable=0, failed=0, stray=0, most_tmp=0, exact="no", iter=0)
    for k in range(kills):
        killed, inside, status, output = kill_one(args, out_dir, ("start", "save", "step", "save")[k % 4], rng)
        row["kills"] += killed
        row["inside"] += inside
        row["most_tmp"] = max(row["most_tmp"], len(temporaries(out_dir)))
        if not killed and status != 0:  # it ended by itself: only an error can end a run this long
            row["failed"] += 1
            log(f"  {stage}: run {k} failed: {output.strip().splitlines()[-1] if output.strip() else status}")
        if problem := check_checkpoint(out_dir, stage):
            row["unloadable"] += 1
            log(f"  {stage}: after kill {k}: {problem}")
    # the last resume, to completion two steps on; then one run straight to the same iteration
    saved = os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    done = (torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["resume"]["iter"] if saved else 0) + 2
    final = subprocess.run([sys.executable, *args, "--resume" if saved else "--overwrite", f"--stop_at_iter={done}"],
                           capture_output=True, text=True, cwd=root)
    if final.returncode != 0:
        row["failed"] += 1
        log(f"  {stage}: the last resume failed: {final.stderr.strip()[-300:]}")
    row["stray"] = len(temporaries(out_dir)) + os.path.exists(os.path.join(out_dir, "run.lock"))
    straight = os.path.join(root, "straight", stage)
    subprocess.run([sys.executable, *[a if not a.startswith("--out_dir=") else f"--out_dir={straight}" for a in args],
                    f"--stop_at_iter={done}"], check=True, capture_output=True, cwd=root)
    a, b = weights(os.path.join(out_dir, "ckpt.pt")), weights(os.path.join(straight, "ckpt.pt"))
    row.update(iter=done, exact="yes" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "no")
    return row


def cpu_name():
    """The CPU's model name where Linux tells it, else what platform knows."""
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=16, help="runs killed per stage (half of them inside a save)")
    parser.add_argument("--stages", default="train,sft,reward,ppo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng, root, t0 = random.Random(args.seed), tempfile.mkdtemp(prefix="bench_kill_"), time.time()
    prepare_data.prepare(dataset="tinyworld", data_root=os.path.join(root, "data"), **SMALL_DATA)
    rows, parents = [], {}
    for stage in args.stages.split(","):
        rows.append(stress_stage(stage, root, parents, args.kills, rng, print))
        parents[stage] = os.path.join(root, "out", stage)
        print(f"{stage}: done ({time.time() - t0:.0f}s)", flush=True)
    keys = ("kills", "inside", "unloadable", "failed", "stray")
    total = dict({k: sum(r[k] for r in rows) for k in keys}, stage="total", most_tmp=max(r["most_tmp"] for r in rows),
                 exact="yes" if all(r["exact"] == "yes" for r in rows) else "no", iter="")
    print(f"\nbench_kill.py --kills {args.kills} --seed {args.seed}, {datetime.date.today()}, {cpu_name()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {time.time() - t0:.0f}s\n")
    print("| stage | kills | kills inside a save | unloadable checkpoints | failed resumes | stray files "
          "| most temporaries at once | exact after resume (iteration) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows + [total]:
        at = f" ({r['iter']})" if r["iter"] else ""
        print(f"| {r['stage']} | {r['kills']} | {r['inside']} | {r['unloadable']} | {r['failed']} | {r['stray']} "
              f"| {r['most_tmp']} | {r['exact']}{at} |")
    if not args.keep:
        shutil.rmtree(root)
    else:
        print(f"\nkept {root}")
    return 0 if total["unloadable"] == total["failed"] == total["stray"] == 0 and total["exact"] == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
