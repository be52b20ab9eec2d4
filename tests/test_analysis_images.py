"""Image loading and conversion: every mode to 8-bit RGB, clear errors, resize to patch multiples."""

import numpy as np
import pytest
import torch
from PIL import Image

from vit_registers.analysis import ImageError, load_image, prepare_image, prepare_with_processor, to_rgb


def test_grayscale_rgba_palette_cmyk_become_rgb(tmp_path):
    gray = Image.fromarray(np.full((20, 30), 77, dtype=np.uint8), mode="L")
    gray.save(tmp_path / "gray.png")
    loaded = load_image(tmp_path / "gray.png")
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    assert np.asarray(loaded)[0, 0].tolist() == [77, 77, 77]

    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(tmp_path / "rgba.png"))
    assert pixels[0, 0].tolist() == [200, 0, 0] and pixels[0, 29].tolist() == [255, 255, 255]

    palette = Image.fromarray(np.full((8, 8, 3), 10, dtype=np.uint8)).convert("P")
    palette.save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif").mode == "RGB"
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.jpg")
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"))[4, 4]
    assert red[0] > 200 and red[1] < 60


def test_sixteen_bit_images_are_scaled_to_eight_bit(tmp_path):
    array = np.zeros((16, 16), dtype=np.uint16)
    array[:, 8:] = 65535
    array[0, 0] = 32896  # 128 * 257
    Image.fromarray(array).save(tmp_path / "deep.png")
    reopened = Image.open(tmp_path / "deep.png")
    assert reopened.mode in ("I", "I;16")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels[0, 15].tolist() == [255, 255, 255]
    assert pixels[0, 0].tolist() == [128, 128, 128]
    assert pixels[1, 1].tolist() == [0, 0, 0]
    assert np.asarray(to_rgb(Image.fromarray(array.astype(np.int32), mode="I")))[0, 15, 0] == 255
    floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    assert np.asarray(to_rgb(floats))[3, 3, 0] == 255


def test_unreadable_files_raise_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match=r"notes.txt: not an image file"):
        load_image(tmp_path / "notes.txt")
    Image.new("RGB", (30, 30)).save(tmp_path / "cut.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(ImageError, match=r"truncated.png: "):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_image_smaller_than_a_patch_is_refused():
    with pytest.raises(ImageError, match=r"tiny: 10x30 pixels is smaller than one 14x14 patch"):
        prepare_image(Image.new("RGB", (10, 30)), patch_size=14, name="tiny")
    prepared = prepare_image(Image.new("RGB", (14, 40)), patch_size=14, short_side=14)
    assert prepared.input_size == (42, 14)


def test_prepare_image_sizes_normalisation_and_box_mapping():
    image = Image.fromarray(np.full((300, 400, 3), 255, dtype=np.uint8))
    prepared = prepare_image(image, patch_size=14, short_side=224)
    height, width = prepared.input_size
    assert height == 224 and width % 14 == 0 and abs(width - 224 * 4 / 3) <= 7
    assert prepared.pixel_values.shape == (3, height, width)
    expected = (1.0 - 0.485) / 0.229
    assert prepared.pixel_values[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert prepared.box_to_original([0, 0, width, height]) == pytest.approx([0, 0, 400, 300])
    square = prepare_image(image, patch_size=14, short_side=100, square=True)
    assert square.input_size == (98, 98)

    class Processor:
        size = {"shortest_edge": 56}
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]

    with_processor = prepare_with_processor(image, Processor(), patch_size=14)
    assert with_processor.input_size[0] == 56
    assert torch.allclose(with_processor.pixel_values, torch.ones_like(with_processor.pixel_values))


def test_target_short_side_follows_the_processor():
    import transformers

    from vit_registers.analysis.images import target_short_side

    dinov2 = transformers.BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True
    )
    assert target_short_side(dinov2) == 224
    dinov2.do_center_crop = False
    assert target_short_side(dinov2) == 256
    assert target_short_side(transformers.ViTImageProcessor(size={"height": 384, "width": 384})) == 384
    assert target_short_side(70) == 70
    assert target_short_side(object()) == 224
