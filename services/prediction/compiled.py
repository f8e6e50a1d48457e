"""A model version compiled to machine code (lleaves, on LLVM): the same probabilities as LightGBM, faster.

LightGBM's `predict` walks its trees in a generic loop and pays ~40-50 µs of set-up per call; lleaves
turns each tree into native code. On this machine a 226-tree model scores 400 rows in ~0.3 ms instead
of ~1.3 ms, and one row in ~10 µs instead of ~46 µs.

Exactly the same numbers, not merely close ones: percentiles compare a probability with validation
scores LightGBM computed, and a score one bit off a tied quantile would move its percentile. So the
forest is compiled with the trees added in LightGBM's order (one block of all trees: lleaves' default
cache blocking adds them in another order and differs in the last bits), and with the binary objective's
sigmoid compiled in: `1 / (1 + exp(-x))` with the C library's `exp`, the expression and the function
LightGBM's objective uses. (Applying it here with numpy is not the same: on a CPU with AVX-512 numpy's
vectorised `exp` differs from the C library's in the last bit for about 2% of rows.) A compiled forest is only used
after it has reproduced LightGBM bit for bit on probe rows (values around every split threshold,
and missing values); otherwise the version keeps scoring with LightGBM. One corner differs by
design: LightGBM treats a value within ~1e-35 of zero as zero and lleaves does not quite; the feature
function never makes such values (counts, ages of at least a microsecond, amounts), and a row that
holds one anyway is scored by LightGBM.

Compiling costs seconds (LLVM optimises one function holding every tree: 3-17 s for 226 trees here,
depending on load), so it runs in the background, in a child process at the lowest CPU priority, and
only for a version that has scored enough rows for the compile to pay off, and of at most
MAX_COMPILED_TREES trees; until then, or otherwise, LightGBM scores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import lleaves  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

# The objective line of a LightGBM model string whose probability is 1 / (1 + exp(-raw score)).
_LOGISTIC = re.compile(r"^objective=binary sigmoid:1$", re.MULTILINE)
_THRESHOLDS = re.compile(r"^threshold=(.*)$", re.MULTILINE)
_PROBE_SEED = 20_261_124
_PROBE_ROWS = 512
_LOWEST_PRIORITY = 19
COMPILE_TIMEOUT_SECONDS = 600.0
# One function of all trees costs LLVM superlinear time and memory: 226 trees took 3-17 s and 240 MB, 1,000
# trees 6 min and 1 GB (the pod's limit is 1.5 GiB). Larger models keep LightGBM.
MAX_COMPILED_TREES = 400
# LightGBM's kZeroThreshold (1e-35 as a C float): values this close to zero go down a split's zero branch.
_ZERO_BAND = float(np.float32(1e-35))


def _probe_rows(model_string: str, features: int) -> npt.NDArray[np.float64]:
    """Rows that reach every kind of leaf: each split threshold, just below and above it, and missing values."""
    thresholds = np.asarray([float(value) for line in _THRESHOLDS.findall(model_string)
                             for value in line.split()], dtype=np.float64)
    values = np.concatenate([thresholds, np.nextafter(thresholds, -np.inf), np.nextafter(thresholds, np.inf),
                             [np.nan, 0.0, -1.0, 1e9]])
    rng = np.random.default_rng(_PROBE_SEED)
    rows: npt.NDArray[np.float64] = rng.choice(values, size=(_PROBE_ROWS, features))
    return rows


class CompiledForest:
    """A compiled model version: `probabilities(features)` as LightGBM's `predict`, one thread per call."""

    def __init__(self, model: lleaves.Model, booster: lgb.Booster) -> None:
        self._model = model
        self._booster = booster

    @classmethod
    def compile(cls, model_string: str, booster: lgb.Booster,
                max_trees: int = MAX_COMPILED_TREES) -> CompiledForest | None:
        """The compiled forest, or None when this model cannot be compiled to LightGBM's exact numbers (or has
        more than `max_trees` trees).

        LLVM's input is built by Python code (llvmlite.ir: hundreds of thousands of objects for a few hundred
        trees), so the compile runs in a child process at the lowest CPU priority: in this process it would
        hold the GIL and fill the garbage collector for seconds while requests wait. This process only loads
        the machine code the child wrote.
        """
        if not _LOGISTIC.search(model_string):
            return None  # only the binary objective (what training uses) has its sigmoid compiled in
        if booster.num_trees() > max_trees:
            log.info("not compiling a model of many trees; scoring with LightGBM",
                     extra={"trees": booster.num_trees(), "max_trees": max_trees})
            return None
        with tempfile.TemporaryDirectory(prefix="onecdp-model-") as directory:
            model_file, machine_code = Path(directory, "model.txt"), Path(directory, "model.o")
            model_file.write_text(model_string)
            # The child imports this module as this process does (tests put the repository on sys.path).
            subprocess.run([sys.executable, "-m", __name__, str(model_file), str(machine_code)], check=True,
                           capture_output=True, timeout=COMPILE_TIMEOUT_SECONDS,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
            model = lleaves.Model(model_file=str(model_file))
            model.compile(cache=str(machine_code), raw_score=False)  # loads what the child compiled
        forest = cls(model, booster)
        probe = _probe_rows(model_string, booster.num_feature())
        expected = np.asarray(booster.predict(probe, num_threads=1), dtype=np.float64)
        if not np.array_equal(forest.probabilities(probe), expected):
            log.warning("the compiled model differs from LightGBM on probe rows; scoring with LightGBM")
            return None
        return forest

    def probabilities(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        probabilities = np.asarray(self._model.predict(features, n_jobs=1), dtype=np.float64)
        near_zero = ((np.abs(features) <= _ZERO_BAND) & (features != 0.0)).any(axis=1)
        if near_zero.any():  # the corner where lleaves and LightGBM differ (module docstring)
            probabilities[near_zero] = self._booster.predict(features[near_zero], num_threads=1)
        return probabilities


class BackgroundCompile:
    """Compiles a forest once, from a background thread, after `rows_before_compile` rows were scored without
    it; `forest` is None until it is ready (and stays None if it cannot be had)."""

    def __init__(self, model_string: str, booster: lgb.Booster, rows_before_compile: int, name: str,
                 compile_forest: Callable[[str, lgb.Booster], CompiledForest | None] = CompiledForest.compile
                 ) -> None:
        self.forest: CompiledForest | None = None
        self._model_string = model_string
        self._booster = booster
        self._rows_left = rows_before_compile
        self._name = name
        self._compile_forest = compile_forest
        self._lock = threading.Lock()
        self._started = False
        self.done = threading.Event()

    def scored(self, rows: int) -> None:
        """`rows` were scored without the compiled forest; start compiling once enough were."""
        with self._lock:
            self._rows_left -= rows
            if self._started or self._rows_left > 0:
                return
            self._started = True
        threading.Thread(target=self._compile, name="prediction-compile", daemon=True).start()

    def compile_now(self) -> None:
        """Compile in the calling thread (unless a compile already started: then wait for it), e.g. on the training
        job's thread, so that a new version scores compiled from its first call."""
        with self._lock:
            started, self._started = self._started, True
        if started:
            self.done.wait(COMPILE_TIMEOUT_SECONDS)
        else:
            self._compile()

    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            self.forest = self._compile_forest(self._model_string, self._booster)
        except Exception as error:  # a compile failure only costs speed: LightGBM goes on scoring
            log.warning("compiling the model failed; scoring with LightGBM",
                        extra={"model": self._name, "error": f"{type(error).__name__}: {error}"})
        else:
            log.info("compiled model", extra={"model": self._name, "compiled": self.forest is not None,
                                              "seconds": round(time.perf_counter() - started, 2)})
        finally:
            self._model_string = ""  # not needed any more
            self.done.set()


def compile_to_file(model_file: str, machine_code: str) -> None:
    """The child process of `CompiledForest.compile`: compile `model_file` into `machine_code`, at the lowest
    CPU priority (it only takes CPU that requests leave idle)."""
    with contextlib.suppress(OSError):
        os.nice(_LOWEST_PRIORITY)
    model = lleaves.Model(model_file=model_file)
    # One block of all trees: they are added in LightGBM's order; the sigmoid compiled in (module docstring).
    model.compile(cache=machine_code, raw_score=False, fblocksize=max(1, model.num_trees()))


if __name__ == "__main__":
    compile_to_file(*sys.argv[1:3])
