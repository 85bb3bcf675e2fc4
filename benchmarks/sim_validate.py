"""Simulator vs a real cluster on the same requests: predicted and measured TTFT, TPOT and throughput per rate.

    python benchmarks/sim_validate.py --config configs/tiny-cpu.yaml --profile profiles/tiny-cpu.yaml \
        --rates 1,2 --num-requests 32 --prompt-len uniform:16:128 --output-len 16

The profile comes from ``splitserve profile CONFIG --out PATH`` on the same machine. The logic is in
``splitserve.bench.validate``; see there and docs/simulator.md (Validation).
"""

from __future__ import annotations

import sys

from splitserve.bench.validate import main

if __name__ == "__main__":
    sys.exit(main())
