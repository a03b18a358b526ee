# PyAV into the warm machine's /tmp/site (where setup.sh installs the other wheels), for the GPU tests that generate
# and decode demo videos. Its wheel (34 MB) does not fit beside .devcarry under a call's 64 MiB carry, so it comes
# in this call of its own:   run(command="bash bench/device/av.sh", carry=[".devcarry-av"])   before profile.sh.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry-av/*.whl \
  && python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import av; print('PyAV', av.__version__)"
