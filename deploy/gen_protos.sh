#!/bin/sh
# Generates the protobuf/gRPC code (with .pyi stubs) into OUT_DIR, as the
# Makefile's `make proto` does into gen/. Run from the repository root; the
# image build uses it (the generated code is not committed).
#   deploy/gen_protos.sh OUT_DIR
set -eu
out=${1:?usage: deploy/gen_protos.sh OUT_DIR}
python=${PYTHON:-python}
mkdir -p "$out"
# shellcheck disable=SC2046 # one argument per .proto file
"$python" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  $(find protos -name '*.proto' | sort)
# Packages for every generated directory, but not the root: `im` is imported
# from the root (PYTHONPATH holds OUT_DIR).
find "$out" -type d -exec touch {}/__init__.py \;
rm -f "$out/__init__.py"
