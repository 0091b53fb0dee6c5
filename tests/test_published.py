"""The published study's recipe as options: augmentation, the study's model, its BA layer."""
import pytest
import torch
import torch.nn.functional as F

import vqvae
from conftest import tiny_config


def crop_flip_by_hand(x, dy, dx, flip, pad=4):
    """One image (C, H, W): reflect-pad, crop at (dy, dx), flip left–right if asked."""
    H, W = x.shape[1:]
    out = F.pad(x[None], (pad,) * 4, mode="reflect")[0, :, dy:dy + H, dx:dx + W]
    return out.flip(2) if flip else out


def all_crops(x, pad=4):
    return [crop_flip_by_hand(x, dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)]


def test_crop_flip_gives_a_crop_of_each_reflect_padded_image():
    x = torch.randn(6, 3, 32, 32)
    y = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(3))
    assert y.shape == x.shape
    for b in range(6):
        assert any(torch.equal(y[b], c) for c in all_crops(x[b]))


def test_crop_flip_centre_crop_with_flip_is_the_mirror_image():
    """Offsets (4, 4) undo the padding: the image itself, or its mirror image when flipped."""
    x = torch.randn(3, 8, 8)
    assert torch.equal(crop_flip_by_hand(x, 4, 4, False), x)
    assert torch.equal(crop_flip_by_hand(x, 4, 4, True), x.flip(2))


def test_crop_flip_uses_every_offset_and_both_flips():
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(2000, 1, 32, 32).contiguous()
    y = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(0))
    # pixel (0, 0) of a crop is padded pixel (dy, dx) (or (dy, dx + 31) when flipped): all 81·2 kinds appear
    kinds = {(tuple(y[b, 0, 0, :2].tolist()), y[b, 0, 1, 0].item()) for b in range(2000)}
    assert len(kinds) == 81 * 2


def test_crop_flip_is_deterministic_under_the_seed_and_differs_across_seeds():
    x = torch.randn(16, 3, 32, 32)
    a, b, c = (vqvae.augment_crop_flip(x, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_flip_shards_are_the_global_batch_split():
    """Data-parallel: each process augments its share exactly as one process augments the whole batch."""
    x = torch.randn(8, 3, 32, 32)
    whole = vqvae.augment_crop_flip(x, torch.Generator().manual_seed(5))
    parts = [vqvae.augment_crop_flip(x[r * 4:(r + 1) * 4], torch.Generator().manual_seed(5), (r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_crop_flip_keeps_the_memory_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    assert vqvae.augment_crop_flip(x, g).is_contiguous()
    assert vqvae.augment_crop_flip(x.to(memory_format=torch.channels_last), g).is_contiguous(
        memory_format=torch.channels_last)


def test_augmented_training_is_deterministic_and_differs_from_plain(tmp_path):
    a = vqvae.train(tiny_config(tmp_path, name="a", augment="crop_flip"))
    b = vqvae.train(tiny_config(tmp_path, name="b", augment="crop_flip"))
    plain = vqvae.train(tiny_config(tmp_path, name="plain"))
    assert a["psnr"] == b["psnr"] and a["perplexity"] == b["perplexity"]
    assert a["psnr"] != plain["psnr"]
