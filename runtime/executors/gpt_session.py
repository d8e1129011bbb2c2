"""The GPT graphs in one ONNX Runtime CPU session, so their weights are held once.

Why: `gpt_prefill`, `gpt_decode` and `gpt_latent` carry the same ~1.8 GB of GPT weights, and each ONNX
Runtime session pre-packs its own copy for its MatMul kernels, so three sessions hold three (issue 22;
sharing initializers across sessions does not stop the pre-packing, and turning pre-packing off makes the
decode step ~3x slower: benchmarks/RESULTS.md "CPU plan"). The export writes the GPT graphs as the
branches of one model (export/gpt_shared.py, recorded as `Manifest.shared_gpt`); this session opens it once
and hands out one executor per graph (`executor(entry)`), each an OrtExecutor bound to its branch. The
executors check feeds against their own graph's contract, exactly as with a session of their own, and
compute exactly what their own graph computes.

Used by `ort-cpu` (and the ort-cpu graphs of `cpu-auto`) when the export has a current shared file and the
float32 graphs are run; an older export without it runs one session per graph, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import BackendError, CheckpointError, EngineMismatchError
from runtime.executors.ort import BranchOf, OrtExecutor, OrtOptions, import_ort, session_options
from runtime.manifest import GraphEntry, Manifest

log = logging.getLogger(__name__)

BRANCH_INPUT = "branch"            # export/gpt_shared.py BRANCH_INPUT
SHARED_GRAPH_NAME = "gpt_shared"   # its `indextts2.graph` metadata


def shared_gpt_usable(manifest: Manifest, root: str | Path) -> bool:
    """The export has a shared GPT file made from its current GPT graphs, and the file is there."""
    shared = manifest.shared_gpt
    if shared is None:
        return False
    if not shared.current(manifest.graphs):
        log.warning("%s: the shared GPT file %s was made from other GPT graphs; one session per graph is used "
                    "(re-run python -m export.build to remake it)", root, shared.file)
        return False
    return shared.path(root).is_file()


class SharedGptSession:
    """One ONNX Runtime CPU session over the export's shared GPT file; `executor(entry)` per graph."""

    def __init__(self, manifest: Manifest, root: str | Path, options: OrtOptions = OrtOptions()) -> None:
        record = manifest.shared_gpt
        if record is None:
            raise CheckpointError(f"{root}: this export has no shared GPT file (re-run python -m export.build)")
        self.record, self.branches = record, tuple(record.branches)
        path = record.path(root)
        ort = import_ort()
        t0 = time.perf_counter()
        try:
            self.session: Any = ort.InferenceSession(str(path), sess_options=session_options(options),
                                                     providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 — ORT raises its own exception types for a bad file
            raise CheckpointError(f"shared GPT graph: ONNX Runtime cannot load {path}: {err}") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("indextts2.graph") != SHARED_GRAPH_NAME or meta.get("indextts2.fingerprint") != record.fingerprint:
            raise EngineMismatchError(
                f"shared GPT graph: {path} was not made from the GPT graphs this manifest lists (its metadata says "
                f"{meta.get('indextts2.graph')!r}, {str(meta.get('indextts2.fingerprint'))[:12]}..., the manifest "
                f"{record.fingerprint[:12]}...); rebuild with python -m export.build")
        self._meta = dict(meta)
        self._path = path
        self._lock = threading.Lock()
        self._closed = False
        log.info("shared GPT session (%s: %s) in %.2f s, %.2f GiB of weights held once", record.file,
                 ", ".join(self.branches), time.perf_counter() - t0, record.shared_bytes / 2**30)

    def executor(self, entry: GraphEntry) -> OrtExecutor:
        """The executor of graph `entry` (float32 form) as its branch of this session."""
        with self._lock:
            if self._closed:
                raise BackendError("the shared GPT session was closed")
        if entry.name not in self.branches:
            raise BackendError(f"graph '{entry.name}' is not a branch of the shared GPT session ({self.branches})")
        fingerprint = self._meta.get(f"indextts2.fingerprint.{entry.name}")
        if fingerprint != entry.fingerprint:
            raise EngineMismatchError(
                f"graph '{entry.name}': its branch of {self._path} was not produced by the build this manifest "
                f"describes (its metadata says fingerprint {str(fingerprint)[:12]}..., the manifest "
                f"{entry.fingerprint[:12]}...); rebuild with python -m export.build")
        return OrtExecutor(entry, "", "ort-cpu",
                           branch=BranchOf(self.session, BRANCH_INPUT, self.branches.index(entry.name)))

    def close(self) -> None:
        """Drop the session (its executors must not be run afterwards; GraphSet closes them first)."""
        with self._lock:
            self._closed = True
            self.session = None
