"""Shared fixtures: small synthetic sites written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsegdiff_core.data.synthetic import write_fundus_sites

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fundus_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three non-IID fundus sites at 64 px: 24 train, 4 val, 8 test cases each."""
    root = tmp_path_factory.mktemp("synthetic")
    return write_fundus_sites(root, num_sites=3, cases={"train": 24, "val": 4, "test": 8}, size=64)
