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
