"""Keeping production images: what is kept (low-confidence images always, others at the rate),
the stored layout (four channels and an augmented manifest that ``kubeseg ingest`` reads back
with the class names), the size budget, and failures that are counted, never raised: an
unwritable prefix, and an S3 endpoint that never answers while the queue fills. The real server
with ``--keep-images`` keeps what it served."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from kubeseg.monitoring import alerts, drift
from kubeseg.serving.keep import LABEL_ATTRIBUTE, ImageKeeper, KeepSettings
from serving_support import CLASS_NAMES, encode, random_image

LOW = np.zeros(drift.CONFIDENCE_BINS, dtype=np.int64)
LOW[3] = 100  # every pixel below 0.5
HIGH = np.zeros(drift.CONFIDENCE_BINS, dtype=np.int64)
HIGH[19] = 100


def _mask(height=24, width=32):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2:] = 2
    mask[: height // 3] = 1
    return mask


def _wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the condition did not hold in time")


def test_low_confidence_images_are_kept_in_the_four_channel_layout_with_a_manifest(tmp_path):
    out = tmp_path / "kept"
    keeper = ImageKeeper(KeepSettings(uri=str(out)), model_name="shapes",
                         class_names=CLASS_NAMES, seed=0)
    jpeg = encode(random_image(32, 24, seed=1))
    keeper.offer(jpeg, _mask(), LOW)
    keeper.offer(encode(random_image(32, 24, seed=2)), _mask(), HIGH)  # rate 0: not kept
    pixels = np.asarray(random_image(32, 24, seed=3))
    keeper.offer(pixels, _mask(), LOW)  # a v2 pixel input: stored as PNG
    keeper.close()
    assert keeper.kept == {"sampled": 0, "low_confidence": 2}
    (part,) = (out / "manifests").iterdir()
    lines = [json.loads(line) for line in part.read_text().splitlines()]
    images = [Path(line["source-ref"]) for line in lines]  # in the order kept
    masks = [Path(line[LABEL_ATTRIBUTE]) for line in lines]
    assert sorted((out / "train").iterdir()) == sorted(images)
    assert sorted((out / "train_annotation").iterdir()) == sorted(masks)
    assert [p.suffix for p in images] == [".jpg", ".png"]
    assert [p.parent.name for p in masks] == ["train_annotation"] * 2
    assert [p.stem for p in images] == [p.stem for p in masks]
    assert images[0].read_bytes() == jpeg
    assert np.array_equal(np.asarray(Image.open(images[1])), pixels)
    stored = Image.open(masks[0])
    assert stored.mode == "P" and np.array_equal(np.asarray(stored), _mask())
    metadata = lines[0][f"{LABEL_ATTRIBUTE}-metadata"]
    assert metadata["type"] == "groundtruth/semantic-segmentation"
    assert [metadata["internal-color-map"][str(i)]["class-name"] for i in range(3)] == \
        CLASS_NAMES
    assert lines[0]["kubeseg-kept"]["reason"] == "low_confidence"
    assert keeper.stored_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_the_manifest_is_ready_for_the_next_training_run(tmp_path):
    """kubeseg ingest reads it back: the class names from the colour map, the masks' classes."""
    out = tmp_path / "kept"
    keeper = ImageKeeper(KeepSettings(uri=str(out), rate=1.0), model_name="shapes",
                         class_names=CLASS_NAMES, seed=0)
    for seed in range(3):
        keeper.offer(encode(random_image(32, 24, seed=seed)), _mask(), HIGH)
    keeper.close()
    assert keeper.kept["sampled"] == 3
    (part,) = (out / "manifests").iterdir()
    result = subprocess.run([sys.executable, "-m", "kubeseg", "ingest", "--manifest", str(part),
                             "--split", "train", "--output", str(tmp_path / "shards")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["class_names"] == CLASS_NAMES
    assert index["splits"]["train"]["num_samples"] == 3
    assert index["splits"]["train"]["unknown_colour_pixels"] == 0


def test_the_budget_bounds_the_prefix(tmp_path):
    out = tmp_path / "kept"
    (out / "train").mkdir(parents=True)
    (out / "train" / "old.jpg").write_bytes(b"x" * (2 << 20))  # 2 MiB already there
    keeper = ImageKeeper(KeepSettings(uri=str(out), rate=1.0, budget_mib=1),
                         model_name="shapes", class_names=CLASS_NAMES, seed=0)
    keeper.offer(encode(random_image(32, 24)), _mask(), HIGH)
    keeper.close()
    assert keeper.dropped["budget"] == 1 and keeper.kept["sampled"] == 0
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["old.jpg"]


def test_a_failed_write_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    keeper = ImageKeeper(KeepSettings(uri=str(blocker / "kept"), rate=1.0),
                         model_name="shapes", class_names=CLASS_NAMES, seed=0)
    keeper.offer(encode(random_image(32, 24)), _mask(), HIGH)
    keeper.close()
    assert keeper.dropped["error"] == 1 and keeper.kept["sampled"] == 0


class _SilentEndpoint:
    """A loopback socket that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_stalled_store_fills_the_queue_and_drops_new_images(monkeypatch):
    endpoint = _SilentEndpoint()
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "MINIO_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KUBESEG_S3_ENDPOINT", endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("KUBESEG_S3_TIMEOUT", "2")
    try:
        keeper = ImageKeeper(KeepSettings(uri="s3://kept/prod", rate=1.0, queue=1),
                             model_name="shapes", class_names=CLASS_NAMES, seed=0)
        for seed in range(5):  # the writer holds at most one, the queue one more
            keeper.offer(encode(random_image(16, 16, seed=seed)), _mask(16, 16), HIGH)
        assert keeper.dropped["queue_full"] >= 3
        keeper.close(timeout_s=60)
        assert keeper.dropped["error"] >= 1 and keeper.kept["sampled"] == 0
        assert sum(keeper.dropped.values()) == 5
    finally:
        endpoint.close()


def _kept_series(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics",
                                                              timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("kubeseg_kept"):
                out[(sample.name, sample.labels.get("reason"))] = sample.value
    return out


def _kept(url: str, kept: bool) -> float:
    series = _kept_series(url)
    if kept:
        return sum(v for (name, _), v in series.items() if name == alerts.KEPT_IMAGES)
    return series.get((alerts.KEPT_DROPPED, "error"), 0)


@pytest.mark.slow  # starts its own server
def test_the_server_keeps_what_it_served_and_never_fails_for_it(model_uri, tmp_path):
    import os

    from kubeseg.serving.process import model_server
    from serving_support import free_port

    kept = tmp_path / "kept"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for uri, expect_kept in ((kept, True), (blocker / "kept", False)):
        with model_server(model_uri, free_port(), log_path=tmp_path / f"{expect_kept}.log",
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          args=["--model-name", "shapes", "--threads", "1", "--keep-images",
                                str(uri), "--keep-rate", "1"]) as running:
            for seed in range(2):
                response = requests.post(running.url + "/invocations", timeout=60,
                                         data=encode(random_image(40, 32, seed=seed)),
                                         headers={"Content-Type": "image/jpeg"})
                assert response.status_code == 200
            # kept at the rate, or as low-confidence images (this random model is unsure)
            _wait_for(lambda: _kept(running.url, expect_kept) == 2)
    assert len(list((kept / "train").iterdir())) == 2
    assert len(list((kept / "train_annotation").iterdir())) == 2
    assert Path(blocker).read_text() == "x"
