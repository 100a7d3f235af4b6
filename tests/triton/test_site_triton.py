"""The site file and the IOC's configuration know a Triton server as an engine kind (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cdae.deploy.site import check_site, load_site
from cdae.ioc.filter import IocConfig

SITE = """
models_dir = "{models}"
[triton.farm]
url = "triton://127.0.0.1:8001/tiny"
gpus = [0, 1]
[triton.farm.frame_path]
backend = "torch-cuda"
[cameras.cam1]
source = "CAM1:image1:"
prefix = "CAM1:CDAE1:"
engine = "farm"
"""


def test_a_camera_names_a_triton_server_like_an_engine(tmp_path: Path, triton_store: Path) -> None:
    f = tmp_path / "site.toml"
    f.write_text(SITE.format(models=triton_store))
    assert check_site(f) == []
    site = load_site(f)
    assert site.ioc_config("cam1").engine == ["triton://127.0.0.1:8001/tiny"]
    section = site.triton_section(None)
    assert [g["gpus"] for g in section.plan.groups()] == [[0], [1]]
    assert section.frame_path.backend == "torch-cuda"


def test_site_problems_of_triton_sections(tmp_path: Path, triton_store: Path) -> None:
    f = tmp_path / "site.toml"
    f.write_text(SITE.format(models=triton_store).replace("127.0.0.1:8001/tiny", "10.1.2.3:8001/nosuch")
                 + '[engines.e1]\nbind = "tcp://127.0.0.1:5555"\nmodel = "tiny"\n'
                 + '[cameras.cam2]\nsource = "CAM2:image1:"\nprefix = "CAM2:CDAE1:"\nengine = ["farm", "e1"]\n'
                 + '[triton.bad]\nurl = "triton://nohost/x"\n')
    text = "\n".join(str(p) for p in check_site(f))
    assert "no authentication" in text and "no model named 'nosuch'" in text
    assert "a camera names one, alone" in text and "expected triton://HOST:PORT/MODEL" in text


def test_ioc_config_takes_one_triton_url() -> None:
    ok = IocConfig(source="C:", prefix="P:", engine="triton://127.0.0.1:8001/tiny")
    assert ok.triton and ok.control_endpoint() == "triton://127.0.0.1:8001/tiny"
    with pytest.raises(ValidationError, match="one URL"):
        IocConfig(source="C:", prefix="P:", engine="triton://127.0.0.1:8001/tiny,tcp://127.0.0.1:5555")
    with pytest.raises(ValidationError, match="HOST:PORT/MODEL"):
        IocConfig(source="C:", prefix="P:", engine="triton://127.0.0.1/tiny")
