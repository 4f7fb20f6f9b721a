#!/usr/bin/env bash
# The reference run: the whole pipeline at the reference size on one CUDA GPU, ending in a report card.
#
#     bash reference.sh                                    # one H200: 1,116 s in all (2026-12-04)
#     bash reference.sh                                    # after a stop: finished stages are skipped, training resumes
#     RUN=out/ref_adamw STAGES=pretrain bash reference.sh --optimizer=adamw --learning_rate=0.002   # a variant
#     RUN=out/ref_unfiltered DATA=data/python32k_unfiltered PREPARE="--quality=off --near_dup=0" STAGES=pretrain \
#         bash reference.sh                               # the same budget without the filters (docs/data.md)
#     DPO_PAIRS=sampled bash reference.sh                 # then DPO on the SFT run's own answers: out/ref_dpo_sampled
#     SIZE=tiny bash reference.sh                         # the same stages with the Quick start's model, on any machine
#
# Stages: every .py file of this Python (stdlib and site-packages, deduplicated, filtered) -> a 32K tokenizer and
# shards -> pretraining (config/reference_137m.py; 676 s on an H200 before issue 37's recipe) -> docstring questions
# and coding requests (write this function) from the same files -> SFT -> preference pairs -> DPO -> eval.py on each
# stage, HumanEval included (asked in the chat format after SFT) -> $RUN_card/card.md, the report card.
# The CPU stages run beside the GPU ones (SFT and DPO data while pretraining; each eval.py beside the next training
# stage), their output in $RUN_card/<stage>.log. Arguments go to train.py. Each stage's wall time is appended to
# $RUN_card/stages.tsv, the whole run's as `wall`; nvidia-smi's utilisation, a sample a second, to gpu_util.csv.
set -euo pipefail
cd "$(dirname "$0")"
# SIZE: reference (the 137.8M model, one CUDA GPU) or tiny (the Quick start's model and the standard library: every
# stage and its resumption checked on a CPU in minutes; tests/test_reference_sh.py runs it with fewer steps)
case "${SIZE:=reference}" in
    reference)
        CORPUS="--corpus=python --vocab_size=32000 --tokenizer_docs=8000" CHAT=--corpus=python
        CONFIGS=(config/reference_137m.py config/reference_sft.py config/reference_dpo.py) EVAL="" GEN=--gen_batch=512
        RUN=${RUN:-out/ref} DATA=${DATA:-data/python32k} CHAT_DATA=python32k SAMPLE_BATCH=512
        # train.py's graphs compiled into torch's on-disk caches while the corpus is prepared (below)
        WARM=(python bench.py config/reference_137m.py --compile_modes=regions --seq_lens=2048 --train_steps=1
            --optimizer_steps=1 --decode_batches=) ;;
    tiny)
        CORPUS=--corpus=stdlib CHAT=--corpus=stdlib
        CONFIGS=(config/tiny_cpu.py config/sft_tiny_cpu.py config/dpo_tiny_cpu.py) EVAL=config/eval_tiny_cpu.py GEN=""
        RUN=${RUN:-out/tiny_ref} DATA=${DATA:-data/stdlib} CHAT_DATA=stdlib_both SAMPLE_BATCH=128 WARM=() ;;
    *) echo "error: SIZE=$SIZE: expected reference or tiny" >&2 && exit 2 ;;
esac
# RUN: the pretraining run folder; SFT and DPO go to ${RUN}_sft and ${RUN}_dpo (see DPO_PAIRS). DATA: the pretraining
# data; the SFT and DPO data go to SFT_DATA and DPO_DATA (data/sft_python32k, data/dpo_python32k at the reference size)
STAGES=${STAGES:-all}  # all, or pretrain (prepare, pretrain and evaluate only)
PREPARE=${PREPARE:-}  # prepare.py keys added to the corpus's command (filters)
SFT_ARGS=${SFT_ARGS:-} DPO_ARGS=${DPO_ARGS:-} EVAL_ARGS=${EVAL_ARGS:-}  # keys added to sft.py's, dpo.py's, eval.py's
PAIRS_ARGS=${PAIRS_ARGS:-}  # prepare.py keys added to DPO_PAIRS=sampled's pairs (e.g. --sample_n=8)
SFT_DATA=${SFT_DATA:-data/sft_$CHAT_DATA}
# DPO's pairs: written (the other function's text rejected), prepared beside pretraining; or sampled: the coding pairs
# remade from the SFT run's own answers, judged by their doctests in the sandbox (prepare.py --sample_from), after SFT.
# Sampled pairs go to their own data, DPO run and card folders, so that after a written run only their stages run.
DPO_PAIRS=${DPO_PAIRS:-written}
case "$DPO_PAIRS" in
    written) DPO_DATA=${DPO_DATA:-data/dpo_$CHAT_DATA} DPO_RUN=${RUN}_dpo CARD=${RUN}_card ;;
    sampled) DPO_DATA=${DPO_DATA:-data/dpo_${CHAT_DATA}_sampled} DPO_RUN=${RUN}_dpo_sampled CARD=${RUN}_sampled_card ;;
    *) echo "error: DPO_PAIRS=$DPO_PAIRS: expected written or sampled" >&2 && exit 2 ;;
esac
mkdir -p "$CARD"

stage() { # stage NAME COMMAND...: run the command and record its wall time
    local name=$1 t0
    shift
    echo "== $name: $*"
    t0=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$name" $(($(date +%s) - t0)) >>"$CARD/stages.tsv"
}
log_of() { echo "$CARD/${1// /_}.log"; }
beside() { # beside NAME COMMAND...: a command in the background, niced so that the GPU stage's own CPU work comes
    # first; its output to the log of NAME
    echo "== $1: in the background beside the next stages (log: $(log_of "$1"))"
    (renice -n 10 "$BASHPID" >/dev/null && "${@:2}") >"$(log_of "$1")" 2>&1 &
    eval "pid_${1// /_}=$!"
}
join() { # join NAME: wait for a stage started by beside; if it failed, the end of its log and a non-zero exit
    local pid
    eval "pid=\${pid_${1// /_}:-}"
    [ -n "$pid" ] || return 0
    if ! wait "$pid"; then
        tail -n 20 "$(log_of "$1")"
        echo "error: $1 failed (its log: $(log_of "$1")); run bash reference.sh again to go on from there" >&2
        exit 1
    fi
    echo "== $1: done"
}
has_checkpoint() { compgen -G "$1/ckpt_[0-9]*.safetensors" >/dev/null; }
evaluate() { # evaluate RUN: eval.py unless its report is newer than the run's best checkpoint
    if [ "$1/report.json" -nt "$1/ckpt_best.safetensors" ]; then echo "== eval $1: report is up to date"; else
        stage "eval $(basename "$1")" python eval.py $EVAL --out_dir="$1" $GEN $EVAL_ARGS
    fi
}
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
stop_background() { # at exit (a stop, an error): end every background stage, each job with all it started (eval.py's
    # programs, prepare.py's workers), and wait until they are gone, so that a run started again meets none of them
    local pids
    pids=$(for job in $(jobs -p); do echo "$job"; descendants "$job"; done)
    [ -n "$pids" ] || return 0
    kill $pids 2>/dev/null || true
    for _ in $(seq 100); do  # 10 s at most; a zombie (ended, not yet collected) counts as gone
        ps -o stat= -p "${pids//$'\n'/,}" 2>/dev/null | grep -q '^[^Z]' || return 0
        sleep 0.1
    done
}
warm_compile() { # bench.py runs train.py's compiled step on random tokens: the graphs it compiles land in torch's
    # caches (Inductor's, AOTAutograd's, Triton's), where train.py finds them; a failure here only costs that
    "${WARM[@]}" --out="$CARD/warm_compile.json" || echo "warm compile failed: train.py compiles for itself"
}
watch_gpu() { # one utilisation sample a second, for the card's GPU-busy line (where nvidia-smi exists)
    command -v nvidia-smi >/dev/null || return 0
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 >>"$CARD/gpu_util.csv" 2>/dev/null &
}

# The GPU is kept busy: SFT and DPO data need only the tokenizer, so they are prepared on the CPU while pretraining
# runs; each eval.py generates on the GPU beside the next training stage and scores its programs on the CPU.
main() { # read whole before it runs: editing this file during a run changes nothing
    trap stop_background EXIT
    t_start=$(date +%s)
    watch_gpu
    # on a GPU, pretraining's compile (~60 s of an idle GPU on an H200) moves beside the corpus's preparation
    # (a fresh run only: a finished pretraining would wait for it for nothing)
    if [ ${#WARM[@]} -gt 0 ] && command -v nvidia-smi >/dev/null && ! has_checkpoint "$RUN"; then
        beside "warm compile" stage "warm compile" warm_compile
    fi
    stage "prepare corpus" python prepare.py $CORPUS --data_dir=$DATA $PREPARE
    join "warm compile"
    runs=$RUN
    if [ "$STAGES" = all ]; then
        # SFT and DPO data from the corpus's tokenizer, the file train.py copies into RUN
        chat=(python prepare.py $CHAT --task=both --block_size=1024 --tokenizer=$DATA/tokenizer.model)
        beside "prepare sft" stage "prepare sft" "${chat[@]}" --mode=sft --data_dir=$SFT_DATA
        if [ "$DPO_PAIRS" = written ]; then
            beside "prepare dpo" stage "prepare dpo" "${chat[@]}" --mode=dpo --data_dir=$DPO_DATA
        fi
    fi
    if has_checkpoint "$RUN"; then init=--init_from=resume; else init=--init_from=scratch; fi
    stage "pretrain" python train.py "${CONFIGS[0]}" --out_dir="$RUN" --data_dir=$DATA $init "$@"
    if [ "$STAGES" = all ]; then
        beside "eval ref" evaluate "$RUN"
        join "prepare sft"
        if has_checkpoint "${RUN}_sft"; then init=--init_from=resume; else init=--init_from=$RUN; fi
        stage "sft" python sft.py "${CONFIGS[1]}" --out_dir="${RUN}_sft" --data_dir=$SFT_DATA $init $SFT_ARGS
        beside "eval ref_sft" evaluate "${RUN}_sft"
        if [ "$DPO_PAIRS" = sampled ]; then  # the SFT run answers every coding request (GPU) beside its evaluation
            stage "prepare dpo" "${chat[@]}" --mode=dpo --data_dir=$DPO_DATA --sample_from="${RUN}_sft" \
                --sample_batch=$SAMPLE_BATCH $PAIRS_ARGS
        fi
        join "prepare dpo"
        if has_checkpoint "$DPO_RUN"; then init=--init_from=resume; else init=--init_from=${RUN}_sft; fi
        stage "dpo" python dpo.py "${CONFIGS[2]}" --out_dir="$DPO_RUN" --data_dir=$DPO_DATA $init $DPO_ARGS
        evaluate "$DPO_RUN"
        join "eval ref"
        join "eval ref_sft"
        runs=$RUN,${RUN}_sft,$DPO_RUN
    else
        evaluate "$RUN"
    fi
    printf 'wall\t%s\n' $(($(date +%s) - t_start)) >>"$CARD/stages.tsv"
    python eval.py --card="$runs" --card_dir="$CARD"
}
main "$@"
exit
