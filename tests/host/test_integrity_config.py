"""isovisord's [integrity] table: read from the config file, and every bad setting refused
with a sentence naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.host.config import DaemonConfig
from isovisor.host.integrity import IntegritySettings
from isovisor.security.integrity.errors import IntegrityError

PATHS = {"manifest": "/m.json", "release_key": "/r.pub", "policy": "/p.json",
         "policy_key": "/p.pub"}


def test_config_file_table(tmp_path: Path) -> None:
    f = tmp_path / "isovisord.toml"
    f.write_text('[integrity]\nmanifest = "/m.json"\nrelease_key = "/r.pub"\n'
                 'policy = "/p.json"\npolicy_key = "/p.pub"\ntpm = "swtpm"\n')
    config = DaemonConfig.load(f)
    s = IntegritySettings.from_table(config.extra["integrity"])
    assert s.manifest == Path("/m.json") and s.tpm == "swtpm"
    assert (s.platform_pcr, s.code_pcr) == (12, 13) and s.measure_root == Path("/")


@pytest.mark.parametrize(("table", "message"), [
    ({**PATHS, "colour": "red"}, "unknown settings colour"),
    ({"manifest": "/m.json"}, "release_key, policy, policy_key must be set"),
    ({**PATHS, "tpm": "hardware"}, "tpm: 'hardware' is not one of"),
    ({**PATHS, "platform_pcr": 24}, "platform_pcr: 24 is not a PCR index"),
    ({**PATHS, "code_pcr": "13"}, "code_pcr: '13' is not a PCR index"),
])
def test_bad_settings_are_named(table: dict[str, object], message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        IntegritySettings.from_table(table)
