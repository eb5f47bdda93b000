import json
import subprocess
import sys

import pytest

from kubeseg import cli


def kubeseg(*args, check=False):
    return subprocess.run([sys.executable, "-m", "kubeseg", *args], capture_output=True,
                          text=True, timeout=120, check=check)


def test_help_lists_every_verb_with_a_line_each():
    result = kubeseg("--help", check=True)
    for verb in ("validate", "ingest", "train", "evaluate", "serve", "deploy", "run", "compile",
                 "submit", "hyperparameters"):
        assert verb in result.stdout
        assert cli.VERBS[verb][1].split()[0] in result.stdout


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_a_clean_help(verb):
    result = kubeseg(verb, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kubeseg " + verb)
    assert "Traceback" not in result.stderr


def test_hyperparameters_table_lists_defaults_and_ranges():
    result = kubeseg("hyperparameters", check=True)
    assert "learning_rate" in result.stdout and "(0, 1]" in result.stdout
    assert "num_classes" in result.stdout and "(required)" in result.stdout


def test_hyperparameters_check_names_every_problem(tmp_path):
    bad = tmp_path / "hp.json"
    bad.write_text(json.dumps({"num_classes": 300, "optimiser": "sgd",
                               "num_training_samples": "100"}))
    result = kubeseg("hyperparameters", "--check", str(bad))
    assert result.returncode == 1
    assert "num_classes=300: out of range; allowed: [2, 254]" in result.stderr
    assert "unknown hyperparameter 'optimiser'; did you mean 'optimizer'?" in result.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"num_classes": "21", "num_training_samples": "1464",
                                "optimizer": "rmsprop", "learning_rate": "1e-4"}))
    result = kubeseg("hyperparameters", "--check", str(good))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.split("\n", 1)[1])["optimizer"] == "rmsprop"


def test_missing_file_is_a_clear_error(tmp_path):
    result = kubeseg("hyperparameters", "--check", str(tmp_path / "none.json"))
    assert result.returncode == 1
    assert f"file not found: {tmp_path / 'none.json'}" in result.stderr


def test_no_verb_prints_help_and_fails():
    result = kubeseg()
    assert result.returncode == 2 and "usage: kubeseg" in result.stdout


def test_class_names_drop_blanks_and_read_json_lists(tmp_path):
    from kubeseg.cli.options import class_names_from_args

    args = cli.build_parser().parse_args(["validate", "--num-classes", "3",
                                          "--class-names", "road, car,sky,"])
    assert class_names_from_args(args) == ["road", "car", "sky"]
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["road", "car"]))
    args = cli.build_parser().parse_args(["ingest", "--output", "out",
                                          "--class-names", str(names)])
    assert class_names_from_args(args) == ["road", "car"]
    args = cli.build_parser().parse_args(["train", "--output", "out", "--class-names", "a,,b,"])
    assert args.class_names == "a,,b,"  # train splits it with split_class_names
    from kubeseg.data.channels import split_class_names

    assert split_class_names(args.class_names) == ["a", "b"]


def test_building_the_parser_imports_neither_torch_nor_kfp():
    code = ("import sys; from kubeseg.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'torchvision', 'kfp', 'kubernetes', 'kserve', 'optuna'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("verb", ["", *sorted(cli.VERBS)])
def test_help_imports_neither_numpy_nor_torch(verb):
    argv = [verb, "--help"] if verb else ["--help"]
    code = ("import contextlib, io, runpy, sys\n"
            f"sys.argv = ['kubeseg', *{argv!r}]\n"
            "with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
            "    try:\n"
            "        runpy.run_module('kubeseg', run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "assert shown.getvalue().startswith('usage: kubeseg'), shown.getvalue()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"kubeseg {' '.join(argv)} imported {result.stdout}"


def test_the_defaults_shown_in_help_are_the_ones_the_code_uses():
    from kubeseg.serving import batch
    from kubeseg.serving import admission, defaults, onnx_model, predictor, server

    for module in (predictor, server, admission, onnx_model, batch):
        for name in dir(defaults):
            if name.isupper() and hasattr(module, name):
                assert getattr(module, name) == getattr(defaults, name), (module.__name__, name)
    assert (batch.DEFAULT_BATCH_SIZE, batch.SUMMARY_FILE) == (defaults.DEFAULT_BATCH_SIZE,
                                                              defaults.SUMMARY_FILE)
    args = cli.build_parser().parse_args(["predict", "m", "--input", "i", "--output", "o"])
    assert (args.batch_size, args.max_pixels, args.tile_size, args.precision) == (
        defaults.DEFAULT_BATCH_SIZE, defaults.DEFAULT_MAX_PIXELS, defaults.DEFAULT_TILE_SIZE,
        "float32")
    args = cli.build_parser().parse_args(["serve", "m"])
    assert (args.max_batch_size, args.memory_budget_mib, args.max_request_bytes) == (
        defaults.DEFAULT_MAX_BATCH_SIZE, defaults.DEFAULT_MEMORY_BUDGET_MIB,
        defaults.DEFAULT_MAX_REQUEST_BYTES)


def test_help_texts_take_ranges_from_the_declarations():
    result = kubeseg("validate", "--help", check=True)
    assert "[2, 254]" in " ".join(result.stdout.split())
    result = kubeseg("evaluate", "--help", check=True)
    assert "allowed [0, 1]" in " ".join(result.stdout.split())
