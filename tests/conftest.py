"""Shared fixtures: one small structured edge model, exported once per test session."""

import pytest
import torch
from grata.export import export_artifacts

from grata.models import ResUnet, save_checkpoint

EDGE_SIZE = 64


def structured_edge() -> ResUnet:
    """An untrained edge ResUnet whose BN affines and statistics are not the defaults."""
    torch.manual_seed(0)
    model = ResUnet("edge")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="session")
def edge64(tmp_path_factory):
    """(checkpoint, artifact folder) of `structured_edge()` at 64x64."""
    root = tmp_path_factory.mktemp("edge64")
    save_checkpoint(structured_edge(), root / "edge.pt")
    export_artifacts(root / "edge.pt", "edge", EDGE_SIZE, root / "art")
    return root / "edge.pt", root / "art"
