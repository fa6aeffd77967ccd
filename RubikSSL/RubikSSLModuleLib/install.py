"""The panel's dependencies: which are installed (read from package metadata, never by importing them), and
installing the missing ones without replacing the torch build PyTorch Utils chose.

PyTorch Utils installs torch (it picks the CUDA build for the machine's driver, or the CPU one) and in doing so
imports torch inside Slicer's process. Everything else is then installed with the installed torch pinned by a pip
constraint, so that a package that asks for a newer torch (monai 1.6 needs torch >= 2.8) fails with pip's message
instead of silently swapping in a CPU build from the package index, or a second torch over one already loaded.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def requirement_names(path: Path) -> list[str]:
    """Distribution names of a requirements file (`monai>=1.3` -> `monai`), comments skipped."""
    return [re.split(r"[<>=!~; \[]", line, maxsplit=1)[0] for line in requirement_lines(path)]


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def installed_versions(names: list[str]) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 3, 1) of "2.3.1+cu121"; the numeric release part only."""
    release = re.match(r"\d+(\.\d+)*", version or "")
    return tuple(int(part) for part in release.group(0).split(".")) if release else ()


def torch_too_old(installed: str | None, requirement: str) -> str:
    """What to do when the installed torch is below the floor (`requirement`, ">=X.Y"), "" when it is not. An
    install cannot fix it: it pins the installed torch (another extension's may be older), so say how to replace it."""
    floor = version_tuple(requirement.lstrip(">="))
    if installed is None or version_tuple(installed) >= floor:
        return ""
    return (f"PyTorch {installed} is installed but RubikSSL needs torch{requirement}: open the PyTorch Utils module, "
            "uninstall PyTorch, restart Slicer, then press Install missing packages here (another extension may have "
            "installed the older one).")


def torch_constraint(folder: Path, torch_version: str) -> Path:
    """A pip constraints file that keeps the installed torch (its local build tag, e.g. +cu128, included)."""
    path = Path(folder) / "torch-constraint.txt"
    path.write_text(f"torch=={torch_version}\n", encoding="utf-8")
    return path


def pip_arguments(requirements_path: Path, constraint: Path) -> list[str]:
    """`pip install` arguments for Slicer 5.10 (slicer.util.pip_install): the requirements with the constraint."""
    return [*requirement_lines(requirements_path), "-c", str(constraint)]


def install(requirements_path: Path, torch_requirement: str, folder: Path) -> None:
    """Install torch through PyTorch Utils if it is missing, then the rest with torch pinned (Slicer 5.12's
    slicer.packaging.pip_ensure takes the constraint; 5.10's pip_install gets it as `-c`). The panel has asked
    the user once; PyTorch Utils and pip_ensure are told not to ask again."""
    import slicer

    if installed_versions(["torch"])["torch"] is None:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("Install the PyTorch extension from the Extensions Manager, restart Slicer, then try again.") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=torch_requirement) is None:
            raise RuntimeError("PyTorch was not installed.")
    constraint = torch_constraint(folder, installed_versions(["torch"])["torch"])
    try:
        import slicer.packaging as packaging  # Slicer >= 5.12; hasattr(slicer, "packaging") is False until imported
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(str(requirements_path)), constraints=str(constraint),
                             prompt_install=False, requester="RubikSSL")
    else:
        slicer.util.pip_install(pip_arguments(requirements_path, constraint))
