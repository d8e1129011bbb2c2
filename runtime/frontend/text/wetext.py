"""WeTextProcessing (optional dependency) as the Chinese / English normalization engines, as upstream uses them.

upstream: indextts/utils/front.py:TextNormalizer.load (Linux branch): `tn.chinese.normalizer.Normalizer(
remove_interjections=False, remove_erhua=False)` with grammars cached in a directory of its own, and
`tn.english.normalizer.Normalizer()` with the grammars shipped in the package.

Why the grammar cache matters: WeTextProcessing ships prebuilt FSTs in its package directory, but the
Chinese ones were built with its DEFAULT options (interjections and erhua removed). Its cache is keyed
by file name only, so asking for other options while pointing at the package directory would silently
load the wrong grammars. Upstream therefore builds the zh grammars on first use into a directory next to
its own source. We build them into a per-user cache directory instead (never into site-packages, which
may be read-only), keyed by the WeTextProcessing version and the options, written to a temporary
directory first and moved into place atomically so concurrent processes never read half-written files.
First build: about 10-15 s on 2 cores; afterwards loading takes about 1 s.

Cache location: `$INDEXTTS_TEXT_CACHE`, else `$XDG_CACHE_HOME/indextts-toolkit/wetext`, else
`~/.cache/indextts-toolkit/wetext`. If it cannot be created, the grammars are built into a temporary
directory and discarded at the end (correct, but the build is paid in every process).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

WETEXT_REQUIREMENT = "WeTextProcessing==1.2.0"
CACHE_ENV = "INDEXTTS_TEXT_CACHE"
_ZH_OPTIONS = {"remove_interjections": False, "remove_erhua": False}


def wetext_available() -> bool:
    """True when WeTextProcessing (`tn`) and its pynini dependency can be imported."""
    return importlib.util.find_spec("tn") is not None and importlib.util.find_spec("pynini") is not None


def wetext_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("WeTextProcessing")
    except PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "indextts-toolkit" / "wetext"


def _has_grammars(directory: Path, prefix: str) -> bool:
    return all((directory / f"{prefix}_{part}.fst").is_file() for part in ("tagger", "verbalizer"))


def _scratch_dir(root: Path, key: str) -> tuple[Path, bool]:
    """A fresh directory to build in: inside the cache root if writable (persistent), else a temp dir."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=root)), True
    except OSError as err:
        log.warning("text-normalization cache %s is not writable (%s); grammars are built in a temporary "
                    "directory and rebuilt in every process (set %s to a writable directory)", root, err, CACHE_ENV)
        return Path(tempfile.mkdtemp(prefix=f"indextts-{key}-")), False


def load_cached(factory: Callable[[str], Any], prefix: str, key: str, root: Path) -> Any:
    """`factory(cache_dir)` reading grammars from `root/key`, building them there first if absent."""
    final = root / key
    if _has_grammars(final, prefix):
        return factory(str(final))
    scratch, persistent = _scratch_dir(root, key)
    log.info("building WeTextProcessing grammars %s (once; about 10-15 s) ...", key)
    t0 = time.perf_counter()
    try:
        engine = factory(str(scratch))
        if persistent:
            try:
                scratch.chmod(0o755)            # mkdtemp made it private; the cache may be shared
                os.rename(scratch, final)       # atomic; fails if another process finished first
            except OSError:
                pass
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("built %s in %.1f s", key, time.perf_counter() - t0)
    return engine


def _quiet() -> None:
    """WeTextProcessing logs every grammar file it finds at INFO through its own stream handler (and again
    through the root logger); that is noise for users of this toolkit, so only its warnings are kept."""
    logging.getLogger("wetext").setLevel(logging.WARNING)


def load_zh(cache_dir: Path | None = None) -> Any:
    """The Chinese TN engine with upstream's options; grammars from (or built into) the cache."""
    from tn.chinese.normalizer import Normalizer

    _quiet()

    key = f"wetextprocessing-{wetext_version()}-zh_tn-interjections0-erhua0"
    return load_cached(lambda d: Normalizer(cache_dir=d, overwrite_cache=False, **_ZH_OPTIONS), "zh_tn", key,
                       Path(cache_dir) if cache_dir else default_cache_dir())


def load_en(cache_dir: Path | None = None) -> Any:
    """The English TN engine: the package's shipped grammars (default options, as upstream uses them)."""
    from importlib.resources import files

    from tn.english.normalizer import Normalizer

    _quiet()

    shipped = Path(str(files("tn")))
    if _has_grammars(shipped, "en_tn"):
        return Normalizer(cache_dir=str(shipped), overwrite_cache=False)   # read only
    key = f"wetextprocessing-{wetext_version()}-en_tn"
    return load_cached(lambda d: Normalizer(cache_dir=d, overwrite_cache=False), "en_tn", key,
                       Path(cache_dir) if cache_dir else default_cache_dir())
