"""The weight-sized XLA ops of a compiled program's decode loop, read from its optimised HLO.

Decoding is memory-bound: a step costs the bytes it moves. An XLA op that writes a buffer as large
as a weight it reads (a float32 copy, a re-layout) moves that weight's bytes again every step when
it stays in the loop, and keeps a second copy in memory for the whole generate when XLA hoists it
out (a loop-invariant convert of a weight moved before the `while`). So do float32 copies of
16-bit weight rows gathered in the loop, once they are hundreds of rows. `decode_loop_ops` lists
both kinds, for the CPU, GPU and TPU compilers alike (their optimised HLO text has one grammar).

How. The module is parsed into computations. Fused computations (those a `fusion` calls) are not
walked: a fusion is one op, its result the only buffer it writes; everything else in the entry
and in what it calls (loop bodies and conditions, branches, calls) is materialised, except what
writes nothing (parameters, tuples, bitcasts, constants, and containers whose callees are walked).
Which values hold weights is followed from the entry's parameters (every parameter of at least
`weight_bytes` is a weight) into the computations they are passed to (loops, branches, calls),
through ops that only select or move elements (slices, gathers, copies, fusions that keep the
weight's dtype) and through whole copies (an op as large as the weight it reads).
The decode loop is the `while` with the most instructions under it. An op is listed when it is
inside that loop (at any depth), or outside it and carried into it through tuples, bitcasts and
copies of weight data (hoisted; through a `call` too, in which XLA's CPU backend wraps a small
loop), and either
- "weight copy": it reads a weight and writes an array at least `COPY_SHARE` (half) as large as
  that weight: a whole copy, or half of one split in two, or
- "float32 rows": it reads 16-bit weight data and converts at least `min_rows` rows of
  `row_elems` to a float32 array that it writes.
Ops that multiply (dots, convolutions, custom calls of cuBLAS or a Pallas kernel, and fusions
holding one) write sums, not weights, whatever their size: the step's real work, never listed.
Ops outside the loop that it does not carry (the prefill's) are not listed either, nor a copy
hoisted into another memory space (XLA's TPU compiler keeps weights that fit in VMEM there for the
whole loop: each step then reads VMEM, not HBM).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import jax.numpy as jnp

from sparseinfer_jax.model.config import LlamaConfig

# Weight rows converted to float32 in one op from which on it counts: a few hundred rows of a 7b
# layer (256 x 4096 x 4 bytes = 4 MiB) no longer sit in a cache, and each is a weight's row read
# twice (once in 16 bits, once widened). The CPU path's 64-row chunks stay under it.
MIN_ROWS = 256

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
          "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
          "u64": 8, "c64": 8, "c128": 16}
_SIXTEEN_BIT_FLOATS = ("bf16", "f16")
# Ops that write no buffer of their own (or whose callees are walked instead).
# An async op's "-start" holds its operand and a buffer its "-done" returns: the "-done" counts.
# A bitcast-convert reinterprets bits in place (bf16 as u16).
_NO_BUFFER = {"parameter", "get-tuple-element", "tuple", "bitcast", "bitcast-convert", "constant",
              "while", "conditional", "call", "after-all", "add-dependency", "opt-barrier",
              "domain"}
_MULTIPLIES = {"dot", "convolution"}
# Custom calls that compute (library matmuls, Triton and Mosaic kernels, the CPU's dot libraries);
# the others move data (XLA TPU's `ConcatBitcast` assembling a weight in another memory space).
_KERNEL_CALLS = re.compile(r"cublas|cudnn|triton|tpu_custom_call|mosaic|onednn|ynn|xnn", re.I)
# Ops whose result holds the elements of their first operand, selected or moved, not computed.
_MOVES = {"bitcast", "bitcast-convert", "copy", "reshape", "transpose", "slice", "dynamic-slice",
          "gather", "concatenate", "pad", "broadcast"}
# An op that writes at least this share of the bytes of a weight it reads, without multiplying,
# copies it: whole, or split (XLA's TPU compiler splits a bf16 weight into its even and odd
# columns, two halves, for the uint32 pairs of `tpu_rows`).
COPY_SHARE = 0.5

_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = ")
_CALLEES = re.compile(r"\b(condition|body|to_apply|calls|true_computation|false_computation|"
                      r"branch_computations)=(\{[^}]*\}|%[\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")
_INDEX = re.compile(r"\bindex=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"\bstack_frame_id=(\d+)")


@dataclasses.dataclass(frozen=True)
class LoopOp:
    """One listed op: its HLO name and opcode, its largest result array (`shape` as HLO writes
    it, `bytes`), `where` ("loop": runs every step; "hoisted": beside the loop, passed into it),
    `why` ("weight copy" or "float32 rows"), and where jax traced it from (`op_name`, and
    `origin`: the innermost Python frame the HLO's metadata names, `file:line (function)`)."""

    name: str
    opcode: str
    shape: str
    bytes: int
    where: str
    why: str
    op_name: str
    origin: str


@dataclasses.dataclass
class _Instr:
    name: str
    opcode: str
    arrays: list[tuple[str, tuple[int, ...]]]  # the result's arrays, a tuple's flattened
    tuple_arity: int | None  # elements of a tuple result (None for an array)
    operands: list[str]
    attrs: str
    line: str
    space: int = 0  # the result's memory space (`S(n)` in a TPU layout; 0: HBM, the default)


def _close(text: str, start: int) -> int:
    """Index just past the bracket group opening at `text[start]` ('(' or '{')."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({":
            depth += 1
        elif text[i] in ")}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple type; its layouts hold brackets of their own
        end = _close(rest, 0)
        type_text, after = rest[:end], rest[end:].lstrip()
        inner = type_text[1:-1]
        arity, depth = (1 if inner.strip() else 0), 0
        for ch in inner:
            depth += ch in "({[" and 1 or (-1 if ch in ")}]" else 0)
            arity += ch == "," and depth == 0
    else:
        t = re.match(r"\w+\[[\d,]*\](\{)?", rest)
        if not t:
            return None
        end = _close(rest, t.end() - 1) if t.group(1) else t.end()
        type_text, after, arity = rest[:end], rest[end:].lstrip(), None
    op = re.match(r"([\w\-]+)\(", after)
    if not op:
        return None
    close = _close(after, op.end() - 1)
    arrays = [(d, tuple(int(v) for v in dims.split(",") if v))
              for d, dims in _ARRAY.findall(type_text)]
    space = max((int(n) for n in re.findall(r"S\((\d+)\)", type_text)), default=0)
    return _Instr(m.group(2), op.group(1), arrays, arity,
                  _NAME.findall(after[op.end():close - 1]), after[close:], line, space)


def _nbytes(array: tuple[str, tuple[int, ...]]) -> int:
    return _BYTES.get(array[0], 4) * math.prod(array[1])


class _Module:
    """An optimised HLO module's computations, and its metadata's stack frames."""

    def __init__(self, hlo: str):
        self.comps: dict[str, list[_Instr]] = {}
        self.entry = None
        current = None
        for line in hlo.splitlines():
            if current is None:
                if m := _HEADER.match(line):
                    current = self.comps.setdefault(m.group(2), [])
                    if m.group(1):
                        self.entry = m.group(2)
            elif line.strip() == "}":
                current = None
            elif instr := _parse_instr(line):
                current.append(instr)
        assert self.entry is not None, "no ENTRY computation in the HLO text"
        self.index = {c: {i.name: i for i in instrs} for c, instrs in self.comps.items()}
        self.fused = {c for instrs in self.comps.values() for i in instrs if i.opcode == "fusion"
                      for c in self.callees(i)}
        self._frames = _stack_frames(hlo)
        self._sizes: dict[str, int] = {}
        self._multiplies: dict[str, bool] = {}

    def dtype(self, comp: str, name: str) -> str | None:
        """The dtype of array value `name` of `comp` (None for a tuple or an unknown name)."""
        i = self.index[comp].get(name)
        return i.arrays[0][0] if i is not None and i.arrays and i.tuple_arity is None else None

    @staticmethod
    def callees(instr: _Instr) -> list[str]:
        return [n for _, v in _CALLEES.findall(instr.attrs) for n in _NAME.findall(v)]

    def size(self, comp: str) -> int:
        """Instructions in `comp` and the unfused computations it calls."""
        if comp not in self._sizes:
            self._sizes[comp] = 0  # a call cycle (none in valid HLO) ends here
            self._sizes[comp] = sum(
                1 + sum(self.size(c) for c in self.callees(i) if c not in self.fused)
                for i in self.comps.get(comp, []))
        return self._sizes[comp]

    def multiplies(self, comp: str, instr: _Instr) -> bool:
        """Whether `instr` is (or fuses) a dot, a convolution or a custom call (a library
        matmul, a kernel): its result holds sums, not a weight's elements, whatever its size."""
        if instr.opcode in _MULTIPLIES:
            return True
        if instr.opcode == "custom-call":
            return bool(_KERNEL_CALLS.search(instr.attrs))
        if instr.opcode != "fusion":
            return False
        for c in self.callees(instr):
            if c not in self._multiplies:
                self._multiplies[c] = any(self.multiplies(c, i) for i in self.comps.get(c, []))
            if self._multiplies[c]:
                return True
        return False

    def converts(self, comp: str, min_elems: int) -> bool:
        """Whether fused computation `comp` (or one it calls) converts a 16-bit float array of at
        least `min_elems` elements to float32."""
        for i in self.comps.get(comp, []):
            if (i.opcode == "convert" and i.arrays and i.arrays[0][0] == "f32"
                    and self.dtype(comp, i.operands[0]) in _SIXTEEN_BIT_FLOATS
                    and math.prod(i.arrays[0][1]) >= min_elems):
                return True
            if i.opcode == "fusion" and any(self.converts(c, min_elems) for c in self.callees(i)):
                return True
        return False

    def origin(self, comp: str, instr: _Instr) -> tuple[str, str]:
        """(jax's op_name, `file:line (function)`) from the metadata of `instr`, or of its fused
        computation's root and instructions when the fusion carries none, or else of the nearest
        op it reads that carries some (XLA's own ops, such as a TPU `ConcatBitcast`, carry
        none)."""
        todo, seen = [instr], set()
        while todo:
            i = todo.pop(0)
            lines = [i.line]
            if i.opcode == "fusion":
                lines += [f.line for c in self.callees(i) for f in reversed(self.comps.get(c, []))]
            for line in lines:
                name, frame = _OP_NAME.search(line), _FRAME.search(line)
                if name or frame:
                    return (name.group(1) if name else "",
                            self._frames.get(int(frame.group(1)), "") if frame else "")
            seen.add(i.name)
            todo += [self.index[comp][o] for o in i.operands
                     if o in self.index[comp] and o not in seen]
        return "", ""


def _short(path: str) -> str:
    """`path` from its package's folder on (as `import` finds it: `pallas_kernels/x.py`)."""
    roots = [p for p in sys.path if p and path.startswith(p.rstrip("/") + "/")]
    return path[len(max(roots, key=len).rstrip("/")) + 1:] if roots else path


def _stack_frames(hlo: str) -> dict[int, str]:
    """Stack frame id -> `file:line (function)` of its own location, from the module's tables
    (FileNames, FunctionNames, FileLocations, StackFrames)."""
    tables: dict[str, dict[int, str]] = {}
    table = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
        elif table is not None and (m := re.match(r"^(\d+) (.*)$", line)):
            table[int(m.group(1))] = m.group(2)
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            table = None
    files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f, fn, ln = (re.search(rf"{key}=(\d+)", v) for key in
                     ("file_name_id", "function_name_id", r"\bline"))
        if f and fn and ln:
            locs[k] = (f"{_short(files.get(int(f.group(1)), '?').strip(chr(34)))}:{ln.group(1)} "
                       f"({funcs.get(int(fn.group(1)), '?').strip(chr(34))})")
    out = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        if loc:
            out[k] = locs.get(int(loc.group(1)), "")
    return out


def decode_loop_ops(hlo: str, *, weight_bytes: int, row_elems: int,
                    min_rows: int = MIN_ROWS) -> list[LoopOp]:
    """The ops of `hlo`'s decode loop that copy a weight or widen its rows (see the module's
    docstring); [] when the module has no loop.

    Args:
      hlo: a compiled program's optimised HLO text (`jax.stages.Compiled.as_text()`).
      weight_bytes: the smallest weight's bytes; every entry parameter this large is a weight.
      row_elems: elements in a weight row (the model's hidden size).
      min_rows: rows converted to float32 in one op from which on it is listed.
    """
    mod = _Module(hlo)
    prov: dict[tuple[str, str], object] = {}  # (computation, value) -> weight bytes, a tuple, None
    loops: list[tuple[str, _Instr]] = []  # (computation, while) in walk order

    def walk(comp: str, params: list) -> None:
        for i in mod.comps.get(comp, []):
            ins = [prov.get((comp, o)) for o in i.operands]
            if i.opcode == "parameter":
                n = int(re.search(r"parameter\((\d+)\)", i.line).group(1))
                p = params[n] if n < len(params) else None
                if comp == mod.entry and i.tuple_arity is None and i.arrays:
                    p = _nbytes(i.arrays[0]) if _nbytes(i.arrays[0]) >= weight_bytes else None
                prov[comp, i.name] = p
            elif i.opcode == "get-tuple-element":
                src = ins[0] if ins else None
                k = int(_INDEX.search(i.attrs).group(1))
                prov[comp, i.name] = src[k] if isinstance(src, tuple) and k < len(src) else None
            elif i.opcode == "tuple":
                prov[comp, i.name] = tuple(ins)
            elif i.opcode == "opt-barrier" or i.opcode.endswith(("-start", "-done", "-update")):
                prov[comp, i.name] = ins[0] if ins else None
            elif i.opcode in ("while", "call", "async-start"):
                for c in mod.callees(i):
                    walk(c, ins)
                prov[comp, i.name] = ins[0] if i.opcode == "while" and ins else None
                if i.opcode == "while":
                    loops.append((comp, i))
            elif i.opcode == "conditional":  # operand k + 1 is branch k's one parameter
                for k, c in enumerate(mod.callees(i)):
                    walk(c, ins[k + 1:k + 2])
            elif i.tuple_arity is None and i.arrays:
                # A weight's elements moved (a slice, a gather; a fusion that writes the dtype of
                # a weight it reads, not a dot's float32 sums) or copied whole (a convert, a
                # re-layout: as large as the weight) are that weight's still.
                size, moves = _nbytes(i.arrays[0]), not mod.multiplies(comp, i)
                kept = [w for o, w in zip(i.operands, ins, strict=True) if isinstance(w, int) and (
                    i.opcode in _MOVES or moves and (size >= COPY_SHARE * w or (
                        i.opcode == "fusion" and mod.dtype(comp, o) == i.arrays[0][0])))]
                prov[comp, i.name] = kept[0] if kept else None

    walk(mod.entry, [])
    if not loops:
        return []
    home, decode = max(loops, key=lambda cw: sum(mod.size(c) for c in mod.callees(cw[1])))
    inside: set[str] = set()

    def under(comp: str) -> None:
        if comp in inside or comp in mod.fused:
            return
        inside.add(comp)
        for i in mod.comps.get(comp, []):
            for c in mod.callees(i):
                under(c)

    for c in mod.callees(decode):
        under(c)
    feeds = _feeders(mod, prov, home, decode)
    out = []
    for comp, instrs in mod.comps.items():
        where = "loop" if comp in inside else "hoisted" if comp in feeds else None
        if where is None:
            continue
        for i in instrs:
            if (i.opcode in _NO_BUFFER or i.opcode.endswith(("-start", "-update"))
                    or not i.arrays or (where == "hoisted" and i.name not in feeds[comp])):
                continue
            if where == "hoisted" and i.space:  # kept in VMEM for the loop: no HBM bytes a step
                continue
            why = _why(mod, comp, i, prov, row_elems * min_rows)
            if why:
                biggest = max(i.arrays, key=_nbytes)
                op_name, origin = mod.origin(comp, i)
                out.append(LoopOp(i.name, i.opcode, _shape(biggest), _nbytes(biggest), where, why,
                                  op_name, origin))
    return out


def _feeders(mod: _Module, prov: dict, home: str, loop: _Instr) -> dict[str, set[str]]:
    """Per computation, the values `loop` carries in from the computation around it (`home`),
    and from the callers of `home` when it is a `call` (XLA's CPU backend wraps a small loop in
    one): its operand, and back from it through tuples and through every op that makes weight
    data without multiplying (a copy, a slice, a re-layout): the work hoisted out of the loop."""
    callers = {c: (comp, i) for comp, instrs in mod.comps.items() for i in instrs
               if i.opcode == "call" for c in mod.callees(i)}
    out: dict[str, set[str]] = {}
    comp, todo = home, list(loop.operands)
    while True:
        by_name, found, through_params = mod.index[comp], set(), False
        while todo:
            name = todo.pop()
            if name in found or name not in by_name:
                continue
            found.add(name)
            i = by_name[name]
            if i.opcode in ("tuple", "get-tuple-element", "opt-barrier") or (
                    isinstance(prov.get((comp, name)), int) and not mod.multiplies(comp, i)):
                todo += i.operands
            through_params |= by_name[name].opcode == "parameter"
        out[comp] = found
        if not through_params or comp not in callers:
            return out
        comp, call = callers[comp]
        todo = list(call.operands)


def _why(mod: _Module, comp: str, instr: _Instr, prov: dict, row_threshold: int) -> str | None:
    """"weight copy", "float32 rows" or None for one materialised op: rows widened to float32
    are said so unless they make the whole weight."""
    if mod.multiplies(comp, instr):
        return None
    read = [(prov.get((comp, o)), mod.dtype(comp, o)) for o in instr.operands]
    weights = [w for w, _ in read if isinstance(w, int)]
    if not weights:
        return None
    size = max(map(_nbytes, instr.arrays))
    if size >= min(weights):
        return "weight copy"
    widened = [a for a in instr.arrays if a[0] == "f32" and math.prod(a[1]) >= row_threshold]
    if widened and any(isinstance(w, int) and d in _SIXTEEN_BIT_FLOATS for w, d in read) and (
            instr.opcode == "convert" or (instr.opcode == "fusion" and any(
                mod.converts(c, row_threshold) for c in mod.callees(instr)))):
        return "float32 rows"
    return "weight copy" if size >= COPY_SHARE * min(weights) else None


def _shape(array: tuple[str, tuple[int, ...]]) -> str:
    return f"{array[0]}[{','.join(map(str, array[1]))}]"


def thresholds(cfg: LlamaConfig, dtype) -> dict[str, int]:
    """`decode_loop_ops`' keyword arguments for a model of `cfg` stored in `dtype`: its smallest
    weight matrix (a projection `[out, in]`) and its hidden size."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    smallest = min(d * f, d * cfg.num_attention_heads * hd, d * cfg.num_key_value_heads * hd)
    return dict(weight_bytes=smallest * jnp.dtype(dtype).itemsize, row_elems=d)


def loop_ops(compiled, loop: dict[str, int]) -> list[dict]:
    """`decode_loop_ops` of a compiled program (`jax.stages.Compiled`) with `loop`'s thresholds
    (`thresholds`), as JSON records."""
    return [dataclasses.asdict(op) for op in decode_loop_ops(compiled.as_text(), **loop)]


def failures(records: list[dict], target: str) -> list[str]:
    """A line per program record (`target` names its device field: "gpu", "tpu", "cpu") whose
    decode loop holds such ops: what fails a compile report."""
    out = []
    for r in records:
        ops = r.get("loop_ops") or []
        if ops:
            where = {}
            for op in ops:
                key = f"{op['why']} {op['where']} from {op['origin'] or op['op_name'] or '?'}"
                where[key] = where.get(key, 0) + 1
            out.append(f"{r[target]} {r['name']} batch {r['batch']}: {len(ops)} weight-sized "
                       f"XLA ops in the decode loop ("
                       + "; ".join(f"{n} x {k}" for k, n in where.items()) + ")")
    return out
