"""deploy/: the systemd unit verified by systemd itself, the Dockerfile read by Docker's own parser (no Docker
daemon or registry on the test machines: the image is not built here), the compose file and its example config."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
import yaml

from straw.config_load import load_config
from straw.runner import STOP_GRACE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REPO = DEPLOY.parent
RELAY_EXIT = 10.0  # RelayProcess.shutdown's wait for the relay child after the grace


def unit(name: str = "straw.service") -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(DEPLOY / name)
    return parser


def seconds(value: str) -> float:
    number, unit_ = re.fullmatch(r"(\d+)(s|min)", value).groups()  # type: ignore[union-attr]
    return float(number) * (60 if unit_ == "min" else 1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(("shipped", "instance"), [("straw.service", "straw.service"),
                                                   ("straw-load@.service", "straw-load@warehouse.service")])
def test_systemd_verifies_the_unit(tmp_path: Path, shipped: str, instance: str) -> None:
    # The unit as shipped, but for ExecStart: verify checks that the binary exists, and /opt/straw is not here.
    text = (DEPLOY / shipped).read_text().replace("/opt/straw/bin/straw", shutil.which("true") or "/bin/true")
    copy = tmp_path / instance
    copy.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    # systemd before 254 does not know the restart backoff keys; anything else would be a mistake in the unit
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and not re.search(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'", line)]
    assert problems == []


def test_the_unit_is_hardened_and_waits_out_the_stop_bound() -> None:
    service = unit()["Service"]
    assert service["User"] == "straw" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == "/var/lib/straw"
    assert service["StateDirectory"] == "straw" and service["UMask"] == "0077"
    assert service["Restart"] == "always" and "RestartSteps" in service
    assert service["KillSignal"] == "SIGTERM"
    assert seconds(service["TimeoutStopSec"]) > STOP_GRACE + RELAY_EXIT + 30  # and a batch of some 30 s


def test_the_loader_unit_runs_the_instance_loader_hardened_like_straw_and_stops_on_a_batch_boundary() -> None:
    loader, straw = unit("straw-load@.service")["Service"], unit()["Service"]
    assert loader["ExecStart"] == "/opt/straw/bin/straw load %i --config /etc/straw/straw.yaml"
    assert loader["KillSignal"] == "SIGTERM" and loader["Restart"] == "always"
    same = ("User", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths", "UMask", "SystemCallFilter",
            "CapabilityBoundingSet", "RestrictAddressFamilies", "EnvironmentFile", "TimeoutStopSec")
    assert {k: loader[k] for k in same} == {k: straw[k] for k in same}


def test_the_dockerfile_parses_and_runs_as_a_non_root_user_with_pinned_dependencies() -> None:
    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    stages: dict[str, list[dockerfile.Command]] = {"(global)": []}
    name = "(global)"  # ARGs before the first FROM
    for command in commands:
        if command.cmd == "FROM":
            name = command.value[-1]
            stages[name] = []
        else:
            stages[name].append(command)
    stages.pop("(global)", None)
    assert list(stages) == ["build", "build-browser", "runtime", "browser", "straw"]  # plain build: straw
    froms = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert all(f.endswith("-slim-bookworm") or f in stages for f in froms)
    for final in ("straw", "browser"):
        assert [c.value[0] for c in stages[final] if c.cmd == "USER"][-1] == "10001:10001"  # useradd --uid 10001
    installs = [c.original for c in commands if c.cmd == "RUN" and "pip install" in c.original]
    assert installs and all("-c constraints.txt" in line for line in installs)
    chromium = [name for name, body in stages.items() if any("chromium" in c.original for c in body if c.cmd == "RUN")]
    assert chromium == ["browser"]
    assert any(c.cmd == "VOLUME" and "/var/lib/straw" in c.original for c in stages["runtime"])
    for copy in (c for c in stages["build"] if c.cmd == "COPY"):
        for source in copy.value[:-1]:
            assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                            check=False)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_compose_runs_straw_beside_a_persistent_redis_with_the_unit_stop_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    straw, redis = compose["services"]["straw"], compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert straw["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile", "target": "straw"}
    assert any(v.endswith(":/var/lib/straw") for v in straw["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in straw["ports"])
    assert seconds(straw["stop_grace_period"]) == seconds(unit()["Service"]["TimeoutStopSec"])
    assert straw["environment"]["REDIS_URL"] == "redis://redis:6379/0"

    monkeypatch.setenv("REDIS_URL", straw["environment"]["REDIS_URL"])
    monkeypatch.setenv("ERP_DB_PASSWORD", "deploy-example-pw-5190")  # registered as a secret: unique
    config = load_config(DEPLOY / "straw.example.yaml")
    assert str(config.outbox.path) == "/var/lib/straw/outbox.db"
    assert config.metrics is not None and config.metrics.port == 9108
