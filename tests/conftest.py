"""Shared fixtures: the shared photo assets, and helpers every test module uses.

The shared assets live outside the repository (``$SPECIESCLF_SHARED``, default ``<repo>/../shared``) and
are never copied into it. Without them the tests that need them are skipped, except on CI (``CI=true``),
where a missing asset folder is a broken machine and fails the run instead of silently testing less.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# tests/reference.py is a helper module, imported as `reference` by the test files.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

SHARED_FIXTURES = {"shared_dir", "sample_photos", "photo_bytes", "one_photo"}


def shared_root() -> Path:
    return Path(os.environ.get("SPECIESCLF_SHARED") or REPO_ROOT.parent / "shared")


def _missing(what: str) -> None:
    message = f"shared assets not available: {what} (set SPECIESCLF_SHARED or provide <repo>/../shared)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(config, items):
    # Every test that reaches the shared assets carries the `shared` marker, whether or not its module
    # remembered to add it, so that `-m "not shared"` selects exactly the self-contained tests.
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("shared") is None:
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="module")
def home(shared_dir: Path, tmp_path_factory):
    """The shared weights (SPECIESCLF_WEIGHTS) and a private SPECIESCLF_HOME, for a module's built-in models."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECIESCLF_WEIGHTS", str(shared_dir / "models"))
        mp.setenv("SPECIESCLF_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if not root.is_dir():
        _missing(f"{root} is not a directory")
    return root


@pytest.fixture(scope="session")
def sample_photos(shared_dir: Path) -> list[Path]:
    """The 419 ImageNet sample photos (sorted paths)."""
    folder = shared_dir / "images" / "imagenet-samples"
    photos = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
    if not photos:
        _missing(f"no *.JPEG photos in {folder}")
    return photos


@pytest.fixture(scope="session")
def photo_bytes(sample_photos: list[Path]) -> list[bytes]:
    """The encoded bytes of every sample photo, read once per session."""
    return [p.read_bytes() for p in sample_photos]


@pytest.fixture(scope="session")
def one_photo(sample_photos: list[Path]) -> bytes:
    """One real RGB photo (the first sample, a 500x375 baseline JPEG)."""
    return sample_photos[0].read_bytes()


@pytest.fixture(scope="module")
def species100(shared_dir: Path, tmp_path_factory):
    """The built-in species100 Classifier with its weights from the shared models folder, one per module."""
    from speciesclf import Classifier

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECIESCLF_WEIGHTS", str(shared_dir / "models"))
        mp.setenv("SPECIESCLF_HOME", str(tmp_path_factory.mktemp("home")))
        classifier = Classifier.load("species100")
        yield classifier
        classifier.close()


def _preload_hypothesis_patching() -> None:
    # When a Hypothesis test fails, its pytest plugin imports hypothesis.extra._patching (and libcst) to
    # suggest a patch. libcst's import emits a DeprecationWarning (mypy_extensions.TypedDict), which
    # filterwarnings=error turns into an INTERNALERROR that aborts the whole session. Import it here,
    # once, with that third-party warning silenced, so a failing property test reports like any other.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import hypothesis.extra._patching  # noqa: F401
        except ImportError:
            pass


_preload_hypothesis_patching()
