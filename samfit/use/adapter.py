"""Reading a `samfit export --format adapter` file as a run: the trained tensors, and in the metadata the run's
settings (`config`), the SAM checkpoint's MD5 and the path it had when exported. `samfit.load_run` rebuilds the
model from it as from the run folder: SAM from a checkpoint with that MD5 (the recorded path, else the run's
--checkpoint, else samfit's checkpoint folder), or, for `tiny`, SAM's random initialisation drawn again from the
recorded seed; then the trained tensors."""
from __future__ import annotations

import json
from pathlib import Path

from samfit.errors import SamfitError

FORMAT = "samfit-adapter"


def _sam_path(meta: dict, config) -> str:
    """The first existing place for the adapter's SAM checkpoint; else the recorded one (named in the error)."""
    from samfit.model.backbones import resolve_checkpoint

    candidates = [meta.get("sam_checkpoint_path"), config.checkpoint]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    try:
        return str(resolve_checkpoint(config.model, None))
    except SamfitError:
        return next((c for c in candidates if c), "<samfit checkpoint folder>")


def read_adapter(path: Path) -> tuple:
    """(path, run config, record, trained tensors) of an adapter file, the fields of load.RunRecord; a clear
    error for a file that is not one."""
    from samfit.config import RunConfig

    try:
        from safetensors import safe_open
    except ImportError:
        raise SamfitError("Reading an adapter file needs the safetensors package: pip install safetensors (a "
                          "samfit dependency; reinstall samfit with `make install`).") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a damaged or foreign file raises many types
        raise SamfitError(f"{path} is not a readable safetensors file ({type(exc).__name__}). Give a run folder "
                          f"or a file written by `samfit export RUN --format adapter`.") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise SamfitError(f"{path} is a safetensors file but not a samfit adapter (no '{FORMAT}' metadata). Give "
                          f"a run folder or a file written by `samfit export RUN --format adapter`.")
    try:
        config = RunConfig(**json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError, ValueError, SamfitError) as exc:
        raise SamfitError(f"The run settings in adapter {path} cannot be read ({exc}): it was written by another "
                          f"samfit version ({meta.get('samfit', 'unknown')}). Export it again from its run folder "
                          f"with this version.") from None
    md5 = meta.get("sam_checkpoint_md5")
    metrics = {"sam_checkpoint": {"path": _sam_path(meta, config), "md5": md5}} if md5 else {}
    return path, config, metrics, tensors
