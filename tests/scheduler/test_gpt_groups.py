"""Prompts of one length share the exported gpt_prefill call, generations ending together with equal lengths
share the gpt_latent call, and each is exactly its generation alone (tiny export, ONNX Runtime CPU)."""

from __future__ import annotations

import numpy as np

from runtime.backend import open_backend
from runtime.contracts import KV_BUCKETS
from runtime.gpt.codes import segment_codes
from runtime.gpt.generate import GenerationConfig
from runtime.gpt.graph_steps import GraphGptSteps
from runtime.gpt.sampling import RngDraws
from runtime.manifest import read_manifest
from runtime.scheduler.gpt_batch import GptBatch
from runtime.gpt.s_infer import LatentPass
from runtime.scheduler.workers import GptJob, GptWorker

# (text ids, config, seed): three prompts of 12 ids, one of 9; the first two end at max_mel_tokens together
SPECS = [
    (np.arange(20, 32), GenerationConfig(do_sample=True, num_beams=1, top_k=20, max_mel_tokens=12), 1),
    (np.arange(40, 52), GenerationConfig(do_sample=False, num_beams=2, max_mel_tokens=12), 2),
    (np.arange(60, 72), GenerationConfig(do_sample=True, num_beams=3, max_mel_tokens=30), 3),
    (np.arange(80, 89), GenerationConfig(do_sample=True, num_beams=1, max_mel_tokens=20), 4),
]


class Counting:
    """An executor wrapper that records the batch of each call."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.backend, self.batches = inner, inner.name, inner.backend, []

    def run(self, feed, outputs=None):
        self.batches.append(next(iter(feed.values())).shape[0])
        return self.inner.run(feed, outputs) if outputs is not None else self.inner.run(feed)


def test_shared_prefill_and_latent_calls_give_each_generation_its_output_alone(tiny_export) -> None:
    root = tiny_export[0]
    manifest = read_manifest(root)
    backend = open_backend(manifest, root, "ort-cpu")
    try:
        geometry = backend.gpt_steps.geometry
        prefill, latent = Counting(backend.graphs["gpt_prefill"]), Counting(backend.graphs["gpt_latent"])
        steps = GraphGptSteps(prefill, backend.graphs["gpt_decode"], geometry)
        rng = np.random.default_rng(5)
        d = geometry.heads * geometry.head_dim
        conds = [(rng.standard_normal((1, 32, d)).astype(np.float32), rng.standard_normal((1, d)).astype(np.float32))
                 for _ in SPECS]

        def draws(config, seed):
            return RngDraws(seed) if config.do_sample else None

        alone = []
        for (ids, config, seed), (spk, emo) in zip(SPECS, conds):
            codes = segment_codes(backend.gpt_steps, {"spk_latent": spk}, emo, list(ids), config, draws(config, seed), 0)
            s_infer = latent.inner.run({"spk_latent": spk, "emovec": emo, "text_ids": codes.text_ids[None],
                                        "codes": codes.codes[None]})["s_infer"].copy()
            alone.append((codes, s_infer))

        worker = GptWorker(steps, LatentPass(latent), GptBatch(steps, steps.new_batch_cache(16, KV_BUCKETS)), group_rows=4)
        jobs = [GptJob({"spk_latent": spk}, emo, ids, config, draws(config, seed), 0)
                for (ids, config, seed), (spk, emo) in zip(SPECS, conds)]
        worker.cycle(jobs)                                   # all arrive together (the thread is not started)
        while worker.busy():
            worker.cycle([])
        assert prefill.batches == [3, 1]                     # the three prompts of 12 ids in one call
        assert 2 in latent.batches and sum(latent.batches) == len(SPECS)
        for i, (job, (codes, s_infer)) in enumerate(zip(jobs, alone)):
            out = job.wait()
            np.testing.assert_array_equal(out.codes.codes, codes.codes, err_msg=f"generation {i}")
            np.testing.assert_array_equal(out.s_infer, s_infer, err_msg=f"generation {i}")
        assert worker.batch.cache.used_rows == 0
    finally:
        backend.close()
