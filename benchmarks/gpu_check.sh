#!/usr/bin/env bash
# Every CUDA test and GPU benchmark of the project in ONE call on a lent GPU (benchmarks/README.md,
# "Running all of the above on a borrowed GPU node"):
#
#   bash benchmarks/gpu_check.sh                        # results in $OUT (default /tmp/gpu_check_out)
#   GPU_CHECK_ONLY="bench_train_compile kernels_bench_large" GPU_CHECK_BUDGET=200 bash benchmarks/gpu_check.sh
#   GPU_CHECK_LIST=1 bash benchmarks/gpu_check.sh       # print the steps (name, limit, command); run nothing
#
# Steps, tests first, then benchmarks by priority. Each runs in the repo root under its own
# `timeout`; a failure does not stop the next one; no step runs past the overall budget (default
# 540 s, so a 600 s call always ends with its summary written): a step that finds less than 30 s
# left is reported NOTRUN, and one that finds less than its limit gets what is left.
#   wheels               pip install the carried wheels (--no-index --no-deps) into a private
#                        --target folder put on PYTHONPATH: the preinstalled torch is never touched
#   facts                versions, device properties, measured copy GB/s and bf16 matmul TFLOP/s
#   cuda_tests           the kernel tests on CUDA tensors: ops fwd/bwd vs reference, TextRIN Triton vs
#                        reference, opcheck/torch.compile/autocast/FSDP2, dispatch, sm_90 SASS checks
#   train_bf16           launchers/train.py, miro_16m_random_tensors, local engine, bf16, 6 steps
#   bench_train          launchers/bench_train.py: reference vs triton (miro_16m, 256 px, batch 64)
#   kernels_bench        python -m kernels.bench --suite textrin, baselines eager, compile, liger
#   bench_score          preprocessing/bench_score.py: six full-size reward models, random weights
#   bench_sample         benchmarks/bench_sample.py: 50 Euler steps, multi-reward CFG, B=16 and 64
#   bench_sample_graphs  the same, Triton + torch.compile reduce-overhead (CUDA graphs), B=64
#   bench_train_compile  launchers/bench_train.py --variants reference+compile triton+compile (the
#                        release runs reference + compile: the baseline the kernels must beat)
#   kernels_bench_large  python -m kernels.bench --suite large (eager and liger baselines)
#
# Environment: OUT; GPU_CHECK_WHEELS (wheel folder, default .whl); GPU_CHECK_BUDGET (seconds for
# everything, default 540); GPU_CHECK_ONLY (names of the steps to run, space- or comma-separated;
# wheels and facts always run); GPU_CHECK_LIST=1; PYTHON (default python3); TMPDIR (where the
# unpacked results and the scratch training run go).
#
# $OUT receives four files (the device tool brings back 8 at most): summary.txt (also printed
# last), summary.json, facts.json and gpu_check.tar.gz (every step's log, JSON and PNG). Without a
# GPU (no nvidia-smi, or torch.cuda.is_available() False) nothing runs but `facts`, and the summary
# says so. Exit status: 0 when every step passed or there is no GPU, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
BUDGET=${GPU_CHECK_BUDGET:-540}
ONLY=${GPU_CHECK_ONLY:-}
LIST=${GPU_CHECK_LIST:-}
MIN_STEP=30  # seconds: a step is not started with less than this left

now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }
START=$(now)
DEADLINE=$(awk -v s="$START" -v b="$BUDGET" 'BEGIN { printf "%d", s + b - 15 }')  # 15 s kept for the summary
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
RES=$WORK/results      # what gpu_check.tar.gz holds
SCRATCH=$WORK/scratch  # the training run (its checkpoint is 5.4 GB): only metrics are kept
SITE=$WORK/site        # the carried wheels, installed
mkdir -p "$RES/logs" "$SCRATCH"
STEPS_TSV=$RES/steps.tsv
printf 'name\tstatus\trc\tseconds\tlimit\tcommand\n' >"$STEPS_TSV"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { awk -v s="$START" -v n="$(now)" 'BEGIN { printf "%d", n - s }'; }

record() {  # record NAME STATUS RC SECONDS LIMIT COMMAND
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STEPS_TSV"
  printf '[%4ss] %-20s %-7s %6ss (limit %ss)\n' "$(elapsed)" "$1" "$2" "$4" "$5"
}

selected() {  # wheels and facts always run; the others when GPU_CHECK_ONLY is empty or names them
  [[ -z $ONLY || $1 == wheels || $1 == facts ]] && return 0
  [[ " ${ONLY//,/ } " == *" $1 "* ]]
}

step() {  # step NAME TIMEOUT CMD... : CMD in the repo root under `timeout`, output in logs/NAME.log
  local name=$1 limit=$2
  shift 2
  local cmd="$*"
  if [[ -n $LIST ]]; then printf '%s\t%s\t%s\n' "$name" "$limit" "$cmd"; return 0; fi
  if ! selected "$name"; then record "$name" SKIP - 0 "$limit" "not in GPU_CHECK_ONLY: $cmd"; return 0; fi
  local left=$((DEADLINE - $(date +%s)))
  if ((left < MIN_STEP)); then record "$name" NOTRUN - 0 "$limit" "out of time: $cmd"; return 1; fi
  ((limit > left)) && limit=$left
  local log=$RES/logs/$name.log t0 rc status
  mkdir -p "$RES/$name"
  echo "\$ $cmd" >"$log"
  t0=$(now)
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')" "$limit" "$cmd"
  [[ $status == PASS ]]
}

summarise() {  # summarise GPU_REASON: summary.txt, summary.json, facts.json and gpu_check.tar.gz into $OUT
  if [[ $1 == gpu ]]; then
    cp "$SCRATCH"/train_bf16/{metrics.jsonl,config.json} "$RES/train_bf16/" 2>/dev/null
    timeout 20 nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,clocks.mem,power.draw,memory.used \
      --format=csv >"$RES/nvidia-smi-after.csv" 2>&1
  fi
  "$PY" - "$RES" "$OUT" "$1" "$(elapsed)" "$BUDGET" <<'PY' || echo "summariser failed; steps: $STEPS_TSV" | tee -a "$OUT/summary.txt"
import csv, glob, json, os, sys
import xml.etree.ElementTree as ET

res, out, gpu_reason, wall, budget = sys.argv[1:6]
steps = list(csv.DictReader(open(os.path.join(res, "steps.tsv")), delimiter="\t"))
def load(pattern):
    paths = sorted(glob.glob(os.path.join(res, pattern)))
    try:
        return json.load(open(paths[-1])) if paths else None
    except Exception as e:
        return {"unreadable": f"{paths[-1]}: {e}"}
facts = load("facts/facts.json") or {}

def note(name):  # the headline numbers of one step, from what it wrote
    if name == "facts" and facts.get("cuda_available"):
        c = facts.get("ceilings", {})
        return (f"{facts.get('device')} sm_{facts.get('capability')} {facts.get('sm_count')} SMs; torch "
                f"{facts['packages'].get('torch')} CUDA {facts.get('torch_cuda')} triton {facts['packages'].get('triton')}; "
                f"copy {c.get('copy_gbps', 0):.0f} GB/s, bf16 matmul {c.get('matmul_bf16_tflops', 0):.0f} TFLOP/s")
    if name == "facts" and facts:
        return (f"torch {facts['packages'].get('torch')} (CUDA build {facts.get('torch_cuda')}), "
                f"python {facts.get('python')}, {facts.get('cpus')} CPUs, no CUDA device visible")
    if name == "cuda_tests":
        junit, files = os.path.join(res, "cuda_tests", "junit.xml"), {}
        if not os.path.exists(junit):  # pytest was killed before it wrote the report
            return None
        for case in ET.parse(junit).iter("testcase"):
            f = case.get("classname", "?").split(".")[1] if "." in case.get("classname", "") else case.get("classname")
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            files.setdefault(f, {}).setdefault(kind, 0)
            files[f][kind] += 1
        return "; ".join(f"{f}: " + " ".join(f"{n} {k}" for k, n in sorted(c.items())) for f, c in sorted(files.items()))
    if name.startswith("bench_train"):
        r = load(f"{name}/train_step_cuda.json")
        return r and "; ".join(f"{x['variant']} {x['images_per_s']:.0f} img/s {100 * x['mfu']:.1f}% MFU "
                               f"{x.get('max_memory_gib', 0):.0f} GiB" for x in r["results"])
    if name.startswith("kernels_bench"):
        r = load(f"{name}/kernels_bench_*.json")
        if not r:
            return None
        met = [t for t in r["targets"] if t["met"]]
        missed = sorted({t["target"] for t in r["targets"] if not t["met"]})
        return f"targets met {len(met)}/{len(r['targets'])}" + (f"; missed kinds: {', '.join(missed)}" if missed else "")
    if name == "train_bf16":
        path = os.path.join(res, "train_bf16", "metrics.jsonl")
        rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
        return rows and (f"{rows[-1]['step']} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
                         f"{rows[-1]['images_per_s']:.0f} img/s, {100 * rows[-1]['mfu']:.1f}% MFU, "
                         f"{rows[-1].get('max_memory_gib', 0):.0f} GiB")
    if name == "bench_score":
        r = load("bench_score/bench_score.json")
        return r and ("; ".join(f"{x['key']} {x['image_per_s']:.0f}/s" if "image_per_s" in x else f"{x['key']} ERROR"
                                for x in r["rewards"]) + f"; all {r['all_rewards_images_per_s']}/s")
    if name.startswith("bench_sample"):
        r = load(f"{name}/sample_cuda.json")
        return r and "; ".join(f"{x['variant']} B={x['batch_size']} {x['images_per_s']:.1f} img/s" for x in r["results"])
    return None

for s in steps:
    try:  # a step that did not run says why ("out of time", "not in GPU_CHECK_ONLY", "no wheels in ...")
        s["note"] = s["command"].split(": ", 1)[0] if s["status"] in ("SKIP", "NOTRUN") else note(s["name"]) or ""
    except Exception as e:
        s["note"] = f"(no numbers: {type(e).__name__}: {e})"
failed = [s["name"] for s in steps if s["status"] not in ("PASS", "SKIP")]
gpu = gpu_reason == "gpu"
passed = not failed
if not gpu:
    verdict = f"NO GPU: {gpu_reason}; nothing was run (exit 0)"
else:
    verdict = "ALL PASSED" if passed else f"FAILED or not run: {', '.join(failed)}"
table = [f"gpu_check: {verdict}", f"wall {wall} s of a {budget} s budget"]
if steps:
    table.append(f"{'step':<20} {'status':<7} {'seconds':>7} {'limit':>5}  numbers")
    for s in steps:
        table.append(f"{s['name']:<20} {s['status']:<7} {s['seconds']:>7} {s['limit']:>5}  {s['note']}")
tails = []
for s in steps:
    if s["status"] in ("FAIL", "TIMEOUT"):
        log = open(os.path.join(res, "logs", s["name"] + ".log"), errors="replace").read().splitlines()
        tails += [f"--- {s['name']} ({s['status']}, rc {s['rc']}): {s['command'][:300]}", "--- last lines of its log:"]
        tails += [l[:200] for l in log[-12:]] + [""]
table, tails = "\n".join(table) + "\n", "\n".join(tails)
open(os.path.join(out, "summary.txt"), "w").write(table + ("\n" + tails if tails else ""))
json.dump({"gpu": gpu, "reason": None if gpu else gpu_reason, "passed": passed if gpu else None,
           "failed": failed, "wall_s": int(wall), "budget_s": int(budget), "steps": steps, "facts": facts},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
json.dump(facts, open(os.path.join(out, "facts.json"), "w"), indent=1)
print(tails + "\n" + table if tails else "\n" + table, end="")
PY
  # Everything but large files, in one archive: the device tool brings back 8 files at most.
  (cd "$WORK" && find results -type f -size -8M -print0 | tar -czf "$OUT/gpu_check.tar.gz" --null -T -) ||
    echo "could not pack $RES" >&2
  echo "in $OUT: $(cd "$OUT" && ls summary.txt summary.json facts.json gpu_check.tar.gz 2>/dev/null | tr '\n' ' ')"
}

facts() {  # versions, device properties and measured ceilings -> results/facts/facts.json
  step facts 60 "$PY" - "$RES/facts/facts.json" <<'PY'
import json, os, platform, sys, time
from importlib import metadata

facts = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
         "cpus": os.cpu_count(), "packages": {}}
for name in ("torch", "triton", "numpy", "transformers", "timm", "matplotlib", "pandas", "pyarrow", "scipy",
             "tensorboard", "safetensors", "pytest", "pytest-xdist", "pytest-timeout", "liger-kernel",
             "open_clip_torch", "webdataset", "ftfy", "wcwidth", "braceexpand", "flash-attn", "deepspeed",
             "nvidia-dali-cuda130", "diffusers"):
    try:
        facts["packages"][name] = metadata.version(name)
    except Exception:
        facts["packages"][name] = None
import torch

facts["torch_cuda"] = torch.version.cuda
facts["cuda_available"] = torch.cuda.is_available()
if facts["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    facts.update(device=p.name, capability=f"{p.major}{p.minor}", sm_count=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                 cudnn=torch.backends.cudnn.version())
    from miro_scale.models import attention
    facts["attention_path"] = "flash_attn" if attention.flash_attn_func else "torch SDPA (flash_attn not installed)"

    def timed(fn, reps=10):  # mean of `reps` after 3 warm-ups, in seconds, with CUDA events
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    src = torch.randn(2**29, device="cuda")  # 2 GiB of random fp32
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_s = timed(lambda: a @ b)
    facts["ceilings"] = {"copy_gbps": 2 * src.numel() * 4 / copy_s / 1e9, "matmul_bf16_tflops": 2 * 8192**3 / mm_s / 1e12,
                         "how": "mean of 10 after 3 warm-ups, CUDA events; copy counts bytes read + written (2 GiB each); "
                                "8192^3 bf16 matmul on random data"}
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts, indent=1))
PY
}

steps() {
  if [[ -n $LIST ]] || compgen -G "$WHEELS/*.whl" >/dev/null; then
    # --no-deps: the carried wheels are the only missing pieces; torch, triton, numpy... stay as installed.
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" --find-links "$WHEELS" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    record wheels SKIP - 0 60 "no wheels in $WHEELS (so no liger-kernel, open_clip, webdataset): see benchmarks/README.md"
  fi

  facts

  local plugins=()  # both are on the lent machines: kernels compile in 8 workers, one hung test is cut off
  "$PY" -c 'import xdist' 2>/dev/null && plugins+=(-n 8)
  "$PY" -c 'import pytest_timeout' 2>/dev/null && plugins+=(--timeout 150)
  step cuda_tests 200 "$PY" -m pytest -q -rfEs -p no:cacheprovider "${plugins[@]}" \
    --junitxml "$RES/cuda_tests/junit.xml" tests/test_kernels_ops.py tests/test_kernels_textrin.py \
    tests/test_kernels_compile.py tests/test_kernels_dispatch.py tests/test_kernels_sm90.py

  # deepspeed is not on the lent machines: the local engine. torch.compile is bench_train_compile's.
  step train_bf16 150 "$PY" launchers/train.py --config configs/miro_16m_random_tensors.json --engine local \
    --max-steps 6 --no-resume --set train.precision=bf16 train.compile=false train.global_batch_size=64 \
    train.micro_batch_size=64 train.log_every=1 "train.output_dir=$SCRATCH/train_bf16"

  step bench_train 150 "$PY" launchers/bench_train.py --micro-batch 64 --steps 8 --warmup 3 \
    --variants reference triton --out-dir "$RES/bench_train"

  step kernels_bench 200 "$PY" -m kernels.bench --suite textrin --baselines eager compile liger \
    --warmup 10 --rep 40 --out-dir "$RES/kernels_bench"

  step bench_score 150 "$PY" preprocessing/bench_score.py --batch-size 64 --steps 4 --warmup 1 \
    --precision auto --out "$RES/bench_score"

  step bench_sample 120 "$PY" benchmarks/bench_sample.py --config configs/miro_16m.json --batch-sizes 16 64 \
    --steps 50 --solver euler --guidance 7 --variants reference triton --warmup 1 --repeats 2 \
    --out-dir "$RES/bench_sample"

  step bench_sample_graphs 150 "$PY" benchmarks/bench_sample.py --config configs/miro_16m.json --batch-sizes 64 \
    --steps 50 --solver euler --guidance 7 --variants triton+compile --compile-mode reduce-overhead \
    --warmup 1 --repeats 2 --out-dir "$RES/bench_sample_graphs"

  step bench_train_compile 300 "$PY" launchers/bench_train.py --micro-batch 64 --steps 8 --warmup 3 \
    --variants reference+compile triton+compile --out-dir "$RES/bench_train_compile"

  step kernels_bench_large 120 "$PY" -m kernels.bench --suite large --baselines eager liger \
    --warmup 10 --rep 40 --out-dir "$RES/kernels_bench_large"
}

if [[ -n $LIST ]]; then
  steps
  rm -rf "$WORK"
  exit 0
fi
mkdir -p "$OUT" || exit 1
rm -f "$OUT"/{summary.txt,summary.json,facts.json,gpu_check.tar.gz}

# --- Is there a GPU at all? ---------------------------------------------------------------------
reason=gpu
if ! command -v nvidia-smi >/dev/null 2>&1; then
  reason="nvidia-smi not found"
elif ! timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >"$RES/logs/cuda_probe.log" 2>&1; then
  reason="torch.cuda.is_available() is False (logs/cuda_probe.log)"
fi
if [[ $reason != gpu ]]; then
  echo "gpu_check: no GPU here ($reason); nothing to run"
  facts
  summarise "$reason"
  rm -rf "$WORK"
  exit 0
fi
{ timeout 30 nvidia-smi; timeout 30 nvidia-smi -q; } >"$RES/nvidia-smi.txt" 2>&1

steps
summarise gpu
rm -rf "$SCRATCH" "$SITE"  # the training run's checkpoint is 5.4 GB
echo "unpacked results (logs, JSON, PNG): $RES"
awk -F'\t' 'NR > 1 && $2 != "PASS" && $2 != "SKIP" { bad = 1 } END { exit bad }' "$STEPS_TSV"
