#!/usr/bin/env sh
# Print the path of a Python >= 3.12 (helm-sdkpy needs one), or nothing. pyenv's shims refuse a version
# that is not selected, so pyenv's installed versions are tried by path too.
for py in ${PYTHON_HELM:-} python3.13 python3.12 $(pyenv root 2>/dev/null)/versions/3.1[2-9]*/bin/python3; do
  if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    command -v "$py"
    exit 0
  fi
done
