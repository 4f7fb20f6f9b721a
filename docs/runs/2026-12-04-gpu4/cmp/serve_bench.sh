# serve.py on a run: batch 1 (16 requests), then 32 clients (64 requests), 256 tokens each; $2: --compile
cd /tmp/w || exit 1
python3 serve.py --out_dir=$1 --rows=32 --port=8000 --compile=$2 > serve_$2.log 2>&1 &
pid=$!
for i in $(seq 180); do python3 -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:8000/v1/models\", timeout=2)" 2>/dev/null && break; sleep 1; done
date -u
python3 tests/test_serve.py http://127.0.0.1:8000 --clients=1 --requests=${3:-16} --max_tokens=256 2>&1
python3 tests/test_serve.py http://127.0.0.1:8000 --clients=32 --requests=64 --max_tokens=256 2>&1
date -u
kill $pid; wait $pid; tail -5 serve_$2.log
