"""Serving throughput and latency: ``kubeseg serve`` against a straightforward HTTP baseline.

Workload: 512x512 JPEG crops of CamVid images (../shared/datasets/camvid), POSTed with
``Accept: image/png`` (a class-id mask PNG back), by ``--concurrency`` clients in a closed loop
(each sends its next request when the previous answer arrives), ``--requests`` in all.

Baseline ("plain"): the same model artifact behind Python's ``http.server`` (one thread): for
each request decode with Pillow, normalise, ``model.eval()`` forward under ``torch.no_grad()``,
argmax, encode the PNG with Pillow.

Ours: ``kubeseg serve`` with its defaults (or the flags given): decoding and encoding on a
thread pool while one thread runs the forward passes, same-size requests waiting together
batched into one forward pass (on a CPU, at most 512x512 pixels a batch), ``inference_mode``,
BatchNorm folded into the convolutions, channels-last; ``--precision bfloat16`` also uses
bfloat16 autocast (CPUs with AVX512-BF16/AMX, GPUs); ``--backend onnxruntime`` runs the exported
model.onnx on ONNX Runtime; ``--precision int8`` the int8 model of ``kubeseg quantize``
(calibrated here on ``--calibration-images`` CamVid training images when the artifact has none).
Whenever ours is not kubeseg's PyTorch float32 path, that path is measured too, as a second
named baseline.

The roofline (bench/roofline.py) is printed with it: the CPU's capabilities, the model's FLOPs
per image, the calibrated convolution limit in each side's precision (float32, and bfloat16 or
float16 when ours computes in it), and each side's achieved fraction of its own limit (for
int8, which has no calibration kernel here, of the float32 limit: the same operations, counted
the same way).

``--monitoring-cost`` measures something else: what counting the predictions for /metrics
(pixels per class, confidence histogram, image sizes, drift gauges) costs a request. The same
``kubeseg serve`` runs with its monitoring (the default) and with ``--no-monitoring``, in
alternating order, ``--repeat`` times; the plain baseline is not run.

Each server runs in its own process, one after the other, so they never share the cores. The
model is randomly initialised unless ``--model-uri`` names one (the benchmark measures speed,
not accuracy).

    python bench/serve.py                                     # fcn / resnet-18, 21 classes
    python bench/serve.py --backend onnxruntime
    python bench/serve.py --precision int8 --requests 32
    python bench/serve.py --repeat 3                          # medians of three runs
    python bench/serve.py --monitoring-cost --repeat 3        # with and without /metrics counts
    python bench/serve.py --device cuda --requests 400 --concurrency 16 --backbone resnet-50

Models side by side (``--models``): each model is served by ``kubeseg serve`` in float32 (and,
with ``--int8``, its int8 model), one server after the other. ``--repeat`` rounds each serve
every side once (odd rounds in reverse order), and each side's req/s is set against the first
model's float32 req/s of the same round; the table gives the median of those ratios. A model
is ``ALGORITHM/BACKBONE[/OUTPUT_STRIDE]`` (a random one) or the URI of a trained artifact
(then ``--int8`` reports the agreement that ``kubeseg quantize`` measured on CamVid's
validation split)::

    python bench/serve.py --models fcn/resnet-18 lraspp/mobilenet-v3-large/16 \\
        deeplabv3plus/efficientnet-lite0/16 --int8 --repeat 3
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


def make_artifact(path: str, algorithm: str, backbone: str, num_classes: int,
                  output_stride: int = 8) -> str:
    import torch

    from kubeseg.artifact import save_artifact
    from kubeseg.config import Hyperparameters
    from kubeseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from kubeseg.models import build_model

    hp = Hyperparameters.from_dict(dict(algorithm=algorithm, backbone=backbone,
                                        num_classes=num_classes, num_training_samples=8,
                                        output_stride=output_stride))
    torch.manual_seed(0)
    model = build_model(algorithm=algorithm, backbone=backbone, num_classes=num_classes,
                        output_stride=output_stride)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    save_artifact(path, model=model.eval(), hyperparameters=hp,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return path


def load_jpegs(count: int, size: int) -> list:
    """``count`` JPEG-encoded ``size`` x ``size`` crops of CamVid images."""
    import numpy as np
    from PIL import Image

    paths = sorted((CAMVID / "validation").glob("*.jpg")) or sorted((CAMVID / "train")
                                                                    .glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no CamVid images under {CAMVID}: the benchmark reads "
                         "../shared/datasets/camvid")
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        image = Image.open(paths[i % len(paths)]).convert("RGB")
        scale = max(size / min(image.size), 1.0)
        if scale > 1:
            image = image.resize((int(image.width * scale) + 1, int(image.height * scale) + 1))
        left = int(rng.integers(image.width - size + 1))
        top = int(rng.integers(image.height - size + 1))
        buf = io.BytesIO()
        image.crop((left, top, left + size, top + size)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- the baseline server -------------------------------------------------------------------------

def run_baseline_server(model_uri: str, port: int, device: str) -> None:
    """A minimal, single-threaded HTTP server around the model."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import numpy as np
    import torch
    from PIL import Image

    import kubeseg

    model, info = kubeseg.load_model(model_uri, device=device)
    model.eval()
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            image = Image.open(io.BytesIO(body)).convert("RGB")
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
            x = ((x - mean) / std)[None].to(device)
            with torch.no_grad():
                mask = model(x)["out"].argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(mask, mode="L").save(buf, format="PNG")
            data = buf.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


# -- load generation -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, jpegs: list, requests: int, concurrency: int, warmup: int) -> dict:
    """Closed-loop load: ``concurrency`` clients, ``requests`` timed requests after warm-up."""
    latencies, errors = [], []
    counter = {"next": 0}
    lock = threading.Lock()

    def one(body):
        # a new connection per request: the baseline's http.server serves one at a time
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/invocations", body=body,
                     headers={"Content-Type": "image/jpeg", "Accept": "image/png"})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        if response.status != 200 or not data.startswith(b"\x89PNG"):
            errors.append(response.status)
        return time.perf_counter() - started

    def client(index: int):
        while True:
            with lock:
                i = counter["next"]
                counter["next"] += 1
            if i >= requests:
                return
            try:
                elapsed = one(jpegs[i % len(jpegs)])
            except OSError as exc:
                errors.append(repr(exc))
                continue
            with lock:
                latencies.append(elapsed)

    for i in range(warmup):
        one(jpegs[i % len(jpegs)])
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        raise SystemExit(f"no request succeeded: {errors[:3]}")

    def pct(q):
        return latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))]

    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p99": pct(0.99),
            "wall": wall, "errors": len(errors)}


def measure(command: list, port, ready_path: str, jpegs, args) -> dict:
    """Run the server ``command`` (``port`` None: it is the value after ``--port``) and load it."""
    from kubeseg.serving.process import ServerProcess

    port = port or int(command[command.index("--port") + 1])

    log = None
    if args.verbose:
        log = Path(tempfile.mkdtemp(prefix="kubeseg-bench-")) / "server.log"
        print(f"server output: {log}", flush=True)
    with ServerProcess(command, f"http://127.0.0.1:{port}", ready_path=ready_path,
                       log_path=log, ready_timeout_s=300):
        return load(port, jpegs, args.requests, args.concurrency, args.warmup)


def serve_command(model_uri: str, backend: str, precision: str, args,
                  monitoring: bool = True) -> list:
    command = [sys.executable, "-m", "kubeseg", "serve", model_uri, "--port", str(free_port()),
               "--device", args.device, "--precision", precision,
               "--max-batch-size", str(args.max_batch_size),
               "--max-pixels", str(max(args.size * args.size, 4096)), "--tile-size", "0"]
    if precision != "int8":
        command += ["--backend", backend]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if not monitoring:
        command.append("--no-monitoring")
    return command


def counting_cost(model_uri: str, jpeg: bytes, args, rounds: int = 20) -> None:
    """What the counting adds to one answer, in this process: the predictor's postprocess of
    one image's logits with and without the monitoring counts, alternating; medians."""
    from kubeseg.serving.codecs import decode_image
    from kubeseg.serving.predictor import Runtime, SegmentationPredictor

    predictor = SegmentationPredictor(model_uri, runtime=Runtime(device=args.device,
                                                                 threads=args.threads),
                                      tile_size=None).load()
    image = decode_image(jpeg, max_image_pixels=args.size * args.size * 4)
    size = (image.height, image.width)
    logits = predictor.predict(predictor.preprocess(image)[None])
    forward, times = [], {True: [], False: []}
    for _ in range(3):
        started = time.perf_counter()
        predictor.predict(predictor.preprocess(image)[None])
        forward.append(time.perf_counter() - started)
    for index in range(2 * rounds):
        counts = index % 2 == 0
        started = time.perf_counter()
        predictor.postprocess(logits, size, counts=counts)
        times[counts].append(time.perf_counter() - started)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"in process, one {size[1]}x{size[0]} image: postprocess {off * 1000:.1f} ms, with the "
          f"counts {on * 1000:.1f} ms (+{(on - off) * 1000:.1f} ms); the forward pass "
          f"{statistics.median(forward) * 1000:.0f} ms (median of {rounds} and 3)", flush=True)


def round_order(sides: list, round_index: int) -> list:
    """The order in which round ``round_index`` (from 0) serves ``sides``: as given in even
    rounds, reversed in odd ones, so no side always runs first or last."""
    return list(sides) if round_index % 2 == 0 else list(sides)[::-1]


def run_monitoring_cost(model_uri: str, jpegs: list, args) -> None:
    """kubeseg serve with and without its monitoring, alternating which goes first."""
    counting_cost(model_uri, jpegs[0], args)
    sides = {True: [], False: []}
    for run in range(max(1, args.repeat)):
        for monitoring in round_order([True, False], run):
            result = measure(serve_command(model_uri, args.backend, args.precision, args,
                                           monitoring), None, "/ping", jpegs, args)
            sides[monitoring].append(result)
            print(f"run {run + 1}, monitoring {'on ' if monitoring else 'off'}: "
                  f"{result['rps']:.3f} req/s, p50 {result['p50'] * 1000:.0f} ms, "
                  f"p99 {result['p99'] * 1000:.0f} ms, errors {result['errors']}; load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        on, off = sides[True][-1], sides[False][-1]
        print(f"run {run + 1}: with/without monitoring throughput "
              f"{on['rps'] / off['rps']:.3f}x, p50 {on['p50'] / off['p50']:.3f}x", flush=True)
    med = statistics.median
    ratios = [a["rps"] / b["rps"] for a, b in zip(sides[True], sides[False])]
    print(f"median of {len(ratios)} runs: on {med(r['rps'] for r in sides[True]):.3f} req/s, "
          f"off {med(r['rps'] for r in sides[False]):.3f} req/s; throughput ratio on/off "
          f"{med(ratios):.3f}x (runs {', '.join(f'{r:.3f}' for r in ratios)})")


def ensure_int8(model_uri: str, images: int, size: int) -> None:
    """Quantize the artifact on CamVid training images unless it holds an int8 model."""
    from kubeseg.artifact import read_added_file
    from kubeseg.serving.onnx_model import INT8_FILE, describe_int8, quantize_artifact

    if read_added_file(model_uri, INT8_FILE) is None:
        started = time.perf_counter()
        result = quantize_artifact(model_uri, str(CAMVID / "train"), max_images=images,
                                   max_side=size)
        print(f"quantized in {time.perf_counter() - started:.0f} s; "
              f"{describe_int8(result.report)}", flush=True)


def print_roofline(model_uri: str, args):
    """Print the CPU capabilities, FLOPs per image and the calibrated limits; return the FLOPs
    and the limits by precision (float32 and ``args.precision``), measured here, before any
    server runs."""
    import torch
    from roofline import (calibrate_limits, cpu_capabilities, describe, describe_limits,
                          model_flops)

    import kubeseg

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = kubeseg.load_model(model_uri, device=args.device)
    flops = model_flops(model, (1, 3, args.size, args.size))
    del model
    limits = calibrate_limits(args.device, [args.precision])
    print(describe(cpu_capabilities(), limits["float32"], flops, args.device), flush=True)
    extra = describe_limits(limits, args.device)
    if extra:
        print(extra, flush=True)
    return flops, limits


def show(label: str, result: dict, flops: float, limit: float, note: str = "") -> None:
    from roofline import report_line

    print(f"{label}: {result['rps']:.2f} req/s, p50 {result['p50'] * 1000:.0f} ms, "
          f"p99 {result['p99'] * 1000:.0f} ms, errors {result['errors']}; "
          f"{report_line('roofline', flops, result['rps'], limit)}{note}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--algorithm", default="fcn",
                        choices=["fcn", "psp", "deeplab", "deeplabv3plus", "lraspp"])
    parser.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="serve these models side by side instead (ALGORITHM/BACKBONE"
                             "[/OUTPUT_STRIDE] or an artifact URI); the first is the baseline")
    parser.add_argument("--int8", action="store_true",
                        help="with --models: also serve each model's int8 model")
    parser.add_argument("--backbone", default="resnet-18")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--requests", type=int, default=16, help="timed requests per server")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the whole comparison; with more than one, the medians "
                             "are printed at the end (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "bfloat16", "float16", "int8"], help="ours only")
    parser.add_argument("--backend", default="pytorch", choices=["pytorch", "onnxruntime"],
                        help="ours only (int8 always runs on onnxruntime)")
    parser.add_argument("--calibration-images", type=int, default=8,
                        help="int8: CamVid training images to calibrate on (default 8)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="ours only")
    parser.add_argument("--threads", type=int, default=None, help="ours: torch threads")
    parser.add_argument("--model-uri", help="an existing artifact (default: a random one)")
    parser.add_argument("--monitoring-cost", action="store_true",
                        help="compare kubeseg serve with and without its monitoring instead "
                             "(see above)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep the servers' logs in files (their paths are printed)")
    parser.add_argument("--baseline-server", nargs=2, metavar=("MODEL_URI", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision == "int8":
        args.backend = "onnxruntime"
    return args


def run_sides(model_uri: str, jpegs: list, args) -> tuple:
    """The baseline, kubeseg's PyTorch float32 path, and ours when it differs; printed. Each
    side's fraction is of the limit in its own precision (int8: of the float32 limit), printed
    at the end against the higher of two calibrations (before and after the servers ran), so a
    burst of other work on the machine during one calibration does not inflate them."""
    from roofline import calibrate_limits, fraction, limit_note, report_line

    flops, limits = print_roofline(model_uri, args)
    port = free_port()
    plain = measure([sys.executable, __file__, "--device", args.device,
                     "--baseline-server", model_uri, str(port)], port, "/", jpegs, args)
    show("plain   (http.server, no_grad forward)", plain, flops, limits["float32"])
    sides = [("pytorch", "float32")]
    if (args.backend, args.precision) != ("pytorch", "float32"):
        sides.append((args.backend, args.precision))
    results = []
    for backend, precision in sides:
        results.append(measure(serve_command(model_uri, backend, precision, args), None,
                               "/ping", jpegs, args))
        show(f"kubeseg (serve, {backend}, {precision}, batch <= {args.max_batch_size})",
             results[-1], flops, limits[precision], limit_note(precision))
    after = calibrate_limits(args.device, [args.precision])
    limits = {p: max(limits[p], after[p]) for p in limits}
    print("calibrated limits after the servers: "
          + ", ".join(f"{p} {after[p]:.1f}" for p in after)
          + " GFLOP/s; against the higher of before and after:")
    labels = ["plain"] + [f"kubeseg {b} {p}" for b, p in sides]
    precisions = ["float32"] + [p for _, p in sides]
    for label, result, precision in zip(labels, [plain] + results, precisions):
        print("  " + report_line(label, flops, result["rps"], limits[precision])
              + limit_note(precision))
        result["fraction"] = fraction(flops, result["rps"], limits[precision])
        result["note"] = limit_note(precision)
    return plain, results, labels


def print_ratios(plain: dict, results: list, args) -> None:
    ours = results[-1]
    print(f"ratio kubeseg/plain: throughput {ours['rps'] / plain['rps']:.2f}x, "
          f"p50 latency {ours['p50'] / plain['p50']:.2f}x, "
          f"p99 latency {ours['p99'] / plain['p99']:.2f}x (lower is better)")
    if len(results) > 1:
        base = results[0]
        print(f"ratio {args.backend} {args.precision} / pytorch float32 (kubeseg): "
              f"throughput {ours['rps'] / base['rps']:.2f}x, "
              f"p50 latency {ours['p50'] / base['p50']:.2f}x")


def print_medians(runs: list, labels: list, args) -> None:
    """The median over runs of each side's req/s, p50 and fraction of the limit, and the
    median of the per-run ratios."""
    med = statistics.median
    print(f"\nmedian of {len(runs)} runs:")
    for i, label in enumerate(labels):
        sides = [run[i] for run in runs]
        print(f"  {label}: {med(s['rps'] for s in sides):.2f} req/s, p50 "
              f"{med(s['p50'] for s in sides) * 1000:.0f} ms, "
              f"{100 * med(s['fraction'] for s in sides):.0f}% of the calibrated limit"
              f"{sides[0]['note']}")
    print(f"  ratio kubeseg/plain: {med(r[-1]['rps'] / r[0]['rps'] for r in runs):.2f}x "
          "throughput")
    if len(labels) > 2:
        print(f"  ratio {args.backend} {args.precision} / pytorch float32 (kubeseg): "
              f"{med(r[-1]['rps'] / r[1]['rps'] for r in runs):.2f}x throughput")


# -- models side by side ---------------------------------------------------------------------

def model_artifact(spec: str, folder: str, num_classes: int) -> tuple:
    """(label, artifact URI, trained?) of a --models entry."""
    if "://" in spec or Path(spec).exists():
        from kubeseg.artifact import read_info

        hp = read_info(spec).hyperparameters
        return (f"{hp.algorithm}/{hp.backbone}/{hp.output_stride} ({spec})", spec, True)
    parts = spec.split("/")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--models {spec!r}: ALGORITHM/BACKBONE[/OUTPUT_STRIDE] or a URI")
    stride = int(parts[2]) if len(parts) == 3 else 8
    path = str(Path(folder) / spec.replace("/", "_"))
    return f"{parts[0]}/{parts[1]}/{stride}", make_artifact(path, parts[0], parts[1],
                                                            num_classes, stride), False


def model_sides(uri: str, trained: bool, args) -> list:
    """(precision, int8 agreement or None) of each server to run for one model."""
    sides = [("float32", None)]
    if args.int8:
        from kubeseg.artifact import read_added_file
        from kubeseg.serving.onnx_model import INT8_FILE, read_int8_report, quantize_artifact

        if read_added_file(uri, INT8_FILE) is None:
            quantize_artifact(uri, str(CAMVID / "train"), max_images=args.calibration_images,
                              validation=str(CAMVID) if trained else None)
        report = read_int8_report(uri) or {}
        sides.append(("int8", (report.get("agreement") or {}).get("argmax_agreement")))
    return sides


def compare_models(args) -> int:
    """Serve each of ``args.models`` (float32, and int8 with --int8), one server at a time, in
    ``args.repeat`` rounds; print req/s, GFLOPs and ratios against the first model's float32.

    Every round serves every side once, in reversed order on odd rounds, and each side's ratio
    is the median of its per-round ratios: a machine whose speed drifts during the run moves
    both sides of a ratio, not one."""
    from roofline import cpu_capabilities, describe, model_flops

    import kubeseg

    with tempfile.TemporaryDirectory(prefix="kubeseg-bench-") as tmp:
        models = [model_artifact(spec, tmp, args.num_classes) for spec in args.models]
        jpegs = load_jpegs(16, args.size)
        print(describe(cpu_capabilities()), flush=True)
        print(f"models side by side: {args.size}x{args.size} JPEG -> PNG mask; "
              f"{args.requests} requests, {args.concurrency} concurrent clients, batch <= "
              f"{args.max_batch_size}; device {args.device}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        sides = []
        for label, uri, trained in models:
            model, _ = kubeseg.load_model(uri)
            flops = model_flops(model, (1, 3, args.size, args.size))
            params = sum(p.numel() for n, p in model.named_parameters()
                         if not n.startswith("aux_head."))
            del model
            for precision, agreement in model_sides(uri, trained, args):
                sides.append({"label": label, "uri": uri, "precision": precision,
                              "params": params, "flops": flops, "agreement": agreement,
                              "rates": []})
        for round_index in range(max(1, args.repeat)):
            for side in round_order(sides, round_index):
                command = serve_command(side["uri"], "pytorch", side["precision"], args)
                side["rates"].append(measure(command, None, "/ping", jpegs, args)["rps"])
                print(f"round {round_index + 1}: {side['label']} {side['precision']}: "
                      f"{side['rates'][-1]:.2f} req/s", flush=True)
    print_model_rows(sides, args)
    return 0


def print_model_rows(sides: list, args) -> None:
    """The table: each side's median req/s and the median of its per-round ratios against the
    first side (the first model's float32)."""
    med = statistics.median
    base = sides[0]["rates"]
    print(f"\n| model | precision | parameters (M) | GFLOPs at {args.size}x{args.size} | "
          "req/s | x first float32 | per round | int8 argmax agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        ratios = [rate / first for rate, first in zip(side["rates"], base)]
        agree = "" if side["agreement"] is None else f"{100 * side['agreement']:.2f}%"
        print(f"| {side['label']} | {side['precision']} | {side['params'] / 1e6:.2f} | "
              f"{side['flops'] / 1e9:.1f} | {med(side['rates']):.2f} | {med(ratios):.2f}x | "
              + ", ".join(f"{r:.2f}" for r in ratios) + f" | {agree} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        run_baseline_server(args.baseline_server[0], int(args.baseline_server[1]), args.device)
        return 0
    if args.models:
        return compare_models(args)

    with tempfile.TemporaryDirectory(prefix="kubeseg-bench-") as tmp:
        model_uri = args.model_uri or make_artifact(str(Path(tmp) / "model"), args.algorithm,
                                                    args.backbone, args.num_classes,
                                                    args.output_stride)
        if args.precision == "int8":
            ensure_int8(model_uri, args.calibration_images, args.size)
        jpegs = load_jpegs(16, args.size)
        print(f"model: {args.algorithm} / {args.backbone}, {args.num_classes} classes; "
              f"{args.size}x{args.size} JPEG -> PNG mask; {args.requests} requests, "
              f"{args.concurrency} concurrent clients; device {args.device}; "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.monitoring_cost:
            run_monitoring_cost(model_uri, jpegs, args)
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            return 0
        runs = []
        for run in range(max(1, args.repeat)):
            if args.repeat > 1:
                print(f"\nrun {run + 1} of {args.repeat}", flush=True)
            plain, results, labels = run_sides(model_uri, jpegs, args)
            print_ratios(plain, results, args)
            runs.append([plain] + results)
        if len(runs) > 1:
            print_medians(runs, labels, args)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
