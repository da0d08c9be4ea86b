"""Recipe configs: a YAML file plus `key=value` overrides from the command line.

`tether train teacher` reads `configs/teacher-toy.yaml` (the toy scale is
the default); `--scale wan1.3b` reads `configs/teacher-wan1.3b.yaml`;
`--config FILE` any other file. Overrides use dotted keys (`model.dim=128`)
and YAML values (`lr=1e-5`, `betas=[0,0.999]`).
"""

from pathlib import Path

import yaml

from ..errors import TetherError

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(recipe: str, scale: str = "toy", config: str | None = None) -> Path:
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise TetherError(f"config file not found: {config}")
        return path
    path = CONFIG_DIR / f"{recipe}-{scale}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise TetherError(f"no config for recipe '{recipe}' at scale '{scale}' (known: {', '.join(known)})")
    return path


def apply_overrides(cfg: dict, overrides) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise TetherError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise TetherError(f"cannot read the value of override '{item}'") from None
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TetherError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return cfg


def load_config(recipe: str, scale: str = "toy", config: str | None = None, overrides=()) -> dict:
    path = config_path(recipe, scale, config)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TetherError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    cfg.setdefault("recipe", recipe)
    if cfg["recipe"] != recipe:
        raise TetherError(f"{path} is a config for recipe '{cfg['recipe']}', not '{recipe}'")
    return apply_overrides(cfg, overrides)
