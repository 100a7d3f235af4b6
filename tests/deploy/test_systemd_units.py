"""systemd units: the committed copies are the generated ones, systemd accepts them, the install stages them."""

from __future__ import annotations

import configparser
import pwd
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from cdae.deploy.site import epics_env_file, load_site
from cdae.deploy.systemd import (
    ENGINE_TEMPLATE,
    IOC_TEMPLATE,
    TARGET,
    UnitSettings,
    render_units,
    write_units,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "site.example.toml"
VENV = Path(sys.prefix)  # this test's own virtual environment: systemd-analyze checks ExecStart exists
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _unit(text: str) -> configparser.ConfigParser:
    """A unit file's sections (keys keep their case; repeated keys such as Environment= are joined)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_committed_units_are_the_generated_defaults() -> None:
    units = render_units(UnitSettings())
    assert set(units) == {TARGET, ENGINE_TEMPLATE, IOC_TEMPLATE}
    for name, text in units.items():
        committed = REPO / "systemd" / name
        assert committed.read_text() == text, f"systemd/{name} is stale: run `cdae systemd units -o systemd`"


@pytest.mark.parametrize(("template", "kind"), [(ENGINE_TEMPLATE, "engine"), (IOC_TEMPLATE, "ioc")])
def test_services_are_notify_with_watchdog_and_confined(template: str, kind: str) -> None:
    s = UnitSettings()
    unit = _unit(render_units(s)[template])
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0 and svc["Restart"] == "on-failure" and int(svc["RestartSec"]) > 0
    assert svc["ExecStart"] == f"/opt/cdae/venv/bin/cdae {kind} --config /etc/cdae/site.toml --name %i"
    assert svc["User"] == svc["Group"] == "cdae"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": ""}.items():
        assert svc[key] == value, key
    assert unit["Install"]["WantedBy"] == TARGET and unit["Unit"]["PartOf"] == TARGET
    if kind == "engine":
        assert svc["ReadOnlyPaths"] == "-/var/lib/cdae/models"
        assert svc["CacheDirectory"] == "cdae" and "XDG_CACHE_HOME=%C/cdae" in svc["Environment"]
        assert "PrivateDevices" not in svc  # the GPU's /dev/nvidia* must stay visible
    else:
        assert svc["EnvironmentFile"] == "/etc/cdae/epics.env" and svc["PrivateDevices"] == "yes"


def test_settings_refuse_paths_systemd_cannot_take() -> None:
    for bad in ({"venv": "opt/cdae"}, {"config": "/etc/my site.toml"}, {"models_dir": "/var/%i"}, {"user": "Root!"}):
        with pytest.raises(ValueError):
            UnitSettings.model_validate(bad)


def test_camera_dropins_order_each_ioc_after_its_engines(tmp_path: Path) -> None:
    units = render_units(UnitSettings(), {"cam1": ["gpu0"], "cam2": ["gpu0", "gpu1"]})
    dropin = _unit(units["cdae-ioc@cam2.service.d/engines.conf"])["Unit"]
    assert dropin["Wants"] == dropin["After"] == "cdae-engine@gpu0.service cdae-engine@gpu1.service"
    write_units(tmp_path, units)
    # cam2 leaves the site: its generated drop-in goes, a drop-in the administrator wrote stays
    own = tmp_path / "cdae-ioc@cam1.service.d" / "local.conf"
    own.write_text("[Service]\nNice=5\n")
    write_units(tmp_path, render_units(UnitSettings(), {"cam1": ["gpu0"]}))
    assert not (tmp_path / "cdae-ioc@cam2.service.d").exists()
    assert (tmp_path / "cdae-ioc@cam1.service.d" / "engines.conf").exists() and own.exists()


def _verify(unit_dir: Path, *names: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(unit_dir / n) for n in names)],
                          capture_output=True, text=True, cwd=unit_dir, timeout=120, check=False)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (systemd's own checker)")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    assert (VENV / "bin" / "cdae").exists(), "cdae is not installed in this environment (pip install -e .)"
    site = load_site(EXAMPLE)
    settings = UnitSettings(venv=PurePosixPath(VENV), models_dir=PurePosixPath(site.models_dir))
    write_units(tmp_path, render_units(settings, {n: list(c.engine) for n, c in site.cameras.items()}))
    # instances load through their templates (and cam1 through its drop-in too)
    r = _verify(tmp_path, TARGET, "cdae-engine@gpu0.service", "cdae-ioc@cam1.service")
    # verify warns about lines it ignores and still exits 0: a clean unit says nothing at all
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr

    broken = tmp_path / "broken"
    write_units(broken, render_units(UnitSettings(venv=PurePosixPath("/nonexistent/venv"))))
    r = _verify(broken, "cdae-engine@gpu0.service")
    assert r.returncode != 0 and "/nonexistent/venv/bin/cdae" in r.stderr


def test_install_script_stages_everything_below_destdir(tmp_path: Path) -> None:
    had_user = _user_exists("cdae")
    dest = tmp_path / "stage"
    env = {"PATH": "/usr/bin:/bin", "DESTDIR": str(dest), "VENV": str(VENV)}
    r = subprocess.run(["sh", str(REPO / "systemd" / "install.sh")], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _user_exists("cdae") == had_user  # staging never creates users

    etc = dest / "etc"
    assert (etc / "cdae" / "site.toml").read_text() == EXAMPLE.read_text()
    assert (etc / "cdae" / "epics.env").read_text() == epics_env_file(load_site(EXAMPLE))
    system = etc / "systemd" / "system"
    settings = UnitSettings(venv=PurePosixPath(VENV))
    for name, text in render_units(settings, {"cam1": ["gpu0"]}).items():
        assert (system / name).read_text() == text, name
    store = dest / "var" / "lib" / "cdae" / "models"
    shipped = sorted(p.relative_to(REPO / "models") for p in (REPO / "models").glob("*/*/manifest.json"))
    assert shipped and sorted(p.relative_to(store) for p in store.glob("*/*/manifest.json")) == shipped
    assert not list(store.rglob("cache"))  # derived artefacts of the source tree are not copied
    assert (store / shipped[0]).stat().st_mode & 0o777 == 0o644

    # the operator edits the site; a second install keeps the edit and follows it
    site = etc / "cdae" / "site.toml"
    edited = site.read_text().replace("[cameras.cam1]", "[cameras.cam7]").replace('addr_list = ["127.0.0.1"]',
                                                                                    'addr_list = ["10.0.0.255"]')
    site.write_text(edited)
    r = subprocess.run(["sh", str(REPO / "systemd" / "install.sh")], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert site.read_text() == edited
    assert 'EPICS_CA_ADDR_LIST="10.0.0.255"' in (etc / "cdae" / "epics.env").read_text()
    assert (system / "cdae-ioc@cam7.service.d" / "engines.conf").exists()
    assert not (system / "cdae-ioc@cam1.service.d").exists()


def test_install_refuses_a_broken_site_file(tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    (dest / "etc" / "cdae").mkdir(parents=True)
    (dest / "etc" / "cdae" / "site.toml").write_text("[cameras.cam1]\nprefix = 3\n")
    r = subprocess.run([str(VENV / "bin" / "cdae"), "systemd", "install", "--destdir", str(dest), "--venv", str(VENV)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and "site.toml" in r.stderr
    assert not (dest / "etc" / "systemd").exists()  # no units for a site that cannot run


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
