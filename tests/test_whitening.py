"""The whitening conv: eigenvector filters that decorrelate 2x2 patches."""
import pytest
import torch

from conftest import SCRIPTS, SERIES, Stop

WHITENED = SCRIPTS + [name for name, _, _ in SERIES[1:]]  # the family and the ablations from main1 on


def whitened_patch_covariance(script, layer, images):
    out = torch.nn.functional.conv2d(images, layer.weight[:12])  # the 12 un-negated filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    return flat.T @ flat / len(flat)


def test_whitened_patches_of_real_images_have_identity_covariance(script, real_data_dir):
    loader = script.CifarLoader(real_data_dir, train=True, device='cpu')
    images = loader.normalize(loader.images[:5000])
    layer = torch.nn.Conv2d(3, 24, 2)
    script.init_whitening_conv(layer, images, eps=1e-9)
    covariance = whitened_patch_covariance(script, layer, images)
    assert torch.allclose(covariance, torch.eye(12), atol=1e-2)
    # With the published eps=5e-4 the covariance is diag(lambda / (lambda + eps)): still decorrelated.
    script.init_whitening_conv(layer, images)
    covariance = whitened_patch_covariance(script, layer, images)
    assert torch.allclose(covariance, torch.diag(covariance.diag()), atol=5e-3)
    assert covariance.diag().min() > 0.5 and covariance.diag().max() < 1.001


def test_filters_come_largest_eigenvalue_first_then_negated(script):
    images = torch.randn(50, 3, 8, 8) * torch.tensor([3.0, 1.0, 0.3]).view(1, 3, 1, 1)
    layer = torch.nn.Conv2d(3, 24, 2)
    script.init_whitening_conv(layer, images)
    weights = layer.weight.flatten(1)
    assert torch.equal(weights[12:], -weights[:12])
    # Filters are eigenvectors / sqrt(lambda + eps): their norms grow as the eigenvalues shrink.
    norms = weights[:12].norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1] * (1 - 1e-5))


@pytest.mark.parametrize('script', WHITENED, indirect=True)
def test_training_fits_the_whitening_to_the_first_5000_training_images(script, tiny_data_dir, monkeypatch):
    """As published: the first 5000 training images, normalized (airbench94_2025: its first 960)."""
    count = script.hyp['net'].get('whitening_images', 5000)
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    loader.images, loader.labels = torch.rand(count + 64, 3, 32, 32), torch.zeros(count + 64, dtype=torch.long)
    seen = []

    def fitted(layer, images):
        seen.append(images)
        raise Stop
    monkeypatch.setattr(script, 'init_whitening_conv', fitted)
    with pytest.raises(Stop):
        script.train(loader, dtype=torch.float32, epochs=1, seed=0)
    assert torch.equal(seen[0], loader.normalize(loader.images[:count]))
