#!/usr/bin/env bash
# Build an sdist of the checkout and a wheel from the sdist, install the wheel into a fresh venv
# (no -e, nothing from the checkout) and run a smoke test from a folder outside the checkout: the
# package and its compiled extension must be imported from the fresh venv's site-packages, the
# device presets must come with the wheel, convert + reprogram_report must run on a small timm
# model, crossbar-report must do a real (tiny) run and every console entry point must answer
# --help.
#
#   bash scripts/check_wheel.sh            (or: make wheel-check; CI runs it after make test)
#
# How the fresh venv gets torch: torch (5.6 GB with its CUDA libraries) and the other runtime
# dependencies are the very packages the dev venv installed from this machine's wheels; copying
# or reinstalling them would take minutes and prove nothing about crossbar_torch. So the fresh
# venv is created bare (python -m venv --without-pip, from the same base interpreter) and a .pth
# file appends the dev venv's site-packages to its sys.path, AFTER its own site-packages. A
# directory named in a .pth file is not a site directory, so the dev venv's own .pth files (the
# editable install of crossbar_torch among them) are not run; the smoke test asserts that
# crossbar_torch and crossbar_torch._C come from the fresh venv all the same.
#
# The sdist is made from a copy of the working tree (tracked and untracked, not ignored files)
# in a scratch folder, so no object file of the in-place build is reused and the checkout gets no
# build/ or *.egg-info. The extension is compiled as `make setup` compiles it (CPU kernels, and
# CUDA ones when a GPU is visible). Variables: VENV (dev venv, default .venv), WHEEL_CHECK_DIR
# (scratch, default a fresh mktemp -d, removed at the end unless KEEP=1), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
VENV=${VENV:-.venv}
DEV_PY=$(cd "$(dirname "$VENV/bin/python")" && pwd -P)/python
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP

WORK=${WHEEL_CHECK_DIR:-$(mktemp -d /tmp/crossbar_wheel_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd -P)
case "$WORK/" in "$REPO"/*) echo "check_wheel: WHEEL_CHECK_DIR must be outside $REPO" >&2; exit 2;; esac
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
rm -rf "$WORK/src" "$WORK/sdist" "$WORK/dist" "$WORK/venv" "$WORK/run"
mkdir -p "$WORK/src" "$WORK/sdist" "$WORK/dist" "$WORK/run"
t0=$(date +%s)

# 1. A copy of the working tree (what `git status` would commit, ignored files left out).
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$WORK/src"

# 2. An sdist of that copy, and the wheel built from the sdist (as `python -m build` does), so
# the sdist must carry every source and header the build needs (MANIFEST.in); against the dev
# venv's torch (as make setup builds: --no-build-isolation).
echo "check_wheel: building the sdist, then the wheel from it (compiles the extension, MAX_JOBS=$MAX_JOBS; log: $WORK/build.log)"
(cd "$WORK/src" && "$DEV_PY" setup.py -q sdist -d "$WORK/sdist" > "$WORK/build.log" 2>&1 \
  && "$DEV_PY" -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" \
       "$WORK"/sdist/crossbar_torch-*.tar.gz >> "$WORK/build.log" 2>&1) \
  || { tail -40 "$WORK/build.log"; echo "check_wheel: sdist or wheel build FAILED" >&2; exit 1; }
t1=$(date +%s)
WHEEL=$(ls "$WORK"/dist/crossbar_torch-*.whl)
echo "check_wheel: built $(basename "$WHEEL") in $((t1 - t0)) s"

# Every file of the package in the source tree (data files included: presets, corpora) is in
# the wheel, and so is the compiled extension.
(cd "$WORK/src" && find crossbar_torch -type f ! -name '*.pyc' ! -name '_C*.so' | sort) > "$WORK/want.txt"
"$DEV_PY" - "$WHEEL" "$WORK/want.txt" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
want = open(sys.argv[2]).read().splitlines()
missing = [n for n in want if n not in names]
assert not missing, f"the wheel lacks package files (add them to package-data): {missing}"
assert any(n.startswith("crossbar_torch/_C") and n.endswith(".so") for n in names), names
PY

# 3. A fresh venv; torch and the other dependencies from the dev venv (see the header).
"$DEV_PY" -m venv --without-pip "$WORK/venv"
FRESH_PY="$WORK/venv/bin/python"
FRESH_SITE=$("$FRESH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEV_SITE=$("$DEV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEV_SITE" > "$FRESH_SITE/zz_crossbar_wheel_check_deps.pth"
"$DEV_PY" -m pip --python "$FRESH_PY" install --quiet --no-deps --no-index "$WHEEL"
t2=$(date +%s)

# 4. The smoke test, from a folder outside the checkout.
cd "$WORK/run"
REPO="$REPO" FRESH_SITE="$FRESH_SITE" "$FRESH_PY" - <<'EOF'
import os
import sys

repo, site = os.environ["REPO"], os.path.realpath(os.environ["FRESH_SITE"])
assert repo not in [os.path.realpath(p or ".") for p in sys.path], sys.path

import torch
import timm

import crossbar_torch as xb
import crossbar_torch._C as ext
from crossbar_torch.device import DEVICE_DIR, known_devices, load_device

for what, f in (("crossbar_torch", xb.__file__), ("crossbar_torch._C", ext.__file__),
                ("the device presets", str(DEVICE_DIR))):
    f = os.path.realpath(f)
    assert f.startswith(site + os.sep), f"{what} comes from {f}, not from {site}"
    assert not f.startswith(repo + os.sep), f"{what} comes from the checkout: {f}"

cfg = xb.CrossbarConfig()                    # failed outside the checkout before (issue 17)
assert {"default", "rram", "pcm", "fefet"} <= set(known_devices()), known_devices()
assert load_device("rram").endurance == 1e6
# the sentence corpora (scored, and rule 21's calibration) are package data
from crossbar_torch.apps.frontier import builtin_sentences, calibration_corpus, feedback_sentences
assert len(builtin_sentences()) == 330 and len(calibration_corpus()) == 768
assert feedback_sentences() == calibration_corpus()[:256]

torch.manual_seed(0)
model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    ref = model(x)
cfg = xb.CrossbarConfig(rows=32, cols=32, sort="magnitude", device="rram")
xmodel = xb.convert(model, cfg)
report = xb.reprogram_report(xmodel)
d = report.to_dict()
assert d["writes_per_pass"] > 0 and d["set_energy_per_pass_j"] > 0, d
with torch.no_grad():
    out = xmodel(x)
assert out.shape == ref.shape and torch.isfinite(out).all()
print(f"check_wheel: smoke test passed: crossbar_torch from {os.path.dirname(xb.__file__)}; "
      f"test_resnet on 32x32 RRAM crossbars: {d['writes_per_pass']} writes per pass")
EOF

# A console entry point of the wheel (pyproject [project.scripts]): --help, then a real run.
"$WORK/venv/bin/crossbar-report" --help > help.txt
grep -q -- "--memristor" help.txt
"$WORK/venv/bin/crossbar-report" --model test_resnet --random-init --quiet --set rows=32 \
  --set cols=32 --memristor rram --json report.json > report.txt
"$FRESH_PY" - <<'EOF'
import json
d = json.load(open("report.json"))
r = d.get("report", d)
assert r["writes_per_pass"] > 0 and r["device"]["name"] == "rram", r
print(f"check_wheel: crossbar-report ran: {r['writes_per_pass']} writes per pass")
EOF
for cmd in crossbar-eval crossbar-frontier crossbar-finetune crossbar-demo crossbar-plot-periphery \
    crossbar-allocate; do
  "$WORK/venv/bin/$cmd" --help > /dev/null
done
t3=$(date +%s)
echo "check_wheel: OK (wheel build $((t1 - t0)) s, venv + install $((t2 - t1)) s, smoke test $((t3 - t2)) s, total $((t3 - t0)) s)"
