"""The Katib Experiment: Katib's CRD and API schema, Katib's admission rules, the trial pod, and
the metrics Katib's StdOut collector reads from a real training log."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crd_schema  # noqa: E402
import upstream_rules  # noqa: E402

from kubeseg.config import Hyperparameters  # noqa: E402
from kubeseg.data.synthetic import make_shapes_dataset  # noqa: E402
from kubeseg.errors import ConfigError  # noqa: E402
from kubeseg.tuning import katib  # noqa: E402
from kubeseg.tuning.space import DEFAULT_SEARCH, parse_search  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32"
FIXED = {"num_classes": 3, "num_training_samples": 367, "backbone": "resnet-50", "epochs": 20}
# Katib's DefaultFilter, pkg/metricscollector/v1beta1/common/const.go (same commit as the CRD).
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
TRIAL_PARAMETER = re.compile(r"\$\{trialParameters\.([^}]+)\}")


def _experiment(*, search=("learning_rate", "optimizer=sgd,adam", "mini_batch_size=4:16",
                            "momentum"), fixed=FIXED, image="registry.example/trainer:1",
                gpus=1, **search_options):
    space = parse_search(list(search))
    return katib.build_experiment(
        "camvid-tune", space, fixed=fixed, train_args=["--data-root", "s3://data/camvid"],
        output_uri="s3://runs/camvid-tune", pod=katib.TrialPod(image=image, gpus=gpus),
        search=katib.KatibSearch(**{"max_trials": 12, "parallel_trials": 3, **search_options}))


def katib_collect(lines, metric_names, filters):
    """Katib's text-format collector (file-metricscollector.go, parseLogsInTextFormat): a line
    is read only when it contains a metric name; each filter's first group is the name, the
    second the value; only the metric names are kept."""
    patterns = [re.compile(f, re.ASCII) for f in filters]  # Go's \w and \d are ASCII
    found = []
    for line in lines:
        if not any(m in line for m in metric_names):
            continue
        for pattern in patterns:
            for match in pattern.finditer(line):
                if match.group(1).strip() in metric_names:
                    found.append((match.group(1).strip(), match.group(2).strip()))
    return found


# -- schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [1, 0])
def test_experiment_fits_katib_schema_and_the_trial_job_fits_kubernetes(gpus):
    import kubernetes_validate

    experiment = _experiment(gpus=gpus)
    crd_schema.validate(experiment, "katib-experiment.yaml")
    job = json.loads(json.dumps(experiment["spec"]["trialTemplate"]["trialSpec"]))
    job["metadata"] = {"name": "trial"}  # Katib names it after the trial
    try:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"trial Job invalid: {exc.message} at "
                             f"{list(exc.absolute_path)}") from None


def test_schema_is_strict_enough_to_catch_a_misspelt_field():
    experiment = _experiment()
    experiment["spec"]["objective"]["objectiveMetric"] = "validation:mIOU"
    with pytest.raises(crd_schema.CRDValidationError, match="objectiveMetric"):
        crd_schema.validate(experiment, "katib-experiment.yaml")
    experiment = _experiment()
    experiment["spec"]["maxTrialCount"] = "12"
    with pytest.raises(crd_schema.CRDValidationError, match="maxTrialCount"):
        crd_schema.validate(experiment, "katib-experiment.yaml")


def test_experiment_passes_katibs_admission_rules():
    """The checks of Katib's validating webhook (pkg/webhook/v1beta1/experiment/validator)."""
    experiment = _experiment()
    spec = experiment["spec"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", experiment["metadata"]["name"])
    assert len(experiment["metadata"]["name"]) <= 40
    assert spec["objective"]["type"] in ("minimize", "maximize")
    assert spec["objective"]["objectiveMetricName"] not in \
        spec["objective"]["additionalMetricNames"]
    assert 0 < spec["parallelTrialCount"] <= spec["maxTrialCount"]
    assert 0 <= spec["maxFailedTrialCount"] <= spec["maxTrialCount"]
    for p in spec["parameters"]:
        space = p["feasibleSpace"]
        if p["parameterType"] in ("int", "double"):
            assert "list" not in space and space["min"] and space["max"]
            assert float(space["min"]) < float(space["max"])
        else:
            assert p["parameterType"] in ("categorical", "discrete")
            assert set(space) == {"list"} and len(space["list"]) >= 2
        assert space.get("distribution", "uniform") in ("uniform", "logUniform")
    template = spec["trialTemplate"]
    assert template["primaryContainerName"] and template["successCondition"] \
        and template["failureCondition"]
    names = [t["name"] for t in template["trialParameters"]]
    references = [t["reference"] for t in template["trialParameters"]]
    assert len(set(names)) == len(names) and len(set(references)) == len(references)
    declared = {p["name"] for p in spec["parameters"]}
    for reference in references:
        assert reference in declared or reference.startswith("${trialSpec."), reference
    # every trial parameter is used in the template, and every placeholder is declared
    text = json.dumps(template["trialSpec"])
    assert set(TRIAL_PARAMETER.findall(text)) == set(names)
    trial = template["trialSpec"]
    assert "name" not in trial.get("metadata", {}) and "namespace" not in trial.get("metadata", {})
    for regex in spec["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]:
        assert re.compile(regex).groups >= 2


def test_trial_pod_runs_kubeseg_train_in_the_trainer_image_on_the_gpu_pool():
    from kubeseg.images import configured
    from kubeseg.deploy.placement import STORAGE_SECRET, STORAGE_SECRET_KEYS

    experiment = _experiment(image=configured().trainer)
    pod = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    container = pod["spec"]["containers"][0]
    assert container["name"] == experiment["spec"]["trialTemplate"]["primaryContainerName"]
    assert container["image"] == configured().trainer
    assert container["imagePullPolicy"] == "Always"  # a rebuilt tag is pulled again
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"kubeseg.io/node-pool": "gpu"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                  if "valueFrom" in e}
    assert set(secret_env) == set(STORAGE_SECRET_KEYS)
    assert {(ref["name"], ref["key"]) for ref in secret_env.values()} == {
        (STORAGE_SECRET, key) for key in STORAGE_SECRET_KEYS}
    shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_trial_command_parses_and_its_hyperparameters_are_accepted():
    from kubeseg.cli import build_parser
    from kubeseg.config import parse_assignments

    experiment = _experiment()
    command = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    assert command[:4] == ["python", "-m", "kubeseg", "train"]
    # what Katib substitutes: one suggestion per parameter, the trial's name for its output
    suggestion = {"learning_rate": "0.0031", "optimizer": "adam", "mini_batch_size": "8",
                  "momentum": "0.93", "trialName": "camvid-tune-x7k2p"}
    filled = [TRIAL_PARAMETER.sub(lambda m: suggestion[m.group(1)], arg) for arg in command]
    args = build_parser().parse_args(filled[3:])
    assert args.output == "s3://runs/camvid-tune/camvid-tune-x7k2p"
    assert args.data_root == "s3://data/camvid"
    hp = Hyperparameters.from_dict(parse_assignments(args.assignments))
    assert (hp.learning_rate, hp.optimizer, hp.mini_batch_size) == (0.0031, "adam", 8)
    assert hp.num_classes == 3 and hp.epochs == 20
    assert dict(hp.tuner_keys) == {"_tuning_objective_metric": "validation:mIOU"}


def test_search_space_comes_from_the_hyperparameter_ranges():
    space = parse_search(None)
    assert space.names == DEFAULT_SEARCH
    lr = space.parameters[0]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-1, True)
    space = parse_search(["gamma1", "aux_loss_weight=0.1:0.6", "use_pretrained_model",
                          "algorithm=fcn,deeplab"])
    by_name = {p.name: p for p in space.parameters}
    assert (by_name["gamma1"].low, by_name["gamma1"].high) == (0, 1)  # its own closed range
    assert by_name["use_pretrained_model"].choices == ("True", "False")
    assert by_name["algorithm"].choices == ("fcn", "deeplab")
    with pytest.raises(ConfigError) as err:
        parse_search(["learning_rate=0:2", "optimiser", "algorithm=fcn,unet", "epochs=9:3",
                      "num_classes", "mini_batch_size=2:8:cubic", "early_stopping_tolerance=0:1:log"])
    text = str(err.value)
    assert len(err.value.problems) == 7, text
    assert "learning_rate bound '0'" in text and "(0, 1]" in text
    assert "did you mean 'optimizer'" in text
    assert "algorithm='unet'" in text and "fcn | psp | deeplab | deeplabv3plus | lraspp" in text
    assert "low bound 9 must be below the high bound 3" in text
    assert "num_classes cannot be searched" in text
    assert "LOW:HIGH:log" in text and "positive low bound" in text


def test_the_model_itself_is_searchable(tmp_path):
    from kubeseg.config import ALGORITHMS, BACKBONES

    space = parse_search(["algorithm", "backbone=efficientnet-lite0,mobilenet-v3-large",
                          "output_stride"])
    by_name = {p.name: p for p in space.parameters}
    assert by_name["algorithm"].choices == ALGORITHMS  # every decoder, the extras included
    assert by_name["backbone"].choices == ("efficientnet-lite0", "mobilenet-v3-large")
    assert by_name["output_stride"].kind == "categorical"
    assert by_name["output_stride"].choices == ("8", "16")
    assert parse_search(["backbone"]).parameters[0].choices == BACKBONES
    with pytest.raises(ConfigError, match=r"output_stride='32'.*8 \| 16"):
        parse_search(["output_stride=8,32"])
    fixed = {k: v for k, v in FIXED.items() if k != "backbone"}
    experiment = _experiment(search=("algorithm=deeplabv3plus,lraspp", "output_stride",
                                     "backbone=efficientnet-lite0,mobilenet-v3-large"),
                             fixed=fixed)
    parameters = {p["name"]: p for p in experiment["spec"]["parameters"]}
    assert parameters["output_stride"] == {"name": "output_stride",
                                           "parameterType": "categorical",
                                           "feasibleSpace": {"list": ["8", "16"]}}
    assert parameters["algorithm"]["feasibleSpace"]["list"] == ["deeplabv3plus", "lraspp"]
    # each value a trial can get is one kubeseg train accepts
    for algorithm in ("deeplabv3plus", "lraspp"):
        for stride in ("8", "16"):
            hp = Hyperparameters.from_dict({**fixed, "algorithm": algorithm,
                                            "output_stride": stride,
                                            "backbone": "efficientnet-lite0"})
            assert hp.output_stride == int(stride)


def test_options_are_checked_with_names_and_ranges():
    with pytest.raises(ConfigError) as err:
        _experiment(parallel_trials=20, algorithm="annealing", max_failed_trials=13)
    text = str(err.value)
    assert "parallel_trials=20" in text and "max_trials=12" in text
    assert "algorithm='annealing'" in text and "tpe" in text
    assert "max_failed_trials=13" in text
    with pytest.raises(ConfigError, match="both fixed and searched"):
        _experiment(fixed={**FIXED, "learning_rate": 0.01})


def test_cli_dry_run_prints_the_experiment_yaml():
    from kubeseg.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["tune", "--dry-run", "--data-root", "s3://data/shapes", "--output",
                     "s3://runs/t1", "--set", "num_classes=3", "--set",
                     "num_training_samples=16", "--search", "learning_rate",
                     "--trials", "4", "--parallel", "2", "--name", "shapes-tune"])
    assert code == 0
    experiment = yaml.safe_load(out.getvalue())
    crd_schema.validate(experiment, "katib-experiment.yaml")
    assert experiment["metadata"]["name"] == "shapes-tune"
    assert experiment["spec"]["maxTrialCount"] == 4
    assert experiment["spec"]["parallelTrialCount"] == 2


def test_cli_refuses_missing_required_hyperparameters_before_anything_runs(capsys):
    from kubeseg.cli import main

    code = main(["tune", "--dry-run", "--data-root", "s3://data/shapes", "--output",
                 "s3://runs/t1", "--set", "num_classes=3"])
    assert code == 1
    assert "num_training_samples is required" in capsys.readouterr().err


# -- what Katib's suggestion services do with the search --------------------------------------
def test_grid_gives_every_number_the_step_katibs_grid_needs():
    """kubeflow/katib v0.18.0 internal/search_space.py: a double without a step fails the grid;
    optuna/service.py refuses more trials than combinations."""
    search = ("learning_rate", "momentum", "mini_batch_size=4:16", "optimizer=sgd,adam",
              "weight_decay=0.0001,0.001")
    experiment = _experiment(search=search, algorithm="grid", max_trials=12)
    crd_schema.validate(experiment, "katib-experiment.yaml")
    assert upstream_rules.katib_grid_refusal(experiment) == ""
    by_name = {p["name"]: p for p in experiment["spec"]["parameters"]}
    assert by_name["momentum"]["feasibleSpace"]["step"] == "0.0475"
    assert by_name["mini_batch_size"]["feasibleSpace"]["step"] == "3"
    # a log range becomes log-spaced values (a step would space them linearly)
    assert by_name["learning_rate"] == {"name": "learning_rate", "parameterType": "discrete",
                                        "feasibleSpace": {"list": [
                                            "0.0001", "0.000562", "0.00316", "0.0178", "0.1"]}}
    assert by_name["weight_decay"]["feasibleSpace"] == {"list": ["0.0001", "0.001"]}
    for value in by_name["learning_rate"]["feasibleSpace"]["list"]:
        Hyperparameters.from_dict({**FIXED, "learning_rate": value})
    combinations = upstream_rules.katib_grid_combinations(experiment["spec"]["parameters"])
    assert combinations == 5 * 5 * 5 * 2 * 2 == katib.grid_size(experiment["spec"]["parameters"])
    # what kubeseg wrote before: min and max only, which Katib's grid refuses
    old = _experiment(search=search, algorithm="tpe", max_trials=12)
    assert "step is nil" in upstream_rules.katib_grid_refusal(old)
    with pytest.raises(ConfigError) as info:
        _experiment(search=("momentum", "optimizer=sgd,adam"), algorithm="grid", max_trials=12)
    assert "max_trials=12" in str(info.value) and "grid has 10 combinations" in str(info.value)


def test_log_ranges_are_refused_where_katib_would_search_them_uniformly():
    """Katib 0.17's FeasibleSpace has no distribution (v0.17.0 experiment_types.go); at 0.18
    goptuna's cmaes/sobol ignore it (converter.go) and skopt's bayesianoptimization makes every
    double log-uniform and every int uniform (base_service.py)."""
    with pytest.raises(ConfigError) as info:
        _experiment(search=("learning_rate", "optimizer=sgd,adam"), katib_version="0.17")
    text = str(info.value)
    assert "learning_rate=0.0001:0.1:log: Katib 0.17 has no log-uniform search" in text
    assert "--katib-version 0.18" in text and "learning_rate=A,B,C" in text
    for fine in (dict(katib_version="0.17", search=("learning_rate=0.001,0.01,0.1",)),
                 dict(katib_version="0.17", search=("learning_rate",), algorithm="grid",
                      max_trials=5),
                 dict(search=("learning_rate", "momentum"))):
        assert _experiment(**fine)["spec"]["parameters"]
    lr = _experiment(search=("learning_rate",))["spec"]["parameters"][0]
    assert lr["feasibleSpace"]["distribution"] == "logUniform"
    for algorithm in ("cmaes", "sobol"):
        with pytest.raises(ConfigError, match=f"Katib's {algorithm} ignores the log-uniform"):
            _experiment(search=("learning_rate", "momentum"), algorithm=algorithm)
        _experiment(search=("momentum", "gamma1"), algorithm=algorithm)
    with pytest.raises(ConfigError) as info:
        _experiment(search=("momentum", "mini_batch_size=4:32:log", "learning_rate"),
                    algorithm="bayesianoptimization")
    text = str(info.value)
    assert "momentum=0.8:0.99: Katib's bayesianoptimization" in text
    assert "mini_batch_size=4:32:log" in text and "learning_rate" not in text
    _experiment(search=("learning_rate", "mini_batch_size=4:32"),
                algorithm="bayesianoptimization")
    from kubeseg.cli import main

    code = main(["tune", "--dry-run", "--data-root", "s3://d", "--output", "s3://r",
                 "--set", "num_classes=3", "--set", "num_training_samples=16",
                 "--katib-version", "0.17"])
    assert code == 1


def _plain_strings(text):
    """Every string scalar the text writes unquoted (PyYAML's composer keeps the style)."""
    found = []

    def walk(node):
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and node.tag == "tag:yaml.org,2002:str":
                found.append(node.value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(key)
                walk(value)

    walk(yaml.compose(text))
    return found


def test_dry_run_yaml_reads_the_same_strings_under_yaml_1_2():
    """kubectl reads YAML 1.2, where 1e-05 is a float (1.2.2 core schema; YAML 1.1 wants a
    dot); Katib's feasibleSpace values are strings."""
    from kubeseg.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["tune", "--dry-run", "--data-root", "s3://data/shapes", "--output",
                     "s3://runs/t1", "--set", "num_classes=3", "--set",
                     "num_training_samples=16", "--search", "weight_decay",
                     "--search", "learning_rate=1e-5:1e-1:log"])
    assert code == 0
    text = out.getvalue()
    experiment = yaml.safe_load(text)
    spaces = [p["feasibleSpace"] for p in experiment["spec"]["parameters"]]
    assert {"min": "1e-05", "max": "0.001", "distribution": "logUniform"} in spaces
    misread = [v for v in _plain_strings(text) if upstream_rules.yaml12_resolves_to_non_string(v)]
    assert misread == [], misread
    assert "min: '1e-05'" in text
    # what PyYAML's own dump writes: YAML 1.1 reads 1e-05 as a string, YAML 1.2 as a float
    old = yaml.safe_dump(experiment, sort_keys=False)
    assert "min: 1e-05" in old and yaml.safe_load(old) == experiment
    assert "1e-05" in [v for v in _plain_strings(old)
                       if upstream_rules.yaml12_resolves_to_non_string(v)]


# -- metrics from a real training log ----------------------------------------------------------
@pytest.fixture(scope="module")
def training_log(tmp_path_factory):
    """stdout and stderr of a real ``kubeseg train`` (2 epochs on tiny shapes), as Katib's
    StdOut collector captures them, and the run's metrics.jsonl."""
    root = tmp_path_factory.mktemp("katib-log")
    make_shapes_dataset(root / "data", n_train=4, n_val=2, size=32, num_classes=3, seed=2)
    out = root / "out"
    command = [sys.executable, "-m", "kubeseg", "train", "--data-root", str(root / "data"),
               "--output", str(out), "--workers", "0", "--device", "cpu",
               "--set", "_tuning_objective_metric=validation:mIOU"]
    for key, value in dict(backbone="resnet-18", num_classes=3, num_training_samples=4,
                           crop_size=32, base_size=32, epochs=2, mini_batch_size=2,
                           validation_mini_batch_size=1, use_pretrained_model=False,
                           optimizer="adam", learning_rate=0.005).items():
        command += ["--set", f"{key}={value}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout.splitlines(), records, out


def test_katib_collector_reads_each_epochs_metrics_from_a_training_log(training_log):
    lines, records, _ = training_log
    experiment = _experiment()
    objective = experiment["spec"]["objective"]
    names = [objective["objectiveMetricName"], *objective["additionalMetricNames"]]
    filters = experiment["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    found = katib_collect(lines, names, filters)
    miou = [float(v) for n, v in found if n == "validation:mIOU"]
    accuracy = [float(v) for n, v in found if n == "validation:pixel_accuracy"]
    assert miou == pytest.approx([r["validation:mIOU"] for r in records], abs=1e-6)
    assert accuracy == pytest.approx([r["validation:pixel_accuracy"] for r in records],
                                     abs=1e-6)
    assert len(miou) == 2


def test_katib_default_filter_reads_the_line_but_stops_names_at_the_colon(training_log):
    """Why the Experiment names its filter: Katib's default one reads our metric lines, but its
    name part ([\\w|-]+) cannot hold ':', so it yields 'mIOU', never 'validation:mIOU'."""
    lines, records, _ = training_log
    found = katib_collect(lines, ["validation:mIOU"], [KATIB_DEFAULT_FILTER])
    assert found == []
    bare = katib_collect(lines, ["mIOU"], [KATIB_DEFAULT_FILTER])
    assert [float(v) for _, v in bare] == pytest.approx(
        [r["validation:mIOU"] for r in records], abs=1e-6)
    # ours is the default with ':' added to the name characters, nothing else
    assert katib.KATIB_DEFAULT_FILTER == KATIB_DEFAULT_FILTER
    assert katib.METRICS_FILTER == KATIB_DEFAULT_FILTER.replace(r"[\w|-]", r"[\w|:-]", 1)


def test_training_records_the_tuner_key_in_the_artifact(training_log):
    from kubeseg.artifact import read_info

    _, _, out = training_log
    version = Path(read_info(str(out / "model")).files_uri)  # the version the pointer names
    recorded = json.loads((version / "hyperparams.json").read_text())
    assert recorded["_tuning_objective_metric"] == "validation:mIOU"


@pytest.mark.cluster
def test_tune_creates_the_experiment_and_prints_the_best_trial():
    if not os.environ.get("KUBECONFIG") or not os.environ.get("KUBESEG_TEST_DATA_ROOT"):
        pytest.skip("needs a Kubernetes cluster with Katib installed (none can run here): set "
                    "KUBECONFIG and KUBESEG_TEST_DATA_ROOT (an s3:// dataset the cluster reads)")
    proc = subprocess.run(
        [sys.executable, "-m", "kubeseg", "tune", "--data-root",
         os.environ["KUBESEG_TEST_DATA_ROOT"], "--output",
         os.environ["KUBESEG_TEST_DATA_ROOT"].rstrip("/") + "-tune", "--trials", "2",
         "--parallel", "1", "--set", "num_classes=3", "--set", "num_training_samples=4",
         "--set", "epochs=1", "--namespace", os.environ.get("KUBESEG_TEST_NAMESPACE",
                                                            "kubeflow-user")],
        capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation:mIOU" in proc.stdout


def test_numeric_values_to_try_are_checked_and_searched_as_discrete():
    import optuna

    from kubeseg.tuning.local import _suggest

    space = parse_search(["learning_rate=0.1, 0.001,0.01", "mini_batch_size=8,4"])
    lr, batch = space.parameters
    assert (lr.kind, lr.choices) == ("discrete", ("0.001", "0.01", "0.1"))
    assert (batch.kind, batch.choices) == ("discrete", ("4", "8"))
    with pytest.raises(ConfigError) as info:
        parse_search(["learning_rate=0.01,2", "momentum=0.9,0.9"])
    assert "learning_rate='2'" in str(info.value) and "(0, 1]" in str(info.value)
    assert "at least two different values" in str(info.value)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = _suggest(study.ask(), space)
    assert values["learning_rate"] in lr.choices and values["mini_batch_size"] in batch.choices
    Hyperparameters.from_dict({**FIXED, **values})
