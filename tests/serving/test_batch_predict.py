"""``kubeseg predict`` (batch prediction) against the real server: every output is what
``POST /invocations`` answers for that image, for a folder and for an s3:// prefix; a killed
run finishes only the rest when run again; bad images are reported, not fatal."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serving_support import MAX_IMAGE_PIXELS, MAX_PIXELS, TILE_SIZE, encode, random_image

from kubeseg import storage
from kubeseg.serving.batch import SUMMARY_FILE, BatchOptions, batch_predict, output_key
from kubeseg.errors import ConfigError
from kubeseg.serving import codecs

REPO = Path(__file__).resolve().parents[2]
BATCH_OPTIONS = BatchOptions(max_pixels=MAX_PIXELS, tile_size=TILE_SIZE,
                             max_image_pixels=MAX_IMAGE_PIXELS, progress=False)
SERVER_FLAGS = ["--max-pixels", str(MAX_PIXELS), "--tile-size", str(TILE_SIZE),
                "--max-image-pixels", str(MAX_IMAGE_PIXELS)]
BROKEN = {
    "broken/truncated.jpg": lambda: encode(random_image(32, 32, seed=99))[:200],
    "broken/not-an-image.png": lambda: b"this is text, not a PNG",
    "broken/empty.jpg": lambda: b"",
}


def _sizes(i: int):
    # mostly small; some scored with a sliding window (side > 48) or downscaled (> 64 x 64 px)
    if i % 50 == 7:
        return 96, 72
    if i % 25 == 3:
        return 56, 40
    return 32, 32


def write_images(put, count: int, seed: int = 0):
    """``count`` images (JPEG and PNG, some in subfolders); ``put(key, bytes)`` stores one."""
    keys = []
    for i in range(count):
        width, height = _sizes(i)
        fmt = "PNG" if i % 4 == 0 else "JPEG"
        key = f"{'part-b/' if i % 3 == 0 else ''}img_{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        put(key, encode(random_image(width, height, seed=seed + i), fmt))
        keys.append(key)
    return keys


def _local_put(root: Path):
    def put(key, data):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return put


def invocations(server, data: bytes, key: str, accept: str = "image/png") -> bytes:
    content_type = "image/png" if key.endswith(".png") else "image/jpeg"
    response = requests.post(server.url + "/invocations", data=data, timeout=60,
                             headers={"Content-Type": content_type, "Accept": accept})
    assert response.status_code == 200, (key, response.text)
    return response.content


def assert_masks_match_server(server, keys, read_input, read_output):
    for key in keys:
        expected = invocations(server, read_input(key), key)
        produced = read_output(output_key(key, "image/png"))
        assert np.array_equal(codecs.decode_png_mask(produced),
                              codecs.decode_png_mask(expected)), key
        assert produced == expected, key  # the same encoder: the same bytes


# -- a folder of 200+ images -------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-in")
    keys = write_images(_local_put(root), 210)
    for key, make in BROKEN.items():
        _local_put(root)(key, make())
    (root / "README.txt").write_text("not an image")
    return root, keys


def test_folder_masks_match_invocations_pixel_for_pixel(server, model_uri, folder, tmp_path):
    root, keys = folder
    out = tmp_path / "masks"
    summary = batch_predict(model_uri, str(root), str(out), batch_size=8,
                            options=BATCH_OPTIONS)
    assert summary["scored"] == len(keys) == 210
    assert summary["failed"] == len(BROKEN) and summary["skipped_existing"] == 0
    assert summary["ignored_not_images"] == 1
    assert summary["mean_batch"] > 1  # images were scored together
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    # bad images are reported with their keys, and nothing is written for them
    assert sorted(f["key"] for f in summary["failures"]) == sorted(BROKEN)
    assert all(f["error"] for f in summary["failures"])
    for key in BROKEN:
        assert not (out / output_key(key, "image/png")).exists()
    assert_masks_match_server(server, keys, lambda k: (root / k).read_bytes(),
                              lambda k: (out / k).read_bytes())
    sizes = {Image.open(out / output_key(k, "image/png")).size for k in keys}
    assert {(32, 32), (56, 40), (96, 72)} <= sizes


def test_probabilities_and_json_match_invocations(server, model_uri, folder, tmp_path):
    root, keys = folder
    subset = [k for k in keys if k.startswith("part-b/")][:12] + ["img_0007.jpg"]
    manifest = tmp_path / "subset.manifest"
    manifest.write_text(json.dumps([{"prefix": str(root) + "/"}, *subset]))
    out = tmp_path / "probs"
    accept = "application/x-recordio-protobuf"
    summary = batch_predict(model_uri, str(manifest), str(out), manifest=True, accept=accept,
                            options=BATCH_OPTIONS)
    assert summary["scored"] == len(subset) and summary["failed"] == 0
    for key in subset:
        expected = codecs.decode_probabilities_recordio(
            invocations(server, (root / key).read_bytes(), key, accept))
        produced = codecs.decode_probabilities_recordio(
            (out / output_key(key, accept)).read_bytes())
        assert produced.shape == expected.shape
        np.testing.assert_allclose(produced, expected, atol=1e-5)
    out = tmp_path / "json"
    batch_predict(model_uri, str(manifest), str(out), manifest=True,
                  accept="application/json", options=BATCH_OPTIONS)
    for key in subset[:3]:
        expected = json.loads(invocations(server, (root / key).read_bytes(), key,
                                          "application/json"))
        produced = json.loads((out / output_key(key, "application/json")).read_text())
        assert produced == expected


# -- an s3:// prefix ---------------------------------------------------------------------------
def test_s3_prefix_masks_match_invocations(server, model_uri, bucket):
    keys = write_images(lambda k, d: storage.write_bytes(f"{bucket}/in/{k}", d), 24, seed=500)
    storage.write_bytes(f"{bucket}/in/broken/truncated.jpg", BROKEN["broken/truncated.jpg"]())
    summary = batch_predict(model_uri, f"{bucket}/in", f"{bucket}/out", batch_size=4,
                            options=BATCH_OPTIONS)
    assert (summary["scored"], summary["failed"]) == (24, 1)
    assert summary["failures"][0]["key"] == "broken/truncated.jpg"
    assert_masks_match_server(server, keys,
                              lambda k: storage.read_bytes(f"{bucket}/in/{k}"),
                              lambda k: storage.read_bytes(f"{bucket}/out/{k}"))
    listed = storage.list_files(f"{bucket}/out")
    assert sorted(listed) == sorted([output_key(k, "image/png") for k in keys] + [SUMMARY_FILE])
    # a rerun into the same prefix finds every output there and scores nothing again
    again = batch_predict(model_uri, f"{bucket}/in", f"{bucket}/out", options=BATCH_OPTIONS)
    assert (again["scored"], again["skipped_existing"], again["failed"]) == (0, 24, 1)
    # an augmented manifest (source-ref): outputs keyed by the object's path in its bucket
    lines = [json.dumps({"source-ref": f"{bucket}/in/{k}"}) for k in keys[:5]]
    storage.write_text(f"{bucket}/batch.manifest", "\n".join(lines) + "\n")
    again = batch_predict(model_uri, f"{bucket}/batch.manifest", f"{bucket}/by-manifest",
                          manifest=True, options=BATCH_OPTIONS)
    assert again["scored"] == 5
    for k in keys[:5]:
        assert storage.exists(f"{bucket}/by-manifest/in/{output_key(k, 'image/png')}")


# -- kill and rerun ----------------------------------------------------------------------------
def _cli(model_uri, source, output, *extra):
    return [sys.executable, "-m", "kubeseg", "predict", str(model_uri), "--input", str(source),
            "--output", str(output), "--device", "cpu", "--no-progress", *SERVER_FLAGS, *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _outputs(folder: Path):
    return sorted(p for p in folder.rglob("*.png") if not p.name.startswith("."))


@pytest.mark.slow
def test_rerun_after_a_kill_finishes_only_the_rest(model_uri, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    keys = write_images(_local_put(source), 240, seed=1000)
    # one image at a time, so the run is still going when it is killed
    proc = subprocess.Popen(_cli(model_uri, source, out, "--batch-size", "1", "--workers", "1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_outputs(out)) < 30 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + \
            proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    written = _outputs(out)
    assert 30 <= len(written) < len(keys)
    for path in written:  # atomic writes: every visible output is whole
        assert codecs.decode_png_mask(path.read_bytes()).shape[0] > 0
    before = {p: p.stat().st_mtime_ns for p in written}
    assert not (out / SUMMARY_FILE).exists()

    rerun = subprocess.run(_cli(model_uri, source, out), env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["skipped_existing"] == len(written)
    assert summary["scored"] == len(keys) - len(written)
    assert summary["failed"] == 0
    assert len(_outputs(out)) == len(keys)
    assert {p: p.stat().st_mtime_ns for p in written} == before  # not written again


# -- options -----------------------------------------------------------------------------------
def test_bad_options_name_the_option(model_uri, tmp_path):
    with pytest.raises(ConfigError) as err:
        batch_predict(model_uri, str(tmp_path), str(tmp_path / "o"), accept="image/tiff",
                      batch_size=0, options=BatchOptions(progress=False))
    text = str(err.value)
    assert "--accept 'image/tiff'" in text and "image/png" in text
    assert "batch_size=0" in text
    for output in (str(tmp_path) + "/", str(tmp_path / "masks")):
        with pytest.raises(ConfigError, match="is inside the input"):
            batch_predict(model_uri, str(tmp_path), output, options=BatchOptions(progress=False))
    with pytest.raises(ConfigError, match="is inside the input"):
        batch_predict(model_uri, "s3://data/photos", "s3://data/photos/masks",
                      options=BatchOptions(progress=False))


def test_two_inputs_with_one_output_name_are_reported(model_uri, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    image = random_image(32, 32)
    (source / "a.jpg").write_bytes(encode(image, "JPEG"))
    (source / "a.png").write_bytes(encode(image, "PNG"))
    summary = batch_predict(model_uri, str(source), str(tmp_path / "out"),
                            options=BATCH_OPTIONS)
    assert summary["scored"] == 1 and summary["failed"] == 1
    assert "a.png" in summary["failures"][0]["error"]
    assert Image.open(io.BytesIO((tmp_path / "out" / "a.png").read_bytes())).mode == "L"
