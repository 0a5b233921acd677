"""Settings come from flags, else AIDC_* variables, else defaults."""

import pytest

from aidc_server.config import parse_args


def test_flags():
    s = parse_args(
        [
            "--checkpoint-dir",
            "/ck",
            "--model-name",
            "mnist",
            "--port",
            "9000",
            "--max-batch-size",
            "8",
            "--max-latency-ms",
            "2.5",
            "--quantize",
            "int8",
            "--watch-seconds",
            "30",
        ],
        environ={},
    )
    assert (s.checkpoint_dir, s.model_name, s.port, s.max_batch_size) == ("/ck", "mnist", 9000, 8)
    assert (s.max_latency_ms, s.quantize, s.watch_seconds, s.key_dir) == (2.5, "int8", 30.0, None)


def test_environment_fills_what_flags_leave_out():
    env = {
        "AIDC_CHECKPOINT_DIR": "/checkpoints/job",
        "AIDC_KEY_DIR": "/var/run/aidc/keys",
        "AIDC_KEK_FILE": "/var/run/aidc/kek/kek",
        "AIDC_MODEL_NAME": "m",
        "AIDC_PORT": "8081",
        "AIDC_QUANTIZE": "none",
    }
    s = parse_args(["--port", "7000"], environ=env)
    assert s.checkpoint_dir == "/checkpoints/job" and s.key_dir == "/var/run/aidc/keys"
    assert s.kek_file == "/var/run/aidc/kek/kek" and s.port == 7000 and s.quantize is None


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--checkpoint-dir", "/ck"],
        ["--checkpoint-dir", "/ck", "--model-name", "m", "--quantize", "int4"],
        ["--checkpoint-dir", "/ck", "--model-name", "m", "--tls-cert", "c.pem"],
        ["--checkpoint-dir", "/ck", "--model-name", "m", "--max-batch-size", "0"],
        ["--checkpoint-dir", "/ck", "--model-name", "m", "--port", "8081"],  # the gRPC default
        ["--checkpoint-dir", "/ck", "--model-name", "m", "--grpc-port", "-1"],
    ],
)
def test_bad_settings_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv, environ={})
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_environment_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--checkpoint-dir", "/ck", "--model-name", "m"], environ={"AIDC_PORT": "http"})
    assert e.value.code == 2
    assert "AIDC_PORT='http' is not a valid int" in capsys.readouterr().err


def test_the_limits_old_names_still_set_it_and_the_new_name_wins() -> None:
    base = ["--checkpoint-dir", "/ck", "--model-name", "m"]
    assert parse_args([*base, "--max-body-bytes", "1000"], environ={}).max_request_bytes == 1000
    assert parse_args(base, environ={"AIDC_MAX_BODY_BYTES": "2000"}).max_request_bytes == 2000
    both = {"AIDC_MAX_BODY_BYTES": "2000", "AIDC_MAX_REQUEST_BYTES": "3000"}
    assert parse_args(base, environ=both).max_request_bytes == 3000
    assert (
        parse_args(
            [*base, "--max-body-bytes", "1", "--max-request-bytes", "4000"], environ={}
        ).max_request_bytes
        == 4000
    )
