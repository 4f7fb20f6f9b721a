# bash .whl/poll.sh SECONDS [PATTERN]: wait for /tmp/job/done up to SECONDS (or until PATTERN shows in ref.log),
# copying the job's files to $OUT
end=$(( $(date +%s) + $1 ))
while [ ! -f /tmp/job/done ] && [ $(date +%s) -lt $end ]; do
    sleep 10
    if [ -n "$2" ] && grep -q "$2" /tmp/job/ref.log 2>/dev/null; then break; fi
    if ! pgrep -f refjob >/dev/null; then echo "refjob.sh is not running"; break; fi
done
tar czf $OUT/job.tgz -C /tmp/job . 2>/dev/null
cat /tmp/job/times 2>/dev/null; cat /work/ab/out/ref_card/stages.tsv /tmp/ab/out/ref_card/stages.tsv /tmp/ab/out/ref_sampled_card/stages.tsv 2>/dev/null
grep -h "^step\|^==\|error" /tmp/job/ref.log | tail -8; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
