#!/usr/bin/env bash
# The whole suite. Modules that start a Ray cluster run in a pytest process each: Ray's
# re-initialisation inside one pytest process (under its output capture) has been seen to end
# the process silently; separate processes rule that out. Exit non-zero if any part fails.
set -u
PY=${PY:-.venv/bin/python}
ARGS=("$@")
ray_modules=$(grep -l -E "ClusterThread|LocalCluster|ray\.cluster_utils|tensor_parallel_size|tandem serve|\"serve\"" tests/cluster/test_*.py tests/http/test_*.py tests/e2e/test_*.py tests/distributed/test_tp_*.py 2>/dev/null | sort -u)
ignore=()
for m in $ray_modules; do ignore+=(--ignore "$m"); done
status=0
"$PY" -m pytest -q "${ignore[@]}" "${ARGS[@]}" tests || status=1
for m in $ray_modules; do
  echo "=== $m"
  "$PY" -m pytest -q "${ARGS[@]}" "$m" || status=1
done
exit $status
