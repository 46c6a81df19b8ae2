"""Test instrument, loaded by Python at start-up when this folder is on PYTHONPATH (tests/test_distributed.py puts
it there for the runs whose training samples it checks): every batch of training samples a process fetches (with
autograd on: evaluation runs under no_grad; the tests pass --num_workers 0) is appended to
$SAMPLE_LOG/rank<RANK>.jsonl. Batches that a resumed run skips are never fetched, so they are not recorded."""

import json
import os
from pathlib import Path

if os.environ.get("SAMPLE_LOG"):
    import torch
    from torch.utils.data._utils import fetch

    fetch_batch = fetch._MapDatasetFetcher.fetch

    def fetch_and_record(self, possibly_batched_index):
        if torch.is_grad_enabled():
            path = Path(os.environ["SAMPLE_LOG"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps([int(i) for i in possibly_batched_index]) + "\n")
        return fetch_batch(self, possibly_batched_index)

    fetch._MapDatasetFetcher.fetch = fetch_and_record
