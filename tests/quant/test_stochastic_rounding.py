"""Stochastic rounding of embedding codes (``rounding: stochastic``): unbiased, on the two neighbouring grid points,
reproducible from the seed and the step, and round-to-nearest in evaluation."""

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import fake_quantize, learned_fake_quantize
from tests.helpers.model import ROWS, qat_module, random_batch

SCALE = 0.25


def test_stochastic_codes_are_unbiased_and_one_of_the_two_neighbours():
    draws = 4000
    x = torch.tensor([-1.9, -0.3, -0.125, 0.0, 0.01, 0.6, 1.4, 1.74])  # inside the 4-bit grid [-8, 7] * 0.25
    generator = torch.Generator().manual_seed(1)
    noise = torch.rand(draws, len(x), generator=generator)
    scale, qmin, qmax = torch.tensor(SCALE), torch.tensor(-8.0), torch.tensor(7.0)
    out = fake_quantize(x.expand(draws, -1), scale, qmin, qmax, noise=noise)
    codes = out / SCALE
    assert torch.equal(codes, codes.round())  # on the grid
    low, high = torch.floor(x / SCALE), torch.ceil(x / SCALE)
    assert bool(((codes == low) | (codes == high)).all())  # one of the two neighbours of x
    torch.testing.assert_close(out.mean(dim=0), x, rtol=0, atol=0.05 * SCALE)  # standard error <= 0.008 * SCALE
    exact = x / SCALE == torch.round(x / SCALE)
    assert torch.equal(out[:, exact], x[exact].expand(draws, -1))  # grid points never move
    learned = learned_fake_quantize(x.expand(draws, -1), scale, qmin, qmax, torch.tensor(1.0), noise=noise)
    assert torch.equal(learned, out)  # learned scales round the same way


def kjt(lengths: list[int], seed: int = 0) -> KeyedJaggedTensor:
    per_feature = torch.tensor(lengths * len(DEFAULT_CAT_NAMES), dtype=torch.int32)
    values = torch.randint(0, ROWS, (int(per_feature.sum()),), generator=torch.Generator().manual_seed(seed))
    return KeyedJaggedTensor.from_lengths_sync(keys=list(DEFAULT_CAT_NAMES), values=values, lengths=per_feature)


def pooled_pair(lengths: list[int], steps: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Stochastic training outputs (B, F, D) at ``steps``, its evaluation output and the round-to-nearest model's."""
    stochastic = qat_module(QATConfig(embedding_bits=4, rounding="stochastic"))
    nearest = qat_module(QATConfig(embedding_bits=4))  # the same seeded tables
    features = kjt(lengths)
    outputs = []
    with torch.no_grad():
        for step in steps:
            stochastic.embedding_quantizer.maybe_refresh(step)
            outputs.append(stochastic.dlrm.sparse_arch(features))
        nearest.embedding_quantizer.maybe_refresh(0)
        want = nearest.dlrm.sparse_arch(features)
        stochastic.eval()
        evaluated = stochastic.dlrm.sparse_arch(features)
    return outputs, evaluated, want


def test_one_hot_training_rounds_stochastically_and_evaluation_to_nearest():
    (first, again, other), evaluated, nearest = pooled_pair([1], steps=[0, 0, 1])
    assert torch.equal(evaluated, nearest)  # evaluation (and so the exported model) rounds to nearest
    assert not torch.equal(first, nearest)
    assert not torch.equal(first, again)  # a second forward in the same step draws new noise
    assert not torch.equal(first, other)
    reference = qat_module(QATConfig(embedding_bits=4)).embedding_quantizer
    reference.maybe_refresh(0)
    steps = (first - nearest) / reference.scale.view(1, -1, 1)  # grid steps away from the nearest code
    assert torch.equal(steps, steps.round())
    assert float(steps.abs().max()) == 1.0  # a neighbour at most


def test_multi_hot_training_rounds_stochastically_and_evaluation_to_nearest():
    (first,), evaluated, nearest = pooled_pair([2, 0, 3], steps=[0])
    assert torch.equal(evaluated, nearest)
    assert not torch.equal(first, nearest)
    assert torch.equal(first[1], torch.zeros_like(first[1]))  # empty bags stay empty


def test_noise_is_reproducible_from_the_seed_and_step_and_leaves_the_global_stream_alone():
    def run() -> torch.Tensor:
        module = qat_module(QATConfig(embedding_bits=4, rounding="stochastic"))  # torch.manual_seed(0) inside
        module.embedding_quantizer.maybe_refresh(5)
        state = torch.get_rng_state()
        with torch.no_grad():
            out = module.dlrm.sparse_arch(random_batch(batch_size=16, rows=ROWS).sparse_features)
        assert torch.equal(torch.get_rng_state(), state)  # no draw from the global generator
        return out

    assert torch.equal(run(), run())
