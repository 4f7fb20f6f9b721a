# bash .whl/poll.sh SECONDS: wait for /tmp/job/done up to SECONDS, copying the job's files to $OUT
end=$(( $(date +%s) + $1 ))
while [ ! -f /tmp/job/done ] && [ $(date +%s) -lt $end ]; do sleep 10; cp /tmp/job/*.log /tmp/job/times /tmp/job/*.json* $OUT/ 2>/dev/null; done
cp /tmp/job/*.log /tmp/job/times /tmp/job/*.json* /tmp/job/*.md $OUT/ 2>/dev/null
cat /tmp/job/times; grep -h "step\|val" /tmp/job/train.log | tail -4; tail -5 /tmp/job/eval.log 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
