#!/usr/bin/env bash
# The checks that need a GPU: the `gpu` tests and benchmarks/gpu_step.py, for one lent GPU machine.
#
#   bash scripts/gpu_check.sh          # GPU tests, then the benchmark (about 6 minutes on an H100)
#   bash scripts/gpu_check.sh suite    # the whole CPU suite with the GPU hidden (megatron-core 0.17+
#                                      # on Python 3.12: the machine has Python 3.12, torch, triton)
#
# The lent machines (Python 3.12, torch, transformers, triton, some peft) have no megatron-core and
# no network: carry its cp312 wheel, and peft 0.21.2 (the tests' oracle version), in an ignored
# .whl/ folder of the checkout that the device tool sends (the session's own checkout). Once, here:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1 peft==0.21.2
#
# (megatron-core==0.19.x for the newest.) Then one device call, with time left to rerun:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Logs and the benchmark's JSON go to $OUT (the device tool's folder) or ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check.sh: installing the carried wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Not installed here: parallel/ becomes megatron_lora.parallel through a (git-ignored) link, as an
# install's package-dir mapping would make it.
[ -e megatron_lora/parallel ] || ln -s ../parallel megatron_lora/parallel
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -c "import megatron.core, peft, torch, transformers; print('megatron-core', megatron.core.__version__, \
'peft', peft.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
    || { echo "gpu_check.sh: megatron-core or peft missing: carry their wheels in .whl/ (see the header)" >&2; exit 1; }

if [ "${1:-}" = "suite" ]; then
    CUDA_VISIBLE_DEVICES= timeout 560 python3 -m pytest -q tests 2>&1 | tee "$OUT/cpu_suite.log"
    exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -m gpu -rA tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 270 python3 benchmarks/gpu_step.py --json-out "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
