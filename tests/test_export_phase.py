"""The phase tail computes the model's own logits (float64: to rounding), in every BN mode,
and is used only where up5 is the plain 2x2 stride-2 transposed convolution."""

import pytest
import torch
from torch import nn

from grata.export.phase import PhaseTail, phase_tail_applies
from grata.models import ResUnet, set_norm_mode


@pytest.mark.parametrize("mode", ["sample", "running"])
def test_phase_tail_gives_the_model_logits(mode):
    torch.manual_seed(0)
    model = ResUnet("edge").double()
    with torch.no_grad():  # stored statistics and affines away from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    set_norm_mode(model, mode)
    tail = PhaseTail(model, 64)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref, got = model(x), tail(x)
    assert got.shape == ref.shape == (2, 2, 64, 64)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # the BN layers are the model's own (theta's names and values)
    assert tail.bnout is model.bnout and tail.res is model.res


def test_phase_tail_only_for_a_plain_upsampling():
    model = ResUnet("edge")
    assert phase_tail_applies(model)
    model.up5 = nn.ConvTranspose2d(64, 16, 2, stride=2, padding=0, output_padding=0,
                                   dilation=1, groups=2)
    assert not phase_tail_applies(model)
    model.up5 = nn.ConvTranspose2d(64, 16, 3, stride=2, padding=1, output_padding=1)
    assert not phase_tail_applies(model)
    assert not phase_tail_applies(nn.Conv2d(3, 3, 1))
