"""Small datasets for the data tests: Ground Truth style manifests on the test S3 server."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/data/ground_truth.py

from ground_truth import write_gt_manifest  # noqa: E402


@pytest.fixture
def gt_manifest_factory():
    return write_gt_manifest
