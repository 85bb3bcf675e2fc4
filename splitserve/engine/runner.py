"""Owns the model, its paged KV cache and the per-step tensor preparation: one forward over a packed batch.

A batch is a list of prefill chunks (a sequence and how many of its next tokens to compute) followed by decode
sequences (one token each). Packing everything into one token stream means no padding is ever computed.

On CUDA, decode attention runs as a Triton kernel over the pages, and decode rows replay a CUDA graph (padded to the
next graph size) instead of launching every kernel from Python, as does a whole prompt of up to
``prompt_graph_tokens`` (``prompt_graphs.py``); the other prompt chunks run eager.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from splitserve.engine import page_copy
from splitserve.engine.attention import AttentionMetadata, DecodeKernel
from splitserve.engine.cuda_graphs import DecodeGraphs
from splitserve.engine.host_copy import DeviceWait, HostLists, index_tensor
from splitserve.engine.loader import build_model, load_hf_config
from splitserve.engine.model import LayerHook
from splitserve.engine.model_spec import ModelSpec, spec_from_hf_config
from splitserve.engine.overlap import TokenFeed
from splitserve.engine.prompt_graphs import PromptGraphs
from splitserve.engine.rope import RotaryEmbedding
from splitserve.engine.sampler import sample
from splitserve.engine.sequence import Sequence
from splitserve.engine.step_plan import DecodeGraphPass, EagerPass, Pass, PromptGraphPass
from splitserve.engine.tensor_parallel import RankGroup, StepChannel

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BLOCKS = 2048

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r} (fix: one of auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cluster.device is 'cuda' but this worker sees no GPU (fix: use 'auto' or 'cpu')")
    return torch.device(name)


@dataclass
class RunnerConfig:
    model_dir: str | None  # None: random weights of hf_config's shape (benchmarks)
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_fraction: float = 0.85
    max_batch_tokens: int = 8192
    max_model_len: int | None = None
    seed: int = 0
    use_cuda_graphs: bool = True  # decode steps and short prompts replay CUDA graphs; CUDA only, False: all eager
    decode_graphs: bool = True  # False: no decode graphs (a prefill-only worker, which never decodes), prompt ones kept
    max_decode_batch: int = 256  # the largest decode batch a graph is captured for (the engine's max_batch_size)
    graph_decodes_beside_prompts: bool = True  # a mixed step's decode rows replay their graph (False: all eager)
    prompt_graph_tokens: int = 1024  # whole prompts up to this long replay a CUDA graph, with graphs on (0: eager)


@dataclass
class BatchOutput:
    """Sampled tokens for the sequences that reached the end of their known tokens in this step."""

    seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[float] | None


class LaunchedStep:
    """A forward pass whose sampled tokens are on their way to the host. ``tokens`` stays on the device, so the next
    step can take its inputs from it before they are read back (``TokenFeed``)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor | None, logprobs: torch.Tensor | None):
        self.seqs = seqs
        self.tokens = tokens
        self._with_logprobs = logprobs is not None
        self._host = None
        if tokens is not None:
            self._host = HostLists([tokens] if logprobs is None else [tokens, logprobs])

    def read(self, wait: DeviceWait | None = None) -> BatchOutput:
        """The sampled tokens, after the step's one wait for the device (run by ``wait``)."""
        if self._host is None:
            return BatchOutput([], [], None)
        lists = self._host.wait(wait)
        return BatchOutput(self.seqs, lists[0], lists[1] if self._with_logprobs else None)


class ModelRunner(page_copy.PagedKVCache):
    def __init__(self, config: RunnerConfig, hf_config=None, rank_group: RankGroup | None = None):
        """``rank_group``: this process's place in a tensor-parallel group; the runner then holds its rank's shard
        of the model and a cache of its KV heads only, and a leader hands each step's passes to the followers."""
        self.config = config
        self.rank_group = rank_group
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if hf_config is None:
            if config.model_dir is None:
                raise ValueError("either a model directory or an HF config is needed")
            hf_config = load_hf_config(config.model_dir)
        self.hf_config = hf_config
        self.spec: ModelSpec = spec_from_hf_config(hf_config)
        self.max_model_len = min(
            config.max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings
        )
        self.block_size = config.block_size
        self.model = build_model(self.spec, self.device, self.dtype, config.model_dir, config.seed, rank_group)
        self.num_kv_heads = len(self.model.shard.kv_heads)  # this rank's
        self.step_channel = StepChannel(rank_group) if rank_group is not None and rank_group.is_leader else None
        self.rope = RotaryEmbedding(hf_config, self.spec.head_dim, self.max_model_len, self.device, self.dtype)
        self.num_kv_blocks = config.num_kv_blocks or self._blocks_that_fit()
        use_graphs = self.device.type == "cuda" and config.use_cuda_graphs
        # One tensor for every layer: [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]. With graphs, one
        # more block than the block manager knows of: padded rows of a graph write their KV there.
        self.kv_cache = torch.zeros(
            self.spec.num_layers,
            2,
            self.num_kv_blocks + int(use_graphs),
            self.block_size,
            self.num_kv_heads,
            self.spec.head_dim,
            device=self.device,
            dtype=self.dtype,
        )
        self.kv_layers = list(self.kv_cache.unbind(0))
        self.decode_kernel: DecodeKernel | None = None
        if self.device.type == "cuda":
            from splitserve.engine.triton_attention import paged_decode_attention

            self.decode_kernel = paged_decode_attention
        self.graphs: DecodeGraphs | None = None
        if use_graphs and config.decode_graphs:
            assert self.decode_kernel is not None
            self.graphs = DecodeGraphs(
                self._decode_logits,
                self.decode_kernel,
                max_blocks_per_seq=-(-self.max_model_len // self.block_size),
                block_size=self.block_size,
                scratch_slot=self.num_kv_blocks * self.block_size,
                device=self.device,
                max_batch=config.max_decode_batch,
            )
            self.graphs.capture_all()
        self.prompt_graphs: PromptGraphs | None = None
        graph_tokens = min(config.prompt_graph_tokens, config.max_batch_tokens, self.max_model_len)
        if use_graphs and graph_tokens > 0:
            self.prompt_graphs = PromptGraphs(
                self._prompt_logits,
                block_size=self.block_size,
                scratch_slot=self.num_kv_blocks * self.block_size,
                device=self.device,
                max_tokens=graph_tokens,
                num_layers=self.spec.num_layers,
            )
            self.prompt_graphs.capture_all()
        log.info(
            "model %s on %s (%s): %d KV blocks of %d tokens",
            self.spec.model_type,
            self.device,
            self.dtype,
            self.num_kv_blocks,
            self.block_size,
        )

    @property
    def rank_and_size(self) -> tuple[int, int]:
        """This process's rank in its tensor-parallel group and the group's size: (0, 1) for a single rank."""
        group = self.rank_group
        return (group.rank, group.size) if group is not None else (0, 1)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (K and V), of this rank's KV heads."""
        return self.model.shard.local_spec().kv_bytes_per_token(self.dtype.itemsize) * self.block_size

    def _blocks_that_fit(self) -> int:
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BLOCKS
        torch.cuda.synchronize(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        activations = self._profile_activation_bytes()
        budget = total * self.config.gpu_memory_fraction - torch.cuda.memory_allocated(self.device) - activations
        blocks = int(budget // self.block_bytes)
        if self.rank_group is not None:  # every rank's cache has the same blocks: the leader's tables index them all
            least = torch.tensor([blocks], device=self.device)
            blocks = int(self.rank_group.all_reduce_min(least).item())
        if blocks < 1:
            raise RuntimeError(
                f"no room for a KV cache: weights and activations fill the GPU share "
                f"(fix: raise gpu_memory_fraction above {self.config.gpu_memory_fraction} or lower max_batch_tokens)"
            )
        return blocks

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest prefill pass, measured with a throwaway cache just big enough for it."""
        tokens = min(self.config.max_batch_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        scratch = torch.empty(
            self.spec.num_layers,
            2,
            blocks,
            self.block_size,
            self.num_kv_heads,
            self.spec.head_dim,
            device=self.device,
            dtype=self.dtype,
        )
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(tokens, device=self.device)
        meta = AttentionMetadata.whole_prompt(pos, self.block_size)
        hidden = self.model(ids, pos, self.rope, list(scratch.unbind(0)), meta)
        self.model.logits(hidden[-1:])
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch, hidden
        torch.cuda.empty_cache()
        return int(peak * 1.1)

    @staticmethod
    def _block_tables(seqs: list[Sequence]) -> list[list[int]]:
        """The sequences' block tables, padded with block 0 to one width (entries past a context are never read)."""
        width = max(max(len(s.block_table) for s in seqs), 1)
        return [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode_inputs(self, decode_seqs: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """Token ids, positions and KV slots of one new token per decoding sequence."""
        input_ids, positions, slots = [], [], []
        for seq in decode_seqs:
            pos = seq.num_tokens - 1
            assert seq.num_computed_tokens == pos
            input_ids.append(seq.last_token_id)
            positions.append(pos)
            slots.append(self._slot(seq, pos))
        return input_ids, positions, slots

    def _decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """What a decode graph records: the model, final norm and LM head over every row."""
        return self.model.logits(self.model(input_ids, positions, self.rope, self.kv_layers, meta))

    def _prompt_logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        row: torch.Tensor,
        layer_hook: LayerHook,
    ) -> torch.Tensor:
        """What a prompt graph records: the model over every row (``layer_hook`` after each layer), the final norm
        and LM head over ``row``."""
        hidden = self.model(input_ids, positions, self.rope, self.kv_layers, meta, layer_hook)
        return self.model.logits(hidden.index_select(0, row))

    def _graphs_prompt(self, seq: Sequence, n: int) -> bool:
        """Whether chunk ``n`` of ``seq`` is a whole prompt from its first token that a prompt graph holds."""
        graphs = self.prompt_graphs
        return (
            graphs is not None
            and seq.num_computed_tokens == 0
            and n == seq.num_tokens
            and graphs.rung_for(n) is not None
        )

    def execute(
        self,
        prefill_chunks: list[tuple[Sequence, int]],
        decode_seqs: list[Sequence],
        layer_hook: LayerHook | None = None,
        wait: DeviceWait | None = None,
    ) -> BatchOutput:
        """One forward pass, read back: tokens for the sequences that reached the end of their known tokens.

        ``wait`` runs the step's one wait for the device (the sampled tokens' read-back), once all its work is launched.
        """
        return self.launch(prefill_chunks, decode_seqs, layer_hook).read(wait)

    @torch.inference_mode()
    def launch(
        self,
        prefill_chunks: list[tuple[Sequence, int]],
        decode_seqs: list[Sequence],
        layer_hook: LayerHook | None = None,
        feed: TokenFeed | None = None,
    ) -> LaunchedStep:
        """Launch one forward pass and its sampling, and start the tokens' copy to the host; updates
        ``num_computed_tokens``. ``feed`` gives decode rows whose input token is still on the device.

        Decode rows replay their CUDA graph even beside prompt chunks, and whole short prompts replay theirs (graphs
        first, so the device runs them while the host launches what is left eager): eager, each decode row costs
        every layer its decode-attention launches, and a short prompt's pass is bound by the host's launches.
        ``layer_hook`` runs after each layer of the eager pass, which follows every replay on the stream; with no
        eager pass, after each layer's end in the replays (``PromptGraphs.run_layer_hook``).
        A tensor-parallel leader hands the passes to its followers before it runs them (``StepChannel``).
        """
        sampled: list[Sequence] = []
        passes: Iterable[Pass] = self._plan(prefill_chunks, decode_seqs, layer_hook is None, sampled)
        if self.step_channel is not None:  # the whole step goes to the followers before any of it runs
            passes = list(passes)
            if passes:
                self.step_channel.send(passes)
        logits = self.run_passes(passes, layer_hook, feed)
        if logits is None:
            return LaunchedStep([], None, None)
        return LaunchedStep(sampled, *sample(logits, sampled))

    def _plan(
        self,
        prefill_chunks: list[tuple[Sequence, int]],
        decode_seqs: list[Sequence],
        graph_decodes_allowed: bool,
        sampled: list[Sequence],
    ) -> Iterator[Pass]:
        """The step's passes, each built when the one before has been taken (so at tp=1 the device starts on the
        graphs while the host builds the eager pass), with the sequences sampled from their logits appended to
        ``sampled`` in order; once exhausted, the sequences' ``num_computed_tokens`` are advanced."""
        graph_decodes = (
            graph_decodes_allowed
            and self.graphs is not None
            and bool(decode_seqs)
            and self.graphs.rung_for(len(decode_seqs)) is not None
            and (not prefill_chunks or self.config.graph_decodes_beside_prompts)
        )
        graphed = [self._graphs_prompt(seq, n) for seq, n in prefill_chunks]
        if graph_decodes:
            input_ids, positions, slots = self._decode_inputs(decode_seqs)
            tables = [s.block_table for s in decode_seqs]
            sampled += decode_seqs
            yield DecodeGraphPass(input_ids, positions, slots, tables, [p + 1 for p in positions])
        for (seq, n), whole in zip(prefill_chunks, graphed, strict=True):
            if whole:
                sampled.append(seq)
                yield PromptGraphPass(seq.all_token_ids[:n], [self._slot(seq, p) for p in range(n)])
        eager_chunks = [chunk for chunk, whole in zip(prefill_chunks, graphed, strict=True) if not whole]
        eager_decodes = [] if graph_decodes else decode_seqs
        if eager_chunks or eager_decodes:
            yield self._eager_pass(eager_chunks, eager_decodes, sampled)
        for seq, n in prefill_chunks:
            seq.num_computed_tokens += n
        for seq in decode_seqs:
            seq.num_computed_tokens += 1

    def run_passes(
        self, passes: Iterable[Pass], layer_hook: LayerHook | None = None, feed: TokenFeed | None = None
    ) -> torch.Tensor | None:
        """Run a step's passes in order: the logits of their sampled rows, concatenated (None: no row sampled).
        ``feed`` goes to the pass with the decode rows."""
        parts: list[torch.Tensor] = []
        kinds: set[type] = set()
        for step in passes:
            kinds.add(type(step))
            if isinstance(step, DecodeGraphPass):
                assert self.graphs is not None
                parts.append(
                    self.graphs.run(
                        step.input_ids, step.positions, step.slots, step.block_tables, step.context_lens, feed
                    )
                )
            elif isinstance(step, PromptGraphPass):
                assert self.prompt_graphs is not None
                parts.append(self.prompt_graphs.run(step.input_ids, step.slots))
            else:
                logits = self._eager_logits(step, layer_hook, feed if step.num_decodes else None)
                if logits is not None:
                    parts.append(logits)
        if layer_hook is not None and PromptGraphPass in kinds and EagerPass not in kinds:
            assert self.prompt_graphs is not None
            self.prompt_graphs.run_layer_hook(layer_hook)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _eager_pass(
        self, prefill_chunks: list[tuple[Sequence, int]], decode_seqs: list[Sequence], sampled: list[Sequence]
    ) -> EagerPass:
        """The packed batch of one eager pass; the sequences sampled from it are appended to ``sampled``."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        logit_rows: list[int] = []
        for seq, n in prefill_chunks:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            assert n > 0 and end <= seq.num_tokens and len(seq.block_table) * self.block_size >= end
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            q_lens.append(n)
            ctx_lens.append(end)
            if end == seq.num_tokens:
                logit_rows.append(len(input_ids) - 1)
                sampled.append(seq)
        decode_ids, decode_positions, decode_slots = self._decode_inputs(decode_seqs)
        logit_rows.extend(range(len(input_ids), len(input_ids) + len(decode_seqs)))
        sampled.extend(decode_seqs)
        input_ids.extend(decode_ids)
        positions.extend(decode_positions)
        slots.extend(decode_slots)
        prefill_tables = None
        if any(c != q for c, q in zip(ctx_lens, q_lens, strict=True)):
            prefill_tables = self._block_tables([s for s, _ in prefill_chunks])
        return EagerPass(
            input_ids,
            positions,
            slots,
            q_lens,
            ctx_lens,
            prefill_tables,
            self._block_tables(decode_seqs) if decode_seqs else [],
            [s.num_tokens for s in decode_seqs],
            logit_rows,
        )

    def _eager_logits(
        self, step: EagerPass, layer_hook: LayerHook | None, feed: TokenFeed | None
    ) -> torch.Tensor | None:
        """One eager forward pass over the packed batch: the logits of its sampled rows (None: none)."""
        dev = self.device
        decodes = step.num_decodes
        meta = AttentionMetadata(
            slot_mapping=index_tensor(step.slots, dev),
            block_size=self.block_size,
            prefill_query_lens=step.query_lens,
            prefill_context_lens=step.context_lens,
            prefill_block_tables=(
                None if step.prefill_block_tables is None else index_tensor(step.prefill_block_tables, dev)
            ),
            # int32, as the CUDA graphs' buffers: eager steps then reuse the decode kernels compiled at capture
            # instead of compiling their own (~1 s each, for each split count, on the first mixed steps served).
            decode_block_tables=index_tensor(step.decode_block_tables, dev, torch.int32) if decodes else None,
            decode_context_lens=index_tensor(step.decode_context_lens, dev, torch.int32) if decodes else None,
            decode_max_context=max(step.decode_context_lens, default=0),
            decode_kernel=self.decode_kernel,
        )
        # Every input is copied from pinned memory without a host sync, so the host builds the next one meanwhile.
        rows = index_tensor(step.logit_rows, dev) if step.query_lens and step.logit_rows else None
        input_tensor = index_tensor(step.input_ids, dev)
        if feed is not None:  # its rows count from the first decode row, after every prompt chunk's tokens
            feed.write_into(input_tensor[len(step.input_ids) - decodes :])
        positions = index_tensor(step.positions, dev)
        hidden = self.model(input_tensor, positions, self.rope, self.kv_layers, meta, layer_hook)
        if not step.logit_rows:
            return None
        return self.model.logits(hidden if rows is None else hidden[rows])

    # --- KV pages in and out, for the transfer layer (block_index, gather_pages, scatter_layers: PagedKVCache) ---

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one layer's slice of one block: (2, block_size, kv_heads, head_dim)."""
        return (2, self.block_size, self.num_kv_heads, self.spec.head_dim)
