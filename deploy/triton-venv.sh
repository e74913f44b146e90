#!/usr/bin/env bash
# A virtual environment that runs a `paligemma-edge triton-repo` repository on Triton Inference Server
# without NVIDIA's container: the tritonserver and Python backend that the nvidia-pytriton wheel ships,
# tritonclient, and paligemma-edge's runtime.
#
#   deploy/triton-venv.sh VENV [SOURCE]      SOURCE: a paligemma-edge wheel or checkout (default: this
#                                            checkout; pip then leaves a build/ folder in it)
#
# Run again on the same VENV, it keeps what is installed and reinstalls paligemma-edge from SOURCE.
#
# Then:  VENV/bin/triton-serve REPO [tritonserver options...]
#
# Why it is built this way:
# - The wheel's Python-backend stub links the system libpython3.11 (Debian 12's 3.11.2), so the venv is
#   made from that interpreter (PYTHON, default /usr/bin/python3.11); a venv of another 3.11 build
#   (pyenv's) was seen failing inside multiprocessing in the stub.
# - tritonserver looks for the stub beside libtriton_python.so: VENV/triton-backends/python/ links both,
#   with the stub of the venv's Python version; triton-serve passes it as --backend-directory.
# - The stub is an embedded Python that ignores PYTHONPATH; it takes the first `python3` on PATH as its
#   executable and so finds the venv (its pyvenv.cfg and site-packages) when VENV/bin leads PATH, which
#   triton-serve sets, as an activated venv does (Triton's EXECUTION_ENV_PATH wants a conda-pack archive).
# - The stub also puts its working directory first on sys.path: start triton-serve outside a
#   paligemma-edge checkout, or that checkout's source folders hide the installed package.
# - nvidia-pytriton pins numpy<2, which onnxruntime, pillow and tokenizers accept.
set -euo pipefail

venv=${1:?usage: deploy/triton-venv.sh VENV [SOURCE]}
source_dir=${2:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-/usr/bin/python3.11}

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --no-input -q)
"${pip[@]}" "nvidia-pytriton==0.7.0" "tritonclient[http,grpc]" "numpy<2"
# paligemma-edge's base runtime: all the Triton model imports (it does not use serve's fastapi app).
"${pip[@]}" "numpy<2" "pillow>=10.0" "tokenizers>=0.19" "onnxruntime>=1.23"
"${pip[@]}" --no-deps --force-reinstall "$source_dir"  # the same version number may be newer code

site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
version=$("$venv/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
server="$site/pytriton/tritonserver"
backend="$venv/triton-backends/python"
mkdir -p "$backend"
# Links, not copies: the stub finds its CUDA runtime through an $ORIGIN-relative rpath into the wheel.
ln -sf "$server/backends/python/libtriton_python.so" "$server/backends/python/triton_python_backend_utils.py" \
    "$server/python_backend_stubs/$version/triton_python_backend_stub" "$backend/"

cat > "$venv/bin/triton-serve" <<EOF
#!/usr/bin/env bash
# tritonserver on a model repository, with this venv's Python backend and packages.
set -euo pipefail
repo=\${1:?usage: triton-serve REPO [tritonserver options...]}
shift
export PATH="$venv/bin:\$PATH"
exec "$server/bin/tritonserver" --model-repository "\$repo" --backend-directory "$venv/triton-backends" "\$@"
EOF
chmod +x "$venv/bin/triton-serve"
echo "triton venv ready: $venv/bin/triton-serve REPO"
