"""The whole MIRO pipeline, end to end, on the embedded synthetic world (CPU, a few minutes):

    score -> bin -> shard -> load/train -> convert -> sample

Each stage is the project's own command, printed before it runs; the preprocessing stages skip the
shards they finished and the later ones are skipped when their last output exists, so a rerun
resumes. Everything goes under --workdir (default demo/).

    python launchers/demo.py [--workdir demo] [--samples 2048] [--steps 300]
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ["caption_alignment_score", "sharpness_score", "contrast_score", "colourfulness_score"]
BINS = 16


def stage(name: str, done, command: list) -> None:
    """Run a stage's command unless ``done`` (a file its command writes last) exists."""
    print(f"\n== {name}: {' '.join(shlex.quote(str(c)) for c in command)}", flush=True)
    if done is not None and done.exists():
        print(f"   (done: {done} exists)")
        return
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    work = (ROOT / a.workdir).resolve()
    py = sys.executable
    num_shards = -(-a.samples // a.shard_size)
    shards = f"{work}/world/{{00000..{num_shards - 1:05d}}}.tar"
    run_dir = work / "run"
    final = run_dir / "checkpoints" / f"step_{a.steps:08d}"

    stage("synthetic world", work / "world/manifest.json",
          [py, "-m", "miro_scale.data.synthetic_world", "--out", work / "world", "--num-samples", a.samples,
           "--shard-size", a.shard_size, "--resolution", 32, "--seed", 0])
    # the preprocessing stages skip the shards they finished, so they always run: a rerun resumes
    stage("score", None,
          [py, "preprocessing/score.py", "--shards", shards, "--rewards", ",".join(REWARDS),
           "--out", work / "scores"])
    stage("bin", None,
          [py, "preprocessing/bin.py", "--scores", work / "scores", "--num-bins", BINS, "--strategy", "quantile",
           "--out", work / "bins"])
    stage("shard", None,
          [py, "preprocessing/shard.py", "--shards", shards, "--bins", work / "bins", "--out", work / "shards"])
    stage("train", final / "trainer.json",
          [py, "launchers/train.py", "--config", "configs/synthetic_world.json", "--set",
           f"data.shards={work / 'shards'}", f"train.output_dir={run_dir}", f"train.steps={a.steps}"])
    stage("convert", work / "miro_synthetic" / "config.json",
          [py, "checkpoints_tools/export.py", "--checkpoint", final, "--out", work / "miro_synthetic"])
    stage("sample", work / "samples/grid.png",
          [py, "launchers/sample.py", "--model", work / "miro_synthetic",
           "--prompt", "a photo of two red circles", "--prompt", "a blue square left of a green triangle",
           "--prompt", "a photo of a yellow star", "--sweep", "sharpness_score", "--out", work / "samples"])
    print(f"\nsample grids during training: {run_dir / 'samples'}; reward curves: {run_dir / 'reward_curves.png'}"
          f"\nreward sweep: {work / 'samples/grid.png'}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
