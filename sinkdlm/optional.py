"""Optional dependencies: the one place that knows which extra provides each, and says so when missing.

The core install (`pip install -e .`) trains, samples and converts nothing else; every other
package comes with an extra of pyproject.toml. `require(module, purpose)` imports one, or raises a
UserError of one line naming the extra to install; it also refuses a version older than the lowest
one sinkdlm supports, which otherwise fails later with a confusing traceback (e.g. transformers <
4.56 has no `from_pretrained(dtype=)`). tests/test_optional.py checks this table against pyproject.toml.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from types import ModuleType

from sinkdlm.errors import UserError


@dataclass(frozen=True)
class Dependency:
    distribution: str  # the name pip installs
    extra: str  # the pyproject.toml extra that declares it
    minimum: str  # the lowest supported version (the bound in pyproject.toml)


# import name -> where it comes from
DEPENDENCIES: dict[str, Dependency] = {
    "lm_eval": Dependency("lm-eval", "eval", "0.4.13"),  # `run` subcommand, TaskManager.load, gsm8k.yaml's path
    "pyarrow": Dependency("pyarrow", "eval", "14"),
    "transformers": Dependency("transformers", "convert", "4.56"),
    "gguf": Dependency("gguf", "convert", "0.11"),
    "accelerate": Dependency("accelerate", "convert", "0.32"),
    "datasets": Dependency("datasets", "hf", "2.16"),
    "matplotlib": Dependency("matplotlib", "analysis", "3.7"),
    "tensorboard": Dependency("tensorboard", "log", "2.12"),
    "fastapi": Dependency("fastapi", "serve", "0.110"),
    "uvicorn": Dependency("uvicorn", "serve", "0.29"),
    "sacrebleu": Dependency("sacrebleu", "generation", "2.0"),
    "mauve": Dependency("mauve-text", "generation", "0.4"),
}
# modules no extra names because a package of the table brings them (import name -> that package's
# import name); huggingface_hub also comes with the core's tokenizers, so it is missing only from a
# broken install, which the extra repairs
BROUGHT_BY: dict[str, str] = {"huggingface_hub": "transformers"}
NO_MINIMUM = "0"


def dependency(module: str) -> Dependency:
    """Where the optional `module` comes from (a KeyError for a module sinkdlm does not use)."""
    if module in BROUGHT_BY:
        return Dependency(module.replace("_", "-"), DEPENDENCIES[BROUGHT_BY[module]].extra, NO_MINIMUM)
    return DEPENDENCIES[module]


def install_hint(module: str) -> str:
    """The command that installs `module`'s extra (from the sinkdlm checkout)."""
    return f'pip install -e ".[{dependency(module).extra}]"'


def available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return False


def require(module: str, purpose: str) -> ModuleType:
    """Import the optional `module` for `purpose` ("sinkdlm eval"), or say in one line how to get it."""
    dep = dependency(module)
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = "" if e.name == module else f" (it needs `{e.name}`)"
        raise UserError(f"{purpose} needs `{dep.distribution}`, which is not installed{missing}; "
                        f"install the `{dep.extra}` extra: {install_hint(module)}") from None
    installed = _installed_version(dep.distribution)
    if installed is not None and _release(installed) < _release(dep.minimum):
        raise UserError(f"{purpose} needs {dep.distribution}>={dep.minimum}, but {installed} is installed; "
                        f"upgrade it: {install_hint(module)} --upgrade")
    return imported


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # importable but not pip-installed (a source tree)
        return None


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ("4.56.0.dev0" -> (4, 56, 0)); pre-releases count as released."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)
