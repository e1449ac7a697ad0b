#!/usr/bin/env bash
# Stop the Ray nodes of start.sh. Note: `ray stop` stops every Ray process of this user on this
# machine, not only this cluster's.
set -euo pipefail
"${RAY_BIN:-ray}" stop "$@"
