"""Site configuration: every problem at once with its line, what each service runs, and a real
engine + filter IOC started from one site file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cdae.children import free_port
from cdae.deploy.site import KeyLines, SiteError, check_site, epics_env_file, load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ioc"))
from ioc_helpers import IOC_PORT, Stack, cdae, string_of, value_of, wait_for, write_tiny_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "site.example.toml"

BAD = """\
models_dir = "no-such-store"
[epics]
max_array_bytes = 10
[engines.gpu0]
bind = "tcp://127.0.0.1:5555"
backend = "torch-cpu"
gpu = 0
[engines.gpu1]
bind = "tcp://127.0.0.1:5555"
queue = 0
[engines.gpu2]
bind = "tcp://127.0.0.1:5555"
[cameras.cam1]
source = "13SIM1:image1:"
prefix = "13SIM1:CDAE1:"
engine = ["gpu0", "gpu9"]
[cameras.cam2]
prefix = "13SIM1:CDAE1:"
engine = "gpu0"
bogus = 1
[cameras.cam3]
source = "13SIM1:image1:"
prefix = "13SIM1:CDAE1:"
engine = "gpu0"
"""


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_example_site_file_is_valid_apart_from_its_store() -> None:
    assert check_site(EXAMPLE, check_models=False) == []
    site = load_site(EXAMPLE)
    assert set(site.engines) == {"gpu0"} and set(site.cameras) == {"cam1"}


def test_example_with_the_shipped_store_passes_the_model_check(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('models_dir = "/var/lib/cdae/models"', f'models_dir = "{REPO / "models"}"')
    assert check_site(_site(tmp_path, text)) == []


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    problems = check_site(_site(tmp_path, BAD))
    found = {(p.line, p.where) for p in problems}
    assert found == {
        (1, "models_dir"),  # relative to the site file, and absent
        (3, "epics.max_array_bytes"),
        (7, "engines.gpu0.gpu"),  # a GPU for a CPU backend
        (10, "engines.gpu1.queue"),  # schema error in one engine ...
        (11, "engines.gpu2.control"),  # derived control port clashes too: points at the table
        (12, "engines.gpu2.bind"),  # ... does not hide the port clash of another
        (16, "cameras.cam1.engine"),  # gpu9 is not an engine
        (17, "cameras.cam2.source"),  # a missing key points at its table
        (20, "cameras.cam2.bogus"),
        (23, "cameras.cam3.prefix"),  # same output prefix as cam1
    }, "\n".join(map(str, problems))
    assert any("gpu9" in p.message for p in problems)
    assert any("already used by engines.gpu0.bind" in p.message for p in problems)


def test_broken_toml_is_one_problem_with_its_line(tmp_path: Path) -> None:
    (problem,) = check_site(_site(tmp_path, "[engines.a]\nbind = 'tcp://x:1'\nqueue = = 3\n"))
    assert problem.line == 3 and "not valid TOML" in problem.message


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    (problem,) = check_site(tmp_path / "nope.toml")
    assert "cannot read" in problem.message
    with pytest.raises(SiteError, match="cannot read"):
        load_site(tmp_path / "nope.toml")


def test_load_site_refuses_a_bad_file_and_names_the_check_command(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="cdae config check"):
        load_site(_site(tmp_path, BAD))


def test_services_get_their_effective_configs(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    site = load_site(_site(tmp_path, """
models_dir = "store"
[engines.a]
bind = "tcp://127.0.0.1:7001"
backend = "tensorrt"
gpu = 1
backend_options = {precision = "fp16"}
[engines.b]
bind = "tcp://127.0.0.1:7003"
control = "tcp://127.0.0.1:7100"
[cameras.c]
source = "X:image1:"
prefix = "X:CDAE1:"
engine = ["a", "b"]
queue_size = 4
pva = true
"""))
    eng = site.engine_config("a")
    assert eng.models_dir == tmp_path / "store"  # relative to the file
    assert eng.backend_options.device == "cuda:1" and eng.backend_options.precision == "fp16"
    ioc = site.ioc_config("c")
    assert ioc.engine == ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7003"]
    assert ioc.control_endpoint() == "tcp://127.0.0.1:7002"  # the first engine's control channel
    assert ioc.queue_size == 4 and ioc.pva
    with pytest.raises(SiteError, match="no camera named 'd'.*known: c"):
        site.ioc_config("d")


def test_epics_environment_file() -> None:
    text = epics_env_file(load_site(EXAMPLE))
    assert 'EPICS_CA_AUTO_ADDR_LIST="NO"' in text
    assert 'EPICS_CA_ADDR_LIST="127.0.0.1"' in text
    assert 'EPICS_CA_MAX_ARRAY_BYTES="100000000"' in text
    # PV Access: served on the same interfaces as CA, searched where the site says
    assert 'EPICS_PVAS_INTF_ADDR_LIST="127.0.0.1"' in text and 'EPICS_PVA_AUTO_ADDR_LIST="NO"' in text
    assert 'EPICS_PVA_ADDR_LIST="127.0.0.1"' in text


def test_key_lines_follow_tables_and_dotted_keys() -> None:
    lines = KeyLines('a = 1\n# [x]\n[t.u]\n"b" = 2\nc.d = 3\n[[arr]]\ne = 4\n')
    assert lines.find(("a",)) == 1
    assert lines.find(("t", "u", "b")) == 4
    assert lines.find(("t", "u", "c", "d")) == 5
    assert lines.find(("t", "u", "missing")) == 3
    assert lines.find(("arr", "e")) == 7
    assert lines.find(("nowhere",)) is None


def test_site_module_does_not_import_torch() -> None:
    code = "import sys, cdae.deploy.site; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_config_cli(tmp_path: Path) -> None:
    bad = subprocess.run(cdae("config", "check", str(_site(tmp_path, BAD))), capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{tmp_path / 'site.toml'}:16: cameras.cam1.engine: no engine named 'gpu9'" in bad.stdout
    assert "10 problem(s)" in bad.stderr
    env = subprocess.run(cdae("config", "epics-env", str(EXAMPLE)), capture_output=True, text=True, check=True)
    assert env.stdout.startswith("# EPICS environment")
    engine = subprocess.run(cdae("engine", "--config", str(EXAMPLE), "--name", "nope"), capture_output=True,
                            text=True)
    assert engine.returncode == 2 and "no engine named 'nope'" in engine.stderr


def test_engine_and_ioc_run_from_one_site_file(tmp_path: Path) -> None:
    store = write_tiny_store(tmp_path / "models")
    stack = Stack(store)
    port = free_port()
    site = _site(tmp_path, f"""
models_dir = "models"
[epics]
auto_addr_list = false
[engines.e1]
bind = "tcp://127.0.0.1:{port}"
control = "tcp://127.0.0.1:{free_port()}"
backend = "torch-cpu"
model = "tiny:1"
threads = 1
[cameras.cam1]
source = "{stack.camera_prefix}"
prefix = "{stack.ioc_prefix}"
engine = "e1"
model = "tiny:2"
engine_timeout_s = 3
""")
    check = subprocess.run(cdae("config", "check", str(site)), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    try:
        engine = stack.start("engine", cdae("engine", "--config", str(site), "--name", "e1"), "engine")
        assert engine.match is not None and engine.match["data"] == f"tcp://127.0.0.1:{port}"
        stack.camera()
        stack.start("ioc", cdae("ioc", "--config", str(site), "--name", "cam1"), "ioc", IOC_PORT)
        p = stack.ioc_prefix
        wait_for(lambda: string_of(p + "Model_RBV") == "tiny:2", what="the camera's model from the site file")
        first = int(value_of(p + "UniqueId_RBV"))
        wait_for(lambda: int(value_of(p + "UniqueId_RBV")) > first, what="denoised frames")
    except BaseException:
        print(stack.output())
        raise
    finally:
        stack.stop_all()


def test_display_and_archiver_list_take_the_camera_from_the_site_file(tmp_path: Path) -> None:
    bob = tmp_path / "cam1.bob"
    subprocess.run(cdae("display", "--config", str(EXAMPLE), "--name", "cam1", "-o", str(bob)), check=True,
                   capture_output=True)
    text = bob.read_text()
    assert "13SIM1:CDAE1:" in text and "13SIM1:image1:" in text
    out = subprocess.run(cdae("archiver-pvs", "--config", str(EXAMPLE), "--name", "cam1"), check=True,
                         capture_output=True, text=True).stdout
    assert '"pv": "13SIM1:CDAE1:UniqueId_RBV"' in out
    missing = subprocess.run(cdae("display", "-o", str(bob)), capture_output=True, text=True)
    assert missing.returncode == 2 and "--config SITE --name CAMERA" in missing.stderr


def test_camera_health_limits_come_from_the_site_file_and_are_checked(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    site = load_site(EXAMPLE).ioc_config("cam1")
    assert (site.health.limits.new_bad_pixels.minor, site.health.limits.new_bad_pixels.major) == (10, 100)
    assert site.health.window_frames == 32
    bad = text.replace("health.limits.new_bad_lines = { minor = 1, major = 3 }",
                       "health.limits.new_bad_lines = { minor = 3, major = 1 }")
    line = next(i for i, ln in enumerate(bad.splitlines(), 1) if ln.startswith("health.limits.new_bad_lines"))
    problems = check_site(_site(tmp_path, bad), check_models=False)
    assert [(p.line, p.where) for p in problems] == [(line, "cameras.cam1.health.limits.new_bad_lines")], problems
    assert "below minor" in problems[0].message


def test_ports_clash_across_wildcard_and_loopback_names_and_with_triton(tmp_path: Path) -> None:
    """`*` takes the port on every interface and `localhost` is 127.0.0.1: both clash with a fixed bind on
    the same port, as a loopback Triton server's gRPC and metrics ports do; other hosts and ports do not."""
    text = (
        '[engines.a]\nbind = "tcp://*:5555"\nbackend = "torch-cpu"\n'  # control 5556
        '[engines.b]\nbind = "tcp://127.0.0.1:5555"\ncontrol = "tcp://127.0.0.1:5600"\nbackend = "torch-cpu"\n'
        '[engines.c]\nbind = "tcp://localhost:5600"\ncontrol = "tcp://127.0.0.1:5700"\nbackend = "torch-cpu"\n'
        '[engines.d]\nbind = "tcp://10.0.0.5:5700"\ncontrol = "tcp://10.0.0.5:5701"\nbackend = "torch-cpu"\n'
        '[engines.d.curve]\nsecret_key_file = "k"\nallowed_clients_dir = "c"\n'
        '[triton.t]\nurl = "triton://127.0.0.1:5556/cdae-default"\nmetrics_port = 5701\n'
    )
    problems = check_site(_site(tmp_path, text), check_models=False)
    clashes = {p.where: p.message for p in problems if "already used by" in p.message}
    assert clashes == {
        "engines.b.bind": "tcp://127.0.0.1:5555 is already used by engines.a.bind",
        "engines.c.bind": "tcp://localhost:5600 is already used by engines.b.control",
        "triton.t.url": "port 5556 is already used by engines.a.control",
        "triton.t.metrics_port": "metrics port 5701 is already used by engines.d.control",
    }, "\n".join(map(str, problems))
    from cdae.endpoints import ports_clash

    assert ports_clash(("0.0.0.0", 1), ("10.1.1.1", 1)) and not ports_clash(("10.1.1.1", 1), ("10.1.1.2", 1))
    assert not ports_clash(("*", 1), ("*", 2))
