"""What the request handlers share, and the path of one request through it: decoding on an I/O
thread, admission against the memory budget, the batched forward pass, and the mask (counted
by the monitor, offered to the keeper) made on an I/O thread again.

:func:`app_state` builds it for :func:`kubeseg.serving.server.build_app`; the routes there call
:meth:`AppState.infer` (one encoded image) and :func:`infer_v2` (a v2 request's images).
"""

import asyncio
import concurrent.futures
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from kubeseg.monitoring.defaults import LOW_CONFIDENCE_BELOW
from kubeseg.serving import codecs, v2
from kubeseg.serving.admission import Admission, ServerLimits, metrics
from kubeseg.serving.keep import ImageKeeper
from kubeseg.serving.monitor import (MonitoringSettings, PredictionMonitor, export, monitor_for,
                                     training_baseline)
from kubeseg.serving.predictor import BatchRunner, SegmentationPredictor

logger = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the request handlers share: the predictor, the batch runner, the I/O threads, the
    admission of requests and the monitor of what is predicted (None: monitoring off)."""

    predictor: SegmentationPredictor
    runner: BatchRunner
    executor: concurrent.futures.ThreadPoolExecutor
    admission: Admission
    monitor: Optional[PredictionMonitor] = None
    keeper: Optional[ImageKeeper] = None

    def finish(self, logits, size: Tuple[int, int], probabilities: bool, image: Any = None):
        """Mask (and probabilities) at ``size``, counted by the monitor and offered to the
        keeper with the ``image`` as sent (on a worker thread)."""
        monitor, keeper = self.monitor, self.keeper
        prediction = self.predictor.postprocess(
            logits, size, probabilities=probabilities,
            counts=monitor is not None or keeper is not None)
        if monitor is not None:
            monitor.observe(prediction.counts, size)
        if keeper is not None:
            keeper.offer(image, prediction.mask, prediction.counts.confidence_pixels)
        return prediction

    def prepare_encoded(self, data: bytes):
        image = codecs.decode_image(data,
                                    max_image_pixels=self.admission.limits.max_image_pixels)
        return self.predictor.preprocess(image), (image.height, image.width)

    def prepare_pixels(self, pixels):
        height, width = pixels.shape[:2]
        self.admission.check_pixels(height, width)
        return self.predictor.preprocess(pixels), (height, width)

    async def infer(self, prepare, item, probabilities: bool):
        loop = asyncio.get_running_loop()
        tensor, size = await loop.run_in_executor(self.executor, prepare, item)
        if probabilities:
            self.admission.check_response_size(size)
        logits = await asyncio.wrap_future(self.runner.submit(tensor))
        return await loop.run_in_executor(self.executor, self.finish, logits, size,
                                          probabilities, item)


async def infer_v2(state: AppState, image: Tuple[str, str, Any], requested,
                   finish: Optional[Callable[[list], Any]] = None):
    """``[(output name, datatype, array)]`` for a v2 request's image input
    ``(name, datatype, array)``.

    The request's memory is held from decoding until ``finish(outputs)`` (run on a worker
    thread, e.g. to encode the response) returns; its result is returned then.
    """
    limits = state.admission.limits
    items, kind = v2.images_of(*image, max_images=limits.max_images_per_request)
    want_probs = "probabilities" in requested
    cost = state.admission.request_cost(image[0], items, kind, want_probs)
    prepare = state.prepare_encoded if kind == "encoded" else state.prepare_pixels
    async with state.admission.admit(cost):
        results = await asyncio.gather(*[state.infer(prepare, item, want_probs)
                                         for item in items])
        outputs = v2.stack_outputs(results, requested)
        del results
        if finish is None:
            return outputs
        return await asyncio.get_running_loop().run_in_executor(state.executor, finish, outputs)


def app_state(predictor: SegmentationPredictor, limits: ServerLimits,
              monitoring: MonitoringSettings) -> AppState:
    """The predictor (loaded here if it is not yet), its batch runner, the I/O threads and the
    monitor."""
    if not predictor.ready:
        predictor.load()
    runner = BatchRunner(predictor, max_batch_size=limits.max_batch_size,
                         on_batch=metrics()["batch"].observe)
    workers = limits.workers or min(32, (os.cpu_count() or 1) + 4)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="kubeseg-io")
    admission = Admission(limits, classes=predictor.num_classes,
                          max_pixels=predictor.max_pixels)
    monitor = monitor_for(predictor, monitoring)
    keeper = None
    if monitoring.keep.enabled:
        keeper = ImageKeeper(monitoring.keep, model_name=predictor.name,
                             class_names=predictor.class_names,
                             baseline=training_baseline(predictor))
        logger.info("keeping served images under %s: %.1f%% at random, and every image with "
                    "more than %.0f%% of its pixels below confidence %.2f (budget %d MiB)",
                    monitoring.keep.uri, 100 * monitoring.keep.rate, 100 * keeper.threshold,
                    LOW_CONFIDENCE_BELOW, monitoring.keep.budget_mib)
    for source in (monitor, keeper):
        if source is not None:
            export(source)
    return AppState(predictor, runner, executor, admission, monitor, keeper)


__all__ = ["AppState", "app_state", "infer_v2"]
