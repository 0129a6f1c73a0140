# Sourced at the start of every GPU-host run: the packages that host lacks, from what the
# command carried (.whl: wheels, .carry: the offline Ray bundle), onto PYTHONPATH.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TANDEM_CACHE_DIR=/tmp/tandem-cache
mkdir -p /tmp/site
if [ -d .whl ] && [ ! -f /tmp/site/.wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.wheels
fi
if [ -f .carry/ray-site.tar.xz ] && [ ! -d /tmp/site/ray ]; then
  tar -xJf .carry/ray-site.tar.xz -C /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

# `step NAME LIMIT_S CMD...`: one bounded step of a GPU-host call, its output appended to $LOG
# (set by the calling script) and its last $STEP_TAIL lines (default 40) shown.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $* ($(date -u +%T), limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -"${STEP_TAIL:-40}"
  echo "=== $name: rc=${PIPESTATUS[0]} ($(date -u +%T))" | tee -a "$LOG"
}
