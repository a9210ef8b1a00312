"""Hardening, structure: hostile config files are refused promptly, with bounded output.

Deeply nested YAML (20,000 and 200,000 levels, flow and block style, in files, overrides and
dicts), alias bombs ("billion laughs" and friends: output length stays bounded), files that are not
regular files (a FIFO, /dev/zero, a socket, a symlink to a device: refused without blocking, each
run under a timeout), oversized files and huge values. Each: ConfigError or exit 2, no traceback,
the path or key named, nothing created.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import pytest
import yaml

from stackwise.cli import main
from stackwise.config import MAX_CONFIG_BYTES, MAX_SHOWN, MAX_YAML_DEPTH, ConfigError, StackWiseConfig
from stackwise.training.extend import _extension_phases

GOOD = {
    "model": {"d_model": 32, "n_heads": 2, "vocab_size": 300, "max_seq_len": 64,
              "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
    "training": {"batch_size": 4, "seq_len": 32, "total_steps": 4},
    "data": {"use_dummy_data": True},
}
OUTPUT_LIMIT = 3000  # characters of stderr any refusal below may print


def cli(argv: list[str], capsys, timeout: float = 20.0) -> tuple[int, str]:
    """Run the command in a watchdog thread: a regression that blocks fails the test instead of
    hanging the suite."""
    result: dict = {}

    def target() -> None:
        try:
            result["code"] = main(argv)
        except SystemExit as exit_:
            result["code"] = exit_.code
        except BaseException as err:  # reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{argv} still running after {timeout}s"
    assert "error" not in result, result.get("error")
    return result["code"], capsys.readouterr().err


def refused_promptly(path, capsys, *words: str) -> str:
    start = time.monotonic()
    code, err = cli(["train", str(path)], capsys)
    assert time.monotonic() - start < 15
    assert code == 2, err
    assert "Traceback" not in err and len(err) < OUTPUT_LIMIT, err[:500]
    for word in words:
        assert word in err, err
    return err


# ---- depth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [MAX_YAML_DEPTH + 1, 20_000, 200_000])
@pytest.mark.parametrize("style", ["flow_list", "flow_map", "block_map"])
def test_deep_yaml_files_are_refused(tmp_path, capsys, monkeypatch, levels, style):
    monkeypatch.chdir(tmp_path)
    if style == "block_map" and levels > 2000:
        levels = 2000  # indentation grows with depth: 2,000 levels is already 4 MB of spaces
    if style == "flow_list":
        text = "model: " + "[" * levels + "]" * levels
    elif style == "flow_map":
        text = "model: " + "{a: " * levels + "1" + "}" * levels
    else:
        text = "model:\n" + "".join(" " * (2 * i + 2) + "a:\n" for i in range(levels)) + " " * (2 * levels + 2) + "1\n"
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    refused_promptly(path, capsys, str(path), "nested more than")
    assert not (tmp_path / "runs").exists()


def test_deep_override_values_and_dicts_are_refused(tmp_path, capsys):
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump({**GOOD, "run": {"dir": str(tmp_path / "runs")}}))
    for value in ("[" * 20_000 + "]" * 20_000, "{a: " * 20_000 + "1" + "}" * 20_000):
        code, err = cli(["plan", str(config), f"data.paths={value}", "--no-data"], capsys)
        assert code == 2 and "Traceback" not in err and "data.paths" in err and len(err) < OUTPUT_LIMIT, err[:500]
    deep: dict = {}
    node = deep
    for _ in range(20_000):
        node["a"] = {}
        node = node["a"]
    for bad in ({**GOOD, "model": deep}, {**GOOD, "data": {"paths": [deep]}}, deep):
        with pytest.raises(ConfigError) as err:
            StackWiseConfig.from_dict(bad)
        assert len(str(err.value)) < OUTPUT_LIMIT
    assert not (tmp_path / "runs").exists()


# ---- alias bombs -------------------------------------------------------------------------------------


def laughs(levels: int = 9, width: int = 9) -> str:
    """The classic: each of `levels` anchors lists the previous one `width` times."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f'{names[0]}: &{names[0]} [{", ".join(["lol"] * width)}]']
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


def flow_laughs(levels: int = 9, width: int = 9) -> str:
    """The same bomb as one flow value (an override on the command line)."""
    parts = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_billion_laughs_is_refused_with_short_output(tmp_path, capsys):
    bombs = {
        "classic.yaml": laughs(),  # 9^9 ≈ 387 million strings from ~400 bytes
        "under_a_key.yaml": "model: {d_model: 32, n_heads: 2}\ntraining: {}\ndata: {paths: " + flow_laughs() + "}\n",
        "wide.yaml": "a: &a [" + ", ".join(["x"] * 1000) + "]\nb: [" + ", ".join(["*a"] * 2000) + "]\n",
        "deep_chain.yaml": "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200)),
        "self.yaml": "model: &m {d_model: *m}\n",
    }
    for name, text in bombs.items():
        path = tmp_path / name
        path.write_text(text)
        assert path.stat().st_size < 40_000
        err = refused_promptly(path, capsys, str(path))
        assert "refused" in err or "YAML" in err, (name, err)
    assert not (tmp_path / "runs").exists()


def test_the_classic_bomb_stays_small_in_every_entry_point(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs())
    assert len(path.read_bytes()) < 700
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_yaml(path)
    assert "expands to more than" in str(err.value) and len(str(err.value)) < 500
    with pytest.raises(ConfigError) as err:
        _extension_phases(path)
    assert len(str(err.value)) < 500
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump(GOOD))
    code, err = cli(["plan", str(config), "data.paths=" + flow_laughs()], capsys)
    assert code == 2 and len(err) < OUTPUT_LIMIT and "expands to more than" in err, err[:500]


def test_huge_values_are_echoed_short(tmp_path, capsys):
    big = "x" * 3_000_000
    for data in ({**GOOD, "model": {**GOOD["model"], "d_model": big}},
                 {**GOOD, "data": {"paths": [[big]] * 3}},
                 {**GOOD, "training": {"optimizer": {"lr": list(range(1_000_000))}}},
                 {**GOOD, "model": {f"k{i}": i for i in range(10_000)}}):
        with pytest.raises(ConfigError) as err:
            StackWiseConfig.from_dict(data)
        text = str(err.value)
        assert len(text) < 12_000, len(text)
        assert "…" in text or "items)" in text or "more" in text
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "model": {**GOOD["model"], "d_model": big}}))
    err = refused_promptly(path, capsys, "model.d_model", f"{len(big):,} characters")
    assert err.count("x") < 2 * MAX_SHOWN + 100


# ---- what is not a regular file ------------------------------------------------------------------------


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, capsys):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    refused_promptly(fifo, capsys, str(fifo), "FIFO")
    with pytest.raises(ConfigError, match="FIFO"):
        _extension_phases(fifo)  # --extend FILE reads through the same guard
    code, err = cli(["plan", str(fifo)], capsys)
    assert code == 2 and "FIFO" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_character_devices_are_refused(tmp_path, capsys, device):
    if not os.path.exists(device):
        pytest.skip(f"{device} is missing here")
    refused_promptly(device, capsys, device, "character device")
    link = tmp_path / "innocent.yaml"
    link.symlink_to(device)
    refused_promptly(link, capsys, "character device")
    with pytest.raises(ConfigError, match="character device"):
        _extension_phases(link)


def test_a_socket_and_a_folder_are_refused(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        refused_promptly(path, capsys, "socket")
    finally:
        server.close()
    refused_promptly(tmp_path, capsys, "directory")


def test_files_over_the_size_limit_are_refused_unread(tmp_path, capsys):
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:  # sparse: costs no disk and no time to make
        handle.truncate(MAX_CONFIG_BYTES + 1)
    refused_promptly(huge, capsys, str(huge), "at most")
    with pytest.raises(ConfigError, match="at most"):
        _extension_phases(huge)
    just_under = tmp_path / "comments.yaml"
    just_under.write_text("# padding\n" * (MAX_CONFIG_BYTES // 20) + yaml.safe_dump(GOOD))
    StackWiseConfig.from_yaml(just_under)  # a large but legal file still loads
