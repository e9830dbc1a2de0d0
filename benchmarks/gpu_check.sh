#!/usr/bin/env bash
# The GPU checks in one script (run it on a machine with one NVIDIA GPU, from any folder):
#   1. the CUDA-marked tests (tests/test_cuda.py, and tests/test_capture.py: a capture beside a pinning DataLoader);
#   2. the step benchmark: eager and CUDA-graphed, bf16 + channels-last, for a 32 px ResNet pair,
#      the 224 px ImageNet-sized case and a ViT student: first the exact Eq. 10 step (the Distiller's and one
#      written by hand, for the Distiller's overhead) with and without
#      each double backward jacplug substitutes for cost (BatchNorm, convolutions), then the other
#      methods; then the float32 baseline of the first pair;
#   3. single layers' double backward, PyTorch's against jacplug's, bf16 and float32;
#   4. `jacplug train --teacher resnet50 --student resnet18` on the default data, eager vs graphed, and one
#      small `jacplug experiment` cell (its students' steps are CUDA-graphed); both also with DataLoader
#      worker processes (`--loader-workers 2`, `--workers 2 --cuda-graphs on`), whose pin-memory thread
#      runs while the step is captured (the capture must be thread-local; train_workers2.txt and
#      experiment.txt end with the summary, not a traceback);
#   5. the top CUDA kernels of the exact Eq. 10 step at 32 and 224 px (benchmarks/gpu_profile.py).
# Results go to $OUT (default runs/gpu-check): card.txt, tests.txt, bench_*.json, layers.txt,
# train_*.json, train_workers2.txt, experiment.txt, kernels.txt; the tables are printed.
# Budget: under 9 minutes on one H100 or H200.
set -uo pipefail
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # relative to where it was called; the checks below run from the repository root
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
JACPLUG="$PY -m jacplug"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/card.txt"

timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_capture.py 2>&1 | tail -n 15 | tee "$OUT/tests.txt"

BENCH="$JACPLUG bench --device cuda --batch-size 64 --repeats 7 --cuda-graphs"
timeout 200 $BENCH --amp --channels-last --methods eq10-top1 eq10-top1-by-hand eq10-top1-native-bn eq10-top1-native-conv eq10-top1-native \
    --json "$OUT/bench_amp.json" 2>&1 | grep -v "round"
timeout 150 $BENCH --amp --channels-last --methods eq10-top1-cached projected-k1 direction-fd direction-forward \
    --json "$OUT/bench_amp_others.json" 2>&1 | grep -v "round"
timeout 45 $BENCH --methods eq10-top1 eq10-top1-native --configs "resnet34->resnet18:10@32" \
    --json "$OUT/bench_fp32.json" 2>&1 | grep -v "round"

for precision in --bf16 ""; do
    timeout 40 $PY benchmarks/double_backward_layers.py --device cuda $precision 2>&1 | tee -a "$OUT/layers.txt"
done

RUN=$(mktemp -d)
timeout 90 $JACPLUG train --teacher resnet50 --student resnet18 --cuda-graphs off --out "$RUN/eager" --json \
    > "$OUT/train_eager.json" 2> "$RUN/eager.err" || tail -n 3 "$RUN/eager.err"
for mode in on off; do
    timeout 45 $JACPLUG train --teacher resnet50 --student resnet18 --cuda-graphs $mode --out "$RUN/student-$mode" \
        --teacher-checkpoint "$RUN/eager/teacher.safetensors" --json > "$OUT/train_student_$mode.json" \
        2> "$RUN/$mode.err" || tail -n 3 "$RUN/$mode.err"
done
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("train_eager", "train_student_off", "train_student_on"):
    try:
        s = json.loads((out / f"{name}.json").read_text())
    except Exception as exc:
        print(name, "missing:", exc); continue
    print(f"{name}: total {s['time_s']:.1f} s, student {s.get('student_images_per_s') or 0:.0f} img/s "
          f"({s.get('student_step_mode')}), student acc {s['student_last_test_acc']}")
PYEOF
timeout 60 $JACPLUG train --teacher resnet18 --student resnet18 --teacher-steps 20 --steps 40 --workers 2 \
    --cuda-graphs on --out "$RUN/workers2" > "$OUT/train_workers2.txt" 2>&1 || tail -n 3 "$OUT/train_workers2.txt"
timeout 60 $JACPLUG experiment --device cuda --samples-per-class 5 --methods kd kd+jacobian --seeds 1 --steps 50 \
    --teacher-epochs 1 --select-at 5 --jacobian-weights 1 --workers 1 --loader-workers 2 --out "$RUN/experiment" \
    > "$OUT/experiment.txt" 2>&1 || tail -n 3 "$OUT/experiment.txt"
grep -l "stream is capturing" "$OUT/train_workers2.txt" "$OUT/experiment.txt" && echo "FAIL: a capture met another thread"
timeout 60 $PY benchmarks/gpu_profile.py "$RUN/profile" --kernels-only > "$OUT/kernels.txt" 2>&1 || tail -n 3 "$OUT/kernels.txt"

# ---------------------------------------------------------------------------------------------------
# Experiment cells over every visible GPU (--devices all: one worker process per device), then the same
# experiment killed mid-grid and resumed with --resume auto: prints the devices the cells ran on, the
# cells each phase ran, and whether results.json matches (times aside). On a one-GPU machine the pool
# has one process; the device plan for several is unit-tested on CPU (tests/test_experiment_resume.py).
# Writes experiment_devices.txt and experiment_resume.txt. Budget: about 2 minutes.
GRID="--device cuda --samples-per-class 5 --methods kd kd+jacobian --seeds 2 --steps 50 --teacher-epochs 1 \
    --select-at 5 --jacobian-weights 1 3 --devices all"
timeout 120 $JACPLUG experiment $GRID --out "$RUN/devices" > "$OUT/experiment_devices.txt" 2>&1 \
    || tail -n 3 "$OUT/experiment_devices.txt"
$PY -c "import torch; print('visible GPUs:', torch.cuda.device_count())" | tee -a "$OUT/experiment_devices.txt"
$JACPLUG experiment $GRID --out "$RUN/resumed" > "$RUN/killed.txt" 2>&1 &
KILLED=$!
for _ in $(seq 600); do ls "$RUN/resumed/cells"/main-*.json > /dev/null 2>&1 && break; sleep 0.1; done
kill -9 "$KILLED" 2> /dev/null; wait "$KILLED" 2> /dev/null
echo "killed after $(ls "$RUN/resumed/cells" 2> /dev/null | wc -l) records" | tee "$OUT/experiment_resume.txt"
timeout 120 $JACPLUG experiment $GRID --out "$RUN/resumed" --resume auto >> "$OUT/experiment_resume.txt" 2>&1 \
    || tail -n 3 "$OUT/experiment_resume.txt"
$PY - "$RUN" <<'PYEOF' | tee -a "$OUT/experiment_resume.txt"
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
def computed(v):
    if isinstance(v, dict):
        return {k: computed(x) for k, x in v.items() if not k.endswith("time_s") and k not in ("out", "hardware")}
    return [computed(x) for x in v] if isinstance(v, list) else v
try:
    a, b = (json.loads((run / d / "results.json").read_text()) for d in ("devices", "resumed"))
    print("resumed experiment equals the uninterrupted one (times aside):", computed(a) == computed(b))
except Exception as exc:
    print("experiment resume check failed:", exc)
PYEOF
