"""The fleet's command line: what a front host passes on to its workers, and what it refuses."""

from __future__ import annotations

import os

import pytest

from runtime.cli_args import Where
from runtime.fleet.workers import worker_specs
from runtime.policy_server.flags import OPTIONS, parse_args, worker_argv


def test_workers_get_the_parsed_model_and_serving_values_and_none_of_the_front_hosts():
    argv = [
        "--workers", "2", "--host=0.0.0.0", "--router-port", "6000", "--config", "pi05_tiny", "--fixed-reply",
        "--ws-port=0", "--max-batch", "4", "--curve-secret", "s.key_secret", "--curve-clients", "dir",
        "--deadline=7", "--log-level", "debug", "--image-resolutions", "48x64,96x128", "--tokenizer", "tok.model",
        "--ready-file", "r.json", "--allow-origin", "https://a", "--worker-port", "7000",
    ]  # fmt: skip
    assert worker_argv(parse_args(argv)) == [
        "--config", "pi05_tiny", "--tokenizer", os.path.abspath("tok.model"), "--max-batch", "4",
        "--image-resolutions", "48x64,96x128", "--deadline", "7.0", "--fixed-reply", "--log-level", "DEBUG",
    ]  # fmt: skip


def test_a_workers_command_line_parses_back_to_the_front_hosts_values():
    front = parse_args(["--workers", "2", "--checkpoint", "gs://b/c", "--max-queue", "9", "--rtc-method", "identity"])
    worker = parse_args(["--join", "ipc:///tmp/w", *worker_argv(front)])
    for option in OPTIONS:
        if option.where is Where.BOTH:
            assert getattr(worker, option.dest) == getattr(front, option.dest), option.flags


def test_every_option_is_marked_and_declared_once():
    flags = [f for option in OPTIONS for f in option.flags]
    assert len(flags) == len(set(flags))
    assert {o.where for o in OPTIONS} == {Where.FRONT, Where.WORKER, Where.BOTH}


def test_each_worker_gets_its_device():
    gpus = worker_specs(0, (2, 5))
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"], s.argv) for s in gpus] == [("gpu2", "2", ()), ("gpu5", "5", ())]
    cpus = worker_specs(3, ())
    assert [s.name for s in cpus] == ["cpu0", "cpu1", "cpu2"]
    assert all(s.argv[0] == "--cpus" and "intra_op_parallelism_threads=1" in s.env["XLA_FLAGS"] for s in cpus)


@pytest.mark.parametrize(
    "argv",
    [
        ["--workers", "2", "--gpu-ids", "0"],
        ["--workers", "2", "--join", "tcp://h:1"],
        ["--join", "not an endpoint"],
        ["--join", "tcp://h:1", "--demo"],
        ["--gpu-ids", "0,0"],
        ["--gpu-ids", "a"],
        ["--workers", "0"],
        ["--cpus", "4096"],
        ["--join-curve-key", "k"],
        ["--worker-curve-secret", "s", "--worker-curve-clients", "d"],
    ],
)
def test_contradictory_fleet_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_workers_join_endpoint_is_normalised_at_parsing():
    assert parse_args(["--join", "127.0.0.1:5557"]).join == "tcp://127.0.0.1:5557"
