"""mmseg checkpoint metadata: the config texts of mmcv 0.x and mmengine 1.x, read with ``ast`` (never run), and
the settings taken from them. The real texts are in tests/fixtures/mmseg_configs; conversions that use them
are tested in tests/convert/test_checkpoints.py and tests/convert/test_fidelity.py."""

from pathlib import Path

import pytest

from emanet.convert.mmseg_config import (
    PUBLISHED_PIPELINES,
    Unresolved,
    config_name,
    implied_by_name,
    override_text,
    parse_mmseg_meta,
    read_config_text,
)
from emanet.errors import ModelSourceError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mmseg_configs"


@pytest.mark.parametrize(
    "name, corners, test",
    [
        ("mmengine_emanet_r50-d8_4xb2-80k_cityscapes-512x1024.txt", False, {"mode": "whole"}),
        (
            "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt",
            True,
            {"mode": "slide", "crop_size": [769, 769], "stride": [513, 513]},
        ),
        (
            "mmcv_emanet_r50-d8_769x769_80k_cityscapes.txt",
            True,
            {"mode": "slide", "crop_size": [769, 769], "stride": [513, 513]},
        ),
    ],
)
def test_real_config_texts_are_read_in_full(name, corners, test):
    text = (FIXTURES / name).read_text()
    key = "cfg" if name.startswith("mmengine") else "config"
    out = parse_mmseg_meta({key: text})
    assert out["model"] == {
        "num_stages": 3,
        "momentum": 0.1,
        "dropout": 0.1,
        "align_corners": corners,
        "output_stride": 8,
    }
    assert out["eval"] == test and "bgr" not in out
    assert out["data"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert out["data"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert "eval_pad_multiple" not in out["data"]  # SegDataPreProcessor pads test images only with a test_cfg
    assert out["data"]["eval_resize"] == ([2048, 1024] if "512x1024" in name else [2049, 1025])
    assert not any("not reproduced" in n for n in out["notes"])


def test_config_text_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt").read_text()
    text += f"\nimport os\nx = os.system('touch {marker}')\nlog_level = __import__('os').system('touch {marker}')\n"
    names = read_config_text(text)
    assert isinstance(names["x"], Unresolved) and isinstance(names["log_level"], Unresolved)
    assert not marker.exists() and names["model"]["decode_head"]["num_bases"] == 64
    with pytest.raises(ModelSourceError, match="not Python source"):
        parse_mmseg_meta({"cfg": "model = dict(\n    type='EncoderDecoder',\n"})


def test_test_padding_and_slide_settings_from_the_preprocessor():
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-512x1024.txt").read_text()
    padded = text.replace("    pad_val=0,", "    pad_val=0,\n    test_cfg=dict(size_divisor=32),")
    out = parse_mmseg_meta({"cfg": padded})
    assert (out["data"]["eval_pad_multiple"], out["data"]["eval_pad_offset"]) == (32, 0)
    with pytest.raises(ModelSourceError, match="pad_val=1"):
        parse_mmseg_meta({"cfg": padded.replace("pad_val=0,", "pad_val=1,")})
    with pytest.raises(ModelSourceError, match="size=.*fixed"):
        parse_mmseg_meta({"cfg": text.replace("    pad_val=0,", "    pad_val=0,\n    test_cfg=dict(size=(64, 64)),")})
    bad_slide = text.replace("test_cfg=dict(mode='whole')", "test_cfg=dict(mode='slide', crop_size=769)")
    with pytest.raises(ModelSourceError, match="crop_size=769 stride=None"):
        parse_mmseg_meta({"cfg": bad_slide})


def test_a_resize_that_does_not_keep_the_ratio_is_said_not_reproduced():
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-512x1024.txt").read_text()
    out = parse_mmseg_meta({"cfg": text.replace("dict(keep_ratio=True, scale=(", "dict(keep_ratio=False, scale=(")})
    assert "eval_resize" not in out["data"]
    assert any("not reproduced" in n and "keep_ratio=False" in n for n in out["notes"])


@pytest.mark.parametrize(
    "meta, file, name",
    [
        (
            {},
            "emanet_r50-d8_769x769_80k_cityscapes_20200901_100301-16f8de52.pth",
            "emanet_r50-d8_769x769_80k_cityscapes",
        ),
        (
            {"exp_name": "emanet_r101-d8_512x1024_80k_cityscapes.py"},
            "latest.pth",
            "emanet_r101-d8_512x1024_80k_cityscapes",
        ),
        (
            {"experiment_name": "emanet_r50-d8_4xb2-80k_cityscapes-769x769_20230101_120000"},
            "iter_80000.pth",
            "emanet_r50-d8_4xb2-80k_cityscapes-769x769",
        ),
        ({}, "iter_80000.pth", None),
    ],
)
def test_the_config_name_comes_from_the_meta_or_the_published_file_name(meta, file, name):
    assert config_name(meta, file) == name


def test_a_config_name_implies_the_published_test_pipeline():
    implied, open_keys, words = implied_by_name("emanet_r101-d8_4xb2-80k_cityscapes-769x769")
    assert implied == PUBLISHED_PIPELINES[(769, 769)] and implied["eval.stride"] == [513, 513] and not open_keys
    assert words == "769x769 training crops"
    implied, open_keys, words = implied_by_name("emanet_r50-d16_512x512_80k_ade20k")
    assert implied == {"model.output_stride": 16} and open_keys == [
        "model.align_corners",
        "eval.mode",
        "data.eval_resize",
    ]
    assert implied_by_name("iter_80000") == ({}, [], "")
    assert override_text("data.eval_resize", None) == "data.eval_resize=null"
    assert override_text("data.std", [0.229, 58.395 / 255]) == "data.std=[0.229,0.229]"
