"""``push_to_hub``: share the trained model on the Hugging Face hub, as the diffusers training
scripts do (``--push_to_hub``, ``--hub_model_id``, ``--hub_token``, ``--hub_private_repo``).

- The repository (``hub_model_id``, or the output folder's name under the token's account) is
  created when training starts (``exist_ok``), so a bad token or name stops the run before
  days of GPU time rather than after; a resumed run finds it there.
- At the end, once the weights and the model card are written (main process), ONE commit
  uploads exactly :func:`upload_plan`'s files: the final weights (the files the backbone or
  method saved: ``pytorch_lora_weights.safetensors``, ``unet/``, ``transformer/``, CHATS'
  ``win/`` and ``lose/``), ``README.md`` (the model card), the validation grids and their
  ``index.json``, and ``training_curves.png``. Never ``checkpoints/``, ``metrics.jsonl``, the
  tracker logs or the individual validation images.
- The token: ``hub_token``, else huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``,
  better: nothing to leak). ``hub_token`` is a secret field: ``config_to_dict`` leaves it out,
  so it is never in the model card, the tracker config or any fingerprint, and no message
  prints it.

All calls go through ``huggingface_hub``'s module functions (``create_repo``,
``upload_folder``), looked up at call time, so a test can record them (no hub is reachable
here); ``upload_folder`` filters the folder with ``allow_patterns`` = the plan, which
``huggingface_hub.utils.filter_repo_objects`` applies.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snpo.errors import ConfigError, UserError
from snpo.training.trainer import Callback

PACKAGE = "huggingface_hub"
#: never uploaded, whatever the plan says (a last guard)
IGNORE = ["checkpoints/*", "*.tmp", "*.deleting/*"]


class HubError(UserError, RuntimeError):
    """The hub refused or could not be reached; the trained model is saved locally."""


def hub_available() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def repo_name(config: Any) -> str:
    """``hub_model_id``, or the output folder's name (the token's account is the owner)."""
    return config.hub_model_id or Path(str(config.output_dir)).expanduser().resolve().name


def _check_repo_id(field: str, repo_id: str, where: str = "") -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"{field}: {where}not a hub repository id ({err})") from None


def check_hub_config(config: Any) -> None:
    """The checks of the hub keys that need no model and no network (``TrainConfig.validate``):
    huggingface_hub is importable and the repository name is valid."""
    if config.hub_token is not None and not str(config.hub_token).strip():
        raise ConfigError("hub_token: expected a token or null (better: HF_TOKEN or `hf auth login`), got ''")
    if config.hub_token and config.report_to in ("wandb", "all"):
        # as the diffusers scripts: wandb records the command line, where the token may be
        raise ConfigError("hub_token: not with report_to wandb (wandb records the command line); "
                          "use HF_TOKEN or `hf auth login` instead")
    if not config.push_to_hub:
        if config.hub_model_id is not None and hub_available():
            _check_repo_id("hub_model_id", config.hub_model_id)
        return
    if not hub_available():
        raise ConfigError("push_to_hub: huggingface_hub is not installed (pip install huggingface_hub)")
    if config.hub_model_id is not None:
        _check_repo_id("hub_model_id", config.hub_model_id)
    else:
        _check_repo_id("hub_model_id", repo_name(config), where="null, and the output folder's name is ")


def upload_plan(output_dir: str | Path, files: Sequence[str]) -> list[str]:
    """The files (relative, POSIX) one push uploads from ``output_dir``: the saved weights
    ``files`` (files or folders, as ``save_trained`` lists them), the model card, the
    validation grids with their index, and the training curves; only those that exist."""
    from snpo.training.collapse import CURVES_FILE
    from snpo.training.validation import INDEX_FILE, VALIDATION_DIR

    out = Path(output_dir)
    paths: list[Path] = []
    for entry in files:
        path = out / entry
        if path.is_dir():
            paths += [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            paths.append(path)
    paths += [out / "README.md", out / CURVES_FILE, out / VALIDATION_DIR / INDEX_FILE]
    paths += sorted((out / VALIDATION_DIR).glob("step-*.png"))
    plan = {p.relative_to(out).as_posix() for p in paths if p.is_file()}
    return sorted(p for p in plan if not p.startswith("checkpoints/") and not p.endswith(".tmp"))


def create_repo(config: Any) -> tuple[str, str]:
    """Create (or find) the repository; returns its full id (``owner/name``) and URL."""
    import huggingface_hub

    name = repo_name(config)
    try:
        url = huggingface_hub.create_repo(name, token=config.hub_token, private=config.hub_private_repo,
                                          exist_ok=True)
    except Exception as err:  # network, auth, a name taken by someone else: one line, no token
        raise HubError(f"push_to_hub: could not create the hub repository {name!r} "
                       f"({type(err).__name__}: {_first_line(err)})") from None
    return getattr(url, "repo_id", None) or name, str(url)


def push_folder(config: Any, repo_id: str, output_dir: str | Path, files: Sequence[str],
                *, step: int | None = None) -> list[str]:
    """Upload :func:`upload_plan`'s files in one commit; returns them."""
    import huggingface_hub

    plan = upload_plan(output_dir, files)
    message = f"snpo train: {config.method}" + (f", step {step}" if step is not None else "")
    try:
        huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=str(output_dir), allow_patterns=plan, ignore_patterns=IGNORE,
            commit_message=message, token=config.hub_token,
        )
    except Exception as err:
        raise HubError(f"push_to_hub: the upload to {repo_id!r} failed ({type(err).__name__}: "
                       f"{_first_line(err)}); the model is saved in {output_dir}: upload it later with "
                       f"`hf upload {repo_id} {output_dir}`") from None
    return plan


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


class HubRepo(Callback):
    """Creates the repository when training starts (main process) and remembers its id."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.repo_id: str | None = None
        self.url = ""

    def on_loop_begin(self, trainer: Any) -> None:
        accelerator = trainer.accelerator
        if accelerator.is_main_process:
            self.repo_id, self.url = create_repo(self.config)
            accelerator.print(f"push_to_hub: the model will be pushed to {self.url or self.repo_id} at the end")

    def push(self, output_dir: str | Path, info: dict[str, Any]) -> list[str]:
        """After the weights and the card are written (main process)."""
        if self.repo_id is None:
            self.repo_id, self.url = create_repo(self.config)
        plan = push_folder(self.config, self.repo_id, output_dir, info.get("files") or [],
                           step=info.get("global_step"))
        print(f"push_to_hub: uploaded {len(plan)} files to {self.url or self.repo_id}")
        return plan
