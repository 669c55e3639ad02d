"""What a pass asks of the model it compresses, whatever holds it: the frontend protocol.

A pass is written once against :class:`Frontend`; the torch frontend's
:class:`~graphprune.frontends.torch.state.CompressionState` (an ``nn.Module`` in memory, or a
streamed plan whose weights stay in a checkpoint) and the ONNX frontend's
:class:`~graphprune.frontends.onnx.state.OnnxState` implement it.  The protocol is small on
purpose: the weight layers and their weights, facts about where a layer sits (reads the model
input, is an output head, its convolution window, its bias), statistics from the frontend's
calibration runner (activations handed to callbacks, sums reduced over the ranks of a
distributed run), and writes (N:M masks and new weight values, channel permutations, int8).  Everything else, the
arithmetic of the algorithms, lives once in :mod:`graphprune.algorithms`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from graphprune.core.layers import WeightLayer
from graphprune.core.pipeline import State

if TYPE_CHECKING:
    import torch

    from graphprune.algorithms.nm import NMPattern
    from graphprune.algorithms.quant import QuantPlan
    from graphprune.algorithms.sparsegpt import ConvGeometry
    from graphprune.core.groups import Analysis
    from graphprune.core.plan import Plan

L = TypeVar("L", bound=WeightLayer)
Activations = Callable[["torch.Tensor"], None]  # receives one calibration batch's activation


class Refit(Protocol):
    """Compensations of a channel plan that a frontend runs on its own model (torch: norm re-fit,
    reconstruction, BatchNorm re-estimation)."""

    def record(self, analysis: Analysis, plan: Plan, calibration: Any) -> None:
        """Take what the fits read of the dense model; called before the plan is applied."""
        ...

    def run(self, analysis: Analysis, plan: Plan, calibration: Any) -> dict[str, str]:
        """Fit the pruned model (``analysis`` and ``plan`` describe the dense one); returns the
        report's details."""
        ...


class Frontend(State, Protocol[L]):
    """A :class:`~graphprune.core.pipeline.State` that passes can read weights and statistics from
    and write weights to; ``L`` is the frontend's weight-layer type."""

    # ----------------------------------------------------------------- layers and weights
    def weight_layers(self) -> tuple[list[L], dict[str, str]]:
        """Every layer that multiplies an activation by a weight, in graph order, one per weight;
        and the weights the frontend leaves alone, with the reason."""
        ...

    def check_names(self, names: Iterable[str], option: str) -> None:
        """Raise :class:`~graphprune.errors.InputError` naming ``option`` for a name that is no module
        of the model (on an ONNX model: no initializer-name prefix)."""
        ...

    def weight(self, layer: L) -> torch.Tensor:
        """The layer's weight as it is now, in its stored layout."""
        ...

    def weight_shape(self, layer: L) -> tuple[int, ...]:
        """The shape of the layer's weight (read without loading the weight where it is streamed)."""
        ...

    def criterion_inputs(self) -> tuple[Any, Mapping[str, torch.Tensor] | None]:
        """What a channel criterion reads (:data:`graphprune.algorithms.importance.GroupScore`'s third
        argument): the ``nn.Module``, or an ONNX model's initializers by name; and, where the module
        holds no weights (a streamed plan), the weights by name."""
        ...

    def reads_model_input(self, layer: L) -> bool:
        """The layer reads a model input (through layout ops at most)."""
        ...

    def output_heads(self, layers: list[L]) -> set[str]:
        """The weights of the ``layers`` whose result is a model output
        (:func:`graphprune.core.layers.output_heads`)."""
        ...

    def input_channels(self, layer: L) -> int:
        """The analysis atom of the channels the layer reduces over (its input's ``channel_axis``)."""
        ...

    def layer_bias(self, layer: L) -> str | None:
        """The name of the bias the layer's op adds to its result (per output channel), if any."""
        ...

    def shared_with(self, layer: L) -> list[str]:
        """The other names the layer's weight is held under (a tied weight), if any."""
        ...

    def module_type(self, layer: L) -> type | None:
        """The class of the module that holds the layer (None where the model has no modules)."""
        ...

    def clipped_at_zero(self, layer: L) -> bool:
        """The layer's result goes only to a ReLU (after what quantization folded into the layer)."""
        ...

    def conv_window(self, layer: L) -> ConvGeometry | None:
        """A convolution's window as SparseGPT reads its patches; None where it cannot (3-D
        convolutions, implicit padding)."""
        ...

    # ----------------------------------------------------------------- statistics
    def calibration_data(self, purpose: str) -> Any:
        """The calibration data, checked once; :class:`~graphprune.errors.InputError` naming
        ``purpose`` when there is none."""
        ...

    def observe(
        self,
        calibration: Any,
        inputs: Mapping[L, Activations],
        outputs: Mapping[L, Activations] | None = None,
    ) -> None:
        """Run the calibration data through the model as it is now, handing each layer's input
        activation (and, for ``outputs``, its result) to its callback, batch by batch."""
        ...

    def reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum ``tensors`` in place over the ranks of a distributed run (nothing on one process)."""
        ...

    def single_process_only(self, what: str) -> None:
        """Refuse ``what`` (:class:`~graphprune.errors.InputError`) where several ranks run: it
        computes from statistics that are not sums over batches, which ranks could not agree on."""
        ...

    def sequential(
        self,
        layers: list[L],
        calibration: Any,
        visit: Callable[[list[L], Any], None],
        skipped: dict[str, str],
    ) -> tuple[list[L], str]:
        """Visit the ``layers`` in graph order, part by part, each with calibration data that runs
        the model as the earlier parts left it: block by block where the model is a chain of blocks
        (a runner then runs one block, not the whole model), else in one part.  Layers no part can
        hold go to ``skipped`` with the reason; returns the layers visited and how they were run
        (for the report)."""
        ...

    # ----------------------------------------------------------------- writes
    def permute_channels(self, leaf: int, order: torch.Tensor) -> bool:
        """Reorder channel space ``leaf`` of the analysis by ``order`` in every tensor that indexes it,
        which leaves the model's function unchanged; False (and nothing reordered) where the outputs
        changed all the same (an op that reads channel order)."""
        ...

    def prune_channels(self, plan: Plan, bias_corrections: Mapping[str, torch.Tensor]) -> None:
        """Remove the channels ``plan`` drops (it was made on :meth:`analysis`) from every tensor
        that indexes them, then add ``bias_corrections`` to the biases they name; the state then
        holds the smaller model (and analyses it afresh)."""
        ...

    def refit(self, *, norms: bool, reconstruct: bool, batchnorm: bool, damp: float) -> Refit | None:
        """The compensations asked for that run on the frontend's own model (see :class:`Refit`);
        None where it has none (an ONNX model, a streamed plan), or nothing is asked."""
        ...

    def writing(self) -> AbstractContextManager[None]:
        """The span in which a pass writes weights; the model is consistent again when it ends."""
        ...

    def prepare_quantization(self, layers: list[L]) -> tuple[list[L], int]:
        """Rewrite what int8 needs rewritten before its ranges are observed (torch: BatchNorms folded
        into the convolutions before them; ONNX: a 2-D MatMul and its bias Add as one Gemm); returns
        the layers as they are then, and how many BatchNorms were folded."""
        ...

    def write_quantization(self, plan: QuantPlan, values: Mapping[str, torch.Tensor] | None = None) -> QuantPlan:
        """Quantize the model by ``plan`` (torch: fake quantization; ONNX: QDQ nodes), after writing
        the new weight ``values`` an algorithm computed (GPTQ's), where given; returns the plan as the
        model now carries it."""
        ...

    def keep_mask(self, layer: L) -> torch.Tensor | None:
        """The layer's N:M keep-mask (bool, the weight's shape), or None where it has none."""
        ...

    def write_nm(
        self,
        layer: L,
        keep: torch.Tensor,
        pattern: NMPattern,
        *,
        values: torch.Tensor | None = None,
        zero_pruned: bool = True,
    ) -> None:
        """Give the layer the N:M mask ``keep`` (and the new weight ``values`` where an algorithm
        updated them), held so that every later pass is checked against it; ``zero_pruned=False``
        keeps the dense weights under the mask (learned masks)."""
        ...
