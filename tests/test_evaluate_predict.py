"""evaluate and predict on the tiny synthetic data set, with checkpoints built here.

Most tests register a small convolutional net as model "tiny" so that they take seconds; one
test loads a real DeepLabv3+ checkpoint stored in bf16.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import climseg
from climseg import config as config_module
from climseg import dist, evaluate, events, grid, inference, netcdf, predict
from climseg.engine import Precision
from climseg.checkpoint import CheckpointError, save_checkpoint
from climseg.config import load_config
from climseg.data.format import (CLASS_NAMES, DATA_KEY, LABEL_KEY, read_sample, validate_file,
                                 write_sample)
from climseg.data.partition import list_files
from climseg.model import build_model, deeplab
from climseg.plot import DPI, PANEL_SIZE

REPO = Path(__file__).resolve().parent.parent
HOROVODRUN = Path(sys.executable).parent / "horovodrun"


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 16, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(deeplab.MODELS, "tiny", TinyNet)
    # the config checks model.name against the names it knows (it cannot import the model)
    monkeypatch.setattr(config_module, "MODEL_NAMES", (*config_module.MODEL_NAMES, "tiny"))


def _model_kwargs(config: dict) -> dict:
    """build_model's arguments from a config dict (class_names are for reports only)."""
    return {k: config["model"][k] for k in ("name", "in_channels", "num_classes")}


def make_checkpoint(path, root, name="tiny", state=None, seed=0, overrides=()):
    """A checkpoint laid out as docs/design.md says, with a randomly initialised model and
    the grid of ``root``'s fields recorded, as the trainer records that of its training data."""
    config = load_config(None, [f"data.root={root}", f"model.name={name}",
                                *overrides]).to_dict()
    torch.manual_seed(seed)
    model = build_model(**_model_kwargs(config))
    with torch.no_grad():  # sharpen the random features so that the predicted class varies
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.fill_(0.01)
    save_checkpoint({"model": model.state_dict() if state is None else state,
                     "optimizer": {}, "scheduler": {}, "scaler": None, "step": 7, "epoch": 1,
                     "batch_in_epoch": 0, "rng": [], "best_iou": 0.0, "config": config,
                     "grid": grid.grid_record(grid.regular_grid(
                         *validate_file(sorted(Path(root).glob("*/data-*.h5"))[0])[:2]))},
                    path)
    return path


def test_predict_writes_masks_probabilities_and_maps(tiny_root, tiny_model, tmp_path,
                                                     monkeypatch):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    files = list_files(tiny_root / "test")
    out = tmp_path / "pred"
    titles = []
    plot = predict.plot_sample
    monkeypatch.setattr(predict, "plot_sample",
                        lambda *a, title=None, **k: titles.append(title) or plot(*a, **k))
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out), "--probabilities",
                         *map(str, files)]) == 0
    for f in files:
        with h5py.File(out / f"{f.stem}-mask.h5", "r") as h:
            pred = h[predict.PREDICTION_KEY][...]
            probs = h[predict.PROBABILITIES_KEY][...]
            assert h["climate"].attrs["region"] == "the whole 64x96 field, in one piece"
        assert pred.shape == (64, 96) and pred.dtype == np.uint8
        assert probs.shape == (64, 96, 3) and probs.dtype == np.float16
        assert set(np.unique(pred)) <= {0, 1, 2}
        np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=5e-3)
        png = (out / f"{f.stem}.png").read_bytes()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert (width, height) == (round(2 * PANEL_SIZE[0] * DPI), round(PANEL_SIZE[1] * DPI))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # Each map's title: the sample, its date and time (step HH x 3 hours), what predicted it.
    for f, title in zip(files, titles):
        when = f"{f.stem[5:15]} {3 * int(f.stem[16:18]):02d}:00"
        assert title == f"{f.stem}: {when} (checkpoint tiny.pt, step 7)"


def _confusion(truths, preds, k=3):
    cm = np.zeros((k, k), np.int64)
    for t, p in zip(truths, preds):
        np.add.at(cm, (t.ravel().astype(np.int64), p.ravel().astype(np.int64)), 1)
    return cm


@pytest.mark.parametrize("overrides", [(), ("data.crop=[32, 48]",)], ids=["whole", "tiled"])
def test_evaluate_matches_iou_of_saved_masks(tiny_root, tiny_model, tmp_path, overrides):
    # A crop-trained run: evaluate's tiles (TiledModel in the trainer's loop) and predict's
    # (predict_probabilities) must give the same masks over the whole field.
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root, overrides=overrides)
    files = list_files(tiny_root / "test")
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out), *map(str, files)]) == 0
    result_path = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tiny_root),
                          "--batch-size", "1", "--output", str(result_path)]) == 0
    result = json.loads(result_path.read_text())

    truths, preds = [], []
    for f in files:
        with h5py.File(f, "r") as h:
            truths.append(h[LABEL_KEY][...])
        with h5py.File(out / f"{f.stem}-mask.h5", "r") as h:
            preds.append(h[predict.PREDICTION_KEY][...])
    cm = _confusion(truths, preds)
    assert result["confusion"] == cm.tolist()
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore"):
        iou = tp / union      # NaN for a class in neither truth nor prediction: JSON null
    assert [v is None for v in result["per_class_iou"]] == list(np.isnan(iou))
    np.testing.assert_allclose([np.nan if v is None else v for v in result["per_class_iou"]],
                               iou)
    assert result["mean_iou"] == pytest.approx(np.nanmean(iou))   # over the classes seen
    # MLPerf: per sample, an absent class counts 1; mean over classes, then over batches (of 1).
    per_sample = []
    for t, p in zip(truths, preds):
        c = _confusion([t], [p])
        i, u = np.diag(c), c.sum(0) + c.sum(1) - np.diag(c)
        per_sample.append(np.where(u > 0, i / np.maximum(u, 1), 1.0).mean())
    assert result["eval_accuracy"] == pytest.approx(np.mean(per_sample))
    np.testing.assert_allclose(result["pixel_frequency"]["truth"], cm.sum(1) / cm.sum())
    np.testing.assert_allclose(result["pixel_frequency"]["prediction"], cm.sum(0) / cm.sum())
    assert result["samples"] == len(files) and result["samples_per_second"] > 0
    assert result["step"] == 7 and result["classes"][1] == "tropical_cyclone"
    assert (cm.sum(0) > 0).sum() >= 2, "a constant prediction would make this test weak"
    # Object scores: the same events matched on predict's masks, file by file, add up to
    # evaluate's per-rank tally (both whole-field, so the 0/360 seam joins).
    totals = {}
    for t, p in zip(truths, preds):
        for name, c in events.event_scores(p, t, tuple(result["classes"])).items():
            totals[name] = {k: totals.get(name, {}).get(k, 0) + v for k, v in c.items()}
    assert {n: {k: e[k] for k in ("true", "predicted", "matched")}
            for n, e in result["events"].items()} == totals
    assert sum(c["true"] for c in totals.values()) > 0
    skill = events.detection_skill(totals)
    assert all(result["events"][n][k] == skill[n][k] for n in skill for k in skill[n])


def test_two_ranks_give_the_single_rank_result(tiny_root, tiny_model, tmp_path, monkeypatch):
    """Each rank scores files[r::2]; the sum over ranks (one allreduce) is the global result."""
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    single = evaluate.score(ckpt, tiny_root, batch_size=1)

    sent = {}  # rank 1's tensor of each allreduce, by name; rank 0's sum adds its own
    monkeypatch.setattr(dist, "size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "allreduce_sum", lambda t, name: sent.setdefault(name, t.clone()))
    rank1 = evaluate.score(ckpt, tiny_root, batch_size=1)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "allreduce_sum", lambda t, name: t + sent[name])
    rank0 = evaluate.score(ckpt, tiny_root, batch_size=1)
    assert sorted(sent) == ["eval_counts", "event_counts"]  # the pixel and the event counts
    assert rank1["samples"] == 1
    assert rank0["events"] == single["events"]
    assert rank0["confusion"] == single["confusion"]
    assert rank0["eval_accuracy"] == pytest.approx(single["eval_accuracy"])
    assert rank0["samples"] == single["samples"] == 2


def test_incompatible_checkpoint_names_the_keys(tiny_root, tiny_model, tmp_path, capsys):
    state = TinyNet(in_channels=4).state_dict()          # first conv: 4 inputs, not 16
    state["head.weight"] = torch.zeros(1)                 # unexpected
    del state["body.3.bias"]                              # missing
    ckpt = make_checkpoint(tmp_path / "bad.pt", tiny_root, state=state)
    files = list_files(tiny_root / "test")
    code = predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"),
                         str(files[0])])
    assert code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith("climseg predict: error: ") and str(ckpt) in message
    assert "1 missing keys (body.3.bias)" in message
    assert "1 unexpected keys (head.weight)" in message
    assert "body.0.weight (8, 4, 3, 3) vs model (8, 16, 3, 3)" in message

    renamed = {f"old.{k}": v for k, v in TinyNet().state_dict().items()}  # 9 keys
    with pytest.raises(CheckpointError, match=r"9 missing keys \(.* and 4 more\)"):
        inference.check_state_dict(TinyNet(), renamed, "x.pt")


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_missing_or_foreign_checkpoint_exits_2(tiny_root, tmp_path, capsys, content):
    ckpt = tmp_path / "c.pt"
    if content is not None:
        ckpt.write_bytes(content)
    code = evaluate.main(["--checkpoint", str(ckpt), "--data", str(tiny_root)])
    assert code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert str(ckpt) in message


def test_checkpoint_config_is_read_back_into_the_typed_config(tiny_root, tiny_model, tmp_path):
    # A run from an older version wrote fewer keys: this version's defaults fill them in,
    # and the values it did write are kept (not restated defaults).
    ckpt = make_checkpoint(tmp_path / "old.pt", tiny_root, overrides=["data.crop=[32, 48]"])
    stored = torch.load(ckpt, weights_only=True)
    del stored["config"]["data"]["validation_crop"], stored["config"]["train"]
    save_checkpoint(stored, ckpt)
    _, cfg = inference.load_model(ckpt)
    assert cfg.data.crop == [32, 48] and cfg.data.validation_crop is None
    assert cfg.train.local_batch_size == 1 and inference.run_field(cfg) == (32, 48)


def test_a_run_validated_in_tiles_is_run_in_those_tiles():
    """data.validation_tile (validation of whole fields in tiles) is what evaluate and predict
    tile with too, before the validation or training crop."""
    cfg = load_config(None, ["data.root=x", "data.crop=[32, 48]",
                             "data.validation_crop=[64, 96]", "data.validation_tile=[32, 48]"])
    assert inference.run_field(cfg) == (32, 48)


@pytest.mark.parametrize("key, value, message", [
    ("model", {"name": "tiny", "num_classes": 1}, "model.num_classes: must be at least 2"),
    ("data", {"root": "x", "no_such_key": 1}, "data.no_such_key: unknown key"),
])
def test_invalid_checkpoint_config_is_one_line_naming_file_and_key(
        tiny_root, tiny_model, tmp_path, capsys, key, value, message):
    ckpt = make_checkpoint(tmp_path / "bad.pt", tiny_root)
    stored = torch.load(ckpt, weights_only=True)
    stored["config"][key] = value
    save_checkpoint(stored, ckpt)
    code = evaluate.main(["--checkpoint", str(ckpt), "--data", str(tiny_root)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(ckpt) in line and message in line


def test_four_class_run_is_scored_over_its_own_classes(tiny_root, tiny_model, tmp_path):
    # The class count and names come from the run's config, not from a hard-coded triple.
    names = ["calm", "cyclone", "river", "front"]
    ckpt = make_checkpoint(tmp_path / "four.pt", tiny_root, overrides=[
        "model.num_classes=4", f"model.class_names={names}",
        "loss.class_frequencies=[0.7, 0.1, 0.1, 0.1]"])
    result = evaluate.score(ckpt, tiny_root, batch_size=1)
    assert len(result["confusion"]) == 4 and len(result["per_class_iou"]) == 4
    assert result["classes"] == names
    assert sum(map(sum, result["confusion"])) == 2 * 64 * 96
    files = list_files(tiny_root / "test")[:1]
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "p"),
                         *map(str, files)]) == 0
    with h5py.File(tmp_path / "p" / f"{files[0].stem}-mask.h5", "r") as h:
        assert h["climate"].attrs["class_names"] == ",".join(names)
        assert h[predict.PREDICTION_KEY][...].max() <= 3


def test_evaluate_prints_the_table_on_stdout_and_logs_on_stderr(tiny_root, tiny_model,
                                                                tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    # --output and its older spelling --out write the same JSON
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tiny_root),
                          "--output", str(tmp_path / "a.json")]) == 0
    out, err = capsys.readouterr()
    assert "mean IoU" in out and CLASS_NAMES[1] in out and "mean IoU" not in err
    assert "wrote " in err and "wrote " not in out
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tiny_root), "--quiet",
                          "--out", str(tmp_path / "b.json")]) == 0
    out, err = capsys.readouterr()
    assert "mean IoU" in out and err == ""
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["confusion"] == b["confusion"] and a["samples"] == 2


def test_unlabelled_file_gets_a_prediction_only_map(tiny_root, tiny_model, tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    with h5py.File(list_files(tiny_root / "test")[0], "r") as h:
        data = h[DATA_KEY][...]
    src = tmp_path / "new-sample.h5"
    with h5py.File(src, "w") as h:
        h.create_dataset(DATA_KEY, data=data)
    out = tmp_path / "pred"
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out), str(src)]) == 0
    with h5py.File(out / "new-sample-mask.h5", "r") as h:
        assert h[predict.PREDICTION_KEY].shape == (64, 96)
        assert predict.PROBABILITIES_KEY not in h
    png = (out / "new-sample.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == round(PANEL_SIZE[0] * DPI)


@pytest.fixture(scope="module")
def real_checkpoint(tiny_root, tmp_path_factory):
    """A randomly initialised DeepLabv3+ checkpoint, stored in bf16 (as any precision may be)."""
    config = load_config(None, [f"data.root={tiny_root}"]).to_dict()
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in build_model(**_model_kwargs(config)).state_dict().items()}
    path = tmp_path_factory.mktemp("real") / "bf16.pt"
    save_checkpoint({"model": state, "config": config, "step": 1}, path)
    return path, state, config


def test_real_model_checkpoint_in_bf16_loads_on_cpu(real_checkpoint):
    path, state, config = real_checkpoint
    loaded, cfg = inference.load_model(path, "cpu")
    assert not loaded.training and cfg.to_dict()["model"] == config["model"]
    assert next(loaded.parameters()).dtype == torch.float32
    key = next(iter(state))
    torch.testing.assert_close(loaded.state_dict()[key], state[key].float())
    spec = inference.input_spec(cfg)
    assert spec.channels == list(range(16)) and spec.shift.shape == (16,) and spec.crop is None


def test_evaluate_under_horovodrun_matches_one_process(real_checkpoint, tiny_root, tmp_path,
                                                      horovod):
    path, _, _ = real_checkpoint
    out = tmp_path / "hvd.json"
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
           "climseg.evaluate", "--checkpoint", str(path), "--data", str(tiny_root),
           "--batch-size", "1", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the ranks, for bit-identical logits
    try:
        one = evaluate.score(path, tiny_root, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert two["ranks"] == 2 and two["samples"] == one["samples"] == 2
    assert two["confusion"] == one["confusion"]
    assert two["eval_accuracy"] == pytest.approx(one["eval_accuracy"])


def test_evaluate_scores_the_whole_field_and_names_any_crop(tiny_root, tiny_model, tmp_path):
    # A run trained on 32x48 crops is scored on the whole 64x96 field, in tiles of its own size.
    ckpt = make_checkpoint(tmp_path / "crop.pt", tiny_root, overrides=["data.crop=[32, 48]"])
    whole = evaluate.score(ckpt, tiny_root, "test")
    assert (whole["field"], whole["full_field"], whole["tile"]) == ([64, 96], [64, 96], [32, 48])
    assert whole["fraction"] == 1 and whole["region"] == "the whole 64x96 field, in 32x48 tiles"
    one = evaluate.score(ckpt, tiny_root, "test", full_field=True)
    assert (one["field"], one["tile"]) == ([64, 96], None)
    assert one["region"] == "the whole 64x96 field, in one piece"
    crop = evaluate.score(ckpt, tiny_root, "test", crop=(48, 64))
    assert (crop["field"], crop["tile"]) == ([48, 64], [32, 48])
    assert crop["fraction"] == pytest.approx(0.5)
    assert crop["region"] == ("only the centred 48x64 crop of the 64x96 field (50.0 % of it), "
                              "in 32x48 tiles")
    # --tile: the run's own tile gives the default's counts; one covering the field, one
    # piece's; another size is named
    assert evaluate.score(ckpt, tiny_root, "test", tile=(32, 48))["confusion"] == \
        whole["confusion"]
    covering = evaluate.score(ckpt, tiny_root, "test", tile=(64, 96))
    assert covering["tile"] is None and covering["confusion"] == one["confusion"]
    rows = evaluate.score(ckpt, tiny_root, "test", tile=(32, 96))
    assert rows["tile"] == [32, 96] and rows["region"] == "the whole 64x96 field, in 32x96 tiles"
    ckpt = make_checkpoint(tmp_path / "val.pt", tiny_root,
                           overrides=["data.crop=[32, 48]", "data.validation_crop=[48, 96]"])
    assert evaluate.score(ckpt, tiny_root, "test")["tile"] == [48, 96]


def test_predict_tile_runs_the_field_in_those_tiles(tiny_root, tiny_model, tmp_path):
    ckpt = make_checkpoint(tmp_path / "crop.pt", tiny_root, overrides=["data.crop=[32, 48]"])
    (sample,) = list_files(tiny_root / "test")[:1]
    masks = {}
    for name, extra in (("own", []), ("tile", ["--tile", "32", "48"]),
                        ("covering", ["--tile", "64", "96"]), ("one", ["--full-field"])):
        assert predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / name),
                             "--quiet", *extra, str(sample)]) == 0
        with h5py.File(tmp_path / name / f"{sample.stem}-mask.h5", "r") as h:
            masks[name] = h[predict.PREDICTION_KEY][...]
    np.testing.assert_array_equal(masks["tile"], masks["own"])
    np.testing.assert_array_equal(masks["covering"], masks["one"])
    assert (masks["own"] != masks["one"]).any()  # tiles and one piece do differ here


@pytest.mark.parametrize("command", [evaluate, predict])
@pytest.mark.parametrize("extra, message", [
    (["--tile", "30", "48"], "--tile: sides must be positive multiples of 16, got 30 48"),
    (["--tile", "32", "48", "--full-field"], "--tile and --full-field: choose one"),
])
def test_bad_tiles_are_one_line(command, extra, message, tiny_root, tiny_model, tmp_path,
                                capsys):
    ckpt = make_checkpoint(tmp_path / "crop.pt", tiny_root, overrides=["data.crop=[32, 48]"])
    (sample,) = list_files(tiny_root / "test")[:1]
    args = {evaluate: ["--checkpoint", str(ckpt), "--data", str(tiny_root)],
            predict: ["--checkpoint", str(ckpt), "--output", str(tmp_path / "out"),
                      str(sample)]}[command]
    assert command.main([*args, "--quiet", *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line and line.startswith("climseg ")


class Background(nn.Module):
    """Predicts background everywhere: a 1x1 convolution with zero weights, bias (4, 0, 0)."""

    def __init__(self, in_channels: int = 16, num_classes: int = 3):
        super().__init__()
        self.head = nn.Conv2d(in_channels, num_classes, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([4.0] + [0.0] * (num_classes - 1)))

    def forward(self, x):
        return self.head(x)


def test_a_crop_and_the_whole_field_score_what_each_covers(tiny_root, tmp_path, monkeypatch,
                                                           capsys):
    # Hand-made truth: cyclone pixels only in the 8 southernmost rows, outside the centred
    # 32x48 crop (rows 16-47). A model that predicts background everywhere is perfect on the
    # crop and misses every cyclone on the whole field: IoU 1 there, 0 here.
    monkeypatch.setitem(deeplab.MODELS, "background", Background)
    monkeypatch.setattr(config_module, "MODEL_NAMES", (*config_module.MODEL_NAMES, "background"))
    root = tmp_path / "root"
    (root / "test").mkdir(parents=True)
    shutil.copy(tiny_root / "stats.h5", root / "stats.h5")
    for f in list_files(tiny_root / "test"):
        data, _ = read_sample(f)
        labels = np.zeros(data.shape[:2], np.uint8)
        labels[:8] = 1
        write_sample(root / "test" / f.name, data, labels)
    ckpt = make_checkpoint(tmp_path / "bg.pt", root, name="background",
                           overrides=["data.crop=[32, 48]"])
    out = tmp_path / "crop.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root), "--crop", "32", "48",
                          "--output", str(out)]) == 0
    crop = json.loads(out.read_text())
    assert crop["confusion"] == [[2 * 32 * 48, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert crop["per_class_iou"] == [1.0, None, None]
    assert ("scored: only the centred 32x48 crop of the 64x96 field (25.0 % of it), in one "
            "piece") in capsys.readouterr().out
    whole = evaluate.score(ckpt, root, "test")
    assert whole["confusion"] == [[2 * 56 * 96, 0, 0], [2 * 8 * 96, 0, 0], [0, 0, 0]]
    assert whole["per_class_iou"] == [pytest.approx(56 / 64), 0.0, None]


def test_tile_offsets_cover_the_field_with_half_overlap():
    assert inference._tile_starts(192, 96) == [0, 48, 96]
    assert inference._tile_starts(100, 96) == [0, 4]
    assert inference._tile_starts(96, 96) == [0]
    assert inference._tile_starts(288, 144) == [0, 72, 144]


def test_tiled_prediction_of_a_per_pixel_model_equals_the_whole_field():
    # A 1x1 convolution sees one pixel at a time, so tiling must not change its output;
    # a 5x7 tile grid over 64x96 (with overlaps and an edge-aligned last tile) is averaged.
    torch.manual_seed(3)
    model = nn.Conv2d(16, 3, 1).eval()
    prec = Precision.build(torch.device("cpu"), "fp32", False)
    x = torch.randn(2, 16, 64, 96)
    whole = inference.predict_probabilities(model, x, prec)
    tiled = inference.predict_probabilities(model, x, prec, tile=(32, 32), tiles_per_batch=5)
    assert tiled.shape == whole.shape == (2, 3, 64, 96)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", [evaluate, predict])
def test_a_failed_distributed_start_is_one_line(command, tiny_root, tmp_path, monkeypatch,
                                                capsys):
    def broken_init():
        raise RuntimeError("the launcher started 2 ranks but Horovod sees 1: rebuild")

    monkeypatch.setattr(dist, "init", broken_init)
    args = {evaluate: ["--checkpoint", "x.pt", "--data", str(tiny_root)],
            predict: ["--checkpoint", "x.pt", "--output", str(tmp_path), "f.h5"]}[command]
    assert command.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"climseg {command.__name__.split('.')[-1]}: error: the launcher started "
                    "2 ranks but Horovod sees 1: rebuild")


def test_netcdf_masks_open_in_xarray_on_the_grid_and_match_the_hdf5_masks(
        tiny_root, tiny_model, tmp_path):
    xr = pytest.importorskip("xarray")  # a test dependency (requirements.txt, "# tests")
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root, overrides=["data.crop=[32, 48]"])
    dated = list_files(tiny_root / "test")[0]
    undated = tmp_path / "field.h5"  # a name without a time: no time axis
    shutil.copy(dated, undated)
    files = [str(dated), str(undated)]
    h5_out, nc_out = tmp_path / "h5", tmp_path / "nc"
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(h5_out),
                         "--probabilities", *files]) == 0
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(nc_out), "--format",
                         "netcdf", "--probabilities", *files]) == 0
    for f, time in ((dated, netcdf.sample_time(dated)), (undated, None)):
        with h5py.File(h5_out / f"{f.stem}-mask.h5", "r") as h:
            mask, probs = h[predict.PREDICTION_KEY][...], h[predict.PROBABILITIES_KEY][...]
        with xr.open_dataset(nc_out / f"{f.stem}-mask.nc") as ds:
            ds.load()
        cm = ds["class_mask"]
        assert cm.dtype == np.int8 and cm.dims == ((("time",) if time else ()) + ("lat", "lon"))
        np.testing.assert_array_equal(cm.values.reshape(mask.shape), mask)
        assert list(cm.attrs["flag_values"]) == [0, 1, 2]
        assert cm.attrs["flag_meanings"] == "background tropical_cyclone atmospheric_river"
        prob = ds["probability"].values.reshape(3, 64, 96)
        np.testing.assert_allclose(prob, np.moveaxis(probs.astype(np.float32), -1, 0),
                                   atol=1e-3)
        # centred cells: row 0 is 180/64 degrees wide from the south pole; column 0 from 0°E
        np.testing.assert_allclose(ds["lat"], -90 + (np.arange(64) + 0.5) * 180 / 64)
        np.testing.assert_allclose(ds["lon"], (np.arange(96) + 0.5) * 360 / 96)
        assert ds["lat"].attrs["units"] == "degrees_north"
        assert ds["lon"].attrs["units"] == "degrees_east"
        np.testing.assert_allclose(ds["lat_bnds"][[0, -1]], [[-90, -90 + 180 / 64],
                                                             [90 - 180 / 64, 90]])
        if time:
            assert ds["time"].values[0] == np.datetime64(time)
        else:
            assert "time" not in ds.dims
        assert ds.attrs["Conventions"] == "CF-1.8"
        assert ds.attrs["checkpoint"] == str(ckpt) and ds.attrs["input_file"] == str(f)
        assert ds.attrs["climseg_version"] == climseg.__version__
        cfg = inference.read_checkpoint(ckpt)[1]
        assert ds.attrs["config_sha256"] == inference.config_hash(cfg)
        assert ds.attrs["region"] == "the whole 64x96 field, in 32x48 tiles"
    assert not [p for p in nc_out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_sample_times_come_from_the_file_name():
    # As in DeepCAM (docs/data.md), HH is the 3-hourly step of the day: 07 is 21:00.
    assert netcdf.sample_time("x/data-2100-01-04-07-1.h5") == dt.datetime(2100, 1, 4, 21)
    assert netcdf.sample_time("data-2100-01-04-00-3.h5") == dt.datetime(2100, 1, 4, 0)
    assert netcdf.sample_time("data-2011-06-01-01-1_0.h5") == dt.datetime(2011, 6, 1, 3)
    assert netcdf.sample_time("data-2100-01-04-08-1.h5") is None  # no step 8 in a day
    assert netcdf.sample_time("data-2100-02-30-00-1.h5") is None  # no such day
    assert netcdf.sample_time("field.h5") is None


def test_the_cam5_grid_is_0_234_by_0_3125_degrees_with_centred_cells():
    g = grid.regular_grid(768, 1152)
    np.testing.assert_allclose(np.diff(g.lat), 180 / 768)
    np.testing.assert_allclose(np.diff(g.lon), 0.3125)
    assert g.lat[0] == pytest.approx(-90 + 0.1171875) and g.lat[-1] == pytest.approx(-g.lat[0])
    assert g.lon[0] == pytest.approx(0.15625)
    np.testing.assert_array_equal(g.lat_bounds[1:, 0], g.lat_bounds[:-1, 1])  # no gaps
    assert (g.lon_bounds[0, 0], g.lon_bounds[-1, 1]) == (0, 360)
