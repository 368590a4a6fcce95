"""Suite-wide settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on cores shared with other processes
    the threads' spinning makes each small op 10-100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def decode_step_logits():
    """run(model, step, lanes) -> [(compiled, eager, ran compiled)] for one decode step of `lanes`
    lanes over a random cached context, short then longer (5 and 21 tokens: one graph, the key
    dimension dynamic): the logits of `step` (a CompiledDecode of `model`) and of the eager model."""
    from lmstack.infer.step import StepRow, prepare_step
    from lmstack.model.paged import PagedKVCache

    def run(model, step, lanes: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        kv = PagedKVCache.for_model(model, num_blocks=8 * lanes, block_size=4)
        torch.manual_seed(0)
        kv.k = [torch.randn_like(t) for t in kv.k]  # some context to attend to
        kv.v = [torch.randn_like(t) for t in kv.v]
        results = []
        with torch.inference_mode():
            for computed in (5, 21):
                rows = [StepRow([7 + i], list(range(8 * i, 8 * i + 8)), computed - i % 3)
                        for i in range(lanes)]
                tokens, positions, meta = prepare_step(kv, rows, "cpu", fill_lanes=True)
                eager = model(tokens, positions, cache=meta, logits_index=meta.logits_index).float()
                compiled_run, is_compiled = step.step_for(lanes, 1)
                tokens, positions, meta = prepare_step(kv, rows, "cpu", fill_lanes=True, compiled=True)
                results.append((compiled_run(tokens, positions, meta, meta.logits_index).float(),
                                eager, is_compiled))
        return results

    return run
