"""main.py: streams the completion as '› text'; user errors are one line and exit code 2."""
import subprocess
import sys

import pytest

import main
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    make_hf_llama(path, max_positions=64)
    return convert(str(path))


def test_streams_completion_with_the_marker(model_dir, capsys):
    assert main.main([model_dir, "-p", "Hello", "--max_tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("› ") and out.endswith("\n")


def test_sampling_flags_are_accepted(model_dir, capsys):
    argv = [model_dir, "-p", "Hi", "--max_tokens", "3", "--temperature", "0.8", "--top_k", "20",
            "--top_p", "0.9", "--min_p", "0.05", "--repetition_penalty", "1.1", "--seed", "3",
            "--stop", "zzz", "--dtype", "float32"]
    assert main.main(argv) == 0
    first = capsys.readouterr().out
    assert main.main(argv) == 0
    assert capsys.readouterr().out == first


def test_hf_folder_with_fmt_hf(tmp_path, capsys):
    make_hf_llama(tmp_path)
    assert main.main([str(tmp_path), "-p", "Hi", "--max_tokens", "2", "--fmt", "hf"]) == 0
    assert capsys.readouterr().out.startswith("› ")


@pytest.mark.parametrize("argv, message", [
    (["{model}", "-p", "Hi", "--max_tokens", "0"], "error: --max_tokens must be >= 1, got 0"),
    (["{missing}", "-p", "Hi"], "error: model path not found"),
    (["{model}", "-p", "Hi", "--fmt", "onnx"], "error: unknown fmt 'onnx'"),
    (["{model}", "-p", "Hi " * 100], "error: the prompt has"),
    (["{model}", "-p", "Hi", "--device", "tpu"], "error: unknown device 'tpu'"),
    (["{model}", "-p", "Hi", "--temperature", "-1"], "error: temperature must be >= 0"),
])
def test_user_errors_are_one_line_and_exit_2(model_dir, tmp_path, capsys, argv, message):
    argv = [a.format(model=model_dir, missing=str(tmp_path / "nope")) for a in argv]
    assert main.main(argv + ["--device", "cpu"] if "--device" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_layers_split_over_devices_from_the_cli(model_dir, capsys):
    plain = [model_dir, "-p", "Hello", "--max_tokens", "4", "--device", "cpu"]
    assert main.main(plain) == 0
    want = capsys.readouterr().out
    for split in ("1,1", "memory"):
        assert main.main(plain[:-2] + ["--devices", "cpu,cpu", "--split", split]) == 0
        assert capsys.readouterr().out == want


def test_bad_split_is_one_line(model_dir, capsys):
    assert main.main([model_dir, "-p", "Hi", "--devices", "cpu,cpu", "--split", "a,b"]) == 2
    assert capsys.readouterr().err.startswith("error: --split must be layer counts")
    assert main.main([model_dir, "-p", "Hi", "--devices", "cpu,cpu", "--split", "1,5"]) == 2
    assert "summing to 2 layers" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="model path not found"):
        main.main([str(tmp_path / "nope"), "-p", "Hi", "--debug"])


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--max_tokens", "--fmt", "--device", "--devices", "--dtype", "--temperature",
                 "--top_k", "--top_p", "--min_p", "--repetition_penalty", "--seed", "--stop",
                 "--chat", "--kv_cache_tokens", "--debug", "--devices", "--split"):
        assert flag in out


def test_truncated_weights_exit_2_from_a_subprocess(model_dir, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "state_dict.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([sys.executable, "main.py", str(broken), "-p", "Hi", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read") and "Traceback" not in result.stderr
