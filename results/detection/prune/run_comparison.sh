#!/bin/sh
# l1 and taylor one-shot to 5x fewer parameters (target_params=0.2), each fine-tuned one epoch, one after the other.
set -e
cd "$(dirname "$0")/../../.."
for c in l1 taylor; do
  pycompress prune --config results/detection/prune/ssd_$c.toml \
    --output results/detection/prune/ssd_$c.json --save results/detection/prune/ssd_$c.pt > results/detection/prune/ssd_$c.log 2>&1
done
