"""A shard: one contiguous range of units, loaded alone, run with a KV cache per micro-batch slot.

Only this shard's tensors are read from the safetensors files; no rank materialises the whole
model. The modules are the family's own, taken from its transformers class built on the meta device
(families.py) and given the loaded tensors; decoder layers keep their global index, so that the
per-slot KV cache (kv_cache.py: buffers allocated once per slot; sliding layers keep their window)
and transformers' mask helpers see the same layout as the full model. Masks and
positions follow `generate` exactly (left padding, positions from the mask's cumulative sum, no
mask at all when a micro-batch has no padding), so the tokens equal `generate`'s token for token.

With `compile=True` the decode steps (one token a row) run through compiling.py's compiled `_units`
on static KV layers, and `warm_up` compiles them before a run; prefills stay eager.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch
# What every family's modeling module builds on, imported when a rank starts (2 s here), so that the
# ranks import side by side rather than each in turn once rank 0 has read the job and the model.
import transformers.generation.utils  # noqa: F401
import transformers.masking_utils  # noqa: F401
import transformers.modeling_utils  # noqa: F401

from . import attention, cpu_kernels
from .compiling import CompiledStep
from .families import mask_builder
from .fewrows import FewRowsLinear, PanelEmbedding, is_large, packs_for, panels_for, rows_for, swap_linears, widens
from .kv_cache import add_rows, join_rows, relayout, slot_cache, static_slot_cache
from .models import ModelError, ModelSpec
from .quant import SCALE_DTYPE, Int8Embedding, int8_keys, int8_shell, quantize_rows
from .simulate import StageLine

__all__ = ["Shard", "TORCH_DTYPES", "release_freed_memory"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): the float blocks a quantizing read frees would
    otherwise stay resident beside the int8 shard, one block's worth a matrix."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _LIBC = None


@dataclasses.dataclass
class _SlotState:
    """What one micro-batch slot keeps between steps on this shard."""

    cache: object  # a transformers Cache of kv_cache.py's layers, or None when the shard has no blocks
    mask: torch.Tensor | None  # (B, seen) 1 = real token, 0 = left pad; None = no padding
    last_pos: torch.Tensor  # (B, 1) position id of the last token seen
    columns: int = 0  # the time axis's length: the next decode step writes this column
    filling: dict = dataclasses.field(default_factory=dict)  # row key -> its own cache, while it joins by chunks


class Shard:
    """Units `first..last` of the model at `path`, on `device`, in `dtype`.

    `slowdown` > 1 emulates a slower device: every forward takes slowdown x the CPU time its compute
    used, the rest spent asleep, so it costs no more CPU (a rank of an emulated device computes on one
    thread: cluster.default_threads). With `clock` (a device's `clock=work`), a step takes instead what
    the line gives for the tokens of its forwards: a fixed function of its work, whatever the host's
    load. `memory` (bytes) is the device's budget: a shard whose weights exceed it is refused before
    anything is read. `drift` (1 unless set) stretches every step further: a device that slowed down
    mid-run, as pipeline's EDGESHARD_SLOW hook makes one for tests of re-planning. `rows` is the most
    rows its steps hold (the micro-batch's size): the form of its products is chosen for it (fewrows.py).
    """

    def __init__(self, spec: ModelSpec, first: int, last: int, device: str = "cpu", *, slowdown: float = 1.0,
                 memory: int | None = None, compile: bool = False, clock: StageLine | None = None, rows: int = 1):
        from .families import build_skeleton, family_of, layer_types, unit_modules

        n = spec.num_units
        if not 0 <= first <= last < n:
            raise ValueError(f"shard units {first}..{last} outside 0..{n - 1}")
        need = spec.bytes_of(first, last)
        if memory is not None and need > memory:
            raise ModelError(f"units {first}..{last} of {spec.name} need {need} bytes of weights, "
                             f"more than this device's memory budget of {memory} bytes")
        self.spec, self.first, self.last = spec, first, last
        self.slowdown, self.clock = slowdown, clock
        self.drift = 1.0
        self.late = 0  # steps whose own compute outlasted the clock's time for them (clock=work)
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.has_embed = first == 0
        self.has_head = last == n - 1
        self.layer_ids = [u - 1 for u in range(max(first, 1), min(last, n - 2) + 1)]  # global layer indices

        self.family = family_of(spec.family)
        skeleton = build_skeleton(spec.config)  # parameters on meta: only what this shard keeps gets tensors
        self.config = config = skeleton.config  # with the attention implementation from_pretrained would pick
        modules = dict(skeleton.named_modules())
        embed_name, layers_name, norm_name, head_name = unit_modules(skeleton)
        embed_key, head_key = f"{embed_name}.weight", f"{head_name}.weight"
        tied = self.has_head and head_key not in spec.units[-1].tensors  # the head reads the embedding matrix
        int8 = set()  # checkpoint keys quantized as they are read, so that no fp32 copy of the shard exists
        if spec.quantize:
            int8 = int8_keys(skeleton)
            if tied and not self.has_embed:
                int8.add(embed_key)  # read for the head alone, even when the embedding is not a plain one (Gemma)
            if self.device.type == "cpu":
                cpu_kernels.available()  # built or found now, not first inside a compiled step's tracing
        # a decode step's few-row products in the form this CPU runs fastest (fewrows.py)
        self.packed = packs_for(spec, self.device, self.dtype, compile, rows)
        self.paneled = panels_for(spec, self.device, self.dtype, compile, rows)  # fp32 as the kernel's panels
        # bf16 in fp32 arithmetic on this CPU
        self.widened = widens(self.device, self.dtype, spec.quantize, rows, is_large(spec))
        self.attention_form = attention.form(spec, self.device, self.dtype, compile, rows)  # attention.py
        held = self.packed or self.paneled or self.widened  # the matrices reordered or as panels
        # a tied head beside its embedding holds their matrix once: as panels where the other matrices are, the
        # embedding then gathering its rows from them (fewrows.PanelEmbedding), else as the embedding's
        shared = tied and self.has_embed and not spec.quantize
        on_panels = shared and (self.paneled or self.widened) and type(modules[embed_name]) is torch.nn.Embedding
        head_held = held and (not shared or on_panels)
        # the row counts taking the transposed form, measured only for matrices that keep their plain weight:
        # a held one never asks, and the probes take seconds (smollm2's head's 4.4 s at 2 threads on an EPYC)
        self.turned = frozenset() if held else rows_for(spec, self.device, self.dtype, compile, rows=rows)
        self.head_turned = frozenset()
        if self.has_head and not head_held:
            self.head_turned = rows_for(spec, self.device, self.dtype, compile, head=True, rows=rows)
        alone = set()  # matrices to reorder: each read from a mapping of its own, gone once reordered
        if self.packed or self.paneled or self.widened:
            alone = {f"{name}.weight" for name, m in modules.items() if type(m) is torch.nn.Linear}
            if tied and (not self.has_embed or on_panels):
                alone.add(embed_key)
        tensors = self._read_tensors(Path(spec.path), int8, alone=alone)

        def take(name: str, pack: bool = True, turned: frozenset[int] = self.turned) -> torch.nn.Module:
            """Module `name` of the skeleton with its tensors from the checkpoint, on this device, its
            matrices taking the transposed form at `turned` rows."""
            module, prefix = copy.deepcopy(modules[name]), name + "."  # the skeleton is shared: fill a copy
            if spec.quantize:
                module = int8_shell(module, self.dtype)
            state = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
            module.load_state_dict(state, strict=True, assign=True)
            # buffers (Gemma's embedding scale) follow the weights
            module = swap_linears(module.to(self.device).eval(), turned,
                                  pack and (self.packed or self.paneled or self.widened), self.widened, self.paneled)
            attention.take(module, self.attention_form)
            return module

        self.embed = take(embed_name) if self.has_embed else None
        self.layers = [take(f"{layers_name}.{i}") for i in self.layer_ids]
        types = layer_types(config)
        self.layer_types = [types[i] for i in self.layer_ids]
        # each mask is built once a step, for the first of this shard's layers of its type (whose cache sizes it)
        self.mask_layer = {t: self.layer_ids[self.layer_types.index(t)] for t in dict.fromkeys(self.layer_types)}
        self.mask_fn = {t: mask_builder(t) for t in self.mask_layer}  # looked up once, not every step
        self.rotary = copy.deepcopy(skeleton.get_decoder().rotary_emb).to(self.device) if self.layers else None
        self.norm = self.lm_head = None
        self.softcap = self.family.logit_softcap(config)
        if self.has_head:
            self.norm = take(norm_name)
            if tied:  # the embedding matrix, shared when both are here and stored alike
                scales = f"{head_name}.scales"
                if self.embed is None:
                    tensors[head_key] = tensors.pop(embed_key)
                    if spec.quantize:
                        tensors[scales] = tensors.pop(f"{embed_name}.scales")
                elif not spec.quantize:
                    tensors[head_key] = self.embed.weight
                elif isinstance(self.embed, Int8Embedding):
                    tensors[head_key], tensors[scales] = self.embed.weight, self.embed.scales
                else:  # an embedding kept in the job dtype (Gemma's scaled one): the head's int8 copy is
                    # quantized from the checkpoint, as a shard holding the head alone would
                    again = self._read_tensors(Path(spec.path), {embed_key}, {embed_key})
                    tensors[head_key], tensors[scales] = again[embed_key], again[f"{embed_name}.scales"]
            # a head on the embedding's own matrix keeps it as it is (reordered, it would be a second copy), or
            # takes it as panels, which the embedding then reads
            self.lm_head = take(head_name, pack=not shared or on_panels, turned=self.head_turned)
            if on_panels and self.lm_head.panels is not None:
                self.embed = PanelEmbedding(self.embed, self.lm_head.panels)
        self.slots: dict[int, _SlotState] = {}
        self.compiled = CompiledStep(self._units, self.device) if compile else None  # decode steps only

    def _read_tensors(self, path: Path, int8: set[str], wanted: set[str] | None = None,
                      alone: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Read exactly this shard's tensors (or `wanted`), cast to the job dtype, on the shard's device;
        a key in `int8` ("X.weight") becomes int8 "X.weight" and its per-row scales "X.scales". A key
        in `alone` is read as a converted one is, from a mapping of its own, so that its pages leave
        with it and not with the shard's last mapped tensor."""
        from safetensors import safe_open

        if wanted is None:
            wanted = {k for u in self.spec.units[self.first:self.last + 1] for k in u.tensors}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as sf:
                    weight_map.update({k: f.name for k in sf.keys()})
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            if key not in weight_map:
                raise ModelError(f"{path}: tensor {key} not found in any safetensors file")
            by_file.setdefault(weight_map[key], []).append(key)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(str(path / fname), framework="pt", device="cpu") as sf:
                kept = [k for k in keys if k not in int8 and k not in alone
                        and sf.get_slice(k).get_dtype() == _SAFETENSORS_DTYPES[self.spec.dtype]]
                for key in kept:  # in the file's dtype: the tensor is the file's mapped pages, paged in as used
                    out[key] = sf.get_tensor(key).to(self.device)
            for key in (k for k in keys if k not in kept):
                # converted: the file mapped once a tensor (or a block of rows), closed once that is
                # converted, so that the source pages do not stay resident beside the copy (a whole
                # fp32 file beside a bf16 or int8 shard)
                if key in int8:
                    out[key], out[key[:-len("weight")] + "scales"] = self._read_int8(path / fname, key)
                    continue
                with safe_open(str(path / fname), framework="pt", device="cpu") as sf:
                    t = sf.get_tensor(key)
                out[key] = t.to(device=self.device, dtype=self.dtype)
                del t
        return out

    def _read_int8(self, file: Path, key: str, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrix `key` quantized a block of `rows` at a time: at most one block is held in float."""
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as sf:
            shape = sf.get_slice(key).get_shape()
        q = torch.empty(shape, dtype=torch.int8)
        scales = torch.empty(shape[0], dtype=SCALE_DTYPE)
        for i in range(0, shape[0], rows):
            with safe_open(str(file), framework="pt", device="cpu") as sf:
                part = sf.get_slice(key)[i:i + rows]
            q[i:i + rows], scales[i:i + rows] = quantize_rows(part)
            del part
            release_freed_memory()
        return q.to(self.device), scales.to(self.device)

    @property
    def param_bytes(self) -> int:
        modules = [m for m in (self.embed, *self.layers, self.norm, self.lm_head) if m is not None]
        seen, total = set(), 0
        # parameters, and the int8 matrices and scales quant.py keeps as buffers
        weights = [p for m in modules for p in m.parameters()] + [
            b for m in modules for name, b in m.named_buffers() if name.rpartition(".")[2] in ("weight", "scales")]
        for t in weights:
            if t.data_ptr() not in seen:  # a tied head shares the embedding's storage
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        # weights reordered for oneDNN (fewrows.py): opaque tensors, with no storage to share
        total += sum(lin.packed.numel() * lin.packed.element_size() for m in modules for lin in m.modules()
                     if getattr(lin, "packed", None) is not None)
        # and the kernel's panels (bf16 widened, or fp32): the matrix's own bytes, as planned (the padding of a last
        # panel, under 24 rows, is none on most models' widths: smollm2's are all multiples of 24)
        # (a PanelEmbedding's are its head's)
        total += sum(lin.out_features * lin.in_features * lin.panels.element_size() for m in modules
                     for lin in m.modules() if isinstance(lin, FewRowsLinear) and lin.panels is not None)
        return total

    # -- running ----------------------------------------------------------------------------
    def start(self, slot: int, pads: list[int], capacity: int) -> None:
        """A new micro-batch enters `slot`: rows are left-padded by `pads` tokens each, and the longest
        of them will have been `capacity` tokens long (prompt and padding, then new tokens) by its last step.
        Rows filling by chunks go on filling (scheduler.py). When one instead starts the slot, whole, its
        partial cache stays until the slot's state goes: no new prompt is left to take the slot again."""
        filling = self.slots[slot].filling if slot in self.slots else {}
        self.slots[slot] = _SlotState(filling=filling,
            cache=(static_slot_cache if self.compiled else slot_cache)(self.config, self.layer_ids, capacity)
            if self.layers else None,
            mask=None, last_pos=torch.zeros(len(pads), 1, dtype=torch.long, device=self.device))

    def select(self, slot: int, keep) -> None:
        """Keep only rows `keep` of the micro-batch in `slot` (the others finished): cache, mask, positions."""
        state = self.slots[slot]
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        if state.cache is not None:
            state.cache.batch_select_indices(idx)
        if state.mask is not None:
            state.mask = state.mask[idx]
        state.last_pos = state.last_pos[idx]

    def warm_up(self, rows: int) -> None:
        """Compile the decode step now rather than in the middle of a run (where a stage silent for
        longer than the step timeout counts as lost): for micro-batches of `rows` rows, rows leaving,
        and a single row, on a slot of its own that is then dropped."""
        if not self.compiled:
            return
        for b in dict.fromkeys((1, rows)):
            shape = (b, 1) if self.has_embed else (b, 1, self.config.hidden_size)
            x = torch.zeros(shape, dtype=torch.long if self.has_embed else self.dtype, device=self.device)
            # padded, as most micro-batches; a capacity of a typical request's size, since the compiler
            # tunes its kernels for the sizes it first sees
            self.forward(-1, torch.cat([x, x], dim=1), [1] + [0] * (b - 1), 256)
            self.forward(-1, x)
            if b > 2:
                self.select(-1, list(range(b - 1)))
                self.forward(-1, x[:-1])
            self.release(-1)

    def sync(self) -> None:
        """Wait for the device to finish queued work, so that a timer around forward() times the compute."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self, slot: int) -> None:
        self.slots.pop(slot, None)

    @contextlib.contextmanager
    def running(self, forwards: Sequence[tuple[int, int, int]] = ()):
        """Where a step's work runs: without autograd, and, on an emulated device (`slowdown` > 1),
        stretched to slowdown x the CPU time it used, or, with a clock, to the clock's time for the
        step's `forwards` ((tokens, columns, width) of each: messages.Step.forwards), the rest spent asleep."""
        # a compiled graph cannot take inference tensors (their version counters are gone)
        with torch.no_grad() if self.compiled else torch.inference_mode():
            if self.slowdown == 1.0 and self.drift == 1.0:
                yield
                return
            wall, cpu = time.perf_counter(), time.thread_time()
            yield
            if self.clock is not None:
                target = self.drift * sum(self.clock.seconds(*f) for f in forwards)
            elif self.slowdown == 1.0:  # a real device slowed: its own threads' time is not this thread's
                target = self.drift * (time.perf_counter() - wall)
            else:
                target = self.drift * self.slowdown * (time.thread_time() - cpu)
            left = target - (time.perf_counter() - wall)
            self.late += left < 0
            time.sleep(max(0.0, left))

    def forward(self, slot: int, x: torch.Tensor, prefill_pads: list[int] | None = None,
                capacity: int | None = None) -> torch.Tensor:
        """Run this shard's units for one step of the micro-batch in `slot`.

        x: token ids (B, T) if the shard holds the embedding, else hidden states (B, T, H).
        prefill_pads: left-pad count per row on the first step of a micro-batch, else None.
        capacity: with `prefill_pads`, the tokens the slot's longest row will reach (sizes its KV
        buffers); without it they start with room for 64 new tokens and grow by doubling.
        Returns hidden states (B, T, H), or, if the shard holds the head, fp32 logits (B, V)
        of each row's last position.
        """
        with self.running([(x.shape[0] * x.shape[1], 0)]):
            return self.run_units(slot, x, prefill_pads, capacity)

    # -- rows joining a running slot (scheduler.py's row admission) --------------------------------
    def _pads(self, state: _SlotState) -> torch.Tensor:
        """Each row's masked columns before its first token, from the slot's mask."""
        if state.mask is None:
            return torch.zeros(state.last_pos.shape[0], dtype=torch.long, device=self.device)
        return (state.mask[:, :state.columns] == 0).sum(-1)

    def _set_mask(self, state: _SlotState, pads: torch.Tensor) -> None:
        """The slot's mask from per-row pads: `columns` wide, or, compiled, the whole capacity (the
        columns not written yet are hidden by causality)."""
        width = state.cache.layers[self.layer_ids[0]].max_cache_len if self.compiled else state.columns
        state.mask = (torch.arange(width, device=self.device)[None, :] >= pads[:, None]).long()
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(state.mask, 0)
            torch._dynamo.maybe_mark_dynamic(state.mask, 1)

    def relayout(self, slot: int, trim: int, capacity: int) -> None:
        """Drop the slot's first `trim` columns (negative: add that many), room for `capacity` columns."""
        state = self.slots[slot]
        if self.layers:
            pads = self._pads(state) - trim
            relayout(state.cache, self.layer_ids, trim, capacity)
            state.columns -= trim
            self._set_mask(state, pads)
        else:
            state.columns -= trim

    def join(self, slot: int, places: list[int], x: torch.Tensor | None, pads: list[int], width: int):
        """Rows `places` of the slot take new prompts: x holds all but each one's last prompt token,
        left-padded to `width` by `pads` (None when every such prompt is one token). They are prefilled
        here, on a cache of their own, and written into their rows ending just before the next
        column; the next decode step then feeds their last prompt tokens with the other rows' tokens.
        Returns the prefill's hidden states for the next stage (None on the head's stage, where the
        prefill's own logits are not needed: the first new token comes from that decode step)."""
        state = self.slots[slot]
        real = [width - p for p in pads]
        out = None
        if x is not None:
            prefill = slot_cache(self.config, self.layer_ids, width) if self.layers else None
            mask, pos = self._prefill_mask(pads, width)
            out = self._units(x.to(self.device), pos, mask, prefill, head=False)
            if self.layers:
                join_rows(state.cache, prefill, self.layer_ids, places, real)
        idx = torch.as_tensor(places, dtype=torch.long, device=self.device)
        state.last_pos[idx, 0] = torch.as_tensor(real, dtype=torch.long, device=self.device) - 1
        if self.layers:
            row_pads = self._pads(state)
            row_pads[idx] = state.columns - torch.as_tensor(real, dtype=torch.long, device=self.device)
            self._set_mask(state, row_pads)
        return None if self.has_head else out

    def chunk(self, slot: int, key: int, x: torch.Tensor, start: int, total: int) -> torch.Tensor | None:
        """Prompt tokens start..start+T-1 (x: (1, T[, H])) of the row `key` joining `slot` by chunks,
        prefilled into a cache of the row's own (`total` tokens, begun by its first chunk). Returns
        their hidden states for the next stage (None on the head's stage)."""
        state = self.slots[slot]
        if start == 0:
            state.filling[key] = slot_cache(self.config, self.layer_ids, total) if self.layers else None
        T = x.shape[1]
        pos = torch.arange(start, start + T, device=self.device)[None, :]  # no padding: the row is alone
        out = self._units(x.to(self.device), pos, None, state.filling[key], head=False)
        return None if self.has_head else out

    def join_filled(self, slot: int, key: int, total: int) -> None:
        """Row `key`, its `total` prompt tokens before its last prefilled by `chunk`, joins `slot` after
        its rows, ending just before the next column, as `join` writes a row."""
        state = self.slots[slot]
        filled = state.filling.pop(key)
        rows = state.last_pos.shape[0]
        if self.layers:
            pads = torch.cat([self._pads(state), torch.tensor([state.columns - total], device=self.device)])
            add_rows(state.cache, self.layer_ids, 1)
            join_rows(state.cache, filled, self.layer_ids, [rows], [total])
        state.last_pos = torch.cat([state.last_pos, state.last_pos.new_full((1, 1), total - 1)])
        if self.layers:
            self._set_mask(state, pads)
        else:  # nothing here attends: no mask to keep in step with the rows
            state.mask = None

    def _prefill_mask(self, pads: list[int], T: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A prefill's 2D mask (None without padding) and position ids, as generate makes them."""
        B = len(pads)
        if not any(pads):
            return None, torch.arange(T, device=self.device).expand(B, T)
        mask = (torch.arange(T, device=self.device)[None, :] >=
                torch.tensor(pads, device=self.device)[:, None]).long()  # (B, T)
        return mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate: pads sit at 0

    def run_units(self, slot: int, x: torch.Tensor, prefill_pads: list[int] | None = None,
                  capacity: int | None = None) -> torch.Tensor:
        """`forward` without `running()`, for a caller that runs several parts of a step in one."""
        if prefill_pads is not None:
            self.start(slot, prefill_pads, capacity or x.shape[1] + 64)
        state = self.slots[slot]
        B, T = x.shape[0], x.shape[1]
        if prefill_pads is not None:
            state.mask, pos = self._prefill_mask(prefill_pads, T)
            if self.compiled and state.cache is not None:
                # one mask of the slot's whole capacity, written once: positions not reached yet are
                # hidden by causality, so decode steps pass the same tensor every time
                full = torch.ones(B, state.cache.layers[self.layer_ids[0]].max_cache_len, dtype=torch.long,
                                  device=self.device)
                full[:, :T] = state.mask if state.mask is not None else 1
                state.mask = full
                torch._dynamo.maybe_mark_dynamic(full, 0)
                torch._dynamo.maybe_mark_dynamic(full, 1)
        else:
            pos = state.last_pos + torch.arange(1, T + 1, device=self.device)[None, :]  # (B, T)
            if state.mask is not None and not self.compiled:
                state.mask = torch.cat([state.mask, state.mask.new_ones(B, T)], dim=-1)
        state.last_pos = pos[:, -1:]
        state.columns += T
        if self.compiled and prefill_pads is None and T == 1:
            return self.compiled(x, pos, state.mask, state.cache)
        return self._units(x, pos, state.mask, state.cache)

    def _units(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache,
               head: bool = True) -> torch.Tensor:
        """The shard's units on one step's input, with position ids `pos` (B, T) and the 2D padding mask;
        head=False stops before the final norm and the LM head."""
        h = self.embed(x) if self.has_embed else x  # (B, T, H)
        if self.layers:
            masks = {t: self.mask_fn[t](config=self.config, inputs_embeds=h, attention_mask=mask,
                                         cache=cache, position_ids=pos, layer_idx=i)
                     for t, i in self.mask_layer.items()}
            if self.family.rotary_by_layer_type:
                rope = {t: self.rotary(h, pos, t) for t in self.mask_layer}
            else:
                rope = dict.fromkeys(self.mask_layer, self.rotary(h, position_ids=pos))
            for layer, t in zip(self.layers, self.layer_types):
                h = layer(h, attention_mask=masks[t], position_ids=pos, cache=cache,
                          use_cache=True, position_embeddings=rope[t])
        if not self.has_head or not head:
            return h
        h = self.norm(h)[:, -1:, :]  # norm all positions then keep the last, as generate does
        logits = self.lm_head(h)[:, -1, :]  # (B, V)
        if self.softcap:  # in the model dtype, then fp32, as XForCausalLM.forward and generate do
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
