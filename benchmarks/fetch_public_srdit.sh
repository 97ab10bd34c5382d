#!/usr/bin/env bash
# Puts the public SR-DiT code that benchmarks/public_srdit_step.py times into .srdit/ (git-ignored;
# carry it to a GPU machine that has no network):
#   bash benchmarks/fetch_public_srdit.sh [dest, default .srdit]
# srdit/      SwayStar123/SpeedrunDiT at the commit the step was written against (its train.sh is the
#             all-components SR-DiT run)
# dinov2_hub/ facebookresearch/dinov2's dinov2/ package and hubconf.py (what torch.hub would fetch)
# _vendor/    einops, for machines without it (their models/pos_embed.py imports it)
# (GIT_BASE=<url or folder> fetches the two repositories from a mirror instead of github.com)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.srdit}"
SRDIT_COMMIT=c24c2ff25699cce63174ca56c2afcfeeb225e367
DINOV2_COMMIT=b8931f7bf91576930313be2c6d6af376033b35f0
PY="${SPEEDRUN_PYTHON:-python3}"; [[ -x .venv/bin/python ]] && PY="${SPEEDRUN_PYTHON:-$PWD/.venv/bin/python}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
export_at() {  # export_at <github repo> <commit> <prefix> [paths...]: a git archive of that commit
  local repo="$1" commit="$2" prefix="$3"; shift 3
  git init -q "$tmp/$prefix.git" && git -C "$tmp/$prefix.git" fetch -q --depth 1 "${GIT_BASE:-https://github.com}/$repo" "$commit"
  git -C "$tmp/$prefix.git" archive --prefix="$prefix/" "$commit" "$@" | tar -x -C "$tmp/out"
}
mkdir -p "$tmp/out"
export_at SwayStar123/SpeedrunDiT "$SRDIT_COMMIT" srdit
export_at facebookresearch/dinov2 "$DINOV2_COMMIT" dinov2_hub dinov2 hubconf.py
"$PY" -m pip download -q --no-deps --only-binary=:all: einops==0.8.2 -d "$tmp/wheel"
mkdir -p "$tmp/out/_vendor" && (cd "$tmp/out/_vendor" && "$PY" -m zipfile -e "$tmp"/wheel/einops-*.whl .)
cat > "$tmp/out/SOURCES.txt" <<TXT
srdit/      github.com/SwayStar123/SpeedrunDiT @ $SRDIT_COMMIT (git archive)
dinov2_hub/ github.com/facebookresearch/dinov2 @ $DINOV2_COMMIT (git archive: dinov2/, hubconf.py)
_vendor/    einops 0.8.2 wheel from PyPI (pure python)
TXT
rm -rf "$DEST" && mv "$tmp/out" "$DEST"
echo "public SR-DiT code in $DEST ($(cat "$DEST/SOURCES.txt" | wc -l) sources)"
