"""Confusion-matrix metrics: hand-computed cases, the absent-class rule, and agreement with
torchmetrics (an independent implementation) on random data."""
import json
import math
import subprocess
import sys

import pytest
import torch

from kubeseg.config import IGNORE_INDEX
from kubeseg.metrics import ConfusionMatrix, metrics_from_matrix
from s3server import free_port

torchmetrics = pytest.importorskip("torchmetrics")


def _hand_case():
    # kept pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is ignored
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    return pred, target


def test_matrix_rows_are_ground_truth_and_columns_prediction():
    pred, target = _hand_case()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_hand_computed_metrics():
    pred, target = _hand_case()
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    m = cm.compute()
    # IoU: class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 0 / (1 + 0 - 0)
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert m["mIOU"] == pytest.approx(1 / 3)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["per_class_accuracy"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert m["mean_class_accuracy"] == pytest.approx(1 / 2)
    # frequency-weighted IoU: 2/5 * 1/3 + 2/5 * 2/3 + 1/5 * 0
    assert m["fw_iou"] == pytest.approx(2 / 5)
    assert m["pixels"] == 5


def test_metrics_from_matrix_accepts_plain_lists():
    m = metrics_from_matrix([[5, 0], [0, 5]])
    assert m["mIOU"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["fw_iou"] == 1.0


def test_class_absent_from_ground_truth_and_prediction_is_nan_and_left_out_of_the_mean():
    # class 3 never occurs; class 2 is predicted once but is absent from the ground truth
    target = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 2, 1, 1, 1])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    iou = m["per_class_iou"]
    assert math.isnan(iou[3])
    assert iou[2] == 0.0  # predicted but never true: all false positives, counted as 0
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == 1.0
    assert m["mIOU"] == pytest.approx((1 / 2 + 1.0 + 0.0) / 3)
    acc = m["per_class_accuracy"]
    assert math.isnan(acc[2]) and math.isnan(acc[3])  # no ground-truth pixels
    assert m["mean_class_accuracy"] == pytest.approx((1 / 2 + 1.0) / 2)


def test_class_in_ground_truth_never_predicted_scores_zero():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]))
    m = cm.compute()
    assert m["per_class_iou"] == pytest.approx([0.5, 0.0])
    assert m["mIOU"] == pytest.approx(0.25)


def test_ignore_label_and_out_of_range_targets_are_excluded():
    cm = ConfusionMatrix(3)
    target = torch.tensor([0, 255, 3, 7, 254, -1, 1])
    pred = torch.tensor([0, 1, 1, 2, 0, 0, 1])
    cm.update(pred, target)
    assert int(cm.matrix.sum()) == 2
    assert cm.matrix[0, 0] == 1 and cm.matrix[1, 1] == 1


def test_everything_ignored_gives_nan_not_an_error():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    m = cm.compute()
    assert m["pixels"] == 0
    assert math.isnan(m["mIOU"]) and math.isnan(m["pixel_accuracy"])
    assert all(math.isnan(v) for v in m["per_class_iou"])


def test_accumulates_over_batches_like_one_big_update_and_resets():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 5, (6, 9, 11), generator=g)
    target = torch.randint(0, 5, (6, 9, 11), generator=g)
    whole, parts = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    for i in range(6):
        parts.update(pred[i], target[i])  # [H, W] updates
    assert torch.equal(whole.matrix, parts.matrix)
    parts.reset()
    assert int(parts.matrix.sum()) == 0


def test_miou_is_over_the_dataset_not_averaged_per_image():
    # image 1: class 0 everywhere, predicted right; image 2: 1 pixel of class 1, missed
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long))
    cm.update(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
    assert cm.compute()["mIOU"] == pytest.approx((10 / 11 + 0.0) / 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 3, dtype=torch.long),
                                  torch.zeros(3, 2, dtype=torch.long))


def test_matrix_lives_on_the_requested_device():
    cm = ConfusionMatrix(3, device=torch.device("cpu"))
    assert cm.matrix.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_matrix_matches_cpu_matrix():
    g = torch.Generator().manual_seed(5)
    pred = torch.randint(0, 4, (2, 16, 16), generator=g)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    cpu, gpu = ConfusionMatrix(4), ConfusionMatrix(4, device=torch.device("cuda"))
    cpu.update(pred, target)
    gpu.update(pred.cuda(), target.cuda())
    assert gpu.matrix.device.type == "cuda"
    assert torch.equal(cpu.matrix, gpu.matrix.cpu())


@pytest.mark.parametrize("seed,num_classes", [(0, 2), (1, 7), (2, 21)])
def test_agrees_with_torchmetrics_on_random_data(seed, num_classes):
    from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix,
                                             MulticlassJaccardIndex)

    g = torch.Generator().manual_seed(seed)
    shape = (4, 33, 47)
    target = torch.randint(0, num_classes, shape, generator=g)
    # predictions right about half the time, so IoUs spread over (0, 1)
    noise = torch.randint(0, num_classes, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.5, target, noise)
    target[torch.rand(shape, generator=g) < 0.1] = IGNORE_INDEX

    cm = ConfusionMatrix(num_classes)
    for i in range(shape[0]):
        cm.update(pred[i], target[i])
    ours = cm.compute()

    kw = dict(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    ref_matrix = MulticlassConfusionMatrix(**kw)(pred, target)
    assert torch.equal(cm.matrix, ref_matrix.to(torch.int64))
    ref_iou = MulticlassJaccardIndex(average="none", **kw)(pred, target)
    assert ours["per_class_iou"] == pytest.approx(ref_iou.tolist(), abs=1e-6)
    assert ours["mIOU"] == pytest.approx(
        float(MulticlassJaccardIndex(average="macro", **kw)(pred, target)), abs=1e-6)
    assert ours["pixel_accuracy"] == pytest.approx(
        float(MulticlassAccuracy(average="micro", **kw)(pred, target)), abs=1e-6)
    assert ours["mean_class_accuracy"] == pytest.approx(
        float(MulticlassAccuracy(average="macro", **kw)(pred, target)), abs=1e-6)
    assert ours["per_class_accuracy"] == pytest.approx(
        MulticlassAccuracy(average="none", **kw)(pred, target).tolist(), abs=1e-6)
    assert ours["fw_iou"] == pytest.approx(
        float(MulticlassJaccardIndex(average="weighted", **kw)(pred, target)), abs=1e-6)


def test_agrees_with_torchmetrics_when_a_class_is_absent():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(3)
    num_classes = 6
    target = torch.randint(0, 4, (3, 20, 20), generator=g)  # classes 4 and 5 never true
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, 5, target.shape, generator=g))  # 5 never predicted
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target)
    ours = cm.compute()["per_class_iou"]
    ref = MulticlassJaccardIndex(num_classes=num_classes, average="none")(pred, target).tolist()
    assert math.isnan(ours[5])
    assert ours[:5] == pytest.approx(ref[:5], abs=1e-6)  # class 4: predicted only -> 0 in both
    assert ours[4] == 0.0


_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from kubeseg.metrics import ConfusionMatrix
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=2)
cm = ConfusionMatrix(3)
cm.update(torch.tensor([rank, rank]), torch.tensor([rank, 2]))
cm.all_reduce()
print(json.dumps(cm.matrix.tolist()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_all_reduce_sums_matrices_over_ranks():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    expected = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    assert outputs == [expected, expected]


def test_all_reduce_without_a_process_group_changes_nothing():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)
