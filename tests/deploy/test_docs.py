"""docs/deployment.md: the settings table's defaults are the images' ENV."""

from __future__ import annotations

import re

from deploy_helpers import ROOT, image_env

IMAGES = ["Dockerfile.cpu", "Dockerfile.gpu"]


def settings_rows() -> list[tuple[list[str], list[str]]]:
    text = (ROOT / "docs" / "deployment.md").read_text()
    table = text.split("### Settings (environment of `docker/entrypoint.sh`)", 1)[1]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0].startswith("variable") or set(cells[0]) <= {"-", "|"}:
            continue
        names = re.findall(r"`([A-Z_]+)`", cells[0])
        rows.append((names, [c.strip() for c in cells[1].split(" / ")]))
    return rows


def test_settings_table_defaults_are_the_dockerfiles_env():
    envs = {name: image_env(name) for name in IMAGES}
    checked = set()
    for names, defaults in settings_rows():
        if len(defaults) != 2:
            continue
        if defaults[1] == "same":
            defaults[1] = defaults[0]
        for image, cell in zip(IMAGES, defaults):
            values = [v.strip() for v in cell.split(",")] if len(names) > 1 else [cell]
            for name, value in zip(names, values):
                env = envs[image]
                if value == "empty":
                    assert env.get(name) == "", (image, name, env.get(name))
                elif value == "unset":
                    assert name not in env, (image, name, env[name])
                elif re.fullmatch(r"`[^`]+`", value):
                    assert env.get(name) == value.strip("`"), (image, name, env.get(name), value)
                else:
                    continue        # prose ("the CPU flags above")
                checked.add((image, name))
    # The rows the issue found wrong (KVSPARSE_METHOD on GPU) and the new ones are checked.
    assert {("Dockerfile.gpu", "KVSPARSE_METHOD"), ("Dockerfile.gpu", "VLLM_DEFAULT_ARGS"),
            ("Dockerfile.cpu", "MODEL"), ("Dockerfile.gpu", "MODEL"),
            ("Dockerfile.cpu", "SHUTDOWN_TIMEOUT"), ("Dockerfile.gpu", "VLLM_API_KEY"),
            ("Dockerfile.cpu", "PORT"), ("Dockerfile.gpu", "HOST")} <= checked, sorted(checked)
