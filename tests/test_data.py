from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae


def test_synthetic_is_deterministic_and_uint8():
    a, b = vqvae.make_synthetic(16, seed=3), vqvae.make_synthetic(16, seed=3)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, vqvae.make_synthetic(16, seed=4))


def test_synthetic_images_are_structured_not_noise():
    x = vqvae.make_synthetic(64, seed=0).astype(np.float64)
    neighbour = np.abs(np.diff(x, axis=2)).mean()         # horizontally adjacent pixels
    shuffled = np.abs(x - x[:, ::-1, ::-1]).mean()        # pixels far apart
    assert neighbour < 0.25 * shuffled
    assert x.std() > 30  # not flat either


def write_image(path, size=(32, 32), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def test_folder_dataset_loads_converts_and_caches(tmp_path):
    root = tmp_path / "imgs"
    write_image(root / "train" / "cat" / "a.png")
    write_image(root / "train" / "dog" / "b.jpg", size=(64, 48))       # resized to 32×32
    write_image(root / "train" / "dog" / "c.png", mode="RGBA")          # alpha dropped
    write_image(root / "test" / "cat" / "d.png", mode="L")              # grayscale → RGB
    (root / "train" / "notes.txt").write_text("not an image, ignored")
    cfg = vqvae.load_config(overrides=dict(dataset="folder", data_dir=str(root)))
    train, test = vqvae.load_dataset(cfg)
    assert train.shape == (3, 32, 32, 3) and test.shape == (1, 32, 32, 3) and train.dtype == np.uint8
    assert np.array_equal(train[0], np.asarray(Image.open(root / "train" / "cat" / "a.png")))
    assert (test[0, ..., 0] == test[0, ..., 1]).all()                    # gray copied to all channels
    assert len(list((root / ".vqvae_cache").glob("*.npy"))) == 2
    again, _ = vqvae.load_dataset(cfg)                                   # from the cache
    assert np.array_equal(again, train)


def test_missing_folder_says_how_to_get_the_data(tmp_path):
    cfg = vqvae.load_config(overrides=dict(dataset="folder", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(vqvae.VQVAEError, match="cifar10-jpeg.tar.gz") as error:
        vqvae.load_dataset(cfg)
    assert "--dataset cifar10" in str(error.value) and "../" not in str(error.value)  # no path outside the project


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    cfg = vqvae.load_config(overrides=dict(dataset="folder", data_dir=str(tmp_path)))
    with pytest.raises(vqvae.VQVAEError, match="no images"):
        vqvae.load_dataset(cfg)


def test_unreadable_image_is_named(tmp_path):
    write_image(tmp_path / "test" / "a.png")
    bad = tmp_path / "train" / "x" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"")
    cfg = vqvae.load_config(overrides=dict(dataset="folder", data_dir=str(tmp_path)))
    with pytest.raises(vqvae.VQVAEError, match="broken.png"):
        vqvae.load_dataset(cfg)


def test_device_tensor_layout_and_normalisation():
    images = vqvae.make_synthetic(4, seed=0)
    x = vqvae.to_device_uint8(images, torch.device("cpu"))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[1, 2], torch.from_numpy(images[1, :, :, 2]))
    x = vqvae.normalize(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


@pytest.mark.slow
def test_cifar10_offline_error_names_the_options(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    cfg = vqvae.load_config(overrides=dict(dataset="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(vqvae.VQVAEError) as e:
        vqvae.load_dataset(cfg)
    assert "--data_dir" in str(e.value) and "--dataset folder" in str(e.value) and "synthetic" in str(e.value)


def test_a_failed_start_leaves_no_empty_directories(tmp_path, monkeypatch):
    """A run that cannot get its data stops before making its experiment directory, and the data
    directory that torchvision made on the way is removed again."""
    import torchvision.datasets

    def no_network(root, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision does before downloading
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    cfg = vqvae.load_config(overrides=dict(dataset="cifar10", data_dir=str(tmp_path / "data"), wandb=False,
                                           out_dir=str(tmp_path / "experiments"), name="r", device="cpu"))
    with pytest.raises(vqvae.VQVAEError, match="could not get CIFAR-10"):
        vqvae.train(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "experiments").exists()


def test_folder_cache_is_rebuilt_when_a_file_changes(tmp_path):
    """The decode cache is keyed by the files' names, sizes and modification times: an image
    replaced by another one is read again, not served from the old cache."""
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        write_image(root / split / "cat" / "a.png")
    cfg = vqvae.load_config(overrides=dict(dataset="folder", data_dir=str(root)))
    before, _ = vqvae.load_dataset(cfg)
    replacement = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(replacement).save(root / "train" / "cat" / "a.png")
    after, _ = vqvae.load_dataset(cfg)
    assert not np.array_equal(before, after) and np.array_equal(after[0], replacement)
    write_image(root / "train" / "cat" / "b.png")                           # a new file
    assert vqvae.load_dataset(cfg)[0].shape[0] == 2
