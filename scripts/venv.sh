# Sourced by scripts/main.sh and scripts/test.sh (from the repository root): creates .venv on
# first use and says whether the calling script's installs are done. A stamp file in .venv, named
# by a hash of pyproject.toml and of the calling script, marks them done, so later runs install
# nothing (no pip, no output) until either file changes.
#   source scripts/venv.sh
#   if [ ! -f "$VENV_STAMP" ]; then venv_install ...; venv_install ...; venv_installed; fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
VENV_STAMP_PREFIX=.venv/.installed-$(basename "$0" .sh)
VENV_STAMP=$VENV_STAMP_PREFIX-$(.venv/bin/python -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest()[:16])' \
  pyproject.toml "$0")

# pip install, quiet; setuptools' "Editable installation" notice is information, not an error.
venv_install() {
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@"
}

# Marks the installs done (replacing the stamps of earlier versions of the files).
venv_installed() {
  rm -f "$VENV_STAMP_PREFIX"-*
  touch "$VENV_STAMP"
}
