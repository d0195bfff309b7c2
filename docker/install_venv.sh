#!/bin/sh
# Create the virtualenv /opt/venv and install a pinned requirements file into it; runs in a build
# stage of Dockerfile and Dockerfile.train.
#
#     install_venv.sh WHEELS REQUIREMENTS           # every package REQUIREMENTS pins
#     install_venv.sh WHEELS REQUIREMENTS PACKAGE   # only PACKAGE, at the version REQUIREMENTS pins
#
# Both Dockerfiles install torch alone first, with the same instructions, so that layer (most of
# each image) is built once and shared: whichever image builds second finds it cached.
#
# WHEELS=local installs only from /tmp/wheels (the wheelhouse scripts/build_image.sh fills on the
# host; pip inside the build reaches no index). WHEELS=index uses the indexes: PyTorch's CPU index
# for the `+cpu` torch build, PyPI for the rest. Then it removes the parts of the torch wheel that
# nothing here uses (about 190 MB): C++ test binaries, headers and CMake files for building
# extensions, protoc.
set -eu
wheels=$1
requirements=$2
only=${3:-}
case "$wheels" in
local) set -- --no-index --find-links /tmp/wheels ;;
index) set -- --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple ;;
*)
    echo "install_venv.sh: WHEELS must be 'local' or 'index', not '$wheels'" >&2
    exit 2
    ;;
esac
if [ -n "$only" ]; then
    pin=$(grep -E "^$only==" "$requirements") || {
        echo "install_venv.sh: $requirements pins no '$only'" >&2
        exit 2
    }
    set -- "$@" "$pin"
else
    set -- "$@" -r "$requirements"
fi
[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/venv/bin/pip install --no-cache-dir "$@"
torch=/opt/venv/lib/python3.11/site-packages/torch
rm -rf "$torch/test" "$torch/include" "$torch/share" "$torch"/bin/*Test "$torch"/bin/test_* "$torch"/bin/protoc*
