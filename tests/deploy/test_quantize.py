"""int8 ONNX (emanet/deploy/quantize.py and `emanet export --quantize int8`): the EM unit stays float32, the
metadata is the float export's, and --check judges label agreement on held-out images before writing."""

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from emanet.cli import main as cli  # noqa: E402
from emanet.config import Config  # noqa: E402
from emanet.deploy.export import export_onnx, model_metadata  # noqa: E402
from emanet.deploy.predict import Predictor  # noqa: E402
from emanet.deploy.quantize import em_node_names, int8_parity, quantize_int8, read_images  # noqa: E402
from emanet.errors import ModelSourceError  # noqa: E402
from emanet.pretrained import load_model, save_pretrained  # noqa: E402
from tests.conftest import calibrated, run_cli, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EM_OPS = {"MatMul", "Softmax", "ReduceSum", "ReduceL2"}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny model (BN statistics and EM bases moved off their initial values) with a synthetic
    validation split of 12 48x48 scenes in its config."""
    model = calibrated(tiny_model())
    cfg = Config()
    cfg.model = tiny_model()
    cfg.data.dataset = "synthetic"
    cfg.data.options = {
        "length": 2,
        "val_length": 12,
        "image_size": 48,
        "max_objects": 4,
        "min_objects": 2,
        "min_size": 4,
        "max_size": 8,
    }
    folder = tmp_path_factory.mktemp("quant") / "model"
    return save_pretrained(model, cfg, folder, class_names=["bg", "a", "b"])


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props if p.key.startswith("emanet.")}


def test_em_node_names_are_the_units_and_a_graph_without_names_is_refused(model_folder, tmp_path):
    loaded = load_model(model_folder)
    path = export_onnx(loaded, tmp_path / "f.onnx", height=33, width=33)
    graph = onnx.load(str(path)).graph
    names = set(em_node_names(graph, loaded.model))
    by_name = {n.name: n.op_type for n in graph.node}
    # every EM op of the graph is the unit's (the backbone and head have none), and its two 1x1 convs
    assert {n for n, op in by_name.items() if op in EM_OPS} <= names
    assert [by_name[n] for n in names].count("Softmax") == 3  # T = 3 E-steps
    assert {"/head/context/conv_in/Conv", "/head/context/conv_out/Conv"} <= names
    assert not any(n.startswith(("/backbone/", "/head/reduce/", "/head/classifier/")) for n in names)
    for node in graph.node:
        node.name = ""  # what an exporter that does not name nodes by module gives
    with pytest.raises(ModelSourceError, match="Softmax nodes outside the EMA units' scopes"):
        em_node_names(graph, loaded.model)


def test_quantize_int8_keeps_the_em_unit_float32_and_the_float_metadata(model_folder, tmp_path):
    loaded = load_model(model_folder)
    images = read_images([_write_scene(tmp_path / f"{i}.png", i) for i in range(4)], loaded.config)
    # normalised and padded to 8k + 1 (data.eval_pad_multiple/offset), as evaluation reads them
    assert images[0].shape == (3, 41, 49) and abs(float(images[0].mean())) < 3
    path = quantize_int8(loaded, tmp_path / "q.onnx", images[:3], height=33, width=33)
    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    int8 = [n.name for n in convs if producer.get(n.input[1]) and producer[n.input[1]].op_type == "DequantizeLinear"]
    # all but the EM unit's two, the one reading the image and the classifier
    assert len(int8) == len(convs) - 4 and "/head/reduce/conv/Conv" in int8
    assert not [n for n in int8 if n.startswith(("/head/context/", "/head/classifier/", "/backbone/conv1/"))]
    for node in graph.node:  # no EM op reads a dequantized (int8) tensor
        if node.op_type in EM_OPS:
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    float_path = export_onnx(loaded, tmp_path / "f.onnx", height=33, width=33)
    expected = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    assert _metadata(path) == _metadata(float_path) == expected
    parity = int8_parity(loaded, path, images[3:])
    assert parity.label_agreement > 0.9 and parity.max_abs_diff > 0  # int8: close, not equal


def _write_scene(path, seed: int):
    """A 37x45 image of coloured rectangles (int8 ranges from noise would be unlike any real image's)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((37, 45, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, 30), rng.integers(0, 38)
        rgb[y : y + 8, x : x + 8] = rng.integers(0, 256, 3)
    Image.fromarray(rgb).save(path)
    return path


def test_cli_int8_export_checked_on_held_out_images(model_folder, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    common = ["--quantize", "int8", "--calibration-images", "4", "--check", "--check-images", "4", "--size", "48", "48"]
    proc = run_cli("export", str(model_folder), "--out", str(out), "--calibration", "val", *common)
    assert proc.returncode == 0, proc.stderr
    assert "check (int8 onnxruntime vs float32 PyTorch, 4 held-out images): same argmax on" in proc.stdout
    assert "int8 QDQ calibrated on 4 images" in proc.stdout and "check passed (>= 99% agreement)" in proc.stdout
    float_path = export_onnx(load_model(model_folder), tmp_path / "float.onnx", height=48, width=48)
    assert _metadata(out) == _metadata(float_path)
    # the int8 file is a model source as the float one is (deploy/onnx_model.py): no model code needed
    image = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    int8_labels = Predictor.from_source(out)(image).labels
    float_labels = Predictor.from_source(model_folder, device="cpu")(image).labels
    assert (int8_labels == float_labels).mean() >= 0.95
    # a threshold the int8 graph misses (int8 moves a few boundary pixels): exit 2, no file written
    bad = tmp_path / "bad.onnx"
    args = ["export", str(model_folder), "--out", str(bad), "--calibration", "val", *common]
    assert cli.main([*args, "--min-agreement", "100"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: check failed: the argmax agrees on" in err and "below the required 100% (same argmax on" in err
    assert err.rstrip().endswith("nothing written")
    assert not bad.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "int8.onnx"]


def test_cli_int8_argument_errors(model_folder, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    int8 = ["--quantize", "int8", "--calibration"]
    assert cli.main(["export", str(model_folder), "--out", str(out), "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --calibration DATA" in capsys.readouterr().err
    assert cli.main(["export", str(model_folder), "--out", str(out), *int8, "val", "--no-fold-bn"]) == 2
    assert "--no-fold-bn is for float32 graphs" in capsys.readouterr().err
    assert cli.main(["export", str(model_folder), "--out", str(out), *int8, "val", "--exporter", "dynamo"]) == 2
    assert "--quantize needs --exporter torchscript" in capsys.readouterr().err
    assert cli.main(["export", str(model_folder), "--out", str(out), "--calibration", "val"]) == 2
    assert "--calibration is for --quantize int8" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    _write_scene(few / "a.png", 0)
    args = ["export", str(model_folder), "--out", str(out), "--quantize", "int8", "--calibration", str(few)]
    assert cli.main([*args, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{few}: the folder" in err and "has 1 images; 32 calibration + 8 held-out check images" in err
    assert cli.main([*args[:-1], str(tmp_path / "nowhere")]) == 2
    assert "not a folder of images, nor 'val'" in capsys.readouterr().err
    assert not out.exists()
