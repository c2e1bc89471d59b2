"""Python as the GPU machine's image has it, on any machine: an import hook that lets a module load only from
the standard library, this repository, a distribution the image holds (bench/device_packages.txt) or one the
session carries as a wheel (bench/carried_wheels.txt). Anything else fails to import, as it would there, with
an error that names the module and its distribution. The distributions' metadata is filtered the same way
(`importlib.metadata.distributions`, and so entry points): a package installed here but absent there
registers no pytest plugin and no hypothesis extension, as there.

    python -m bench.device_image DIR    # writes DIR/sitecustomize.py; then PYTHONPATH=DIR:$PYTHONPATH ...

Through `sitecustomize` every Python process started with that PYTHONPATH is restricted, the children a
command starts too (bench.gpu's workers, pytest). With NEOX_DEVICE_IMPORT_LOG set, each process appends one
line per top-level module it was asked for: `allowed NAME DIST` or `refused NAME DIST IMPORTER` (DIST `-`
for the standard library and this repository; IMPORTER the file whose import statement asked). Libraries
probe for optional modules the image lacks too (anyio for trio, say) and carry on without them, as they
do there; what matters is a refusal whose importer is this repository's code, or a command that fails.
tests/test_gpu_session.py runs the GPU session's commands so.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_LISTS = (REPO / "bench" / "device_packages.txt", REPO / "bench" / "carried_wheels.txt")
LOG_VARIABLE = "NEOX_DEVICE_IMPORT_LOG"


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> set[str]:
    """Distribution names of a package list: one a line, `NAME` or `NAME==VERSION`, `#` comments."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(normalize(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]))
    return names


def allowed_distributions(strict: bool = True) -> set[str]:
    """The distributions the image has, and the carried wheels: what this repository's code may import.

    Not `strict`: also what the image's packages require as installed here, for imports made by those
    packages. The image is consistent in itself, so what its packages need is there, whatever this
    machine's newer versions of them need (huggingface_hub 2 here requires httpx2; the image's 1.33 does
    not); but a requirement of a version here is no evidence for this repository's own imports (one of
    this machine's packages requires pydantic, which the image lacks). The carried wheels are installed
    with --no-deps, so they count as listed and no further."""
    image, carried = (read_list(p) for p in PACKAGE_LISTS)
    if strict:
        return image | carried
    requires = {}
    for dist in importlib.metadata.distributions():
        deps = [re.match(r"[A-Za-z0-9._-]+", r) for r in dist.requires or [] if "extra ==" not in r]
        requires[normalize(dist.metadata["Name"] or "")] = {normalize(m.group(0)) for m in deps if m}
    allowed, todo = set(), list(image)
    while todo:
        name = todo.pop()
        if name not in allowed:
            allowed.add(name)
            todo += requires.get(name, ())
    return allowed | carried


class DeviceImageFinder(importlib.abc.MetaPathFinder):
    """Asked first for every top-level module; decides by where the other finders would load it from."""

    unfiltered = False  # True while this finder reads every distribution's metadata itself

    def __init__(self, log: str | None):
        self.strict, self.allowed, self.log = allowed_distributions(), allowed_distributions(strict=False), log
        self.decided: dict[tuple[str, bool], object] = {}  # (module, asked by this repository) -> verdict
        self._distributions: dict[str, list[str]] | None = None
        self._stdlib = tuple(os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib"))
        self._repo = os.path.realpath(REPO) + os.sep

    def find_spec(self, fullname, path=None, target=None):
        if "." not in fullname and (error := self.refusal(fullname, path, target)):
            raise error
        return None  # the other finders load it

    def refusal(self, fullname, path=None, target=None) -> ModuleNotFoundError | None:
        """The error a top-level module's import raises on the GPU machine, or None where it loads there."""
        ours = importer().startswith(self._repo)
        if (fullname, ours) not in self.decided:
            self.decided[fullname, ours] = self._decide(fullname, path, target, self.strict if ours else self.allowed)
        error = self.decided[fullname, ours]
        return ModuleNotFoundError(str(error), name=fullname) if isinstance(error, ModuleNotFoundError) else None

    def _decide(self, fullname, path, target, allowed: set[str]):
        if fullname in sys.stdlib_module_names or fullname in sys.builtin_module_names:
            return "-"
        spec = self._other_finders(fullname, path, target)
        if spec is None:
            return "missing"  # missing everywhere: the usual ModuleNotFoundError
        origin = os.path.realpath(spec.origin if spec.origin not in (None, "namespace")
                                  else next(iter(spec.submodule_search_locations or []), ""))
        if origin.startswith(self._repo) or origin.startswith(self._stdlib) and "site-packages" not in origin:
            self._record("allowed", fullname, "-")
            return "allowed"
        dists = [normalize(d) for d in self.distributions().get(fullname, [])]
        if any(d in allowed for d in dists):
            self._record("allowed", fullname, ",".join(dists))
            return "allowed"
        dist = ",".join(dists) or "no distribution"
        self._record("refused", fullname, f"{dist} {importer()}")
        return ModuleNotFoundError(
            f"No module named {fullname!r} on the GPU machine: {fullname} ({dist}, from {origin}) is neither in "
            f"the image (bench/device_packages.txt) nor among the carried wheels (bench/carried_wheels.txt)",
            name=fullname)

    def _other_finders(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def distributions(self) -> dict[str, list[str]]:
        """Top-level module -> distributions, over everything installed here (the filter off)."""
        if self._distributions is None:
            self.unfiltered = True
            try:
                self._distributions = importlib.metadata.packages_distributions()
            finally:
                self.unfiltered = False
        return self._distributions

    def _record(self, verdict: str, name: str, dist: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{verdict} {name} {dist}\n")


def importer() -> str:
    """The file of the innermost frame outside the import machinery: whose import statement is running."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<frozen importlib") or name == __file__ or "importlib" + os.sep in name):
            return name
        frame = frame.f_back
    return "?"


def install() -> DeviceImageFinder:
    """Put the finder first on sys.meta_path (once per process)."""
    for finder in sys.meta_path:
        if isinstance(finder, DeviceImageFinder):
            return finder
    finder = DeviceImageFinder(os.environ.get(LOG_VARIABLE))
    sys.meta_path.insert(0, finder)
    every = importlib.metadata.distributions

    def distributions(**kwargs):
        """The installed distributions the GPU machine's image has too (entry points and plugins follow)."""
        found = every(**kwargs)
        if finder.unfiltered:
            return found
        return (d for d in found if normalize(d.metadata["Name"] or "") in finder.allowed)

    importlib.metadata.distributions = distributions

    # Libraries ask whether a module is there before importing it (transformers' is_X_available): answer
    # as the image would, with no spec and no version for what it lacks.
    real_find_spec, real_distribution = importlib.util.find_spec, importlib.metadata.distribution

    def find_spec(name, package=None):
        absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if finder.refusal(absolute.partition(".")[0]):
            return None
        return real_find_spec(name, package)

    def distribution(name):
        if normalize(name) not in finder.allowed and not finder.unfiltered:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    importlib.util.find_spec = find_spec
    importlib.metadata.distribution = distribution
    importlib.metadata.version = lambda name: distribution(name).version
    return finder


SITECUSTOMIZE = f"""# Written by bench/device_image.py: restricts imports to what the GPU machine's image has.
import sys
sys.path.insert(0, {str(REPO)!r})
import bench.device_image
sys.path.remove({str(REPO)!r})
bench.device_image.install()
"""


def write_sitecustomize(directory: str | os.PathLike) -> Path:
    path = Path(directory) / "sitecustomize.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SITECUSTOMIZE)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.device_image DIR")
    print(write_sitecustomize(sys.argv[1]))
