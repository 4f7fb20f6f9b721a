#!/usr/bin/env bash
# Muon against AdamW in our stack, and against nanoGPT's GPT-2, on the reference corpus, the same tokens and GPU.
#
#     bash compare.sh                  # one H100: about 30 minutes; again after a stop: finished runs are skipped
#     STEPS=440 bash compare.sh        # at the reference run's length (about 55 minutes)
#     PEERS=nanogpt bash compare.sh    # ours and nanoGPT's only (about 8 minutes): the wall-time row
#
# 1. the corpus of reference.sh (every .py file of this Python; reused when already prepared)
# 2. ours with Muon: config/reference_137m.py for the tokens of STEPS steps of 512K, at the config's batch (128K: 4x
#    the steps) -> ${PREFIX}_muon
# 3. AdamW's learning rate for our model, swept: SWEEP_LRS for the tokens of SWEEP_STEPS steps of 512K each (warmup
#    5.2M tokens, full decay), widened while the best rate is at an edge (three times at most)
# 4. ours with AdamW as long as ours with Muon at the sweep's two best rates -> ${PREFIX}_adamw_<rate>: a short sweep
#    can rank two close rates the other way round from a whole run (measured: 2.5e-4 won at 60 steps, 5e-4 at 160)
# 5. nanoGPT's GPT-2 (peer.py) as nanoGPT trains it: AdamW 6e-4, weight decay 0.1, decay to a tenth, 512K tokens a
#    step, a warmup of NANOGPT_WARMUP steps -> ${PREFIX}_nanogpt
# 6. eval.py --compare: loss against tokens and wall time on one figure, and the table of tokens and wall time each
#    run took to reach the others' final validation loss -> ${PREFIX}_muon/report.md, curves.png
# Every run has the same data order, tokens, schedule shape and validation windows; only model and optimizer differ,
# and nanoGPT's batch and warmup (ours: the config's; Muon and AdamW at the same batch, 2026-11-23: 512K for all). Each
# of the three compared runs compiles into its own empty Inductor cache, so none starts with another's compiled code
# (wall time counts from the start of training, compilation included). Arguments go to every train.py.
set -euo pipefail
cd "$(dirname "$0")"
PREFIX=${PREFIX:-out/cmp}                  # run folders: ${PREFIX}_muon, _nanogpt, _adamw_<rate>, _sweep_<rate>
STEPS=${STEPS:-160}                        # 160 x 524,288 = 84M tokens: 0.72 passes over the corpus
SWEEP_STEPS=${SWEEP_STEPS:-60}             # 31M tokens per sweep run
SWEEP_LRS=${SWEEP_LRS:-"0.001 0.002 0.004"}
# nanoGPT's warmup, in its steps of 512K: its own, not ours (none since 2026-12-04), which it does worse with (one H200,
# 160 steps: final val loss 4.0928 with 30 steps of warmup, 4.5283 with none; docs/reference.md)
NANOGPT_WARMUP=${NANOGPT_WARMUP:-30}
CONFIG=${CONFIG:-config/reference_137m.py}
PEERS=${PEERS:-"adamw nanogpt"}            # which peers run beside ours: adamw (its sweep, then its two best), nanogpt
# nanoGPT's GPT-2 has none of the recipe's model keys, and nanoGPT's cosine schedule without cautious decay: the
# config's recipe (issue 37) turned off for it; the data order stays the config's, the same for every run
PLAIN="--qk_norm=false --attn_scale=0 --value_residual=false --x0_shortcut=false --logit_softcap=0 --embed_norm=false
    --zero_init=false --value_embeds=false --lr_schedule=cosine --cautious_wd=false"
DATA=${DATA:-data/python32k}

train() { # train RUN CACHE ARGS...: train.py on CONFIG, resumed when RUN has a checkpoint (a finished run does nothing)
    local run=$1 cache=$2 init=scratch
    shift 2
    if compgen -G "$run/ckpt_[0-9]*.safetensors" >/dev/null; then init=resume; fi
    echo "== $run: $*"
    TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/anarchobot_inductor_$cache" python train.py "$CONFIG" --data_dir="$DATA" --out_dir="$run" --init_from=$init --eval_interval=10 "$@"
}

adamw_runs() { # AdamW's sweep, widened while its best rate is at an edge, then its two best rates at STEPS
    # (sets sweep, best, second)
    sweep=() lrs=$SWEEP_LRS
    for _ in 1 2 3 4; do # a best rate at the edge of the sweep is not bracketed: extend it (three times at most)
        for lr in $lrs; do
            train "${PREFIX}_sweep_$lr" sweep --max_iters=$((SWEEP_STEPS * scale)) --warmup_iters=$((10 * scale)) \
                --optimizer=adamw --learning_rate="$lr" "$@"
            sweep+=("${PREFIX}_sweep_$lr")
        done
        read -r best second lrs < <(python - "${sweep[@]}" <<'PY'
import json, sys
final = {}  # learning rate -> final validation loss of its sweep run
for run in sys.argv[1:]:
    records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    final[run.rsplit("_", 1)[1]] = [r["val_loss"] for r in records if "val_loss" in r][-1]
    print(f"sweep {run}: final val loss {final[run.rsplit('_', 1)[1]]:.4f}", file=sys.stderr)
best, second = sorted(final, key=final.get)[:2]
rates = sorted(final, key=float)
print(best, second, f"{2 * float(best):g}" if best == rates[-1] else f"{float(best) / 2:g}" if best == rates[0] else "")
PY
        )
        [ -n "$second" ] || exit 1
        [ -z "$lrs" ] && break
    done
    echo "== AdamW's best learning rates at $SWEEP_STEPS steps: $best, then $second"
    for lr in "$best" "$second"; do
        train "${PREFIX}_adamw_$lr" "adamw_$lr" --max_iters=$((STEPS * scale)) --optimizer=adamw --learning_rate="$lr" \
            "$@"
    done
}

main() { # read whole before it runs: editing this file during a run changes nothing
    local peer adamw=false nanogpt=false
    for peer in $PEERS; do
        case "$peer" in
            adamw) adamw=true ;;
            nanogpt) nanogpt=true ;;
            *) echo "error: PEERS=\"$PEERS\": unknown peer '$peer'; give adamw, nanogpt or both" >&2 && exit 1 ;;
        esac
    done
    if [ "$adamw$nanogpt" = falsefalse ]; then
        echo "error: PEERS is empty; give adamw, nanogpt or both" >&2
        exit 1
    fi
    if $adamw && [ "$(wc -w <<<"$SWEEP_LRS")" -lt 2 ]; then
        echo "error: SWEEP_LRS=\"$SWEEP_LRS\" needs two rates or more (AdamW runs at the best two)" >&2
        exit 1
    fi
    # the config's batch against nanoGPT's 512K tokens a step: ours run `scale` steps for each of nanoGPT's
    local scale accum
    read -r scale accum < <(python - "$CONFIG" <<'PY'
import runpy, sys
try:
    c = runpy.run_path(sys.argv[1])
except OSError as e:
    sys.exit(f"error: CONFIG={sys.argv[1]}: {e.strerror}; give a train.py config file")
keys = "batch_size", "block_size", "gradient_accumulation_steps"
missing = [k for k in keys if type(c.get(k)) is not int]  # batch_size="auto" too: the batch must be known here
if missing:
    sys.exit(f"error: CONFIG={sys.argv[1]} does not set {', '.join(missing)} (whole numbers): compare.sh scales them")
step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
if 524288 % step:
    sys.exit(f"error: {sys.argv[1]}: {step:,} tokens a step must divide into nanoGPT's 524,288 tokens a step; set "
             "gradient_accumulation_steps to fit")
print(524288 // step, c["gradient_accumulation_steps"])
PY
    ) || exit 1
    if [ ! -f "$DATA/manifest.json" ]; then
        python prepare.py --corpus=python --vocab_size=32000 --tokenizer_docs=8000 --data_dir="$DATA"
    fi
    train "${PREFIX}_muon" muon --max_iters=$((STEPS * scale)) "$@"
    local compared=()  # the peers' runs, on our run's curves and table
    if $adamw; then
        adamw_runs "$@"
        compared+=("${PREFIX}_adamw_$best" "${PREFIX}_adamw_$second")
    fi
    if $nanogpt; then
        train "${PREFIX}_nanogpt" nanogpt --max_iters="$STEPS" --gradient_accumulation_steps=$((accum * scale)) \
            --warmup_iters="$NANOGPT_WARMUP" --arch=nanogpt --optimizer=adamw --learning_rate=6e-4 \
            --weight_decay=0.1 --min_lr_frac=0.1 $PLAIN "$@"
        compared+=("${PREFIX}_nanogpt")
    fi
    python eval.py --out_dir="${PREFIX}_muon" --compare="$(IFS=,; echo "${compared[*]}")" --tasks=curves
    if $adamw; then
        python eval.py --out_dir="${PREFIX}_adamw_$best" --compare="${PREFIX}_adamw_$second,$(IFS=,; echo "${sweep[*]}")" \
            --tasks=curves
    fi
}
main "$@"
exit
