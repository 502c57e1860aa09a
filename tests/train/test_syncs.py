"""Host syncs: at most one per training step (the all-reduced loss / non-finite / stop vote), none inside the
model; the EM unit compiles to one graph without breaks."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import emanet
from emanet.config import load_config
from emanet.losses import SegmentationLoss
from emanet.models.em import EMAUnit, em_attention
from emanet.models.emanet import ModelConfig, build_model
from emanet.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

# Tensor methods that read a value back to the host: on a GPU each one waits for the queued kernels.
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero"}
PACKAGE = Path(emanet.__file__).parent
DATA = PACKAGE / "data"
# The sampler's index lists (DataStream.next, ResumableSampler.__iter__) are CPU tensors from a CPU
# generator that never reach the device: reading them back waits for nothing.
SAMPLER_SITES = {"distributed.py:next", "distributed.py:__iter__"}


class CountSyncs(TorchFunctionMode):
    """Records (method, the innermost emanet source line calling it) for every syncing tensor method.

    Calls from emanet.data and the sampler are left out: with num_workers=0 the samples and their indices
    are made in this process, on the CPU, before anything reaches the device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            site = next(
                (
                    f"{Path(f.filename).name}:{f.name}"
                    for f in reversed(traceback.extract_stack())
                    if Path(f.filename).is_relative_to(PACKAGE)
                ),
                "outside emanet",
            )
            frames = [Path(f.filename) for f in traceback.extract_stack()]
            if site not in SAMPLER_SITES and not any(p.is_relative_to(DATA) for p in frames):
                self.calls[(name, site)] += 1
        return func(*args, **(kwargs or {}))


def _count_syncs_in_training(tmp_path: Path, iterations: int, extra: list[str]) -> Counter:
    cfg = load_config(
        None,
        [
            "model.backbone=resnet18",
            "model.backbone_width=8",
            "model.stem=standard",
            "model.num_classes=5",
            "model.channels=16",
            "model.mid_channels=8",
            "model.num_bases=4",
            "data.dataset=synthetic",
            "data.crop_size=33",
            "data.scales=[1.0]",
            "data.num_workers=0",
            "data.eval_pad_multiple=0",
            "data.options={length: 8, val_length: 1, image_size: 33, max_objects: 4, min_objects: 2}",
            "train.batch_size=2",
            "train.log_interval=1",
            "train.device=cpu",
            "train.checkpoint_interval=1000",
            f"train.iterations={iterations}",
            f"train.out_dir={tmp_path / f'run{iterations}'}",
            *extra,
        ],
    )
    with CountSyncs() as counter:
        train(cfg, progress=False)
    return counter.calls


@pytest.mark.parametrize("extra", [[], ["train.accum_steps=2", "model.aux=true"]], ids=["plain", "accum2-aux"])
def test_one_host_sync_per_training_step(tmp_path, extra):
    # set-up, the final checkpoint and the final evaluation are the same in both runs: the difference is
    # what 3 more training steps (micro-batches, vote, bases update, optimizer step, logging) cost
    short, long = _count_syncs_in_training(tmp_path, 2, extra), _count_syncs_in_training(tmp_path, 5, extra)
    per_three_steps = long - short
    assert sum(per_three_steps.values()) == 3, per_three_steps
    assert list(per_three_steps) == [("tolist", "distributed.py:agree")], per_three_steps
    assert not (short - long), "a shorter run synced more often"


def _tiny_model(**kw) -> torch.nn.Module:
    cfg = ModelConfig(
        backbone="resnet18",
        backbone_width=8,
        stem="standard",
        num_classes=3,
        channels=16,
        mid_channels=8,
        num_bases=4,
        **kw,
    )
    return build_model(cfg)


@pytest.mark.parametrize("defer", [False, True])
def test_no_sync_inside_the_model_forward_backward_and_bases_update(defer):
    torch.manual_seed(0)
    model = _tiny_model(aux=True).train()
    for unit in model.modules():
        if isinstance(unit, EMAUnit):
            unit.defer_bases_update = defer
    criterion = SegmentationLoss(reduction="valid")
    x, y = torch.randn(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    with CountSyncs() as counter:
        criterion(model(x), y).backward()
        for unit in model.modules():
            if isinstance(unit, EMAUnit):
                unit.apply_bases_update()
    assert not counter.calls, counter.calls


def test_an_empty_bases_update_is_a_no_op_without_a_sync():
    unit = EMAUnit(8, num_bases=4)
    before = unit.bases.clone()
    with CountSyncs() as counter:
        unit.apply_bases_update()  # nothing accumulated: weight 0
    assert not counter.calls
    assert torch.equal(unit.bases, before)
    unit.train()
    unit.defer_bases_update = True
    unit(torch.randn(2, 8, 5, 5))
    unit.apply_bases_update()
    assert not torch.equal(unit.bases, before) and unit._acc_count.item() == 0


def test_training_forward_and_loss_trace_to_one_graph():
    # dynamo's own account (tracing only, no code generation): graph breaks would be host round trips
    torch.manual_seed(0)
    model = _tiny_model().train()
    criterion = SegmentationLoss(reduction="all")
    x, y = torch.randn(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    explanation = torch._dynamo.explain(lambda a, b: criterion(model(a), b))(x, y)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_em_attention_traces_the_same_path_for_one_image_as_for_many():
    # eager mode takes plain 2-D GEMMs for one image; compiled code must not branch on B == 1
    from torch._dynamo.testing import EagerAndRecordGraphs

    def ops(batch: int) -> list:
        torch._dynamo.reset()
        backend = EagerAndRecordGraphs()
        fn = torch.compile(lambda x, mu: em_attention(x, mu, 3), backend=backend, dynamic=False)
        x = torch.randn(batch, 8, 5, 6)
        for got, want in zip(fn(x, mu), em_attention(x, mu, 3)):
            torch.testing.assert_close(got, want)
        (graph,) = backend.graphs
        return [str(n.target) for n in graph.graph.nodes if n.op in ("call_function", "call_method")]

    mu = torch.nn.functional.normalize(torch.randn(1, 8, 4), dim=1)
    one, two = ops(1), ops(2)
    torch._dynamo.reset()
    assert one == two
