"""Image conversion and grids."""

import numpy as np
import PIL.Image
import pytest
import torch

from ldm_pipeline import load_image, make_grid


def test_transparency_is_composited_over_white():
    clear = load_image(PIL.Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    half = load_image(np.dstack([np.zeros((4, 4, 3)), np.full((4, 4, 1), 0.5)]).astype(np.float32))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    assert half.getpixel((0, 0)) == (128, 128, 128)


def test_sixteen_bit_images_keep_their_range():
    bright = PIL.Image.fromarray(np.full((4, 4), 65535, np.uint16)).convert("I;16")
    assert load_image(bright).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((4, 4, 3), 32896, np.uint16)).getpixel((1, 1)) == (128, 128, 128)


def test_tensor_and_array_agree():
    array = (np.random.RandomState(1).rand(8, 6, 3) * 255).astype(np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
    assert np.array_equal(np.asarray(load_image(array)), np.asarray(load_image(tensor)))
    assert load_image(array).size == (6, 8)


def test_grid_layout():
    images = [PIL.Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(images, rows=2, pad=1)
    assert grid.size == (3 * 10 + 2, 2 * 8 + 1)
    assert grid.getpixel((11 + 2, 2)) == (40, 0, 0) and grid.getpixel((2, 9 + 2)) == (120, 0, 0)
    with pytest.raises(ValueError, match="`images`: got an empty list"):
        make_grid([])


def test_grid_labels_and_scale():
    images = [PIL.Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(4)]
    plain = make_grid(images, cols=2, pad=1, scale=2)
    assert plain.size == (2 * 20 + 1, 2 * 16 + 1) and plain.getpixel((21 + 19, 0)) == (40, 0, 0)
    labelled = make_grid(images, cols=2, pad=1, row_labels=["first row", "second"], col_labels=["a", "b"])
    assert labelled.width > 2 * 10 + 1 and labelled.height > 2 * 8 + 1
    left, top = labelled.width - (2 * 10 + 1), labelled.height - (2 * 8 + 1)  # images sit bottom right
    assert labelled.getpixel((left + 11, top + 9)) == (120, 0, 0)
    assert np.asarray(labelled)[:top].min() < 100  # some label text is drawn above the images
    with pytest.raises(ValueError, match=r"`row_labels`: got 1 labels for 2 rows"):
        make_grid(images, cols=2, row_labels=["one"])
    with pytest.raises(ValueError, match=r"`scale`: got 0"):
        make_grid(images, scale=0)
