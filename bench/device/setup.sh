# Sourced by each call script of this folder (run in the repository root on the lent machine): the carried wheels
# into /tmp/site once per machine (a warm machine keeps them), the environment every call needs, the bench's
# common arguments (its batch cache in /tmp/ttwork: a later call on the still-warm machine loads it).
R=$PWD
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .devcarry/whl/*.whl .devcarry/extra/*.whl > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 1; }
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p /tmp/o
COMMON="--shards $R/.devcarry/shards --work /tmp/ttwork --data-workers 8 --padded-split 2"
