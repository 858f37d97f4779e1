"""Checkpoints are folders: weights (safetensors), resolved config, tokenizer, trainer state, meta.

A checkpoint is written under a temporary name and renamed into place, so a crash never leaves a
broken `step-*` folder; a finished checkpoint is never rewritten. Older ones are pruned only after
the new one is complete, each renamed to a hidden name before it is deleted, so a kill part-way never
leaves a partial `step-*` folder. Nothing is ever loaded through pickle code execution: safetensors
for weights, `weights_only=True` for state.

Under FSDP (train.strategy=fsdp) a checkpoint also holds `sharded/`: every rank's shard of the model
and optimizer (torch.distributed.checkpoint, which reshards to any world size on load); the trainer
resumes from it, and `model.safetensors` is the consolidated model every other command reads.
"""

from __future__ import annotations

import errno
import json
import os
import pickle  # only for its exception type: loading is weights_only
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sinkdlm.config import Config, ModelConfig, config_from_dict, save_config, with_run_data_paths, yaml_problem
from sinkdlm.errors import UserError
from sinkdlm.files import META_FILE as META
from sinkdlm.files import TOKENIZER_FILE as TOKENIZER
from sinkdlm.files import use_umask
from sinkdlm.hf_format import config_sections, dlm_weights, is_export_config

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CONFIG_JSON = "config.json"  # what `sinkdlm export` writes
STATE = "trainer_state.pt"  # step and tokens; without FSDP also the whole optimizer state
SHARDED = "sharded"  # FSDP: the model and optimizer shards (a torch.distributed.checkpoint folder)
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"  # a folder being deleted: hidden first, so it is never mistaken for a checkpoint
NEEDED_CLASS = re.compile(r"GLOBAL (\S+)")  # how torch names the class a weights_only load refused
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# meta.json keys that carry the source tokenizer's chat settings (Hugging Face's tokenizer_config.json names):
# convert records them, training from init_from keeps them, serve and export read them
CHAT_KEYS = ("chat_template", "bos_token")
# how a full disk reads when torch.save (C++ iostreams), safetensors (Rust) or torch.distributed.checkpoint
# report it without an errno
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "basic_ios::clear", "os error 28",
                  "StorageFull")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest checkpoint."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise UserError(f"no checkpoint at {p}: expected a folder with {WEIGHTS} or a run folder with step-* checkpoints")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden name (atomic), then removing that."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove_leftovers(run: Path) -> None:
    """Hidden folders a kill left behind: half-written checkpoints and half-deleted ones."""
    for path in run.glob(".*"):
        if path.is_dir() and path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(path)


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], cfg: Config,
                    meta: dict[str, Any], tokenizer: str | Path | None = None,
                    trainer_state: dict[str, Any] | None = None, keep_last: int = 0) -> Path:
    """Write step-N atomically; then keep only the newest `keep_last` (0 = keep all)."""
    tmp = start_checkpoint(run_dir, step)
    return finish_checkpoint(tmp, weights, cfg, meta, tokenizer, trainer_state, keep_last)


def start_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The empty temporary folder step-N is written in (sharded state may go there first)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = step_dir(run, step)
    if final.exists():
        raise UserError(f"{final} already exists and a finished checkpoint is never rewritten; "
                        f"resume the run (train.resume=true) or use a new train.out_dir")
    remove_leftovers(run)
    tmp = run / f"{TMP_PREFIX}{final.name}"
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, weights: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any],
                      tokenizer: str | Path | None, trainer_state: dict[str, Any] | None, keep_last: int) -> Path:
    """Write the rest of a started checkpoint, sync it to disk, rename it into place, prune. A full
    disk is a UserError; the partial folder is removed first."""
    run, final = tmp.parent, tmp.parent / tmp.name.removeprefix(TMP_PREFIX)
    try:
        write_contents(tmp, weights, cfg, meta, tokenizer, trainer_state)
    except (OSError, RuntimeError, SafetensorError) as e:
        full = disk_full_error(tmp, e)
        if full is None:
            raise
        raise full from None
    os.replace(tmp, final)
    _fsync_dir(run)
    if keep_last > 0:
        for old in list_checkpoints(run)[:-keep_last]:
            discard(old)
    return final


def write_contents(tmp: Path, weights: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any],
                   tokenizer: str | Path | None, trainer_state: dict[str, Any] | None) -> None:
    step = int(tmp.name.removeprefix(TMP_PREFIX).removeprefix(STEP_PREFIX))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    use_umask(tmp / WEIGHTS)  # safetensors creates it 0600
    save_config(cfg, tmp / CONFIG)
    (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
    if tokenizer:
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(folder)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk (or the user's quota) is full."""
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) in DISK_FULL_ERRNOS or any(t in str(seen) for t in DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(tmp: Path, error: BaseException) -> UserError | None:
    """For a full disk while writing the checkpoint `tmp`: remove that partial folder (freeing its
    space) and return the one-line error naming the disk and the last complete checkpoint; else None."""
    if not is_disk_full(error):
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    run, name = tmp.parent, tmp.name.removeprefix(TMP_PREFIX)
    found = list_checkpoints(run)
    last = f"the last complete checkpoint is {found[-1].name}" if found else "the run has no complete checkpoint yet"
    free = shutil.disk_usage(run).free / 2**20
    return UserError(f"the disk holding {run} is full ({free:,.0f} MiB free) while writing checkpoint {name}; "
                     f"its partial folder is removed and {last}; free space, then continue with --resume")


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint holds FSDP's sharded state (it was written with train.strategy=fsdp)."""
    return (resolve(path) / SHARDED).is_dir()


def load_config_of(path: str | Path) -> Config:
    ckpt = resolve(path)
    # an exported folder carries config.json; YAML reads JSON
    cfg_file = ckpt / CONFIG if (ckpt / CONFIG).is_file() else ckpt / CONFIG_JSON
    try:
        data = yaml.safe_load(cfg_file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable {CONFIG} ({e}); it is incomplete") from None
    except yaml.YAMLError as e:
        raise UserError(f"{cfg_file} is not valid YAML: {yaml_problem(e)}; the checkpoint is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{cfg_file} does not hold a config mapping; the checkpoint is damaged")
    if is_export_config(data):
        data = config_sections(data)
    return with_run_data_paths(config_from_dict(data, str(ckpt / CONFIG)), ckpt)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = resolve(path)
    try:
        return dlm_weights(load_file(str(ckpt / WEIGHTS)))  # an exported folder's names carry a prefix
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"checkpoint {ckpt} is corrupt or truncated ({str(e).splitlines()[0]}); "
                        f"delete that folder to resume from the previous checkpoint, or retrain") from None


def load_meta(path: str | Path) -> dict[str, Any]:
    ckpt = resolve(path)
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def chat_settings(path: str | Path) -> dict[str, Any]:
    """The chat template (and the BOS text it may use) a checkpoint carries in its meta.json; {} if none."""
    meta = load_meta(path)
    return {key: meta[key] for key in CHAT_KEYS if meta.get(key)}


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    ckpt = resolve(path)
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never advise that
        needed = NEEDED_CLASS.search(str(e))
        what = f"the class {needed.group(1)}" if needed else "objects other than tensors and plain data"
        raise UserError(f"trainer state in {ckpt} holds {what}, which only pickle code execution could load "
                        f"and sinkdlm never runs code from a file; resume from an earlier step-* folder or "
                        f"retrain") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"trainer state in {ckpt} is unreadable ({str(e).splitlines()[0]}); "
                        f"resume from an earlier step-* folder") from None


def load_into(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Load a checkpoint's weights into `model`, built from its config; a tensor that is missing,
    extra or of another shape is a UserError naming the file and the tensor. A model built on the
    meta device takes the loaded tensors themselves (cast to `dtype`), so it is never allocated twice."""
    ckpt = resolve(path)
    weights, expected = load_weights(ckpt), model.state_dict()
    problems = [f"lacks {name}" for name in expected if name not in weights]
    problems += [f"has an unexpected {name}" for name in weights if name not in expected]
    problems += [f"has {name} of shape {tuple(weights[name].shape)} where the config needs "
                 f"{tuple(expected[name].shape)}" for name in expected
                 if name in weights and weights[name].shape != expected[name].shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{ckpt / WEIGHTS} {problems[0]}{more}: the weights do not match the config "
                        f"(the folder was edited or mixed from two runs); restore it, use an earlier "
                        f"step-* folder, or retrain")
    if dtype is not None:
        weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    model.load_state_dict(weights, assign=any(p.is_meta for p in model.parameters()))


def check_state_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig, what: str, fix: str) -> None:
    """A UserError unless `weights` are exactly the tensors (names and shapes) of DLM(cfg), which is
    built on the meta device: shapes only, so an 8B import is never allocated twice. The message is
    "{what} ({name}: {shape} where {shape} is expected); {fix}", `what` saying whose weights fail to
    match what, e.g. "FILE does not match its config.json"."""
    from sinkdlm.model import DLM

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in DLM(cfg).state_dict().items()}
    got = {name: tuple(t.shape) for name, t in weights.items()}
    wrong = sorted(set(got) ^ set(expected)) + sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])
    if wrong:
        name, more = wrong[0], f", and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        raise UserError(f"{what} ({name}: {got.get(name)} where {expected.get(name)} is expected{more}; "
                        f"None = absent); {fix}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               **runtime: Any):
    """Rebuild the model a checkpoint describes (any variant) and load its weights.

    Returns (model in eval mode, Config). dtype: the parameters' (e.g. torch.bfloat16 halves the
    memory of a large import; RMSNorm and softmax still compute in float32); None = float32. The
    model is built on the meta device and takes the loaded weights, so memory peaks at the weights
    as stored plus their cast copy, not at a randomly initialised model besides them. `runtime`
    changes ModelConfig.RUNTIME_FIELDS only (such as attn_impl), each validated; the architecture
    is the checkpoint's.
    """
    from sinkdlm.model import DLM

    ckpt = resolve(path)
    cfg = load_config_of(ckpt)
    cfg.model = cfg.model.with_runtime(**runtime)
    with torch.device("meta"):
        model = DLM(cfg.model)
    load_into(model, ckpt, dtype or torch.float32)
    _refuse_non_finite(model, ckpt)
    return model.to(device).eval(), cfg


def _refuse_non_finite(model: torch.nn.Module, ckpt: Path) -> None:
    """NaN or inf weights (a diverged run) make every output garbage: refuse them, naming the tensor."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UserError(f"{ckpt / WEIGHTS}: tensor {bad[0]}{more} holds NaN or inf values (training diverged "
                        f"before this step?); use an earlier step-* folder or retrain")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (a `tokenizers.Tokenizer`)."""
    from sinkdlm.data.tokenizer import read_tokenizer_file

    ckpt = resolve(path)
    fix = "copy the tokenizer of its training data there"
    if not (ckpt / TOKENIZER).is_file():
        raise UserError(f"checkpoint {ckpt} has no {TOKENIZER}; {fix}")
    return read_tokenizer_file(ckpt / TOKENIZER, f"the checkpoint's tokenizer is damaged; {fix}")
