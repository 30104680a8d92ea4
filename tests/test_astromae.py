import torch

from cai.model.astromae import PARAMETERS, AstroMAE


def test_parameter_count_matches_the_paper():
    model = AstroMAE()
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS == 15_902_889
    frozen = sum(p.numel() for p in model.encoder_parameters())
    assert PARAMETERS - frozen == 10_398_057  # the paper's trainable count


def test_forward_shape():
    model = AstroMAE().eval()
    with torch.no_grad():
        out = model(torch.randn(3, 5, 32, 32), torch.randn(3, 5, dtype=torch.float64))
    assert out.shape == (3, 1)
