"""How a repair of layers in order reads each layer, scores each step on held-out images, and moves on.

Two readers with one interface. `InputReader` reads every layer from the
model input (any model, any method: the layer's spectra need both models'
class scores). `KeptReader` keeps the tensors that cross the cut before the
next layer, for the repair images and the held-out ones, and runs only the
segment a patched layer changes (segments.py): one pass of QUANT over the
whole run instead of one per layer. It serves methods that change every
channel (no spectrum to read) on models whose layer inputs it can find in
what it keeps; `reader_for` picks it when it can.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx
from numpy.typing import NDArray

from onnxrepair.activity import FloatTargets, LayerActivity, kept_activity, read_layer_activity
from onnxrepair.graph import LayerPair, layer_parameters
from onnxrepair.parallel import Executor
from onnxrepair.progress import NoProgress, Progress
from onnxrepair.runtime import output_name
from onnxrepair.search import HoldoutScorer, Score
from onnxrepair.segments import Kept, Segments


def skip_of(pair: LayerPair) -> str | None:
    """QUANT's other branch of the residual Add after the layer, when FLOAT has the same Add (FloatTargets
    then reads FLOAT's sum)."""
    if pair.float_layer.residual is None or pair.quant_layer.residual is None:
        return None
    return pair.quant_layer.residual.other


class LayerReader(Protocol):
    """Reads layer `position` of the run from `model` (the model as patched so far) and scores candidates."""

    def activity(
        self, model: onnx.ModelProto, pair: LayerPair, position: int, every_channel: bool
    ) -> LayerActivity: ...

    def score(self, candidate: onnx.ModelProto, position: int) -> Score: ...

    def moved_on(self, model: onnx.ModelProto, position: int, took_candidate: bool) -> None: ...


class InputReader:
    """Every layer read from the model input; every candidate scored on the held-out images from the input."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        x: NDArray[np.float32],
        targets: FloatTargets,
        scorer: HoldoutScorer | None,
        batch_size: int,
        positions_per_image: int,
        seed: int,
        providers: Sequence[str] | None,
        executor: Executor | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.float_model, self.x, self.targets, self.scorer = float_model, x, targets, scorer
        self.batch_size, self.positions, self.seed, self.providers = batch_size, positions_per_image, seed, providers
        self.executor = executor
        self.progress = progress or NoProgress()

    def activity(self, model: onnx.ModelProto, pair: LayerPair, position: int, every_channel: bool) -> LayerActivity:
        return read_layer_activity(
            self.float_model,
            model,
            pair,
            self.x,
            self.batch_size,
            self.progress,
            providers=self.providers,
            positions_per_image=self.positions,
            seed=self.seed,
            scores=not every_channel,
            float_rows=self.targets.rows(pair.float_layer.name) if every_channel else None,
            skip=skip_of(pair) if every_channel else None,
            executor=self.executor,
        )

    def score(self, candidate: onnx.ModelProto, position: int) -> Score:
        assert self.scorer is not None
        return self.scorer.score(candidate)

    def moved_on(self, model: onnx.ModelProto, position: int, took_candidate: bool) -> None:
        """Nothing is kept between layers."""


class KeptReader:
    """Layers read from the tensors kept at each cut; candidates scored by running the rest of the model only."""

    def __init__(
        self,
        plan: Segments,
        quant_model: onnx.ModelProto,
        x: NDArray[np.float32],
        targets: FloatTargets,
        scorer: HoldoutScorer | None,
        batch_size: int,
        positions_per_image: int,
        seed: int,
        providers: Sequence[str] | None,
        executor: Executor | None = None,
    ) -> None:
        self.plan, self.targets, self.scorer = plan, targets, scorer
        self.batch_size, self.positions, self.seed, self.providers = batch_size, positions_per_image, seed, providers
        self.executor = executor
        self.images = len(x)
        self.fit: Kept = plan.start(quant_model, x, batch_size, providers, executor)
        self.held: Kept | None = (
            None if scorer is None else plan.start(quant_model, scorer.x, batch_size, providers, executor)
        )
        self._held_next: Kept | None = None  # the held-out tensors after the last candidate scored

    def activity(self, model: onnx.ModelProto, pair: LayerPair, position: int, every_channel: bool) -> LayerActivity:
        if not every_channel:
            raise ValueError("the kept tensors serve methods that change every channel")
        layer = pair.quant_layer
        source, skip = self.plan.inputs[position], self.plan.skips[position]
        weights, bias = layer_parameters(model, layer)
        return kept_activity(
            layer,
            lambda start, stop: source.read(self.fit, start, stop),
            self.images,
            self.targets.rows(pair.float_layer.name),
            weights,
            bias,
            self.batch_size,
            positions_per_image=self.positions,
            seed=self.seed,
            read_skip=None if skip is None else lambda start, stop: skip.read(self.fit, start, stop),
        )

    def score(self, candidate: onnx.ModelProto, position: int) -> Score:
        assert self.scorer is not None and self.held is not None
        following = self._next_cut(position)
        scores_name = output_name(candidate)
        crossing = [] if following is None else self.plan.crossing(candidate, following)
        _, computed = self.plan.advance(
            candidate,
            self.held,
            self.plan.cuts[position],
            None,
            self.batch_size,
            self.providers,
            [scores_name, *crossing],
            self.executor,
        )
        self._held_next = None if following is None else {
            name: computed[name] if name in computed else self.held[name] for name in crossing
        }  # fmt: skip
        return self.scorer.score_of(computed[scores_name].reshape(len(self.scorer.x), -1))

    def moved_on(self, model: onnx.ModelProto, position: int, took_candidate: bool) -> None:
        """Advance the kept tensors past the layer, with `model` (the candidate, or the model it was rolled back to)."""
        following = self._next_cut(position)
        if following is None:
            return
        start = self.plan.cuts[position]
        self.fit, _ = self.plan.advance(
            model, self.fit, start, following, self.batch_size, self.providers, executor=self.executor
        )
        if self.held is not None:
            if took_candidate and self._held_next is not None:
                self.held = self._held_next
            else:
                self.held, _ = self.plan.advance(
                    model, self.held, start, following, self.batch_size, self.providers, executor=self.executor
                )
        self._held_next = None

    def _next_cut(self, position: int) -> int | None:
        return self.plan.cuts[position + 1] if position + 1 < len(self.plan.cuts) else None
