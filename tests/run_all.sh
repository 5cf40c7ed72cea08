#!/usr/bin/env bash
# The whole test suite: single-process tests, then the MPI tests at 2 and 4 ranks.
# Every MPI run is bounded twice: per test (pytest-timeout) and per run (timeout(1)).
set -euo pipefail
cd "$(dirname "$0")/.."
export BLUEFOG_FN_TIMEOUT="${BLUEFOG_FN_TIMEOUT:-60}"
export PYTHONHASHSEED=0

python -m pytest tests -q -p no:cacheprovider "$@"

# The MPI suite twice per size: the same-host shared-memory transport forced on for every tree
# size (BLUEFOG_FN_SHM=1) and switched off (0, MPI only); tests/mpi/test_shared_memory.py runs
# under the default (auto: on for trees of at least 1 MiB) in both, plus once more below.
for np in 2 4; do
    for shm in 1 0; do
        echo "=== MPI tests, ${np} ranks, BLUEFOG_FN_SHM=${shm} ==="
        BLUEFOG_FN_SHM="$shm" timeout 1500 bfrun -np "$np" python -m pytest tests/mpi -q -p no:cacheprovider \
            -o addopts="--strict-markers" --timeout 240 -x "$@"
    done
done

echo "=== the same-host transport at its default setting, 4 ranks ==="
timeout 900 bfrun -np 4 python -m pytest tests/mpi/test_shared_memory.py -q -p no:cacheprovider \
    -o addopts="--strict-markers" --timeout 600 -x "$@"

echo "=== the tutorial's algorithm (examples/extra.py) under bfrun, 4 ranks ==="
timeout 600 bfrun -np 4 python examples/extra.py --check 1e-8

echo "=== hierarchical ops, 4 ranks as 2 machines of 2 ==="
BLUEFOG_FN_SHM=1 BLUEFOG_FN_RANKS_PER_MACHINE=2 timeout 600 bfrun -np 4 python -m pytest tests/mpi/test_hierarchical.py \
    tests/mpi/test_module_optimizer.py tests/mpi/test_shared_memory.py -k "hierarchical or shared_memory or steps" \
    -q -p no:cacheprovider -o addopts="--strict-markers" --timeout 240 -x "$@"
