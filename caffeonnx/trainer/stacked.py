"""Greedy layer-wise (stacked) autoencoder training on one deep autoencoder net.

The net is the stacked autoencoder itself (encode1..K, then decodeK..1).  The user
names its pairs bottom-up, `encode1:decode1,encode2:decode2,...`.  Phase i trains only
encode_i and decode_i as a shallow autoencoder:

- its input x_i is what encode_i reads; for i > 1 it is computed once for the whole
  data set by the frozen layers below (eval mode) and cached;
- the code h_i (what encode_{i+1} reads) is fed straight to decode_i in place of the
  output of the inner layers, so decode_i and its activation reconstruct x_i and the
  inner layers are bypassed — the "single graph" form of the seed, on shared weights;
- phase 1 keeps the net's own loss (e.g. SigmoidCrossEntropyLoss against the data);
  an inner phase minimises Caffe's EuclideanLoss between x_i and what decode_{i-1} reads.

Then the whole net is fine-tuned end to end with the net's loss.  Each phase runs the
solver from a fresh state (history and lr schedule restart).

Data-parallel (torchrun, --procs, --gpu all): every phase runs on all ranks with the
gradient all-reduce, phases in order.  Each rank caches x_i for the whole data set
(the frozen layers below are identical on every rank) and reads its shard of that
cache as it reads its shard of the data, so N contiguous ranks equal one process with
iter_size × N phase by phase.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import BatchSource, DataSource, ShardedSource
from caffeonnx.trainer.distributed import Synchronizer
from caffeonnx.trainer.graph_module import GraphModule, find_layer
from caffeonnx.trainer.loop import Iteration, Trainer

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pair:
    """One shallow autoencoder of the stack: its encoder and decoder layer names."""

    encoder: str
    decoder: str


def parse_pairs(texts: list[str]) -> list[Pair]:
    """`encode1:decode1` items (possibly comma-separated) as Pairs, bottom-up."""
    pairs = []
    for text in texts:
        for item in text.split(","):
            enc, sep, dec = item.partition(":")
            if not sep or not enc or not dec:
                raise CaffeOnnxError(f"--stacked expects ENCODER:DECODER layer pairs, got {item!r}")
            pairs.append(Pair(enc.strip(), dec.strip()))
    return pairs


@dataclass
class _Phase:
    index: int  # 1-based, bottom-up
    x: str  # what the encoder reads
    code: str | None  # what the next encoder reads (None for the innermost pair)
    decoder_in: str  # what the decoder reads in the deep net
    target_reader: str | None  # what the decoder below reads (None for phase 1: the net's loss)
    params: list[str]


class StackedPlan:
    """The phases of a stack, resolved to ONNX values and initializers of one GraphModule."""

    def __init__(self, module: GraphModule, pairs: list[Pair]) -> None:
        records = {layer: module.records[find_layer(module.records, layer, "--stacked")]
                   for pair in pairs for layer in (pair.encoder, pair.decoder)}
        self.module = module
        self.phases = []
        for i, pair in enumerate(pairs):
            enc, dec = records[pair.encoder], records[pair.decoder]
            code = records[pairs[i + 1].encoder].bottoms[0] if i + 1 < len(pairs) else None
            below = records[pairs[i - 1].decoder].bottoms[0] if i > 0 else None
            self.phases.append(_Phase(i + 1, enc.bottoms[0], code, dec.bottoms[0], below, [*enc.params, *dec.params]))

    def objective(self, phase: _Phase) -> Callable[[dict[str, np.ndarray]], tuple[Tensor, dict[str, Tensor]]]:
        """The loss of one phase on a batch (the batch holds x_i for inner phases)."""
        module = self.module

        def run(batch: dict[str, np.ndarray]) -> tuple[Tensor, dict[str, Tensor]]:
            feeds: dict[str, np.ndarray | Tensor] = dict(batch)
            if phase.code is not None:
                h = module(feeds, [phase.code])[phase.code]
                feeds[phase.decoder_in] = h  # bypass the inner layers: decode_i reads h_i
            if phase.target_reader is None:
                values = module(feeds, module.loss_outputs())
                return module.loss(values), {t.blob: values[t.value] for t in module.loss_terms}
            recon = module(feeds, [phase.target_reader])[phase.target_reader]
            x = torch.as_tensor(batch[phase.x], device=recon.device)
            loss = ((recon - x) ** 2).sum() / x.shape[0] / 2  # Caffe's EuclideanLoss
            return loss, {f"phase{phase.index}_euclidean": loss}

        return run

    @torch.no_grad()
    def cache_inputs(self, phase: _Phase, data: DataSource) -> BatchSource:
        """x_i for every sample, computed once by the frozen layers below."""
        module = self.module.eval()
        count = min(data.samples.values())
        first = next(iter(data.shapes.values()))[0]
        chunks = []
        for b in range(-(-count // first)):
            chunks.append(module(data.batch(b), [phase.x])[phase.x].cpu().numpy())
        cached = np.concatenate(chunks)[:count]
        self.module.train()
        return BatchSource({phase.x: cached}, {phase.x: (first, *cached.shape[1:])})


def train_stacked(module: GraphModule, param: caffe_pb2.SolverParameter, data: DataSource, pairs: list[Pair],
                  iters: int, source: str, say: Callable[[str], None],
                  sync: Synchronizer | None = None) -> list[list[Iteration]]:
    """Run every greedy phase for `iters` iterations; returns each phase's iterations (weights stay in `module`).

    Under torchrun `data` is this rank's ShardedSource and `sync` joins the ranks in every phase's iterations.
    """
    plan = StackedPlan(module, pairs)
    done = []
    trainable = {info.name: (info, p) for info, p in module.named_blobs()}
    for phase in plan.phases:
        source_data: DataSource = data
        if phase.index > 1:
            if isinstance(data, ShardedSource):  # cache every sample, then read this rank's shard of the cache
                cached = plan.cache_inputs(phase, data.source)
                source_data = ShardedSource(cached, data.rank, data.world, data.mode)
            else:
                source_data = plan.cache_inputs(phase, data)
            say(f"stacked phase {phase.index}: cached {phase.x!r} for {min(source_data.samples.values())} samples")
        blobs = [trainable[n] for n in dict.fromkeys(phase.params) if trainable[n][0].lr_mult != 0]
        frozen = [p for info, p in module.named_blobs() if info.name not in phase.params]
        for p in frozen:
            p.requires_grad_(False)
        try:
            trainer = Trainer(module, param, source_data, source, plan.objective(phase), blobs, sync)
            records = trainer.step(iters)
        finally:
            for info, p in module.named_blobs():
                p.requires_grad_(info.lr_mult != 0)
        say(f"stacked phase {phase.index} ({', '.join(dict.fromkeys(phase.params))}): {iters} iterations, last loss "
            f"{records[-1].loss:.6g}" if records else f"stacked phase {phase.index}: 0 iterations")
        done.append(records)
    return done
