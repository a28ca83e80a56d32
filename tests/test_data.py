"""The GPU-resident loader and its augmentations."""
import pytest
import torch


def flipped_per_epoch(loader, epochs):
    """Which stored images each pass over an unshuffled loader shows mirrored (and that the rest are unchanged)."""
    plain = loader.normalize(loader.images)
    result = []
    for _ in range(epochs):
        images = torch.cat([x for x, _ in loader])
        mirrored = (images == plain.flip(-1)).flatten(1).all(1) & ~(images == plain).flatten(1).all(1)
        assert torch.equal(mirrored | (images == plain).flatten(1).all(1), torch.ones(len(images), dtype=torch.bool))
        result.append(mirrored)
    return result


def test_alternating_flip_flips_a_random_half_then_every_image_the_other_way(script, tiny_data_dir):
    """The paper's alternating flip: a random half in the first epoch; then each image in the orientation it
    was not shown in the epoch before, so every two epochs show every image both ways."""
    loader = script.CifarLoader(tiny_data_dir, train=False, batch_size=100, device='cpu', aug=dict(flip=True))
    first, *later = flipped_per_epoch(loader, 5)
    assert 0.35 < first.float().mean() < 0.65
    for epoch, flipped in enumerate(later, 1):
        assert torch.equal(flipped, ~first if epoch % 2 else first)
    loader.epoch = 0  # train() does this: a new random half for every training
    torch.manual_seed(1)
    assert not torch.equal(flipped_per_epoch(loader, 1)[0], first)


def position_images(n):
    """Images whose channel 0 holds each pixel's own (row * 32 + col) index."""
    grid = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    return grid.expand(n, 3, 32, 32).clone()


@pytest.mark.parametrize('r', [1, 2, 4])
def test_translate_offsets_stay_within_r_and_cover_the_range(script, r):
    torch.manual_seed(0)
    out = script.batch_translate(position_images(2000), r)
    centre = out[:, 0, 16, 16].long()  # = source pixel (16 + dy, 16 + dx)
    dy, dx = centre // 32 - 16, centre % 32 - 16
    for offsets in (dy, dx):
        assert offsets.min() == -r and offsets.max() == r
        assert set(offsets.tolist()) == set(range(-r, r + 1))
    # The whole crop moves together: every interior pixel is shifted by the same offset.
    expected = position_images(1)[0, 0, 8:24, 8:24] + (dy * 32 + dx).view(-1, 1, 1)
    assert torch.equal(out[:, 0, 8:24, 8:24], expected)


def test_translate_reflects_at_the_border(script):
    torch.manual_seed(0)
    images = position_images(500)
    out = script.batch_translate(images, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode='reflect')
    crops = {tuple(padded[0, 0, dy:dy + 32, dx:dx + 32].flatten().tolist()) for dy in range(5) for dx in range(5)}
    assert all(tuple(image.flatten().tolist()) in crops for image in out[:, 0])


@pytest.mark.parametrize('size', [4, 12, 16])
def test_cutout_zeroes_one_square_of_the_given_size_inside_the_image(script, size):
    torch.manual_seed(0)
    out = script.batch_cutout(torch.ones(1000, 3, 32, 32), size)
    zeroed = out == 0
    assert torch.equal(zeroed[:, 0], zeroed[:, 2])  # the same square in every channel
    assert torch.all(zeroed[:, 0].sum((1, 2)) == size * size)
    rows, cols = zeroed[:, 0].any(2), zeroed[:, 0].any(1)
    assert torch.all(rows.sum(1) == size) and torch.all(cols.sum(1) == size)  # a square, not scattered
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    for corner in (top, left):
        assert corner.min() == 0 and corner.max() == 32 - size  # placements cover the image, edges included
    assert (top == left).float().mean() < 0.2  # the two axes drawn independently (equal 1 time in 33 - size)


def test_the_loader_cuts_out_last_so_every_training_image_keeps_the_whole_square(script, tiny_data_dir):
    """Flip, translate, then cutout: no square is shifted partly out of the image or mirrored by the padding."""
    torch.manual_seed(0)
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=256, device='cpu',
                                aug=dict(flip=True, translate=4, cutout=12))
    loader.images = torch.full_like(loader.images, 0.9)  # nonzero once normalized, everywhere
    zeroed = next(iter(loader))[0][:, 0] == 0
    assert torch.all(zeroed.sum((1, 2)) == 12 * 12) and torch.all(zeroed.any(2).sum(1) == 12)


def test_loader_holds_the_split_on_the_device(script, tiny_data_dir):
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=100, device='cpu')
    assert loader.images.shape == (256, 3, 32, 32) and loader.images.dtype == torch.float32
    assert 0 <= loader.images.min() and loader.images.max() <= 1
    assert loader.labels.dtype == torch.int64
    assert len(loader) == 2  # train drops the last partial batch
    assert len(script.CifarLoader(tiny_data_dir, train=False, batch_size=50, device='cpu')) == 2  # 64 -> 50 + 14


def test_loader_yields_normalized_augmented_batches_in_shuffled_order(script, tiny_data_dir):
    torch.manual_seed(0)
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, device='cpu',
                                aug=dict(flip=True, translate=2))
    batches = list(loader)
    assert len(batches) == 4 and all(x.shape == (64, 3, 32, 32) and y.shape == (64,) for x, y in batches)
    labels = torch.cat([y for _, y in batches])
    assert not torch.equal(labels, loader.labels)  # shuffled
    assert torch.equal(labels.sort().values, loader.labels.sort().values)  # a permutation
    assert abs(torch.cat([x for x, _ in batches]).mean()) < 1.5  # normalized, not [0, 1]


def test_unshuffled_unaugmented_loader_yields_the_stored_images(script, tiny_data_dir):
    loader = script.CifarLoader(tiny_data_dir, train=False, batch_size=50, device='cpu')
    images = torch.cat([x for x, _ in loader])
    assert torch.allclose(images, loader.normalize(loader.images))
    assert torch.equal(torch.cat([y for _, y in loader]), loader.labels)


def test_images_and_labels_can_be_replaced_by_a_subset(script, tiny_data_dir):
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=32, device='cpu')
    keep = loader.labels < 5
    loader.images, loader.labels = loader.images[keep], loader.labels[keep]
    assert len(loader) == int(keep.sum()) // 32
    seen = torch.cat([y for _, y in loader])
    assert len(seen) == len(loader) * 32 and seen.max() < 5


def test_unknown_augmentation_is_an_error(script, tiny_data_dir):
    with pytest.raises(script.AirbenchError, match='unknown augmentation'):
        script.CifarLoader(tiny_data_dir, aug=dict(flip=True, rotate=10), device='cpu')


def test_mismatched_subset_is_an_error(script, tiny_data_dir):
    loader = script.CifarLoader(tiny_data_dir, batch_size=32, device='cpu')
    loader.images = loader.images[:100]
    with pytest.raises(script.AirbenchError, match='100 images but 256 labels'):
        next(iter(loader))
