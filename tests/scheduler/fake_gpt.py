"""A tiny fake GPT whose rows are independent and whose outputs depend on each row's own cache, token and
position: what the shared decode batch must keep apart. Values are multiples of 1/64, so masked sums over
any number of zero positions are exact and a row's logits are bitwise the same at any batch shape."""

from __future__ import annotations

import numpy as np

from runtime.contracts import kv_cache_name
from runtime.gpt.graph_steps import GraphGptSteps
from runtime.gpt.steps import GptGeometry

GEOMETRY = GptGeometry(layers=2, heads=2, head_dim=4, vocab_size=40, start_mel_token=38, stop_mel_token=39,
                       max_mel_tokens=60)
POISON = 99             # text id whose generation's rows come back NaN from the decode step
BROKEN = 98             # text id whose prefill call raises (the whole call, as a graph refusing its feed)


def _q(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x, np.float64) * 64) / 64


class FakeGpt:
    """gpt_prefill / gpt_decode executors (name picks which)."""

    def __init__(self, name: str) -> None:
        self.name, self.backend, self.calls, self.rows_seen = name, "fake", 0, []

    def run(self, feed, outputs=None):
        self.calls += 1
        g = GEOMETRY
        if self.name == "gpt_prefill":                       # each row of the batch its own prompt
            text = feed["text_ids"]
            assert feed["spk_latent"].shape[0] == feed["emovec"].shape[0] == text.shape[0]
            self.rows_seen.append(text.shape[0])
            if (text == BROKEN).any():
                raise RuntimeError("fake gpt_prefill: a broken prompt in the call")
            outs = [self._prefill_row(ids) for ids in text]
            return {"logits": np.concatenate([o[0] for o in outs]), "kv": np.concatenate([o[1] for o in outs], axis=2)}
        rows = feed["mel_ids"].shape[0]
        self.rows_seen.append(rows)
        cache0 = feed[kv_cache_name(0)]                       # (2, R, H, S, D)
        mask = feed["kv_mask"]                                # (R, S)
        a = (cache0[0, :, 0, :, 0] * mask).sum(axis=1)        # exact: multiples of 1/64
        poisoned = (cache0[0, :, 0, 0, 1] == -63 / 64) & (mask[:, 0] == 1.0)
        tok, pos = feed["mel_ids"][:, 0], feed["mel_pos"][:, 0]
        v = np.arange(g.vocab_size)
        logits = 3 * np.sin(a[:, None] * 0.37 + v[None] * 1.3 + tok[:, None] * 0.11 + pos[:, None] * 0.07)
        logits[:, g.stop_mel_token] = 0.6 * (pos - 6 - 9 * np.modf(a / 7)[0])
        logits[poisoned] = np.nan
        out = outputs if outputs is not None else {
            "logits": np.empty((rows, g.vocab_size), np.float32),
            "kv_new": np.empty((g.layers, 2, rows, g.heads, 1, g.head_dim), np.float32)}
        out["logits"][...] = logits
        out["kv_new"][...] = _q((tok % 5) / 4 + pos / 32)[None, None, :, None, None, None]
        return out

    @staticmethod
    def _prefill_row(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = GEOMETRY
        rows = ids.size + 2
        marker = _q((ids.sum() % 13) / 8 + np.arange(rows)[:, None] / 16 + np.zeros((1, g.head_dim)))
        kv = np.broadcast_to(marker.astype(np.float32), (g.layers, 2, 1, g.heads, rows, g.head_dim)).copy()
        if POISON in ids:
            kv[0, 0, 0, 0, 0, 1] = -63 / 64       # marks the rows (markers are >= 0): decode answers NaN
        logits = np.sin(np.arange(g.vocab_size) * 0.7 + ids.sum()).astype(np.float32)[None] * 3
        logits[0, g.stop_mel_token] = -5.0
        return logits, kv

    def close(self) -> None:
        pass


def fake_steps() -> GraphGptSteps:
    return GraphGptSteps(FakeGpt("gpt_prefill"), FakeGpt("gpt_decode"), GEOMETRY)


class FakeLatent:
    """gpt_latent: each row's s_infer from its own text and codes only (so a shared call is each row alone)."""

    name, backend = "gpt_latent", "fake"

    def __init__(self) -> None:
        self.rows_seen: list[int] = []

    def run(self, feed, outputs=None):
        text, codes = feed["text_ids"], feed["codes"]
        assert feed["spk_latent"].shape[0] == feed["emovec"].shape[0] == text.shape[0] == codes.shape[0]
        self.rows_seen.append(codes.shape[0])
        base = codes[:, :, None] * 0.25 + text.sum(axis=1)[:, None, None] + np.arange(3)[None, None]
        return {"s_infer": base.astype(np.float32)}

    def close(self) -> None:
        pass
