#!/usr/bin/env bash
# Screenshot of one seed's timeline page, for a look: runs `crmsync-sim run --seed SEED --html`,
# then Debian's headless Chromium (`apt-get install -y chromium`) on the page.
#
#   sim/scripts/screenshot.sh SEED OUT.png [world flags, e.g. --faults crash --runs 10]
#
# The test that checks a page renders is `the_page_renders_in_headless_chromium` in
# sim/tests/timeline.rs (in `cargo test --workspace`).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SEED OUT.png [world flags]" >&2
  exit 2
fi
seed=$1
out=$(realpath -m "$2")
shift 2
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "$chromium is not installed: apt-get install -y chromium" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/../.."
# The seed's verdict is in the page; a failing seed still gets its picture.
cargo run --quiet -p crmsync-sim -- run --seed "$seed" "$@" --html "$work/page.html" >/dev/null || true
[ -s "$work/page.html" ] || { echo "no page was written" >&2; exit 1; }
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/profile" --screenshot="$out" --window-size=1400,900 \
  "file://$work/page.html" >/dev/null 2>&1
echo "$out"
