"""Continuous batching of the decode: each generation's codes are its codes alone, whoever shares the batch,
whenever it joins, whatever its beams and sampling settings; its rows are freed when it ends or fails."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import BackendError
from runtime.gpt.codes import segment_codes
from runtime.gpt.batch_cache import ROW_BUCKETS, BatchKVCache
from runtime.gpt.generate import GenerationConfig, generate
from runtime.gpt.kv_cache import KVCache
from runtime.gpt.sampling import RngDraws
from runtime.scheduler.gpt_batch import GptBatch
from runtime.scheduler.gpt_batch import Joining
from runtime.gpt.s_infer import LatentPass
from runtime.scheduler.workers import GptJob, GptWorker
from tests.scheduler.fake_gpt import BROKEN, GEOMETRY, POISON, FakeLatent, fake_steps

SPK, EMO = np.zeros((1, 32, 4), np.float32), np.zeros((1, 4), np.float32)
COND = {"spk_latent": SPK}
BUCKETS = (16, 32, 64)

# (text ids, config, seed, join at step)
REQUESTS = [
    (np.arange(2, 9), GenerationConfig(num_beams=3, max_mel_tokens=40), 1, 0),
    (np.arange(3, 6), GenerationConfig(num_beams=1, max_mel_tokens=40, top_k=5, temperature=1.1), 2, 0),
    (np.arange(10, 24), GenerationConfig(do_sample=False, num_beams=2, max_mel_tokens=30,
                                         repetition_penalty=2.0), 3, 2),
    (np.arange(4, 7), GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=25), 4, 5),
    (np.arange(20, 27), GenerationConfig(num_beams=3, max_mel_tokens=40, top_p=0.9), 5, 5),
    (np.arange(8, 12), GenerationConfig(num_beams=4, max_mel_tokens=40), 6, 9),
]


def _draws(config: GenerationConfig, seed: int):
    return RngDraws(seed) if config.do_sample else None


def _alone(ids, config, seed):
    return generate(fake_steps(), COND, EMO, ids, config, draws=_draws(config, seed), cache_buckets=BUCKETS)


def _batched(requests, max_rows=16):
    steps = fake_steps()
    batch = GptBatch(steps, steps.new_batch_cache(max_rows, BUCKETS))
    results, failed, step = {}, {}, 0
    waiting = sorted(enumerate(requests), key=lambda x: x[1][3])
    while waiting or batch.active:
        while waiting and waiting[0][1][3] <= step and batch.fits(waiting[0][1][1].num_beams):
            i, (ids, config, seed, _) = waiting.pop(0)
            done = batch.join(i, COND, EMO, ids, config, _draws(config, seed))
            if done is not None:
                results[i] = done
        ended, broken = batch.step()
        results.update(ended)
        failed.update(broken)
        step += 1
    return results, failed, batch, steps


def test_each_generation_in_the_batch_is_the_generation_alone() -> None:
    results, failed, batch, steps = _batched(REQUESTS)
    assert not failed
    for i, (ids, config, seed, _) in enumerate(REQUESTS):
        alone = _alone(ids, config, seed)
        np.testing.assert_array_equal(results[i].codes, alone.codes, err_msg=f"request {i}")
        assert results[i].stopped == alone.stopped and results[i].score == alone.score
    assert max(steps._decode.rows_seen) >= 9                       # they really shared calls
    assert batch.decode_calls < sum(len(_alone(*r[:3]).codes) for r in REQUESTS)
    assert batch.cache.used_rows == 0 and not batch.active         # every row freed


def test_a_row_limit_makes_later_generations_wait_not_fail() -> None:
    results, failed, batch, steps = _batched(REQUESTS, max_rows=5)
    assert not failed and len(results) == len(REQUESTS)
    assert max(steps._decode.rows_seen) <= 6                       # row bucket of at most 5 used rows
    for i, (ids, config, seed, _) in enumerate(REQUESTS):
        np.testing.assert_array_equal(results[i].codes, _alone(ids, config, seed).codes)


def test_a_generation_whose_rows_break_fails_alone_and_frees_them() -> None:
    requests = [REQUESTS[0], (np.array([5, POISON, 9]), GenerationConfig(num_beams=2, max_mel_tokens=40), 9, 0),
                REQUESTS[1]]
    results, failed, batch, _ = _batched(requests)
    assert set(failed) == {1} and isinstance(failed[1], BackendError) and "non-finite" in str(failed[1])
    for i in (0, 2):
        np.testing.assert_array_equal(results[i].codes, _alone(*requests[i][:3]).codes)
    assert batch.cache.used_rows == 0


def test_leaving_mid_generation_frees_rows_and_keeps_the_others_exact() -> None:
    steps = fake_steps()
    batch = GptBatch(steps, steps.new_batch_cache(16, BUCKETS))
    for i in range(3):
        ids, config, seed, _ = REQUESTS[i]
        assert batch.join(i, COND, EMO, ids, config, _draws(config, seed)) is None
    for _ in range(3):
        batch.step()
    batch.leave(1)                                                 # a cancelled request
    assert batch.cache.used_rows == 3 + 2
    results = {}
    while batch.active:
        results.update(batch.step()[0])
    for i in (0, 2):
        np.testing.assert_array_equal(results[i].codes, _alone(*REQUESTS[i][:3]).codes)


# -- prompts of one length share the prefill, generations ending together share the latent pass ---------
SAME_LENGTH = [
    (np.arange(2, 9), GenerationConfig(num_beams=3, max_mel_tokens=30), 1),
    (np.arange(30, 37), GenerationConfig(num_beams=1, max_mel_tokens=30, top_k=5), 2),
    (np.arange(11, 18), GenerationConfig(do_sample=False, num_beams=2, max_mel_tokens=20), 3),
]


def test_prompts_of_one_length_share_a_prefill_and_each_is_its_generation_alone() -> None:
    steps = fake_steps()
    batch = GptBatch(steps, steps.new_batch_cache(16, BUCKETS))
    joined = batch.join_together([Joining(i, COND, EMO, ids, config, _draws(config, seed))
                                  for i, (ids, config, seed) in enumerate(SAME_LENGTH)])
    assert joined == {0: None, 1: None, 2: None}
    assert batch.prefill_calls == 1 and steps._prefill.rows_seen == [3]
    results = {}
    while batch.active:
        results.update(batch.step()[0])
    for i, (ids, config, seed) in enumerate(SAME_LENGTH):
        alone = _alone(ids, config, seed)
        np.testing.assert_array_equal(results[i].codes, alone.codes, err_msg=f"request {i}")
        assert results[i].score == alone.score
    with pytest.raises(ValueError, match="one length"):
        batch.join_together([Joining(9, COND, EMO, np.arange(3), GenerationConfig(), None),
                             Joining(10, COND, EMO, np.arange(4), GenerationConfig(), None)])


def _alone_segment(ids, config, seed):
    """The codes the one-request path hands on (stop token and trimming as runtime/gpt/codes.py)."""
    return segment_codes(fake_steps(), COND, EMO, list(ids), config, _draws(config, seed), 0).codes


def _worker_run(jobs_spec, group_rows=4):
    steps, latent = fake_steps(), FakeLatent()
    worker = GptWorker(steps, LatentPass(latent), GptBatch(steps, steps.new_batch_cache(16, BUCKETS)), group_rows)
    jobs = [GptJob(COND, EMO, ids, config, _draws(config, seed), 0) for ids, config, seed in jobs_spec]
    worker._inbox.extend(jobs)            # all arrive together: one cycle admits them (the thread is not started)
    new, worker._inbox = worker._inbox, []
    worker.cycle(new)
    while worker.busy():
        worker.cycle([])
    return jobs, steps, latent, worker


def test_the_worker_groups_prefills_and_latent_passes_by_length_and_each_is_alone() -> None:
    spec = [*SAME_LENGTH, (np.arange(40, 44), GenerationConfig(num_beams=1, max_mel_tokens=30), 4),
            (np.arange(50, 57), GenerationConfig(do_sample=False, num_beams=1, max_mel_tokens=5), 5),
            (np.arange(60, 67), GenerationConfig(num_beams=2, max_mel_tokens=5), 6)]
    jobs, steps, latent, worker = _worker_run(spec, group_rows=3)
    assert steps._prefill.rows_seen == [3, 2, 1]              # 5 prompts of 7 ids (3 per call) and one of 4
    for job, (ids, config, seed) in zip(jobs, spec):
        out = job.wait()
        np.testing.assert_array_equal(out.codes.codes, _alone_segment(ids, config, seed))
        one = FakeLatent().run({"spk_latent": SPK, "emovec": EMO, "text_ids": out.codes.text_ids[None],
                                "codes": out.codes.codes[None]})["s_infer"]
        np.testing.assert_array_equal(out.s_infer, one)
    assert 2 in latent.rows_seen and sum(latent.rows_seen) == len(spec)   # the last two ended together
    assert worker.batch.cache.used_rows == 0


def test_a_broken_prompt_in_a_shared_prefill_fails_alone() -> None:
    broken = np.array([5, BROKEN, 9, 10, 11, 12, 13])
    spec = [SAME_LENGTH[0], (broken, GenerationConfig(num_beams=1, max_mel_tokens=30), 9), SAME_LENGTH[1]]
    jobs, steps, _, worker = _worker_run(spec)
    with pytest.raises(RuntimeError, match="broken prompt"):
        jobs[1].wait()
    for i in (0, 2):
        ids, config, seed = spec[i]
        np.testing.assert_array_equal(jobs[i].wait().codes.codes, _alone_segment(ids, config, seed))
    assert worker.batch.cache.used_rows == 0


# -- the cache itself -------------------------------------------------------------------------------
def _kv(rng, prompt, beams=1):
    g = GEOMETRY
    return rng.integers(-64, 64, (g.layers, 2, beams, g.heads, prompt, g.head_dim)).astype(np.float32) / 64


def test_the_shared_cache_holds_each_member_as_its_own_cache_would() -> None:
    """Joins, per-row appends at different lengths, beam reorders, leaves (with compaction and shrinking):
    each member's rows always equal a one-request KVCache driven the same way."""
    g, rng = GEOMETRY, np.random.default_rng(0)
    shared = BatchKVCache(g.layers, g.heads, g.head_dim, max_rows=12, buckets=BUCKETS)
    alone: dict[int, KVCache] = {}
    beams_of = {}
    grew_rows, capacities = set(), set()
    for step in range(60):
        if step % 7 == 0 and shared.free_rows() >= 3:
            key, beams = step, int(rng.integers(1, 4))
            kv = _kv(rng, int(rng.integers(3, 20)))
            shared.join(key, kv, beams, 70)
            alone[key] = KVCache.from_prefill(kv, beams, 70, BUCKETS)
            beams_of[key] = beams
        if step % 11 == 5 and alone:
            key = sorted(alone)[int(rng.integers(0, len(alone)))]
            shared.leave(key)
            del alone[key]
        for key, cache in alone.items():
            parents = rng.integers(0, beams_of[key], beams_of[key])
            shared.reorder(key, parents)
            cache.reorder(parents)
        shared.ensure_room()
        kv_new = _kv(rng, 1, shared.rows).reshape(g.layers, 2, shared.rows, g.heads, 1, g.head_dim)
        shared.append(kv_new)
        for key, cache in alone.items():
            cache.append(kv_new[:, :, shared.member_rows(key)])
        for key, cache in alone.items():
            rows, n = shared.member_rows(key), cache.length
            np.testing.assert_array_equal(shared.buffer[:, :, rows, :, :n], cache.buffer[:, :, :, :, :n])
            np.testing.assert_array_equal(shared.mask[rows, :n], cache.mask[:, :n])
            assert not shared.mask[rows, n:].any()
        idle = [r for r in range(shared.rows) if not any(r in shared.member_rows(k) for k in alone)]
        assert not shared.mask[idle].any()
        assert shared.used_rows <= shared.rows and (shared.rows == 0 or shared.rows in (*ROW_BUCKETS, 12))
        grew_rows.add(shared.rows)
        capacities.add(shared.capacity)
    assert len(grew_rows) >= 3 and len(capacities) >= 3      # the walk grew, compacted and shrank the arrays


def test_the_shared_cache_refuses_what_does_not_fit() -> None:
    g = GEOMETRY
    shared = BatchKVCache(g.layers, g.heads, g.head_dim, max_rows=4, buckets=BUCKETS)
    shared.join("a", np.zeros((g.layers, 2, 1, g.heads, 5, g.head_dim), np.float32), 3, 40)
    with pytest.raises(ValueError, match="1 free of 4"):
        shared.join("b", np.zeros((g.layers, 2, 1, g.heads, 5, g.head_dim), np.float32), 2, 40)
    with pytest.raises(ValueError, match="already a member"):
        shared.join("a", np.zeros((g.layers, 2, 1, g.heads, 5, g.head_dim), np.float32), 1, 40)


def test_a_beam_move_copies_only_where_the_histories_differ() -> None:
    """Beams fed the same first tokens hold the same K/V there (a position's K/V follows from the tokens up
    to it), so a reorder copies from the first differing token on: a sentinel in the common part stays."""
    g = GEOMETRY
    shared = BatchKVCache(g.layers, g.heads, g.head_dim, max_rows=4, buckets=BUCKETS)
    prompt = 5
    rows = shared.join("m", np.ones((g.layers, 2, 1, g.heads, prompt, g.head_dim), np.float32), 3, 40)
    histories = [[7, 8, 9, 1], [7, 8, 9, 2], [7, 3, 3, 3]]       # beam 1 differs from 0 at the 4th token
    for step in range(4):
        shared.set_tokens("m", np.array([h[step] for h in histories]), prompt + step)
        kv_new = np.zeros((g.layers, 2, shared.rows, g.heads, 1, g.head_dim), np.float32)
        for b, r in enumerate(rows):
            kv_new[:, :, r] = 10 * b + step                          # beams' K/V differ everywhere...
        shared.append(kv_new)
    shared.buffer[:, :, rows[1], :, prompt:prompt + 3] = -1.0       # ...but say beam 1's common part is alike
    before_2 = shared.buffer[:, :, rows[2]].copy()
    shared.reorder("m", np.array([0, 0, 2]))                         # beam 1 takes beam 0's place
    np.testing.assert_array_equal(shared.buffer[:, :, rows[1], :, prompt:prompt + 3], -1.0)   # not copied
    np.testing.assert_array_equal(shared.buffer[:, :, rows[1], :, prompt + 3], 3.0)           # copied: differs
    np.testing.assert_array_equal(shared.buffer[:, :, rows[2]], before_2)                     # kept its own
    row_0 = shared.buffer[:, :, rows[0]].copy()
    shared.reorder("m", np.array([2, 1, 0]))                         # a swap: beam 0 <-> beam 2 (parked)
    # beams 0 and 2 share their first token (7): only the 3 later positions are exchanged
    np.testing.assert_array_equal(shared.buffer[:, :, rows[0], :, prompt + 1:prompt + 4],
                                  before_2[:, :, :, prompt + 1:prompt + 4])
    np.testing.assert_array_equal(shared.buffer[:, :, rows[2], :, prompt + 1:prompt + 4],
                                  row_0[:, :, :, prompt + 1:prompt + 4])
    np.testing.assert_array_equal(shared.buffer[:, :, rows[0], :, prompt], row_0[:, :, :, prompt])
    np.testing.assert_array_equal(shared.buffer[:, :, rows[2], :, prompt], before_2[:, :, :, prompt])


def test_a_beam_history_fed_past_its_size_grows_rather_than_stops() -> None:
    """A history cut short would make beams that differ later look alike (and skip their copy)."""
    from runtime.gpt.batch_cache import BatchMember

    member = BatchMember.joining([0, 1], max_positions=6, prompt=5, one_prompt=True)   # room for 2 tokens
    for step in range(5):
        member.record(np.array([7, 7 if step < 4 else 8]))
    assert member.steps == 5 and member.fed.shape[1] >= 5
    assert member.moves(np.array([0, 0]), 10) == [(1, 0, 9)]      # they differ at the 5th token: copy [9, 10)
