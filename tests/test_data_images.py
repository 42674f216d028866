import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.images import CLIP_MEAN, CLIP_STD, choose_grid, custom_round, load_image, normalize, tile_image

S = 224


def released_grid(width: int, height: int) -> tuple[int, int]:
    """Literal transcription of the released hd_image_train grid choice (W/H quirk included)."""
    height_var, width_var = width, height  # `height, width = image.size` with PIL's (W, H)
    a = max(1, custom_round(height_var / S))
    b = max(1, custom_round(width_var / S))
    allowed = {(1, k) for k in range(1, 10)} | {(2, k) for k in range(1, 5)} | {(3, k) for k in range(1, 4)} \
        | {(4, 1), (4, 2)} | {(k, 1) for k in range(5, 10)}
    if (a, b) not in allowed:
        if b == 1:
            a = 9
        elif a == 1:
            b = 9
        elif b == 2:
            a = 4
        elif a == 2:
            b = 4
        else:
            a, b = 3, 3
    return a, b


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_custom_round():
    assert [custom_round(v) for v in (0.0, 0.4, 0.5, 0.51, 1.5, 2.5, 2.500001, 3.9)] == [0, 0, 0, 1, 1, 2, 3, 4]


@pytest.mark.parametrize("wh, grid", [
    ((448, 448), (2, 2)),
    ((448, 672), (2, 3)),     # W=448, H=672: a from the width
    ((672, 448), (3, 2)),
    ((224, 2000), (1, 9)),    # tall: 2000/224 = 8.9 -> 9
    ((2000, 224), (9, 1)),
    ((224, 3000), (1, 9)),    # 13 rows clamp to 9
    ((3000, 224), (9, 1)),
    ((10, 10), (1, 1)),       # rounds to 0, floored at 1
    ((1000, 1000), (3, 3)),   # 4x4 not allowed -> 3x3
    ((1120, 448), (4, 2)),    # 5x2 -> b == 2 -> a = 4
    ((448, 1120), (2, 4)),
    ((1120, 896), (3, 3)),    # 5x4 -> 3x3
    ((560, 224), (2, 1)),     # 2.5 rounds down
    ((561, 224), (3, 1)),
])
def test_choose_grid_table(wh, grid):
    assert choose_grid(*wh, S, 9) == grid == released_grid(*wh)


def test_choose_grid_matches_release_everywhere():
    sides = list(range(8, 2400, 37))
    for w in sides:
        for h in sides:
            assert choose_grid(w, h, S, 9) == released_grid(w, h), (w, h)


def test_max_tiles_restricts_and_always_holds():
    assert choose_grid(672, 672, S, 4) == (2, 2)
    assert choose_grid(672, 448, S, 4) == (2, 2)
    assert choose_grid(1500, 224, S, 4) == (4, 1)
    assert choose_grid(224, 1500, S, 4) == (1, 4)
    assert choose_grid(448, 448, S, 1) == (1, 1)
    sides = list(range(8, 2400, 61))
    allowed4 = {(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)}
    for m in range(1, 10):
        for w in sides:
            for h in sides:
                a, b = choose_grid(w, h, S, m)
                assert a >= 1 and b >= 1 and a * b <= m, (w, h, m, a, b)
                if m == 4:
                    assert (a, b) in allowed4
    with pytest.raises(ValueError, match="max_tiles"):
        choose_grid(448, 448, S, 10)


@pytest.mark.parametrize("swap_hw", [True, False])
@pytest.mark.parametrize("wh", [(448, 672), (672, 448), (448, 448), (224, 2000), (10, 10), (300, 224)])
def test_tile_image_shapes_and_crops(wh, swap_hw):
    img = noise_image(*wh)
    out = tile_image(img, S, 9, swap_hw)
    a, b = choose_grid(*wh, S, 9)
    n = 1 if a == b == 1 else 1 + a * b
    assert out.shape == (n, S, S, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], normalize(img.resize((S, S), Image.Resampling.BICUBIC)))
    if n == 1:
        return
    rows, cols = (a, b) if swap_hw else (b, a)
    big = normalize(img.resize((S * cols, S * rows), Image.Resampling.BICUBIC))
    for i in range(rows):
        for j in range(cols):
            np.testing.assert_array_equal(out[1 + i * cols + j], big[i * S:(i + 1) * S, j * S:(j + 1) * S])


def test_swap_hw_swaps_aspect():
    # W=448, H=672 (tall) becomes 2 rows x 3 columns with the release quirk, 3 rows x 2 columns without.
    img = Image.new("RGB", (448, 672))
    img.paste((255, 0, 0), (0, 0, 448, 224))  # red top third
    red = normalize(np.full((S, S, 3), (255, 0, 0), np.uint8))
    noswap = tile_image(img, S, 9, swap_hw=False)
    np.testing.assert_allclose(noswap[1], red, atol=1e-5)  # first tile row is red, tiles 1-2
    np.testing.assert_allclose(noswap[2], red, atol=1e-5)
    assert not np.allclose(noswap[3], red)
    swapped = tile_image(img, S, 9, swap_hw=True)
    assert swapped.shape[0] == 7


def test_normalize_values():
    arr = np.array([[[0, 128, 255]]], np.uint8)
    expect = (arr.astype(np.float64) / 255 - CLIP_MEAN) / CLIP_STD
    out = normalize(arr)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((2, 2, 3), np.float32))


def test_load_image(tmp_path):
    p = tmp_path / "x.png"
    Image.new("L", (5, 7), 100).save(p)
    img = load_image(str(p))
    assert img.mode == "RGB" and img.size == (5, 7)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(str(bad))
    truncated = tmp_path / "trunc.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.jpg"):
        load_image(str(truncated))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


def test_token_budget_of_seed_examples():
    # docs/architectures.md 1.5: 448x448 -> 1280 tokens, 448x672 -> 1792 tokens at 256 tokens per view.
    assert tile_image(noise_image(448, 448), S, 9, True).shape[0] * 256 == 1280
    assert tile_image(noise_image(448, 672), S, 9, True).shape[0] * 256 == 1792
